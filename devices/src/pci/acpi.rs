//! The root complex in the DSDT.
//!
//! `\_SB.PCI0` is a PCI Express host bridge (PNP0A08, compatible PNP0A03) for segment 0
//! starting at bus 0. Its `_CRS` lists what it forwards: the bus numbers ECAM covers, the
//! 0xCF8 config ports (consumed), the I/O window, and the two MMIO windows; Linux only assigns
//! and accepts BARs inside these. Its `_OSC` grants the OS everything it asks for (PME, AER,
//! capability structure control, ...) except native PCIe hotplug: slots are hotplugged through
//! ACPI (`acpi_hotplug.rs`), and `pciehp` must not claim their ports. Its `_PRT` routes every root-bus device's INTA..INTD to a GSI of the IOAPIC
//! ([`super::intx`] has the scheme); functions below bridges reach it through the standard
//! swizzle, which the OS applies itself. A separate PNP0C02 device reserves the ECAM range: Linux
//! refuses MMCONFIG from MCFG unless the range is reserved in ACPI or the E820 map.
//!
//! The `_PRT` entries name GSIs directly (source 0), which ACPI defines as level-triggered,
//! active-low, shareable inputs: Linux programs the IOAPIC pins that way when a driver enables
//! the device, so the MADT needs no interrupt source override for them (overrides only remap
//! the ISA IRQs 0-15).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Arg, CreateDWordField, Device, EISAName, Equal,
    GreaterEqual, If, Memory32Fixed, Method, Name, Or, PackageBuilder, Path, ResourceTemplate,
    Return, Uuid, IO, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use super::acpi_hotplug;
use super::intx::root_bus_routes;
use super::topology::{PciLayout, PciRoot};

/// `_OSC` UUID for PCI host bridges (PCI Firmware Specification).
const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// `_OSC` status bit: the UUID is not recognised.
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
/// `_OSC` status bit: some requested control bits were cleared.
const OSC_CAPABILITIES_MASKED: u8 = 1 << 4;
/// `_OSC` control bit: native PCI Express hotplug, never granted (hotplug is ACPI's).
const OSC_NATIVE_PCIE_HOTPLUG: u32 = 1 << 0;

impl PciRoot {
    /// The DSDT objects describing this root complex (append to the DSDT body): the host
    /// bridge, the ECAM reservation, and the hotplug objects of `acpi_hotplug.rs` (the port
    /// hierarchy with its slots, the hotplug controller, the GED and the power button).
    pub fn dsdt_aml(&self) -> Vec<u8> {
        let mut aml = dsdt_aml(self.layout(), self.last_bus());
        aml.extend(acpi_hotplug::dsdt_aml(self.acpi_ports()));
        aml
    }
}

/// `\_SB.PCI0` and the `\_SB.ECAM` reservation for `layout`, which [`PciLayout`]'s validation
/// has checked (windows below 4 GiB and 64 KiB where the descriptors are 32 and 16 bits).
fn dsdt_aml(layout: &PciLayout, last_bus: u8) -> Vec<u8> {
    let bus_numbers = AddressSpace::<u16>::new_bus_number(0, last_bus.into());
    let config_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_window = layout.io.map(|io| {
        // PciLayout::validate keeps the I/O window below 64 KiB.
        AddressSpace::<u16>::new_io(io.base as u16, (io.end() - 1) as u16, None)
    });
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout.mmio32.base as u32,
        (layout.mmio32.end() - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::PreFetchable,
        true,
        layout.mmio64.base,
        layout.mmio64.end() - 1,
        None,
    );
    let mut resources: Vec<&dyn Aml> = vec![&bus_numbers, &config_ports];
    if let Some(io) = &io_window {
        resources.push(io);
    }
    resources.push(&mmio32);
    resources.push(&mmio64);
    let crs = ResourceTemplate::new(resources);

    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
        Name::new("_SEG".into(), &ZERO),
        Name::new("_BBN".into(), &ZERO),
        Name::new("_UID".into(), &ZERO),
        Name::new("_CRS".into(), &crs),
        Name::new("_PRT".into(), &prt()),
    ];
    let osc = osc_method();
    let mut children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    children.push(&osc);
    let pci0 = Device::new(Path::new("\\_SB_.PCI0"), children);

    let ecam_hid = EISAName::new("PNP0C02");
    let ecam_uid: &str = "PCI0 ECAM";
    // MCFG and PciLayout::validate keep ECAM below 4 GiB.
    let ecam_len = (u32::from(last_bus) + 1) << 20;
    let ecam_range = Memory32Fixed::new(false, layout.ecam.base as u32, ecam_len);
    let ecam_crs = ResourceTemplate::new(vec![&ecam_range]);
    let ecam_hid_name = Name::new("_HID".into(), &ecam_hid);
    let ecam_uid_name = Name::new("_UID".into(), &ecam_uid);
    let ecam_crs_name = Name::new("_CRS".into(), &ecam_crs);
    let ecam = Device::new(
        Path::new("\\_SB_.ECAM"),
        vec![&ecam_hid_name, &ecam_uid_name, &ecam_crs_name],
    );

    let mut aml = Vec::new();
    pci0.to_aml_bytes(&mut aml);
    ecam.to_aml_bytes(&mut aml);
    aml
}

/// `_PRT`: `Package { Package { 0xDDDDFFFF, pin, 0, GSI }, ... }` for every root-bus device
/// `DDDD` (any function) and pin 0..=3 (INTA..INTD). Source 0 means the last field is a GSI.
fn prt() -> PackageBuilder {
    let mut table = PackageBuilder::new();
    for (device, pin, gsi) in root_bus_routes() {
        let address = (u32::from(device) << 16) | 0xffff;
        let mut entry = PackageBuilder::new();
        entry.add_element(&address);
        entry.add_element(&pin);
        entry.add_element(&ZERO);
        entry.add_element(&gsi);
        table.add_element(&entry);
    }
    table
}

/// Already-encoded AML, so a helper can build a subtree whose operands borrow its locals.
pub(super) struct RawAml(pub(super) Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// `_OSC(UUID, Revision, Count, Capabilities)`: for the PCI host bridge UUID, grant every
/// control bit the OS requested except native PCIe hotplug (hotplug slots are ACPI's, so
/// `pciehp` must never claim a port), flagging "capabilities masked" when that bit was asked
/// for, as the PCI Firmware Specification wants; for any other UUID, flag it as unrecognised.
/// Linux queries first and then requests what the query granted, so the masked flag only ever
/// reaches the query.
fn osc_method() -> RawAml {
    let (arg0, arg2, arg3) = (Arg(0), Arg(2), Arg(3));
    let (cdw1, cdw3) = (Path::new("CDW1"), Path::new("CDW3"));
    let uuid = Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci = Equal::new(&arg0, &uuid);
    let ret = Return::new(&arg3);
    let create = CreateDWordField::new(&cdw1, &arg3, &ZERO);
    // The control dword exists when Count >= 3 (Linux always passes 3 or more).
    let three = 3u8;
    let has_control = GreaterEqual::new(&arg2, &three);
    let eight = 8u8;
    let create3 = CreateDWordField::new(&cdw3, &arg3, &eight);
    let hotplug = OSC_NATIVE_PCIE_HOTPLUG;
    let asks_hotplug = And::new(&ZERO, &cdw3, &hotplug);
    let not_hotplug = !OSC_NATIVE_PCIE_HOTPLUG;
    let clear = And::new(&cdw3, &cdw3, &not_hotplug);
    let masked = Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let mask = If::new(&asks_hotplug, vec![&clear, &masked]);
    let control = If::new(&has_control, vec![&create3, &mask]);
    let matched = If::new(&is_pci, vec![&control, &ret]);
    let flag = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    // Serialized: the method creates named fields, which must not race another caller.
    let method = Method::new("_OSC".into(), 4, true, vec![&create, &matched, &flag, &ret]);
    let mut bytes = Vec::new();
    method.to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
