//! PCIe switch: one upstream port (type 5) whose secondary bus is the switch's internal bus,
//! and N downstream ports (type 6) on that bus at device numbers 0..N, each with a slot and a
//! link to one device. Built from the shared port core; IDs are the TI XIO3130 ones QEMU's
//! `x3130-upstream` / `xio3130-downstream` use, which Linux has no quirks for.
//!
//! Devices behind two downstream ports of the same switch can reach each other without going
//! through the root complex, which is what Linux's p2pdma wants to see before it allows
//! peer-to-peer DMA between them.

use std::sync::{Arc, Mutex};

use super::config::{ConfigError, PciIds};
use super::pcie_cap::{LinkConfig, PcieDeviceType, SlotConfig};
use super::port::PciePort;
use super::regs::CLASS_BRIDGE_PCI;

pub const UPSTREAM_IDS: PciIds = PciIds {
    vendor_id: 0x104c,
    device_id: 0x8232,
    revision: 2,
    class_code: CLASS_BRIDGE_PCI,
    subsystem_vendor_id: 0,
    subsystem_id: 0,
};

pub const DOWNSTREAM_IDS: PciIds = PciIds {
    device_id: 0x8233,
    ..UPSTREAM_IDS
};

/// A downstream port is one device number on the internal bus.
pub const MAX_DOWNSTREAM_PORTS: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwitchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("a switch has 1 to {MAX_DOWNSTREAM_PORTS} downstream ports, not {0}")]
    Ports(usize),
}

/// The ports of one switch, ready to be placed on a segment.
pub struct PcieSwitch {
    pub upstream: Arc<Mutex<PciePort>>,
    /// Downstream port `i` sits at device `i` of the internal bus.
    pub downstream: Vec<Arc<Mutex<PciePort>>>,
}

impl PcieSwitch {
    /// `slots` gives each downstream port's slot (its length is the number of ports).
    pub fn new(name: &str, link: LinkConfig, slots: &[SlotConfig]) -> Result<Self, SwitchError> {
        if !(1..=MAX_DOWNSTREAM_PORTS).contains(&slots.len()) {
            return Err(SwitchError::Ports(slots.len()));
        }
        let upstream = PciePort::new(
            &format!("{name}-up"),
            &UPSTREAM_IDS,
            PcieDeviceType::UpstreamPort,
            link,
            None,
        )?;
        let downstream = slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let link = LinkConfig {
                    port_number: i as u8,
                    ..link
                };
                PciePort::new(
                    &format!("{name}-down{i}"),
                    &DOWNSTREAM_IDS,
                    PcieDeviceType::DownstreamPort,
                    link,
                    Some(*slot),
                )
                .map(|p| Arc::new(Mutex::new(p)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            upstream: Arc::new(Mutex::new(upstream)),
            downstream,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::lock;

    fn slots(n: u16) -> Vec<SlotConfig> {
        (0..n)
            .map(|i| SlotConfig {
                physical_slot: 10 + i,
                hotplug: false,
            })
            .collect()
    }

    #[test]
    fn switch_has_one_upstream_and_n_downstream_ports() {
        let sw = PcieSwitch::new("sw", LinkConfig::default(), &slots(3)).unwrap();
        assert_eq!(lock(&sw.upstream).kind(), PcieDeviceType::UpstreamPort);
        assert!(!lock(&sw.upstream).downstream_is_link());
        assert_eq!(sw.downstream.len(), 3);
        for port in &sw.downstream {
            let port = lock(port);
            assert_eq!(port.kind(), PcieDeviceType::DownstreamPort);
            assert!(port.downstream_is_link());
        }
    }

    #[test]
    fn port_count_is_validated() {
        let link = LinkConfig::default();
        assert_eq!(
            PcieSwitch::new("sw", link, &[]).err(),
            Some(SwitchError::Ports(0))
        );
        assert_eq!(
            PcieSwitch::new("sw", link, &slots(33)).err(),
            Some(SwitchError::Ports(33))
        );
    }
}
