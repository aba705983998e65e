//! Passthrough devices: one IOMMU backend per VM, each configured host function opened and
//! attached to it, guest RAM mapped at IOVA = GPA, the peer-BAR table, and the device models.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::interrupt::InterruptController;
use devices::pci::{PciSegment, SharedPciDevice};
use devices::vfio::VfioPciDevice;
use vfio_p2p::{
    ranges_cover, BackendKind, Backing, DmaKind, DmaMapRequest, HostPciDevice, IovaRange, P2pTable,
    VfioBackend,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::bar_mapper::{BarMapper, MappedArea, PassthroughBars};
use super::DeviceManagerError;
use crate::config::{DeviceConfig, IommuBackendKind, VmConfig};
use crate::kvm_vfio::KvmVfio;
use crate::memory::{GuestRam, RamBacking};

const PAGE_SIZE: u64 = 4096;

/// A passthrough device model, shared with the PCI segment and buses.
pub type SharedVfioDevice = Arc<Mutex<VfioPciDevice>>;

/// The VM's passthrough state, in the order it must be torn down.
pub struct Passthrough {
    pub p2p: Arc<P2pTable>,
    pub devices: Vec<(DeviceConfig, Arc<HostPciDevice>, SharedVfioDevice)>,
    pub kvm_vfio: KvmVfio,
    pub backend: VfioBackend,
}

/// iommufd where the host has it, unless the configuration names a backend.
fn backend_kind(config: &VmConfig) -> BackendKind {
    match config.iommu_backend() {
        Some(IommuBackendKind::Iommufd) => BackendKind::Iommufd,
        Some(IommuBackendKind::Legacy) => BackendKind::Type1,
        None if Path::new("/dev/iommu").exists() => BackendKind::Iommufd,
        None => BackendKind::Type1,
    }
}

/// What guest RAM should be for the configured devices: anonymous huge pages when they sit on
/// type1, which pins RAM through the process page tables; a memfd otherwise (iommufd maps it by
/// file, and a VM without devices keeps the file for them).
pub fn ram_backing(config: &VmConfig) -> RamBacking {
    if !config.devices.is_empty() && backend_kind(config) == BackendKind::Type1 {
        RamBacking::AnonymousHuge
    } else {
        RamBacking::Memfd
    }
}

/// The configured devices, opened on one backend and known to KVM.
pub struct Opened {
    pub backend: VfioBackend,
    pub kvm_vfio: KvmVfio,
    pub devices: Vec<(DeviceConfig, Arc<HostPciDevice>)>,
}

/// Opens every configured device on one backend and registers it with KVM.
pub fn open(config: &VmConfig, kvm_vfio: KvmVfio) -> Result<Opened, DeviceManagerError> {
    let kind = backend_kind(config);
    let backend = VfioBackend::open(kind).map_err(DeviceManagerError::Backend)?;
    let mut opened = Vec::new();
    for device in &config.devices {
        let host = HostPciDevice::open(&device.path, &backend).map_err(|source| {
            DeviceManagerError::Open {
                id: device.id.clone(),
                source,
            }
        })?;
        kvm_vfio
            .add(&host.device_fd())
            .map_err(|source| DeviceManagerError::KvmVfio {
                id: device.id.clone(),
                source,
            })?;
        log::info!("{}: {} opened on {kind:?}", device.id, host.bdf());
        opened.push((device.clone(), Arc::new(host)));
    }
    Ok(Opened {
        backend,
        kvm_vfio,
        devices: opened,
    })
}

/// Maps guest RAM into the IOMMU at IOVA = GPA, after checking the host IOMMU can translate it
/// and the MMIO windows peers will DMA into.
pub fn map_guest_ram(
    backend: &VfioBackend,
    ram: &GuestRam,
    windows: &[IovaRange],
) -> Result<(), DeviceManagerError> {
    let iommu = backend.iommu();
    let host_ranges = iommu.iova_ranges().map_err(DeviceManagerError::Backend)?;
    for region in ram.memory.iter() {
        let gpa = region.start_addr().0;
        let size = region.len();
        if !ranges_cover(&host_ranges, gpa, size) {
            return Err(DeviceManagerError::IovaRange {
                what: "guest RAM",
                start: gpa,
                size,
            });
        }
        let offset = region.file_offset().map_or(gpa, |f| f.start());
        let host_va = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| DeviceManagerError::IovaRange {
                what: "guest RAM (no host mapping)",
                start: gpa,
                size,
            })? as u64;
        let request = DmaMapRequest {
            iova: gpa,
            size,
            kind: DmaKind::Ram,
            backing: match &ram.file {
                Some(file) => Backing::File {
                    fd: file.as_fd(),
                    offset,
                    host_va: Some(host_va),
                },
                None => Backing::HostVa(host_va),
            },
            writable: true,
        };
        let started = std::time::Instant::now();
        // iommufd pins straight from the file's pages: allocating them first in one call is
        // far cheaper than faulting them in one by one during the map. Type1 pins through the
        // process page tables and faults them in either way.
        if let (Some(file), BackendKind::Iommufd) = (&ram.file, backend.kind()) {
            populate(file, offset, size).map_err(|source| DeviceManagerError::Populate {
                start: gpa,
                size,
                source,
            })?;
        }
        let populated = started.elapsed();
        let started = std::time::Instant::now();
        // SAFETY: guest RAM stays mapped and backed by this memfd for the VM's lifetime, longer
        // than the IOAS or container (torn down first).
        unsafe { iommu.map(&request) }.map_err(DeviceManagerError::Backend)?;
        log::info!(
            "guest RAM {gpa:#x}+{size:#x} allocated in {populated:?}, mapped into the IOMMU \
             ({:?}) in {:?}",
            backend.kind(),
            started.elapsed()
        );
    }
    for window in windows {
        let size = window.last - window.start + 1;
        if !ranges_cover(&host_ranges, window.start, size) {
            log::warn!(
                "MMIO window {:#x}+{size:#x} is outside the host IOMMU's range: peer DMA to BARs \
                 placed there will fault",
                window.start
            );
        }
    }
    Ok(())
}

/// Allocates the memfd's pages for `[offset, offset + size)`. Device DMA pins all of guest RAM
/// anyway; allocating it up front with one call is cheaper than faulting it in page by page
/// inside an iommufd map.
fn populate(file: &std::fs::File, offset: u64, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(size)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: fallocate only allocates blocks of the file; no memory of ours is touched.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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

/// Builds the P2P table and the device models for the opened devices.
pub fn build(
    opened: Opened,
    p2p: Arc<P2pTable>,
    mapper: &BarMapper,
    interrupts: Arc<dyn InterruptController>,
) -> Result<Passthrough, DeviceManagerError> {
    let Opened {
        backend,
        kvm_vfio,
        devices: opened,
    } = opened;
    let mut devices = Vec::new();
    for (config, host) in opened {
        let areas = match p2p.add_device(&host) {
            Ok(keys) => keys.len(),
            Err(e) => {
                log::warn!("{}: peer-to-peer unavailable: {e}", config.id);
                0
            }
        };
        log::info!(
            "{}: {areas} BAR area(s) registered for peer-to-peer DMA",
            config.id
        );
        let model = VfioPciDevice::new(
            &config.id,
            host.clone(),
            interrupts.clone(),
            Some(p2p.clone()),
            Default::default(),
        )
        .map_err(|source| DeviceManagerError::Device {
            id: config.id.clone(),
            source,
        })?;
        let areas = mappable_areas(&config.id, &host, &model)?;
        let model = Arc::new(Mutex::new(model));
        let shared: SharedPciDevice = model.clone();
        mapper.add_passthrough(
            &shared,
            PassthroughBars {
                key: host.key(),
                areas,
            },
        );
        devices.push((config, host, model));
    }
    Ok(Passthrough {
        p2p,
        devices,
        kvm_vfio,
        backend,
    })
}

impl Passthrough {
    /// Connects each device's INTx to the GSI its place on `segment` routes it to. A device
    /// whose line cannot be connected still works with MSI/MSI-X.
    pub fn connect_intx(&self, segment: &PciSegment) {
        for (config, _, model) in &self.devices {
            let shared: SharedPciDevice = model.clone();
            let Some(gsi) = segment.intx_gsi(&shared) else {
                log::info!("{}: no INTx", config.id);
                continue;
            };
            let mut model = model.lock().unwrap_or_else(|e| e.into_inner());
            match model.connect_intx(gsi) {
                Ok(()) => log::info!("{}: INTx on GSI {gsi}", config.id),
                Err(e) => log::warn!("{}: INTx on GSI {gsi} unavailable: {e}", config.id),
            }
        }
    }

    /// Unmaps every peer BAR, detaches the devices from KVM and closes them, in the order the
    /// kernel needs (table first: its mmaps keep devices busy).
    pub fn shut_down(self) {
        for (config, host, _) in &self.devices {
            self.p2p.remove_device(host.key());
            if let Err(e) = self.kvm_vfio.remove(&host.device_fd()) {
                log::warn!("{}: {e}", config.id);
            }
        }
        drop(self.devices);
        drop(self.p2p);
        drop(self.backend);
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
