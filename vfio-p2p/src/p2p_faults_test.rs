//! Host faults as the table meets them (the lab's tests/faults.rs produces each with the real
//! kernel): a BAR the host IOMMU cannot reach, a map the kernel refuses or runs out of memory
//! for, a revoked dmabuf. Each leaves the area unmapped with the reason in its row, maps nothing
//! half, and maps again once the cause is gone.

use super::*;
use crate::p2p_rows::P2pAreaState;

/// The lab's emulated VT-d: 39 bits, as QEMU 7.2's intel-iommu translates by default.
const HOST_39_BITS: u64 = (1 << 39) - 1;
/// A 64-bit guest window of 512 GiB from 256 GiB: its upper half is beyond 39 bits.
const WIDE_WINDOW: IovaRange = IovaRange {
    start: 256 << 30,
    last: (768 << 30) - 1,
};

fn wide_vm() -> Vm {
    let host = vec![IovaRange {
        start: 0,
        last: HOST_39_BITS,
    }];
    Vm::build(
        "g0",
        FakeIommu::with_ranges(BackendKind::Iommufd, host),
        &[WIDE_WINDOW],
    )
}

fn state(vm: &Vm) -> P2pAreaState {
    vm.table.rows()[0].state.clone()
}

#[test]
fn a_bar_beyond_the_host_iommu_is_refused_before_the_kernel_and_maps_once_back_in_reach() {
    let vm = wide_vm();
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, 64 * MIB);
    vm.decode(dev(1), true);
    vm.place(a.bar, Some(256 << 30)).unwrap();
    assert_eq!(vm.fake.take_events(), vec![map(256 << 30, 64 * MIB)]);

    // Inside the guest window, past the IOMMU's last IOVA: no ioctl, the row says why.
    vm.place(a.bar, Some(1 << 39)).unwrap();
    assert_eq!(vm.fake.take_events(), vec![unmap(256 << 30, 64 * MIB)]);
    assert_eq!(
        state(&vm),
        P2pAreaState::Failed("beyond the host IOMMU's reach (max IOVA 0x7fffffffff)".into())
    );
    // Straddling the limit is beyond it too.
    vm.place(a.bar, Some((1 << 39) - 32 * MIB)).unwrap();
    assert!(vm.fake.take_events().is_empty());
    assert!(matches!(state(&vm), P2pAreaState::Failed(why) if why.starts_with("beyond")));

    vm.place(a.bar, Some(257 << 30)).unwrap();
    assert_eq!(vm.fake.take_events(), vec![map(257 << 30, 64 * MIB)]);
    assert_eq!(state(&vm), P2pAreaState::Mapped);
}

#[test]
fn a_hole_in_the_host_ranges_is_not_called_beyond_reach() {
    let host = vec![
        IovaRange {
            start: 0,
            last: 0xfedf_ffff,
        },
        IovaRange {
            start: 0xfef0_0000,
            last: HOST_39_BITS,
        },
    ];
    let fake = Arc::new(FakeIommu::with_ranges(BackendKind::Iommufd, host));
    let window = IovaRange {
        start: 0xc000_0000,
        last: 0xffff_ffff,
    };
    let vm = Vm {
        table: P2pTable::new("g0", fake.clone(), &[window]),
        fake,
        bases: Mutex::default(),
        decoding: Mutex::default(),
    };
    let a = area(dev(1), 0, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.decode(dev(1), true);

    vm.place(a.bar, Some(0xfee0_0000)).unwrap();

    assert!(vm.fake.events().is_empty());
    assert_eq!(
        state(&vm),
        P2pAreaState::Failed("in a reserved hole of the host IOMMU's IOVA ranges".into())
    );
}

#[test]
fn without_the_host_ranges_the_kernels_refusal_is_the_reason_until_the_bar_moves() {
    let vm = wide_vm();
    vm.fake.hide_ranges();
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, 64 * MIB);
    vm.decode(dev(1), true);

    // The fake refuses maps outside its ranges with EINVAL, as iommufd does (reserved IOVA).
    vm.place(a.bar, Some(1 << 39)).unwrap();
    assert!(vm.fake.live().is_empty());
    assert_eq!(
        state(&vm),
        P2pAreaState::Failed("IOMMU map: Invalid argument (os error 22)".into())
    );

    vm.place(a.bar, Some(256 << 30)).unwrap();
    assert_eq!(state(&vm), P2pAreaState::Mapped);
    assert_eq!(vm.fake.live().len(), 1);
}

#[test]
fn an_enomem_map_leaves_nothing_mapped_and_the_next_decode_toggle_maps_again() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.decode(dev(1), true);
    vm.fake.take_events();

    vm.decode(dev(1), false);
    vm.fake.fail_next_maps(&[libc::ENOMEM]);
    vm.decode(dev(1), true);
    assert!(vm.fake.live().is_empty());
    let enomem = P2pAreaState::Failed("IOMMU map: Cannot allocate memory (os error 12)".into());
    assert_eq!(state(&vm), enomem);
    // Not retried behind the guest's back on unrelated changes...
    let b = area(dev(2), 2, 0);
    let _b = vm.add_dmabuf(b, MIB);
    vm.decode(dev(2), true);
    assert_eq!(state(&vm), enomem);

    // ...but on the next decode toggle of its own device.
    vm.decode(dev(1), false);
    assert_eq!(state(&vm), P2pAreaState::DecodeOff);
    vm.decode(dev(1), true);
    assert_eq!(state(&vm), P2pAreaState::Mapped);
    assert_eq!(vm.fake.live_at(0xe000_0000).map(|m| m.size), Some(MIB));
}

#[test]
fn a_revoked_dmabuf_is_shown_and_mapped_again_once_its_device_decodes() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.decode(dev(1), true);
    vm.decode(dev(1), false);

    // The kernel revoked it (ENODEV) although the table believed the device decoded.
    vm.fake.fail_next_maps(&[libc::ENODEV]);
    vm.decode(dev(1), true);
    assert_eq!(state(&vm), P2pAreaState::Revoked);
    assert!(vm.fake.live().is_empty());

    vm.decode(dev(1), false);
    vm.decode(dev(1), true);
    assert_eq!(state(&vm), P2pAreaState::Mapped);
}

#[test]
fn warnings_name_the_device_by_id_host_address_and_bar() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0x1000);
    let _buf = vm.add_dmabuf(a, MIB);
    let inner = vm.table.lock();
    assert_eq!(inner.label(&a), "dev (0000:00:02.0) BAR2 +0x1000");
    // A key of no registered device still names what it can.
    let stray = area(dev(9), 4, 0);
    assert_eq!(inner.label(&stray), stray.to_string());
}

#[test]
fn a_device_out_of_d0_is_unmapped_and_shown_revoked_then_mapped_where_it_is_on_return() {
    let vm = Vm::new(BackendKind::Iommufd);
    let (a, b) = (area(dev(1), 2, 0), area(dev(2), 2, 0));
    let _bufs = (vm.add_dmabuf(a, MIB), vm.add_dmabuf(b, MIB));
    vm.decode(dev(1), true);
    vm.decode(dev(2), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.place(b.bar, Some(0xe100_0000)).unwrap();
    vm.fake.take_events();

    vm.table.set_low_power(dev(1), true);
    assert_eq!(vm.fake.take_events(), vec![unmap(0xe000_0000, MIB)]);
    let states: Vec<_> = vm.table.rows().into_iter().map(|r| r.state).collect();
    assert_eq!(states, vec![P2pAreaState::Revoked, P2pAreaState::Mapped]);
    // Nothing maps it while it is out of D0, not even a move; the move is remembered.
    vm.place(a.bar, Some(0xe200_0000)).unwrap();
    assert!(vm.fake.take_events().is_empty());
    assert_eq!(state(&vm), P2pAreaState::Revoked);
    vm.table.set_low_power(dev(1), true);
    assert!(vm.fake.take_events().is_empty());

    vm.table.set_low_power(dev(1), false);
    assert_eq!(vm.fake.take_events(), vec![map(0xe200_0000, MIB)]);
    assert_eq!(state(&vm), P2pAreaState::Mapped);
}

#[test]
fn a_reset_brings_a_device_out_of_d3hot_back_mapped() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.decode(dev(1), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.table.set_low_power(dev(1), true);
    assert_eq!(vm.mapped_at(a), None);

    vm.table.device_reset(dev(1), || ());

    assert_eq!(vm.mapped_at(a), Some(0xe000_0000));
}

#[test]
fn a_device_out_of_d0_with_decoding_off_is_decode_off() {
    let vm = Vm::new(BackendKind::Iommufd);
    let a = area(dev(1), 2, 0);
    let _buf = vm.add_dmabuf(a, MIB);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.table.set_low_power(dev(1), true);
    assert_eq!(state(&vm), P2pAreaState::DecodeOff);
    // An unknown device is ignored.
    vm.table.set_low_power(dev(7), true);
}

#[test]
fn a_refused_decode_off_leaves_the_revoked_areas_shown_until_the_next_toggle() {
    let vm = Vm::new(BackendKind::Iommufd);
    let (a, b) = (area(dev(1), 2, 0), area(dev(2), 2, 0));
    let _bufs = (vm.add_dmabuf(a, MIB), vm.add_dmabuf(b, MIB));
    vm.decode(dev(1), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.fake.take_events();

    vm.table.decode_bounced(dev(1));
    assert_eq!(vm.fake.take_events(), vec![unmap(0xe000_0000, MIB)]);
    assert_eq!(state(&vm), P2pAreaState::Revoked);
    // Not mapped again behind the guest's back: the dmabuf's old attachment is dead, and the
    // table waits for the guest's next change of this BAR.
    vm.decode(dev(2), true);
    assert!(vm.fake.take_events().is_empty());

    vm.decode(dev(1), false);
    vm.decode(dev(1), true);
    assert_eq!(vm.fake.take_events(), vec![map(0xe000_0000, MIB)]);
    assert_eq!(state(&vm), P2pAreaState::Mapped);
}

#[test]
fn a_refused_decode_off_changes_nothing_on_type1() {
    let vm = Vm::new(BackendKind::Type1);
    vm.join(dev(1));
    let a = area(dev(1), 2, 0);
    let mapping = Arc::new(RegionMapping::anonymous(MIB).unwrap());
    vm.table
        .register(a, BarBacking::Mmap(mapping), MIB)
        .unwrap();
    vm.decode(dev(1), true);
    vm.place(a.bar, Some(0xe000_0000)).unwrap();
    vm.fake.take_events();

    vm.table.decode_bounced(dev(1));

    assert!(vm.fake.take_events().is_empty());
    assert_eq!(state(&vm), P2pAreaState::Mapped);
}
