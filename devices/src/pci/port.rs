//! The shared core of every PCIe port: a type-1 header (bus numbers, forwarding windows, bridge
//! control) plus a PCI Express capability. Root ports and switch ports differ only in IDs,
//! port type and whether they have a slot (see `root_port.rs` and `switch.rs`).
//!
//! A port holds no children: the segment owns the tree and asks the port which buses it
//! forwards ([`PciePort::bus_range`]). Forwarding windows do not gate the CPU's MMIO: the VMM
//! maps each BAR directly where the guest put it, so a BAR outside its bridge's window still
//! decodes for the CPU (real hardware would make it unreachable; Linux never programs that).
//! They do gate peers: the segment tells the VMM whether the bridges above a BAR forward it
//! ([`PciePort::forwards`], `BarChange::forwarded`), and a BAR they do not forward stays out of
//! the IOMMU, so a peer's DMA there does not reach it, as on hardware.

use std::ops::RangeInclusive;

use super::bar::{BarInfo, BarKind};
use super::config::{ConfigError, PciIds, Type1Config};
use super::pcie_cap::{LinkConfig, PcieCap, PcieDeviceType, SlotConfig};
use super::regs::*;
use super::PciDevice;
use crate::bus::BusRange;

/// A PCIe root port, switch upstream port or switch downstream port.
pub struct PciePort {
    name: String,
    config: Type1Config,
    pcie: PcieCap,
    /// Set when the guest starts a secondary bus reset, until the segment takes it.
    reset_requested: bool,
}

impl PciePort {
    pub fn new(
        name: &str,
        ids: &PciIds,
        kind: PcieDeviceType,
        link: LinkConfig,
        slot: Option<SlotConfig>,
    ) -> Result<Self, ConfigError> {
        let mut config = Type1Config::new(ids);
        let pcie = PcieCap::add(&mut config, kind, link, slot)?;
        Ok(Self {
            name: name.to_string(),
            config,
            pcie,
            reset_requested: false,
        })
    }

    pub fn kind(&self) -> PcieDeviceType {
        self.pcie.kind()
    }

    /// True if only device 0 exists below (a link, not a switch's internal bus): type-0
    /// accesses to other device numbers on the secondary bus are not forwarded.
    pub fn downstream_is_link(&self) -> bool {
        self.kind().is_downstream_facing()
    }

    pub fn primary_bus(&self) -> u8 {
        self.config.regs().read_u8(PRIMARY_BUS)
    }

    /// The buses this port forwards config accesses to (secondary..=subordinate), or `None`
    /// while unprogrammed (secondary 0) or inconsistent (subordinate below secondary).
    pub fn bus_range(&self) -> Option<RangeInclusive<u8>> {
        let regs = self.config.regs();
        let (secondary, subordinate) = (regs.read_u8(SECONDARY_BUS), regs.read_u8(SUBORDINATE_BUS));
        (secondary != 0 && subordinate >= secondary).then_some(secondary..=subordinate)
    }

    /// I/O window (4 KiB granularity, 16-bit decode), if open.
    pub fn io_window(&self) -> Option<BusRange> {
        let regs = self.config.regs();
        let base = u64::from(regs.read_u8(IO_BASE) & 0xf0) << 8;
        let limit = (u64::from(regs.read_u8(IO_LIMIT) & 0xf0) << 8) | 0xfff;
        window(base, limit)
    }

    /// Non-prefetchable memory window (1 MiB granularity, below 4 GiB), if open.
    pub fn mem_window(&self) -> Option<BusRange> {
        let regs = self.config.regs();
        let base = u64::from(regs.read_u16(MEMORY_BASE) & 0xfff0) << 16;
        let limit = (u64::from(regs.read_u16(MEMORY_LIMIT) & 0xfff0) << 16) | 0xf_ffff;
        window(base, limit)
    }

    /// 64-bit prefetchable memory window (1 MiB granularity), if open.
    pub fn pref_window(&self) -> Option<BusRange> {
        let regs = self.config.regs();
        let base = (u64::from(regs.read_u16(PREF_MEMORY_BASE) & 0xfff0) << 16)
            | (u64::from(regs.read_u32(PREF_BASE_UPPER32)) << 32);
        let limit = (u64::from(regs.read_u16(PREF_MEMORY_LIMIT) & 0xfff0) << 16)
            | (u64::from(regs.read_u32(PREF_LIMIT_UPPER32)) << 32)
            | 0xf_ffff;
        window(base, limit)
    }

    /// Whether the port forwards `range` of a BAR of `kind` from its primary side down to its
    /// secondary bus: I/O space on and the range inside the I/O window, or memory space on and
    /// the range inside the memory or the prefetchable window (a bridge forwards either to
    /// any memory BAR).
    pub fn forwards(&self, kind: BarKind, range: BusRange) -> bool {
        let inside =
            |w: Option<BusRange>| w.is_some_and(|w| w.base <= range.base && range.end() <= w.end());
        let command = self.config.command();
        match kind {
            BarKind::Io => command & COMMAND_IO != 0 && inside(self.io_window()),
            BarKind::Mem32 | BarKind::Mem64 => {
                command & COMMAND_MEMORY != 0
                    && (inside(self.mem_window()) || inside(self.pref_window()))
            }
        }
    }

    /// Reports the link below as up (a device is present) or down.
    pub fn set_link_active(&mut self, active: bool) {
        self.pcie.set_link_active(self.config.regs_mut(), active);
    }

    pub fn link_active(&self) -> bool {
        self.pcie.link_active(self.config.regs())
    }

    /// True once after the guest set the secondary bus reset bit: everything below the port
    /// must be reset. The segment, which owns the devices below, polls this after each write.
    pub fn take_secondary_reset(&mut self) -> bool {
        std::mem::take(&mut self.reset_requested)
    }

    pub fn config(&self) -> &Type1Config {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut Type1Config {
        &mut self.config
    }
}

fn window(base: u64, limit: u64) -> Option<BusRange> {
    (base <= limit).then(|| BusRange::new(base, limit - base + 1))
}

impl PciDevice for PciePort {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        let was_resetting = self.config.regs().read_u16(BRIDGE_CONTROL) & BRIDGE_CTL_BUS_RESET;
        self.config.write(offset, data);
        let resetting = self.config.regs().read_u16(BRIDGE_CONTROL) & BRIDGE_CTL_BUS_RESET;
        if was_resetting == 0 && resetting != 0 {
            self.reset_requested = true;
        }
    }

    fn bars(&self) -> [Option<BarInfo>; 6] {
        self.config.bars()
    }

    fn command(&self) -> u16 {
        self.config.command()
    }

    /// Ports declare no BARs, so nothing is ever mapped here.
    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn reset(&mut self) {
        self.config.reset();
        self.reset_requested = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::root_port;

    fn port() -> PciePort {
        root_port::new("rp", 1, None).unwrap()
    }

    fn write16(p: &mut PciePort, offset: u16, v: u16) {
        p.write_config(offset, &v.to_le_bytes());
    }

    #[test]
    fn windows_are_closed_at_power_on() {
        let p = port();
        assert_eq!(p.io_window(), None);
        assert_eq!(p.mem_window(), None);
        assert_eq!(p.pref_window(), None);
        assert_eq!(p.bus_range(), None);
    }

    #[test]
    fn windows_decode_base_and_limit_registers() {
        let mut p = port();
        p.write_config(IO_BASE, &[0x10, 0x20]);
        write16(&mut p, MEMORY_BASE, 0xc010);
        write16(&mut p, MEMORY_LIMIT, 0xc02f);
        write16(&mut p, PREF_MEMORY_BASE, 0x0000);
        write16(&mut p, PREF_MEMORY_LIMIT, 0xfff0);
        p.write_config(PREF_BASE_UPPER32, &0x40u32.to_le_bytes());
        p.write_config(PREF_LIMIT_UPPER32, &0x43u32.to_le_bytes());
        assert_eq!(p.io_window(), Some(BusRange::new(0x1000, 0x2000)));
        assert_eq!(p.mem_window(), Some(BusRange::new(0xc010_0000, 0x20_0000)));
        assert_eq!(
            p.pref_window(),
            Some(BusRange::new(0x40_0000_0000, 0x4_0000_0000))
        );
    }

    #[test]
    fn bus_range_needs_a_secondary_bus() {
        let mut p = port();
        p.write_config(PRIMARY_BUS, &[0, 2, 5]);
        assert_eq!(p.bus_range(), Some(2..=5));
        p.write_config(SUBORDINATE_BUS, &[1]);
        assert_eq!(p.bus_range(), None);
    }

    #[test]
    fn secondary_bus_reset_is_reported_once_on_the_rising_edge() {
        let mut p = port();
        write16(&mut p, BRIDGE_CONTROL, BRIDGE_CTL_BUS_RESET);
        write16(&mut p, BRIDGE_CONTROL, BRIDGE_CTL_BUS_RESET);
        assert!(p.take_secondary_reset());
        assert!(!p.take_secondary_reset());
        write16(&mut p, BRIDGE_CONTROL, 0);
        write16(&mut p, BRIDGE_CONTROL, BRIDGE_CTL_BUS_RESET);
        assert!(p.take_secondary_reset());
    }

    #[test]
    fn reset_closes_windows_but_keeps_link_state() {
        let mut p = port();
        p.set_link_active(true);
        write16(&mut p, MEMORY_BASE, 0xc000);
        write16(&mut p, MEMORY_LIMIT, 0xc000);
        p.reset();
        assert_eq!(p.mem_window(), None);
        assert!(p.link_active());
    }
}
