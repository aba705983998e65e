//! The DSDT half of ACPI PCI hotplug: the bridge hierarchy under `\_SB.PCI0`, the hotplug
//! controller's registers (`\_SB.PHPR`), the Generic Event Device (`\_SB.GED_`) and the power
//! button (`\_SB.PWRB`).
//!
//! Linux's `acpiphp` finds slots as ACPI device objects with an `_ADR` that are children of a
//! PCI bridge's ACPI node and have `_EJ0`, so every port is mirrored, each with its `_ADR`
//! (`device << 16 | function`), so the guest binds ACPI companions all the way down:
//!
//! ```text
//! \_SB.PCI0.RPdd                 root port at device dd (hex) of bus 0
//!           RPdd.S00_            ... an empty root port's slot (_ADR 0, _SUN, _EJ0)
//!           RPdd.UP00            a switch's upstream port
//!           RPdd.UP00.DPdd       its downstream ports
//!           RPdd.UP00.DPdd.S00_  ... a spare downstream port's slot
//! ```
//!
//! The platform is hardware-reduced (no SCI, no GPE blocks), so events arrive through the GED:
//! its interrupt runs `_EVT`, which reads and acknowledges the event selector, and for PCI
//! hotplug calls `\_SB.PHPR.PSCN`, which reads and acknowledges the insert and eject bitmaps
//! and sends `Notify(slot, 1)` (device check: rescan the slot) or `Notify(slot, 3)` (eject
//! request) to each slot whose bit is set. A slot's `_EJ0` writes its number to `B0EJ`.
//! The register layout is in [`super::hotplug`].

use acpi_tables::aml::{
    And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Interrupt, Local, Method, MethodCall, Name, Notify, OpRegion, OpRegionSpace, Path,
    ResourceTemplate, Scope, Store, IO, ZERO,
};
use acpi_tables::Aml;

use super::acpi::RawAml;
use super::hotplug::{
    GED_PCI_HOTPLUG, GED_POWER_BUTTON, HOTPLUG_GED_GSI, HOTPLUG_IO_BASE, HOTPLUG_IO_LEN, REG_GEDS,
};

/// A port of the topology as the DSDT mirrors it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiPort {
    pub devfn: u8,
    /// The slot number, for hotplug slots.
    pub slot: Option<u32>,
    pub children: Vec<AcpiPort>,
}

/// `Notify` values (ACPI 6.5, table 5.166).
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;
const NOTIFY_POWER_BUTTON: u8 = 0x80;

/// `_STA` of the controller: present, enabled, functioning, hidden from UI.
const PHPR_STA: u8 = 0x0b;

/// The hotplug objects for a topology whose ports are `ports` (append after `\_SB.PCI0`).
pub fn dsdt_aml(ports: &[AcpiPort]) -> Vec<u8> {
    let mut slots = Vec::new();
    let children: Vec<RawAml> = ports
        .iter()
        .map(|p| port_aml(p, 0, "\\_SB_.PCI0", &mut slots))
        .collect();
    let children: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    let scope = Scope::new(Path::new("\\_SB_.PCI0"), children);
    let mut aml = Vec::new();
    scope.to_aml_bytes(&mut aml);
    controller_aml(&slots).to_aml_bytes(&mut aml);
    ged_aml().to_aml_bytes(&mut aml);
    power_button_aml().to_aml_bytes(&mut aml);
    aml
}

/// The ACPI name of a port at `depth` below bus 0 with `devfn`.
fn port_name(depth: usize, devfn: u8) -> String {
    let prefix = ["RP", "UP", "DP"].get(depth).copied().unwrap_or("PP");
    format!("{prefix}{:02X}", devfn >> 3)
}

/// `Device(<name>) { _ADR, children..., [S00_] }`, collecting each slot's (number, path).
fn port_aml(port: &AcpiPort, depth: usize, parent: &str, slots: &mut Vec<(u32, String)>) -> RawAml {
    let name = port_name(depth, port.devfn);
    let path = format!("{parent}.{name}");
    let adr = (u32::from(port.devfn >> 3) << 16) | u32::from(port.devfn & 7);
    let adr = Name::new("_ADR".into(), &adr);
    let mut below: Vec<RawAml> = port
        .children
        .iter()
        .map(|c| port_aml(c, depth + 1, &path, slots))
        .collect();
    if let Some(number) = port.slot {
        below.push(slot_aml(number));
        slots.push((number, format!("{path}.S00_")));
    }
    let mut children: Vec<&dyn Aml> = vec![&adr];
    children.extend(below.iter().map(|c| c as &dyn Aml));
    raw(&Device::new(Path::new(&name), children))
}

/// The slot below a port: function 0 of device 0, ejectable.
fn slot_aml(number: u32) -> RawAml {
    let adr = Name::new("_ADR".into(), &ZERO);
    let sun = Name::new("_SUN".into(), &number);
    let b0ej = Path::new("\\_SB_.PHPR.B0EJ");
    let store = Store::new(&b0ej, &number);
    let ej0 = Method::new("_EJ0".into(), 1, false, vec![&store]);
    raw(&Device::new("S00_".into(), vec![&adr, &sun, &ej0]))
}

/// `\_SB.PHPR`: the register block, and `PSCN`, which notifies every slot with a pending bit.
fn controller_aml(slots: &[(u32, String)]) -> RawAml {
    let hid = EISAName::new("PNP0A06");
    let uid: &str = "PCI Hotplug Controller";
    let base = HOTPLUG_IO_BASE as u16;
    let io = IO::new(base, base, 1, HOTPLUG_IO_LEN as u8);
    let crs = ResourceTemplate::new(vec![&io]);
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_UID".into(), &uid),
        Name::new("_STA".into(), &PHPR_STA),
        Name::new("_CRS".into(), &crs),
    ];
    let (region_base, region_len) = (u32::from(base), REG_GEDS as u32);
    let region = OpRegion::new(
        "PCST".into(),
        OpRegionSpace::SystemIO,
        &region_base,
        &region_len,
    );
    let field = Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let pscn = pscn_method(slots);
    let mut children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    children.extend([&region as &dyn Aml, &field, &pscn]);
    raw(&Device::new("\\_SB_.PHPR".into(), children))
}

/// `PSCN`: `Local0 = PCIU; PCIU = Local0` (acknowledge), the same for `PCID` into `Local1`,
/// then per slot `If (Local0 & bit) { Notify(slot, 1) }` and
/// `If (Local1 & bit) { Notify(slot, 3) }`.
fn pscn_method(slots: &[(u32, String)]) -> RawAml {
    let (inserted, ejecting) = (Local(0), Local(1));
    let (pciu, pcid) = (Path::new("PCIU"), Path::new("PCID"));
    let read_inserted = Store::new(&inserted, &pciu);
    let ack_inserted = Store::new(&pciu, &inserted);
    let read_ejecting = Store::new(&ejecting, &pcid);
    let ack_ejecting = Store::new(&pcid, &ejecting);
    let mut body = vec![
        raw(&read_inserted),
        raw(&ack_inserted),
        raw(&read_ejecting),
        raw(&ack_ejecting),
    ];
    for (number, path) in slots {
        let bit = 1u32 << number;
        let path = Path::new(path);
        for (pending, value) in [
            (&inserted, NOTIFY_DEVICE_CHECK),
            (&ejecting, NOTIFY_EJECT_REQUEST),
        ] {
            let test = And::new(&ZERO, pending, &bit);
            let notify = Notify::new(&path, &value);
            body.push(raw(&If::new(&test, vec![&notify])));
        }
    }
    let body: Vec<&dyn Aml> = body.iter().map(|b| b as &dyn Aml).collect();
    // Serialized: two GED events must not interleave their read-acknowledge pairs.
    raw(&Method::new("PSCN".into(), 0, true, body))
}

/// `\_SB.GED_`: a Generic Event Device on [`HOTPLUG_GED_GSI`] whose `_EVT` dispatches the
/// event selector.
fn ged_aml() -> RawAml {
    let hid: &str = "ACPI0013";
    let irq = Interrupt::new(true, true, false, false, HOTPLUG_GED_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_UID".into(), &ZERO),
        Name::new("_CRS".into(), &crs),
    ];
    let (region_base, region_len) = ((HOTPLUG_IO_BASE + REG_GEDS) as u32, 4u32);
    let region = OpRegion::new(
        "GDST".into(),
        OpRegionSpace::SystemIO,
        &region_base,
        &region_len,
    );
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let events = Local(0);
    let gdat = Path::new("GDAT");
    let read = Store::new(&events, &gdat);
    let ack = Store::new(&gdat, &events);
    let is_pci = And::new(&ZERO, &events, &GED_PCI_HOTPLUG);
    let scan = MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
    let pci = If::new(&is_pci, vec![&scan]);
    let is_button = And::new(&ZERO, &events, &GED_POWER_BUTTON);
    let pwrb = Path::new("\\_SB_.PWRB");
    let press = Notify::new(&pwrb, &NOTIFY_POWER_BUTTON);
    let button = If::new(&is_button, vec![&press]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read, &ack, &pci, &button]);
    let mut children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    children.extend([&region as &dyn Aml, &field, &evt]);
    raw(&Device::new("\\_SB_.GED_".into(), children))
}

/// `\_SB.PWRB`: a control-method power button (PNP0C0C).
fn power_button_aml() -> RawAml {
    let hid = EISAName::new("PNP0C0C");
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_UID".into(), &ZERO),
    ];
    raw(&Device::new(
        "\\_SB_.PWRB".into(),
        names.iter().map(|n| n as &dyn Aml).collect(),
    ))
}

fn raw(aml: &dyn Aml) -> RawAml {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

#[cfg(test)]
#[path = "acpi_hotplug_tests.rs"]
mod tests;
