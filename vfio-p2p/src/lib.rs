//! Host side of device assignment for p2pvmm: the host IOMMU, VFIO PCI devices, and the
//! peer-to-peer BAR mappings that let assigned devices DMA into each other's BARs.
//!
//! - [`IommuBackend`] is the one interface for putting memory into the host IOMMU, with two
//!   implementations behind [`VfioBackend`]: [`Iommufd`] (maps by file: guest RAM from its
//!   memfd, peer BARs from VFIO dmabufs) and [`Type1`] (the legacy container, maps by address).
//! - [`HostPciDevice`] is an opened, attached host device: regions, interrupts, reset, dmabuf
//!   export. Opening checks sysfs first and reports what is wrong with the device by name.
//! - [`DomainOpener`] opens one IOMMU address space per P2P group; [`P2pTable`] (one per
//!   group) keeps every member's BAR areas in the group's IOMMU at the address the guest gave the
//!   BAR, following BAR moves, memory-decode changes, resets and removal; [`P2pRow`] is what the
//!   user sees of it.
//!
//! No KVM here: the VMM registers device fds with the KVM-VFIO device and eventfds with KVM.
//! `unsafe` is confined to ioctl, mmap and pread/pwrite calls, each with its reasoning, and to
//! [`IommuBackend::map`], whose contract the caller upholds.
//!
//! # The order of calls in a VMM
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use vfio_p2p::*;
//!
//! # fn vm(memfd: &std::fs::File, ram: &[(u64, u64, u64, u64)]) -> Result<(), Box<dyn std::error::Error>> {
//! // 1. One domain per P2P group (and per ungrouped device), all on one /dev/iommu.
//! let opener = DomainOpener::new();
//! let backend = opener.open(BackendKind::Iommufd)?; // or BackendKind::Type1
//! let iommu = backend.iommu();
//!
//! // 2. Open the group's devices in it (then KVM_DEV_VFIO_FILE_ADD with `dev.device_fd()`).
//! let dev = HostPciDevice::open("/sys/bus/pci/devices/0000:00:03.0", &backend)?;
//!
//! // 3. With all devices attached, check guest RAM and MMIO windows against the host IOMMU.
//! let host = iommu.iova_ranges()?;
//! let mmio = [IovaRange::with_size(0xc000_0000, 0x3ec0_0000)];
//! assert!(mmio.iter().all(|w| ranges_cover(&host, w.start, w.last - w.start + 1)));
//!
//! // 4. Guest RAM, GPA = IOVA: each region from the memfd, with its host address for type1.
//! for &(gpa, size, file_offset, host_va) in ram {
//!     let backing = Backing::File { fd: memfd.as_fd(), offset: file_offset, host_va: Some(host_va) };
//!     let req = DmaMapRequest { iova: gpa, size, kind: DmaKind::Ram, backing, writable: true };
//!     // SAFETY: guest RAM stays mapped, unchanged, until the IOAS/container is gone.
//!     unsafe { iommu.map(&req)? };
//! }
//! // Every other domain takes guest RAM from the first, its pages pinned once (`Ok(false)`, as
//! // on type1: map it as above instead).
//! let other = opener.open(BackendKind::Iommufd)?;
//! for &(gpa, size, ..) in ram {
//!     let _shared = other.copy_mapping_from(&backend, gpa, size)?;
//! }
//!
//! // 5. P2P within the group: register the BAR areas once; then report where the BAR observer
//! //    sees each BAR (placed and decoding, decode off, unplaced).
//! let p2p = P2pTable::new("g0", iommu.clone(), &mmio);
//! p2p.add_device(&dev, "gpu0")?;
//! dev.write_region(CONFIG_REGION, 4, &0x0006u16.to_le_bytes())?; // guest sets MEM | MASTER
//! p2p.bar_moved(BarKey { device: dev.key(), region: 2 }, BarPlacement::Placed(0xe000_0000))?;
//! p2p.device_reset(dev.key(), || dev.reset())?;
//! for row in p2p.rows() {
//!     println!("{} {} BAR {}: {}", row.domain, row.device_id, row.bar, row.state);
//! }
//!
//! // 6. Teardown or unplug: table first (unmaps, closes dmabufs, drops mmaps), then device.
//! p2p.remove_device(dev.key());
//! drop(dev);
//! # Ok(()) }
//! ```

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

mod bdf;
mod caps;
mod device;
mod domain;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod iommu;
mod iommufd;
mod irq;
mod open;
mod p2p;
mod p2p_rows;
mod region;
mod type1;

pub use bdf::{Bdf, BdfParseError};
pub use caps::CapError;
pub use device::{BarArea, DeviceError, DeviceKey, HostPciDevice};
pub use domain::DomainOpener;
pub use iommu::{
    ranges_cover, BackendKind, Backing, DmaKind, DmaMapRequest, IommuBackend, IommuError,
    IovaRange, VfioBackend,
};
pub use iommufd::Iommufd;
pub use irq::{IrqIndex, IrqInfo};
pub use open::{GroupBlocker, GroupBlockers, OpenError};
pub use p2p::{BarBacking, BarKey, BarPlacement, P2pError, P2pKey, P2pState, P2pTable};
pub use p2p_rows::{P2pAreaState, P2pMechanism, P2pRow};
pub use region::{
    MmapArea, RegionFlags, RegionInfo, RegionMapping, CONFIG_REGION, ROM_REGION, VGA_REGION,
};
pub use type1::Type1;

/// The host page size: the granularity of IOMMU mappings, dmabuf ranges and BAR mmaps.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; no memory is passed.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shareable<T: Send + Sync>() {}

    #[test]
    fn the_vm_wide_objects_can_be_shared_between_vcpu_threads() {
        shareable::<VfioBackend>();
        shareable::<HostPciDevice>();
        shareable::<P2pTable>();
        shareable::<RegionMapping>();
    }
}
