use super::*;
use crate::pci::bar::decoded_ranges;
use crate::pci::config::BarDef;
use crate::pci::fake::{FakeBarObserver, FakeEndpoint};
use crate::pci::regs::*;
use crate::pci::resources::bar_request;
use crate::pci::resources::WindowKind;
use crate::pci::{lock, BarKind, PciDevice};

const GIB: u64 = 1 << 30;

fn layout() -> PciLayout {
    PciLayout {
        ecam: BusRange::new(0xe000_0000, 256 * MIB),
        mmio32: BusRange::new(0xc000_0000, 512 * MIB),
        mmio64: BusRange::new(0x40_0000_0000, 256 * GIB),
        io: Some(BusRange::new(0x1000, 0xf000)),
    }
}

/// A GPU-like device: 16 MiB registers, a large 64-bit prefetchable aperture, a small 64-bit
/// prefetchable BAR and a 128-byte I/O BAR.
fn gpu(aperture: u64) -> SharedPciDevice {
    let bars = [
        (0, BarDef::mem32(16 * MIB)),
        (1, BarDef::mem64(aperture, true)),
        (3, BarDef::mem64(32 * MIB, true)),
        (5, BarDef::io(0x80)),
    ];
    Arc::new(Mutex::new(FakeEndpoint::with_bars("gpu", &bars).unwrap()))
}

/// A NIC-like device with one tiny BAR, which must still get a page of its own.
fn nic() -> SharedPciDevice {
    let bars = [(0, BarDef::mem32(0x100)), (2, BarDef::mem64(0x4000, false))];
    Arc::new(Mutex::new(FakeEndpoint::with_bars("nic", &bars).unwrap()))
}

fn build(builder: &TopologyBuilder) -> (PciRoot, Arc<FakeBarObserver>) {
    let observer = Arc::new(FakeBarObserver::new());
    let root = builder.build(observer.clone()).unwrap();
    (root, observer)
}

fn window_of(port: &PciePort, kind: WindowKind) -> Option<BusRange> {
    match kind {
        WindowKind::Io => port.io_window(),
        WindowKind::Mem32 => port.mem_window(),
        WindowKind::Pref64 => port.pref_window(),
    }
}

fn inside(inner: BusRange, outer: BusRange) -> bool {
    inner.base >= outer.base && inner.end() <= outer.end()
}

/// What firmware must guarantee: every BAR decodes, naturally aligned, inside a host window
/// and inside the matching window of every bridge above it; bridge windows nest; sibling
/// windows do not overlap (the fake observer already panics on overlapping BARs).
fn check_invariants(root: &PciRoot) {
    let devices = root.segment().devices();
    let host = layout();
    for (bdf, device, port) in &devices {
        let above: Vec<_> = devices
            .iter()
            .filter_map(|(_, _, p)| p.clone())
            .filter(|p| lock(p).bus_range().is_some_and(|r| r.contains(&bdf.bus)))
            .collect();
        match port {
            None => {
                for (info, range) in decoded_ranges(&*lock(device)).into_iter().flatten() {
                    assert_eq!(range.base % info.size, 0, "{bdf}: natural alignment");
                    let kind = bar_request(&info).0;
                    let host_window = [host.io.unwrap(), host.mmio32, host.mmio64][kind as usize];
                    assert!(
                        inside(range, host_window),
                        "{bdf}: {range} outside host window"
                    );
                    for p in &above {
                        let window = window_of(&lock(p), kind).expect("bridge window open");
                        assert!(inside(range, window), "{bdf}: {range} outside {window}");
                    }
                }
            }
            Some(port) => {
                let port = lock(port);
                for kind in WindowKind::ALL {
                    let Some(window) = window_of(&port, kind) else {
                        continue;
                    };
                    assert_eq!(window.base % kind.granularity(), 0);
                    // A port's own bus is its primary bus, outside its bus range, so `above`
                    // never contains the port itself.
                    for p in &above {
                        let parent = window_of(&lock(p), kind).expect("parent window open");
                        assert!(inside(window, parent), "{bdf}: {window} outside {parent}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_device_behind_its_own_root_port() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("gpu0", Placement::RootPort, gpu(8 * GIB));
    let (root, observer) = build(&b);
    assert_eq!(root.bdf("gpu0"), Some(Bdf::new(1, 0, 0)));
    let rp = lock(root.port("rp-gpu0").unwrap());
    assert_eq!(rp.bus_range(), Some(1..=1));
    assert_eq!(rp.primary_bus(), 0);
    // Twice the 16 MiB of registers, plus the 2 MiB reserve.
    assert_eq!(rp.mem_window().unwrap().len, 34 * MIB);
    // Twice 8 GiB + 32 MiB rounded up to a power of two, plus the 256 MiB reserve.
    assert_eq!(rp.pref_window().unwrap().len, 32 * GIB + 256 * MIB);
    assert_eq!(rp.io_window().unwrap().len, 0x1000);
    assert_eq!(rp.command(), COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER);
    drop(rp);
    let gpu = root.segment().device(Bdf::new(1, 0, 0)).unwrap();
    assert_eq!(lock(&gpu).command(), COMMAND_IO | COMMAND_MEMORY);
    assert_eq!(observer.live().len(), 4);
    check_invariants(&root);
}

#[test]
fn an_expansion_rom_gets_a_32bit_address_and_is_left_disabled() {
    let rom_size = 64 << 10;
    let mut edu = FakeEndpoint::with_bars("edu", &[(0, BarDef::mem32(MIB))]).unwrap();
    edu.config.add_rom(rom_size).unwrap();
    let edu: SharedPciDevice = Arc::new(Mutex::new(edu));
    let mut b = TopologyBuilder::new(layout());
    b.add_device("edu", Placement::RootPort, edu.clone());
    let (root, observer) = build(&b);
    let rom = lock(&edu).rom().unwrap();
    assert!(!rom.enabled);
    assert_eq!(rom.bar.address % rom_size, 0);
    let window = lock(root.port("rp-edu").unwrap()).mem_window().unwrap();
    assert!(inside(BusRange::new(rom.bar.address, rom_size), window));
    // BAR 0 only; memory decode is on, ready for the ROM enable.
    assert_eq!(observer.live().len(), 1);
    assert_eq!(lock(&edu).command(), COMMAND_MEMORY);

    let bdf = root.bdf("edu").unwrap();
    let enable = rom.bar.address as u32 | ROM_ADDRESS_ENABLE;
    let changes = root
        .segment()
        .config_write(bdf, ROM_ADDRESS, &enable.to_le_bytes())
        .unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].bar, crate::pci::ROM_BAR);
    check_invariants(&root);
}

#[test]
fn the_observer_sees_one_registration_per_bar() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("gpu0", Placement::RootPort, gpu(8 * GIB));
    let (_root, observer) = build(&b);
    let history = observer.history();
    assert_eq!(history.len(), 4);
    assert!(history.iter().all(|c| c.old.is_none() && c.new.is_some()));
}

#[test]
fn a_mixed_topology_is_consistent() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("nic0", Placement::Root, nic())
        .add_switch("sw0")
        .add_device("gpu0", Placement::Switch("sw0".into()), gpu(16 * GIB))
        .add_device("gpu1", Placement::Switch("sw0".into()), gpu(16 * GIB))
        .add_device("nic1", Placement::Switch("sw0".into()), nic())
        .add_device("gpu2", Placement::RootPort, gpu(64 * GIB))
        .add_empty_root_port("hp0");
    let (root, observer) = build(&b);
    let placed: Vec<_> = root
        .placements()
        .iter()
        .map(|(id, bdf)| format!("{id}={bdf}"))
        .collect();
    assert_eq!(
        placed,
        [
            "gpu0=0000:03:00.0",
            "gpu1=0000:04:00.0",
            "gpu2=0000:06:00.0",
            "nic0=0000:00:01.0",
            "nic1=0000:05:00.0"
        ]
    );
    // Root port bus 1, upstream port's internal bus 2, one bus per downstream port.
    assert_eq!(lock(root.port("rp-sw0").unwrap()).bus_range(), Some(1..=5));
    assert_eq!(lock(root.port("sw0-up").unwrap()).bus_range(), Some(2..=5));
    assert_eq!(
        lock(root.port("sw0-down2").unwrap()).bus_range(),
        Some(5..=5)
    );
    assert_eq!(lock(root.port("hp0").unwrap()).bus_range(), Some(7..=7));
    // Four BARs per GPU (I/O included), two per NIC.
    assert_eq!(observer.live().len(), 4 * 3 + 2 * 2);
    check_invariants(&root);
}

/// A NIC whose function raises INTx on `pin` (1 = INTA).
fn nic_with_pin(pin: u8) -> SharedPciDevice {
    let bars = [(0, BarDef::mem32(0x100))];
    let mut nic = FakeEndpoint::with_bars("nic", &bars).unwrap();
    nic.config.set_interrupt_pin(pin);
    Arc::new(Mutex::new(nic))
}

#[test]
fn every_placement_gets_the_swizzled_intx_gsi() {
    let root_dev = nic_with_pin(1);
    let rp_dev = nic_with_pin(2);
    let sw_devs: Vec<_> = (0..3).map(|_| nic_with_pin(1)).collect();
    let mut b = TopologyBuilder::new(layout());
    b.add_device("root", Placement::Root, root_dev.clone())
        .add_switch("sw0")
        .add_device("rp", Placement::RootPort, rp_dev.clone());
    for (i, dev) in sw_devs.iter().enumerate() {
        b.add_device(
            &format!("d{i}"),
            Placement::Switch("sw0".into()),
            dev.clone(),
        );
    }
    let (root, _) = build(&b);
    let segment = root.segment();
    // 00:01.0 on the root bus, INTA: 16 + 1.
    assert_eq!(root.bdf("root"), Some(Bdf::new(0, 1, 0)));
    assert_eq!(segment.intx_gsi(&root_dev), Some(17));
    // Behind root port 00:03.0, INTB: the port's slot with the pin unchanged (device 0).
    assert_eq!(segment.intx_gsi(&rp_dev), Some(20)); // 16 + (3 + INTB)
                                                     // Behind root port 00:02.0, the upstream port (device 0) and downstream port i (device i):
                                                     // INTA becomes INT(A + i) at the root port's slot.
    for (i, dev) in sw_devs.iter().enumerate() {
        assert_eq!(segment.intx_gsi(dev), Some(16 + (2 + i as u32) % 8), "d{i}");
    }
}

#[test]
fn an_empty_root_port_gets_only_the_slot_reserve() {
    let mut b = TopologyBuilder::new(layout());
    b.add_empty_root_port("hp0");
    let (root, _) = build(&b);
    let hp = lock(root.port("hp0").unwrap());
    // The larger of the root-port reserve (2 MiB, 256 MiB) and the slot's (4 MiB, 8 GiB).
    assert_eq!(hp.mem_window().unwrap().len, 4 * MIB);
    assert_eq!(hp.pref_window().unwrap().len, 8 * GIB);
    assert_eq!(hp.pref_window().unwrap().base % (8 * GIB), 0);
    assert_eq!(hp.io_window(), None);
    assert!(!hp.link_active());
}

#[test]
fn hotplug_reserve_is_configurable_including_buses() {
    let mut b = TopologyBuilder::new(layout());
    b.hotplug_reserve(HotplugReserve {
        buses: 3,
        mem32: 0,
        pref64: GIB,
    })
    .add_device("nic0", Placement::RootPort, nic())
    .add_empty_root_port("hp0");
    let (root, _) = build(&b);
    let rp = lock(root.port("rp-nic0").unwrap());
    assert_eq!(rp.bus_range(), Some(1..=4));
    assert_eq!(rp.mem_window().unwrap().len, MIB);
    assert_eq!(rp.pref_window().unwrap().len, GIB);
    assert_eq!(lock(root.port("hp0").unwrap()).bus_range(), Some(5..=8));
    assert_eq!(
        root.last_bus(),
        8,
        "firmware announces buses up to the last reserve"
    );
}

#[test]
fn a_root_bus_alone_uses_bus_0_only() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("nic0", Placement::Root, nic());
    let (root, _) = build(&b);
    assert_eq!(root.last_bus(), 0);
}

#[test]
fn small_bars_are_page_aligned_and_64bit_non_prefetchable_bars_stay_below_4g() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("nic0", Placement::Root, nic());
    let (root, observer) = build(&b);
    let bdf = root.bdf("nic0").unwrap();
    let bar0 = observer.range_of(bdf, 0).unwrap();
    let bar2 = observer.range_of(bdf, 2).unwrap();
    assert_eq!((bar0.base % 4096, bar0.len), (0, 0x100));
    assert!(bar2.end() <= 1 << 32);
    assert!(bar0.end() <= bar2.base || bar2.end() <= bar0.base + 4096);
}

#[test]
fn a_huge_bar_is_naturally_aligned_in_the_64bit_window() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("gpu0", Placement::RootPort, gpu(128 * GIB));
    let (root, observer) = build(&b);
    let aperture = observer.range_of(root.bdf("gpu0").unwrap(), 1).unwrap();
    assert_eq!(aperture.base % (128 * GIB), 0);
    assert_eq!(aperture.len, 128 * GIB);
    check_invariants(&root);
}

#[test]
fn without_an_io_window_io_bars_stay_unassigned() {
    let mut b = TopologyBuilder::new(PciLayout {
        io: None,
        ..layout()
    });
    b.add_device("gpu0", Placement::RootPort, gpu(GIB));
    let (root, observer) = build(&b);
    let bdf = root.bdf("gpu0").unwrap();
    assert_eq!(observer.range_of(bdf, 5), None);
    let gpu = root.segment().device(bdf).unwrap();
    assert_eq!(lock(&gpu).command(), COMMAND_MEMORY);
    assert_eq!(lock(root.port("rp-gpu0").unwrap()).io_window(), None);
}

#[test]
fn the_guest_reads_the_programmed_registers_through_ecam() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("nic0", Placement::RootPort, nic());
    let (root, _) = build(&b);
    let mut ecam = root.ecam();
    let mut buses = [0; 4];
    crate::BusDevice::read(&mut ecam, (1 << 15) | u64::from(PRIMARY_BUS), &mut buses);
    assert_eq!(&buses[..3], &[0, 1, 1]);
    let mut vendor = [0; 4];
    crate::BusDevice::read(&mut ecam, 1 << 20, &mut vendor);
    assert_eq!(u32::from_le_bytes(vendor), 0x0005_1b36);
}

#[test]
fn duplicate_ids_are_rejected() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("x", Placement::RootPort, nic())
        .add_switch("x")
        .add_device("y", Placement::Switch("x".into()), nic());
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(err, TopologyError::DuplicateId(id) if id == "x"));
}

#[test]
fn unknown_and_empty_switches_are_rejected() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("a", Placement::Switch("nope".into()), nic());
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(err, TopologyError::UnknownSwitch { switch, .. } if switch == "nope"));
    let mut b = TopologyBuilder::new(layout());
    b.add_switch("sw");
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(err, TopologyError::EmptySwitch(name) if name == "sw"));
}

#[test]
fn bus_0_has_31_free_device_numbers() {
    let mut b = TopologyBuilder::new(layout());
    for i in 0..32 {
        b.add_empty_root_port(&format!("hp{i}"));
    }
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(
        err,
        TopologyError::OutOfDeviceNumbers {
            bus: 0,
            needed: 32,
            available: 31
        }
    ));
}

#[test]
fn a_switch_has_at_most_32_downstream_ports() {
    let mut b = TopologyBuilder::new(layout());
    b.add_switch("sw");
    for i in 0..33 {
        b.add_device(&format!("d{i}"), Placement::Switch("sw".into()), nic());
    }
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(err, TopologyError::SwitchFull { devices: 33, .. }));
}

#[test]
fn buses_beyond_the_ecam_window_are_rejected() {
    let mut b = TopologyBuilder::new(PciLayout {
        ecam: BusRange::new(0xe000_0000, 2 * MIB),
        ..layout()
    });
    b.add_empty_root_port("a").add_empty_root_port("b");
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(
        err,
        TopologyError::TooManyBuses {
            needed: 3,
            end_bus: 1
        }
    ));
}

#[test]
fn bus_reserves_count_against_the_256_buses() {
    let mut b = TopologyBuilder::new(layout());
    b.hotplug_reserve(HotplugReserve {
        buses: 10,
        ..HotplugReserve::default()
    });
    for i in 0..31 {
        b.add_empty_root_port(&format!("hp{i}"));
    }
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    // Bus 0, then 1 + 10 buses for each of 31 root ports.
    assert!(matches!(
        err,
        TopologyError::TooManyBuses {
            needed: 342,
            end_bus: 255
        }
    ));
}

#[test]
fn bars_that_do_not_fit_are_rejected() {
    let mut b = TopologyBuilder::new(layout());
    let big = FakeEndpoint::with_bars("big", &[(0, BarDef::mem32(GIB))]).unwrap();
    b.add_device("big", Placement::RootPort, Arc::new(Mutex::new(big)));
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(
        err,
        TopologyError::OutOfSpace {
            window: WindowKind::Mem32,
            ..
        }
    ));
}

#[test]
fn an_invalid_layout_is_rejected() {
    let b = TopologyBuilder::new(PciLayout {
        mmio32: BusRange::new(0xf000_0000, 512 * MIB),
        ..layout()
    });
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(err, TopologyError::InvalidLayout(_)));
    let b = TopologyBuilder::new(PciLayout {
        ecam: BusRange::new(0x1_0000_0000, 256 * MIB),
        ..layout()
    });
    let err = b.build(Arc::new(FakeBarObserver::new())).err().unwrap();
    assert!(matches!(err, TopologyError::InvalidLayout(_)));
}

#[test]
fn a_rejected_initial_mapping_fails_the_build() {
    let mut b = TopologyBuilder::new(layout());
    b.add_device("nic0", Placement::RootPort, nic());
    let observer = Arc::new(FakeBarObserver::new());
    observer.reject_when(|c| c.kind == BarKind::Mem64);
    let err = b.build(observer).err().unwrap();
    assert!(matches!(
        err,
        TopologyError::Segment(SegmentError::BarRejected(_))
    ));
}

/// An ivshmem-like device: 256 bytes of registers and a 64 MiB prefetchable memory BAR.
fn ivshmem() -> SharedPciDevice {
    let bars = [
        (0, BarDef::mem32(0x100)),
        (2, BarDef::mem64(64 * MIB, true)),
    ];
    Arc::new(Mutex::new(
        FakeEndpoint::with_bars("ivshmem", &bars).unwrap(),
    ))
}

/// An edu-like device: one 1 MiB register BAR.
fn edu() -> SharedPciDevice {
    let bars = [(0, BarDef::mem32(MIB))];
    Arc::new(Mutex::new(FakeEndpoint::with_bars("edu", &bars).unwrap()))
}

/// Moves 64-bit BAR `bar` of the function at `bdf` to `address` as a guest would, decoding on.
fn move_bar64(root: &PciRoot, bdf: Bdf, bar: u16, address: u64) {
    let offset = BAR0 + 4 * bar;
    let segment = root.segment();
    segment
        .config_write(bdf, offset, &(address as u32).to_le_bytes())
        .unwrap();
    segment
        .config_write(bdf, offset + 4, &((address >> 32) as u32).to_le_bytes())
        .unwrap();
}

#[test]
fn a_bar_can_move_inside_its_downstream_port_window() {
    let mut b = TopologyBuilder::new(layout());
    b.add_switch("sw0")
        .add_device("edu", Placement::Switch("sw0".into()), edu())
        .add_device("ivshmem", Placement::Switch("sw0".into()), ivshmem());
    let (root, observer) = build(&b);
    let port = root.port("sw0-down1").unwrap();
    let window = lock(port).pref_window().unwrap();
    assert!(window.len >= 128 * MIB, "{window}");
    let bdf = root.bdf("ivshmem").unwrap();
    assert_eq!(
        observer.range_of(bdf, 2),
        Some(BusRange::new(window.base, 64 * MIB))
    );
    move_bar64(&root, bdf, 2, window.base + 64 * MIB);
    let moved = BusRange::new(window.base + 64 * MIB, 64 * MIB);
    assert_eq!(observer.range_of(bdf, 2), Some(moved));
    assert!(inside(moved, window));
    assert_eq!(lock(port).pref_window(), Some(window));
    check_invariants(&root);
}

#[test]
fn a_bar_can_move_inside_its_root_port_window_besides_the_reserve() {
    let mut b = TopologyBuilder::new(layout());
    b.hotplug_reserve(HotplugReserve {
        pref64: 0,
        ..HotplugReserve::default()
    })
    .add_device("ivshmem", Placement::RootPort, ivshmem());
    let (root, observer) = build(&b);
    let window = lock(root.port("rp-ivshmem").unwrap())
        .pref_window()
        .unwrap();
    assert_eq!(window.len, 128 * MIB);
    let bdf = root.bdf("ivshmem").unwrap();
    move_bar64(&root, bdf, 2, window.base + 64 * MIB);
    assert_eq!(
        observer.range_of(bdf, 2),
        Some(BusRange::new(window.base + 64 * MIB, 64 * MIB))
    );
    check_invariants(&root);
}

/// Bytes of `kind` the BARs of `device` take (small memory BARs a page each).
fn bar_bytes(device: &SharedPciDevice, kind: WindowKind) -> u64 {
    crate::pci::bar::bars_and_rom(&*lock(device))
        .iter()
        .flatten()
        .map(bar_request)
        .filter(|(k, _)| *k == kind)
        .map(|(_, r)| r.size)
        .sum()
}

#[test]
fn every_switch_port_has_headroom_and_the_windows_nest() {
    // Eight devices behind one switch, small BARs and 64 MiB ones: must fit the 512 MiB
    // 32-bit window with headroom at every downstream port.
    let devices: Vec<_> = (0..8)
        .map(|i| if i % 2 == 0 { ivshmem() } else { gpu(GIB) })
        .collect();
    let mut b = TopologyBuilder::new(layout());
    b.add_switch("sw0");
    for (i, dev) in devices.iter().enumerate() {
        b.add_device(
            &format!("d{i}"),
            Placement::Switch("sw0".into()),
            dev.clone(),
        );
    }
    let (root, _) = build(&b);
    for (i, dev) in devices.iter().enumerate() {
        let port = lock(root.port(&format!("sw0-down{i}")).unwrap());
        for kind in [WindowKind::Mem32, WindowKind::Pref64] {
            let held = bar_bytes(dev, kind);
            let window = window_of(&port, kind).expect("window open");
            assert!(
                window.len >= 2 * held,
                "d{i} {kind:?}: {window} for {held:#x}"
            );
            assert!(window.len.is_power_of_two(), "d{i} {kind:?}: {window}");
        }
    }
    let up = lock(root.port("sw0-up").unwrap());
    let rp = lock(root.port("rp-sw0").unwrap());
    for kind in [WindowKind::Mem32, WindowKind::Pref64] {
        let held: u64 = devices.iter().map(|d| bar_bytes(d, kind)).sum();
        let up_window = window_of(&up, kind).unwrap();
        assert!(up_window.len >= 2 * held, "{kind:?}: {up_window}");
        assert!(inside(up_window, window_of(&rp, kind).unwrap()));
    }
    drop((up, rp));
    check_invariants(&root);
}

#[test]
fn headroom_steps_down_where_the_host_window_is_too_small() {
    // Twice 64 GiB + 32 MiB rounded up to a power of two is the whole 256 GiB window, with no
    // room left for the reserve: the 64-bit windows get plain doubling instead (128 GiB +
    // 64 MiB, then the 256 MiB reserve at its alignment).
    let mut b = TopologyBuilder::new(layout());
    b.add_device("gpu0", Placement::RootPort, gpu(64 * GIB));
    let (root, _) = build(&b);
    let rp = lock(root.port("rp-gpu0").unwrap());
    assert_eq!(rp.pref_window().unwrap().len, 128 * GIB + 512 * MIB);
    // The 32-bit window keeps its power-of-two headroom.
    assert_eq!(rp.mem_window().unwrap().len, 34 * MIB);
    drop(rp);
    check_invariants(&root);
}
