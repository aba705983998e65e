//! An opened host PCI device: its identity, regions (info, pread/pwrite, mmap), reset, and the
//! export of BAR slices as dmabufs for peer-to-peer DMA. Opening is in `open.rs`, interrupts in
//! `irq.rs`.
//!
//! vfio-ioctls' `VfioDevice` owns the fd and the attachment (IOAS or container group) and is
//! kept for that and for `export_dma_buf`; the region, reset and access calls are ours because
//! its versions drop errors (`region_read` returns `()`, `reset` ignores failure) and we need
//! them typed with the BDF.

use std::fmt;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, VFIO_BASE, VFIO_DEVICE_FLAGS_RESET, VFIO_PCI_BAR5_REGION_INDEX, VFIO_TYPE,
};
use vfio_ioctls::{VfioDevice, VfioError, VfioRegionDmaRange};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref};

use crate::bdf::Bdf;
use crate::iommu::BackendKind;
use crate::open::OpenError;
use crate::page_size;
use crate::region::{query_region, MmapArea, RegionInfo, RegionMapping};
use crate::type1::Type1Attachment;

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// A host device's identity, stable for as long as it is open and independent of where the
/// guest puts its BARs: the P2P table keys its entries by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKey {
    /// `st_dev`/`st_ino` of the `/dev/vfio/devices/vfioN` node (iommufd).
    Cdev { dev: u64, ino: u64 },
    /// IOMMU group and address (legacy container).
    Group { group: u32, bdf: Bdf },
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKey::Cdev { dev, ino } => write!(f, "vfio cdev {dev:#x}:{ino}"),
            DeviceKey::Group { group, bdf } => write!(f, "{bdf} (group {group})"),
        }
    }
}

/// An mmappable, page-aligned area of a BAR that can be a P2P target: exported as one dmabuf
/// (iommufd accepts single-range dmabufs only) or mmapped for type1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BarArea {
    pub region: u32,
    pub offset: u64,
    pub size: u64,
}

/// Errors of an opened device; each names it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "{bdf} region {region}: [{offset:#x}, +{len:#x}) cannot be exported as a dmabuf (BARs \
         0-5 only, page-aligned, inside the region)"
    )]
    DmabufRange {
        bdf: Bdf,
        region: u32,
        offset: u64,
        len: u64,
    },
    #[error("exporting {bdf} region {region} as a dmabuf: {source}")]
    Dmabuf {
        bdf: Bdf,
        region: u32,
        #[source]
        source: io::Error,
    },
    #[error("{bdf} has no interrupt index {index}")]
    NoSuchIrq { bdf: Bdf, index: u32 },
    #[error("{bdf} has no region {region}")]
    NoSuchRegion { bdf: Bdf, region: u32 },
    #[error("{bdf} region {region}: [{offset:#x}, +{len:#x}) is not inside one mmappable area")]
    NotMappable {
        bdf: Bdf,
        region: u32,
        offset: u64,
        len: u64,
    },
    #[error("{bdf} region {region} does not allow {access}")]
    AccessDenied {
        bdf: Bdf,
        region: u32,
        access: &'static str,
    },
    #[error("{bdf} interrupt index {index}: vectors {start}..{end} exceed the {count} it has")]
    IrqOutOfRange {
        bdf: Bdf,
        index: u32,
        start: u32,
        end: u64,
        count: u32,
    },
    #[error("{bdf} interrupt index {index}: VFIO_DEVICE_SET_IRQS: {source}")]
    SetIrqs {
        bdf: Bdf,
        index: u32,
        #[source]
        source: io::Error,
    },
    #[error("mmap of {bdf} region {region} [{offset:#x}, +{len:#x}): {source}")]
    Mmap {
        bdf: Bdf,
        region: u32,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("{bdf} region {region}: access [{offset:#x}, +{len:#x}) is outside the region")]
    OutOfRange {
        bdf: Bdf,
        region: u32,
        offset: u64,
        len: u64,
    },
    #[error("{op} {bdf} region {region} at {offset:#x}: {source}")]
    RegionIo {
        op: &'static str,
        bdf: Bdf,
        region: u32,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("resetting {bdf}: {source}")]
    Reset {
        bdf: Bdf,
        #[source]
        source: io::Error,
    },
    #[error("{bdf} cannot be reset through VFIO (no FLR, PM or bus reset available)")]
    ResetUnsupported { bdf: Bdf },
}

/// A host PCI device opened for assignment and attached to the VM's IOMMU.
pub struct HostPciDevice {
    bdf: Bdf,
    key: DeviceKey,
    backend: BackendKind,
    flags: u32,
    /// One slot per VFIO region index; `None` where the device has no such region.
    regions: Vec<Option<RegionInfo>>,
    /// Owns the device fd and its attachment; dropped before `_type1` so the group has left the
    /// container when the attachment count falls.
    pub(crate) vfio: VfioDevice,
    _type1: Option<Type1Attachment>,
}

impl HostPciDevice {
    /// Finishes opening: reads device and region info from the fd `vfio` owns.
    pub(crate) fn new(
        bdf: Bdf,
        key: DeviceKey,
        backend: BackendKind,
        vfio: VfioDevice,
        type1: Option<Type1Attachment>,
    ) -> Result<Self, OpenError> {
        let info_error = |source| OpenError::DeviceInfo { bdf, source };
        let mut info = vfio_device_info {
            argsz: size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: `vfio` owns an open VFIO device fd; `info` is a vfio_device_info whose argsz
        // bounds what the kernel writes.
        let ret = unsafe { ioctl_with_mut_ref(&vfio, VFIO_DEVICE_GET_INFO(), &mut info) };
        if ret != 0 {
            return Err(info_error(io::Error::last_os_error()));
        }
        // SAFETY: the fd is owned by `vfio`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(vfio.as_raw_fd()) };
        let regions = (0..info.num_regions)
            .map(|index| query_region(fd, index))
            .collect::<io::Result<Vec<_>>>()
            .map_err(info_error)?;
        Ok(Self {
            bdf,
            key,
            backend,
            flags: info.flags,
            regions,
            vfio,
            _type1: type1,
        })
    }

    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The identity the P2P table keys this device's BARs by.
    pub fn key(&self) -> DeviceKey {
        self.key
    }

    pub fn backend_kind(&self) -> BackendKind {
        self.backend
    }

    /// The VFIO device fd: what `KVM_DEV_VFIO_FILE_ADD` takes (a device fd is accepted in both
    /// modes since Linux 6.6; the group fd of the legacy path stays inside vfio-ioctls).
    pub fn device_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by `self.vfio` and stays open while `self` is borrowed.
        unsafe { BorrowedFd::borrow_raw(self.vfio.as_raw_fd()) }
    }

    /// Whether `VFIO_DEVICE_RESET` can work (the kernel found FLR, PM or a bus reset).
    pub fn supports_reset(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// Every region the device has, by index.
    pub fn regions(&self) -> impl Iterator<Item = &RegionInfo> {
        self.regions.iter().flatten()
    }

    pub fn region(&self, region: u32) -> Result<&RegionInfo, DeviceError> {
        self.regions
            .get(region as usize)
            .and_then(Option::as_ref)
            .ok_or(DeviceError::NoSuchRegion {
                bdf: self.bdf,
                region,
            })
    }

    /// Checks access to `[offset, offset + len)` of `region` and returns its fd offset.
    fn access(&self, region: u32, offset: u64, len: u64, write: bool) -> Result<u64, DeviceError> {
        let info = self.region(region)?;
        let bdf = self.bdf;
        if !info.contains(offset, len) {
            return Err(DeviceError::OutOfRange {
                bdf,
                region,
                offset,
                len,
            });
        }
        match (write, info.flags.read, info.flags.write) {
            (false, false, _) => Err(DeviceError::AccessDenied {
                bdf,
                region,
                access: "reads",
            }),
            (true, _, false) => Err(DeviceError::AccessDenied {
                bdf,
                region,
                access: "writes",
            }),
            _ => Ok(info.fd_offset + offset),
        }
    }

    /// Reads `buf.len()` bytes of `region` at `offset` (pread on the device fd). Config space
    /// goes through here; so do BAR accesses that are trapped rather than mmapped.
    pub fn read_region(&self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let at = self.access(region, offset, buf.len() as u64, false)?;
        let io_error = |source| DeviceError::RegionIo {
            op: "reading",
            bdf: self.bdf,
            region,
            offset,
            source,
        };
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: the fd is open (owned by self.vfio); the kernel writes at most
            // `rest.len()` bytes into `rest`, which is valid writable memory.
            let n = unsafe {
                libc::pread(
                    self.vfio.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (at + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io_error(io::ErrorKind::UnexpectedEof.into())),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(io_error(e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes `data` to `region` at `offset` (pwrite on the device fd).
    pub fn write_region(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let at = self.access(region, offset, data.len() as u64, true)?;
        let io_error = |source| DeviceError::RegionIo {
            op: "writing",
            bdf: self.bdf,
            region,
            offset,
            source,
        };
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            // SAFETY: the fd is open (owned by self.vfio); the kernel reads at most
            // `rest.len()` bytes from `rest`, which is valid memory.
            let n = unsafe {
                libc::pwrite(
                    self.vfio.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    (at + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io_error(io::ErrorKind::WriteZero.into())),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(io_error(e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Mmaps `[offset, offset + len)` of `region`, which must lie in one of its
    /// [`mmap_areas`](RegionInfo::mmap_areas) and start on a page. For KVM memory slots (guest
    /// CPU access to the BAR) and for the type1 P2P path.
    pub fn mmap_region(
        &self,
        region: u32,
        offset: u64,
        len: u64,
    ) -> Result<RegionMapping, DeviceError> {
        let info = self.region(region)?;
        let bdf = self.bdf;
        let inside = |a: &MmapArea| {
            offset >= a.offset
                && offset
                    .checked_add(len)
                    .is_some_and(|e| e <= a.offset + a.size)
        };
        if len == 0 || !offset.is_multiple_of(page_size()) || !info.mmap_areas().iter().any(inside)
        {
            return Err(DeviceError::NotMappable {
                bdf,
                region,
                offset,
                len,
            });
        }
        let mut prot = 0;
        if info.flags.read {
            prot |= libc::PROT_READ;
        }
        if info.flags.write {
            prot |= libc::PROT_WRITE;
        }
        RegionMapping::new(self.device_fd(), info.fd_offset + offset, len, prot).map_err(|source| {
            DeviceError::Mmap {
                bdf,
                region,
                offset,
                len,
                source,
            }
        })
    }

    /// The BAR areas that can be P2P targets: the mmappable parts of BARs 0-5, trimmed to whole
    /// pages. Sub-page BARs have none (a dmabuf must be page-sized; trap those instead).
    pub fn p2p_areas(&self) -> Vec<BarArea> {
        let page = page_size();
        self.regions()
            .filter(|r| r.index <= VFIO_PCI_BAR5_REGION_INDEX)
            .flat_map(|r| {
                r.mmap_areas().into_iter().filter_map(move |a| {
                    let size = a.size - a.size % page;
                    (a.offset.is_multiple_of(page) && size > 0).then_some(BarArea {
                        region: r.index,
                        offset: a.offset,
                        size,
                    })
                })
            })
            .collect()
    }

    /// `VFIO_DEVICE_RESET` (FLR, PM or bus reset, as the kernel found). The kernel revokes this
    /// device's dmabufs across the reset, so go through `P2pTable::device_reset`, which unmaps
    /// them first and maps them again afterwards.
    pub fn reset(&self) -> Result<(), DeviceError> {
        if !self.supports_reset() {
            return Err(DeviceError::ResetUnsupported { bdf: self.bdf });
        }
        // SAFETY: the fd is an open VFIO device fd; VFIO_DEVICE_RESET takes no argument.
        let ret = unsafe { ioctl(&self.vfio, VFIO_DEVICE_RESET()) };
        if ret != 0 {
            return Err(DeviceError::Reset {
                bdf: self.bdf,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Exports `[offset, offset + len)` of BAR `region` as a dmabuf (`VFIO_DEVICE_FEATURE`
    /// GET | `DMA_BUF`, one range), for `IOMMU_IOAS_MAP_FILE`. `Ok(None)` where the kernel or
    /// the device's driver cannot export (before Linux 6.19, `CONFIG_VFIO_PCI_DMABUF` off, a
    /// variant driver without support): P2P to this BAR is then unavailable on iommufd.
    ///
    /// Export once and keep the fd: it survives BAR moves. While the device's memory decoding
    /// is off the dmabuf is revoked and cannot be mapped; it comes back when decoding does.
    pub fn export_dmabuf(
        &self,
        region: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<OwnedFd>, DeviceError> {
        let bdf = self.bdf;
        let page = page_size();
        let bad_range = DeviceError::DmabufRange {
            bdf,
            region,
            offset,
            len,
        };
        let info = self.region(region)?;
        if region > VFIO_PCI_BAR5_REGION_INDEX
            || len == 0
            || !offset.is_multiple_of(page)
            || !len.is_multiple_of(page)
            || !info.contains(offset, len)
        {
            return Err(bad_range);
        }
        let range = VfioRegionDmaRange {
            offset,
            length: len,
        };
        let flags = (libc::O_CLOEXEC | libc::O_RDWR) as u32;
        match self.vfio.export_dma_buf(region, &[range], flags) {
            Ok(file) => Ok(file.map(OwnedFd::from)),
            Err(VfioError::VfioDeviceFeature(e))
                if matches!(e.errno(), libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL) =>
            {
                log::debug!("{bdf}: the kernel cannot export region {region} as a dmabuf: {e}");
                Ok(None)
            }
            Err(VfioError::VfioDeviceFeature(e)) => Err(DeviceError::Dmabuf {
                bdf,
                region,
                source: io::Error::from_raw_os_error(e.errno()),
            }),
            Err(e) => Err(DeviceError::Dmabuf {
                bdf,
                region,
                source: io::Error::other(e),
            }),
        }
    }
}

impl AsRawFd for HostPciDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.vfio.as_raw_fd()
    }
}

impl AsFd for HostPciDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.device_fd()
    }
}

impl fmt::Debug for HostPciDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostPciDevice")
            .field("bdf", &self.bdf)
            .field("key", &self.key)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}
