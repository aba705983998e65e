//! How devices raise guest interrupts without knowing the hypervisor: an eventfd per vector that
//! the VMM wires to the guest's interrupt controller (KVM irqfd + GSI routing).

use vmm_sys_util::eventfd::EventFd;

pub use crate::pci::MsiMessage;

/// One MSI/MSI-X vector: writing `event` raises the interrupt routed through `gsi`.
#[derive(Debug)]
pub struct MsiVector {
    pub gsi: u32,
    pub event: EventFd,
}

/// A level-triggered INTx line: `trigger` asserts it, `resample` is signalled when the guest
/// EOIs it (so the device can be unmasked and re-assert if still pending).
#[derive(Debug)]
pub struct IntxLine {
    pub gsi: u32,
    pub trigger: EventFd,
    pub resample: EventFd,
}

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("no free GSI for another MSI vector")]
    NoGsi,
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The VMM side of interrupt delivery.
pub trait InterruptController: Send + Sync {
    /// Reserves a GSI and an eventfd for one MSI or MSI-X vector; nothing is delivered until it is
    /// routed.
    fn allocate_msi(&self) -> Result<MsiVector, InterruptError>;
    /// Delivers `vector`'s eventfd as `message`, or stops delivering it (`None`: masked or
    /// disabled). Signals that arrive while unrouted stay in the eventfd and are delivered when
    /// the vector is routed again.
    fn route_msi(
        &self,
        vector: &MsiVector,
        message: Option<MsiMessage>,
    ) -> Result<(), InterruptError>;
    /// Stops delivery and gives the GSI back.
    fn free_msi(&self, vector: MsiVector);
    /// Connects a level-triggered line to IOAPIC input `gsi`.
    fn connect_intx(&self, gsi: u32) -> Result<IntxLine, InterruptError>;
    /// Disconnects a line made by `connect_intx`.
    fn disconnect_intx(&self, line: IntxLine);
}
