use std::process::Command;
use std::sync::Arc;

use super::*;
use crate::bus::BusRange;
use crate::pci::fake::{FakeBarObserver, FakeEndpoint};
use crate::pci::{PciLayout, PciRoot, Placement, TopologyBuilder};

const MIB: u64 = 1 << 20;

/// Root port 1: switch `sw0` with one device and two slots; root port 2: empty (slot).
fn root() -> PciRoot {
    let mut b = TopologyBuilder::new(PciLayout {
        ecam: BusRange::new(0xe000_0000, 256 * MIB),
        mmio32: BusRange::new(0xc000_0000, 512 * MIB),
        mmio64: BusRange::new(0x40_0000_0000, 256 << 30),
        io: Some(BusRange::new(0x1000, 0xf000)),
    });
    b.add_switch("sw0")
        .add_device(
            "nic0",
            Placement::Switch("sw0".into()),
            FakeEndpoint::new("nic0").shared(),
        )
        .add_hotplug_slots("sw0", 2)
        .add_empty_root_port("hp0");
    b.build(Arc::new(FakeBarObserver::new())).unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn position(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} missing", String::from_utf8_lossy(needle)))
}

#[test]
fn the_port_tree_mirrors_the_topology() {
    let ports = root().acpi_ports().to_vec();
    let slot = |devfn, number| AcpiPort {
        devfn,
        slot: Some(number),
        children: vec![],
    };
    let nic_port = AcpiPort {
        devfn: 0,
        slot: None,
        children: vec![],
    };
    let upstream = AcpiPort {
        devfn: 0,
        slot: None,
        children: vec![nic_port, slot(1 << 3, 1), slot(2 << 3, 2)],
    };
    let switch_root_port = AcpiPort {
        devfn: 1 << 3,
        slot: None,
        children: vec![upstream],
    };
    assert_eq!(ports, vec![switch_root_port, slot(2 << 3, 3)]);
}

#[test]
fn every_slot_has_adr_sun_and_an_ej0_writing_its_number() {
    let aml = dsdt_aml(root().acpi_ports());
    // Device(S00_) { Name(_ADR, Zero) Name(_SUN, n) Method(_EJ0, 1) { Store(n, \_SB_.PHPR.B0EJ) } }
    for n in 1u8..=3 {
        // One is its own opcode; 2 and 3 are BytePrefix constants.
        let number = if n == 1 { vec![1] } else { vec![0x0a, n] };
        let mut slot = b"S00_\x08_ADR\x00\x08_SUN".to_vec();
        slot.extend_from_slice(&number);
        slot.extend_from_slice(b"\x14");
        assert!(contains(&aml, &slot), "slot {n}: _ADR, _SUN");
        let mut ej0 = b"_EJ0\x01\x70".to_vec();
        ej0.extend_from_slice(&number);
        ej0.extend_from_slice(b"\\/\x03_SB_PHPRB0EJ");
        assert!(contains(&aml, &ej0), "slot {n}: _EJ0");
    }
    assert_eq!(aml.windows(4).filter(|w| w == b"_EJ0").count(), 3);
}

#[test]
fn ports_have_their_device_and_function_as_adr() {
    let aml = dsdt_aml(root().acpi_ports());
    // Names are followed by _ADR: RP01 (0x00010000 as a DWord), UP00 (Zero), DP02 (0x00020000).
    let rp01 = position(&aml, b"RP01");
    assert_eq!(&aml[rp01 + 4..rp01 + 14], b"\x08_ADR\x0c\x00\x00\x01\x00");
    let up00 = position(&aml, b"UP00");
    assert_eq!(&aml[up00 + 4..up00 + 10], b"\x08_ADR\x00");
    let dp02 = position(&aml, b"DP02");
    assert_eq!(&aml[dp02 + 4..dp02 + 14], b"\x08_ADR\x0c\x00\x00\x02\x00");
    assert!(contains(&aml, b"RP02"));
    // The device's own port is mirrored, but has no slot.
    let dp00 = position(&aml, b"DP00");
    assert!(aml[dp00..dp01_or_end(&aml)]
        .windows(4)
        .all(|w| w != b"S00_"));
}

fn dp01_or_end(aml: &[u8]) -> usize {
    position(aml, b"DP01")
}

#[test]
fn pscn_notifies_slots_with_pending_bits_by_path() {
    let aml = dsdt_aml(root().acpi_ports());
    let pscn = position(&aml, b"PSCN");
    let body = &aml[pscn..];
    // Notify(\_SB_.PCI0.RP01.UP00.DP01.S00_, One) for slot 1, Notify(..., 3) for its eject.
    let path = b"\\/\x06_SB_PCI0RP01UP00DP01S00_";
    let mut check = vec![0x86];
    check.extend_from_slice(path);
    check.push(0x01);
    assert!(contains(body, &check), "device check for slot 1");
    let mut eject = vec![0x86];
    eject.extend_from_slice(path);
    eject.extend_from_slice(&[0x0a, 0x03]);
    assert!(contains(body, &eject), "eject request for slot 1");
    // Slot 3, the empty root port: If (And(Local0, 8, Zero)).
    assert!(contains(body, b"\x7b\x60\x0a\x08\x00"));
    assert!(contains(body, b"\\/\x04_SB_PCI0RP02S00_"));
}

#[test]
fn ged_has_the_acpi0013_hid_an_edge_interrupt_and_evt() {
    let aml = dsdt_aml(&[]);
    let ged = position(&aml, b"_SB_GED_");
    let body = &aml[ged..];
    assert!(contains(body, b"\x08_HID\x0dACPI0013\x00"));
    // Extended interrupt: consumer, edge, active-high, exclusive, one GSI.
    let mut irq = vec![0x89, 6, 0, 0x03, 1];
    irq.extend_from_slice(&HOTPLUG_GED_GSI.to_le_bytes());
    assert!(contains(body, &irq));
    // _EVT, one argument, serialized.
    let evt = position(body, b"_EVT");
    assert_eq!(body[evt + 4], 0x09);
    assert!(contains(body, b"\\/\x03_SB_PHPRPSCN"));
    // Notify(\_SB_.PWRB, 0x80).
    assert!(contains(body, b"\x86\\._SB_PWRB\x0a\x80"));
    assert!(contains(&aml, b"\x0c\x41\xd0\x0c\x0c"), "EISAID(PNP0C0C)");
}

#[test]
fn the_regions_cover_the_controller_registers() {
    let aml = dsdt_aml(&[]);
    // OperationRegion(PCST, SystemIO, 0xae0, 12) and (GDST, SystemIO, 0xaec, 4).
    assert!(contains(&aml, b"\x5b\x80PCST\x01\x0b\xe0\x0a\x0a\x0c"));
    assert!(contains(&aml, b"\x5b\x80GDST\x01\x0b\xec\x0a\x0a\x04"));
    // IO(Decode16, 0xae0, 0xae0, 1, 16) in PHPR's _CRS.
    assert!(contains(&aml, b"\x47\x01\xe0\x0a\xe0\x0a\x01\x10"));
}

/// The whole DSDT through `iasl -d`, when iasl is installed (acpica-tools).
fn disassemble(body: &[u8]) -> Option<String> {
    let dir = std::env::temp_dir().join(format!("p2pvmm-hotplug-aml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let mut table = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 6, *b"P2PVMM", *b"P2PVDSDT", 1);
    table.append_slice(body);
    let aml = dir.join("dsdt.aml");
    std::fs::write(&aml, table.as_slice()).ok()?;
    let out = Command::new("iasl").arg("-d").arg(&aml).output().ok()?;
    assert!(out.status.success(), "iasl -d: {:?}", out);
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).ok();
    // And back: the disassembly must compile without errors.
    let out = Command::new("iasl")
        .arg("-p")
        .arg(dir.join("again"))
        .arg(dir.join("dsdt.dsl"))
        .output()
        .ok()?;
    assert!(out.status.success(), "iasl recompile: {:?}", out);
    let _ = std::fs::remove_dir_all(&dir);
    dsl
}

#[test]
fn iasl_disassembles_the_hotplug_objects() {
    let root = root();
    let Some(dsl) = disassemble(&root.dsdt_aml()) else {
        eprintln!("iasl not found: skipped");
        return;
    };
    for expected in [
        "Device (RP01)",
        "Device (UP00)",
        "Device (DP01)",
        "Device (S00)",
        "Name (_SUN, 0x03)",
        "Method (_EJ0, 1, NotSerialized)",
        "\\_SB.PHPR.B0EJ = 0x03",
        "Device (\\_SB.PHPR)",
        "Method (PSCN, 0, Serialized)",
        "Notify (\\_SB.PCI0.RP01.UP00.DP01.S00, One)",
        "Notify (\\_SB.PCI0.RP01.UP00.DP02.S00, 0x03)",
        "Notify (\\_SB.PCI0.RP02.S00, One)",
        "Device (\\_SB.GED)",
        "Name (_HID, \"ACPI0013\"",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
        "CDW3 &= 0xFFFFFFFE",
        "Method (_EVT, 1, Serialized)",
        "\\_SB.PHPR.PSCN ()",
        "Notify (\\_SB.PWRB, 0x80)",
        "Device (\\_SB.PWRB)",
    ] {
        assert!(dsl.contains(expected), "{expected:?} missing from:\n{dsl}");
    }
    assert!(!dsl.contains("External"), "unresolved references:\n{dsl}");
    assert!(dsl.contains("0x00000005,"), "the GED's GSI");
}
