//! What a BAR change tells a P2P table: where the changed BAR is now, and which other BARs of
//! the same function stopped decoding in the same access.
//!
//! One access can end decoding of every BAR of a function at once (memory decode off, a
//! secondary bus reset above it), but the BAR observer hears of the BARs one at a time. Were
//! the table told of the first BAR only, its reconcile could map another BAR of the function
//! that was waiting (say, behind an overlap the first one just left) although the function no
//! longer decodes: a map of a revoked dmabuf, which the kernel refuses with ENODEV. So each
//! report carries every BAR of the function that the table still thinks placed but that no
//! longer decodes, and the table reconciles once for all of them.

use std::collections::BTreeSet;

use vfio_p2p::{BarKey, BarPlacement, DeviceKey, P2pError, P2pTable};

use super::bar::{decoded_ranges, BarChange, BarKind, ROM_BAR};
use super::regs::COMMAND_MEMORY;
use super::PciDevice;

/// Where the registers of `device` leave `bar` when it does not decode: programmed with memory
/// decoding off, or not placed at all.
fn not_decoding(device: &dyn PciDevice, bar: usize) -> BarPlacement {
    let addressed = device
        .bars()
        .get(bar)
        .copied()
        .flatten()
        .is_some_and(|b| b.address != 0);
    if addressed && device.command() & COMMAND_MEMORY == 0 {
        BarPlacement::DecodeOff
    } else {
        BarPlacement::Unplaced
    }
}

/// The placements to give the table for `change` of `device` (its registers as the access
/// left them): `(region, placement)` for the changed BAR when it has peer areas
/// (`has_areas(region)`), then for each other region with areas that `placed_in_table` says the
/// table holds as placed but that no longer decodes. Port I/O BARs and the ROM have no peer
/// areas and give nothing.
pub fn p2p_placements(
    device: &dyn PciDevice,
    change: &BarChange,
    has_areas: impl Fn(u32) -> bool,
    placed_in_table: impl Fn(u32) -> bool,
) -> Vec<(u32, BarPlacement)> {
    let region = u32::from(change.bar);
    if change.kind == BarKind::Io || change.bar == ROM_BAR || !has_areas(region) {
        return Vec::new();
    }
    let changed = match change.new {
        Some(range) if change.forwarded => BarPlacement::Placed(range.base),
        // A bridge above does not forward it: peers cannot reach it, as on hardware.
        Some(range) => BarPlacement::Unforwarded(range.base),
        None => not_decoding(device, usize::from(change.bar)),
    };
    let mut placements = vec![(region, changed)];
    let decoding = decoded_ranges(device);
    for (bar, decoded) in decoding.iter().enumerate().take(usize::from(ROM_BAR)) {
        let Ok(other) = u32::try_from(bar) else {
            continue;
        };
        if other != region && decoded.is_none() && has_areas(other) && placed_in_table(other) {
            placements.push((other, not_decoding(device, bar)));
        }
    }
    placements
}

/// Gives `table` what `change` of `device` (member `key` of the table's group) means for it, as
/// one batch ([`P2pTable::bars_moved`]). Returns whether there was anything to tell.
pub fn tell_table(
    device: &dyn PciDevice,
    change: &BarChange,
    key: DeviceKey,
    table: &P2pTable,
) -> Result<bool, P2pError> {
    let regions: BTreeSet<u32> = table.keys_of(key).iter().map(|k| k.bar.region).collect();
    let bar = |region| BarKey {
        device: key,
        region,
    };
    let placements = p2p_placements(
        device,
        change,
        |r| regions.contains(&r),
        |r| matches!(table.placement(bar(r)), Some(BarPlacement::Placed(_))),
    );
    if placements.is_empty() {
        return Ok(false);
    }
    let moves: Vec<_> = placements.into_iter().map(|(r, p)| (bar(r), p)).collect();
    table.bars_moved(&moves).map(|()| true)
}
