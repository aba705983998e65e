//! What a function decodes, and the one place where a change to that becomes a guest address
//! space change.
//!
//! Every config access that can move a BAR (BAR writes, ROM register writes, command writes,
//! resets) goes through [`update_decode`]: it reads the decoded ranges before and after, hands the
//! difference to the [`BarObserver`] as [`BarChange`]s, and if the observer refuses one, restores
//! the BAR, ROM and command registers ([`DecodeSnapshot::restore`]) and undoes the changes already
//! applied, so the device and the guest address space never disagree. Devices themselves never
//! learn where they are mapped.
//!
//! The expansion ROM takes part as BAR [`ROM_BAR`] (6): a 32-bit, non-prefetchable memory range
//! that decodes only while its own enable bit and the command register's memory enable are both
//! set ([`RomInfo`]).

use std::fmt;

use super::regs::{BAR0, COMMAND, COMMAND_IO, COMMAND_MEMORY, ROM_ADDRESS, ROM_ADDRESS_MASK};
use super::{lock, Bdf, PciDevice, SharedPciDevice};
use crate::bus::{BusDevice, BusRange};

/// The address space a BAR decodes in, and how many registers it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// A BAR as currently programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    pub kind: BarKind,
    pub prefetchable: bool,
    /// Power of two, in bytes.
    pub size: u64,
    /// The address bits of the register(s), low flag bits cleared.
    pub address: u64,
    /// Whether the guest's last write to each register of the BAR was the sizing write (all
    /// ones; for the ROM register, all ones in the address bits 31:11): index 0 is the BAR's
    /// (low) register, index 1 the upper register of a 64-bit BAR. While any is set the register
    /// reads back the size mask and `address` is that mask, not a placement.
    pub sizing: [bool; 2],
}

/// Port I/O is 16 bits wide on x86; I/O BAR bits above that cannot decode anything.
const IO_SPACE_END: u64 = 1 << 16;

impl BarInfo {
    /// The range this BAR decodes given the command register, or `None` when it decodes
    /// nothing: its space is disabled, it is unassigned (address 0), it is being sized, or it
    /// does not fit its address space.
    ///
    /// A BAR being sized is treated as "not decoding" because guests (Linux included, for
    /// devices with `mmio_always_on`) size BARs with decoding enabled; mapping a BAR at
    /// 0xfff0_0000 for the few instructions until the old value is written back would collide
    /// with the LAPIC and IOAPIC, fail, and roll the register back under the guest's feet.
    /// Sizing is told from placement by what the guest wrote ([`BarInfo::sizing`]), never by the
    /// value: a BAR in the last aligned slot below a 4 GiB boundary (a 256 MiB BAR at
    /// 0xf000_0000) holds exactly the size mask in its low register and must still decode.
    pub fn decoded_range(&self, command: u16) -> Option<BusRange> {
        let enable = match self.kind {
            BarKind::Io => COMMAND_IO,
            BarKind::Mem32 | BarKind::Mem64 => COMMAND_MEMORY,
        };
        if command & enable == 0 || self.address == 0 || self.is_sizing() {
            return None;
        }
        let end = self.address.checked_add(self.size)?;
        let limit = match self.kind {
            BarKind::Io => IO_SPACE_END,
            BarKind::Mem32 => 1 << 32,
            BarKind::Mem64 => u64::MAX,
        };
        (end <= limit).then(|| BusRange::new(self.address, self.size))
    }

    /// True while a sizing write is in force in either register of the BAR.
    pub fn is_sizing(&self) -> bool {
        self.sizing.iter().any(|s| *s)
    }
}

/// The index the expansion ROM takes among the BARs wherever decoding is tracked
/// ([`decoded_ranges`], [`BarChange::bar`], [`BarRegion`]); also VFIO's ROM region index.
pub const ROM_BAR: u8 = 6;

/// BARs 0-5 and the ROM: the length of the arrays [`decoded_ranges`] and [`bars_and_rom`] return.
pub const DECODE_SLOTS: usize = 7;

/// The expansion ROM register as programmed: a 32-bit memory BAR (address bits 31:11) plus its
/// enable bit. Only type-0 functions have one here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RomInfo {
    /// Kind [`BarKind::Mem32`], never prefetchable; `address` holds bits 31:11 of the register.
    pub bar: BarInfo,
    /// Bit 0 of the register.
    pub enabled: bool,
}

impl RomInfo {
    /// The range the ROM decodes: like a BAR's ([`BarInfo::decoded_range`]), and only while the
    /// ROM enable bit is set as well.
    pub fn decoded_range(&self, command: u16) -> Option<BusRange> {
        self.enabled
            .then(|| self.bar.decoded_range(command))
            .flatten()
    }
}

/// One BAR's decoded range changed: `old` stops decoding, `new` starts. `None` on either side
/// means "nothing" (registration or removal only). `bar` is 0-5, or [`ROM_BAR`] for the
/// expansion ROM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarChange {
    pub bdf: Bdf,
    pub bar: u8,
    pub kind: BarKind,
    pub prefetchable: bool,
    pub old: Option<BusRange>,
    pub new: Option<BusRange>,
    /// Whether every bridge above the function forwards `new` down to it (inside one of the
    /// bridge's windows of its kind, with the bridge's memory or I/O space on), as the segment
    /// found it; true on the root bus and when `new` is `None`. The CPU reaches the BAR either
    /// way (the VMM maps it where the guest put it); a peer's DMA reaches it only where it is
    /// forwarded, as on hardware.
    pub forwarded: bool,
}

impl BarChange {
    /// The change that undoes this one.
    pub fn inverse(&self) -> Self {
        Self {
            old: self.new,
            new: self.old,
            ..self.clone()
        }
    }
}

impl fmt::Display for BarChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |r: &Option<BusRange>| r.map_or("none".to_string(), |r| r.to_string());
        let bar = match self.bar {
            ROM_BAR => "ROM".to_string(),
            n => format!("BAR {n}"),
        };
        write!(
            f,
            "{} {bar} ({:?}): {} -> {}",
            self.bdf,
            self.kind,
            show(&self.old),
            show(&self.new)
        )
    }
}

/// Errors an observer reports; any error type of the VMM converts into it with `?`.
pub type ObserverError = Box<dyn std::error::Error + Send + Sync>;

/// Applies BAR changes to the guest address space: the VMM registers and unregisters the BAR on
/// the MMIO or port I/O bus, adds or removes KVM memory slots for mappable BARs, and updates
/// IOMMU peer mappings (expansion ROMs, [`ROM_BAR`], are read-only and only ever trapped). Called
/// without the device lock held, so it may lock `device`.
pub trait BarObserver: Send + Sync {
    /// Must be all-or-nothing: on error the address space is as before the call.
    fn bar_changed(
        &self,
        device: &SharedPciDevice,
        change: &BarChange,
    ) -> Result<(), ObserverError>;

    /// A write to a bridge (a window or its command register) changed whether the bridges
    /// above `device` forward one of its decoding BARs: `change.old == change.new` (the BAR
    /// stays where it is, for the CPU too), `change.forwarded` is the new answer. Only what
    /// peers reach follows. Default: nothing.
    fn forwarding_changed(&self, _device: &SharedPciDevice, _change: &BarChange) {}
}

/// The observer refused a change; the BAR and command registers were rolled back and every
/// change of the same access already applied was undone.
#[derive(Debug, thiserror::Error)]
#[error("{device} ({change}): rejected, BAR registers rolled back: {source}")]
pub struct BarRejected {
    /// The device's name in the VM (its id), so the warning says whose BAR it was.
    pub device: String,
    pub change: BarChange,
    #[source]
    pub source: ObserverError,
}

/// Every BAR of `device` as programmed, indexed by BAR number, with the ROM (enabled or not) at
/// [`ROM_BAR`]: what resource assignment needs.
pub fn bars_and_rom(device: &dyn PciDevice) -> [Option<BarInfo>; DECODE_SLOTS] {
    let bars = device.bars();
    let rom = device.rom().map(|r| r.bar);
    std::array::from_fn(|i| bars.get(i).copied().unwrap_or(rom))
}

/// The ranges each BAR of `device` decodes now, indexed by BAR number, the ROM at [`ROM_BAR`].
pub fn decoded_ranges(device: &dyn PciDevice) -> [Option<(BarInfo, BusRange)>; DECODE_SLOTS] {
    let command = device.command();
    let bars = device.bars();
    let rom = device.rom();
    std::array::from_fn(|i| match bars.get(i) {
        Some(bar) => bar.and_then(|b| b.decoded_range(command).map(|r| (b, r))),
        None => rom.and_then(|rom| rom.decoded_range(command).map(|r| (rom.bar, r))),
    })
}

/// Each BAR (and the ROM, as [`ROM_BAR`]) of `device` that decodes now, with its range.
pub fn decoding_bars(device: &dyn PciDevice) -> Vec<(u8, BarInfo, BusRange)> {
    decoded_ranges(device)
        .iter()
        .enumerate()
        .filter_map(|(bar, r)| r.map(|(info, range)| (bar as u8, info, range)))
        .collect()
}

/// Register values that determine decoding, taken before an access so it can be undone.
pub struct DecodeSnapshot {
    command: u16,
    /// BAR registers, then the ROM register, with whether a sizing write was in force there.
    bar_registers: Vec<SavedRegister>,
}

struct SavedRegister {
    offset: u16,
    value: u32,
    sizing: bool,
}

impl SavedRegister {
    /// What to write back: the value, or for a register being sized the sizing write itself,
    /// which reads back the same value and puts the sizing state back too (writing the size
    /// mask instead would turn it into a placement at the mask address).
    fn restore_value(&self) -> u32 {
        match (self.sizing, self.offset) {
            (false, _) => self.value,
            (true, ROM_ADDRESS) => self.value | ROM_ADDRESS_MASK,
            (true, _) => u32::MAX,
        }
    }
}

impl DecodeSnapshot {
    pub fn take(device: &mut dyn PciDevice) -> Self {
        let mut registers = Vec::new();
        for (index, bar) in device.bars().iter().enumerate() {
            let Some(bar) = bar else { continue };
            let count = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
            registers.extend((0..count).map(|r| (BAR0 + 4 * (index + r) as u16, bar.sizing[r])));
        }
        if let Some(rom) = device.rom() {
            registers.push((ROM_ADDRESS, rom.bar.sizing[0]));
        }
        let bar_registers = registers
            .into_iter()
            .map(|(offset, sizing)| {
                let mut value = [0; 4];
                device.read_config(offset, &mut value);
                SavedRegister {
                    offset,
                    value: u32::from_le_bytes(value),
                    sizing,
                }
            })
            .collect();
        let mut command = [0; 2];
        device.read_config(COMMAND, &mut command);
        Self {
            command: u16::from_le_bytes(command),
            bar_registers,
        }
    }

    /// The rollback: writes the BAR and ROM registers back, then the command register, so the
    /// function decodes exactly what it did before (BARs first so a passthrough device never
    /// decodes a half-restored address).
    pub fn restore(&self, device: &mut dyn PciDevice) {
        for saved in &self.bar_registers {
            device.write_config(saved.offset, &saved.restore_value().to_le_bytes());
        }
        device.write_config(COMMAND, &self.command.to_le_bytes());
    }
}

/// Runs `access` on `device` (at `bdf`) and makes the guest address space follow: the single
/// place BAR moves are computed, applied and, on failure, rolled back.
///
/// Returns the changes applied. On [`BarRejected`] the device registers and the address space
/// are both back to their state before `access` (other side effects of `access` remain).
pub fn update_decode(
    device: &SharedPciDevice,
    bdf: Bdf,
    observer: &dyn BarObserver,
    access: impl FnOnce(&mut dyn PciDevice),
) -> Result<Vec<BarChange>, BarRejected> {
    let (snapshot, changes) = {
        let mut dev = lock(device);
        let snapshot = DecodeSnapshot::take(&mut *dev);
        let before = decoded_ranges(&*dev);
        access(&mut *dev);
        let after = decoded_ranges(&*dev);
        (snapshot, diff(bdf, &before, &after))
    };
    for (applied, change) in changes.iter().enumerate() {
        if let Err(source) = observer.bar_changed(device, change) {
            let name = {
                let mut dev = lock(device);
                snapshot.restore(&mut *dev);
                dev.name().to_owned()
            };
            for done in changes[..applied].iter().rev() {
                if let Err(e) = observer.bar_changed(device, &done.inverse()) {
                    log::error!("{done}: cannot undo after a rejected BAR change: {e}");
                }
            }
            return Err(BarRejected {
                device: name,
                change: change.clone(),
                source,
            });
        }
    }
    Ok(changes)
}

/// One change per BAR whose decoded range differs. Removals come before additions so an
/// observer never sees two live ranges of the same device overlap in between.
fn diff(
    bdf: Bdf,
    before: &[Option<(BarInfo, BusRange)>; DECODE_SLOTS],
    after: &[Option<(BarInfo, BusRange)>; DECODE_SLOTS],
) -> Vec<BarChange> {
    let mut changes: Vec<BarChange> = (0..DECODE_SLOTS)
        .filter_map(|i| {
            let (old, new) = (before[i].map(|b| b.1), after[i].map(|b| b.1));
            let info = after[i].or(before[i])?.0;
            (old != new).then_some(BarChange {
                bdf,
                bar: i as u8,
                kind: info.kind,
                prefetchable: info.prefetchable,
                old,
                new,
                forwarded: true,
            })
        })
        .collect();
    changes.sort_by_key(|c| c.new.is_some());
    changes
}

/// Announces every range `device` decodes as a removal (`old` → `None`): what the VMM needs
/// when a function goes away. Errors are logged; a departing device cannot roll back.
pub fn announce_removal(device: &SharedPciDevice, bdf: Bdf, observer: &dyn BarObserver) {
    let bars = decoding_bars(&*lock(device));
    for (bar, info, range) in bars {
        let change = BarChange {
            bdf,
            bar,
            kind: info.kind,
            prefetchable: info.prefetchable,
            old: Some(range),
            new: None,
            forwarded: true,
        };
        if let Err(e) = observer.bar_changed(device, &change) {
            log::error!("{change}: {e}");
        }
    }
}

/// A BAR (or the ROM, [`ROM_BAR`]) as a bus device, for the VMM to register at the range a
/// [`BarChange`] announces: accesses arrive with BAR-relative offsets and go to
/// [`PciDevice::bar_read`]/`bar_write`.
pub struct BarRegion {
    device: SharedPciDevice,
    bar: u8,
}

impl BarRegion {
    pub fn new(device: SharedPciDevice, bar: u8) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
#[path = "bar_tests.rs"]
mod tests;
