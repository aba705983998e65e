//! Everything on the guest's PCI Express platform: the root complex (ECAM, 0xCF8 ports,
//! DSDT description), the topology of root ports and switches, and the passthrough devices
//! placed on it.

mod bar_mapper;
mod hotplug;
mod hotplug_faults;
mod p2p_report;
mod ram_map;
mod vfio;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use devices::interrupt::InterruptController;
use devices::legacy::ExitSignal;
use devices::pci::{Bdf, PciConfigIo, PciLayout, PciRoot, Placement, TopologyBuilder};
use devices::vfio::DmaGate;
use devices::{Bus, BusRange};
use kvm_ioctls::VmFd;
use vfio_p2p::IovaRange;

use crate::config::{self, VmConfig};
use crate::kvm_vfio::KvmVfio;
use crate::layout::{MemoryLayout, MMIO32_SIZE, MMIO32_START, PCI_ECAM_SIZE, PCI_ECAM_START};
use crate::memory::GuestRam;
use crate::slots::MemorySlots;
use bar_mapper::BarMapper;
use hotplug::Hotplug;
pub use p2p_report::api_table;
use p2p_report::P2pReporter;
use ram_map::RamMap;
pub use vfio::{ram_backing, Passthrough};

/// Port I/O the platform hands to I/O BARs: above the legacy devices.
const PCI_IO_START: u64 = 0x1000;
const PCI_IO_SIZE: u64 = 0xf000;
const PCI_CONFIG_IO_PORT: u64 = 0xcf8;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("P2P domain {domain}: {source}")]
    Domain {
        domain: String,
        #[source]
        source: vfio_p2p::IommuError,
    },
    #[error("{0}")]
    Config(#[source] crate::config::ConfigError),
    #[error("device {id}: {source}")]
    Open {
        id: String,
        #[source]
        source: vfio_p2p::OpenError,
    },
    #[error("device {id}: {source}")]
    KvmVfio {
        id: String,
        #[source]
        source: crate::kvm_vfio::KvmVfioError,
    },
    #[error("{what} at {start:#x} (+{size:#x}) is outside what the host IOMMU can translate")]
    IovaRange {
        what: &'static str,
        start: u64,
        size: u64,
    },
    #[error("allocating guest RAM {start:#x} (+{size:#x}) for device DMA: {source}")]
    Populate {
        start: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("device {id}: {source}")]
    Device {
        id: String,
        #[source]
        source: devices::vfio::VfioPciError,
    },
    #[error("device {id}: mapping its BARs: {source}")]
    Mmap {
        id: String,
        #[source]
        source: vfio_p2p::DeviceError,
    },
    #[error("PCI topology: {0}")]
    Topology(#[from] devices::pci::TopologyError),
    #[error("placing the PCI root complex: {0}")]
    Bus(#[from] devices::BusError),
    #[error("{what}: {source}")]
    Hotplug {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no P2P domain #{0}")]
    NoDomain(usize),
    #[error("device {id}: failure injected at hotplug step {step} (P2PVMM_X_HOTPLUG_FAIL)")]
    Injected { id: String, step: &'static str },
    #[error("sharing guest RAM with the thread that maps it: {0}")]
    RamShare(#[source] crate::memory::MemoryError),
    #[error("creating the KVM-VFIO device: {0}")]
    KvmVfioCreate(#[source] crate::kvm_vfio::KvmVfioError),
}

/// What the VMM must keep for the platform to keep working, and tear down at the end.
pub struct DeviceManager {
    root: PciRoot,
    passthrough: Option<Passthrough>,
    mapper: Arc<BarMapper>,
    hotplug: Hotplug,
    interrupts: Arc<dyn InterruptController>,
    /// Guest RAM being mapped into the domains while the guest boots.
    ram_map: Option<RamMap>,
}

/// Everything the device manager needs from the VM under construction.
pub struct Platform<'a> {
    pub vm: &'a Arc<VmFd>,
    pub ram: &'a GuestRam,
    pub layout: &'a MemoryLayout,
    pub pio: &'a Arc<Bus>,
    pub mmio: &'a Arc<Bus>,
    pub slots: &'a Arc<MemorySlots>,
    /// Stops the VM when guest RAM cannot be mapped for DMA after all ([`RamMap`]).
    pub exit: &'a Arc<ExitSignal>,
    pub interrupts: Arc<dyn InterruptController>,
}

fn pci_layout(layout: &MemoryLayout) -> PciLayout {
    PciLayout {
        ecam: BusRange::new(PCI_ECAM_START, PCI_ECAM_SIZE),
        mmio32: BusRange::new(MMIO32_START, MMIO32_SIZE),
        mmio64: BusRange::new(layout.mmio64.0 .0, layout.mmio64.1),
        io: Some(BusRange::new(PCI_IO_START, PCI_IO_SIZE)),
    }
}

fn placement(p: &config::Placement) -> Placement {
    match p {
        config::Placement::Root => Placement::Root,
        config::Placement::RootPort => Placement::RootPort,
        config::Placement::Switch(name) => Placement::Switch(name.clone()),
    }
}

impl DeviceManager {
    /// Opens the passthrough devices, maps guest RAM for their DMA, builds the topology and
    /// places the root complex on the buses.
    pub fn new(config: &VmConfig, platform: Platform<'_>) -> Result<Self, DeviceManagerError> {
        let pci = pci_layout(platform.layout);
        let windows = [
            IovaRange::with_size(pci.mmio32.base, pci.mmio32.len),
            IovaRange::with_size(pci.mmio64.base, pci.mmio64.len),
        ];
        if let Some(warning) = config.ungrouped_warning() {
            log::warn!("{warning}");
        }
        let hotplug_slots = config.p2p_groups.iter().any(|g| g.slots > 0);
        let opened = if config.devices.is_empty() && !hotplug_slots {
            None
        } else {
            let kvm_vfio = KvmVfio::new(platform.vm).map_err(DeviceManagerError::KvmVfioCreate)?;
            let opened = vfio::open(config, kvm_vfio)?;
            ram_map::check_reach(&opened.domains, platform.ram, &windows)?;
            Some(opened)
        };
        // Guest RAM is mapped on a thread once the devices are set up: the type1 kernel holds
        // its container lock for the whole pinning, so starting it earlier made the first P2P
        // BAR maps (and the first vCPU entry) wait for it. Bus mastering waits on the gate.
        let ram_job = match &opened {
            Some(opened) => Some((
                opened.domains.clone(),
                platform.ram.share().map_err(DeviceManagerError::RamShare)?,
            )),
            None => None,
        };
        let dma_gate = Arc::new(match &ram_job {
            Some(_) => DmaGate::mapping(),
            None => DmaGate::mapped(),
        });
        // One peer-BAR table per P2P group; the mapper keeps each in step with every BAR the
        // guest places, and the reporter shows them once changes settle.
        let tables = opened
            .as_ref()
            .map(|o| vfio::p2p_tables(o, &windows))
            .unwrap_or_default();
        let reporter = Arc::new(P2pReporter::new(tables.iter().flatten().cloned().collect()));
        let mapper = Arc::new(BarMapper::new(
            platform.pio.clone(),
            platform.mmio.clone(),
            platform.slots.clone(),
            reporter.clone(),
        ));
        let passthrough = match opened {
            Some(opened) => Some(vfio::build(
                config,
                opened,
                tables,
                reporter,
                &mapper,
                platform.interrupts.clone(),
                dma_gate.clone(),
            )?),
            None => None,
        };

        let mut builder = TopologyBuilder::new(pci);
        let mut switches = BTreeSet::new();
        for device in &config.devices {
            if let config::Placement::Switch(name) = &device.placement {
                if switches.insert(name.clone()) {
                    builder.add_switch(name);
                }
            }
        }
        // Spare slots: downstream ports of the group's switch, or root ports of their own.
        let mut slot_groups = Vec::new();
        for group in config.p2p_groups.iter().filter(|g| g.slots > 0) {
            if group.topology == config::GroupTopology::Switch {
                if switches.insert(group.name.clone()) {
                    builder.add_switch(&group.name);
                }
                builder.add_hotplug_slots(&group.name, group.slots);
                slot_groups.push((None, Some(group.name.clone()), group.name.clone()));
            } else {
                for i in 0..group.slots {
                    let name = format!("{}-slot{i}", group.name);
                    builder.add_empty_root_port(&name);
                    slot_groups.push((Some(name), None, group.name.clone()));
                }
            }
        }
        for device in passthrough.iter().flat_map(|p| p.devices.iter()) {
            builder.add_device(
                &device.config.id,
                placement(&device.config.placement),
                device.model.clone(),
            );
        }
        let root = builder.build(mapper.clone())?;
        let hotplug = Hotplug::new(platform.vm, platform.pio, &root, |slot| {
            let info = root.hotplug_slot(slot)?;
            slot_groups.iter().find_map(|(name, switch, group)| {
                let by_name = name.as_deref() == Some(slot);
                let by_switch = switch.is_some() && info.switch == *switch;
                (by_name || by_switch).then(|| group.clone())
            })
        })?;
        if let Some(passthrough) = &passthrough {
            passthrough.connect_intx(root.segment());
        }
        for (id, bdf) in root.placements() {
            log::info!("{id}: guest address {bdf}");
        }
        platform
            .mmio
            .insert(pci.ecam, Arc::new(Mutex::new(root.ecam())))?;
        platform.pio.insert(
            BusRange::new(PCI_CONFIG_IO_PORT, PciConfigIo::LEN),
            Arc::new(Mutex::new(root.config_io())),
        )?;
        // From here the mapping overlaps the guest's boot.
        let ram_map = ram_job
            .map(|(domains, ram)| RamMap::start(domains, ram, dma_gate, platform.exit.clone()));
        Ok(Self {
            root,
            passthrough,
            mapper,
            hotplug,
            interrupts: platform.interrupts,
            ram_map,
        })
    }

    /// The root complex's DSDT objects.
    pub fn dsdt_aml(&self) -> Vec<u8> {
        self.root.dsdt_aml()
    }

    /// The last PCI bus number in use, which MCFG announces.
    pub fn last_bus(&self) -> u8 {
        self.root.last_bus()
    }

    /// Each placed device's guest address, by id: the cold-plugged ones, then the hotplugged.
    pub fn placements(&self) -> Vec<(String, Bdf)> {
        let cold = self
            .root
            .placements()
            .iter()
            .map(|(id, bdf)| (id.clone(), *bdf));
        let hot = self.hotplug.slots.iter().filter_map(|slot| {
            let info = self.root.hotplug_slot(&slot.name)?;
            Some((slot.device.clone()?, info.current_bdf()))
        });
        cold.chain(hot).collect()
    }

    /// Every P2P table's rows, group by group.
    pub fn p2p_rows(&self) -> Vec<vfio_p2p::P2pRow> {
        self.passthrough
            .as_ref()
            .map(|p| p.reporter.rows())
            .unwrap_or_default()
    }

    /// Presses the guest's ACPI power button.
    pub fn power_button(&self) -> Result<(), DeviceManagerError> {
        self.hotplug
            .controller
            .power_button()
            .map_err(|e| DeviceManagerError::Hotplug {
                what: "pressing the power button".to_owned(),
                source: Box::new(e),
            })
    }

    /// The eventfd that fires when the guest has ejected a device ([`Self::process_ejects`]).
    pub fn eject_event(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.hotplug.eject_event()
    }

    /// Why guest RAM could not be mapped for device DMA, if it could not.
    pub fn ram_map_failure(&self) -> Option<String> {
        self.ram_map.as_ref().and_then(RamMap::failure)
    }

    /// Releases the passthrough devices in the order the kernel needs, once the guest RAM
    /// mapping has ended.
    pub fn shut_down(mut self) {
        if let Some(ram_map) = &mut self.ram_map {
            ram_map.finish();
        }
        if let Some(passthrough) = self.passthrough {
            passthrough.shut_down();
        }
    }
}
