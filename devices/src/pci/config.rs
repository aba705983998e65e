//! An emulated configuration space: a 4 KiB register file whose guest-visible behaviour is
//! described by masks (writable bits, write-1-to-clear bits), plus the header emulator shared by
//! type-0 functions (6 BARs) and type-1 bridges (2 BARs).
//!
//! Describing registers with masks rather than code per register means the BAR sizing protocol,
//! read-only IDs, RW1C status bits and capability registers all follow from how the register was
//! declared, and a passthrough device can reuse the same object for the part of config space it
//! emulates.

use super::bar::{BarInfo, BarKind, RomInfo};
use super::caps::CapList;
use super::regs::*;

/// Why a device model's configuration space could not be declared as asked. These are device
/// construction errors, never guest-triggered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {index} is already in use")]
    BarInUse { index: usize },
    #[error("BAR {index} does not exist on a function with {bars} BARs (64-bit BARs need two)")]
    BarIndex { index: usize, bars: usize },
    #[error("BAR {index}: size {size:#x} is not a power of two in the range allowed for {kind:?}")]
    BarSize {
        index: usize,
        kind: BarKind,
        size: u64,
    },
    #[error("no room for capability {id:#x} of {len} bytes")]
    CapabilitySpace { id: u16, len: u16 },
    #[error("BAR {index}: I/O BARs cannot be prefetchable")]
    IoPrefetchable { index: usize },
    #[error("the expansion ROM is already declared")]
    RomInUse,
    #[error("expansion ROM size {size:#x} is not a power of two from 2 KiB to 16 MiB")]
    RomSize { size: u64 },
}

/// The smallest expansion ROM: the register's address bits start at bit 11.
pub const ROM_MIN_SIZE: u64 = 2 << 10;
/// The largest expansion ROM the PCI Local Bus specification allows.
pub const ROM_MAX_SIZE: u64 = 16 << 20;

/// The register file of one function.
///
/// `bytes` is what the guest reads. A guest write changes only `writable` bits and clears
/// `rw1c` bits it writes as 1. `power_on` holds the reset value of the guest-changeable bits.
pub struct ConfigRegs {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    power_on: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    rw1c: Box<[u8; CONFIG_SPACE_SIZE]>,
}

impl Default for ConfigRegs {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigRegs {
    pub fn new() -> Self {
        Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            power_on: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            rw1c: Box::new([0; CONFIG_SPACE_SIZE]),
        }
    }

    /// Guest read. Bytes past the end of config space read as all-ones, like an absent function.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    /// Guest write: only writable bits change, RW1C bits written as 1 are cleared, the rest of
    /// the register keeps its value. Bytes past the end are dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let at = offset as usize + i;
            let Some(old) = self.bytes.get(at).copied() else {
                break;
            };
            let (w, c) = (self.writable[at], self.rw1c[at]);
            self.bytes[at] = ((old & !w) | (value & w)) & !(value & c);
        }
    }

    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0; 1];
        self.read(offset, &mut b);
        b[0]
    }

    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Device-side update of the current value, ignoring masks (status bits the device owns,
    /// link state, pending bits). Not restored by [`ConfigRegs::reset`].
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        put(&mut self.bytes[..], offset, &[value]);
    }

    pub fn set_u16(&mut self, offset: u16, value: u16) {
        put(&mut self.bytes[..], offset, &value.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: u16, value: u32) {
        put(&mut self.bytes[..], offset, &value.to_le_bytes());
    }

    /// Sets the power-on value of a register (and its current value).
    pub fn init_u8(&mut self, offset: u16, value: u8) {
        self.set_u8(offset, value);
        put(&mut self.power_on[..], offset, &[value]);
    }

    pub fn init_u16(&mut self, offset: u16, value: u16) {
        self.set_u16(offset, value);
        put(&mut self.power_on[..], offset, &value.to_le_bytes());
    }

    pub fn init_u32(&mut self, offset: u16, value: u32) {
        self.set_u32(offset, value);
        put(&mut self.power_on[..], offset, &value.to_le_bytes());
    }

    /// Declares which bits of a register the guest may change.
    pub fn set_writable_u8(&mut self, offset: u16, mask: u8) {
        put(&mut self.writable[..], offset, &[mask]);
    }

    pub fn set_writable_u16(&mut self, offset: u16, mask: u16) {
        put(&mut self.writable[..], offset, &mask.to_le_bytes());
    }

    pub fn set_writable_u32(&mut self, offset: u16, mask: u32) {
        put(&mut self.writable[..], offset, &mask.to_le_bytes());
    }

    /// Declares which bits of a register are write-1-to-clear.
    pub fn set_rw1c_u16(&mut self, offset: u16, mask: u16) {
        put(&mut self.rw1c[..], offset, &mask.to_le_bytes());
    }

    pub fn set_rw1c_u32(&mut self, offset: u16, mask: u32) {
        put(&mut self.rw1c[..], offset, &mask.to_le_bytes());
    }

    /// Conventional reset: every bit the guest can change returns to its power-on value. Bits
    /// only the device changes (presence, link state) describe physical state and are kept.
    pub fn reset(&mut self) {
        for at in 0..CONFIG_SPACE_SIZE {
            let guest = self.writable[at] | self.rw1c[at];
            self.bytes[at] = (self.bytes[at] & !guest) | (self.power_on[at] & guest);
        }
    }
}

/// Device-side stores use constant offsets; one past the end is a device-model bug, so it is
/// caught in debug builds and dropped in release builds rather than panicking a vCPU.
fn put(array: &mut [u8], offset: u16, value: &[u8]) {
    let at = offset as usize;
    debug_assert!(at + value.len() <= array.len(), "config offset {at:#x}");
    if let Some(dst) = array.get_mut(at..at + value.len()) {
        dst.copy_from_slice(value);
    }
}

/// Identity registers of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class, subclass and programming interface, as the 24-bit value at 0x09.
    pub class_code: u32,
    /// Only type-0 headers have subsystem registers; ignored for bridges.
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// How a BAR is declared: its kind, size and whether it is prefetchable. The address is the
/// guest's business (or the firmware's, see [`super::topology`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarDef {
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

impl BarDef {
    pub const fn mem32(size: u64) -> Self {
        Self {
            kind: BarKind::Mem32,
            size,
            prefetchable: false,
        }
    }

    pub const fn mem64(size: u64, prefetchable: bool) -> Self {
        Self {
            kind: BarKind::Mem64,
            size,
            prefetchable,
        }
    }

    pub const fn io(size: u64) -> Self {
        Self {
            kind: BarKind::Io,
            size,
            prefetchable: false,
        }
    }

    /// Sizes the PCI spec allows: memory BARs at least 16 bytes (32-bit ones at most 2 GiB so
    /// they fit below 4 GiB), I/O BARs 4 to 256 bytes.
    fn size_is_valid(&self) -> bool {
        let (min, max) = match self.kind {
            BarKind::Io => (4, 256),
            BarKind::Mem32 => (16, 1 << 31),
            BarKind::Mem64 => (16, 1 << 63),
        };
        self.size.is_power_of_two() && (min..=max).contains(&self.size)
    }
}

/// A type-0 or type-1 configuration space with `N` BARs: 6 for endpoints, 2 for bridges. One
/// implementation for both so BAR, command, status and capability handling cannot diverge.
pub struct ConfigSpace<const N: usize> {
    regs: ConfigRegs,
    bars: [Option<BarDef>; N],
    /// Size of the expansion ROM, if declared (type 0 only, see [`Type0Config::add_rom`]).
    rom: Option<u64>,
    caps: CapList,
    /// The last value the guest wrote to each BAR register, unmasked (byte writes merge in), so
    /// a sizing write can be told from a placement that reads back the same ([`BarInfo::sizing`]).
    bar_writes: [u32; N],
    /// The same for the expansion ROM register.
    rom_write: u32,
}

/// What a guest writes to a BAR register to size it (PCI Local Bus spec 6.2.5.1; Linux's
/// `__pci_read_base` writes `~0`).
const BAR_SIZING_WRITE: u32 = u32::MAX;

/// Configuration space of an endpoint.
pub type Type0Config = ConfigSpace<6>;
/// Configuration space of a PCI-to-PCI bridge (every PCIe port).
pub type Type1Config = ConfigSpace<2>;

impl<const N: usize> ConfigSpace<N> {
    const IS_BRIDGE: bool = {
        assert!(
            N == 6 || N == 2,
            "a header has 6 (type 0) or 2 (type 1) BARs"
        );
        N == 2
    };

    pub fn new(ids: &PciIds) -> Self {
        let mut regs = ConfigRegs::new();
        regs.init_u16(VENDOR_ID, ids.vendor_id);
        regs.init_u16(DEVICE_ID, ids.device_id);
        regs.init_u8(REVISION_ID, ids.revision);
        for (i, byte) in ids.class_code.to_le_bytes()[..3].iter().enumerate() {
            regs.init_u8(CLASS_PROG + i as u16, *byte);
        }
        regs.set_writable_u16(COMMAND, COMMAND_WRITABLE);
        regs.set_rw1c_u16(STATUS, STATUS_ERRORS_RW1C);
        // Cache line size: Linux programs it and real functions keep it.
        regs.set_writable_u8(0x0c, 0xff);
        regs.set_writable_u8(INTERRUPT_LINE, 0xff);
        if Self::IS_BRIDGE {
            regs.init_u8(HEADER_TYPE, HEADER_TYPE_BRIDGE);
            init_bridge_registers(&mut regs);
        } else {
            regs.init_u8(HEADER_TYPE, HEADER_TYPE_NORMAL);
            regs.init_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
            regs.init_u16(SUBSYSTEM_ID, ids.subsystem_id);
        }
        Self {
            regs,
            bars: [None; N],
            rom: None,
            caps: CapList::new(),
            bar_writes: [0; N],
            rom_write: 0,
        }
    }

    /// Declares BAR `index`. A 64-bit BAR also takes `index + 1` for its upper half.
    pub fn add_bar(&mut self, index: usize, def: BarDef) -> Result<(), ConfigError> {
        let span = if def.kind == BarKind::Mem64 { 2 } else { 1 };
        if index + span > N {
            return Err(ConfigError::BarIndex { index, bars: N });
        }
        if (index..index + span).any(|i| self.bar_slot_used(i)) {
            return Err(ConfigError::BarInUse { index });
        }
        if def.kind == BarKind::Io && def.prefetchable {
            return Err(ConfigError::IoPrefetchable { index });
        }
        if !def.size_is_valid() {
            return Err(ConfigError::BarSize {
                index,
                kind: def.kind,
                size: def.size,
            });
        }
        let offset = BAR0 + 4 * index as u16;
        let address_mask = !(def.size - 1);
        let (fixed, low_mask) = match def.kind {
            BarKind::Io => (BAR_IO_SPACE, address_mask as u32 & !0x3),
            BarKind::Mem32 => (0, address_mask as u32 & !0xf),
            BarKind::Mem64 => (BAR_MEM_TYPE_64, address_mask as u32 & !0xf),
        };
        let prefetch = if def.prefetchable {
            BAR_MEM_PREFETCH
        } else {
            0
        };
        self.regs.init_u32(offset, fixed | prefetch);
        self.regs.set_writable_u32(offset, low_mask);
        if def.kind == BarKind::Mem64 {
            self.regs.init_u32(offset + 4, 0);
            self.regs
                .set_writable_u32(offset + 4, (address_mask >> 32) as u32);
        }
        self.bars[index] = Some(def);
        Ok(())
    }

    /// True if BAR register `i` is declared, either as a BAR or as the upper half of one.
    fn bar_slot_used(&self, i: usize) -> bool {
        self.bars[i].is_some()
            || (i > 0 && matches!(self.bars[i - 1], Some(d) if d.kind == BarKind::Mem64))
    }

    /// The BARs as the guest has programmed them. During sizing this reports the size mask as
    /// the address, with [`BarInfo::sizing`] set so [`BarInfo::decoded_range`] ignores it.
    pub fn bars(&self) -> [Option<BarInfo>; 6] {
        let mut out = [None; 6];
        for (index, def) in self.bars.iter().enumerate() {
            let Some(def) = def else { continue };
            let offset = BAR0 + 4 * index as u16;
            let low = self.regs.read_u32(offset);
            let address = match def.kind {
                BarKind::Io => u64::from(low & !0x3),
                BarKind::Mem32 => u64::from(low & !0xf),
                BarKind::Mem64 => {
                    u64::from(low & !0xf) | (u64::from(self.regs.read_u32(offset + 4)) << 32)
                }
            };
            let sizing = |register: usize| self.bar_writes.get(register) == Some(&BAR_SIZING_WRITE);
            out[index] = Some(BarInfo {
                kind: def.kind,
                prefetchable: def.prefetchable,
                size: def.size,
                address,
                sizing: [
                    sizing(index),
                    def.kind == BarKind::Mem64 && sizing(index + 1),
                ],
            });
        }
        out
    }

    /// The expansion ROM register as the guest has programmed it. During sizing the address is
    /// the size mask, as for BARs. Linux sizes a ROM by writing `PCI_ROM_ADDRESS_MASK`
    /// (0xffff_f800) OR-ed with the register's old value, so any write with every address bit
    /// set counts as sizing, whatever its enable bit.
    pub fn rom(&self) -> Option<RomInfo> {
        let size = self.rom?;
        let register = self.regs.read_u32(ROM_ADDRESS);
        Some(RomInfo {
            bar: BarInfo {
                kind: BarKind::Mem32,
                prefetchable: false,
                size,
                address: u64::from(register & ROM_ADDRESS_MASK),
                sizing: [self.rom_write & ROM_ADDRESS_MASK == ROM_ADDRESS_MASK, false],
            },
            enabled: register & ROM_ADDRESS_ENABLE != 0,
        })
    }

    pub fn command(&self) -> u16 {
        self.regs.read_u16(COMMAND)
    }

    /// Sets the interrupt pin register (1 = INTA# .. 4 = INTD#, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.regs.init_u8(INTERRUPT_PIN, pin);
    }

    /// Appends a standard capability of `len` bytes (header included) with ID `id` to the chain
    /// at 0x40+, and returns its offset. The ID and next pointer are read-only; the caller
    /// declares the rest of the registers through [`ConfigSpace::regs_mut`].
    pub fn add_capability(&mut self, id: u8, len: u16) -> Result<u16, ConfigError> {
        self.caps.add(&mut self.regs, id, len)
    }

    /// Like [`ConfigSpace::add_capability`], at offset `preferred` if the chain has not
    /// reached it yet (else at the next free offset), for capabilities guests may expect at a
    /// fixed place.
    pub fn add_capability_preferring(
        &mut self,
        id: u8,
        len: u16,
        preferred: u16,
    ) -> Result<u16, ConfigError> {
        self.caps.add_preferring(&mut self.regs, id, len, preferred)
    }

    /// Appends an extended capability at 0x100+ and returns its offset.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        len: u16,
    ) -> Result<u16, ConfigError> {
        self.caps.add_extended(&mut self.regs, id, version, len)
    }

    pub fn read(&self, offset: u16, data: &mut [u8]) {
        self.regs.read(offset, data);
    }

    /// Guest write: the masked register update, plus a record of what was written to BAR and
    /// ROM registers.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        self.regs.write(offset, data);
        for (i, &byte) in data.iter().enumerate() {
            let at = usize::from(offset) + i;
            let bars = usize::from(BAR0)..usize::from(BAR0) + 4 * N;
            let rom = usize::from(ROM_ADDRESS)..usize::from(ROM_ADDRESS) + 4;
            let (register, shift) = if bars.contains(&at) {
                let rel = at - bars.start;
                (&mut self.bar_writes[rel / 4], 8 * (rel % 4))
            } else if self.rom.is_some() && rom.contains(&at) {
                (&mut self.rom_write, 8 * (at - rom.start))
            } else {
                continue;
            };
            *register = (*register & !(0xff << shift)) | (u32::from(byte) << shift);
        }
    }

    pub fn regs(&self) -> &ConfigRegs {
        &self.regs
    }

    pub fn regs_mut(&mut self) -> &mut ConfigRegs {
        &mut self.regs
    }

    /// Conventional reset of the whole register file (BARs unassigned, decoding off, no sizing
    /// in progress).
    pub fn reset(&mut self) {
        self.regs.reset();
        self.bar_writes = [0; N];
        self.rom_write = 0;
    }
}

impl Type0Config {
    /// Declares an expansion ROM of `size` bytes (a power of two, [`ROM_MIN_SIZE`] to
    /// [`ROM_MAX_SIZE`]) at [`ROM_ADDRESS`]: address bits 31:11 are writable down to the size,
    /// so writing all ones reads back the size mask, and bit 0 is the ROM enable. Power-on value
    /// 0: unassigned, disabled.
    pub fn add_rom(&mut self, size: u64) -> Result<(), ConfigError> {
        if self.rom.is_some() {
            return Err(ConfigError::RomInUse);
        }
        if !size.is_power_of_two() || !(ROM_MIN_SIZE..=ROM_MAX_SIZE).contains(&size) {
            return Err(ConfigError::RomSize { size });
        }
        let address_mask = !(size - 1) as u32 & ROM_ADDRESS_MASK;
        self.regs.init_u32(ROM_ADDRESS, 0);
        self.regs
            .set_writable_u32(ROM_ADDRESS, address_mask | ROM_ADDRESS_ENABLE);
        self.rom = Some(size);
        Ok(())
    }
}

/// Type-1 specifics: bus numbers, forwarding windows (closed at power-on: base above limit),
/// secondary status and bridge control.
fn init_bridge_registers(regs: &mut ConfigRegs) {
    regs.set_writable_u8(PRIMARY_BUS, 0xff);
    regs.set_writable_u8(SECONDARY_BUS, 0xff);
    regs.set_writable_u8(SUBORDINATE_BUS, 0xff);
    // 16-bit I/O decode: the low nibble (addressing capability) reads 0.
    regs.init_u8(IO_BASE, 0xf0);
    regs.set_writable_u8(IO_BASE, 0xf0);
    regs.set_writable_u8(IO_LIMIT, 0xf0);
    regs.set_rw1c_u16(SEC_STATUS, STATUS_ERRORS_RW1C);
    regs.init_u16(MEMORY_BASE, 0xfff0);
    regs.set_writable_u16(MEMORY_BASE, 0xfff0);
    regs.set_writable_u16(MEMORY_LIMIT, 0xfff0);
    // 64-bit prefetchable window: the low nibble reads 1.
    regs.init_u16(PREF_MEMORY_BASE, 0xfff1);
    regs.init_u16(PREF_MEMORY_LIMIT, 0x0001);
    regs.set_writable_u16(PREF_MEMORY_BASE, 0xfff0);
    regs.set_writable_u16(PREF_MEMORY_LIMIT, 0xfff0);
    regs.set_writable_u32(PREF_BASE_UPPER32, u32::MAX);
    regs.set_writable_u32(PREF_LIMIT_UPPER32, u32::MAX);
    regs.set_writable_u16(BRIDGE_CONTROL, BRIDGE_CTL_WRITABLE);
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: PciIds = PciIds {
        vendor_id: 0x1b36,
        device_id: 0x1234,
        revision: 2,
        class_code: 0x03_02_00,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
    };

    fn write32(c: &mut Type0Config, offset: u16, v: u32) {
        c.write(offset, &v.to_le_bytes());
    }

    #[test]
    fn ids_and_class_are_read_only() {
        let mut c = Type0Config::new(&IDS);
        write32(&mut c, VENDOR_ID, 0);
        write32(&mut c, 0x08, 0);
        assert_eq!(c.regs().read_u32(VENDOR_ID), 0x1234_1b36);
        assert_eq!(c.regs().read_u32(0x08), 0x0302_0002);
        assert_eq!(c.regs().read_u32(SUBSYSTEM_VENDOR_ID), 0x1100_1af4);
    }

    #[test]
    fn sizing_a_32bit_bar_reads_back_the_size_mask() {
        let mut c = Type0Config::new(&IDS);
        c.add_bar(0, BarDef::mem32(0x10_0000)).unwrap();
        write32(&mut c, BAR0, u32::MAX);
        assert_eq!(c.regs().read_u32(BAR0), 0xfff0_0000);
        write32(&mut c, BAR0, 0xc012_3456);
        assert_eq!(c.regs().read_u32(BAR0), 0xc010_0000);
    }

    #[test]
    fn sizing_a_64bit_prefetchable_bar_spans_two_registers() {
        let mut c = Type0Config::new(&IDS);
        // 16 GiB: the low register has no writable address bits at all.
        c.add_bar(2, BarDef::mem64(16 << 30, true)).unwrap();
        write32(&mut c, BAR0 + 8, u32::MAX);
        write32(&mut c, BAR0 + 12, u32::MAX);
        assert_eq!(c.regs().read_u32(BAR0 + 8), 0x0000_000c);
        assert_eq!(c.regs().read_u32(BAR0 + 12), 0xffff_fffc);
        write32(&mut c, BAR0 + 12, 0x40);
        let bar = c.bars()[2].unwrap();
        assert_eq!(bar.address, 0x40_0000_0000);
        assert_eq!(
            (bar.kind, bar.prefetchable, bar.size),
            (BarKind::Mem64, true, 16 << 30)
        );
        assert!(c.bars()[3].is_none());
    }

    #[test]
    fn sizing_an_io_bar_keeps_the_io_bit() {
        let mut c = Type0Config::new(&IDS);
        c.add_bar(4, BarDef::io(0x20)).unwrap();
        write32(&mut c, BAR0 + 16, u32::MAX);
        assert_eq!(c.regs().read_u32(BAR0 + 16), 0xffff_ffe1);
    }

    #[test]
    fn unimplemented_bars_and_rom_read_zero_after_sizing() {
        let mut c = Type0Config::new(&IDS);
        write32(&mut c, BAR0 + 4, u32::MAX);
        write32(&mut c, 0x30, u32::MAX);
        assert_eq!(c.regs().read_u32(BAR0 + 4), 0);
        assert_eq!(c.regs().read_u32(0x30), 0);
    }

    #[test]
    fn sizing_the_rom_reads_back_its_size_mask_and_enable_bit() {
        let mut c = Type0Config::new(&IDS);
        c.add_rom(0x1_0000).unwrap();
        assert_eq!(c.regs().read_u32(ROM_ADDRESS), 0);
        // Linux sizes with the enable bit clear (~PCI_ROM_ADDRESS_ENABLE).
        write32(&mut c, ROM_ADDRESS, !ROM_ADDRESS_ENABLE);
        assert_eq!(c.regs().read_u32(ROM_ADDRESS), 0xffff_0000);
        write32(&mut c, ROM_ADDRESS, u32::MAX);
        assert_eq!(c.regs().read_u32(ROM_ADDRESS), 0xffff_0001);
        write32(&mut c, ROM_ADDRESS, 0xc012_3457);
        assert_eq!(c.regs().read_u32(ROM_ADDRESS), 0xc012_0001);
        let rom = c.rom().unwrap();
        assert_eq!(
            rom.bar,
            BarInfo {
                kind: BarKind::Mem32,
                prefetchable: false,
                size: 0x1_0000,
                address: 0xc012_0000,
                sizing: [false; 2],
            }
        );
        assert!(rom.enabled);
    }

    #[test]
    fn the_smallest_rom_has_every_address_bit_from_11_up() {
        let mut c = Type0Config::new(&IDS);
        c.add_rom(ROM_MIN_SIZE).unwrap();
        write32(&mut c, ROM_ADDRESS, u32::MAX);
        assert_eq!(c.regs().read_u32(ROM_ADDRESS), 0xffff_f801);
    }

    #[test]
    fn rom_declarations_are_validated() {
        let mut c = Type0Config::new(&IDS);
        for size in [0, 0x400, 0x3000, ROM_MAX_SIZE * 2] {
            assert_eq!(c.add_rom(size), Err(ConfigError::RomSize { size }));
        }
        assert!(c.rom().is_none());
        c.add_rom(ROM_MAX_SIZE).unwrap();
        assert_eq!(c.add_rom(0x800), Err(ConfigError::RomInUse));
    }

    #[test]
    fn reset_disables_and_unassigns_the_rom() {
        let mut c = Type0Config::new(&IDS);
        c.add_rom(0x800).unwrap();
        write32(&mut c, ROM_ADDRESS, 0xc000_0001);
        c.reset();
        assert_eq!(c.regs().read_u32(ROM_ADDRESS), 0);
        assert!(!c.rom().unwrap().enabled);
    }

    #[test]
    fn bar_declarations_are_validated() {
        let mut c = Type0Config::new(&IDS);
        c.add_bar(0, BarDef::mem64(0x1000, false)).unwrap();
        assert_eq!(
            c.add_bar(1, BarDef::mem32(0x1000)),
            Err(ConfigError::BarInUse { index: 1 })
        );
        assert_eq!(
            c.add_bar(5, BarDef::mem64(0x1000, true)),
            Err(ConfigError::BarIndex { index: 5, bars: 6 })
        );
        assert!(matches!(
            c.add_bar(2, BarDef::mem32(0x3000)),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(2, BarDef::io(0x1000)),
            Err(ConfigError::BarSize { .. })
        ));
        let io_pref = BarDef {
            prefetchable: true,
            ..BarDef::io(4)
        };
        assert_eq!(
            c.add_bar(3, io_pref),
            Err(ConfigError::IoPrefetchable { index: 3 })
        );
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut c = Type0Config::new(&IDS);
        c.regs_mut().set_u16(STATUS, 0xf910);
        c.write(STATUS, &0x2000u16.to_le_bytes());
        assert_eq!(c.regs().read_u16(STATUS), 0xd910);
        // Writing zeros (as a command-register word write would) clears nothing.
        c.write(STATUS, &0u16.to_le_bytes());
        assert_eq!(c.regs().read_u16(STATUS), 0xd910);
    }

    #[test]
    fn command_keeps_only_writable_bits() {
        let mut c = Type0Config::new(&IDS);
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
    }

    #[test]
    fn byte_writes_merge_into_the_register() {
        let mut c = Type0Config::new(&IDS);
        c.add_bar(0, BarDef::mem32(0x1000)).unwrap();
        c.write(BAR0 + 3, &[0xc0]);
        c.write(BAR0 + 2, &[0x12]);
        assert_eq!(c.regs().read_u32(BAR0), 0xc012_0000);
    }

    #[test]
    fn reset_restores_guest_state_and_keeps_device_state() {
        let mut c = Type0Config::new(&IDS);
        c.add_bar(0, BarDef::mem32(0x1000)).unwrap();
        write32(&mut c, BAR0, 0xc000_0000);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        c.regs_mut().set_u8(0x40, 0x5a); // read-only, device-owned
        c.reset();
        assert_eq!(c.regs().read_u32(BAR0), 0);
        assert_eq!(c.command(), 0);
        assert_eq!(c.regs().read_u8(0x40), 0x5a);
        assert_eq!(c.regs().read_u16(VENDOR_ID), 0x1b36);
    }

    #[test]
    fn reads_past_the_end_are_all_ones() {
        let c = Type0Config::new(&IDS);
        let mut data = [0; 4];
        c.read(0xffe, &mut data);
        assert_eq!(data, [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn bridge_header_has_closed_windows_and_writable_bus_numbers() {
        let mut c = Type1Config::new(&IDS);
        assert_eq!(c.regs().read_u8(HEADER_TYPE), HEADER_TYPE_BRIDGE);
        assert_eq!(c.regs().read_u16(MEMORY_BASE), 0xfff0);
        assert_eq!(c.regs().read_u16(MEMORY_LIMIT), 0);
        assert_eq!(c.regs().read_u16(PREF_MEMORY_BASE) & 0xf, 1);
        c.write(PRIMARY_BUS, &[0, 3, 7, 0xff]);
        assert_eq!(c.regs().read_u32(PRIMARY_BUS), 0x0007_0300);
        c.write(MEMORY_BASE, &0xffffu16.to_le_bytes());
        assert_eq!(c.regs().read_u16(MEMORY_BASE), 0xfff0);
    }
}
