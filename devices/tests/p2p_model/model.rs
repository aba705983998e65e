//! The reference model: what the IOMMU of each group must hold, computed from the guest-visible
//! state alone (config space read back through the segment, plus which BAR registers the
//! guest's last write sized), and the check of both fakes and both tables against it.
//!
//! The model is deliberately not the implementation: it knows nothing of `BarChange`s or of
//! the table's bookkeeping, only the PCI rules (a memory BAR decodes while the command
//! register's memory enable is set, it has a non-zero address, no sizing write is in force in
//! its registers and it fits its address space) and the P2P rule (an area is mapped, at the
//! BAR's address plus its offset, exactly while its BAR decodes, every bridge above the function
//! forwards the BAR (memory space on, the BAR inside its memory or prefetchable window) and the
//! area lies inside a host window).

use std::collections::BTreeMap;

use devices::pci::regs::{
    BAR0, COMMAND, COMMAND_MEMORY, MEMORY_BASE, PREF_BASE_UPPER32, PREF_LIMIT_UPPER32,
    PREF_MEMORY_BASE, PRIMARY_BUS, ROM_ADDRESS,
};
use devices::pci::{BarKind, Bdf, PciSegment};
use vfio_p2p::fake::{FakeMapping, FakeSource};
use vfio_p2p::{DmaKind, P2pAreaState, P2pKey};

use crate::platform::{host_windows, BarSpec, Present, Vm, RAM};

/// Register slots the model tracks per function: BAR registers 0-5, then the ROM register.
pub const ROM_SLOT: usize = 6;

/// What the guest last wrote to each BAR/ROM register of each function (bytes merged, as the
/// device keeps them), keyed by the function's slot in [`Vm::devices`]. That is guest history,
/// not device state: it is the only way to tell "being sized" from "placed where the size mask
/// reads".
#[derive(Clone, Default)]
pub struct Writes {
    pub last: BTreeMap<usize, [u32; 7]>,
}

impl Writes {
    /// Records a config write of `data` at `offset` to function `slot`.
    pub fn record(&mut self, slot: usize, offset: u16, data: &[u8]) {
        let regs = self.last.entry(slot).or_default();
        for (i, byte) in data.iter().enumerate() {
            let at = usize::from(offset) + i;
            let reg = match at {
                a if (usize::from(BAR0)..usize::from(BAR0) + 24).contains(&a) => {
                    (a - usize::from(BAR0)) / 4
                }
                a if (usize::from(ROM_ADDRESS)..usize::from(ROM_ADDRESS) + 4).contains(&a) => {
                    ROM_SLOT
                }
                _ => continue,
            };
            let shift = 8 * (at % 4);
            regs[reg] = (regs[reg] & !(0xff << shift)) | (u32::from(*byte) << shift);
        }
    }

    /// A conventional reset of function `slot` (or its arrival): nothing written yet.
    pub fn clear(&mut self, slot: usize) {
        self.last.remove(&slot);
    }

    fn sizing(&self, slot: usize, reg: usize) -> bool {
        let last = self.last.get(&slot).map_or(0, |r| r[reg]);
        match reg {
            // Linux sizes a ROM with the address mask OR-ed into the old value.
            ROM_SLOT => last & 0xffff_f800 == 0xffff_f800,
            _ => last == u32::MAX,
        }
    }
}

fn read32(segment: &PciSegment, bdf: Bdf, offset: u16) -> u32 {
    let mut b = [0; 4];
    segment.config_read(bdf, offset, &mut b);
    u32::from_le_bytes(b)
}

/// A BAR as the guest has it now.
#[derive(Clone, Copy, Debug)]
pub struct BarState {
    pub address: u64,
    pub size: u64,
    /// A sizing write is in force in one of its registers.
    pub sizing: bool,
    /// The command register's memory enable.
    pub memory: bool,
    /// It fits its address space (below 4 GiB for a 32-bit BAR, no wrap).
    pub fits: bool,
}

impl BarState {
    /// The range it decodes, if any.
    pub fn decoded(&self) -> Option<(u64, u64)> {
        let decodes = self.memory && self.address != 0 && !self.sizing && self.fits;
        decodes.then_some((self.address, self.size))
    }
}

/// Memory BAR `bar` of function `slot` as config space reads it, with the model's sizing record.
pub fn bar_state(vm: &Vm, writes: &Writes, slot: usize, bar: &BarSpec) -> Option<BarState> {
    let dev = vm.devices[slot].as_ref()?;
    let segment = vm.root.segment();
    let command = read32(segment, dev.bdf, COMMAND) as u16;
    let reg = BAR0 + 4 * bar.index as u16;
    let low = read32(segment, dev.bdf, reg);
    let (address, sizing, limit) = match bar.def.kind {
        BarKind::Io => return None,
        BarKind::Mem32 => (
            u64::from(low & !0xf),
            writes.sizing(slot, bar.index),
            1u64 << 32,
        ),
        BarKind::Mem64 => (
            u64::from(low & !0xf) | (u64::from(read32(segment, dev.bdf, reg + 4)) << 32),
            writes.sizing(slot, bar.index) || writes.sizing(slot, bar.index + 1),
            u64::MAX,
        ),
    };
    Some(BarState {
        address,
        size: bar.def.size,
        sizing,
        memory: command & COMMAND_MEMORY != 0,
        fits: address
            .checked_add(bar.def.size)
            .is_some_and(|end| end <= limit),
    })
}

/// The current address of BAR `index` of function `slot` as the guest reads it (for aiming
/// another BAR at it), whether it decodes or not.
pub fn address_of(vm: &Vm, slot: usize, index: usize) -> Option<u64> {
    let dev = vm.devices[slot].as_ref()?;
    let bar = dev.spec.bars.iter().find(|b| b.index == index)?;
    let segment = vm.root.segment();
    let reg = BAR0 + 4 * index as u16;
    let low = u64::from(read32(segment, dev.bdf, reg) & !0xf);
    Some(match bar.def.kind {
        BarKind::Mem64 => low | (u64::from(read32(segment, dev.bdf, reg + 4)) << 32),
        _ => low,
    })
}

/// What the P2P table must show for an area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shown {
    Mapped,
    /// Placed and decoding, but outside the host windows or a bridge window above (or, when
    /// contested, overlapped).
    Failed,
    /// Not decoding: "decode off" or "unplaced". Which of the two cannot be required: the
    /// table only hears of decoded-range changes, so a BAR placed while decoding is off, or
    /// decoding turned off while it is sized, keeps the older word (FINDING 2 in main.rs).
    NotDecoding,
}

/// Where the model says one area must be mapped.
#[derive(Clone, Copy, Debug)]
struct Expected {
    slot: usize,
    key: P2pKey,
    shown: Shown,
    dmabuf: (u64, u64),
    size: u64,
    /// `Some(iova)` when it must be (or, see `contested`, may be) in the IOMMU.
    at: Option<u64>,
    /// Another area of the same group must be mapped over it too; the table maps one of them
    /// ("another BAR is mapped there"). Only without the VMM's overlap refusal.
    contested: bool,
}

fn inside_windows(iova: u64, size: u64) -> bool {
    host_windows()
        .iter()
        .any(|w| iova >= w.start && iova.checked_add(size - 1).is_some_and(|e| e <= w.last))
}

/// Whether every bridge above function `slot` forwards `[base, base + size)` to it, from the
/// bridges' config space as the guest reads it: the bridges are the ports whose bus range
/// holds the function's bus.
fn forwarded(vm: &Vm, slot: usize, base: u64, size: u64) -> bool {
    let Some(dev) = vm.devices[slot].as_ref() else {
        return false;
    };
    let segment = vm.root.segment();
    let inside = |start: u64, end: u64| start <= base && base + (size - 1) <= end;
    segment
        .devices()
        .into_iter()
        .filter(|(bdf, _, port)| {
            let buses = read32(segment, *bdf, PRIMARY_BUS);
            let (secondary, subordinate) = ((buses >> 8) as u8, (buses >> 16) as u8);
            port.is_some()
                && secondary > bdf.bus
                && (secondary..=subordinate).contains(&dev.bdf.bus)
        })
        .all(|(bdf, _, _)| {
            let command = read32(segment, bdf, COMMAND) as u16;
            let window = |lo: u32, hi_base: u32, hi_limit: u32| {
                let start = (u64::from(lo & 0xfff0) << 16) | (u64::from(hi_base) << 32);
                let end =
                    (u64::from(lo >> 16 & 0xfff0) << 16) | 0xf_ffff | (u64::from(hi_limit) << 32);
                inside(start, end)
            };
            let mem = window(read32(segment, bdf, MEMORY_BASE), 0, 0);
            let pref = window(
                read32(segment, bdf, PREF_MEMORY_BASE),
                read32(segment, bdf, PREF_BASE_UPPER32),
                read32(segment, bdf, PREF_LIMIT_UPPER32),
            );
            command & COMMAND_MEMORY != 0 && (mem || pref)
        })
}

fn over_ram(iova: u64, size: u64) -> bool {
    RAM.iter()
        .any(|&(base, len)| iova < base + len && base < iova.saturating_add(size))
}

fn expected(vm: &Vm, writes: &Writes, group: usize) -> Vec<Expected> {
    let mut out = Vec::new();
    let members = vm.devices.iter().enumerate().filter_map(|(slot, d)| {
        let d: &Present = d.as_ref()?;
        (d.group == group).then_some((slot, d))
    });
    for (slot, dev) in members {
        for bar in dev.spec.bars {
            let state = bar_state(vm, writes, slot, bar);
            let range = state.and_then(|s| s.decoded());
            let reached = range.is_some_and(|(base, size)| forwarded(vm, slot, base, size));
            for area in dev
                .areas
                .iter()
                .filter(|a| a.key.bar.region == bar.index as u32)
            {
                let at = range
                    .map(|(base, _)| base + area.offset)
                    .filter(|&iova| reached && inside_windows(iova, area.size));
                let shown = match range {
                    Some(_) if at.is_none() => Shown::Failed,
                    Some(_) => Shown::Mapped,
                    None => Shown::NotDecoding,
                };
                out.push(Expected {
                    slot,
                    shown,
                    key: area.key,
                    dmabuf: area.dmabuf,
                    size: area.size,
                    at,
                    contested: false,
                });
            }
        }
    }
    let snapshot = out.clone();
    for e in &mut out {
        let Some(at) = e.at else { continue };
        e.contested = snapshot
            .iter()
            .any(|o| o.key != e.key && o.at.is_some_and(|m| m < at + e.size && at < m + o.size));
    }
    out
}

/// Checks every invariant; `Err` names the first broken one with the state around it.
pub fn check(vm: &Vm, writes: &Writes, step: usize) -> Result<(), String> {
    for (g, group) in vm.groups.iter().enumerate() {
        let want = expected(vm, writes, g);
        let live = group.fake.live();
        let fail = |what: String| {
            Err(format!(
                "step {step}, group {}: {what}\nlive: {live:#x?}\nexpected: {want:#x?}\nrows: {:#?}",
                group.name,
                group.table.rows()
            ))
        };
        // Guest RAM is exactly as mapped at start.
        let ram: Vec<(u64, u64)> = live
            .iter()
            .filter(|m| m.kind == DmaKind::Ram)
            .map(|m| (m.iova, m.size))
            .collect();
        if ram != RAM {
            return fail(format!("guest RAM mappings changed: {ram:#x?}"));
        }
        // Every BAR mapping is an area of a present member, where the model puts it.
        for m in live.iter().filter(|m| m.kind == DmaKind::DeviceBar) {
            if let Err(why) = check_mapping(vm, &want, m) {
                return fail(format!("mapping at {:#x} (+{:#x}): {why}", m.iova, m.size));
            }
        }
        // Every area that must be mapped is, and the table says so.
        let rows = group.table.rows();
        if rows.len() != want.len() {
            return fail(format!(
                "{} rows for {} areas of present members",
                rows.len(),
                want.len()
            ));
        }
        for e in &want {
            let name = vm.devices[e.slot].as_ref().map_or("?", |d| d.name.as_str());
            let row = rows.iter().find(|r| {
                r.device_id == name
                    && r.bar == e.key.bar.region
                    && r.area_offset == e.key.area_offset
            });
            let Some(row) = row else {
                return fail(format!("no row for {name} {}", e.key));
            };
            let mapped = live.iter().find(|m| source_is(m, e.dmabuf));
            match (e.at, mapped) {
                (Some(at), Some(m)) if m.iova == at => {}
                (Some(_), None) if e.contested => continue,
                (Some(at), _) => {
                    return fail(format!("{name} {} must be mapped at {at:#x}", e.key));
                }
                (None, Some(_)) => unreachable!("checked by check_mapping"),
                (None, None) => {}
            }
            let is_mapped = row.state == P2pAreaState::Mapped;
            if is_mapped != mapped.is_some() {
                return fail(format!("{name} {}: row says {}", e.key, row.state));
            }
            let state_ok = matches!(
                (e.shown, &row.state),
                (Shown::Mapped, P2pAreaState::Mapped)
                    | (Shown::Failed, P2pAreaState::Failed(_))
                    | (
                        Shown::NotDecoding,
                        P2pAreaState::DecodeOff | P2pAreaState::Unplaced
                    )
            );
            if !state_ok {
                return fail(format!(
                    "{name} {}: row says {}, not {:?}",
                    e.key, row.state, e.shown
                ));
            }
            if let (Some(m), true) = (mapped, is_mapped) {
                if row.guest != Some((m.iova, m.iova + m.size - 1)) {
                    return fail(format!("{name} {}: row guest {:x?}", e.key, row.guest));
                }
            }
        }
    }
    Ok(())
}

fn source_is(m: &FakeMapping, dmabuf: (u64, u64)) -> bool {
    matches!(m.source, FakeSource::File { dev, ino, .. } if (dev, ino) == dmabuf)
}

/// One live BAR mapping against the model.
fn check_mapping(vm: &Vm, want: &[Expected], m: &FakeMapping) -> Result<(), String> {
    if over_ram(m.iova, m.size) {
        return Err("over guest RAM".into());
    }
    if !inside_windows(m.iova, m.size) {
        return Err("outside every host window".into());
    }
    if m.revoked {
        return Err("revoked (its device stopped decoding) but still mapped".into());
    }
    let Some(e) = want.iter().find(|e| source_is(m, e.dmabuf)) else {
        let departed = vm.departed.iter().any(|&d| source_is(m, d));
        let other_group = vm
            .devices
            .iter()
            .flatten()
            .flat_map(|d| d.areas.iter())
            .any(|a| source_is(m, a.dmabuf));
        return Err(match (departed, other_group) {
            (true, _) => "a BAR of a function that was hot-removed".into(),
            (_, true) => "a BAR of the other group's function".into(),
            _ => format!("unknown source {:?}", m.source),
        });
    };
    if m.size != e.size {
        return Err(format!("size, the area is {:#x}", e.size));
    }
    match e.at {
        Some(at) if at == m.iova => Ok(()),
        Some(at) => Err(format!("{}: the BAR is at {at:#x} now", e.key)),
        None => Err(format!(
            "{}: its BAR does not decode, or the area is outside the windows",
            e.key
        )),
    }
}
