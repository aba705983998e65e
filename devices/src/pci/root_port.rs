//! PCIe root port: the shared port core as device/port type 4 with a slot, using the IDs QEMU's
//! generic root port uses (Red Hat 1b36:000c), which Linux binds `pcieport` to by class alone.

use super::config::{ConfigError, PciIds};
use super::pcie_cap::{LinkConfig, PcieDeviceType, SlotConfig};
use super::port::PciePort;
use super::regs::CLASS_BRIDGE_PCI;

pub const ROOT_PORT_IDS: PciIds = PciIds {
    vendor_id: 0x1b36,
    device_id: 0x000c,
    revision: 0,
    class_code: CLASS_BRIDGE_PCI,
    subsystem_vendor_id: 0,
    subsystem_id: 0,
};

/// A root port with the default link (Gen5 x16) and port number `port_number`.
pub fn new(name: &str, port_number: u8, slot: Option<SlotConfig>) -> Result<PciePort, ConfigError> {
    let link = LinkConfig {
        port_number,
        ..LinkConfig::default()
    };
    with_link(name, link, slot)
}

/// A root port with an explicit link description.
pub fn with_link(
    name: &str,
    link: LinkConfig,
    slot: Option<SlotConfig>,
) -> Result<PciePort, ConfigError> {
    PciePort::new(name, &ROOT_PORT_IDS, PcieDeviceType::RootPort, link, slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::caps::capabilities;
    use crate::pci::regs::{CAP_ID_EXP, VENDOR_ID};
    use crate::pci::PciDevice;

    #[test]
    fn root_port_is_a_pci_bridge_with_a_pcie_capability() {
        let mut rp = new("rp0", 0, None).unwrap();
        let mut id = [0; 4];
        rp.read_config(VENDOR_ID, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x000c_1b36);
        assert_eq!(capabilities(&mut rp), vec![(CAP_ID_EXP, 0x40)]);
        assert_eq!(rp.kind(), PcieDeviceType::RootPort);
        assert!(rp.downstream_is_link());
    }
}
