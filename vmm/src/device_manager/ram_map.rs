//! Guest RAM into every P2P domain's IOMMU, off the start's critical path.
//!
//! Mapping guest RAM pins it: under nested virtualisation that took 0.9 s per GiB on iommufd
//! (allocation included) and 3.5 s per GiB on type1. The vCPUs need none of it, only device DMA
//! does, so the mapping runs on a thread of its own while the guest boots, and every passthrough
//! device holds its first Bus Master Enable on a [`DmaGate`] until the mapping is complete
//! (a device cannot DMA before the guest enables bus mastering). What can be checked quickly
//! (that the host IOMMU translates guest RAM at all) is checked before the VM starts. A mapping
//! that fails stops the VM: its devices keep bus mastering off, the exit signal wakes the VMM,
//! and [`RamMap::failure`] says why.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{ExitSignal, GuestExit};
use devices::vfio::{DmaGate, DmaGateState};
use vfio_p2p::{
    ranges_cover, BackendKind, Backing, DmaKind, DmaMapRequest, IovaRange, VfioBackend,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::DeviceManagerError;
use crate::config::DomainPlan;
use crate::memory::GuestRam;

/// Delays the mapping by this many milliseconds: a lab knob that makes the guest's first Bus
/// Master Enable arrive while the mapping still runs, not configuration.
pub const RAM_MAP_DELAY_ENV: &str = "P2PVMM_X_RAM_MAP_DELAY_MS";

/// The guest RAM mapping, running or done.
pub struct RamMap {
    gate: Arc<DmaGate>,
    thread: Option<JoinHandle<()>>,
}

impl RamMap {
    /// Starts mapping `ram` into `domains` on a thread (here and now if no thread can be
    /// spawned), opening `gate` when it is done.
    pub fn start(
        domains: Vec<(DomainPlan, VfioBackend)>,
        ram: GuestRam,
        gate: Arc<DmaGate>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let job = Arc::new(MapJob {
            domains,
            ram,
            gate,
            exit,
        });
        let gate = job.gate.clone();
        let theirs = job.clone();
        // The thread inherits the VMM thread's seccomp filter.
        let thread = match std::thread::Builder::new()
            .name("ram-map".into())
            .spawn(move || theirs.run())
        {
            Ok(thread) => Some(thread),
            Err(e) => {
                log::debug!("no thread to map guest RAM on ({e}); mapping it now");
                job.run();
                None
            }
        };
        Self { gate, thread }
    }

    /// Why the mapping failed, if it did.
    pub fn failure(&self) -> Option<String> {
        match self.gate.state() {
            DmaGateState::Failed(why) => Some(why),
            _ => None,
        }
    }

    /// Waits for the mapping thread: the domains must not be torn down under it.
    pub fn finish(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the mapping thread needs.
struct MapJob {
    domains: Vec<(DomainPlan, VfioBackend)>,
    ram: GuestRam,
    gate: Arc<DmaGate>,
    exit: Arc<ExitSignal>,
}

impl MapJob {
    fn run(&self) {
        if let Some(ms) = std::env::var(RAM_MAP_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            log::warn!("{RAM_MAP_DELAY_ENV}: guest RAM mapping delayed by {ms} ms (lab knob)");
            std::thread::sleep(Duration::from_millis(ms));
        }
        let started = Instant::now();
        match map_guest_ram(&self.domains, &self.ram) {
            Ok(()) => {
                log::info!(
                    "guest RAM mapped for DMA in every domain in {:?}, {} ms after the start",
                    started.elapsed(),
                    crate::start_phases::since_start().as_millis()
                );
                self.gate.open();
            }
            Err(e) => {
                let why = crate::error_chain(&e);
                log::error!("guest RAM could not be mapped for device DMA: {why}; stopping the VM");
                self.gate.fail(why);
                self.exit.request(GuestExit::Crash);
            }
        }
    }
}

/// Pinned and locked memory of this process (`VmPin`, `VmLck` of /proc/self/status), for the
/// cost of each domain's RAM mapping.
fn pinned_kib() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("VmPin:") || l.starts_with("VmLck:"))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Maps guest RAM at IOVA = GPA into every domain ([`check_reach`] has checked the host IOMMU
/// translates it). A second iommufd domain gets RAM by `IOMMU_IOAS_COPY` from the first,
/// sharing its pinned pages.
fn map_guest_ram(
    domains: &[(DomainPlan, VfioBackend)],
    ram: &GuestRam,
) -> Result<(), DeviceManagerError> {
    let mut first_iommufd: Option<&VfioBackend> = None;
    for (plan, backend) in domains {
        let started = Instant::now();
        let copied = match first_iommufd {
            Some(src) => copy_guest_ram(plan, backend, src, ram)?,
            None => false,
        };
        if !copied {
            map_domain_ram(plan, backend, ram)?;
        }
        log::info!(
            "P2P domain {}: guest RAM {} into its {} IOMMU in {:?} ({})",
            plan.name,
            if copied { "copied" } else { "mapped" },
            backend.kind(),
            started.elapsed(),
            pinned_kib()
        );
        if backend.kind() == BackendKind::Iommufd && first_iommufd.is_none() {
            first_iommufd = Some(backend);
        }
    }
    Ok(())
}

/// `IOMMU_IOAS_COPY` of every RAM region from `src`; false when the backends cannot share.
fn copy_guest_ram(
    plan: &DomainPlan,
    backend: &VfioBackend,
    src: &VfioBackend,
    ram: &GuestRam,
) -> Result<bool, DeviceManagerError> {
    for (index, region) in ram.memory.iter().enumerate() {
        let (gpa, size) = (region.start_addr().0, region.len());
        let copied = backend
            .copy_mapping_from(src, gpa, size)
            .map_err(|source| DeviceManagerError::Domain {
                domain: plan.name.clone(),
                source,
            })?;
        if !copied {
            // Only the first region can be "not applicable": the answer depends on the backends.
            debug_assert_eq!(index, 0);
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks that every domain's host IOMMU translates guest RAM (an error: the VM cannot start)
/// and the MMIO windows peers will DMA into (a warning), before the mapping starts.
pub fn check_reach(
    domains: &[(DomainPlan, VfioBackend)],
    ram: &GuestRam,
    windows: &[IovaRange],
) -> Result<(), DeviceManagerError> {
    for (plan, backend) in domains {
        let host_ranges =
            backend
                .iommu()
                .iova_ranges()
                .map_err(|source| DeviceManagerError::Domain {
                    domain: plan.name.clone(),
                    source,
                })?;
        for region in ram.memory.iter() {
            let (start, size) = (region.start_addr().0, region.len());
            if !ranges_cover(&host_ranges, start, size) {
                return Err(DeviceManagerError::IovaRange {
                    what: "guest RAM",
                    start,
                    size,
                });
            }
        }
        for window in windows {
            let size = window.last - window.start + 1;
            if !ranges_cover(&host_ranges, window.start, size) {
                log::warn!(
                    "P2P domain {}: MMIO window {:#x}+{size:#x} is outside the host IOMMU's \
                     range: peer DMA to BARs placed there will fault",
                    plan.name,
                    window.start
                );
            }
        }
    }
    Ok(())
}

/// Maps guest RAM into one domain from scratch.
fn map_domain_ram(
    plan: &DomainPlan,
    backend: &VfioBackend,
    ram: &GuestRam,
) -> Result<(), DeviceManagerError> {
    let domain_err = |source| DeviceManagerError::Domain {
        domain: plan.name.clone(),
        source,
    };
    let iommu = backend.iommu();
    for region in ram.memory.iter() {
        let gpa = region.start_addr().0;
        let size = region.len();
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
        let started = Instant::now();
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
        let started = Instant::now();
        // SAFETY: guest RAM stays mapped and backed by this memfd for the VM's lifetime, longer
        // than the IOAS or container (torn down first).
        unsafe { iommu.map(&request) }.map_err(domain_err)?;
        log::info!(
            "guest RAM {gpa:#x}+{size:#x} allocated in {populated:?}, mapped into the IOMMU \
             ({:?}) in {:?}",
            backend.kind(),
            started.elapsed()
        );
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
