//! Interrupts of a host device: INTx, MSI and MSI-X delivered through eventfds
//! (`VFIO_DEVICE_SET_IRQS`).
//!
//! The eventfds are what the VMM also registers with KVM (irqfd for MSI/MSI-X, irqfd plus
//! resample fd for INTx), so a device interrupt reaches the guest without a VMM exit. The ioctl
//! is raw here because vfio-ioctls' wrappers drop the errno and cannot update a sub-range of
//! MSI-X vectors; the variable-size argument is built as plain words, which keeps the layout
//! testable.

use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_irq_set, VFIO_BASE, VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_TYPE,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ptr;

use crate::device::{DeviceError, HostPciDevice};

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);

/// The interrupt indices VFIO defines for PCI devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum IrqIndex {
    Intx = 0,
    Msi = 1,
    Msix = 2,
    /// AER error notification.
    Err = 3,
    /// Device release request from the host (hot-unplug by the host admin).
    Req = 4,
}

/// What the device supports for one interrupt index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// Vectors available (1 for INTx; up to 32 for MSI, 2048 for MSI-X; 0 if unsupported).
    pub count: u32,
    pub eventfd: bool,
    pub maskable: bool,
    /// INTx: the kernel masks the line on each interrupt; unmask after the guest's EOI.
    pub automasked: bool,
    /// The vector count cannot change while enabled: disable, then enable with the new count.
    pub noresize: bool,
}

/// The words of a `vfio_irq_set` with `data` as 32-bit words (eventfds, or nothing). Built as
/// `u32`s so the buffer is aligned for the struct and its layout is plain to see.
fn irq_set_words(flags: u32, index: u32, start: u32, count: u32, data: &[i32]) -> Vec<u32> {
    let argsz = size_of::<vfio_irq_set>() + std::mem::size_of_val(data);
    let mut words = vec![argsz as u32, flags, index, start, count];
    words.extend(data.iter().map(|&fd| fd as u32));
    words
}

impl HostPciDevice {
    /// The device's capabilities for `index`, or `None` if it has no such interrupt.
    pub fn irq_info(&self, index: IrqIndex) -> Option<IrqInfo> {
        self.vfio.get_irq_info(index as u32).map(|irq| IrqInfo {
            count: irq.count,
            eventfd: irq.flags & VFIO_IRQ_INFO_EVENTFD != 0,
            maskable: irq.flags & VFIO_IRQ_INFO_MASKABLE != 0,
            automasked: irq.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
            noresize: irq.flags & VFIO_IRQ_INFO_NORESIZE != 0,
        })
    }

    /// Checks `[start, start + n)` against the vectors of `index`.
    fn check_vectors(&self, index: IrqIndex, start: u32, n: usize) -> Result<(), DeviceError> {
        let bdf = self.bdf();
        let count = self
            .irq_info(index)
            .ok_or(DeviceError::NoSuchIrq {
                bdf,
                index: index as u32,
            })?
            .count;
        let end = u64::from(start) + n as u64;
        if end > u64::from(count) {
            return Err(DeviceError::IrqOutOfRange {
                bdf,
                index: index as u32,
                start,
                end,
                count,
            });
        }
        Ok(())
    }

    fn set_irqs(&self, index: IrqIndex, words: &[u32]) -> Result<(), DeviceError> {
        // SAFETY: the fd is an open VFIO device fd; `words` is a complete vfio_irq_set (header
        // plus the data its argsz and flags announce), suitably aligned, that the kernel only
        // reads during the call.
        let ret = unsafe {
            ioctl_with_ptr(
                self,
                VFIO_DEVICE_SET_IRQS(),
                words.as_ptr().cast::<vfio_irq_set>(),
            )
        };
        if ret != 0 {
            return Err(DeviceError::SetIrqs {
                bdf: self.bdf(),
                index: index as u32,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Enables `index` with one eventfd per vector, from vector 0 (MSI/MSI-X: as many vectors
    /// as the guest enabled; INTx: one). Each interrupt then signals its eventfd.
    pub fn enable_irq(&self, index: IrqIndex, eventfds: &[&EventFd]) -> Result<(), DeviceError> {
        let fds: Vec<Option<&EventFd>> = eventfds.iter().copied().map(Some).collect();
        self.set_irq_vectors(index, 0, &fds)
    }

    /// Sets the eventfds of vectors `start..start + eventfds.len()`; `None` detaches a vector's
    /// eventfd (the guest masked or cleared that MSI-X entry). Lets MSI-X vectors be added one
    /// at a time while the others keep running.
    pub fn set_irq_vectors(
        &self,
        index: IrqIndex,
        start: u32,
        eventfds: &[Option<&EventFd>],
    ) -> Result<(), DeviceError> {
        self.check_vectors(index, start, eventfds.len())?;
        let fds: Vec<i32> = eventfds
            .iter()
            .map(|fd| fd.map_or(-1, |fd| fd.as_raw_fd()))
            .collect();
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let words = irq_set_words(flags, index as u32, start, fds.len() as u32, &fds);
        self.set_irqs(index, &words)
    }

    /// Disables every vector of `index` (the guest turned MSI/MSI-X off, or INTx is no longer
    /// wanted).
    pub fn disable_irq(&self, index: IrqIndex) -> Result<(), DeviceError> {
        self.check_vectors(index, 0, 0)?;
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        self.set_irqs(index, &irq_set_words(flags, index as u32, 0, 0, &[]))
    }

    /// Has the kernel unmask INTx whenever `resample` is signalled: register the same eventfd
    /// as KVM's irqfd resample fd and the line is unmasked on the guest's EOI with no exit.
    pub fn set_intx_resample(&self, resample: &EventFd) -> Result<(), DeviceError> {
        self.check_vectors(IrqIndex::Intx, 0, 1)?;
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK;
        let words = irq_set_words(flags, IrqIndex::Intx as u32, 0, 1, &[resample.as_raw_fd()]);
        self.set_irqs(IrqIndex::Intx, &words)
    }

    /// Unmasks INTx now (for a VMM that handles the guest's EOI itself).
    pub fn unmask_intx(&self) -> Result<(), DeviceError> {
        self.check_vectors(IrqIndex::Intx, 0, 1)?;
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
        self.set_irqs(
            IrqIndex::Intx,
            &irq_set_words(flags, IrqIndex::Intx as u32, 0, 1, &[]),
        )
    }

    /// Masks INTx (the guest set PCI_COMMAND.INTX_DISABLE).
    pub fn mask_intx(&self) -> Result<(), DeviceError> {
        self.check_vectors(IrqIndex::Intx, 0, 1)?;
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK;
        self.set_irqs(
            IrqIndex::Intx,
            &irq_set_words(flags, IrqIndex::Intx as u32, 0, 1, &[]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfds_follow_the_header_and_argsz_counts_them() {
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

        let words = irq_set_words(flags, IrqIndex::Msix as u32, 4, 3, &[10, -1, 12]);

        assert_eq!(size_of::<vfio_irq_set>(), 20);
        assert_eq!(words, vec![32, flags, 2, 4, 3, 10, u32::MAX, 12]);
    }

    #[test]
    fn disabling_sends_a_bare_header_with_count_zero() {
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;

        let words = irq_set_words(flags, IrqIndex::Msi as u32, 0, 0, &[]);

        assert_eq!(words, vec![20, flags, 1, 0, 0]);
    }
}
