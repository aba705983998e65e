//! A read-only view of the function's MSI-X table and pending bit array, as the CPU sees them
//! through the BAR (the sysfs `resourceN` mapping). In L2 these reads reach the VMM's emulated
//! table: what the guest kernel programmed, and the mask bits it set.

use p2pvmm_tests::guest::vfio::{Device, Mapping};
use p2pvmm_tests::guest::{sysfs, Fail, Result};

const CAP_PTR: u64 = 0x34;
const STATUS: u64 = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_ID_MSIX: u8 = 0x11;
const ENTRY_SIZE: usize = 16;
/// Vector control: the entry is masked.
pub const ENTRY_MASKED: u32 = 1;

/// Where the MSI-X structures live, from the capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Config offset of the capability.
    pub cap: u8,
    pub vectors: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

impl Layout {
    /// Decodes the capability's control word and its table and PBA dwords.
    pub fn decode(cap: u8, control: u16, table: u32, pba: u32) -> Self {
        Self {
            cap,
            vectors: (control & 0x7ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: table & !7,
            pba_bar: (pba & 7) as u8,
            pba_offset: pba & !7,
        }
    }

    /// Reads the MSI-X capability from config space.
    pub fn read(dev: &Device) -> Result<Self> {
        if dev.config_read16(STATUS)? & STATUS_CAP_LIST == 0 {
            return Err(Fail::msg("find MSI-X", "no capability list"));
        }
        let mut b = [0u8; 1];
        dev.config_read(CAP_PTR, &mut b)?;
        let mut ptr = b[0] & !3;
        for _ in 0..48 {
            if ptr == 0 {
                break;
            }
            let mut hdr = [0u8; 2];
            dev.config_read(u64::from(ptr), &mut hdr)?;
            if hdr[0] == CAP_ID_MSIX {
                let at = u64::from(ptr);
                return Ok(Self::decode(
                    ptr,
                    dev.config_read16(at + 2)?,
                    dev.config_read32(at + 4)?,
                    dev.config_read32(at + 8)?,
                ));
            }
            ptr = hdr[1] & !3;
        }
        Err(Fail::msg("find MSI-X", "no MSI-X capability"))
    }
}

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub address: u64,
    pub data: u32,
    pub control: u32,
}

impl Entry {
    pub fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "address 0x{:x} data 0x{:x} {}",
            self.address,
            self.data,
            if self.masked() { "masked" } else { "unmasked" }
        )
    }
}

pub struct TableView {
    layout: Layout,
    table: Mapping,
    /// The PBA's BAR when it differs from the table's.
    pba: Option<Mapping>,
}

impl TableView {
    pub fn open(bdf: &str, layout: Layout) -> Result<Self> {
        let table = sysfs::map_resource(bdf, usize::from(layout.table_bar))?;
        let pba = if layout.pba_bar == layout.table_bar {
            None
        } else {
            Some(sysfs::map_resource(bdf, usize::from(layout.pba_bar))?)
        };
        Ok(Self { layout, table, pba })
    }

    pub fn entry(&self, vector: u16) -> Option<Entry> {
        if vector >= self.layout.vectors {
            return None;
        }
        let at = self.layout.table_offset as usize + usize::from(vector) * ENTRY_SIZE;
        let lo = self.table.read32(at)?;
        let hi = self.table.read32(at + 4)?;
        Some(Entry {
            address: u64::from(lo) | (u64::from(hi) << 32),
            data: self.table.read32(at + 8)?,
            control: self.table.read32(at + 12)?,
        })
    }

    /// The first 64 pending bits.
    pub fn pba(&self) -> Option<u64> {
        let map = self.pba.as_ref().unwrap_or(&self.table);
        let at = self.layout.pba_offset as usize;
        Some(u64::from(map.read32(at)?) | (u64::from(map.read32(at + 4)?) << 32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_e1000e_capability() {
        // QEMU's e1000e: 5 vectors, table at BAR 3 offset 0, PBA at BAR 3 offset 0x2000.
        let l = Layout::decode(0xa0, 0x0004, 0x0000_0003, 0x0000_2003);
        assert_eq!(
            l,
            Layout {
                cap: 0xa0,
                vectors: 5,
                table_bar: 3,
                table_offset: 0,
                pba_bar: 3,
                pba_offset: 0x2000,
            }
        );
    }

    #[test]
    fn entry_mask_is_bit_0_of_vector_control() {
        let e = Entry {
            address: 0xfee0_0000,
            data: 0x41,
            control: 1,
        };
        assert!(e.masked());
        assert_eq!(e.to_string(), "address 0xfee00000 data 0x41 masked");
        assert!(!Entry { control: 0, ..e }.masked());
    }
}
