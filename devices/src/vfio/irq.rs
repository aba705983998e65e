//! Interrupts of a passthrough function: the emulated MSI or MSI-X capability reports vector
//! changes here; each vector gets a GSI and an eventfd that VFIO signals and KVM injects.
//! While the guest masks a vector its route is withdrawn: the device's interrupts then
//! accumulate in the eventfd (shown as the vector's pending bit) until the route returns.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use vfio_p2p::{HostPciDevice, IrqIndex};

use crate::interrupt::{InterruptController, MsiVector};
use crate::pci::{MsiMessage, MsiSink};

/// Vectors of one interrupt capability (MSI or MSI-X) of one function.
pub struct VfioMsi {
    host: Arc<HostPciDevice>,
    controller: Arc<dyn InterruptController>,
    index: IrqIndex,
    /// How many vectors to enable on the host when the guest enables the capability.
    count: Mutex<u16>,
    vectors: Mutex<Vec<Option<MsiVector>>>,
}

impl VfioMsi {
    pub fn new(
        host: Arc<HostPciDevice>,
        controller: Arc<dyn InterruptController>,
        index: IrqIndex,
        count: u16,
    ) -> Self {
        Self {
            host,
            controller,
            index,
            count: Mutex::new(count),
            vectors: Mutex::new(Vec::new()),
        }
    }

    /// For MSI: the number of vectors the guest enabled (multiple message enable).
    pub fn set_count(&self, count: u16) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) = count.max(1);
    }

    fn with_vector<R>(&self, vector: u16, f: impl FnOnce(&MsiVector) -> R) -> Option<R> {
        let mut vectors = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        let slot = usize::from(vector);
        if vectors.len() <= slot {
            vectors.resize_with(slot + 1, || None);
        }
        if vectors[slot].is_none() {
            match self.controller.allocate_msi() {
                Ok(v) => vectors[slot] = Some(v),
                Err(e) => {
                    log::error!("{}: {:?} vector {vector}: {e}", self.host.bdf(), self.index);
                    return None;
                }
            }
        }
        vectors[slot].as_ref().map(f)
    }

    /// Whether `vector` has an eventfd with interrupts nobody consumed.
    fn signalled(&self, vector: u16) -> bool {
        let vectors = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        vectors
            .get(usize::from(vector))
            .and_then(Option::as_ref)
            .is_some_and(|v| readable(&v.event))
    }

    /// Disables the host interrupts and gives every vector back (device removal).
    pub fn release(&self) {
        if let Err(e) = self.host.disable_irq(self.index) {
            log::debug!("{}: disabling {:?}: {e}", self.host.bdf(), self.index);
        }
        let vectors = std::mem::take(&mut *self.vectors.lock().unwrap_or_else(|e| e.into_inner()));
        for vector in vectors.into_iter().flatten() {
            self.controller.free_msi(vector);
        }
    }
}

impl MsiSink for VfioMsi {
    fn vector_changed(&self, vector: u16, message: Option<MsiMessage>) {
        let routed = self.with_vector(vector, |v| self.controller.route_msi(v, message));
        if let Some(Err(e)) = routed {
            log::error!(
                "{}: routing {:?} vector {vector}: {e}",
                self.host.bdf(),
                self.index
            );
        }
    }

    fn enable_changed(&self, enabled: bool) {
        let bdf = self.host.bdf();
        if !enabled {
            if let Err(e) = self.host.disable_irq(self.index) {
                log::error!("{bdf}: disabling {:?}: {e}", self.index);
            }
            return;
        }
        let count = *self.count.lock().unwrap_or_else(|e| e.into_inner());
        for vector in 0..count {
            self.with_vector(vector, |_| ());
        }
        let vectors = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        let fds: Vec<_> = vectors
            .iter()
            .take(usize::from(count))
            .flatten()
            .map(|v| &v.event)
            .collect();
        if let Err(e) = self.host.enable_irq(self.index, &fds) {
            log::error!(
                "{bdf}: enabling {} {:?} vectors: {e}",
                fds.len(),
                self.index
            );
        }
    }

    fn inject(&self, vector: u16, _message: MsiMessage) {
        // The vector is routed again: signalling its eventfd delivers through the new route.
        if let Some(Err(e)) = self.with_vector(vector, |v| v.event.write(1)) {
            log::error!("{}: injecting vector {vector}: {e}", self.host.bdf());
        }
    }

    fn held(&self, vector: u16) -> bool {
        // Unrouted, nothing reads the eventfd; KVM's irqfd delivers what is in it when the
        // route comes back (and takes over reading it).
        self.signalled(vector)
    }
}

/// Whether `event`'s counter is non-zero, without reading (clearing) it.
fn readable(event: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: event.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, nfds 1, no timeout: poll only reports the fd's state.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready == 1 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signalled_eventfd_reads_as_pending_without_being_consumed() {
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(!readable(&event));
        event.write(1).unwrap();
        assert!(readable(&event));
        assert!(readable(&event), "looking must not clear the counter");
        assert_eq!(event.read().unwrap(), 1);
        assert!(!readable(&event));
    }
}
