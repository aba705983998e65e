use super::*;
use crate::bus::BusRange;

const MIB: u64 = 1 << 20;

fn layout() -> PciLayout {
    PciLayout {
        ecam: BusRange::new(0xe000_0000, 256 * MIB),
        mmio32: BusRange::new(0xc000_0000, 512 * MIB),
        mmio64: BusRange::new(0x40_0000_0000, 256 << 30),
        io: Some(BusRange::new(0x1000, 0xf000)),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Decodes an AML PkgLength at `bytes[0..]`: (value, bytes used).
fn pkg_length(bytes: &[u8]) -> (usize, usize) {
    let lead = bytes[0];
    let extra = usize::from(lead >> 6);
    if extra == 0 {
        return (usize::from(lead & 0x3f), 1);
    }
    let mut len = usize::from(lead & 0x0f);
    for (i, b) in bytes[1..=extra].iter().enumerate() {
        len |= usize::from(*b) << (4 + 8 * i);
    }
    (len, extra + 1)
}

/// The top-level objects as (name path bytes, whole object), checking each is a Device whose
/// PkgLength covers exactly its body.
fn devices(aml: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < aml.len() {
        assert_eq!(&aml[at..at + 2], &[0x5b, 0x82], "DeviceOp at {at}");
        let (len, used) = pkg_length(&aml[at + 2..]);
        let end = at + 2 + len;
        assert!(end <= aml.len(), "object at {at} runs past the end");
        // \ + DualNamePrefix + two NameSegs.
        let name = &aml[at + 2 + used..at + 2 + used + 10];
        out.push((name, &aml[at..end]));
        at = end;
    }
    out
}

#[test]
fn pci0_and_the_ecam_reservation_are_well_formed_devices() {
    let aml = dsdt_aml(&layout(), 255);
    let found = devices(&aml);
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].0, b"\\\x2e_SB_PCI0");
    assert_eq!(found[1].0, b"\\\x2e_SB_ECAM");
}

#[test]
fn pci0_names_the_objects_linux_looks_for() {
    let aml = dsdt_aml(&layout(), 255);
    let pci0 = devices(&aml)[0].1;
    for name in ["_HID", "_CID", "_SEG", "_BBN", "_UID", "_CRS", "_OSC"] {
        assert!(contains(pci0, name.as_bytes()), "{name} missing");
    }
    // A device has _HID or _ADR, never both (ACPI 6.1); iasl warns otherwise.
    assert!(!contains(pci0, b"_ADR"));
    // EISAID("PNP0A08") and EISAID("PNP0A03") as DWord constants.
    assert!(contains(pci0, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    assert!(contains(pci0, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
}

#[test]
fn crs_lists_buses_config_ports_and_windows() {
    let aml = dsdt_aml(&layout(), 255);
    let pci0 = devices(&aml)[0].1;
    let bus_numbers = [
        0x88, 0x0d, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0xff, 0, 0, 0, 0x00, 0x01,
    ];
    assert!(contains(pci0, &bus_numbers), "WordBusNumber 0..=255");
    let cf8 = [0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08];
    assert!(contains(pci0, &cf8), "IO 0xcf8, 8 ports");
    let io = [
        0x88, 0x0d, 0, 1, 0x0c, 0x03, 0, 0, 0x00, 0x10, 0xff, 0xff, 0, 0, 0x00, 0xf0,
    ];
    assert!(contains(pci0, &io), "WordIO 0x1000..=0xffff");
    let mut mmio32 = vec![0x87, 0x17, 0, 0, 0x0c, 0x01, 0, 0, 0, 0];
    mmio32.extend_from_slice(&0xc000_0000u32.to_le_bytes());
    mmio32.extend_from_slice(&0xdfff_ffffu32.to_le_bytes());
    assert!(contains(pci0, &mmio32), "DWordMemory 32-bit window");
    let mut mmio64 = vec![0x8a, 0x2b, 0, 0, 0x0c, 0x07];
    mmio64.extend_from_slice(&0u64.to_le_bytes());
    mmio64.extend_from_slice(&0x40_0000_0000u64.to_le_bytes());
    mmio64.extend_from_slice(&0x7f_ffff_ffffu64.to_le_bytes());
    assert!(
        contains(pci0, &mmio64),
        "QWordMemory prefetchable 64-bit window"
    );
}

#[test]
fn crs_omits_the_io_window_when_there_is_none() {
    let aml = dsdt_aml(
        &PciLayout {
            io: None,
            ..layout()
        },
        255,
    );
    let pci0 = devices(&aml)[0].1;
    assert!(!contains(pci0, &[0x88, 0x0d, 0, 1]));
}

#[test]
fn buses_and_the_ecam_reservation_end_at_the_last_bus_in_use() {
    let aml = dsdt_aml(&layout(), 15);
    let max_15 = [
        0x88, 0x0d, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0x0f, 0, 0, 0, 0x10, 0,
    ];
    assert!(contains(&aml, &max_15), "WordBusNumber 0..=15");
    let ecam = devices(&aml)[1].1;
    // Memory32Fixed: base 0xe0000000, 16 MiB (buses 0..=15).
    let mut fixed = vec![0x86, 0x09, 0x00, 0x00];
    fixed.extend_from_slice(&0xe000_0000u32.to_le_bytes());
    fixed.extend_from_slice(&(16u32 << 20).to_le_bytes());
    assert!(contains(ecam, &fixed), "ECAM reservation of 16 MiB");
}

#[test]
fn osc_is_a_serialized_four_argument_method_checking_the_pci_uuid() {
    let aml = dsdt_aml(&layout(), 255);
    let pci0 = devices(&aml)[0].1;
    let osc = pci0
        .windows(4)
        .position(|w| w == b"_OSC")
        .expect("_OSC present");
    // MethodOp, then a PkgLength of 1 or 2 bytes, then the name.
    let op = (osc - 3..osc - 1)
        .find(|&p| pci0[p] == 0x14 && p + 1 + pkg_length(&pci0[p + 1..]).1 == osc);
    assert!(op.is_some(), "MethodOp");
    assert_eq!(pci0[osc + 4], 0x0c, "4 arguments, serialized");
    // The UUID 33DB4D5B-1FF7-401C-9657-7441C03DD766 in buffer byte order.
    let uuid = [
        0x5b, 0x4d, 0xdb, 0x33, 0xf7, 0x1f, 0x1c, 0x40, 0x96, 0x57, 0x74, 0x41, 0xc0, 0x3d, 0xd7,
        0x66,
    ];
    assert!(contains(pci0, &uuid));
    assert!(contains(pci0, b"CDW1"));
}

#[test]
fn osc_never_grants_native_pcie_hotplug() {
    let aml = dsdt_aml(&layout(), 255);
    let pci0 = devices(&aml)[0].1;
    // CreateDWordField(Arg3, 8, CDW3), then And(CDW3, 0xFFFFFFFE, CDW3) and
    // Or(CDW1, 0x10, CDW1) (capabilities masked) when bit 0 was requested.
    assert!(contains(pci0, b"\x8a\x6b\x0a\x08CDW3"));
    assert!(contains(pci0, b"\x7bCDW3\x0c\xfe\xff\xff\xffCDW3"));
    assert!(contains(pci0, b"\x7bCDW3\x01\x00"), "tests bit 0");
    assert!(contains(pci0, b"\x7dCDW1\x0a\x10CDW1"));
}

#[test]
fn ecam_is_reserved_as_a_motherboard_resource() {
    let aml = dsdt_aml(&layout(), 255);
    let ecam = devices(&aml)[1].1;
    assert!(
        contains(ecam, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]),
        "EISAID(PNP0C02)"
    );
    let mut fixed = vec![0x86, 0x09, 0, 0];
    fixed.extend_from_slice(&0xe000_0000u32.to_le_bytes());
    fixed.extend_from_slice(&0x1000_0000u32.to_le_bytes());
    assert!(contains(ecam, &fixed), "Memory32Fixed over ECAM");
}

/// Decodes an AML integer (Zero, One, Byte/Word/DWord constants) at `bytes[0..]`: (value, bytes
/// used).
fn integer(bytes: &[u8]) -> (u32, usize) {
    let le = |n: usize| {
        let mut v = 0u32;
        for (i, b) in bytes[1..=n].iter().enumerate() {
            v |= u32::from(*b) << (8 * i);
        }
        v
    };
    match bytes[0] {
        0x00 => (0, 1),
        0x01 => (1, 1),
        0x0a => (le(1), 2),
        0x0b => (le(2), 3),
        0x0c => (le(4), 5),
        op => panic!("not an integer: {op:#x}"),
    }
}

/// A package at `bytes[0..]`: its element count, its body (after the count byte) and the bytes
/// after it.
fn package(bytes: &[u8]) -> (usize, &[u8], &[u8]) {
    assert_eq!(bytes[0], 0x12, "PackageOp");
    let (len, used) = pkg_length(&bytes[1..]);
    let count = usize::from(bytes[1 + used]);
    (count, &bytes[2 + used..1 + len], &bytes[1 + len..])
}

/// The `_PRT` entries of `\_SB.PCI0` as (address, pin, source, GSI).
fn prt_entries(pci0: &[u8]) -> Vec<(u32, u32, u32, u32)> {
    let at = pci0
        .windows(5)
        .position(|w| w == b"\x08_PRT")
        .expect("Name(_PRT)");
    let (count, mut body, _) = package(&pci0[at + 5..]);
    let mut entries = Vec::new();
    for _ in 0..count {
        let (fields, mut entry, rest) = package(body);
        assert_eq!(fields, 4, "an entry has address, pin, source, source index");
        body = rest;
        let mut values = [0u32; 4];
        for v in &mut values {
            let (value, used) = integer(entry);
            *v = value;
            entry = &entry[used..];
        }
        assert!(entry.is_empty(), "trailing bytes in an entry");
        entries.push((values[0], values[1], values[2], values[3]));
    }
    assert!(body.is_empty(), "trailing bytes after the entries");
    entries
}

#[test]
fn prt_routes_every_root_bus_slot_and_pin_to_gsis_16_to_23() {
    let aml = dsdt_aml(&layout(), 255);
    let entries = prt_entries(devices(&aml)[0].1);
    assert_eq!(entries.len(), 32 * 4);
    for (i, (address, pin, source, gsi)) in entries.into_iter().enumerate() {
        let (device, index) = ((i / 4) as u32, (i % 4) as u32);
        assert_eq!(address, (device << 16) | 0xffff, "entry {i}: any function");
        assert_eq!(pin, index, "entry {i}: 0 = INTA .. 3 = INTD");
        assert_eq!(source, 0, "entry {i}: a GSI, not a link device");
        assert_eq!(gsi, 16 + (device + index) % 8, "entry {i}");
    }
}

#[test]
fn prt_agrees_with_the_routing_the_vmm_wires() {
    let aml = dsdt_aml(&layout(), 255);
    let entries = prt_entries(devices(&aml)[0].1);
    let slot_3_intb = entries
        .iter()
        .find(|e| e.0 == 0x0003_ffff && e.1 == 1)
        .map(|e| e.3);
    assert_eq!(slot_3_intb, crate::pci::intx::root_bus_gsi(3, 2));
}
