//! Per-device options of the VFIO PCI device model that change what the guest sees, beyond what
//! the host function itself has.
//!
//! The only one so far is NVIDIA's GPUDirect P2P clique: NVIDIA's driver only enables
//! peer-to-peer DMA between GPUs it can prove share a PCIe hierarchy, which it cannot in a VM.
//! A vendor-specific capability carrying a clique ID tells it instead: GPUs reporting the same
//! clique ID may DMA to each other. QEMU (`x-nv-gpudirect-clique`, `vfio_add_nv_gpudirect_cap`)
//! and Cloud Hypervisor (`x_nv_gpudirect_clique`) add the same 8 bytes, so guests see the
//! layout their driver already knows:
//!
//! | byte | value |
//! | --- | --- |
//! | 0 | capability ID 0x09 (vendor specific) |
//! | 1 | next pointer |
//! | 2 | length, 8 |
//! | 3..6 | signature `P2P` |
//! | 6 | clique ID in bits 6:3 |
//! | 7 | 0 |
//!
//! All of it is read-only.

use crate::pci::regs::CAP_ID_VNDR;
use crate::pci::{ConfigError, Type0Config};

/// Where Cloud Hypervisor puts the clique capability; used while the chain has not reached it.
pub const GPUDIRECT_CAP_OFFSET: u16 = 0xd4;
/// Length of the clique capability, header included.
pub const GPUDIRECT_CAP_LEN: u8 = 8;
/// Clique IDs are 4 bits wide (byte 6, bits 6:3).
pub const MAX_CLIQUE_ID: u8 = 15;

/// Options for [`super::VfioPciDevice::new`]; the default adds nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioPciOptions {
    /// NVIDIA GPUDirect P2P clique ID (0-[`MAX_CLIQUE_ID`]): add the clique capability so the
    /// guest driver lets GPUs with the same ID do peer-to-peer DMA. `None`: no capability.
    pub clique: Option<u8>,
}

/// Why [`VfioPciOptions`] cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfioOptionsError {
    #[error("GPUDirect clique ID {0} is out of range (0 to {MAX_CLIQUE_ID})")]
    CliqueRange(u8),
    #[error("adding the GPUDirect clique capability: {0}")]
    CliqueCapability(#[source] ConfigError),
}

impl VfioPciOptions {
    /// Checks the options without a device, so a configuration can be rejected before
    /// anything is opened.
    pub fn validate(&self) -> Result<(), VfioOptionsError> {
        match self.clique {
            Some(clique) if clique > MAX_CLIQUE_ID => Err(VfioOptionsError::CliqueRange(clique)),
            _ => Ok(()),
        }
    }

    /// Validates the options and adds the capabilities they ask for to `config`; returns the
    /// offset of the clique capability, if one was added. Nothing is added on error.
    pub fn add_capabilities(
        &self,
        config: &mut Type0Config,
    ) -> Result<Option<u16>, VfioOptionsError> {
        self.validate()?;
        let Some(clique) = self.clique else {
            return Ok(None);
        };
        let len = u16::from(GPUDIRECT_CAP_LEN);
        let offset = config
            .add_capability_preferring(CAP_ID_VNDR, len, GPUDIRECT_CAP_OFFSET)
            .map_err(VfioOptionsError::CliqueCapability)?;
        let regs = config.regs_mut();
        // ID and next pointer belong to the chain; the rest is ours, and nothing is writable.
        let body = [GPUDIRECT_CAP_LEN, b'P', b'2', b'P', clique << 3, 0];
        for (at, byte) in (offset + 2..).zip(body) {
            regs.init_u8(at, byte);
        }
        Ok(Some(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::caps::capabilities;
    use crate::pci::fake::FakeEndpoint;
    use crate::pci::regs::{CAP_ID_EXP, CAP_ID_MSI, CAP_ID_MSIX};
    use crate::pci::PciDevice;

    /// An endpoint with the capabilities the VFIO model emulates for a GPU: PCIe, MSI, MSI-X.
    fn gpu_like() -> FakeEndpoint {
        let mut dev = FakeEndpoint::new("gpu");
        dev.config.add_capability(CAP_ID_EXP, 0x3c).unwrap();
        dev.config.add_capability(CAP_ID_MSI, 24).unwrap();
        dev.config.add_capability(CAP_ID_MSIX, 12).unwrap();
        dev
    }

    fn clique(id: u8) -> VfioPciOptions {
        VfioPciOptions { clique: Some(id) }
    }

    /// The clique capability as the guest finds it: walking the chain from 0x34.
    fn find_clique_cap(dev: &mut FakeEndpoint) -> Option<(u16, [u8; 8])> {
        let caps = capabilities(dev);
        let (_, offset) = caps.into_iter().find(|(id, offset)| {
            let mut signature = [0; 3];
            dev.read_config(offset + 3, &mut signature);
            *id == CAP_ID_VNDR && &signature == b"P2P"
        })?;
        let mut bytes = [0; 8];
        dev.read_config(offset, &mut bytes[..4]);
        dev.read_config(offset + 4, &mut bytes[4..]);
        Some((offset, bytes))
    }

    #[test]
    fn the_guest_finds_the_clique_capability_at_0xd4_with_its_id() {
        for id in [0, 5, 15] {
            let mut dev = gpu_like();
            assert_eq!(clique(id).add_capabilities(&mut dev.config), Ok(Some(0xd4)));
            let (offset, bytes) = find_clique_cap(&mut dev).expect("capability in the chain");
            assert_eq!(offset, GPUDIRECT_CAP_OFFSET);
            assert_eq!(
                bytes,
                [0x09, 0x00, 0x08, b'P', b'2', b'P', id << 3, 0x00],
                "{id}"
            );
            // Last in the chain, after the interrupt capabilities.
            let ids: Vec<_> = capabilities(&mut dev).iter().map(|c| c.0).collect();
            assert_eq!(ids, [CAP_ID_EXP, CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_VNDR]);
        }
    }

    #[test]
    fn the_clique_capability_is_read_only() {
        let mut dev = gpu_like();
        clique(5).add_capabilities(&mut dev.config).unwrap();
        let (offset, before) = find_clique_cap(&mut dev).unwrap();
        dev.write_config(offset, &[0xff; 4]);
        dev.write_config(offset + 4, &[0xff; 4]);
        dev.write_config(offset + 6, &[0]);
        assert_eq!(find_clique_cap(&mut dev), Some((offset, before)));
    }

    #[test]
    fn without_the_option_there_is_no_clique_capability() {
        let mut dev = gpu_like();
        let before = capabilities(&mut dev);
        assert_eq!(
            VfioPciOptions::default().add_capabilities(&mut dev.config),
            Ok(None)
        );
        assert_eq!(capabilities(&mut dev), before);
        assert_eq!(find_clique_cap(&mut dev), None);
    }

    #[test]
    fn clique_ids_above_15_are_rejected_and_add_nothing() {
        for id in [16, 0xff] {
            assert_eq!(
                clique(id).validate(),
                Err(VfioOptionsError::CliqueRange(id))
            );
            let mut dev = gpu_like();
            let before = capabilities(&mut dev);
            assert_eq!(
                clique(id).add_capabilities(&mut dev.config),
                Err(VfioOptionsError::CliqueRange(id))
            );
            assert_eq!(capabilities(&mut dev), before);
        }
        assert_eq!(clique(15).validate(), Ok(()));
    }

    #[test]
    fn a_chain_past_0xd4_gets_the_capability_after_it() {
        let mut dev = FakeEndpoint::new("dev");
        dev.config.add_capability(CAP_ID_VNDR, 0xa0).unwrap();
        assert_eq!(clique(3).add_capabilities(&mut dev.config), Ok(Some(0xe0)));
        let (offset, bytes) = find_clique_cap(&mut dev).unwrap();
        assert_eq!((offset, bytes[6]), (0xe0, 3 << 3));
    }

    #[test]
    fn a_full_chain_is_a_typed_error() {
        let mut dev = FakeEndpoint::new("dev");
        dev.config.add_capability(CAP_ID_VNDR, 0xbc).unwrap();
        assert!(matches!(
            clique(1).add_capabilities(&mut dev.config),
            Err(VfioOptionsError::CliqueCapability(
                ConfigError::CapabilitySpace { .. }
            ))
        ));
    }
}
