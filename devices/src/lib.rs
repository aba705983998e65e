//! Emulated devices of a p2pvmm guest: the port-I/O and MMIO buses, the legacy PC devices
//! (serial console, i8042 reset, ACPI power management) and, later, the PCI(e) platform and the
//! VFIO PCI device model.

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod vfio;

pub use bus::{Bus, BusDevice, BusError, BusRange};
