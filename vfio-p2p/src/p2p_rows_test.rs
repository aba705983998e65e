//! Tests of what the user sees of a table (`rows`) and of `add_device`'s
//! handling of areas that cannot be exported, with a stand-in device.

use std::cell::Cell;
use std::io;

use super::*;
use crate::p2p::{EXPORT_DISABLED, NO_EXPORT};
use crate::p2p_rows::P2pRow;

/// What a stand-in area's export (iommufd) or mmap (type1) gives.
#[derive(Clone, Copy)]
enum Gives {
    Backing,
    /// The kernel cannot export (export: `Ok(None)`).
    Nothing,
    Errno(i32),
}

/// A device for [`P2pTable::add_from`]: areas and what exporting or mmapping each gives.
struct FakeDevice<'a> {
    fake: &'a FakeIommu,
    key: DeviceKey,
    areas: Vec<(BarArea, Gives)>,
    exports: Cell<usize>,
}

impl<'a> FakeDevice<'a> {
    fn new(vm: &'a Vm, n: u64, areas: &[(u32, u64, u64, Gives)]) -> Self {
        vm.fake.attach(dev(n));
        Self {
            fake: &vm.fake,
            key: dev(n),
            areas: areas
                .iter()
                .map(|&(region, offset, size, gives)| {
                    (
                        BarArea {
                            region,
                            offset,
                            size,
                        },
                        gives,
                    )
                })
                .collect(),
            exports: Cell::new(0),
        }
    }

    fn gives(&self, area: &BarArea) -> Gives {
        let found = self.areas.iter().find(|(a, _)| a == area);
        found.map_or(Gives::Nothing, |(_, g)| *g)
    }
}

impl AreaSource for FakeDevice<'_> {
    fn key(&self) -> DeviceKey {
        self.key
    }

    fn bdf(&self) -> Bdf {
        "0000:00:04.0".parse().unwrap()
    }

    fn p2p_areas(&self) -> Vec<BarArea> {
        self.areas.iter().map(|(a, _)| *a).collect()
    }

    fn export_dmabuf(&self, area: &BarArea) -> Result<Option<OwnedFd>, DeviceError> {
        self.exports.set(self.exports.get() + 1);
        match self.gives(area) {
            Gives::Backing => {
                let (_reader, writer) = pipe().unwrap();
                let fd = OwnedFd::from(writer);
                self.fake.register_dmabuf(fd.as_fd(), self.key);
                Ok(Some(fd))
            }
            Gives::Nothing => Ok(None),
            Gives::Errno(errno) => Err(DeviceError::Dmabuf {
                bdf: self.bdf(),
                region: area.region,
                source: io::Error::from_raw_os_error(errno),
            }),
        }
    }

    fn mmap(&self, area: &BarArea) -> Result<RegionMapping, DeviceError> {
        match self.gives(area) {
            Gives::Backing => Ok(RegionMapping::anonymous(area.size).unwrap()),
            Gives::Nothing | Gives::Errno(_) => Err(DeviceError::Mmap {
                bdf: self.bdf(),
                region: area.region,
                offset: area.offset,
                len: area.size,
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            }),
        }
    }
}

fn states(vm: &Vm) -> Vec<P2pAreaState> {
    vm.table.rows().into_iter().map(|r| r.state).collect()
}

fn failed(why: &str) -> P2pAreaState {
    P2pAreaState::Failed(why.into())
}

#[test]
fn rows_show_each_area_state_and_why() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _a = vm.add_dmabuf(a, MIB);
    let state = |vm: &Vm| vm.table.rows()[0].state.clone();
    assert_eq!(state(&vm), P2pAreaState::Unplaced);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    assert_eq!(state(&vm), P2pAreaState::DecodeOff);
    vm.decode(dev(1), true);
    assert_eq!(state(&vm), P2pAreaState::Mapped);
    assert_eq!(
        vm.table.rows()[0].guest,
        Some((0xe000_0000, 0xe000_0000 + MIB - 1))
    );
    vm.place(a.bar, Some(0x1000_0000)).unwrap(); // guest RAM, outside the MMIO windows
    assert_eq!(state(&vm), failed("outside the guest MMIO windows"));
    vm.place(a.bar, Some(0xe000_0800)).unwrap();
    assert_eq!(state(&vm), failed("not page-aligned"));
    vm.place(a.bar, None).unwrap();
    assert_eq!(state(&vm), P2pAreaState::Unplaced);
    assert_eq!(vm.table.rows()[0].guest, None);
    assert_eq!(vm.table.rows()[0].domain, "g0");
    assert_eq!(vm.table.rows()[0].mechanism, P2pMechanism::Dmabuf);
}

#[test]
fn a_bar_its_bridge_does_not_forward_is_unmapped_and_says_why() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _a = vm.add_dmabuf(a, MIB);
    vm.decode(dev(1), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    assert_eq!(vm.mapped_at(a), Some(0xe000_0000));

    // Moved inside the host window but outside the bridge's windows (bar-walk found peers
    // still reaching it there).
    vm.table
        .bar_moved(a.bar, BarPlacement::Unforwarded(0xe010_0000))
        .unwrap();

    assert_eq!(vm.mapped_at(a), None);
    assert!(vm.fake.live_at(0xe000_0000).is_none() && vm.fake.live_at(0xe010_0000).is_none());
    let row = &vm.table.rows()[0];
    assert_eq!(row.state, failed("outside its bridge's windows"));
    assert_eq!(row.guest, Some((0xe010_0000, 0xe010_0000 + MIB - 1)));
    vm.table
        .bar_moved(a.bar, BarPlacement::Placed(0xe010_0000))
        .unwrap();
    assert_eq!(vm.mapped_at(a), Some(0xe010_0000));
}

#[test]
fn a_bar_placed_on_a_mapped_one_fails_until_it_moves() {
    let vm = Vm::new(BackendKind::Iommufd);
    let (a, b) = (area(dev(1), 2, 0), area(dev(2), 2, 0));
    let _bufs = (vm.add_dmabuf(a, MIB), vm.add_dmabuf(b, MIB));
    vm.decode(dev(1), true);
    vm.decode(dev(2), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();

    vm.place(b.bar, Some(0xe000_0000)).unwrap();
    assert_eq!(
        states(&vm),
        vec![P2pAreaState::Mapped, failed("another BAR is mapped there")]
    );

    vm.place(b.bar, Some(0xe100_0000)).unwrap();
    assert_eq!(states(&vm), vec![P2pAreaState::Mapped; 2]);
}

#[test]
fn a_map_refused_with_enodev_is_a_revoked_dmabuf_and_others_show_the_errno() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.decode(dev(1), true);

    vm.fake.fail_next_maps(&[libc::ENODEV]);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    assert_eq!(states(&vm), vec![P2pAreaState::Revoked]);
    assert_eq!(P2pAreaState::Revoked.to_string(), "revoked");

    vm.fake.fail_next_maps(&[libc::ENOSPC]);
    vm.place(a.bar, Some(0xe100_0000)).unwrap();
    let P2pAreaState::Failed(why) = &states(&vm)[0] else {
        panic!("{:?}", states(&vm));
    };
    assert_eq!(why, "IOMMU map: No space left on device (os error 28)");

    vm.place(a.bar, Some(0xe200_0000)).unwrap();
    assert_eq!(states(&vm), vec![P2pAreaState::Mapped]);
}

#[test]
fn areas_without_a_dmabuf_stay_listed_as_failed_with_the_reason() {
    let vm = Vm::new(BackendKind::Iommufd);
    let device = FakeDevice::new(
        &vm,
        1,
        &[
            (0, 0, MIB, Gives::Backing),
            (2, 0, 64 * MIB, Gives::Nothing),
            (4, 0, MIB, Gives::Errno(libc::EPERM)),
        ],
    );

    let keys = vm.table.add_from(&device, "gpu0").unwrap();
    vm.decode(dev(1), true);
    for key in &keys {
        let base = 0xe000_0000 + u64::from(key.bar.region) * 64 * MIB;
        vm.place(key.bar, Some(base)).unwrap();
    }

    let rows = vm.table.rows();
    assert_eq!(keys.len(), 3);
    assert_eq!(rows[0].state, P2pAreaState::Mapped);
    assert_eq!(rows[1].state, failed(NO_EXPORT));
    assert_eq!(
        rows[2].state,
        failed("dmabuf export: Operation not permitted (os error 1)")
    );
    assert_eq!(vm.fake.live().len(), 1, "only the exported area is mapped");
    assert!(rows.iter().all(|r| r.device_id == "gpu0"));
    assert_eq!(rows[1].host_bdf.to_string(), "0000:00:04.0");
    assert_eq!(rows[1].guest, Some((0xe800_0000, 0xebff_ffff)));
    // Decode off, reset: an area with no dmabuf still says why, not "decode off".
    vm.decode(dev(1), false);
    vm.table.device_reset(dev(1), || ());
    assert_eq!(vm.table.rows()[1].state, failed(NO_EXPORT));
    assert_eq!(vm.table.rows()[0].state, P2pAreaState::DecodeOff);
}

#[test]
fn with_dmabuf_export_off_nothing_is_exported_and_every_area_says_so() {
    let fake = Arc::new(FakeIommu::new(BackendKind::Iommufd));
    let mut table = P2pTable::new("g0", fake.clone(), &WINDOWS);
    table.set_dmabuf_export(false);
    let vm = Vm {
        fake,
        table,
        bases: Mutex::default(),
        decoding: Mutex::default(),
    };
    let device = FakeDevice::new(&vm, 1, &[(2, 0, MIB, Gives::Backing)]);

    let keys = vm.table.add_from(&device, "shm").unwrap();
    vm.decode(dev(1), true);
    vm.place(keys[0].bar, Some(0xe000_0000)).unwrap();

    assert_eq!(device.exports.get(), 0);
    assert_eq!(states(&vm), vec![failed(EXPORT_DISABLED)]);
    assert!(vm.fake.live().is_empty());
}

#[test]
fn type1_areas_are_legacy_and_a_failed_mmap_is_shown() {
    let vm = Vm::new(BackendKind::Type1);
    let device = FakeDevice::new(
        &vm,
        1,
        &[(0, 0, MIB, Gives::Backing), (2, 0, MIB, Gives::Nothing)],
    );

    let keys = vm.table.add_from(&device, "nic0").unwrap();
    vm.decode(dev(1), true);
    for (i, key) in keys.iter().enumerate() {
        vm.place(key.bar, Some(0xe000_0000 + i as u64 * MIB))
            .unwrap();
    }

    let rows = vm.table.rows();
    assert_eq!(
        device.exports.get(),
        0,
        "type1 maps BAR mmaps, it exports nothing"
    );
    assert!(rows.iter().all(|r| r.mechanism == P2pMechanism::Legacy));
    assert_eq!(rows[0].state, P2pAreaState::Mapped);
    assert_eq!(
        rows[1].state,
        failed("BAR mmap: Cannot allocate memory (os error 12)")
    );
}

#[test]
fn adding_a_device_is_all_or_nothing() {
    let vm = Vm::new(BackendKind::Type1);
    // The second area is not a whole number of pages: a bookkeeping error.
    let bad = FakeDevice::new(
        &vm,
        1,
        &[(0, 0, MIB, Gives::Backing), (2, 0, 0x800, Gives::Backing)],
    );
    let good = FakeDevice::new(&vm, 1, &[(0, 0, MIB, Gives::Backing)]);

    let err = vm.table.add_from(&bad, "x").unwrap_err();
    assert!(matches!(err, P2pError::InvalidSize { size: 0x800, .. }));
    assert!(vm.table.is_empty());
    assert!(vm.table.rows().is_empty());

    vm.table.add_from(&good, "x").unwrap();
    assert!(matches!(
        vm.table.add_from(&good, "x"),
        Err(P2pError::DeviceExists { .. })
    ));
    assert_eq!(
        vm.table.len(),
        1,
        "a second add leaves the first one's areas"
    );
}

#[test]
fn the_rows_list_every_area_with_where_the_guest_sees_it() {
    let vm = Vm::named("gpus", FakeIommu::new(BackendKind::Iommufd));
    let device = FakeDevice::new(
        &vm,
        1,
        &[
            (0, 0, 16 << 30, Gives::Backing),
            (2, 0x3000, MIB, Gives::Nothing),
        ],
    );
    let keys = vm.table.add_from(&device, "gpu0").unwrap();
    vm.decode(dev(1), true);
    vm.place(keys[0].bar, Some(1 << 36)).unwrap();

    let rows = vm.table.rows();

    assert_eq!(rows.len(), 2, "{rows:?}");
    let first = &rows[0];
    assert_eq!(
        (first.domain.as_str(), first.device_id.as_str(), first.bar),
        ("gpus", "gpu0", 0)
    );
    assert_eq!(first.host_bdf.to_string(), "0000:00:04.0");
    assert_eq!(first.size, 16 << 30);
    assert_eq!(first.guest, Some((1 << 36, (1 << 36) + (16 << 30) - 1)));
    assert_eq!(first.mechanism, P2pMechanism::Dmabuf);
    assert_eq!(first.state.to_string(), "mapped");
    let second = &rows[1];
    assert_eq!(
        (second.bar, second.area_offset, second.size),
        (2, 0x3000, MIB)
    );
    assert_eq!(second.state.to_string(), format!("failed: {NO_EXPORT}"));
}

#[test]
fn rows_can_be_served_as_json() {
    fn serializable<T: serde::Serialize>() {}
    serializable::<P2pRow>();
    serializable::<P2pAreaState>();
    serializable::<P2pMechanism>();
}
