//! KVM memory slots for device memory (mmapped BARs) that come and go while the guest runs.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("no free KVM memory slot (limit {0})")]
    Exhausted(u32),
    #[error("KVM memory slot {slot} at {gpa:#x} (+{size:#x}): {source}")]
    Kvm {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

struct State {
    next: u32,
    free: Vec<u32>,
}

/// Hands out slot numbers above the ones guest RAM uses, and reuses freed ones.
pub struct MemorySlots {
    vm: Arc<VmFd>,
    limit: u32,
    state: Mutex<State>,
}

/// A device-memory slot; give it back with [`MemorySlots::unmap`].
#[derive(Debug, PartialEq, Eq)]
pub struct Slot {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
}

impl MemorySlots {
    pub fn new(vm: Arc<VmFd>, first: u32, limit: u32) -> Self {
        Self {
            vm,
            limit,
            state: Mutex::new(State {
                next: first,
                free: Vec::new(),
            }),
        }
    }

    fn set(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), SlotError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        let started = std::time::Instant::now();
        // SAFETY: for a non-zero size the caller of `map` guarantees the host range stays mapped
        // until `unmap`; a zero size deletes the slot and touches no memory.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| SlotError::Kvm {
            slot,
            gpa,
            size,
            source,
        })?;
        // Part of a BAR move's cost (the P2P benchmark's breakdown).
        log::debug!(
            "KVM memory slot {slot} at {gpa:#x} {} in {} us",
            if size == 0 { "deleted" } else { "added" },
            started.elapsed().as_micros()
        );
        Ok(())
    }

    /// Maps `size` bytes of host memory at `host` into the guest at `gpa`.
    ///
    /// # Safety
    /// `host..host + size` must be a live mapping that stays valid until the returned slot is
    /// given to [`MemorySlots::unmap`].
    pub unsafe fn map(&self, gpa: u64, size: u64, host: u64) -> Result<Slot, SlotError> {
        let slot = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.free.pop() {
                Some(slot) => slot,
                None if state.next < self.limit => {
                    state.next += 1;
                    state.next - 1
                }
                None => return Err(SlotError::Exhausted(self.limit)),
            }
        };
        if let Err(e) = self.set(slot, gpa, size, host) {
            self.release(slot);
            return Err(e);
        }
        Ok(Slot { slot, gpa, size })
    }

    /// Removes a slot made by [`MemorySlots::map`].
    /// Removes `slot`. When KVM refuses (deleting allocates: ENOMEM), the slot is still in
    /// KVM and comes back with the error, still owned by the caller.
    pub fn unmap(&self, slot: Slot) -> Result<(), (Slot, SlotError)> {
        if let Err(e) = self.set(slot.slot, slot.gpa, 0, 0) {
            return Err((slot, e));
        }
        self.release(slot.slot);
        Ok(())
    }

    fn release(&self, slot: u32) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
            .push(slot);
    }
}

/// How KVM drops the guest's page mappings when a memory slot goes away (a BAR's mmap at decode
/// off or a move): all of them (KVM's default, the `KVM_X86_QUIRK_SLOT_ZAP_ALL` quirk: the guest
/// then faults its whole working set back in) or only the deleted slot's. Returns whether KVM
/// now zaps only the slot's; false when this kernel cannot be asked (before Linux 6.12).
pub fn zap_only_deleted_slots(vm: &VmFd) -> Result<bool, kvm_ioctls::Error> {
    use kvm_bindings::{kvm_enable_cap, KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL};
    let disabled = vm.check_extension_raw(KVM_CAP_DISABLE_QUIRKS2.into());
    if disabled < 0 || disabled as u32 & KVM_X86_QUIRK_SLOT_ZAP_ALL == 0 {
        return Ok(false);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DISABLE_QUIRKS2,
        ..Default::default()
    };
    cap.args[0] = KVM_X86_QUIRK_SLOT_ZAP_ALL.into();
    vm.enable_cap(&cap)?;
    Ok(true)
}
