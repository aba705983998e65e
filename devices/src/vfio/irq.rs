//! Interrupts of a passthrough function: the emulated MSI or MSI-X capability reports vector
//! changes here; each vector gets a GSI and an eventfd that VFIO signals and KVM injects.

use std::sync::{Arc, Mutex};

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
}
