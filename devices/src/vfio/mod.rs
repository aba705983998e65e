//! The VFIO PCI device model: a host PCI function passed through to the guest.
//!
//! The guest sees an emulated config space built from the host function (identity, BARs at the
//! addresses the guest programs, MSI/MSI-X, a PCIe endpoint capability); the command register
//! is forwarded to the hardware so decoding and bus mastering really change. BAR accesses that
//! reach this model (those not mapped into the guest as memory slots, and the MSI-X table) are
//! emulated or forwarded through VFIO region reads and writes. A host expansion ROM (VFIO region
//! 6) appears as the ROM BAR at 0x30; while the guest has it enabled, its reads go to the region
//! ([`VfioRom`]). Where BARs live in the guest, and their peer-to-peer IOMMU mappings, is the
//! VMM's `BarObserver`'s business. INTx, the fallback while MSI and MSI-X are off, is connected
//! once the topology knows the function's GSI ([`VfioPciDevice::connect_intx`]).
//! [`VfioPciOptions`] add what the host function lacks, such as NVIDIA's GPUDirect P2P clique
//! capability.

mod dma_gate;
mod intx;
mod irq;
mod options;
mod pm;
mod probe;
mod rom;

use std::ops::Range;
use std::sync::Arc;

use vfio_p2p::{DeviceError, HostPciDevice, IrqIndex, P2pTable, CONFIG_REGION};

use crate::interrupt::{InterruptController, InterruptError};
use crate::pci::regs::{COMMAND, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MASTER, COMMAND_MEMORY};
use crate::pci::{
    BarInfo, ConfigError, LinkConfig, MsiCap, Msix, PciDevice, PcieCap, PcieDeviceType, RomInfo,
    Type0Config, ROM_BAR,
};
pub use dma_gate::{DmaGate, DmaGateState};
pub use intx::{IntxHost, VfioIntx};
pub use irq::VfioMsi;
pub use options::{VfioOptionsError, VfioPciOptions, GPUDIRECT_CAP_OFFSET, MAX_CLIQUE_ID};
pub use pm::{PowerState, VfioPm};
pub use probe::{probe, ConfigSource, HostFunction};
pub use rom::VfioRom;

#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error("{bdf}: reading the host config space: {source}")]
    Probe {
        bdf: vfio_p2p::Bdf,
        #[source]
        source: DeviceError,
    },
    #[error("{bdf}: emulating its config space: {source}")]
    Config {
        bdf: vfio_p2p::Bdf,
        #[source]
        source: ConfigError,
    },
    #[error("{bdf}: emulating its {what} capability: {detail}")]
    Capability {
        bdf: vfio_p2p::Bdf,
        what: &'static str,
        detail: String,
    },
    #[error("{bdf}: {source}")]
    Options {
        bdf: vfio_p2p::Bdf,
        #[source]
        source: VfioOptionsError,
    },
}

/// The command register bits that reach the hardware.
const FORWARDED_COMMAND: u16 = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE;
const MSI_CONTROL: u16 = 0x02;
const MSI_ENABLE: u16 = 1 << 0;
const MSIX_ENABLE: u16 = 1 << 15;

pub struct VfioPciDevice {
    name: String,
    host: Arc<HostPciDevice>,
    config: Type0Config,
    msi: Option<(MsiCap, Arc<VfioMsi>)>,
    msix: Option<(Msix, Arc<VfioMsi>)>,
    /// Present when the host function has an INTx pin VFIO can deliver.
    intx: Option<VfioIntx>,
    /// Present when the host function has an expansion ROM.
    rom: Option<VfioRom>,
    /// Present when the host function has a power management capability.
    pm: Option<VfioPm>,
    p2p: Option<Arc<P2pTable>>,
    /// Holds the guest's first Bus Master Enable until guest RAM is in the IOMMU.
    dma_gate: Option<Arc<DmaGate>>,
}

impl VfioPciDevice {
    /// Builds the guest view of `host`, with the extra capabilities `options` ask for (added
    /// last in the capability chain).
    pub fn new(
        name: &str,
        host: Arc<HostPciDevice>,
        controller: Arc<dyn InterruptController>,
        p2p: Option<Arc<P2pTable>>,
        options: VfioPciOptions,
    ) -> Result<Self, VfioPciError> {
        let bdf = host.bdf();
        // Before anything touches the device: a bad option must not cost a host reset.
        options
            .validate()
            .map_err(|source| VfioPciError::Options { bdf, source })?;
        let function = probe(&*host).map_err(|source| VfioPciError::Probe { bdf, source })?;
        let config_err = |source| VfioPciError::Config { bdf, source };
        let mut config = Type0Config::new(&function.ids);
        let pin = intx::host_pin(&host, function.interrupt_pin);
        config.set_interrupt_pin(pin);
        let intx = (pin != 0).then(|| VfioIntx::new(host.clone(), controller.clone()));
        for (index, def) in &function.bars {
            config.add_bar(*index, *def).map_err(config_err)?;
        }
        // A ROM the emulated register cannot describe stays hidden; the function works without.
        let rom = VfioRom::new(function.rom_size)
            .filter(|rom| {
                config
                    .add_rom(rom.bar_size())
                    .inspect_err(|e| log::warn!("{name}: expansion ROM hidden: {e}"))
                    .is_ok()
            })
            .map(|rom| {
                rom.cached(&*host).unwrap_or_else(|(rom, e)| {
                    log::warn!("{name}: reading the expansion ROM: {e}; reads go to the device");
                    rom
                })
            });
        PcieCap::add(
            &mut config,
            PcieDeviceType::Endpoint,
            LinkConfig::default(),
            None,
        )
        .map_err(config_err)?;
        let cap_err = |what, detail: String| VfioPciError::Capability { bdf, what, detail };
        let pm = match function.pm {
            Some((at, pmc, pmcsr)) => Some(
                VfioPm::add(&mut config, at, pmc, pmcsr)
                    .map_err(|e| cap_err("PM", e.to_string()))?,
            ),
            None => None,
        };
        let msi = match function.msi {
            Some(cfg) => {
                let cap =
                    MsiCap::add(&mut config, cfg).map_err(|e| cap_err("MSI", e.to_string()))?;
                let sink = VfioMsi::new(
                    host.clone(),
                    controller.clone(),
                    IrqIndex::Msi,
                    u16::from(cfg.vectors),
                );
                Some((cap, Arc::new(sink)))
            }
            None => None,
        };
        let msix = match function.msix {
            Some(cfg) => {
                let cap =
                    Msix::add(&mut config, cfg).map_err(|e| cap_err("MSI-X", e.to_string()))?;
                let sink = VfioMsi::new(host.clone(), controller, IrqIndex::Msix, cfg.vectors);
                Some((cap, Arc::new(sink)))
            }
            None => None,
        };
        if let Some(offset) = options
            .add_capabilities(&mut config)
            .map_err(|source| VfioPciError::Options { bdf, source })?
        {
            log::info!("{name}: GPUDirect P2P clique capability at {offset:#x}");
        }
        let device = Self {
            name: name.to_owned(),
            host,
            config,
            msi,
            msix,
            intx,
            rom,
            pm,
            p2p,
            dma_gate: None,
        };
        // Start from a clean function that decodes nothing, as after a PCI reset.
        device.reset_host();
        device.forward_command(0);
        Ok(device)
    }

    pub fn host(&self) -> &Arc<HostPciDevice> {
        &self.host
    }

    /// Connects the function's INTx to guest GSI `gsi`, where the platform routes its pin
    /// (`PciSegment::intx_gsi`). Without a host pin there is nothing to connect.
    pub fn connect_intx(&mut self, gsi: u32) -> Result<(), InterruptError> {
        match &mut self.intx {
            Some(intx) => intx.connect(gsi),
            None => Ok(()),
        }
    }

    /// Whether the guest has MSI or MSI-X enabled in config space (what the capabilities are
    /// about to act on, during a write).
    fn msi_requested(&self) -> bool {
        let regs = self.config.regs();
        let enabled = |cap: u16, bit: u16| regs.read_u16(cap + MSI_CONTROL) & bit != 0;
        let msi = self.msi.as_ref().map(|(c, _)| c.range().start);
        let msix = self.msix.as_ref().map(|(c, _)| c.cap_range().start);
        msi.is_some_and(|cap| enabled(cap, MSI_ENABLE))
            || msix.is_some_and(|cap| enabled(cap, MSIX_ENABLE))
    }

    fn set_intx_wanted(&mut self, wanted: bool) {
        if let Some(intx) = &mut self.intx {
            intx.set_wanted(wanted);
        }
    }

    /// The MSI-X table and PBA (BAR, byte range): they must stay trapped, never mapped.
    pub fn msix_ranges(&self) -> Vec<(u8, Range<u64>)> {
        self.msix
            .as_ref()
            .map(|(cap, _)| vec![cap.table_range(), cap.pba_range()])
            .unwrap_or_default()
    }

    /// Passes the guest's new power state to the host's PMCSR (VFIO acts on it: D3hot revokes
    /// the device's dmabufs), then tells the P2P table, which unmaps or maps the device's BARs.
    fn set_power(&self, state: PowerState) {
        let Some(pm) = &self.pm else {
            return;
        };
        let at = u64::from(pm.host_pmcsr());
        let mut raw = [0u8; 2];
        let written = self
            .host
            .read_region(CONFIG_REGION, at, &mut raw)
            .and_then(|()| {
                let value = VfioPm::host_value(u16::from_le_bytes(raw), state);
                self.host
                    .write_region(CONFIG_REGION, at, &value.to_le_bytes())
            });
        match written {
            Ok(()) => log::info!("{}: power state {state:?}", self.name),
            Err(e) => log::warn!("{}: setting power state {state:?}: {e}", self.name),
        }
        if let Some(p2p) = &self.p2p {
            p2p.set_low_power(self.host.key(), state != PowerState::D0);
        }
    }

    fn reset_host(&self) {
        if !self.host.supports_reset() {
            log::debug!("{}: no reset mechanism", self.name);
            return;
        }
        let result = match &self.p2p {
            Some(p2p) => p2p.device_reset(self.host.key(), || self.host.reset()),
            None => self.host.reset(),
        };
        if let Err(e) = result {
            log::warn!("{}: reset failed: {e}", self.name);
        }
    }

    /// Writes the forwarded command bits to the hardware (keeping its other bits). Peer mappings
    /// are not touched here: a memory decode change reaches the VMM's `BarObserver` as a
    /// `BarChange` like any BAR move, and that is the one place peer mappings follow it (telling
    /// the P2P table from here as well reported every decode change twice).
    fn forward_command(&self, command: u16) {
        let mut raw = [0u8; 2];
        if let Err(e) = self
            .host
            .read_region(CONFIG_REGION, u64::from(COMMAND), &mut raw)
        {
            log::error!("{}: reading the command register: {e}", self.name);
            return;
        }
        let old = u16::from_le_bytes(raw);
        let mut new = (old & !FORWARDED_COMMAND) | (command & FORWARDED_COMMAND);
        if new & COMMAND_MASTER != 0 && old & COMMAND_MASTER == 0 && !self.may_master() {
            new &= !COMMAND_MASTER;
        }
        if new == old {
            return;
        }
        if let Err(e) =
            self.host
                .write_region(CONFIG_REGION, u64::from(COMMAND), &new.to_le_bytes())
        {
            log::error!("{}: writing the command register: {e}", self.name);
        }
    }
}

impl VfioPciDevice {
    /// Holds the guest's Bus Master Enable writes on `gate` (see [`DmaGate`]).
    pub fn set_dma_gate(&mut self, gate: Arc<DmaGate>) {
        self.dma_gate = Some(gate);
    }

    /// Whether bus mastering may go on now: waits for guest RAM to be mapped if it is not yet
    /// (the vCPU writing the command register waits with it); false if the mapping failed.
    fn may_master(&self) -> bool {
        let Some(gate) = &self.dma_gate else {
            return true;
        };
        if gate.state() == DmaGateState::Mapped {
            return true;
        }
        log::info!(
            "{}: bus mastering held until guest RAM is mapped for DMA",
            self.name
        );
        match gate.wait() {
            Ok(waited) => {
                log::info!("{}: bus mastering released after {waited:?}", self.name);
                true
            }
            Err(why) => {
                log::error!(
                    "{}: bus mastering stays off: guest RAM could not be mapped ({why})",
                    self.name
                );
                false
            }
        }
    }
}

fn overlaps(a: &Range<u16>, offset: u16, len: usize) -> bool {
    let end = offset.saturating_add(len as u16);
    offset < a.end && a.start < end
}

impl PciDevice for VfioPciDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
        if let Some(intx) = &self.intx {
            intx.merge_status(offset, data);
        }
        if let Some((cap, sink)) = &self.msi {
            cap.merge_held(self.config.regs(), offset, data, &**sink);
        }
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        // VFIO delivers one interrupt type at a time: INTx stops before MSI/MSI-X start, and
        // resumes after they stopped.
        let msi_on = self.msi_requested();
        if msi_on {
            self.set_intx_wanted(false);
        }
        if overlaps(&(COMMAND..COMMAND + 2), offset, data.len()) {
            self.forward_command(self.config.command());
        }
        if let Some((cap, sink)) = &mut self.msi {
            let range = cap.range();
            if overlaps(&range, offset, data.len()) {
                let mme = (self.config.regs().read_u16(range.start + MSI_CONTROL) >> 4) & 0x7;
                sink.set_count(1 << mme);
                cap.update(self.config.regs_mut(), &**sink);
            }
        }
        if let Some((cap, sink)) = &mut self.msix {
            if overlaps(&cap.cap_range(), offset, data.len()) {
                cap.update(self.config.regs(), &**sink);
            }
        }
        if let Some(pm) = &mut self.pm {
            if overlaps(&pm.range(), offset, data.len()) {
                if let Some(state) = pm.update(&mut self.config) {
                    self.set_power(state);
                }
            }
        }
        if !msi_on {
            self.set_intx_wanted(true);
        }
    }

    fn bars(&self) -> [Option<BarInfo>; 6] {
        self.config.bars()
    }

    fn rom(&self) -> Option<RomInfo> {
        self.config.rom()
    }

    fn command(&self) -> u16 {
        self.config.command()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == ROM_BAR {
            let Some(rom) = &self.rom else {
                data.fill(0xff);
                return;
            };
            if let Err(e) = rom.read(&*self.host, offset, data) {
                log::warn!("{}: ROM read at {offset:#x}: {e}", self.name);
            }
            return;
        }
        if let Some((cap, sink)) = &self.msix {
            if cap.bar_read(bar, offset, data, &**sink) {
                return;
            }
        }
        if let Err(e) = self.host.read_region(u32::from(bar), offset, data) {
            log::warn!("{}: BAR {bar} read at {offset:#x}: {e}", self.name);
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == ROM_BAR {
            log::debug!(
                "{}: write to the read-only ROM at {offset:#x} dropped",
                self.name
            );
            return;
        }
        if let Some((cap, sink)) = &mut self.msix {
            if cap.bar_write(bar, offset, data, &**sink) {
                return;
            }
        }
        if let Err(e) = self.host.write_region(u32::from(bar), offset, data) {
            log::warn!("{}: BAR {bar} write at {offset:#x}: {e}", self.name);
        }
    }

    fn reset(&mut self) {
        self.reset_host();
        self.config.reset();
        // VFIO's reset brought the host to D0 (without a reset, the state is passed on).
        if let Some(state) = self.pm.as_mut().and_then(VfioPm::reset) {
            self.set_power(state);
        }
        if let Some((cap, sink)) = &mut self.msi {
            cap.update(self.config.regs_mut(), &**sink);
        }
        if let Some((cap, sink)) = &mut self.msix {
            cap.reset(self.config.regs(), &**sink);
        }
        self.set_intx_wanted(!self.msi_requested());
        self.forward_command(self.config.command());
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.forward_command(0);
        if let Some(intx) = &mut self.intx {
            intx.release();
        }
        if let Some((_, sink)) = &self.msi {
            sink.release();
        }
        if let Some((_, sink)) = &self.msix {
            sink.release();
        }
        self.reset_host();
    }
}
