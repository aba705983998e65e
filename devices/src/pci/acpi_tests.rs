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
    let aml = dsdt_aml(&layout());
    let found = devices(&aml);
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].0, b"\\\x2e_SB_PCI0");
    assert_eq!(found[1].0, b"\\\x2e_SB_ECAM");
}

#[test]
fn pci0_names_the_objects_linux_looks_for() {
    let aml = dsdt_aml(&layout());
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
    let aml = dsdt_aml(&layout());
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
    let aml = dsdt_aml(&PciLayout {
        io: None,
        ..layout()
    });
    let pci0 = devices(&aml)[0].1;
    assert!(!contains(pci0, &[0x88, 0x0d, 0, 1]));
}

#[test]
fn bus_numbers_follow_the_ecam_size() {
    let aml = dsdt_aml(&PciLayout {
        ecam: BusRange::new(0xe000_0000, 16 * MIB),
        ..layout()
    });
    let max_15 = [
        0x88, 0x0d, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0x0f, 0, 0, 0, 0x10, 0,
    ];
    assert!(contains(&aml, &max_15));
}

#[test]
fn osc_is_a_serialized_four_argument_method_checking_the_pci_uuid() {
    let aml = dsdt_aml(&layout());
    let pci0 = devices(&aml)[0].1;
    let osc = pci0
        .windows(4)
        .position(|w| w == b"_OSC")
        .expect("_OSC present");
    assert_eq!(pci0[osc - 2], 0x14, "MethodOp");
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
fn ecam_is_reserved_as_a_motherboard_resource() {
    let aml = dsdt_aml(&layout());
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
