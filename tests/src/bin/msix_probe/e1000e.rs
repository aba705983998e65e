//! QEMU's e1000e (Intel 82574L, 8086:10d3) through its BAR0 mapping: only the interrupt
//! registers, to make the device send the MSI-X message of a chosen vector.
//!
//! How QEMU 7.2 (hw/net/e1000e_core.c) behaves with MSI-X enabled:
//! - Writing ICS ORs the bits into ICR. The causes pending and unmasked (ICR & IMS) that were
//!   not already signalled are sent: each of RXQ0, RXQ1, TXQ0, TXQ1 and OTHER on the vector its
//!   IVAR field names, if the field's valid bit is set. Any "other" cause (LSC, RXO, MDAC, ...)
//!   also sets ICR.OTHER.
//! - A cause already signalled stays "sent" until it leaves ICR & IMS: writing its bit to ICR
//!   (write-1-to-clear) re-arms it. With EIAC bits set the device clears them itself after
//!   sending (and masks them in IMS unless CTRL_EXT.IAME); here EIAC is 0 and the probe clears.
//! - EITR (per-vector throttling) is 0 after reset, so nothing is postponed.

use std::thread::sleep;
use std::time::{Duration, Instant};

use p2pvmm_tests::guest::vfio::Mapping;
use p2pvmm_tests::guest::{Fail, Result};

pub const VENDOR: u16 = 0x8086;
pub const DEVICE: u16 = 0x10d3;

const STATUS: usize = 0x0008;
const STATUS_LU: u32 = 1 << 1;
const CTRL_EXT: usize = 0x0018;
const ICR: usize = 0x00c0;
const ICS: usize = 0x00c8;
const IMS: usize = 0x00d0;
const IMC: usize = 0x00d8;
const EIAC: usize = 0x00dc;
const IAM: usize = 0x00e0;
const IVAR: usize = 0x00e4;
const REGS_END: usize = 0x0100;

/// IVAR: an entry's vector is valid (bit 3 of each 4-bit field).
const IVAR_VALID: u32 = 0x8;

/// An interrupt cause that has an IVAR field of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cause {
    pub name: &'static str,
    /// Its bit in ICR / ICS / IMS.
    pub bit: u32,
    /// Where its 4-bit field sits in IVAR.
    ivar_shift: u32,
}

/// The five causes, in IVAR field order: RXQ0 (bits 0-3), RXQ1 (4-7), TXQ0 (8-11), TXQ1 (12-15),
/// OTHER (16-19). As many as the 82574 has MSI-X vectors.
pub const CAUSES: [Cause; 5] = [
    Cause {
        name: "rxq0",
        bit: 1 << 20,
        ivar_shift: 0,
    },
    Cause {
        name: "rxq1",
        bit: 1 << 21,
        ivar_shift: 4,
    },
    Cause {
        name: "txq0",
        bit: 1 << 22,
        ivar_shift: 8,
    },
    Cause {
        name: "txq1",
        bit: 1 << 23,
        ivar_shift: 12,
    },
    Cause {
        name: "other",
        bit: 1 << 24,
        ivar_shift: 16,
    },
];

/// All five cause bits.
pub fn all_causes() -> u32 {
    CAUSES.iter().fold(0, |acc, c| acc | c.bit)
}

/// The IVAR value sending `CAUSES[i]` on vector `vectors[i]` (0..=7), every entry valid.
pub fn ivar(vectors: [u8; 5]) -> u32 {
    CAUSES.iter().zip(vectors).fold(0, |acc, (c, v)| {
        acc | ((IVAR_VALID | u32::from(v & 7)) << c.ivar_shift)
    })
}

fn reg_fail(off: usize) -> Fail {
    Fail::msg(
        "e1000e register access",
        format!("offset 0x{off:x} outside BAR0"),
    )
}

pub struct E1000e {
    bar0: Mapping,
}

impl E1000e {
    pub fn new(bar0: Mapping) -> Result<Self> {
        if bar0.len() < REGS_END {
            return Err(Fail::msg(
                "e1000e BAR0",
                format!("only 0x{:x} bytes", bar0.len()),
            ));
        }
        Ok(Self { bar0 })
    }

    fn r32(&self, off: usize) -> Result<u32> {
        self.bar0.read32(off).ok_or_else(|| reg_fail(off))
    }

    fn w32(&self, off: usize, v: u32) -> Result<()> {
        self.bar0.write32(off, v).ok_or_else(|| reg_fail(off))
    }

    pub fn status(&self) -> Result<u32> {
        self.r32(STATUS)
    }

    pub fn ctrl_ext(&self) -> Result<u32> {
        self.r32(CTRL_EXT)
    }

    pub fn ims(&self) -> Result<u32> {
        self.r32(IMS)
    }

    /// Waits up to `ms` for link up (autonegotiation after a reset ends with a link-status
    /// change, an "other" cause, which must not land in the middle of the test). Returns
    /// whether the link is up.
    pub fn wait_link(&self, ms: u64) -> Result<bool> {
        let t0 = Instant::now();
        loop {
            if self.status()? & STATUS_LU != 0 {
                return Ok(true);
            }
            if t0.elapsed() >= Duration::from_millis(ms) {
                return Ok(false);
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// All causes masked, no auto-clear or auto-mask, nothing pending.
    pub fn quiesce(&self) -> Result<()> {
        self.w32(IMC, u32::MAX)?;
        self.w32(EIAC, 0)?;
        self.w32(IAM, 0)?;
        self.w32(ICR, u32::MAX)
    }

    pub fn set_ivar(&self, value: u32) -> Result<()> {
        self.w32(IVAR, value)?;
        let got = self.r32(IVAR)?;
        if got != value {
            return Err(Fail::msg(
                "program IVAR",
                format!("wrote 0x{value:08x}, reads 0x{got:08x}"),
            ));
        }
        Ok(())
    }

    /// Unmasks `bits` (IMS is write-1-to-set).
    pub fn unmask(&self, bits: u32) -> Result<()> {
        self.w32(IMS, bits)
    }

    /// Raises `bits` as if the hardware had (ICS).
    pub fn raise(&self, bits: u32) -> Result<()> {
        self.w32(ICS, bits)
    }

    /// Clears `bits` in ICR (write-1-to-clear), so they can be raised again.
    pub fn clear(&self, bits: u32) -> Result<()> {
        self.w32(ICR, bits)
    }

    /// Everything off again (also on the way out after a failure).
    pub fn shut_up(&self) {
        let _ = self.w32(IMC, u32::MAX);
        let _ = self.w32(ICR, u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ivar_puts_a_valid_vector_in_each_cause_field() {
        // QEMU's own qtest routes RXQ0 -> 0, TXQ0 -> 1, OTHER -> 2 as 0x000a_0908 (plus RXQ1
        // and TXQ1 here).
        assert_eq!(ivar([0, 3, 1, 4, 2]), 0x000a_c9b8);
        assert_eq!(ivar([0, 1, 2, 3, 4]), 0x000c_ba98);
        assert_eq!(ivar([4, 3, 2, 1, 0]), 0x0008_9abc);
    }

    #[test]
    fn causes_are_the_queue_bits_and_other() {
        assert_eq!(all_causes(), 0x01f0_0000);
        assert_eq!(CAUSES[4].name, "other");
        assert_eq!(CAUSES[4].bit, 0x0100_0000);
    }
}
