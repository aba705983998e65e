use std::sync::Arc;

use super::super::{HotplugReserve, PciLayout, Placement, TopologyBuilder, MAX_HOTPLUG_SLOTS};
use super::*;
use crate::bus::BusRange;
use crate::pci::config::BarDef;
use crate::pci::fake::{FakeBarObserver, FakeEndpoint};
use crate::pci::regs::{BAR0, VENDOR_ID};
use crate::pci::PciDevice;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn layout() -> PciLayout {
    PciLayout {
        ecam: BusRange::new(0xe000_0000, 256 * MIB),
        mmio32: BusRange::new(0xc000_0000, 512 * MIB),
        mmio64: BusRange::new(0x40_0000_0000, 256 * GIB),
        io: Some(BusRange::new(0x1000, 0xf000)),
    }
}

/// Switch `sw0` (root port 00:01.0) with one device and two slots; empty root port `hp0`.
fn builder() -> TopologyBuilder {
    builder_in(layout())
}

fn builder_in(layout: PciLayout) -> TopologyBuilder {
    let mut b = TopologyBuilder::new(layout);
    b.add_switch("sw0")
        .add_device(
            "nic0",
            Placement::Switch("sw0".into()),
            FakeEndpoint::with_bars("nic0", &[(0, BarDef::mem32(0x4000))])
                .unwrap()
                .shared(),
        )
        .add_hotplug_slots("sw0", 2)
        .add_empty_root_port("hp0");
    b
}

fn build() -> (PciRoot, Arc<FakeBarObserver>) {
    let observer = Arc::new(FakeBarObserver::new());
    let root = builder().build(observer.clone()).unwrap();
    (root, observer)
}

/// A device with a 1 MiB register BAR and a 1 GiB 64-bit prefetchable BAR.
fn gpu() -> Arc<Mutex<FakeEndpoint>> {
    let bars = [(0, BarDef::mem32(MIB)), (2, BarDef::mem64(GIB, true))];
    FakeEndpoint::with_bars("gpu", &bars).unwrap().shared()
}

fn read_u32(root: &PciRoot, bdf: Bdf, offset: u16) -> u32 {
    let mut data = [0; 4];
    root.segment().config_read(bdf, offset, &mut data);
    u32::from_le_bytes(data)
}

fn write_u32(root: &PciRoot, bdf: Bdf, offset: u16, value: u32) {
    root.segment()
        .config_write(bdf, offset, &value.to_le_bytes())
        .unwrap();
}

fn inside(inner: BusRange, outer: BusRange) -> bool {
    inner.base >= outer.base && inner.end() <= outer.end()
}

#[test]
fn slots_are_listed_by_number_with_where_their_device_will_appear() {
    let (root, _) = build();
    let slots: Vec<_> = root
        .hotplug_slots()
        .into_iter()
        .map(|s| (s.name, s.number, s.bdf, s.switch))
        .collect();
    let sw = Some("sw0".to_string());
    assert_eq!(
        slots,
        vec![
            ("sw0-slot0".into(), 1, Bdf::new(4, 0, 0), sw.clone()),
            ("sw0-slot1".into(), 2, Bdf::new(5, 0, 0), sw),
            ("hp0".into(), 3, Bdf::new(6, 0, 0), None),
        ]
    );
    assert_eq!(root.bdf("nic0"), Some(Bdf::new(3, 0, 0)));
    let slot1 = root.hotplug_slot("sw0-slot1").unwrap();
    assert!(Arc::ptr_eq(&slot1.port, root.port("sw0-down2").unwrap()));
    assert_eq!(root.hotplug_slot_by_number(3).unwrap().name, "hp0");
    assert_eq!(root.slot_of(Bdf::new(4, 0, 0)).unwrap().name, "sw0-slot0");
    assert!(
        root.slot_of(Bdf::new(3, 0, 0)).is_none(),
        "nic0's port is no slot"
    );
}

#[test]
fn slot_ports_hold_the_reserve_inside_their_parents_windows() {
    let (root, _) = build();
    let window = |name: &str| {
        let port = lock(root.port(name).unwrap());
        (port.mem_window().unwrap(), port.pref_window().unwrap())
    };
    let (up_mem, up_pref) = window("sw0-up");
    let (rp_mem, rp_pref) = window("rp-sw0");
    for slot in ["sw0-down1", "sw0-down2"] {
        let (mem, pref) = window(slot);
        assert!(mem.len >= 4 * MIB, "{slot}: {mem}");
        assert!(pref.len >= 8 * GIB, "{slot}: {pref}");
        assert_eq!(pref.base % (8 * GIB), 0, "{slot}: naturally aligned");
        assert!(inside(mem, up_mem) && inside(pref, up_pref), "{slot}");
    }
    assert!(inside(up_mem, rp_mem) && inside(up_pref, rp_pref));
    let (_, first) = window("sw0-down1");
    let (_, second) = window("sw0-down2");
    assert!(!first.overlaps(&second));
    let (mem, pref) = window("hp0");
    assert!(mem.len >= 4 * MIB && pref.len >= 8 * GIB);
}

#[test]
fn the_slot_reserve_is_configurable() {
    let mut b = builder();
    b.hotplug_slot_reserve(HotplugReserve {
        buses: 2,
        mem32: 8 * MIB,
        pref64: GIB,
    });
    let root = b.build(Arc::new(FakeBarObserver::new())).unwrap();
    let port = lock(root.port("sw0-down1").unwrap());
    assert_eq!(port.mem_window().unwrap().len, 8 * MIB);
    assert_eq!(port.pref_window().unwrap().len, GIB);
    assert_eq!(port.bus_range(), Some(4..=6), "two extra buses");
}

#[test]
fn slot_reserves_shrink_with_a_warning_when_the_host_window_is_small() {
    let small = PciLayout {
        mmio64: BusRange::new(0x40_0000_0000, 16 * GIB),
        ..layout()
    };
    let mut b = builder_in(small);
    b.add_empty_root_port("hp1");
    // Four 8 GiB slots do not fit in 16 GiB; halved twice, they do.
    let root = b.build(Arc::new(FakeBarObserver::new())).unwrap();
    for slot in root.hotplug_slots() {
        let pref = lock(&slot.port).pref_window().unwrap();
        assert!(
            pref.len >= 2 * GIB && pref.len < 8 * GIB,
            "{}: {pref}",
            slot.name
        );
        assert!(inside(pref, small.mmio64));
    }
}

#[test]
fn a_plugged_device_answers_config_reads_and_the_guest_places_its_bars() {
    let (root, observer) = build();
    let before = observer.history().len();
    let bdf = root.plug("sw0-slot1", gpu()).unwrap();
    assert_eq!(bdf, Bdf::new(5, 0, 0));
    assert_eq!(read_u32(&root, bdf, VENDOR_ID) & 0xffff, 0x1b36);
    assert!(lock(root.port("sw0-down2").unwrap()).link_active());
    assert_eq!(
        observer.history().len(),
        before,
        "nothing mapped before the guest"
    );
    // The guest places BAR 0 in the slot's window and turns on memory decoding.
    let window = lock(root.port("sw0-down2").unwrap()).mem_window().unwrap();
    write_u32(&root, bdf, BAR0, window.base as u32);
    write_u32(&root, bdf, COMMAND, u32::from(COMMAND_MEMORY));
    assert_eq!(
        observer.range_of(bdf, 0),
        Some(BusRange::new(window.base, MIB))
    );
    assert!(root.slot_device("sw0-slot1").unwrap().is_some());
}

#[test]
fn unplugging_withdraws_the_bars_and_the_device_reads_as_absent() {
    let (root, observer) = build();
    let bdf = root.plug("hp0", gpu()).unwrap();
    let window = lock(root.port("hp0").unwrap()).mem_window().unwrap();
    write_u32(&root, bdf, BAR0, window.base as u32);
    write_u32(&root, bdf, COMMAND, u32::from(COMMAND_MEMORY));
    let device = root.unplug("hp0").unwrap();
    assert_eq!(device.lock().unwrap().name(), "gpu");
    assert_eq!(read_u32(&root, bdf, VENDOR_ID), 0xffff_ffff);
    assert_eq!(observer.range_of(bdf, 0), None);
    let last = observer.history().pop().unwrap();
    assert_eq!((last.bdf, last.bar, last.new), (bdf, 0, None));
    assert!(!lock(root.port("hp0").unwrap()).link_active());
    assert!(root.slot_device("hp0").unwrap().is_none());
}

#[test]
fn occupied_empty_and_unknown_slots_are_errors() {
    let (root, _) = build();
    root.plug("sw0-slot0", gpu()).unwrap();
    assert!(matches!(
        root.plug("sw0-slot0", gpu()),
        Err(TopologyError::SlotOccupied(s)) if s == "sw0-slot0"
    ));
    assert!(matches!(
        root.plug("nope", gpu()),
        Err(TopologyError::UnknownSlot(s)) if s == "nope"
    ));
    assert!(matches!(root.unplug("hp0"), Err(TopologyError::SlotEmpty(s)) if s == "hp0"));
    assert!(matches!(
        root.unplug("nic0"),
        Err(TopologyError::UnknownSlot(_))
    ));
    root.unplug("sw0-slot0").unwrap();
    root.plug("sw0-slot0", gpu()).unwrap();
}

#[test]
fn plugging_switches_decoding_off() {
    let (root, observer) = build();
    let dev = gpu();
    dev.lock()
        .unwrap()
        .write_config(COMMAND, &COMMAND_MEMORY.to_le_bytes());
    let bdf = root.plug("hp0", dev.clone()).unwrap();
    assert_eq!(dev.lock().unwrap().command() & COMMAND_MEMORY, 0);
    assert_eq!(observer.range_of(bdf, 0), None);
}

#[test]
fn a_switch_may_have_only_slots() {
    let mut b = TopologyBuilder::new(layout());
    b.add_switch("sw").add_hotplug_slots("sw", 3);
    let root = b.build(Arc::new(FakeBarObserver::new())).unwrap();
    let names: Vec<_> = root.hotplug_slots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["sw-slot0", "sw-slot1", "sw-slot2"]);
}

#[test]
fn slot_declarations_are_validated() {
    let build = |b: &TopologyBuilder| b.build(Arc::new(FakeBarObserver::new())).err();
    let mut b = TopologyBuilder::new(layout());
    b.add_hotplug_slots("ghost", 1);
    assert!(matches!(
        build(&b),
        Some(TopologyError::UnknownSwitch { switch, .. }) if switch == "ghost"
    ));
    let mut b = TopologyBuilder::new(layout());
    b.add_switch("sw").add_empty_root_port("sw-slot0");
    b.add_hotplug_slots("sw", 1);
    assert!(matches!(build(&b), Some(TopologyError::DuplicateId(id)) if id == "sw-slot0"));
    let mut b = TopologyBuilder::new(layout());
    b.add_switch("sw").add_hotplug_slots("sw", 20);
    b.add_switch("sw2").add_hotplug_slots("sw2", 12);
    assert!(matches!(
        build(&b),
        Some(TopologyError::TooManyHotplugSlots { count: 32 })
    ));
    assert_eq!(MAX_HOTPLUG_SLOTS, 31);
    let mut b = TopologyBuilder::new(layout());
    b.add_switch("sw")
        .add_device("d0", Placement::Switch("sw".into()), gpu())
        .add_device("d1", Placement::Switch("sw".into()), gpu())
        .add_hotplug_slots("sw", 31);
    assert!(matches!(
        build(&b),
        Some(TopologyError::SwitchFull { devices: 33, .. })
    ));
}

#[test]
fn the_guest_eject_reaches_unplug_through_the_controller() {
    use crate::pci::hotplug::{AcpiHotplug, REG_B0EJ};
    let (root, observer) = build();
    let root = Arc::new(root);
    let bdf = root.plug("sw0-slot0", gpu()).unwrap();
    let window = lock(root.port("sw0-down1").unwrap()).mem_window().unwrap();
    write_u32(&root, bdf, BAR0, window.base as u32);
    write_u32(&root, bdf, COMMAND, u32::from(COMMAND_MEMORY));
    let vmm = root.clone();
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let hotplug = AcpiHotplug::new(
        irq,
        Box::new(move |number| {
            let slot = vmm.hotplug_slot_by_number(number).unwrap().name.clone();
            vmm.unplug(&slot).unwrap();
        }),
    );
    let number = root.hotplug_slot("sw0-slot0").unwrap().number;
    hotplug.request_eject(number).unwrap();
    // The guest's _EJ0 for the slot.
    hotplug.guest_write(REG_B0EJ, &number.to_le_bytes());
    assert_eq!(read_u32(&root, bdf, VENDOR_ID), 0xffff_ffff);
    assert_eq!(observer.range_of(bdf, 0), None);
    assert_eq!(hotplug.pending_ejects(), 0);
}
