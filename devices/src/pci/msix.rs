//! MSI-X capability, table and pending bit array emulation.
//!
//! The capability registers live in the device's config space; the table and PBA live here and
//! are reached through BAR accesses the device forwards with [`Msix::bar_read`] /
//! [`Msix::bar_write`]. After every change the effective message of each affected vector
//! (enabled, not function-masked, entry not masked) is compared with what the [`MsiSink`] was
//! last told, and only differences are reported. Interrupts raised while a vector is masked
//! set its pending bit ([`Msix::signal_masked`]) and are delivered when it is unmasked, as the
//! spec requires. Interrupts the VMM holds for a masked vector itself (a passthrough vector's
//! eventfd) show in the pending bit array too ([`MsiSink::held`]).

use std::ops::Range;

use super::bar::BarKind;
use super::config::{ConfigError, ConfigRegs, ConfigSpace};
use super::msi::{MsiMessage, MsiSink};
use super::regs::CAP_ID_MSIX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error("MSI-X BAR {bar} is not a declared memory BAR")]
    Bar { bar: u8 },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("MSI-X {what} at BAR {bar} offset {offset:#x} is not 8-byte aligned or does not fit")]
    Placement {
        what: &'static str,
        bar: u8,
        offset: u64,
    },
    #[error("MSI-X table and PBA overlap in BAR {bar}")]
    Overlap { bar: u8 },
    #[error("MSI-X supports 1 to 2048 vectors, not {0}")]
    Vectors(u16),
}

/// Where the table and PBA live. Both must be inside memory BARs already declared on the
/// function; passthrough devices copy these from the hardware capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixConfig {
    pub vectors: u16,
    pub table_bar: u8,
    pub table_offset: u64,
    pub pba_bar: u8,
    pub pba_offset: u64,
}

impl MsixConfig {
    fn table_len(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

const CONTROL: u16 = 0x02;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const CTRL_ENABLE: u16 = 1 << 15;
const CAP_LEN: u16 = 12;
const ENTRY_SIZE: u64 = 16;
const ENTRY_MASKED: u32 = 1;

/// An MSI-X table entry: address low/high, data, vector control.
type Entry = [u32; 4];
const RESET_ENTRY: Entry = [0, 0, 0, ENTRY_MASKED];

/// MSI-X state of one function.
pub struct Msix {
    offset: u16,
    config: MsixConfig,
    table: Vec<Entry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What the sink was last told, per vector.
    routes: Vec<Option<MsiMessage>>,
}

impl Msix {
    /// Adds the capability to `config` after checking the table and PBA placement against the
    /// BARs declared there.
    pub fn add<const N: usize>(
        config: &mut ConfigSpace<N>,
        msix: MsixConfig,
    ) -> Result<Self, MsixError> {
        if !(1..=2048).contains(&msix.vectors) {
            return Err(MsixError::Vectors(msix.vectors));
        }
        let bars = config.bars();
        let check = |what, bar: u8, offset: u64, len: u64| {
            let info = bars
                .get(usize::from(bar))
                .copied()
                .flatten()
                .filter(|b| b.kind != BarKind::Io)
                .ok_or(MsixError::Bar { bar })?;
            if !offset.is_multiple_of(8)
                || offset.checked_add(len).is_none_or(|end| end > info.size)
            {
                return Err(MsixError::Placement { what, bar, offset });
            }
            Ok(())
        };
        check("table", msix.table_bar, msix.table_offset, msix.table_len())?;
        check("PBA", msix.pba_bar, msix.pba_offset, msix.pba_len())?;
        let table = msix.table_offset..msix.table_offset + msix.table_len();
        let pba = msix.pba_offset..msix.pba_offset + msix.pba_len();
        if msix.table_bar == msix.pba_bar && table.start < pba.end && pba.start < table.end {
            return Err(MsixError::Overlap {
                bar: msix.table_bar,
            });
        }
        let offset = config.add_capability(CAP_ID_MSIX, CAP_LEN)?;
        let regs = config.regs_mut();
        regs.init_u16(offset + CONTROL, msix.vectors - 1);
        regs.set_writable_u16(offset + CONTROL, CTRL_ENABLE | CTRL_FUNCTION_MASK);
        regs.init_u32(
            offset + 4,
            msix.table_offset as u32 | u32::from(msix.table_bar),
        );
        regs.init_u32(offset + 8, msix.pba_offset as u32 | u32::from(msix.pba_bar));
        let vectors = usize::from(msix.vectors);
        Ok(Self {
            offset,
            config: msix,
            table: vec![RESET_ENTRY; vectors],
            pba: vec![0; vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routes: vec![None; vectors],
        })
    }

    /// Config offsets the capability occupies: writes overlapping them need an `update`.
    pub fn cap_range(&self) -> Range<u16> {
        self.offset..self.offset + CAP_LEN
    }

    /// BAR number and offsets of the table.
    pub fn table_range(&self) -> (u8, Range<u64>) {
        let start = self.config.table_offset;
        (
            self.config.table_bar,
            start..start + self.config.table_len(),
        )
    }

    /// BAR number and offsets of the pending bit array.
    pub fn pba_range(&self) -> (u8, Range<u64>) {
        let start = self.config.pba_offset;
        (self.config.pba_bar, start..start + self.config.pba_len())
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Re-reads the capability's control register after a config write and reports changes.
    pub fn update(&mut self, regs: &ConfigRegs, sink: &dyn MsiSink) {
        let control = regs.read_u16(self.offset + CONTROL);
        let enabled = control & CTRL_ENABLE != 0;
        if self.enabled && !enabled {
            sink.enable_changed(false);
        }
        let was_enabled = self.enabled;
        self.enabled = enabled;
        self.function_masked = control & CTRL_FUNCTION_MASK != 0;
        self.refresh(0..self.config.vectors, sink);
        if !was_enabled && enabled {
            sink.enable_changed(true);
        }
    }

    /// Function reset: the table returns to all-masked, pending bits clear, and the state is
    /// re-read from `regs` (which the caller has already reset).
    pub fn reset(&mut self, regs: &ConfigRegs, sink: &dyn MsiSink) {
        self.table.fill(RESET_ENTRY);
        self.pba.fill(0);
        self.update(regs, sink);
    }

    /// The message `vector` sends now, or `None` if it is disabled or masked.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let entry = self.table.get(usize::from(vector))?;
        if !self.enabled || self.function_masked || entry[3] & ENTRY_MASKED != 0 {
            return None;
        }
        Some(MsiMessage {
            address: u64::from(entry[0]) | (u64::from(entry[1]) << 32),
            data: entry[2],
        })
    }

    /// Serves a BAR read if it falls in the table or PBA; returns false if it does not (the
    /// device handles it). Reads straddling the edge of the table or PBA read all-ones beyond it.
    /// A masked vector's pending bit also shows an interrupt `sink` holds for it.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8], sink: &dyn MsiSink) -> bool {
        if let Some(at) = self.inside(self.table_range(), bar, offset) {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = self.table_byte(at + i as u64).unwrap_or(0xff);
            }
            true
        } else if let Some(at) = self.inside(self.pba_range(), bar, offset) {
            for (i, byte) in data.iter_mut().enumerate() {
                let at = at + i as u64;
                *byte = self
                    .pba_word((at / 8) as usize, sink)
                    .map_or(0xff, |w| (w >> (8 * (at % 8))) as u8);
            }
            true
        } else {
            false
        }
    }

    /// Pending bits `64 * index..` as the guest reads them: those set here, plus masked
    /// vectors whose interrupt the sink holds. `None` past the end of the PBA.
    fn pba_word(&self, index: usize, sink: &dyn MsiSink) -> Option<u64> {
        let mut word = *self.pba.get(index)?;
        if self.enabled {
            let first = index * 64;
            let last = (first + 64).min(usize::from(self.config.vectors));
            for vector in first..last {
                let vector = vector as u16;
                if self.message(vector).is_none() && sink.held(vector) {
                    word |= 1 << (vector % 64);
                }
            }
        }
        Some(word)
    }

    /// Serves a BAR write if it falls in the table or PBA (PBA writes are dropped: it is
    /// read-only); returns false if it does not.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8], sink: &dyn MsiSink) -> bool {
        if let Some(at) = self.inside(self.table_range(), bar, offset) {
            let first = (at / ENTRY_SIZE) as u16;
            let mut last = first;
            for (i, &byte) in data.iter().enumerate() {
                let at = at + i as u64;
                if self.set_table_byte(at, byte) {
                    last = (at / ENTRY_SIZE) as u16;
                }
            }
            self.refresh(first..last + 1, sink);
            true
        } else {
            self.inside(self.pba_range(), bar, offset).is_some()
        }
    }

    /// The device raised `vector` while the VMM had it masked. Sets the pending bit; if the
    /// vector has been unmasked in the meantime, delivers it instead. Ignored while disabled.
    pub fn signal_masked(&mut self, vector: u16, sink: &dyn MsiSink) {
        if !self.enabled || vector >= self.config.vectors {
            log::debug!("MSI-X vector {vector} raised while disabled: dropped");
            return;
        }
        match self.message(vector) {
            Some(message) => sink.inject(vector, message),
            None => self.pba[usize::from(vector / 64)] |= 1 << (vector % 64),
        }
    }

    pub fn pending(&self, vector: u16) -> bool {
        self.pba
            .get(usize::from(vector / 64))
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }

    fn inside(&self, (rbar, range): (u8, Range<u64>), bar: u8, offset: u64) -> Option<u64> {
        (bar == rbar && range.contains(&offset)).then(|| offset - range.start)
    }

    fn table_byte(&self, at: u64) -> Option<u8> {
        let entry = self.table.get((at / ENTRY_SIZE) as usize)?;
        Some((entry[(at % ENTRY_SIZE / 4) as usize] >> (8 * (at % 4))) as u8)
    }

    /// Stores one table byte; only bit 0 (mask) of vector control is writable. Returns false
    /// past the end of the table.
    fn set_table_byte(&mut self, at: u64, byte: u8) -> bool {
        let Some(entry) = self.table.get_mut((at / ENTRY_SIZE) as usize) else {
            return false;
        };
        let word = (at % ENTRY_SIZE / 4) as usize;
        let shift = 8 * (at % 4);
        let mut mask = 0xffu32 << shift;
        if word == 3 {
            mask &= ENTRY_MASKED;
        }
        entry[word] = (entry[word] & !mask) | ((u32::from(byte) << shift) & mask);
        true
    }

    /// Reports vectors whose effective message changed and delivers pending ones now unmasked.
    fn refresh(&mut self, vectors: Range<u16>, sink: &dyn MsiSink) {
        for vector in vectors {
            let message = self.message(vector);
            let slot = usize::from(vector);
            if message != self.routes[slot] {
                self.routes[slot] = message;
                sink.vector_changed(vector, message);
            }
            if let Some(message) = message.filter(|_| self.pending(vector)) {
                self.pba[slot / 64] &= !(1 << (vector % 64));
                sink.inject(vector, message);
            }
        }
    }
}

#[cfg(test)]
#[path = "msix_tests.rs"]
mod tests;
