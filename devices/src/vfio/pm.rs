//! The host function's power management capability, as the guest sees it: D0 and D3hot, the two
//! states every PCI PM capability has, with the guest's writes passed to the device through
//! VFIO (as QEMU does). VFIO acts on them: entering D3hot revokes the device's dmabufs and zaps
//! its BAR mmaps, and back in D0 (with memory decoding on) it lets them be mapped again, so the
//! device model tells the P2P table after each change.
//!
//! Shown: the version and the device-specific-initialisation bit of the host's PMC (no D1/D2, no
//! PME), and in PMCSR the power state (writable; D1/D2 writes are ignored, as on a device without
//! them) and the host's No_Soft_Reset bit.

use std::ops::Range;

use crate::pci::{ConfigError, Type0Config};

pub const CAP_ID_PM: u8 = 0x01;
const PMC: u16 = 2;
const PMCSR: u16 = 4;
const CAP_LEN: u16 = 8;
/// Version (2:0) and DSI (5) survive; PME support, D1/D2 support and AUX current are dropped.
const PMC_SHOWN: u16 = 0x0007 | (1 << 5);
const STATE_MASK: u16 = 0x3;
const NO_SOFT_RESET: u16 = 1 << 3;

/// A device power state the guest can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    D0,
    D3Hot,
}

impl PowerState {
    fn bits(self) -> u16 {
        match self {
            PowerState::D0 => 0,
            PowerState::D3Hot => 3,
        }
    }
}

/// The emulated capability: where it is in the guest's and in the host's config space.
#[derive(Clone, Debug)]
pub struct VfioPm {
    offset: u16,
    host_offset: u16,
    state: PowerState,
}

impl VfioPm {
    /// Adds the capability (the host's at `host_offset`, with PMC `host_pmc` and PMCSR
    /// `host_pmcsr`) to `config`, in D0.
    pub fn add(
        config: &mut Type0Config,
        host_offset: u16,
        host_pmc: u16,
        host_pmcsr: u16,
    ) -> Result<Self, ConfigError> {
        let offset = config.add_capability(CAP_ID_PM, CAP_LEN)?;
        let regs = config.regs_mut();
        regs.init_u16(offset + PMC, host_pmc & PMC_SHOWN);
        regs.init_u16(offset + PMCSR, host_pmcsr & NO_SOFT_RESET);
        regs.set_writable_u16(offset + PMCSR, STATE_MASK);
        Ok(Self {
            offset,
            host_offset,
            state: PowerState::D0,
        })
    }

    /// The capability's bytes in the guest's config space.
    pub fn range(&self) -> Range<u16> {
        self.offset..self.offset + CAP_LEN
    }

    /// The host's PMCSR (where the power state goes) in the VFIO config region.
    pub fn host_pmcsr(&self) -> u16 {
        self.host_offset + PMCSR
    }

    pub fn state(&self) -> PowerState {
        self.state
    }

    /// After a guest write to the capability: the new power state when it changed. A D1 or D2
    /// write is put back to the current state (the capability does not offer them).
    pub fn update(&mut self, config: &mut Type0Config) -> Option<PowerState> {
        let at = self.offset + PMCSR;
        let regs = config.regs_mut();
        let value = regs.read_u16(at);
        let wanted = match value & STATE_MASK {
            0 => PowerState::D0,
            3 => PowerState::D3Hot,
            _ => self.state,
        };
        regs.set_u16(at, (value & !STATE_MASK) | wanted.bits());
        (wanted != self.state).then(|| {
            self.state = wanted;
            wanted
        })
    }

    /// The host PMCSR value that puts the device in `state`, from its current value `host`.
    pub fn host_value(host: u16, state: PowerState) -> u16 {
        // PME_Status (15) is RW1C: writing back a set bit would clear it behind the guest.
        (host & !STATE_MASK & !(1 << 15)) | state.bits()
    }

    /// After a reset of the model: the registers are back in D0.
    pub fn reset(&mut self) -> Option<PowerState> {
        (self.state != PowerState::D0).then(|| {
            self.state = PowerState::D0;
            PowerState::D0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciIds;

    fn config() -> Type0Config {
        Type0Config::new(&PciIds {
            vendor_id: 0x1b36,
            device_id: 0x0010,
            class_code: 0x01_08_02,
            revision: 2,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        })
    }

    fn write_state(config: &mut Type0Config, pm: &mut VfioPm, value: u16) -> Option<PowerState> {
        config.write(pm.range().start + PMCSR, &value.to_le_bytes());
        pm.update(config)
    }

    #[test]
    fn the_guest_sees_d0_and_d3hot_only_and_the_hosts_no_soft_reset() {
        let mut config = config();
        // QEMU's nvme: PM 1.2, No_Soft_Reset; PME from D3hot (bit 14) is not shown.
        let mut pm = VfioPm::add(&mut config, 0x60, 0x4003, 0x0008).unwrap();
        let at = pm.range().start;
        assert_eq!(config.regs().read_u8(at), CAP_ID_PM);
        assert_eq!(config.regs().read_u16(at + PMC), 0x0003);
        assert_eq!(config.regs().read_u16(at + PMCSR), 0x0008);
        assert_eq!(pm.host_pmcsr(), 0x64);

        assert_eq!(
            write_state(&mut config, &mut pm, 3),
            Some(PowerState::D3Hot)
        );
        assert_eq!(config.regs().read_u16(at + PMCSR), 0x000b);
        // Rewriting D3hot is no change; D1 is ignored.
        assert_eq!(write_state(&mut config, &mut pm, 3), None);
        assert_eq!(write_state(&mut config, &mut pm, 1), None);
        assert_eq!(config.regs().read_u16(at + PMCSR) & STATE_MASK, 3);
        // No_Soft_Reset is read-only.
        assert_eq!(write_state(&mut config, &mut pm, 0), Some(PowerState::D0));
        assert_eq!(config.regs().read_u16(at + PMCSR), 0x0008);
    }

    #[test]
    fn the_host_value_keeps_other_bits_and_never_clears_pme_status() {
        assert_eq!(VfioPm::host_value(0x8108, PowerState::D3Hot), 0x010b);
        assert_eq!(VfioPm::host_value(0x000b, PowerState::D0), 0x0008);
    }

    #[test]
    fn a_reset_reports_the_return_to_d0_once() {
        let mut config = config();
        let mut pm = VfioPm::add(&mut config, 0x40, 0x0003, 0).unwrap();
        assert_eq!(pm.reset(), None);
        write_state(&mut config, &mut pm, 3);
        assert_eq!(pm.reset(), Some(PowerState::D0));
        assert_eq!(pm.state(), PowerState::D0);
    }
}
