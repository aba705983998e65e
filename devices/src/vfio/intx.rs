//! INTx of a passthrough function: the fallback interrupt for guests and drivers that use
//! neither MSI nor MSI-X.
//!
//! Delivery needs no VMM exit. VFIO signals `trigger` when the function asserts its line (and
//! masks the host line); KVM's irqfd on `trigger` asserts the guest's level-triggered IOAPIC
//! input; when the guest EOIs it, KVM signals `resample`, on which VFIO unmasks the host line,
//! and a function that still asserts it interrupts again.
//!
//! VFIO delivers one interrupt type at a time, so INTx is on only while the guest has both MSI
//! and MSI-X disabled: the device model turns it off before an MSI/MSI-X enable reaches VFIO,
//! and back on once the disable has. The guest's PCI_COMMAND.INTX_DISABLE reaches VFIO with the
//! rest of the command register, and VFIO keeps the line masked while it is set. The function's
//! Interrupt Status bit (PCI_STATUS bit 3) is read from the host: shared-INTx handlers such as
//! Linux's `pci_check_and_mask_intx` (which a guest's own vfio-pci uses) only claim an
//! interrupt when it is set.

use std::sync::Arc;

use vfio_p2p::{DeviceError, HostPciDevice, IrqIndex, CONFIG_REGION};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{InterruptController, InterruptError, IntxLine};
use crate::pci::regs::STATUS;

/// PCI_STATUS: the function is asserting INTx (PCI 2.3), whether or not INTX_DISABLE masks it.
const STATUS_INTERRUPT: u8 = 1 << 3;

/// What INTx needs from the host function; [`HostPciDevice`] through VFIO, a fake in tests.
pub trait IntxHost: Send + Sync {
    /// For logs.
    fn label(&self) -> String;
    /// Starts delivering the host line to `trigger`.
    fn intx_enable(&self, trigger: &EventFd) -> Result<(), DeviceError>;
    /// Has VFIO unmask the host line whenever `resample` is signalled (valid while enabled).
    fn intx_resample(&self, resample: &EventFd) -> Result<(), DeviceError>;
    fn intx_disable(&self) -> Result<(), DeviceError>;
    /// The host function's status register.
    fn status(&self) -> Result<u16, DeviceError>;
}

impl IntxHost for HostPciDevice {
    fn label(&self) -> String {
        self.bdf().to_string()
    }

    fn intx_enable(&self, trigger: &EventFd) -> Result<(), DeviceError> {
        self.enable_irq(IrqIndex::Intx, &[trigger])
    }

    fn intx_resample(&self, resample: &EventFd) -> Result<(), DeviceError> {
        self.set_intx_resample(resample)
    }

    fn intx_disable(&self) -> Result<(), DeviceError> {
        self.disable_irq(IrqIndex::Intx)
    }

    fn status(&self) -> Result<u16, DeviceError> {
        let mut raw = [0u8; 2];
        self.read_region(CONFIG_REGION, u64::from(STATUS), &mut raw)?;
        Ok(u16::from_le_bytes(raw))
    }
}

/// The interrupt pin to show the guest (1 = INTA .. 4 = INTD): the host function's, if VFIO can
/// deliver its INTx at all, else 0 (no pin).
pub fn host_pin(host: &HostPciDevice, probed: u8) -> u8 {
    let deliverable = host
        .irq_info(IrqIndex::Intx)
        .is_some_and(|info| info.count > 0 && info.eventfd);
    if deliverable && (1..=4).contains(&probed) {
        probed
    } else {
        0
    }
}

/// The INTx line of one function.
pub struct VfioIntx {
    host: Arc<dyn IntxHost>,
    controller: Arc<dyn InterruptController>,
    /// The guest GSI and its eventfds, once the function's place in the topology is known.
    line: Option<IntxLine>,
    /// Whether INTx should be delivered now: MSI and MSI-X are both off.
    wanted: bool,
    /// Whether VFIO delivers INTx to `line` now.
    enabled: bool,
}

impl VfioIntx {
    /// A line that delivers nothing until [`VfioIntx::connect`]. INTx is wanted from the start,
    /// as a function comes out of reset with MSI and MSI-X disabled.
    pub fn new(host: Arc<dyn IntxHost>, controller: Arc<dyn InterruptController>) -> Self {
        Self {
            host,
            controller,
            line: None,
            wanted: true,
            enabled: false,
        }
    }

    /// The guest GSI the line is connected to.
    pub fn gsi(&self) -> Option<u32> {
        self.line.as_ref().map(|l| l.gsi)
    }

    /// Connects the line to guest GSI `gsi` (replacing an earlier connection) and delivers it if
    /// INTx is wanted.
    pub fn connect(&mut self, gsi: u32) -> Result<(), InterruptError> {
        self.release();
        self.line = Some(self.controller.connect_intx(gsi)?);
        self.apply();
        Ok(())
    }

    /// Reports whether INTx may be delivered (MSI and MSI-X both disabled). Acts only on a
    /// change, so a failure is logged once per transition rather than on every config write.
    pub fn set_wanted(&mut self, wanted: bool) {
        if wanted != self.wanted {
            self.wanted = wanted;
            self.apply();
        }
    }

    fn apply(&mut self) {
        match (&self.line, self.wanted, self.enabled) {
            (Some(line), true, false) => {
                if let Err(e) = self.host.intx_enable(&line.trigger) {
                    log::error!(
                        "{}: enabling INTx (GSI {}): {e}",
                        self.host.label(),
                        line.gsi
                    );
                    return;
                }
                self.enabled = true;
                if let Err(e) = self.host.intx_resample(&line.resample) {
                    log::error!("{}: INTx unmask on EOI: {e}", self.host.label());
                }
            }
            (_, false, true) | (None, _, true) => {
                self.enabled = false;
                if let Err(e) = self.host.intx_disable() {
                    log::error!("{}: disabling INTx: {e}", self.host.label());
                }
            }
            _ => {}
        }
    }

    /// Puts the host's Interrupt Status bit into a guest read of `data` at config `offset`.
    pub fn merge_status(&self, offset: u16, data: &mut [u8]) {
        let Some(byte) = STATUS
            .checked_sub(offset)
            .map(usize::from)
            .and_then(|at| data.get_mut(at))
        else {
            return;
        };
        match self.host.status() {
            Ok(status) => *byte = (*byte & !STATUS_INTERRUPT) | (status as u8 & STATUS_INTERRUPT),
            Err(e) => log::warn!("{}: reading the status register: {e}", self.host.label()),
        }
    }

    /// Stops delivery and gives the line back (device removal, or before reconnecting).
    pub fn release(&mut self) {
        let wanted = std::mem::replace(&mut self.wanted, false);
        self.apply();
        self.wanted = wanted;
        if let Some(line) = self.line.take() {
            self.controller.disconnect_intx(line);
        }
    }
}

impl Drop for VfioIntx {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
#[path = "intx_tests.rs"]
mod tests;
