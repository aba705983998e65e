//! Capability chains: standard capabilities linked from the pointer at 0x34 and living in
//! 0x40..0x100, and extended capabilities chained from 0x100.
//!
//! Capabilities are only appended, so a chain is built once when the device model is created and
//! never relinked while the guest runs. The walkers work on any [`PciDevice`] so tests (and
//! passthrough code) can check what the guest will actually see.

use super::config::{ConfigError, ConfigRegs};
use super::regs::*;
use super::PciDevice;

/// Where the next capability goes and which one to link it from.
#[derive(Debug)]
pub(crate) struct CapList {
    next: u16,
    last: Option<u16>,
    next_ext: u16,
    last_ext: Option<u16>,
}

impl CapList {
    pub(crate) fn new() -> Self {
        Self {
            next: CAP_START,
            last: None,
            next_ext: EXT_CAP_START,
            last_ext: None,
        }
    }

    /// Reserves `len` bytes (rounded up to a dword) for a standard capability and links it.
    pub(crate) fn add(
        &mut self,
        regs: &mut ConfigRegs,
        id: u8,
        len: u16,
    ) -> Result<u16, ConfigError> {
        self.place(regs, id, len, self.next)
    }

    /// Like [`CapList::add`], but at `preferred` when that is still free: dword aligned, at or
    /// above everything allocated so far, with room for `len` bytes before 0x100. Otherwise
    /// the capability goes where [`CapList::add`] would put it. For capabilities other VMMs
    /// put at a fixed offset that guest software may look for there; the bytes skipped stay
    /// unused, since capabilities are only appended.
    pub(crate) fn add_preferring(
        &mut self,
        regs: &mut ConfigRegs,
        id: u8,
        len: u16,
        preferred: u16,
    ) -> Result<u16, ConfigError> {
        let size = len.max(2).next_multiple_of(4);
        let free = preferred.is_multiple_of(4)
            && preferred >= self.next
            && preferred
                .checked_add(size)
                .is_some_and(|end| end <= LEGACY_CONFIG_END);
        self.place(regs, id, len, if free { preferred } else { self.next })
    }

    fn place(
        &mut self,
        regs: &mut ConfigRegs,
        id: u8,
        len: u16,
        offset: u16,
    ) -> Result<u16, ConfigError> {
        let size = len.max(2).next_multiple_of(4);
        if offset + size > LEGACY_CONFIG_END {
            return Err(ConfigError::CapabilitySpace { id: id.into(), len });
        }
        regs.init_u8(offset, id);
        regs.init_u8(offset + 1, 0);
        match self.last {
            Some(prev) => regs.init_u8(prev + 1, offset as u8),
            None => {
                regs.init_u8(CAPABILITY_LIST, offset as u8);
                let status = regs.read_u16(STATUS);
                regs.init_u16(STATUS, status | STATUS_CAP_LIST);
            }
        }
        self.last = Some(offset);
        self.next = offset + size;
        Ok(offset)
    }

    /// Reserves `len` bytes for an extended capability and links it. The first one lands at
    /// 0x100, where the guest starts walking.
    pub(crate) fn add_extended(
        &mut self,
        regs: &mut ConfigRegs,
        id: u16,
        version: u8,
        len: u16,
    ) -> Result<u16, ConfigError> {
        let size = len.max(4).next_multiple_of(4);
        let offset = self.next_ext;
        if usize::from(offset + size) > CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilitySpace { id, len });
        }
        regs.init_u32(offset, ext_header(id, version, 0));
        if let Some(prev) = self.last_ext {
            let header = regs.read_u32(prev);
            regs.init_u32(prev, (header & 0x000f_ffff) | (u32::from(offset) << 20));
        }
        self.last_ext = Some(offset);
        self.next_ext = offset + size;
        Ok(offset)
    }
}

fn ext_header(id: u16, version: u8, next: u16) -> u32 {
    u32::from(id) | (u32::from(version & 0xf) << 16) | (u32::from(next) << 20)
}

fn read_u32(device: &mut dyn PciDevice, offset: u16) -> u32 {
    let mut b = [0; 4];
    device.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

/// The standard capabilities a guest finds, as (id, offset) in chain order. Stops on a loop or
/// a pointer outside 0x40..0x100, as Linux does.
pub fn capabilities(device: &mut dyn PciDevice) -> Vec<(u8, u16)> {
    let mut out = Vec::new();
    let status = read_u32(device, COMMAND) >> 16;
    if status & u32::from(STATUS_CAP_LIST) == 0 {
        return out;
    }
    let mut offset = (read_u32(device, CAPABILITY_LIST) & 0xfc) as u16;
    // 48 = (0x100 - 0x40) / 4 capabilities at most.
    while (CAP_START..LEGACY_CONFIG_END).contains(&offset) && out.len() < 48 {
        let header = read_u32(device, offset);
        out.push((header as u8, offset));
        offset = ((header >> 8) & 0xfc) as u16;
    }
    out
}

/// The extended capabilities a guest finds, as (id, version, offset) in chain order.
pub fn extended_capabilities(device: &mut dyn PciDevice) -> Vec<(u16, u8, u16)> {
    let mut out = Vec::new();
    let mut offset = EXT_CAP_START;
    // 960 = (0x1000 - 0x100) / 4 capabilities at most.
    while offset >= EXT_CAP_START && usize::from(offset) < CONFIG_SPACE_SIZE && out.len() < 960 {
        let header = read_u32(device, offset);
        if header == 0 || header == u32::MAX {
            break;
        }
        out.push((header as u16, ((header >> 16) & 0xf) as u8, offset));
        offset = ((header >> 20) & 0xffc) as u16;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::FakeEndpoint;

    #[test]
    fn standard_capabilities_chain_from_0x40() {
        let mut dev = FakeEndpoint::new("dev");
        let a = dev.config.add_capability(CAP_ID_VNDR, 6).unwrap();
        let b = dev.config.add_capability(CAP_ID_MSI, 14).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(
            capabilities(&mut dev),
            vec![(CAP_ID_VNDR, 0x40), (CAP_ID_MSI, 0x48)]
        );
        assert_ne!(dev.config.regs().read_u16(STATUS) & STATUS_CAP_LIST, 0);
    }

    #[test]
    fn a_preferred_offset_is_used_while_free() {
        let mut dev = FakeEndpoint::new("dev");
        dev.config.add_capability(CAP_ID_MSI, 14).unwrap();
        let at = dev.config.add_capability_preferring(CAP_ID_VNDR, 8, 0xd4);
        assert_eq!(at, Ok(0xd4));
        // Later capabilities go after it.
        assert_eq!(dev.config.add_capability(CAP_ID_MSIX, 12), Ok(0xdc));
        assert_eq!(
            capabilities(&mut dev),
            vec![(CAP_ID_MSI, 0x40), (CAP_ID_VNDR, 0xd4), (CAP_ID_MSIX, 0xdc)]
        );
    }

    #[test]
    fn a_preferred_offset_already_passed_or_misaligned_falls_back() {
        let mut dev = FakeEndpoint::new("dev");
        dev.config.add_capability(CAP_ID_VNDR, 0xa0).unwrap();
        assert_eq!(
            dev.config.add_capability_preferring(CAP_ID_VNDR, 8, 0xd4),
            Ok(0xe0)
        );
        assert_eq!(
            dev.config.add_capability_preferring(CAP_ID_VNDR, 4, 0xea),
            Ok(0xe8)
        );
        assert_eq!(
            dev.config.add_capability_preferring(CAP_ID_VNDR, 8, 0xfc),
            Ok(0xec)
        );
        assert_eq!(capabilities(&mut dev).len(), 4);
    }

    #[test]
    fn capability_headers_are_read_only() {
        let mut dev = FakeEndpoint::new("dev");
        dev.config.add_capability(CAP_ID_VNDR, 4).unwrap();
        dev.config.add_capability(CAP_ID_VNDR, 4).unwrap();
        dev.config.write(0x40, &[0xff, 0xff]);
        dev.config.write(CAPABILITY_LIST, &[0x80]);
        assert_eq!(dev.config.regs().read_u16(0x40), 0x4409);
        assert_eq!(dev.config.regs().read_u8(CAPABILITY_LIST), 0x40);
    }

    #[test]
    fn no_capabilities_means_no_list() {
        let mut dev = FakeEndpoint::new("dev");
        assert!(capabilities(&mut dev).is_empty());
        assert!(extended_capabilities(&mut dev).is_empty());
    }

    #[test]
    fn standard_capabilities_cannot_spill_into_extended_space() {
        let mut dev = FakeEndpoint::new("dev");
        dev.config.add_capability(CAP_ID_VNDR, 0xb0).unwrap();
        assert_eq!(
            dev.config.add_capability(CAP_ID_MSI, 0x14),
            Err(ConfigError::CapabilitySpace { id: 5, len: 0x14 })
        );
    }

    #[test]
    fn extended_capabilities_chain_from_0x100() {
        let mut dev = FakeEndpoint::new("dev");
        dev.config
            .add_extended_capability(EXT_CAP_ID_VNDR, 1, 0x18)
            .unwrap();
        dev.config.add_extended_capability(0x0d, 1, 8).unwrap();
        assert_eq!(
            extended_capabilities(&mut dev),
            vec![(EXT_CAP_ID_VNDR, 1, 0x100), (0x0d, 1, 0x118)]
        );
        assert_eq!(dev.config.regs().read_u32(0x100), 0x1181_000b);
    }

    #[test]
    fn extended_capabilities_stay_inside_4k() {
        let mut dev = FakeEndpoint::new("dev");
        dev.config
            .add_extended_capability(EXT_CAP_ID_VNDR, 1, 0xf00)
            .unwrap();
        assert!(dev.config.add_extended_capability(0x0d, 1, 4).is_err());
    }
}
