//! The PCI Express capability (version 2), which makes a function a PCIe endpoint or port.
//!
//! Linux decides a lot from it: whether a bridge is a root port, switch upstream or downstream
//! port (and so which port services bind), whether the link is up (Data Link Layer Link Active,
//! used after resets and for hotplug), and what the slot can do. Links are emulated as always
//! trained at the configured speed and width; a guest retraining them sees no change.

use super::config::{ConfigError, ConfigRegs, ConfigSpace};
use super::regs::CAP_ID_EXP;

/// Device/port type field of the PCIe capabilities register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcieDeviceType {
    Endpoint,
    RootPort,
    UpstreamPort,
    DownstreamPort,
}

impl PcieDeviceType {
    fn code(self) -> u16 {
        match self {
            Self::Endpoint => 0,
            Self::RootPort => 4,
            Self::UpstreamPort => 5,
            Self::DownstreamPort => 6,
        }
    }

    /// Root and downstream ports own a link to a single device below them.
    pub fn is_downstream_facing(self) -> bool {
        matches!(self, Self::RootPort | Self::DownstreamPort)
    }
}

/// Link speed, encoded as the link capabilities register encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkSpeed {
    /// 2.5 GT/s
    Gen1 = 1,
    /// 5 GT/s
    Gen2 = 2,
    /// 8 GT/s
    Gen3 = 3,
    /// 16 GT/s
    Gen4 = 4,
    /// 32 GT/s
    Gen5 = 5,
}

/// What the link advertises. Defaults to Gen5 x16 so the emulated fabric never looks slower
/// than a passed-through device (Linux warns about "limited bandwidth" otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    pub speed: LinkSpeed,
    /// Lanes: 1, 2, 4, 8, 16 or 32.
    pub width: u8,
    /// Port number reported in link capabilities.
    pub port_number: u8,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            speed: LinkSpeed::Gen5,
            width: 16,
            port_number: 0,
        }
    }
}

/// A slot on a root or downstream port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotConfig {
    /// Physical slot number (13 bits), unique in the chassis; shows up in /sys/bus/pci/slots.
    pub physical_slot: u16,
    /// Advertise native hotplug (attention button, power controller, indicators). Only set
    /// this when the port can also raise hotplug interrupts, or pciehp waits for nothing.
    pub hotplug: bool,
}

const FLAGS: u16 = 0x02;
const DEVCAP: u16 = 0x04;
const DEVCTL: u16 = 0x08;
const DEVSTA: u16 = 0x0a;
const LNKCAP: u16 = 0x0c;
const LNKCTL: u16 = 0x10;
const LNKSTA: u16 = 0x12;
const SLTCAP: u16 = 0x14;
const SLTCTL: u16 = 0x18;
const SLTSTA: u16 = 0x1a;
const RTCTL: u16 = 0x1c;
const RTSTA: u16 = 0x20;
const LNKCAP2: u16 = 0x2c;
const LNKCTL2: u16 = 0x30;
const CAP_LEN: u16 = 0x3c;

const DEVCAP_RBER: u32 = 1 << 15;
/// Relaxed ordering, no snoop, 512-byte max read request: the spec's reset value.
const DEVCTL_POWER_ON: u16 = (1 << 4) | (1 << 11) | (2 << 12);
const LNKCAP_DLLLA_CAPABLE: u32 = 1 << 20;
const LNKCAP_ASPM_COMPLIANCE: u32 = 1 << 22;
/// ASPM control, read completion boundary, common clock, extended sync, autonomous width off.
const LNKCTL_WRITABLE: u16 = 0x3 | (1 << 3) | (1 << 6) | (1 << 7) | (1 << 9);
const LNKSTA_SLOT_CLOCK: u16 = 1 << 12;
const LNKSTA_DLLLA: u16 = 1 << 13;
const LNKSTA_RW1C: u16 = (1 << 14) | (1 << 15);
/// Attention button, power controller, attention and power indicators, hotplug capable, no
/// command completed support (so pciehp does not wait for completion interrupts).
const SLTCAP_HOTPLUG: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 18);
/// Event enables, indicators, power controller, interlock, DLL state changed enable.
const SLTCTL_WRITABLE: u16 = 0x1fff;
/// Power indicator on, attention indicator off, power on.
const SLTCTL_POWER_ON: u16 = (1 << 8) | (3 << 6);
/// Attention button, power fault, MRL sensor, presence detect and command completed changed,
/// and data link layer state changed.
const SLTSTA_RW1C: u16 = 0x1f | (1 << 8);
const SLTSTA_PRESENCE: u16 = 1 << 6;
const RTSTA_PME: u32 = 1 << 16;

/// A PCI Express capability placed in a config space.
#[derive(Clone, Copy, Debug)]
pub struct PcieCap {
    offset: u16,
    kind: PcieDeviceType,
    link: LinkConfig,
    slot: Option<SlotConfig>,
}

impl PcieCap {
    /// Adds the capability. `slot` is only meaningful for root and downstream ports and is
    /// ignored otherwise.
    pub fn add<const N: usize>(
        config: &mut ConfigSpace<N>,
        kind: PcieDeviceType,
        link: LinkConfig,
        slot: Option<SlotConfig>,
    ) -> Result<Self, ConfigError> {
        let slot = slot.filter(|_| kind.is_downstream_facing());
        let offset = config.add_capability(CAP_ID_EXP, CAP_LEN)?;
        let cap = Self {
            offset,
            kind,
            link,
            slot,
        };
        cap.init(config.regs_mut());
        Ok(cap)
    }

    fn init(&self, regs: &mut ConfigRegs) {
        let at = |r| self.offset + r;
        let slot_bit = if self.slot.is_some() { 1 << 8 } else { 0 };
        regs.init_u16(at(FLAGS), 2 | (self.kind.code() << 4) | slot_bit);
        regs.init_u32(at(DEVCAP), DEVCAP_RBER);
        regs.init_u16(at(DEVCTL), DEVCTL_POWER_ON);
        regs.set_writable_u16(at(DEVCTL), 0x7fff);
        regs.set_rw1c_u16(at(DEVSTA), 0xf);

        let speed = self.link.speed as u32;
        let mut lnkcap = speed
            | (u32::from(self.link.width) << 4)
            | LNKCAP_ASPM_COMPLIANCE
            | (u32::from(self.link.port_number) << 24);
        if self.kind.is_downstream_facing() {
            lnkcap |= LNKCAP_DLLLA_CAPABLE;
        }
        regs.init_u32(at(LNKCAP), lnkcap);
        regs.set_writable_u16(at(LNKCTL), LNKCTL_WRITABLE);
        regs.set_rw1c_u16(at(LNKSTA), LNKSTA_RW1C);
        regs.init_u32(at(LNKCAP2), ((1 << speed) - 1) << 1);
        regs.init_u16(at(LNKCTL2), speed as u16);
        regs.set_writable_u16(at(LNKCTL2), 0xf);

        if let Some(slot) = self.slot {
            let mut sltcap = u32::from(slot.physical_slot & 0x1fff) << 19;
            if slot.hotplug {
                sltcap |= SLTCAP_HOTPLUG;
                regs.init_u16(at(SLTCTL), SLTCTL_POWER_ON);
                regs.set_writable_u16(at(SLTCTL), SLTCTL_WRITABLE);
            }
            regs.init_u32(at(SLTCAP), sltcap);
            regs.set_rw1c_u16(at(SLTSTA), SLTSTA_RW1C);
        }
        if self.kind == PcieDeviceType::RootPort {
            regs.set_writable_u16(at(RTCTL), 0xf);
            regs.set_rw1c_u32(at(RTSTA), RTSTA_PME);
        }
        // An upstream port's or endpoint's link goes to something that exists by construction.
        self.set_link_active(regs, !self.kind.is_downstream_facing());
    }

    pub fn offset(&self) -> u16 {
        self.offset
    }

    pub fn kind(&self) -> PcieDeviceType {
        self.kind
    }

    pub fn has_slot(&self) -> bool {
        self.slot.is_some()
    }

    /// Reports the link as trained (device present) or down. Updates link status and, for
    /// slots, presence detect state; the event bits a hotplug controller latches are left to it.
    pub fn set_link_active(&self, regs: &mut ConfigRegs, active: bool) {
        let mut lnksta = LNKSTA_SLOT_CLOCK | self.link.speed as u16;
        if active {
            lnksta |= u16::from(self.link.width) << 4;
            if self.kind.is_downstream_facing() {
                lnksta |= LNKSTA_DLLLA;
            }
        }
        regs.set_u16(self.offset + LNKSTA, lnksta);
        if self.slot.is_some() {
            let status = regs.read_u16(self.offset + SLTSTA) & !SLTSTA_PRESENCE;
            let presence = if active { SLTSTA_PRESENCE } else { 0 };
            regs.set_u16(self.offset + SLTSTA, status | presence);
        }
    }

    /// True if the data link layer reports the link up.
    pub fn link_active(&self, regs: &ConfigRegs) -> bool {
        let width = (regs.read_u16(self.offset + LNKSTA) >> 4) & 0x3f;
        width != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{PciIds, Type1Config};

    const IDS: PciIds = PciIds {
        vendor_id: 0x1b36,
        device_id: 0x000c,
        revision: 0,
        class_code: 0x06_04_00,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
    };

    fn root_port(slot: Option<SlotConfig>) -> (Type1Config, PcieCap) {
        let mut config = Type1Config::new(&IDS);
        let link = LinkConfig {
            speed: LinkSpeed::Gen4,
            width: 8,
            port_number: 3,
        };
        let cap = PcieCap::add(&mut config, PcieDeviceType::RootPort, link, slot).unwrap();
        (config, cap)
    }

    #[test]
    fn root_port_type_version_and_slot_bit() {
        let (config, cap) = root_port(Some(SlotConfig {
            physical_slot: 5,
            hotplug: false,
        }));
        let flags = config.regs().read_u16(cap.offset() + FLAGS);
        assert_eq!(flags, 0x0142);
        assert_eq!(config.regs().read_u32(cap.offset() + SLTCAP), 5 << 19);
    }

    #[test]
    fn link_capabilities_advertise_speed_width_and_dll_reporting() {
        let (config, cap) = root_port(None);
        let lnkcap = config.regs().read_u32(cap.offset() + LNKCAP);
        assert_eq!(lnkcap, 0x0350_0084);
        // Gen4 supports 2.5, 5, 8 and 16 GT/s.
        assert_eq!(config.regs().read_u32(cap.offset() + LNKCAP2), 0b1_1110);
    }

    #[test]
    fn link_comes_up_with_presence() {
        let (mut config, cap) = root_port(Some(SlotConfig {
            physical_slot: 1,
            hotplug: true,
        }));
        assert!(!cap.link_active(config.regs()));
        assert_eq!(
            config.regs().read_u16(cap.offset() + SLTSTA) & SLTSTA_PRESENCE,
            0
        );
        cap.set_link_active(config.regs_mut(), true);
        let lnksta = config.regs().read_u16(cap.offset() + LNKSTA);
        assert_eq!(lnksta, LNKSTA_DLLLA | LNKSTA_SLOT_CLOCK | (8 << 4) | 4);
        assert_ne!(
            config.regs().read_u16(cap.offset() + SLTSTA) & SLTSTA_PRESENCE,
            0
        );
        assert!(cap.link_active(config.regs()));
    }

    #[test]
    fn link_status_is_read_only_and_slot_events_are_rw1c() {
        let (mut config, cap) = root_port(Some(SlotConfig {
            physical_slot: 1,
            hotplug: true,
        }));
        cap.set_link_active(config.regs_mut(), true);
        let before = config.regs().read_u16(cap.offset() + LNKSTA);
        config.write(cap.offset() + LNKSTA, &0u16.to_le_bytes());
        assert_eq!(config.regs().read_u16(cap.offset() + LNKSTA), before);

        let sltsta = cap.offset() + SLTSTA;
        let status = config.regs().read_u16(sltsta);
        config
            .regs_mut()
            .set_u16(sltsta, status | (1 << 3) | (1 << 8));
        config.write(sltsta, &(1u16 << 3).to_le_bytes());
        assert_eq!(config.regs().read_u16(sltsta), SLTSTA_PRESENCE | (1 << 8));
    }

    #[test]
    fn hotplug_slots_advertise_capabilities_and_writable_control() {
        let (mut config, cap) = root_port(Some(SlotConfig {
            physical_slot: 2,
            hotplug: true,
        }));
        let sltcap = config.regs().read_u32(cap.offset() + SLTCAP);
        assert_eq!(sltcap & (1 << 6), 1 << 6, "hot-plug capable");
        assert_eq!(sltcap & (1 << 18), 1 << 18, "no command completed support");
        config.write(cap.offset() + SLTCTL, &0x0028u16.to_le_bytes());
        assert_eq!(config.regs().read_u16(cap.offset() + SLTCTL), 0x0028);
    }

    #[test]
    fn upstream_ports_have_no_slot_and_an_active_link() {
        let mut config = Type1Config::new(&IDS);
        let slot = Some(SlotConfig {
            physical_slot: 1,
            hotplug: false,
        });
        let cap = PcieCap::add(
            &mut config,
            PcieDeviceType::UpstreamPort,
            LinkConfig::default(),
            slot,
        )
        .unwrap();
        assert!(!cap.has_slot());
        assert_eq!(config.regs().read_u16(cap.offset() + FLAGS), 0x0052);
        assert!(cap.link_active(config.regs()));
    }
}
