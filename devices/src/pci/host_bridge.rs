//! The host bridge at 00:00.0: a type-0 function with no BARs that names the root complex.
//! Linux does not need it to enumerate (ACPI describes the root bridge) but expects bus 0
//! device 0 to exist, and tools identify the platform by it. Red Hat 1b36:0008 is the
//! "QEMU PCIe host bridge" ID, so guests treat it as a generic, quirk-free bridge.

use super::bar::BarInfo;
use super::config::{PciIds, Type0Config};
use super::regs::CLASS_BRIDGE_HOST;
use super::PciDevice;

pub const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor_id: 0x1b36,
    device_id: 0x0008,
    revision: 0,
    class_code: CLASS_BRIDGE_HOST,
    subsystem_vendor_id: 0x1b36,
    subsystem_id: 0x0008,
};

pub struct HostBridge {
    config: Type0Config,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: Type0Config::new(&HOST_BRIDGE_IDS),
        }
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bars(&self) -> [Option<BarInfo>; 6] {
        self.config.bars()
    }

    fn command(&self) -> u16 {
        self.config.command()
    }

    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn reset(&mut self) {
        self.config.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_identifies_as_a_host_bridge() {
        let mut hb = HostBridge::new();
        let mut data = [0; 4];
        hb.read_config(0x08, &mut data);
        assert_eq!(u32::from_le_bytes(data) >> 8, CLASS_BRIDGE_HOST);
        hb.read_config(0x00, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0008_1b36);
        assert!(hb.bars().iter().all(Option::is_none));
    }
}
