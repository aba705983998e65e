//! The guest-visible PCI Express platform: one PCI segment behind an ECAM window and the legacy
//! 0xCF8/0xCFC port pair, a host bridge, root ports and switches, and the building blocks a
//! device model embeds (an emulated configuration space, capabilities, MSI and MSI-X).
//!
//! Nothing here talks to KVM. Everything that must change the guest's address space or
//! interrupt routing leaves this module as data through two small traits the VMM implements:
//! [`BarObserver`] (a BAR started or stopped decoding an address range) and [`MsiSink`] (an
//! MSI/MSI-X vector was reprogrammed, masked or enabled).
//!
//! The pieces, bottom up:
//! - [`config`]: the 4 KiB register file with writable and write-1-to-clear masks, and the
//!   header emulator shared by type-0 and type-1 functions ([`ConfigSpace<N>`]).
//! - [`caps`] / [`pcie_cap`]: capability chains and the PCI Express capability.
//! - [`bar`]: which ranges a function decodes, and the single place that turns a config write
//!   into [`BarChange`]s, hands them to the observer and rolls back if the observer refuses.
//! - [`segment`]: config routing through bridges, the ECAM and 0xCF8 bus devices.
//! - [`port`], [`root_port`], [`switch`], [`host_bridge`]: the emulated functions.
//! - [`topology`]: does the firmware's job (bus numbers, BARs, bridge windows) up front.
//! - [`acpi`]: the root complex's DSDT fragment, with the INTx routing table.
//! - [`hotplug`] / [`acpi_hotplug`]: ACPI PCI hotplug: the controller's registers and GED
//!   interrupt, and the DSDT objects the guest's `acpiphp` drives them with.
//! - [`intx`]: which IOAPIC input each function's INTx pin drives (root-bus table + swizzle).
//! - [`msi`] / [`msix`]: interrupt capability state machines for passthrough devices.
//! - [`fake`]: test doubles that check their own invariants.

pub mod acpi;
pub mod acpi_hotplug;
pub mod bar;
pub mod caps;
pub mod config;
pub mod fake;
pub mod host_bridge;
pub mod hotplug;
pub mod intx;
pub mod msi;
pub mod msix;
pub mod p2p_placement;
pub mod pcie_cap;
pub mod port;
pub mod regs;
pub(crate) mod resources;
pub mod root_port;
pub mod segment;
pub mod switch;
pub mod topology;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

pub use bar::{
    BarChange, BarInfo, BarKind, BarObserver, BarRegion, BarRejected, ObserverError, RomInfo,
    ROM_BAR,
};
pub use config::{BarDef, ConfigError, ConfigRegs, ConfigSpace, PciIds, Type0Config, Type1Config};
pub use host_bridge::HostBridge;
pub use hotplug::{
    AcpiHotplug, EjectHandler, HotplugError, GED_PCI_HOTPLUG, GED_POWER_BUTTON, HOTPLUG_GED_GSI,
    HOTPLUG_IO_BASE, HOTPLUG_IO_LEN,
};
pub use msi::{MsiCap, MsiConfig, MsiMessage, MsiSink};
pub use msix::{Msix, MsixConfig};
pub use pcie_cap::{LinkConfig, LinkSpeed, PcieCap, PcieDeviceType, SlotConfig};
pub use port::PciePort;
pub use resources::WindowKind;
pub use segment::{PciConfigIo, PciEcam, PciSegment, SegmentError};
pub use switch::PcieSwitch;
pub use topology::{
    HotplugReserve, HotplugSlotInfo, PciLayout, PciRoot, Placement, TopologyBuilder, TopologyError,
    MAX_HOTPLUG_SLOTS,
};

/// A function's address on the segment (the segment itself is always 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Bdf {
    /// # Panics
    /// If `device` > 31 or `function` > 7: that is a bug in the caller, never guest input
    /// (guest-supplied addresses are decoded with masks by [`Bdf::from_devfn`]).
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        assert!(
            device < 32 && function < 8,
            "PCI device or function out of range"
        );
        Self {
            bus,
            device,
            function,
        }
    }

    /// Splits a devfn byte (device in bits 7:3, function in bits 2:0).
    pub const fn from_devfn(bus: u8, devfn: u8) -> Self {
        Self {
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }

    pub const fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// One PCI function as the platform sees it.
///
/// Kept small on purpose: configuration space is an object each device embeds (usually a
/// [`ConfigSpace`], wrapped by passthrough devices that forward part of it to hardware), and the
/// device only exposes what the platform needs to route accesses and to know what the function
/// decodes. Everything derived from those registers (BAR moves, bridge routing) is computed
/// outside the device, once, for every device.
pub trait PciDevice: Send {
    /// Short human-readable name for logs.
    fn name(&self) -> &str;
    /// Guest read of configuration space; `offset + data.len()` stays within 4 KiB and inside
    /// one dword.
    fn read_config(&mut self, offset: u16, data: &mut [u8]);
    /// Guest write of configuration space, with the same bounds as [`PciDevice::read_config`].
    fn write_config(&mut self, offset: u16, data: &[u8]);
    /// The BARs as currently programmed, indexed by BAR number; the upper half of a 64-bit BAR
    /// is `None`. Must reflect every write the device accepted, including sizing writes (with
    /// [`BarInfo::sizing`] set while one is in force: [`ConfigSpace`] tracks that).
    fn bars(&self) -> [Option<BarInfo>; 6];
    /// The expansion ROM register as programmed, for type-0 functions that have a ROM (the
    /// default: none). Like [`PciDevice::bars`], it must reflect every accepted write; while it
    /// decodes, its accesses arrive as BAR [`ROM_BAR`].
    fn rom(&self) -> Option<RomInfo> {
        None
    }
    /// The command register, for the memory and I/O decode enables.
    fn command(&self) -> u16;
    /// Guest read of `data.len()` bytes at `offset` into BAR `bar` (0-5, or [`ROM_BAR`]).
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// Guest write at `offset` into BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// Conventional reset (secondary bus reset of the bridge above): registers return to their
    /// power-on values.
    fn reset(&mut self) {}
}

/// How devices are shared between the segment (config routing) and the buses (BAR accesses).
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Locks a device mutex, recovering from poisoning: a panicked vCPU thread must not take the
/// whole PCI segment down with it, and device state is plain registers that stay consistent.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_formats_like_lspci_with_segment() {
        assert_eq!(Bdf::new(0x3a, 0x1f, 7).to_string(), "0000:3a:1f.7");
    }

    #[test]
    fn devfn_round_trips() {
        let bdf = Bdf::new(5, 0x11, 3);
        assert_eq!(bdf.devfn(), 0x8b);
        assert_eq!(Bdf::from_devfn(5, 0x8b), bdf);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn bdf_rejects_device_32() {
        let _ = Bdf::new(0, 32, 0);
    }
}
