//! Passthrough devices in their P2P domains: one IOMMU address space per P2P group plus one per
//! ungrouped device (an iommufd IOAS on the VM's one `/dev/iommu`, or a type1 container), each
//! configured host function opened and attached to its domain, one peer-BAR table per group,
//! and the device models (guest RAM goes into every domain at IOVA = GPA: `ram_map.rs`).
//!
//! Isolation is the IOMMU's: a device's DMA is translated only by its own domain, and only a
//! group's table puts BARs into it, so members of a group reach each other's BARs and nothing
//! else reaches any BAR.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::interrupt::InterruptController;
use devices::pci::{PciSegment, SharedPciDevice};
use devices::vfio::{DmaGate, VfioPciDevice, VfioPciOptions};
use vfio_p2p::{BackendKind, DomainOpener, HostPciDevice, IovaRange, P2pTable, VfioBackend};

use super::bar_mapper::{BarMapper, MappedArea, PassthroughBars};
use super::hotplug_faults::HotplugStep;
use super::p2p_report::P2pReporter;
use super::DeviceManagerError;
use crate::config::{DeviceConfig, DomainPlan, IommuBackendKind, P2pMode, VmConfig};
use crate::kvm_vfio::KvmVfio;
use crate::memory::RamBacking;

const PAGE_SIZE: u64 = 4096;

/// Set (to anything) to switch dmabuf export off, as on a kernel without
/// `CONFIG_VFIO_PCI_DMABUF`: a test and measurement knob, not configuration.
pub const NO_DMABUF_ENV: &str = "P2PVMM_X_NO_DMABUF";

/// A passthrough device model, shared with the PCI segment and buses.
pub type SharedVfioDevice = Arc<Mutex<VfioPciDevice>>;

/// One IOMMU address space and, for a P2P group, its peer-BAR table.
pub struct Domain {
    pub plan: DomainPlan,
    pub backend: VfioBackend,
    pub p2p: Option<Arc<P2pTable>>,
}

/// One passthrough function: its configuration, the host device, the guest model, its domain.
pub struct PassthroughDevice {
    pub config: DeviceConfig,
    pub host: Arc<HostPciDevice>,
    pub model: SharedVfioDevice,
    pub domain: usize,
}

/// The VM's passthrough state, in the order it must be torn down.
pub struct Passthrough {
    pub devices: Vec<PassthroughDevice>,
    pub reporter: Arc<P2pReporter>,
    pub kvm_vfio: KvmVfio,
    pub domains: Vec<Domain>,
    /// Hot-plugged devices hold their bus mastering on it as cold-plugged ones do.
    pub dma_gate: Arc<DmaGate>,
}

/// The backend a domain asks for (its group's mode or its members' explicit backend), else
/// iommufd where the host has it.
fn backend_kind(requested: Option<IommuBackendKind>) -> BackendKind {
    match requested {
        Some(IommuBackendKind::Iommufd) => BackendKind::Iommufd,
        Some(IommuBackendKind::Legacy) => BackendKind::Type1,
        None if Path::new("/dev/iommu").exists() => BackendKind::Iommufd,
        None => BackendKind::Type1,
    }
}

/// What guest RAM should be for the configured devices: a memfd when any domain is iommufd
/// (it maps RAM by file); anonymous huge pages when there is no domain or every domain is
/// type1, which pins RAM through the process page tables; a hugetlb memfd whenever the
/// configuration asks for huge pages.
pub fn ram_backing(config: &VmConfig) -> RamBacking {
    // Huge pages asked for: a hugetlb memfd, which both backends map (by file or by address).
    if let Some(page) = config.memory.hugepages {
        return RamBacking::HugetlbMemfd(page);
    }
    // No IOMMU domain at start, or only type1 ones (which pin by address): anonymous memory in
    // transparent huge pages, which also spares the guest's boot most of its EPT faults. A
    // domain hotplugged later maps it by address. Only iommufd gains from a memfd at start.
    let domains = config.domains();
    let all_type1 = domains
        .iter()
        .all(|d| backend_kind(d.backend) == BackendKind::Type1);
    if all_type1 {
        RamBacking::AnonymousHuge
    } else {
        RamBacking::Memfd
    }
}

/// The configured devices, opened in their domains and known to KVM.
pub struct Opened {
    pub domains: Vec<(DomainPlan, VfioBackend)>,
    pub kvm_vfio: KvmVfio,
    /// Each device with the index of its domain.
    pub devices: Vec<(DeviceConfig, Arc<HostPciDevice>, usize)>,
}

/// Opens `device` in `backend`'s domain (named `domain`) and makes it known to KVM.
fn open_device(
    device: &DeviceConfig,
    backend: &VfioBackend,
    kvm_vfio: &KvmVfio,
    domain: &str,
) -> Result<HostPciDevice, DeviceManagerError> {
    let host =
        HostPciDevice::open(&device.path, backend).map_err(|source| DeviceManagerError::Open {
            id: device.id.clone(),
            source,
        })?;
    kvm_vfio
        .add(&host.device_fd())
        .map_err(|source| DeviceManagerError::KvmVfio {
            id: device.id.clone(),
            source,
        })?;
    log::info!(
        "{}: {} opened on {} in P2P domain {domain}",
        device.id,
        host.bdf(),
        backend.kind()
    );
    Ok(host)
}

/// Opens one domain per P2P group and per ungrouped device, and every device in its domain.
pub fn open(config: &VmConfig, kvm_vfio: KvmVfio) -> Result<Opened, DeviceManagerError> {
    let opener = DomainOpener::new();
    let mut domains = Vec::new();
    let mut devices = Vec::new();
    for plan in config.domains() {
        let kind = backend_kind(plan.backend);
        let backend = opener
            .open(kind)
            .map_err(|source| DeviceManagerError::Domain {
                domain: plan.name.clone(),
                source,
            })?;
        for id in &plan.devices {
            let Some(device) = config.devices.iter().find(|d| &d.id == id) else {
                continue;
            };
            let host = open_device(device, &backend, &kvm_vfio, &plan.name)?;
            devices.push((device.clone(), Arc::new(host), domains.len()));
        }
        domains.push((plan, backend));
    }
    Ok(Opened {
        domains,
        kvm_vfio,
        devices,
    })
}

/// The peer-BAR table of each domain that is a P2P group with P2P on: `None` for ungrouped
/// devices and `mode = "off"`, whose domains hold guest RAM only.
pub fn p2p_tables(opened: &Opened, windows: &[IovaRange]) -> Vec<Option<Arc<P2pTable>>> {
    let export = std::env::var_os(NO_DMABUF_ENV).is_none();
    if !export {
        log::warn!("{NO_DMABUF_ENV} is set: BARs are not exported as dmabufs (test knob)");
    }
    opened
        .domains
        .iter()
        .map(|(plan, backend)| {
            (plan.grouped && plan.mode != P2pMode::Off).then(|| {
                let mut table = P2pTable::new(&plan.name, backend.iommu(), windows);
                table.set_dmabuf_export(export);
                Arc::new(table)
            })
        })
        .collect()
}

/// Splits `[start, end)` around the (page-rounded) `holes`.
fn carve(start: u64, end: u64, holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pieces = vec![(start, end)];
    for &(hole_start, hole_end) in holes {
        let hs = hole_start - hole_start % PAGE_SIZE;
        let he = hole_end.next_multiple_of(PAGE_SIZE);
        pieces = pieces
            .into_iter()
            .flat_map(|(s, e)| {
                if he <= s || hs >= e {
                    vec![(s, e)]
                } else {
                    [(s, hs.max(s)), (he.min(e), e)]
                        .into_iter()
                        .filter(|(a, b)| a < b)
                        .collect()
                }
            })
            .collect();
    }
    pieces
}

/// Mmaps the parts of each BAR the guest CPU may access directly: VFIO's mappable areas in
/// whole pages, minus the MSI-X table and PBA, which stay trapped.
fn mappable_areas(
    id: &str,
    host: &HostPciDevice,
    model: &VfioPciDevice,
) -> Result<[Vec<MappedArea>; 6], DeviceManagerError> {
    let mut areas: [Vec<MappedArea>; 6] = Default::default();
    let msix = model.msix_ranges();
    for area in host.p2p_areas() {
        let bar = area.region as usize;
        let holes: Vec<(u64, u64)> = msix
            .iter()
            .filter(|(b, _)| usize::from(*b) == bar)
            .map(|(_, r)| (r.start, r.end))
            .collect();
        for (start, end) in carve(area.offset, area.offset + area.size, &holes) {
            let mapping = host
                .mmap_region(area.region, start, end - start)
                .map_err(|source| DeviceManagerError::Mmap {
                    id: id.to_owned(),
                    source,
                })?;
            if let Some(list) = areas.get_mut(bar) {
                list.push(MappedArea {
                    offset: start,
                    mapping,
                });
            }
        }
    }
    Ok(areas)
}

/// What building one device model needs besides the device.
struct ModelContext<'a> {
    group: &'a str,
    p2p: Option<Arc<P2pTable>>,
    mapper: &'a BarMapper,
    interrupts: &'a Arc<dyn InterruptController>,
    dma_gate: &'a Arc<DmaGate>,
}

/// Registers an opened device with its domain's P2P table, builds its model and hands its
/// mappable areas to the BAR mapper.
fn model(
    device: DeviceConfig,
    host: Arc<HostPciDevice>,
    domain: usize,
    clique: Option<u8>,
    cx: ModelContext<'_>,
) -> Result<PassthroughDevice, DeviceManagerError> {
    if let Some(table) = &cx.p2p {
        match table.add_device(&host, &device.id) {
            Ok(keys) => log::info!(
                "{}: {} BAR area(s) in P2P group {}",
                device.id,
                keys.len(),
                cx.group
            ),
            Err(e) => log::warn!("{}: peer-to-peer unavailable: {e}", device.id),
        }
    }
    let built = VfioPciDevice::new(
        &device.id,
        host.clone(),
        cx.interrupts.clone(),
        cx.p2p.clone(),
        VfioPciOptions { clique },
    )
    .map_err(|source| DeviceManagerError::Device {
        id: device.id.clone(),
        source,
    })
    .and_then(|model| Ok((mappable_areas(&device.id, &host, &model)?, model)));
    let (areas, mut model) = match built {
        Ok(built) => built,
        Err(e) => {
            if let Some(table) = &cx.p2p {
                table.remove_device(host.key());
            }
            return Err(e);
        }
    };
    model.set_dma_gate(cx.dma_gate.clone());
    let model = Arc::new(Mutex::new(model));
    let shared: SharedPciDevice = model.clone();
    cx.mapper.add_passthrough(
        &shared,
        PassthroughBars {
            key: host.key(),
            areas,
            p2p: cx.p2p,
        },
    );
    Ok(PassthroughDevice {
        config: device,
        host,
        model,
        domain,
    })
}

/// Builds the device models for the opened devices, registering each with its domain's table.
pub fn build(
    config: &VmConfig,
    opened: Opened,
    tables: Vec<Option<Arc<P2pTable>>>,
    reporter: Arc<P2pReporter>,
    mapper: &BarMapper,
    interrupts: Arc<dyn InterruptController>,
    dma_gate: Arc<DmaGate>,
) -> Result<Passthrough, DeviceManagerError> {
    let Opened {
        domains,
        kvm_vfio,
        devices: opened,
    } = opened;
    let mut devices = Vec::new();
    for (device, host, domain) in opened {
        let p2p = tables.get(domain).cloned().flatten();
        let clique = config
            .clique_of(&device.id, crate::config::host_vendor)
            .map_err(DeviceManagerError::Config)?;
        let context = ModelContext {
            group: &domains[domain].0.name,
            p2p,
            mapper,
            interrupts: &interrupts,
            dma_gate: &dma_gate,
        };
        devices.push(model(device, host, domain, clique, context)?);
    }
    let domains = domains
        .into_iter()
        .zip(tables)
        .map(|((plan, backend), p2p)| Domain { plan, backend, p2p })
        .collect();
    Ok(Passthrough {
        devices,
        reporter,
        kvm_vfio,
        domains,
        dma_gate,
    })
}

impl Passthrough {
    /// Opens `device` in domain `domain` and builds its model, as a cold-plugged device gets
    /// (same checks); undoes every step when one fails.
    pub fn hot_open(
        &self,
        device: &DeviceConfig,
        domain: usize,
        clique: Option<u8>,
        mapper: &BarMapper,
        interrupts: &Arc<dyn InterruptController>,
        fault: Option<HotplugStep>,
    ) -> Result<PassthroughDevice, DeviceManagerError> {
        let target = self
            .domains
            .get(domain)
            .ok_or(DeviceManagerError::NoDomain(domain))?;
        let host = open_device(device, &target.backend, &self.kvm_vfio, &target.plan.name)?;
        let host = Arc::new(host);
        let context = ModelContext {
            group: &target.plan.name,
            p2p: target.p2p.clone(),
            mapper,
            interrupts,
            dma_gate: &self.dma_gate,
        };
        let built = if fault == Some(HotplugStep::Model) {
            Err(DeviceManagerError::Injected {
                id: device.id.clone(),
                step: HotplugStep::Model.name(),
            })
        } else {
            model(device.clone(), host.clone(), domain, clique, context)
        };
        built.inspect_err(|_| {
            if let Err(e) = self.kvm_vfio.remove(&host.device_fd()) {
                log::warn!("{}: {e}", device.id);
            }
        })
    }

    /// Releases one device the guest no longer sees: its peer-BAR mappings, its KVM-VFIO
    /// membership, its BAR mmaps, then a reset, then the device itself (closed on drop).
    pub fn release(&self, device: PassthroughDevice, mapper: &BarMapper) {
        let id = &device.config.id;
        if let Some(p2p) = &self.domains[device.domain].p2p {
            p2p.remove_device(device.host.key());
        }
        let shared: SharedPciDevice = device.model.clone();
        drop(mapper.remove_passthrough(&shared));
        if let Err(e) = self.kvm_vfio.remove(&device.host.device_fd()) {
            log::warn!("{id}: {e}");
        }
        if let Err(e) = device.host.reset() {
            log::info!("{id}: no reset on release ({e})");
        }
        log::info!("{id}: released");
    }

    /// Connects each device's INTx to the GSI its place on `segment` routes it to. A device
    /// whose line cannot be connected still works with MSI/MSI-X.
    pub fn connect_intx(&self, segment: &PciSegment) {
        for device in &self.devices {
            let shared: SharedPciDevice = device.model.clone();
            let id = &device.config.id;
            let Some(gsi) = segment.intx_gsi(&shared) else {
                log::info!("{id}: no INTx");
                continue;
            };
            let mut model = device.model.lock().unwrap_or_else(|e| e.into_inner());
            match model.connect_intx(gsi) {
                Ok(()) => log::info!("{id}: INTx on GSI {gsi}"),
                Err(e) => log::warn!("{id}: INTx on GSI {gsi} unavailable: {e}"),
            }
        }
    }

    /// Unmaps every peer BAR, detaches the devices from KVM and closes them, in the order the
    /// kernel needs (tables first: their mmaps keep devices busy), then the domains.
    pub fn shut_down(self) {
        for device in &self.devices {
            if let Some(p2p) = &self.domains[device.domain].p2p {
                p2p.remove_device(device.host.key());
            }
            if let Err(e) = self.kvm_vfio.remove(&device.host.device_fd()) {
                log::warn!("{}: {e}", device.config.id);
            }
        }
        drop(self.reporter);
        drop(self.devices);
        for domain in self.domains {
            log::debug!(
                "P2P domain {}: closing its {} IOMMU",
                domain.plan.name,
                domain.backend.kind()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carving_keeps_msix_pages_out() {
        // 64 KiB BAR with the MSI-X table at 0x2000..0x2100 and PBA at 0x3000..0x3008.
        let pieces = carve(0, 0x10000, &[(0x2000, 0x2100), (0x3000, 0x3008)]);
        assert_eq!(pieces, vec![(0, 0x2000), (0x4000, 0x10000)]);
        assert_eq!(carve(0, 0x1000, &[]), vec![(0, 0x1000)]);
        assert_eq!(carve(0, 0x1000, &[(0, 8)]), vec![]);
    }
}
