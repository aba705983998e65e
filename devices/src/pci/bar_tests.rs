use std::sync::{Arc, Mutex};

use super::*;
use crate::pci::config::BarDef;
use crate::pci::fake::{FakeBarObserver, FakeEndpoint};
use crate::pci::regs::{ROM_ADDRESS_ENABLE, ROM_ADDRESS_MASK};

const MEM32: BarInfo = BarInfo {
    kind: BarKind::Mem32,
    prefetchable: false,
    size: 0x1000,
    address: 0xc000_0000,
    sizing: [false; 2],
};
const BDF: Bdf = Bdf::new(1, 0, 0);

fn write32(device: &SharedPciDevice, offset: u16, value: u32) {
    lock(device).write_config(offset, &value.to_le_bytes());
}

/// An endpoint with a 4 KiB 32-bit BAR 0 at 0xc000_0000 and a 1 GiB 64-bit prefetchable BAR 2
/// at 0x40_0000_0000, decoding nothing yet.
fn endpoint() -> SharedPciDevice {
    let dev = FakeEndpoint::with_bars(
        "ep",
        &[
            (0, BarDef::mem32(0x1000)),
            (2, BarDef::mem64(1 << 30, true)),
        ],
    )
    .unwrap();
    let dev: SharedPciDevice = Arc::new(Mutex::new(dev));
    write32(&dev, BAR0, 0xc000_0000);
    write32(&dev, BAR0 + 8, 0);
    write32(&dev, BAR0 + 12, 0x40);
    dev
}

const ROM_SIZE: u64 = 0x1_0000;
const ROM_AT: u32 = 0xc010_0000;

/// [`endpoint`] plus a 64 KiB expansion ROM assigned at `ROM_AT`, not enabled.
fn endpoint_with_rom() -> SharedPciDevice {
    let mut dev = FakeEndpoint::with_bars(
        "ep-rom",
        &[
            (0, BarDef::mem32(0x1000)),
            (2, BarDef::mem64(1 << 30, true)),
        ],
    )
    .unwrap();
    dev.config.add_rom(ROM_SIZE).unwrap();
    let dev: SharedPciDevice = Arc::new(Mutex::new(dev));
    write32(&dev, BAR0, 0xc000_0000);
    write32(&dev, BAR0 + 12, 0x40);
    write32(&dev, ROM_ADDRESS, ROM_AT);
    dev
}

fn rom_register(
    device: &SharedPciDevice,
    observer: &dyn BarObserver,
    value: u32,
) -> Result<Vec<BarChange>, BarRejected> {
    update_decode(device, BDF, observer, |d| {
        d.write_config(ROM_ADDRESS, &value.to_le_bytes())
    })
}

fn command(
    device: &SharedPciDevice,
    observer: &dyn BarObserver,
    value: u16,
) -> Result<Vec<BarChange>, BarRejected> {
    update_decode(device, BDF, observer, |d| {
        d.write_config(COMMAND, &value.to_le_bytes())
    })
}

#[test]
fn decoded_range_needs_the_enable_bit_of_its_space() {
    assert_eq!(MEM32.decoded_range(0), None);
    assert_eq!(MEM32.decoded_range(COMMAND_IO), None);
    assert_eq!(
        MEM32.decoded_range(COMMAND_MEMORY),
        Some(BusRange::new(0xc000_0000, 0x1000))
    );
    let io = BarInfo {
        kind: BarKind::Io,
        size: 0x20,
        address: 0x1000,
        ..MEM32
    };
    assert_eq!(io.decoded_range(COMMAND_MEMORY), None);
    assert_eq!(
        io.decoded_range(COMMAND_IO),
        Some(BusRange::new(0x1000, 0x20))
    );
}

#[test]
fn unassigned_bars_decode_nothing() {
    let bar = BarInfo {
        address: 0,
        ..MEM32
    };
    assert_eq!(bar.decoded_range(COMMAND_MEMORY), None);
}

#[test]
fn a_sizing_write_in_either_register_decodes_nothing() {
    let sizing32 = BarInfo {
        address: 0xffff_f000,
        sizing: [true, false],
        ..MEM32
    };
    assert_eq!(sizing32.decoded_range(COMMAND_MEMORY), None);
    let bar64 = BarInfo {
        kind: BarKind::Mem64,
        size: 0x10_0000,
        // High half sized, low half holding its address.
        address: 0xffff_ffff_c000_0000,
        sizing: [false, true],
        ..MEM32
    };
    assert_eq!(bar64.decoded_range(COMMAND_MEMORY), None);
    let low_sized = BarInfo {
        address: 0x40_fff0_0000,
        sizing: [true, false],
        ..bar64
    };
    assert_eq!(low_sized.decoded_range(COMMAND_MEMORY), None);
}

/// Placements whose low register holds exactly the size mask: the last naturally aligned slot
/// below a 4 GiB boundary. Only the guest's writes tell them from sizing.
const MASK_LIKE_PLACEMENTS: [(BarKind, u64, u64); 3] = [
    (BarKind::Mem64, 64 << 20, 0x7f_fc00_0000),
    (BarKind::Mem64, 256 << 20, 0x3_f000_0000),
    (BarKind::Mem32, 256 << 20, 0xf000_0000),
];

#[test]
fn placements_that_read_like_the_size_mask_decode() {
    for (kind, size, address) in MASK_LIKE_PLACEMENTS {
        let bar = BarInfo {
            kind,
            prefetchable: kind == BarKind::Mem64,
            size,
            address,
            sizing: [false; 2],
        };
        assert_eq!(
            bar.decoded_range(COMMAND_MEMORY),
            Some(BusRange::new(address, size)),
            "{size:#x} at {address:#x}"
        );
    }
}

/// A function with one BAR 0 of `kind` and `size`, placed at `address` with memory decode on
/// (as firmware leaves it), and the observer that saw it.
fn placed(kind: BarKind, size: u64, address: u64) -> (SharedPciDevice, FakeBarObserver) {
    let def = match kind {
        BarKind::Mem64 => BarDef::mem64(size, true),
        _ => BarDef::mem32(size),
    };
    let dev: SharedPciDevice = FakeEndpoint::with_bars("ep", &[(0, def)]).unwrap().shared();
    let observer = FakeBarObserver::new();
    let write = |offset, value: u32| {
        update_decode(&dev, BDF, &observer, |d| {
            d.write_config(offset, &value.to_le_bytes())
        })
        .unwrap()
    };
    write(BAR0, address as u32);
    if kind == BarKind::Mem64 {
        write(BAR0 + 4, (address >> 32) as u32);
    }
    assert_eq!(command(&dev, &observer, COMMAND_MEMORY).unwrap().len(), 1);
    (dev, observer)
}

fn read32(device: &SharedPciDevice, offset: u16) -> u32 {
    let mut value = [0; 4];
    lock(device).read_config(offset, &mut value);
    u32::from_le_bytes(value)
}

#[test]
fn placed_bars_decode_where_their_low_register_reads_like_the_mask() {
    for (kind, size, address) in MASK_LIKE_PLACEMENTS {
        let (_dev, observer) = placed(kind, size, address);
        assert_eq!(
            observer.range_of(BDF, 0),
            Some(BusRange::new(address, size)),
            "{size:#x} at {address:#x}"
        );
    }
}

/// Linux's `__pci_read_base` on one register, decoding on (`mmio_always_on`): save, write ~0
/// (`PCI_ROM_ADDRESS_MASK` OR-ed in for the ROM), read the size, restore.
fn size_register(
    dev: &SharedPciDevice,
    observer: &FakeBarObserver,
    offset: u16,
    sizing: impl Fn(u32) -> u32,
) -> Vec<BarChange> {
    let old = read32(dev, offset);
    let mut changes = update_decode(dev, BDF, observer, |d| {
        d.write_config(offset, &sizing(old).to_le_bytes())
    })
    .unwrap();
    let _size = read32(dev, offset);
    changes.extend(
        update_decode(dev, BDF, observer, |d| {
            d.write_config(offset, &old.to_le_bytes())
        })
        .unwrap(),
    );
    changes
}

/// No change may map anything but the placed range, and the BAR must end up decoding there.
fn check_sizing_changes(changes: &[BarChange], range: BusRange, observer: &FakeBarObserver) {
    for change in changes {
        assert!(
            change.new.is_none() || change.new == Some(range),
            "{change}: mapped while sizing"
        );
    }
    assert_eq!(observer.range_of(BDF, 0), Some(range));
}

#[test]
fn linux_sizing_one_register_after_the_other_never_maps_the_mask() {
    let placements = MASK_LIKE_PLACEMENTS
        .into_iter()
        .chain([(BarKind::Mem32, 0x1000, 0xc000_0000)])
        .chain([(BarKind::Mem64, 1 << 30, 0x40_0000_0000)]);
    for (kind, size, address) in placements {
        let (dev, observer) = placed(kind, size, address);
        let mut changes = size_register(&dev, &observer, BAR0, |_| u32::MAX);
        if kind == BarKind::Mem64 {
            changes.extend(size_register(&dev, &observer, BAR0 + 4, |_| u32::MAX));
        }
        // Each sizing write unmaps the BAR and each restore maps it back.
        let registers = if kind == BarKind::Mem64 { 2 } else { 1 };
        assert_eq!(changes.len(), 2 * registers, "{size:#x} at {address:#x}");
        check_sizing_changes(&changes, BusRange::new(address, size), &observer);
    }
}

#[test]
fn sizing_both_halves_before_restoring_either_never_maps_the_mask() {
    // Newer kernels (`__pci_size_bars`) size both halves of a 64-bit BAR, then restore them.
    for restore_high_first in [false, true] {
        for (_, size, address) in MASK_LIKE_PLACEMENTS
            .into_iter()
            .filter(|p| p.0 == BarKind::Mem64)
        {
            let (dev, observer) = placed(BarKind::Mem64, size, address);
            let (low, high) = (read32(&dev, BAR0), read32(&dev, BAR0 + 4));
            let write = |offset, value: u32| {
                update_decode(&dev, BDF, &observer, |d| {
                    d.write_config(offset, &value.to_le_bytes())
                })
                .unwrap()
            };
            let mut changes = write(BAR0, u32::MAX);
            changes.extend(write(BAR0 + 4, u32::MAX));
            assert_eq!(read32(&dev, BAR0 + 4), !((size - 1) >> 32) as u32);
            let mut restores = [(BAR0, low), (BAR0 + 4, high)];
            if restore_high_first {
                restores.reverse();
            }
            let (first, second) = (restores[0], restores[1]);
            changes.extend(write(first.0, first.1));
            assert_eq!(observer.range_of(BDF, 0), None, "one half still sized");
            changes.extend(write(second.0, second.1));
            check_sizing_changes(&changes, BusRange::new(address, size), &observer);
        }
    }
}

#[test]
fn byte_wise_sizing_writes_count_once_every_byte_is_written() {
    let (dev, observer) = placed(BarKind::Mem32, 256 << 20, 0xf000_0000);
    for byte in 0..4 {
        update_decode(&dev, BDF, &observer, |d| {
            d.write_config(BAR0 + byte, &[0xff])
        })
        .unwrap();
    }
    assert!(lock(&dev).bars()[0].unwrap().is_sizing());
    assert_eq!(observer.range_of(BDF, 0), None);
    // Restoring only the top byte is a placement again.
    update_decode(&dev, BDF, &observer, |d| d.write_config(BAR0 + 3, &[0xf0])).unwrap();
    assert_eq!(
        observer.range_of(BDF, 0),
        Some(BusRange::new(0xf000_0000, 256 << 20))
    );
}

#[test]
fn a_rollback_keeps_a_bar_that_was_being_sized_sized() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    write32(&dev, BAR0, u32::MAX);
    observer.reject_when(|c| c.bar == 2);
    command(&dev, &observer, COMMAND_MEMORY).unwrap_err();
    let bar0 = lock(&dev).bars()[0].unwrap();
    assert!(bar0.is_sizing());
    assert_eq!(read32(&dev, BAR0), 0xffff_f000);
    // Decoding on now maps BAR 2 only; BAR 0 waits for its address.
    observer.reject_when(|_| false);
    assert_eq!(command(&dev, &observer, COMMAND_MEMORY).unwrap().len(), 1);
    assert_eq!(observer.range_of(BDF, 0), None);
    update_decode(&dev, BDF, &observer, |d| {
        d.write_config(BAR0, &0xc000_0000u32.to_le_bytes())
    })
    .unwrap();
    assert_eq!(
        observer.range_of(BDF, 0),
        Some(BusRange::new(0xc000_0000, 0x1000))
    );
}

#[test]
fn reset_ends_sizing() {
    let dev = endpoint();
    write32(&dev, BAR0, u32::MAX);
    write32(&dev, ROM_ADDRESS, u32::MAX);
    lock(&dev).reset();
    assert!(lock(&dev).bars()[0].is_some_and(|b| !b.is_sizing()));
}

#[test]
fn io_bars_beyond_64k_decode_nothing() {
    let io = BarInfo {
        kind: BarKind::Io,
        size: 0x20,
        address: 0x1_0000,
        ..MEM32
    };
    assert_eq!(io.decoded_range(COMMAND_IO), None);
}

#[test]
fn enabling_memory_decode_registers_every_memory_bar() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    let changes = command(&dev, &observer, COMMAND_MEMORY).unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(
        observer.range_of(BDF, 0),
        Some(BusRange::new(0xc000_0000, 0x1000))
    );
    assert_eq!(
        observer.range_of(BDF, 2),
        Some(BusRange::new(0x40_0000_0000, 1 << 30))
    );
    assert!(changes.iter().all(|c| c.old.is_none()));
}

#[test]
fn disabling_decode_unregisters_them() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    let changes = command(&dev, &observer, 0).unwrap();
    assert_eq!(changes.len(), 2);
    assert!(observer.live().is_empty());
}

#[test]
fn moving_a_live_bar_is_one_change_from_old_to_new() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    let changes = update_decode(&dev, BDF, &observer, |d| {
        d.write_config(BAR0, &0xc010_0000u32.to_le_bytes())
    })
    .unwrap();
    assert_eq!(
        changes,
        vec![BarChange {
            bdf: BDF,
            bar: 0,
            kind: BarKind::Mem32,
            prefetchable: false,
            old: Some(BusRange::new(0xc000_0000, 0x1000)),
            new: Some(BusRange::new(0xc010_0000, 0x1000)),
            forwarded: true,
        }]
    );
    assert_eq!(
        observer.range_of(BDF, 0),
        Some(BusRange::new(0xc010_0000, 0x1000))
    );
}

#[test]
fn sizing_a_live_bar_unmaps_it_until_the_address_is_restored() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    let write = |v: u32| {
        update_decode(&dev, BDF, &observer, |d| {
            d.write_config(BAR0, &v.to_le_bytes())
        })
        .unwrap()
    };
    assert_eq!(write(u32::MAX).len(), 1);
    assert_eq!(observer.range_of(BDF, 0), None);
    let mut size = [0; 4];
    lock(&dev).read_config(BAR0, &mut size);
    assert_eq!(u32::from_le_bytes(size), 0xffff_f000);
    assert_eq!(write(0xc000_0000).len(), 1);
    assert_eq!(
        observer.range_of(BDF, 0),
        Some(BusRange::new(0xc000_0000, 0x1000))
    );
}

#[test]
fn a_rejected_move_rolls_the_bar_register_back() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    observer.reject_when(|c| c.new.is_some_and(|r| r.base == 0xd000_0000));
    let err = update_decode(&dev, BDF, &observer, |d| {
        d.write_config(BAR0, &0xd000_0000u32.to_le_bytes())
    })
    .unwrap_err();
    assert_eq!(err.change.bar, 0);
    // The warning the VMM logs names the device and says why.
    let text = err.to_string();
    let name = lock(&dev).name().to_owned();
    assert!(text.starts_with(&format!("{name} (")), "{text}");
    assert!(text.contains(&err.source.to_string()), "{text}");
    assert_eq!(lock(&dev).bars()[0].unwrap().address, 0xc000_0000);
    assert_eq!(
        observer.range_of(BDF, 0),
        Some(BusRange::new(0xc000_0000, 0x1000))
    );
}

#[test]
fn a_rejection_midway_undoes_the_changes_already_applied() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    observer.reject_when(|c| c.bar == 2);
    let err = command(&dev, &observer, COMMAND_MEMORY).unwrap_err();
    assert_eq!(err.change.bar, 2);
    assert_eq!(lock(&dev).command(), 0);
    assert!(observer.live().is_empty());
    // BAR 0 was added, then removed again.
    let history = observer.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1], history[0].inverse());
}

#[test]
fn a_rejected_64bit_move_restores_both_halves() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    observer.reject_when(|c| c.bar == 2);
    update_decode(&dev, BDF, &observer, |d| {
        d.write_config(BAR0 + 12, &0x41u32.to_le_bytes())
    })
    .unwrap_err();
    let mut regs = [0; 8];
    lock(&dev).read_config(BAR0 + 8, &mut regs[..4]);
    lock(&dev).read_config(BAR0 + 12, &mut regs[4..]);
    assert_eq!(u64::from_le_bytes(regs) & !0xf, 0x40_0000_0000);
}

#[test]
fn removals_come_before_additions() {
    let before = [
        Some((MEM32, BusRange::new(0xc000_0000, 0x1000))),
        None,
        None,
        None,
        None,
        None,
        None,
    ];
    let moved = BarInfo {
        address: 0xc000_1000,
        ..MEM32
    };
    let after = [
        Some((moved, BusRange::new(0xc000_1000, 0x1000))),
        Some((MEM32, BusRange::new(0xc000_0000, 0x1000))),
        None,
        None,
        None,
        None,
        None,
    ];
    let changes = diff(BDF, &after, &before);
    assert_eq!(changes[0].new, None);
    let changes = diff(BDF, &before, &after);
    assert!(changes[0].old.is_some() && changes[0].new.is_some());
    assert_eq!(changes.len(), 2);
}

#[test]
fn announce_removal_withdraws_every_live_range() {
    let dev = endpoint();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    announce_removal(&dev, BDF, &observer);
    assert!(observer.live().is_empty());
}

#[test]
fn bar_region_forwards_with_the_bar_number() {
    let fake = FakeEndpoint::new("ep").shared();
    let mut region = BarRegion::new(fake.clone(), 2);
    let mut data = [0; 2];
    region.read(5, &mut data);
    assert_eq!(data, [0x25, 0x26]);
    region.write(8, &[1, 2]);
    assert_eq!(lock(&fake).bar_writes, vec![(2, 8, vec![1, 2])]);
}

#[test]
fn change_display_names_the_function_and_ranges() {
    let change = BarChange {
        bdf: BDF,
        bar: 0,
        kind: BarKind::Mem32,
        prefetchable: false,
        old: None,
        new: Some(BusRange::new(0xc000_0000, 0x1000)),
        forwarded: true,
    };
    assert_eq!(
        change.to_string(),
        "0000:01:00.0 BAR 0 (Mem32): none -> 0xc0000000..0xc0001000"
    );
    let rom = BarChange {
        bar: ROM_BAR,
        ..change
    };
    assert_eq!(
        rom.to_string(),
        "0000:01:00.0 ROM (Mem32): none -> 0xc0000000..0xc0001000"
    );
}

#[test]
fn rom_decodes_only_with_its_enable_bit_and_memory_decode() {
    let rom = |enabled| RomInfo {
        bar: BarInfo {
            size: ROM_SIZE,
            address: u64::from(ROM_AT),
            ..MEM32
        },
        enabled,
    };
    let range = Some(BusRange::new(u64::from(ROM_AT), ROM_SIZE));
    assert_eq!(rom(true).decoded_range(COMMAND_MEMORY), range);
    assert_eq!(rom(false).decoded_range(COMMAND_MEMORY), None);
    assert_eq!(rom(true).decoded_range(COMMAND_IO), None);
    let unassigned = RomInfo {
        bar: BarInfo {
            address: 0,
            ..rom(true).bar
        },
        enabled: true,
    };
    assert_eq!(unassigned.decoded_range(COMMAND_MEMORY), None);
}

#[test]
fn memory_decode_alone_leaves_a_disabled_rom_unmapped() {
    let dev = endpoint_with_rom();
    let observer = FakeBarObserver::new();
    let changes = command(&dev, &observer, COMMAND_MEMORY).unwrap();
    assert!(changes.iter().all(|c| c.bar != ROM_BAR));
    assert_eq!(observer.range_of(BDF, ROM_BAR), None);
    assert_eq!(decoded_ranges(&*lock(&dev))[usize::from(ROM_BAR)], None);
}

#[test]
fn enabling_the_rom_maps_it_as_bar_6() {
    let dev = endpoint_with_rom();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    let changes = rom_register(&dev, &observer, ROM_AT | ROM_ADDRESS_ENABLE).unwrap();
    assert_eq!(
        changes,
        vec![BarChange {
            bdf: BDF,
            bar: ROM_BAR,
            kind: BarKind::Mem32,
            prefetchable: false,
            old: None,
            new: Some(BusRange::new(u64::from(ROM_AT), ROM_SIZE)),
            forwarded: true,
        }]
    );
    // And disabling it again unmaps it.
    let changes = rom_register(&dev, &observer, ROM_AT).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].new, None);
    assert_eq!(observer.range_of(BDF, ROM_BAR), None);
}

#[test]
fn an_enabled_rom_follows_memory_decode() {
    let dev = endpoint_with_rom();
    let observer = FakeBarObserver::new();
    assert!(rom_register(&dev, &observer, ROM_AT | ROM_ADDRESS_ENABLE)
        .unwrap()
        .is_empty());
    assert_eq!(command(&dev, &observer, COMMAND_MEMORY).unwrap().len(), 3);
    assert_eq!(
        observer.range_of(BDF, ROM_BAR),
        Some(BusRange::new(u64::from(ROM_AT), ROM_SIZE))
    );
    assert_eq!(command(&dev, &observer, 0).unwrap().len(), 3);
    assert!(observer.live().is_empty());
}

#[test]
fn sizing_an_enabled_rom_unmaps_it_until_the_address_is_restored() {
    let dev = endpoint_with_rom();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    rom_register(&dev, &observer, ROM_AT | ROM_ADDRESS_ENABLE).unwrap();
    assert_eq!(rom_register(&dev, &observer, u32::MAX).unwrap().len(), 1);
    assert_eq!(observer.range_of(BDF, ROM_BAR), None);
    let mut size = [0; 4];
    lock(&dev).read_config(ROM_ADDRESS, &mut size);
    assert_eq!(u32::from_le_bytes(size), 0xffff_0001);
    rom_register(&dev, &observer, ROM_AT | ROM_ADDRESS_ENABLE).unwrap();
    assert_eq!(
        observer.range_of(BDF, ROM_BAR),
        Some(BusRange::new(u64::from(ROM_AT), ROM_SIZE))
    );
}

#[test]
fn linux_rom_sizing_with_the_enable_bit_either_way_never_maps_the_mask() {
    // A 64 KiB ROM at 0xffff_0000 holds exactly its size mask.
    for (at, enable) in [
        (ROM_AT, 0),
        (ROM_AT, ROM_ADDRESS_ENABLE),
        (0xffff_0000, ROM_ADDRESS_ENABLE),
    ] {
        let dev = endpoint_with_rom();
        let observer = FakeBarObserver::new();
        command(&dev, &observer, COMMAND_MEMORY).unwrap();
        rom_register(&dev, &observer, at | enable).unwrap();
        let before = observer.range_of(BDF, ROM_BAR);
        assert_eq!(before.is_some(), enable != 0);
        let old = read32(&dev, ROM_ADDRESS);
        let changes = rom_register(&dev, &observer, old | ROM_ADDRESS_MASK).unwrap();
        assert!(changes.iter().all(|c| c.new.is_none()), "{changes:?}");
        assert!(lock(&dev).rom().unwrap().bar.is_sizing());
        assert_eq!(read32(&dev, ROM_ADDRESS), 0xffff_0000 | enable);
        rom_register(&dev, &observer, old).unwrap();
        assert_eq!(observer.range_of(BDF, ROM_BAR), before);
    }
}

#[test]
fn a_rejected_rom_enable_rolls_the_rom_register_back() {
    let dev = endpoint_with_rom();
    let observer = FakeBarObserver::new();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    observer.reject_when(|c| c.bar == ROM_BAR);
    let err = rom_register(&dev, &observer, 0xc020_0001).unwrap_err();
    assert_eq!(err.change.bar, ROM_BAR);
    let rom = lock(&dev).rom().unwrap();
    assert_eq!((rom.bar.address, rom.enabled), (u64::from(ROM_AT), false));
    assert_eq!(observer.range_of(BDF, ROM_BAR), None);
    assert_eq!(observer.live().len(), 2);
}

#[test]
fn a_rejected_rom_midway_through_a_command_write_undoes_the_bars() {
    let dev = endpoint_with_rom();
    let observer = FakeBarObserver::new();
    rom_register(&dev, &observer, ROM_AT | ROM_ADDRESS_ENABLE).unwrap();
    observer.reject_when(|c| c.bar == ROM_BAR);
    let err = command(&dev, &observer, COMMAND_MEMORY).unwrap_err();
    assert_eq!(err.change.bar, ROM_BAR);
    assert_eq!(lock(&dev).command(), 0);
    assert!(lock(&dev).rom().unwrap().enabled);
    assert!(observer.live().is_empty());
}

#[test]
fn announce_removal_withdraws_the_rom_too() {
    let dev = endpoint_with_rom();
    let observer = FakeBarObserver::new();
    rom_register(&dev, &observer, ROM_AT | ROM_ADDRESS_ENABLE).unwrap();
    command(&dev, &observer, COMMAND_MEMORY).unwrap();
    announce_removal(&dev, BDF, &observer);
    assert!(observer.live().is_empty());
}

#[test]
fn bars_and_rom_lists_a_disabled_rom_for_resource_assignment() {
    let dev = endpoint_with_rom();
    let all = bars_and_rom(&*lock(&dev));
    let rom = all[usize::from(ROM_BAR)].unwrap();
    assert_eq!((rom.kind, rom.size), (BarKind::Mem32, ROM_SIZE));
    assert!(all[0].is_some() && all[2].is_some() && all[1].is_none());
    assert!(bars_and_rom(&*endpoint().lock().unwrap())[usize::from(ROM_BAR)].is_none());
}

#[test]
fn rom_region_forwards_as_bar_6() {
    let fake = FakeEndpoint::new("ep").shared();
    let mut region = BarRegion::new(fake.clone(), ROM_BAR);
    let mut data = [0; 2];
    region.read(0, &mut data);
    assert_eq!(data, [0x60, 0x61]);
}
