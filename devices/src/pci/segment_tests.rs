use super::*;
use crate::pci::config::BarDef;
use crate::pci::fake::{FakeBarObserver, FakeEndpoint};
use crate::pci::host_bridge::HostBridge;
use crate::pci::regs::*;
use crate::pci::{root_port, switch::PcieSwitch, LinkConfig, SlotConfig};
use crate::BusRange;

type Fake = Arc<Mutex<FakeEndpoint>>;

/// 00:00.0 host bridge, 00:01.0 root port (buses 1..=1) with endpoint `b` behind it, and
/// endpoint `a` at 00:02.0 with a 4 KiB BAR 0.
struct Platform {
    segment: Arc<PciSegment>,
    observer: Arc<FakeBarObserver>,
    rp: SharedPort,
    a: Fake,
    b: Fake,
}

fn endpoint(name: &str) -> Fake {
    FakeEndpoint::with_bars(name, &[(0, BarDef::mem32(0x1000))])
        .unwrap()
        .shared()
}

fn platform() -> Platform {
    let observer = Arc::new(FakeBarObserver::new());
    let segment = Arc::new(PciSegment::new(observer.clone()));
    segment
        .add_device(None, 0, Arc::new(Mutex::new(HostBridge::new())))
        .unwrap();
    let rp = Arc::new(Mutex::new(root_port::new("rp", 1, None).unwrap()));
    segment.add_port(None, 1 << 3, rp.clone()).unwrap();
    let (a, b) = (endpoint("a"), endpoint("b"));
    segment.add_device(None, 2 << 3, a.clone()).unwrap();
    segment.add_device(Some(&rp), 0, b.clone()).unwrap();
    segment
        .config_write(Bdf::new(0, 1, 0), PRIMARY_BUS, &[0, 1, 1])
        .unwrap();
    Platform {
        segment,
        observer,
        rp,
        a,
        b,
    }
}

fn read32(segment: &PciSegment, bdf: Bdf, offset: u16) -> u32 {
    let mut data = [0; 4];
    segment.config_read(bdf, offset, &mut data);
    u32::from_le_bytes(data)
}

fn ecam_offset(bus: u64, device: u64, function: u64, reg: u64) -> u64 {
    (bus << 20) | (device << 15) | (function << 12) | reg
}

fn is(device: &Option<SharedPciDevice>, expected: &Fake) -> bool {
    device
        .as_ref()
        .is_some_and(|d| std::ptr::addr_eq(Arc::as_ptr(d), Arc::as_ptr(expected)))
}

#[test]
fn absent_functions_read_all_ones() {
    let p = platform();
    assert_eq!(read32(&p.segment, Bdf::new(0, 7, 0), VENDOR_ID), u32::MAX);
    assert_eq!(read32(&p.segment, Bdf::new(0, 2, 1), VENDOR_ID), u32::MAX);
    assert_eq!(read32(&p.segment, Bdf::new(9, 0, 0), VENDOR_ID), u32::MAX);
}

#[test]
fn bus_0_devices_answer_at_their_device_number() {
    let p = platform();
    assert_eq!(
        read32(&p.segment, Bdf::new(0, 0, 0), VENDOR_ID),
        0x0008_1b36
    );
    assert_eq!(
        read32(&p.segment, Bdf::new(0, 1, 0), VENDOR_ID),
        0x000c_1b36
    );
    assert!(is(&p.segment.device(Bdf::new(0, 2, 0)), &p.a));
}

#[test]
fn accesses_below_a_root_port_follow_its_bus_numbers() {
    let p = platform();
    assert!(is(&p.segment.device(Bdf::new(1, 0, 0)), &p.b));
    p.segment
        .config_write(Bdf::new(0, 1, 0), SECONDARY_BUS, &[5, 5])
        .unwrap();
    assert!(p.segment.device(Bdf::new(1, 0, 0)).is_none());
    assert!(is(&p.segment.device(Bdf::new(5, 0, 0)), &p.b));
}

#[test]
fn an_unprogrammed_bridge_forwards_nothing() {
    let p = platform();
    p.segment
        .config_write(Bdf::new(0, 1, 0), PRIMARY_BUS, &[0, 0, 0])
        .unwrap();
    assert!(p.segment.device(Bdf::new(1, 0, 0)).is_none());
}

#[test]
fn a_link_only_has_device_0() {
    let p = platform();
    assert!(p.segment.device(Bdf::new(1, 1, 0)).is_none());
    let err = p
        .segment
        .add_device(Some(&p.rp), 1 << 3, endpoint("c"))
        .unwrap_err();
    assert!(matches!(err, SegmentError::LinkDevice { device: 1, .. }));
}

#[test]
fn attaching_below_a_root_port_brings_its_link_up() {
    let p = platform();
    assert!(lock(&p.rp).link_active());
}

fn with_switch() -> (Arc<PciSegment>, Vec<Fake>) {
    let observer = Arc::new(FakeBarObserver::new());
    let segment = Arc::new(PciSegment::new(observer));
    let rp = Arc::new(Mutex::new(root_port::new("rp", 1, None).unwrap()));
    segment.add_port(None, 1 << 3, rp.clone()).unwrap();
    let slots = [1, 2].map(|n| SlotConfig {
        physical_slot: n,
        hotplug: false,
    });
    let sw = PcieSwitch::new("sw", LinkConfig::default(), &slots).unwrap();
    segment.add_port(Some(&rp), 0, sw.upstream.clone()).unwrap();
    let mut ends = Vec::new();
    for (i, dp) in sw.downstream.iter().enumerate() {
        segment
            .add_port(Some(&sw.upstream), (i as u8) << 3, dp.clone())
            .unwrap();
        let ep = endpoint(&format!("ep{i}"));
        segment.add_device(Some(dp), 0, ep.clone()).unwrap();
        ends.push(ep);
    }
    let program = |bdf, buses: [u8; 3]| segment.config_write(bdf, PRIMARY_BUS, &buses).unwrap();
    program(Bdf::new(0, 1, 0), [0, 1, 4]);
    program(Bdf::new(1, 0, 0), [1, 2, 4]);
    program(Bdf::new(2, 0, 0), [2, 3, 3]);
    program(Bdf::new(2, 1, 0), [2, 4, 4]);
    (segment, ends)
}

#[test]
fn a_switch_internal_bus_has_one_device_per_downstream_port() {
    let (segment, ends) = with_switch();
    assert_eq!(read32(&segment, Bdf::new(2, 0, 0), VENDOR_ID), 0x8233_104c);
    assert_eq!(read32(&segment, Bdf::new(2, 1, 0), VENDOR_ID), 0x8233_104c);
    assert!(is(&segment.device(Bdf::new(3, 0, 0)), &ends[0]));
    assert!(is(&segment.device(Bdf::new(4, 0, 0)), &ends[1]));
    assert!(segment.device(Bdf::new(5, 0, 0)).is_none());
}

#[test]
fn devices_lists_every_reachable_function_with_its_address() {
    let (segment, _) = with_switch();
    let bdfs: Vec<_> = segment
        .devices()
        .into_iter()
        .map(|d| d.0.to_string())
        .collect();
    assert_eq!(
        bdfs,
        [
            "0000:00:01.0",
            "0000:01:00.0",
            "0000:02:00.0",
            "0000:03:00.0",
            "0000:02:01.0",
            "0000:04:00.0"
        ]
    );
}

#[test]
fn ecam_offsets_select_bus_device_function_and_register() {
    let p = platform();
    let mut ecam = PciEcam::new(p.segment.clone());
    let mut data = [0; 4];
    ecam.read(ecam_offset(0, 1, 0, 0), &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x000c_1b36);
    let mut byte = [0; 1];
    ecam.read(ecam_offset(0, 1, 0, 0x19), &mut byte);
    assert_eq!(byte, [1], "secondary bus");
    ecam.write(ecam_offset(1, 0, 0, 0x10), &0xc000_0000u32.to_le_bytes());
    assert_eq!(lock(&p.b).bars()[0].unwrap().address, 0xc000_0000);
}

#[test]
fn ecam_rejects_accesses_crossing_a_dword() {
    let p = platform();
    let mut ecam = PciEcam::new(p.segment.clone());
    let mut data = [0; 4];
    ecam.read(ecam_offset(0, 1, 0, 2), &mut data);
    assert_eq!(data, [0xff; 4]);
    ecam.write(ecam_offset(0, 1, 0, 0x18), &[0; 8]);
    assert_eq!(
        read32(&p.segment, Bdf::new(0, 1, 0), PRIMARY_BUS) & 0xff_ffff,
        0x01_0100
    );
}

#[test]
fn ecam_ignores_offsets_past_bus_255() {
    let p = platform();
    let mut ecam = PciEcam::new(p.segment.clone());
    let mut data = [0; 2];
    ecam.read(256 << 20, &mut data);
    assert_eq!(data, [0xff; 2]);
}

fn cf8(bus: u32, device: u32, function: u32, reg: u32) -> [u8; 4] {
    (1 << 31 | (reg & 0xf00) << 16 | bus << 16 | device << 11 | function << 8 | (reg & 0xfc))
        .to_le_bytes()
}

#[test]
fn cf8_latch_reads_back_masked() {
    let p = platform();
    let mut io = PciConfigIo::new(p.segment.clone());
    io.write(0, &u32::MAX.to_le_bytes());
    let mut data = [0; 4];
    io.read(0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x8fff_fffc);
}

#[test]
fn cf8_selects_the_function_and_cfc_accesses_it() {
    let p = platform();
    let mut io = PciConfigIo::new(p.segment.clone());
    io.write(0, &cf8(0, 1, 0, 0));
    let mut data = [0; 4];
    io.read(4, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x000c_1b36);
    let mut word = [0; 2];
    io.read(6, &mut word);
    assert_eq!(u16::from_le_bytes(word), 0x000c);
    io.write(0, &cf8(1, 0, 0, 0x10));
    io.write(4, &0xc001_0000u32.to_le_bytes());
    assert_eq!(lock(&p.b).bars()[0].unwrap().address, 0xc001_0000);
}

#[test]
fn cf8_extended_register_bits_reach_extended_config_space() {
    let p = platform();
    lock(&p.a)
        .config
        .add_extended_capability(EXT_CAP_ID_VNDR, 1, 8)
        .unwrap();
    let mut io = PciConfigIo::new(p.segment.clone());
    io.write(0, &cf8(0, 2, 0, 0x100));
    let mut data = [0; 4];
    io.read(4, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x0001_000b);
}

#[test]
fn cf8_without_the_enable_bit_reaches_nothing() {
    let p = platform();
    let mut io = PciConfigIo::new(p.segment.clone());
    io.write(
        0,
        &(u32::from_le_bytes(cf8(0, 1, 0, 0)) & !(1 << 31)).to_le_bytes(),
    );
    let mut data = [0; 4];
    io.read(4, &mut data);
    assert_eq!(data, [0xff; 4]);
}

#[test]
fn cf8_ignores_byte_writes_to_the_latch() {
    let p = platform();
    let mut io = PciConfigIo::new(p.segment.clone());
    io.write(0, &cf8(0, 1, 0, 0));
    io.write(1, &[0x55]);
    let mut data = [0; 4];
    io.read(0, &mut data);
    assert_eq!(data, cf8(0, 1, 0, 0));
}

#[test]
fn bar_changes_from_config_writes_reach_the_observer() {
    let p = platform();
    let b = Bdf::new(1, 0, 0);
    p.segment
        .config_write(b, BAR0, &0xc000_0000u32.to_le_bytes())
        .unwrap();
    let changes = p
        .segment
        .config_write(b, COMMAND, &COMMAND_MEMORY.to_le_bytes())
        .unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(
        p.observer.range_of(b, 0),
        Some(BusRange::new(0xc000_0000, 0x1000))
    );
}

#[test]
fn secondary_bus_reset_resets_and_unmaps_everything_below() {
    let p = platform();
    let b = Bdf::new(1, 0, 0);
    p.segment
        .config_write(b, BAR0, &0xc000_0000u32.to_le_bytes())
        .unwrap();
    p.segment
        .config_write(b, COMMAND, &COMMAND_MEMORY.to_le_bytes())
        .unwrap();
    let rp = Bdf::new(0, 1, 0);
    p.segment
        .config_write(rp, BRIDGE_CONTROL, &BRIDGE_CTL_BUS_RESET.to_le_bytes())
        .unwrap();
    assert_eq!(lock(&p.b).resets, 1);
    assert_eq!(lock(&p.a).resets, 0);
    assert!(p.observer.live().is_empty());
    p.segment
        .config_write(rp, BRIDGE_CONTROL, &0u16.to_le_bytes())
        .unwrap();
    assert_eq!(lock(&p.b).resets, 1);
}

#[test]
fn removing_a_device_unmaps_it_and_drops_the_link() {
    let p = platform();
    let b = Bdf::new(1, 0, 0);
    p.segment
        .config_write(b, BAR0, &0xc000_0000u32.to_le_bytes())
        .unwrap();
    p.segment
        .config_write(b, COMMAND, &COMMAND_MEMORY.to_le_bytes())
        .unwrap();
    p.segment.remove(Some(&p.rp), 0).unwrap();
    assert!(p.observer.live().is_empty());
    assert!(!lock(&p.rp).link_active());
    assert!(p.segment.device(b).is_none());
}

#[test]
fn removal_and_insertion_are_validated() {
    let p = platform();
    assert!(matches!(
        p.segment.remove(None, 1 << 3),
        Err(SegmentError::HasChildren { .. })
    ));
    assert!(matches!(
        p.segment.remove(None, 5 << 3),
        Err(SegmentError::NotFound { .. })
    ));
    assert!(matches!(
        p.segment.add_device(None, 2 << 3, endpoint("x")),
        Err(SegmentError::Occupied { .. })
    ));
    let stray = Arc::new(Mutex::new(root_port::new("stray", 9, None).unwrap()));
    assert!(matches!(
        p.segment.add_device(Some(&stray), 0, endpoint("x")),
        Err(SegmentError::UnknownParent(_))
    ));
}

#[test]
fn intx_gsi_follows_the_interrupt_pin_and_the_path() {
    let p = platform();
    lock(&p.a).config.set_interrupt_pin(1);
    lock(&p.b).config.set_interrupt_pin(2);
    let (a, b): (SharedPciDevice, SharedPciDevice) = (p.a.clone(), p.b.clone());
    // a: INTA of root-bus device 2. b: INTB of device 0 behind the root port at device 1,
    // which the port presents as INTB of its own slot.
    assert_eq!(p.segment.intx_gsi(&a), Some(16 + 2));
    assert_eq!(p.segment.intx_gsi(&b), Some(16 + 1 + 1));
}

#[test]
fn intx_gsi_needs_a_pin_and_a_place_on_the_segment() {
    let p = platform();
    let a: SharedPciDevice = p.a.clone();
    assert_eq!(p.segment.intx_gsi(&a), None, "no interrupt pin");
    let stranger = endpoint("stranger");
    lock(&stranger).config.set_interrupt_pin(1);
    let stranger: SharedPciDevice = stranger;
    assert_eq!(p.segment.intx_gsi(&stranger), None, "not attached");
}

/// Opens `rp`'s memory window at 0xc000_0000-0xc00f_ffff with memory space on.
fn open_rp_window(p: &Platform) {
    let rp = Bdf::new(0, 1, 0);
    p.segment
        .config_write(rp, MEMORY_BASE, &0xc000_c000u32.to_le_bytes())
        .unwrap();
    p.segment
        .config_write(rp, COMMAND, &COMMAND_MEMORY.to_le_bytes())
        .unwrap();
}

/// Places `b`'s BAR 0 (behind `rp`) at `addr` with memory decoding on.
fn place_b(p: &Platform, addr: u32) {
    let b = Bdf::new(1, 0, 0);
    p.segment.config_write(b, COMMAND, &[0, 0]).unwrap();
    p.segment
        .config_write(b, BAR0, &addr.to_le_bytes())
        .unwrap();
    p.segment
        .config_write(b, COMMAND, &COMMAND_MEMORY.to_le_bytes())
        .unwrap();
}

#[test]
fn a_bar_outside_its_bridges_window_decodes_but_is_not_forwarded() {
    let p = platform();
    open_rp_window(&p);

    place_b(&p, 0xc000_0000);
    let inside = p.observer.history().last().cloned().unwrap();
    place_b(&p, 0xc010_0000); // right past the window's limit
    let outside = p.observer.history().last().cloned().unwrap();

    assert_eq!(inside.new, Some(BusRange::new(0xc000_0000, 0x1000)));
    assert!(inside.forwarded);
    assert_eq!(outside.new, Some(BusRange::new(0xc010_0000, 0x1000)));
    assert!(!outside.forwarded, "{outside}");
    // On the root bus nothing stands in between.
    p.segment
        .config_write(Bdf::new(0, 2, 0), BAR0, &0xd000_0000u32.to_le_bytes())
        .unwrap();
    p.segment
        .config_write(Bdf::new(0, 2, 0), COMMAND, &COMMAND_MEMORY.to_le_bytes())
        .unwrap();
    assert!(p.observer.history().last().unwrap().forwarded);
}

#[test]
fn bridge_window_and_memory_space_writes_report_what_stops_or_starts_being_forwarded() {
    let p = platform();
    open_rp_window(&p);
    place_b(&p, 0xc000_0000);
    let rp = Bdf::new(0, 1, 0);

    // The window moves away from the BAR, the port's memory space goes off, then both back.
    p.segment
        .config_write(rp, MEMORY_BASE, &0xc010_c010u32.to_le_bytes())
        .unwrap();
    p.segment
        .config_write(rp, MEMORY_BASE, &0xc000_c000u32.to_le_bytes())
        .unwrap();
    p.segment.config_write(rp, COMMAND, &[0, 0]).unwrap();
    p.segment
        .config_write(rp, COMMAND, &COMMAND_MEMORY.to_le_bytes())
        .unwrap();
    // A write that changes nothing it forwards reports nothing.
    p.segment
        .config_write(rp, MEMORY_BASE, &0xc000_c000u32.to_le_bytes())
        .unwrap();

    let reported: Vec<bool> = p
        .observer
        .forwarding()
        .iter()
        .map(|c| c.forwarded)
        .collect();
    assert_eq!(reported, [false, true, false, true]);
    let at = Some(BusRange::new(0xc000_0000, 0x1000));
    assert!(p
        .observer
        .forwarding()
        .iter()
        .all(|c| c.old == at && c.new == at));
}
