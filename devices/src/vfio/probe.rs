//! What the host function looks like: identity, BARs, expansion ROM and interrupt capabilities,
//! read once from its real config space and region list through VFIO. The guest sees an emulated
//! config space built from this.

use vfio_p2p::{DeviceError, HostPciDevice, CONFIG_REGION, ROM_REGION};

use crate::pci::regs::{
    BAR0, CAPABILITY_LIST, DEVICE_ID, INTERRUPT_PIN, REVISION_ID, SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use crate::pci::{BarDef, BarKind, MsiConfig, MsixConfig, PciIds};

const CAP_ID_MSI: u8 = 0x05;
const CAP_ID_EXP: u8 = 0x10;
const CAP_ID_MSIX: u8 = 0x11;
const STATUS: u16 = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;

/// The host function's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFunction {
    pub ids: PciIds,
    /// BAR index, declaration (size from the VFIO region, kind from the BAR register).
    pub bars: Vec<(usize, BarDef)>,
    pub msi: Option<MsiConfig>,
    pub msix: Option<MsixConfig>,
    pub is_pcie: bool,
    /// The power management capability: its offset, PMC and PMCSR.
    pub pm: Option<(u16, u16, u16)>,
    pub interrupt_pin: u8,
    /// Size of the expansion ROM region (VFIO region 6); 0 when the function has no ROM (VFIO
    /// also reports 0 for a ROM BAR without a valid image).
    pub rom_size: u64,
}

/// What the device model reads from the host function: config space, region sizes and the
/// expansion ROM.
pub trait ConfigSource {
    fn read(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Size of region `index`: BARs 0-5, the ROM ([`ROM_REGION`]); 0 if absent.
    fn region_size(&self, index: u32) -> u64;
    /// Reads `buf.len()` bytes of the expansion ROM region at `offset`, inside its size.
    fn read_rom(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
}

impl ConfigSource for HostPciDevice {
    fn read(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.read_region(CONFIG_REGION, u64::from(offset), buf)
    }

    fn region_size(&self, index: u32) -> u64 {
        self.region(index).map(|r| r.size).unwrap_or(0)
    }

    fn read_rom(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.read_region(ROM_REGION, offset, buf)
    }
}

fn read_u8(src: &dyn ConfigSource, offset: u16) -> Result<u8, DeviceError> {
    let mut b = [0u8; 1];
    src.read(offset, &mut b)?;
    Ok(b[0])
}

fn read_u16(src: &dyn ConfigSource, offset: u16) -> Result<u16, DeviceError> {
    let mut b = [0u8; 2];
    src.read(offset, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_u32(src: &dyn ConfigSource, offset: u16) -> Result<u32, DeviceError> {
    let mut b = [0u8; 4];
    src.read(offset, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Standard capabilities as (id, offset), following the chain with a bound against loops.
fn capabilities(src: &dyn ConfigSource) -> Result<Vec<(u8, u16)>, DeviceError> {
    let mut caps = Vec::new();
    if read_u16(src, STATUS)? & STATUS_CAP_LIST == 0 {
        return Ok(caps);
    }
    let mut next = u16::from(read_u8(src, CAPABILITY_LIST)? & !0x3);
    while next >= 0x40 && caps.len() < 48 {
        let id = read_u8(src, next)?;
        caps.push((id, next));
        next = u16::from(read_u8(src, next + 1)? & !0x3);
    }
    Ok(caps)
}

pub fn probe(src: &dyn ConfigSource) -> Result<HostFunction, DeviceError> {
    // Revision ID and the 24-bit class code share the dword at 0x08.
    let class = read_u32(src, REVISION_ID)? >> 8;
    let ids = PciIds {
        vendor_id: read_u16(src, VENDOR_ID)?,
        device_id: read_u16(src, DEVICE_ID)?,
        revision: read_u8(src, REVISION_ID)?,
        class_code: class,
        subsystem_vendor_id: read_u16(src, SUBSYSTEM_VENDOR_ID)?,
        subsystem_id: read_u16(src, SUBSYSTEM_ID)?,
    };

    let mut bars = Vec::new();
    let mut index = 0;
    while index < 6 {
        let reg = read_u32(src, BAR0 + 4 * index as u16)?;
        let size = src.region_size(index as u32);
        let kind = if reg & 1 == 1 {
            BarKind::Io
        } else if (reg >> 1) & 0x3 == 0x2 {
            BarKind::Mem64
        } else {
            BarKind::Mem32
        };
        if size > 0 {
            // Region sizes are powers of two for BARs; round up defensively for odd variants.
            let size = size.next_power_of_two().max(16);
            let prefetchable = kind != BarKind::Io && reg & 0x8 != 0;
            bars.push((
                index,
                BarDef {
                    kind,
                    size: if kind == BarKind::Io {
                        size.max(4)
                    } else {
                        size
                    },
                    prefetchable,
                },
            ));
        }
        index += if kind == BarKind::Mem64 { 2 } else { 1 };
    }

    let mut msi = None;
    let mut msix = None;
    let mut is_pcie = false;
    let mut pm = None;
    for (id, offset) in capabilities(src)? {
        match id {
            CAP_ID_MSI => {
                let control = read_u16(src, offset + 2)?;
                msi = Some(MsiConfig {
                    vectors: 1 << ((control >> 1) & 0x7).min(5),
                    is_64bit: control & (1 << 7) != 0,
                    per_vector_mask: control & (1 << 8) != 0,
                });
            }
            CAP_ID_MSIX => {
                let control = read_u16(src, offset + 2)?;
                let table = read_u32(src, offset + 4)?;
                let pba = read_u32(src, offset + 8)?;
                msix = Some(MsixConfig {
                    vectors: (control & 0x7ff) + 1,
                    table_bar: (table & 0x7) as u8,
                    table_offset: u64::from(table & !0x7),
                    pba_bar: (pba & 0x7) as u8,
                    pba_offset: u64::from(pba & !0x7),
                });
            }
            CAP_ID_EXP => is_pcie = true,
            super::pm::CAP_ID_PM => {
                pm = Some((
                    offset,
                    read_u16(src, offset + 2)?,
                    read_u16(src, offset + 4)?,
                ));
            }
            _ => {}
        }
    }
    Ok(HostFunction {
        ids,
        bars,
        msi,
        msix,
        is_pcie,
        pm,
        interrupt_pin: read_u8(src, INTERRUPT_PIN)?,
        rom_size: src.region_size(ROM_REGION),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host function's config space and BAR and ROM region sizes.
    struct FakeConfig {
        bytes: [u8; 256],
        sizes: [u64; 7],
    }

    impl ConfigSource for FakeConfig {
        fn read(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
            let at = usize::from(offset);
            buf.copy_from_slice(&self.bytes[at..at + buf.len()]);
            Ok(())
        }
        fn region_size(&self, index: u32) -> u64 {
            self.sizes.get(index as usize).copied().unwrap_or(0)
        }
        fn read_rom(&self, _offset: u64, _buf: &mut [u8]) -> Result<(), DeviceError> {
            unreachable!("probing does not read the ROM")
        }
    }

    fn edu_like() -> FakeConfig {
        let mut bytes = [0u8; 256];
        bytes[0..4].copy_from_slice(&[0x34, 0x12, 0xe8, 0x11]);
        bytes[0x08] = 0x10;
        bytes[0x09..0x0c].copy_from_slice(&[0x00, 0xff, 0x00]);
        bytes[0x06] = 0x10; // capability list
        bytes[0x10] = 0x00; // BAR0 mem32
        bytes[0x18..0x1c].copy_from_slice(&0x0c_u32.to_le_bytes()); // BAR2 mem64 prefetchable
        bytes[0x34] = 0x40;
        bytes[0x3d] = 1;
        bytes[0x40] = CAP_ID_MSI;
        bytes[0x41] = 0x50;
        bytes[0x42..0x44].copy_from_slice(&(0x80u16 | (1 << 1)).to_le_bytes());
        bytes[0x50] = CAP_ID_MSIX;
        bytes[0x51] = 0;
        bytes[0x52..0x54].copy_from_slice(&3u16.to_le_bytes());
        bytes[0x54..0x58].copy_from_slice(&0x2000u32.to_le_bytes());
        bytes[0x58..0x5c].copy_from_slice(&0x3000u32.to_le_bytes());
        FakeConfig {
            bytes,
            sizes: [0x10_0000, 0, 0x400_0000, 0, 0, 0, 0],
        }
    }

    #[test]
    fn reads_identity_bars_and_interrupt_capabilities() {
        let f = probe(&edu_like()).unwrap();
        assert_eq!((f.ids.vendor_id, f.ids.device_id), (0x1234, 0x11e8));
        assert_eq!(f.ids.class_code, 0x00ff00);
        assert_eq!(f.bars.len(), 2);
        assert_eq!(f.bars[0], (0, BarDef::mem32(0x10_0000)));
        assert_eq!(f.bars[1], (2, BarDef::mem64(0x400_0000, true)));
        let msi = f.msi.unwrap();
        assert_eq!(
            (msi.vectors, msi.is_64bit, msi.per_vector_mask),
            (2, true, false)
        );
        let msix = f.msix.unwrap();
        assert_eq!(
            (msix.vectors, msix.table_bar, msix.table_offset),
            (4, 0, 0x2000)
        );
        assert_eq!((msix.pba_bar, msix.pba_offset), (0, 0x3000));
        assert!(!f.is_pcie);
        assert_eq!(f.interrupt_pin, 1);
        assert_eq!(f.rom_size, 0);
    }

    #[test]
    fn reads_the_rom_region_size() {
        let mut cfg = edu_like();
        cfg.sizes[6] = 0x9000;
        assert_eq!(probe(&cfg).unwrap().rom_size, 0x9000);
    }

    #[test]
    fn looping_capability_chain_terminates() {
        let mut cfg = edu_like();
        cfg.bytes[0x51] = 0x40; // MSI-X points back at MSI
        assert!(probe(&cfg).is_ok());
    }
}
