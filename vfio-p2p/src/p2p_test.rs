//! Tests of the P2P table against `FakeIommu`, which panics if the table double-maps, unmaps
//! something it did not map, or maps a dmabuf while its device is not decoding.

use std::collections::HashMap;
use std::io::{pipe, PipeReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::*;
use crate::fake::{FakeEvent, FakeIommu, FakeSource};
use crate::iommu::IovaRange;
use crate::p2p_rows::{P2pAreaState, P2pMechanism};

#[path = "p2p_rows_test.rs"]
mod rows;

#[path = "p2p_faults_test.rs"]
mod faults;

const MIB: u64 = 1 << 20;
/// The guest's 32-bit MMIO hole and a 64-bit MMIO window, as the VMM would pass them.
const WINDOWS: [IovaRange; 2] = [
    IovaRange {
        start: 0xc000_0000,
        last: 0xfebf_ffff,
    },
    IovaRange {
        start: 1 << 36,
        last: (1 << 37) - 1,
    },
];

fn dev(n: u64) -> DeviceKey {
    DeviceKey::Cdev { dev: 0x2d, ino: n }
}

fn bar(device: DeviceKey, region: u32) -> BarKey {
    BarKey { device, region }
}

fn area(device: DeviceKey, region: u32, area_offset: u64) -> P2pKey {
    P2pKey {
        bar: bar(device, region),
        area_offset,
    }
}

fn map(iova: u64, size: u64) -> FakeEvent {
    FakeEvent::Map {
        iova,
        size,
        kind: DmaKind::DeviceBar,
    }
}

fn unmap(iova: u64, size: u64) -> FakeEvent {
    FakeEvent::Unmap { iova, size }
}

/// A VM as the BAR observer sees it: per BAR the guest address, per device the decode bit;
/// `place` and `decode` report the resulting [`BarPlacement`]s to the table as the VMM does.
struct Vm {
    fake: Arc<FakeIommu>,
    table: P2pTable,
    bases: Mutex<HashMap<BarKey, Option<u64>>>,
    decoding: Mutex<HashMap<DeviceKey, bool>>,
}

impl Vm {
    fn new(kind: BackendKind) -> Self {
        Self::with_fake(FakeIommu::new(kind))
    }

    fn with_fake(fake: FakeIommu) -> Self {
        Self::named("g0", fake)
    }

    /// The table of P2P domain `domain` on `fake`.
    fn named(domain: &str, fake: FakeIommu) -> Self {
        Self::build(domain, fake, &WINDOWS)
    }

    /// The table of P2P domain `domain` on `fake`, peers' BARs in `windows`.
    fn build(domain: &str, fake: FakeIommu, windows: &[IovaRange]) -> Self {
        let fake = Arc::new(fake);
        let table = P2pTable::new(domain, fake.clone(), windows);
        Self {
            fake,
            table,
            bases: Mutex::default(),
            decoding: Mutex::default(),
        }
    }

    fn placement(&self, bar: BarKey) -> BarPlacement {
        let base = self.bases.lock().unwrap().get(&bar).copied().flatten();
        let decode = self.decoding.lock().unwrap().get(&bar.device).copied();
        match (base, decode) {
            (None, _) => BarPlacement::Unplaced,
            (Some(base), Some(true)) => BarPlacement::Placed(base),
            (Some(_), _) => BarPlacement::DecodeOff,
        }
    }

    /// The guest wrote `bar`'s address (`None`: cleared or sized).
    fn place(&self, bar: BarKey, base: Option<u64>) -> Result<(), P2pError> {
        self.bases.lock().unwrap().insert(bar, base);
        self.table.bar_moved(bar, self.placement(bar))
    }

    /// Registers a dmabuf stand-in (a pipe's write end) for `key`. The returned read end sees
    /// EOF once the table closes the dmabuf.
    fn add_dmabuf(&self, key: P2pKey, size: u64) -> PipeReader {
        let (reader, writer) = pipe().unwrap();
        let fd = OwnedFd::from(writer);
        self.join(key.bar.device);
        self.fake.register_dmabuf(fd.as_fd(), key.bar.device);
        self.table
            .register(key, BarBacking::Dmabuf(fd), size)
            .unwrap();
        reader
    }

    /// Makes `device` a member of this domain, in the table and in the fake.
    fn join(&self, device: DeviceKey) {
        self.fake.attach(device);
        let bdf = "0000:00:02.0".parse().unwrap();
        match self.table.register_device(device, "dev", bdf) {
            Ok(()) | Err(P2pError::DeviceExists { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }

    /// The guest sets PCI_COMMAND.MEM: the write reaches the device, then the observer tells
    /// the table about every BAR of the device that has areas.
    fn decode(&self, device: DeviceKey, enabled: bool) {
        self.fake.set_decode(device, enabled);
        self.decoding.lock().unwrap().insert(device, enabled);
        let bars: std::collections::BTreeSet<BarKey> =
            self.table.keys_of(device).iter().map(|k| k.bar).collect();
        for bar in bars {
            self.table.bar_moved(bar, self.placement(bar)).unwrap();
        }
    }

    fn mapped_at(&self, key: P2pKey) -> Option<u64> {
        self.table.state(&key).unwrap().mapped_at
    }
}

#[test]
fn a_placed_bar_is_mapped_once_decoding_is_on() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, 64 * MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    assert!(vm.fake.events().is_empty());

    vm.decode(dev(1), true);

    assert_eq!(vm.fake.events(), vec![map(0xe000_0000, 64 * MIB)]);
    assert_eq!(vm.mapped_at(a), Some(0xe000_0000));
}

#[test]
fn a_bar_move_unmaps_the_old_address_then_maps_the_new_one() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, 64 * MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.decode(dev(1), true);
    vm.fake.take_events();

    vm.place(a.bar, Some(1 << 36)).unwrap();

    assert_eq!(
        vm.fake.events(),
        vec![unmap(0xe000_0000, 64 * MIB), map(1 << 36, 64 * MIB)]
    );
    assert_eq!(vm.fake.live().len(), 1);
}

#[test]
fn rewriting_the_same_bar_address_makes_no_ioctl() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.decode(dev(1), true);
    vm.fake.take_events();

    vm.place(a.bar, Some(0xe000_0000)).unwrap();

    assert!(vm.fake.events().is_empty());
}

#[test]
fn a_bar_moved_while_decoding_is_off_is_mapped_at_its_new_address_on_enable() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.decode(dev(1), true);
    vm.decode(dev(1), false);
    vm.place(a.bar, Some(0xd000_0000)).unwrap();
    vm.fake.take_events();

    vm.decode(dev(1), true);

    assert_eq!(vm.fake.events(), vec![map(0xd000_0000, MIB)]);
}

#[test]
fn decode_off_unmaps_and_decode_on_maps_the_same_dmabuf_again() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.decode(dev(1), true);
    let first = vm.fake.live_at(0xe000_0000).unwrap().source;

    vm.decode(dev(1), false);
    assert!(vm.fake.live().is_empty());
    vm.decode(dev(1), true);

    let again = vm.fake.live_at(0xe000_0000).unwrap();
    assert_eq!(
        again.source, first,
        "re-mapped from the dmabuf exported at first"
    );
    assert!(matches!(again.source, FakeSource::File { offset: 0, .. }));
}

#[test]
fn the_areas_of_a_bar_move_together() {
    // A BAR whose MSI-X table page is not mmappable: two areas, around it.
    let vm = Vm::new(BackendKind::Iommufd);
    let low = area(dev(1), 0, 0);
    let high = area(dev(1), 0, 0x3000);
    let _b1 = vm.add_dmabuf(low, 0x2000);
    let _b2 = vm.add_dmabuf(high, 0xd000);
    vm.decode(dev(1), true);

    vm.place(bar(dev(1), 0), Some(0xe010_0000)).unwrap();

    assert_eq!(vm.mapped_at(low), Some(0xe010_0000));
    assert_eq!(vm.mapped_at(high), Some(0xe010_3000));
}

#[test]
fn a_reset_runs_with_the_device_unmapped_and_maps_it_again_after() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let b = area(dev(2), 2, 0);
    let _b1 = vm.add_dmabuf(a, MIB);
    let _b2 = vm.add_dmabuf(b, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.place(b.bar, Some(0xe100_0000)).unwrap();
    vm.decode(dev(1), true);
    vm.decode(dev(2), true);

    let live_during = vm.table.device_reset(dev(1), || vm.fake.live());

    assert_eq!(
        live_during.len(),
        1,
        "only the other device stays mapped during the reset"
    );
    assert_eq!(live_during[0].iova, 0xe100_0000);
    assert_eq!(vm.mapped_at(a), Some(0xe000_0000));
}

#[test]
fn a_reset_with_decoding_off_leaves_the_device_unmapped() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();

    let result: Result<(), ()> = vm.table.device_reset(dev(1), || Ok(()));

    assert_eq!(result, Ok(()));
    assert!(vm.fake.events().is_empty());
}

#[test]
fn removing_a_device_unmaps_and_closes_everything_it_had() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let mut buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.decode(dev(1), true);

    vm.table.remove_device(dev(1));

    assert!(vm.fake.live().is_empty());
    assert!(vm.table.is_empty());
    assert_eq!(
        buf.read(&mut [0u8; 1]).unwrap(),
        0,
        "the dmabuf fd was closed"
    );
    assert!(vm.table.keys_of(dev(1)).is_empty());
}

#[test]
fn dropping_the_table_leaves_nothing_in_the_iommu() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.decode(dev(1), true);
    let fake = vm.fake.clone();

    drop(vm);

    assert!(fake.live().is_empty());
}

#[test]
fn a_refused_map_leaves_the_area_unmapped_until_its_placement_changes() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let b = area(dev(2), 2, 0);
    let _b1 = vm.add_dmabuf(a, MIB);
    let _b2 = vm.add_dmabuf(b, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.fake.fail_next_maps(&[libc::EINVAL]);

    vm.decode(dev(1), true);
    assert_eq!(
        vm.mapped_at(a),
        None,
        "a failed BAR map is a warning, not an error"
    );
    // Unrelated changes do not hammer the IOMMU with the same refused map.
    vm.decode(dev(2), true);
    assert!(vm.fake.events().is_empty());

    vm.place(a.bar, Some(0xe800_0000)).unwrap();

    assert_eq!(vm.fake.events(), vec![map(0xe800_0000, MIB)]);
}

#[test]
fn a_bar_outside_the_host_iommu_range_is_left_unmapped() {
    // The lab's emulated VT-d translates 39 bits; this 64-bit window is above that.
    let host = vec![IovaRange {
        start: 0,
        last: (1 << 39) - 1,
    }];
    let vm = Vm::with_fake(FakeIommu::with_ranges(BackendKind::Iommufd, host));
    let high = P2pTable::new(
        "g0",
        vm.fake.clone(),
        &[IovaRange {
            start: 1 << 40,
            last: (1 << 41) - 1,
        }],
    );
    let a = area(dev(1), 2, 0);
    let (_reader, writer) = pipe().unwrap();
    let fd = OwnedFd::from(writer);
    vm.fake.register_dmabuf(fd.as_fd(), dev(1));
    vm.fake.attach(dev(1));
    let bdf = "0000:00:02.0".parse().unwrap();
    high.register_device(dev(1), "shm", bdf).unwrap();
    high.register(a, BarBacking::Dmabuf(fd), MIB).unwrap();
    vm.fake.set_decode(dev(1), true);

    high.bar_moved(a.bar, BarPlacement::Placed(1 << 40))
        .unwrap();

    assert_eq!(high.state(&a).unwrap().mapped_at, None);
    assert!(vm.fake.live().is_empty());
}

#[test]
fn unaligned_or_out_of_window_placements_are_not_mapped() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.decode(dev(1), true);

    vm.place(a.bar, Some(0xe000_0800)).unwrap();
    assert_eq!(vm.mapped_at(a), None);
    vm.place(a.bar, Some(0x1000_0000)).unwrap(); // guest RAM
    assert_eq!(vm.mapped_at(a), None);

    assert!(vm.fake.events().is_empty());
}

#[test]
fn of_two_bars_placed_on_each_other_one_maps_and_the_other_follows_when_it_moves() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let b = area(dev(2), 2, 0);
    let _b1 = vm.add_dmabuf(a, MIB);
    let _b2 = vm.add_dmabuf(b, MIB);
    vm.decode(dev(1), true);
    vm.decode(dev(2), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.place(b.bar, Some(0xe000_0000)).unwrap();
    assert_eq!(
        (vm.mapped_at(a), vm.mapped_at(b)),
        (Some(0xe000_0000), None)
    );

    vm.place(a.bar, Some(0xe100_0000)).unwrap();

    assert_eq!(
        (vm.mapped_at(a), vm.mapped_at(b)),
        (Some(0xe100_0000), Some(0xe000_0000))
    );
}

/// Decode off of a function whose two BARs sit on each other: told together, the waiting BAR
/// is not mapped in between (a map of a revoked dmabuf, which `FakeIommu` refuses as the kernel
/// would with ENODEV).
#[test]
fn bars_that_stop_decoding_together_map_nothing_in_between() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let b = area(dev(1), 4, 0);
    let _b1 = vm.add_dmabuf(a, MIB);
    let _b2 = vm.add_dmabuf(b, MIB);
    vm.decode(dev(1), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.place(b.bar, Some(0xe000_0000)).unwrap();
    assert_eq!(
        (vm.mapped_at(a), vm.mapped_at(b)),
        (Some(0xe000_0000), None)
    );

    vm.fake.set_decode(dev(1), false);
    vm.table
        .bars_moved(&[
            (a.bar, BarPlacement::DecodeOff),
            (b.bar, BarPlacement::DecodeOff),
        ])
        .unwrap();

    assert_eq!((vm.mapped_at(a), vm.mapped_at(b)), (None, None));
    assert_eq!(vm.table.placement(b.bar), Some(BarPlacement::DecodeOff));
}

#[test]
fn a_batch_with_an_unknown_bar_changes_nothing() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _b1 = vm.add_dmabuf(a, MIB);
    vm.decode(dev(1), true);

    let e = vm
        .table
        .bars_moved(&[
            (a.bar, BarPlacement::Placed(0xe000_0000)),
            (bar(dev(1), 5), BarPlacement::Placed(0xe010_0000)),
        ])
        .unwrap_err();

    assert!(matches!(e, P2pError::UnknownBar { .. }), "{e}");
    assert_eq!(vm.mapped_at(a), None);
    assert_eq!(vm.table.placement(a.bar), Some(BarPlacement::Unplaced));
}

#[test]
fn removing_a_device_lets_a_blocked_peer_map() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let b = area(dev(2), 2, 0);
    let _b1 = vm.add_dmabuf(a, MIB);
    let _b2 = vm.add_dmabuf(b, MIB);
    vm.decode(dev(1), true);
    vm.decode(dev(2), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.place(b.bar, Some(0xe000_0000)).unwrap();

    vm.table.remove_device(dev(1));

    assert_eq!(vm.mapped_at(b), Some(0xe000_0000));
}

#[test]
fn type1_maps_the_bar_mmap_by_address_and_releases_it_on_removal() {
    let vm = Vm::new(BackendKind::Type1);
    let a = area(
        DeviceKey::Group {
            group: 5,
            bdf: "0000:00:03.0".parse().unwrap(),
        },
        2,
        0,
    );
    let mapping = Arc::new(RegionMapping::anonymous(MIB).unwrap());
    vm.join(a.bar.device);
    vm.table
        .register(a, BarBacking::Mmap(mapping.clone()), MIB)
        .unwrap();
    vm.place(a.bar, Some(0xe000_0000)).unwrap();

    vm.decode(a.bar.device, true);

    let live = vm.fake.live_at(0xe000_0000).unwrap();
    assert_eq!(live.source, FakeSource::HostVa(mapping.host_va()));
    vm.table.remove_device(a.bar.device);
    assert!(vm.fake.live().is_empty());
    assert_eq!(Arc::strong_count(&mapping), 1);
}

#[test]
fn a_backing_the_backend_cannot_map_is_rejected() {
    let vm = Vm::new(BackendKind::Type1);
    let (_reader, writer) = pipe().unwrap();
    vm.join(dev(1));

    let err = vm
        .table
        .register(area(dev(1), 2, 0), BarBacking::Dmabuf(writer.into()), MIB)
        .unwrap_err();

    assert!(matches!(
        err,
        P2pError::BackingMismatch {
            backend: BackendKind::Type1,
            ..
        }
    ));
}

#[test]
fn bookkeeping_errors_name_the_entry() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    let (_reader, writer) = pipe().unwrap();

    let dup = vm
        .table
        .register(a, BarBacking::Dmabuf(writer.into()), MIB)
        .unwrap_err();
    let unknown = vm.place(bar(dev(1), 4), Some(0xe000_0000)).unwrap_err();
    let (_reader, writer) = pipe().unwrap();
    let stranger = vm
        .table
        .register(area(dev(9), 2, 0), BarBacking::Dmabuf(writer.into()), MIB)
        .unwrap_err();

    assert!(matches!(dup, P2pError::DuplicateKey { .. }));
    assert!(matches!(stranger, P2pError::UnknownDevice { .. }));
    assert_eq!(
        unknown.to_string(),
        "vfio cdev 0x2d:1 BAR4 has no P2P areas in the table"
    );
}

#[test]
fn two_domains_map_only_their_own_members() {
    let g0 = Vm::new(BackendKind::Iommufd);
    let g1 = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let b = area(dev(2), 2, 0);
    let _a = g0.add_dmabuf(a, MIB);
    let _b = g1.add_dmabuf(b, MIB);
    for (vm, key, base) in [(&g0, a, 0xe000_0000), (&g1, b, 0xe100_0000)] {
        vm.decode(key.bar.device, true);
        vm.place(key.bar, Some(base)).unwrap();
    }

    assert_eq!(g0.fake.live().len(), 1);
    assert!(g0.fake.live_at(0xe000_0000).is_some());
    assert!(g0.fake.live_at(0xe100_0000).is_none());
    assert!(g1.fake.live_at(0xe000_0000).is_none());
    assert!(matches!(
        g0.table.bar_moved(b.bar, BarPlacement::Placed(0xe200_0000)),
        Err(P2pError::UnknownBar { .. })
    ));
}

#[test]
fn a_group_reaches_its_members_and_nothing_of_another_group() {
    let g0 = Vm::named("g0", FakeIommu::new(BackendKind::Iommufd));
    let g1 = Vm::named("g1", FakeIommu::new(BackendKind::Iommufd));
    let members = [area(dev(1), 2, 0), area(dev(2), 0, 0)];
    let outsider = area(dev(3), 2, 0);
    let _bufs: Vec<_> = members.iter().map(|&k| g0.add_dmabuf(k, MIB)).collect();
    let _out = g1.add_dmabuf(outsider, MIB);
    for (i, key) in members.iter().enumerate() {
        g0.decode(key.bar.device, true);
        g0.place(key.bar, Some(0xe000_0000 + i as u64 * MIB))
            .unwrap();
    }
    g1.decode(dev(3), true);
    g1.place(outsider.bar, Some(0xe800_0000)).unwrap();

    // The fakes panic on a map of a non-member's dmabuf; here, check what each domain holds.
    let iovas = |vm: &Vm| vm.fake.live().iter().map(|m| m.iova).collect::<Vec<_>>();
    assert_eq!(iovas(&g0), vec![0xe000_0000, 0xe010_0000]);
    assert_eq!(iovas(&g1), vec![0xe800_0000]);

    g0.table.remove_device(dev(1));
    assert_eq!(iovas(&g0), vec![0xe010_0000]);
    assert_eq!(iovas(&g1), vec![0xe800_0000], "another domain is untouched");
}

#[test]
fn each_placement_change_maps_or_unmaps_as_the_observer_says() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    let tell = |placement| vm.table.bar_moved(a.bar, placement).unwrap();
    vm.fake.set_decode(dev(1), true);

    tell(BarPlacement::Placed(0xe000_0000));
    assert_eq!(vm.fake.take_events(), vec![map(0xe000_0000, MIB)]);
    vm.fake.set_decode(dev(1), false);
    tell(BarPlacement::DecodeOff);
    assert_eq!(vm.fake.take_events(), vec![unmap(0xe000_0000, MIB)]);
    vm.fake.set_decode(dev(1), true);
    tell(BarPlacement::Placed(0xe000_0000));
    assert_eq!(vm.fake.take_events(), vec![map(0xe000_0000, MIB)]);
    tell(BarPlacement::Placed(0xe100_0000));
    assert_eq!(
        vm.fake.take_events(),
        vec![unmap(0xe000_0000, MIB), map(0xe100_0000, MIB)]
    );
    // The guest sizes the BAR: no address while it does.
    tell(BarPlacement::Unplaced);
    assert_eq!(vm.fake.take_events(), vec![unmap(0xe100_0000, MIB)]);
    tell(BarPlacement::DecodeOff);
    assert!(vm.fake.take_events().is_empty());
    assert!(vm.fake.live().is_empty());
}

#[test]
fn removing_every_device_leaves_nothing_mapped_or_listed() {
    let vm = Vm::new(BackendKind::Iommufd);
    let keys = [area(dev(1), 0, 0), area(dev(1), 2, 0), area(dev(2), 2, 0)];
    let _bufs: Vec<_> = keys.iter().map(|&k| vm.add_dmabuf(k, MIB)).collect();
    for (i, key) in keys.iter().enumerate() {
        vm.decode(key.bar.device, true);
        vm.place(key.bar, Some(0xe000_0000 + i as u64 * MIB))
            .unwrap();
    }
    assert_eq!(vm.fake.live().len(), 3);

    vm.table.remove_device(dev(1));
    vm.table.remove_device(dev(2));

    assert!(vm.fake.live().is_empty());
    assert!(vm.table.rows().is_empty());
    vm.join(dev(1)); // its name is free again
}
