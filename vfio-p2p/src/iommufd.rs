//! The iommufd backend: one `/dev/iommu` per VM and one IOAS per P2P domain on it.
//!
//! Built on vfio-ioctls' `VfioIommufd` (which holds the shared `IommuFd` and one `IommufdIoas`,
//! and is what `VfioDevice` binds and attaches device cdevs to), so every device opened against
//! a domain lands in its IOAS. Mapping by file (`IOMMU_IOAS_MAP_FILE`) is the point of this
//! backend: guest RAM goes in from its memfd, and peer BARs from VFIO dmabufs, which is the only
//! way to get a BAR into an IOAS (mapping a BAR's mmap by address fails with `EFAULT`). The
//! IOVA-range query and `IOMMU_IOAS_COPY` are not wrapped by the crates, so they are raw ioctls
//! here.

use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use iommufd_bindings::{
    iommu_ioas_copy, iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_unmap, iommu_iova_range,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE, IOMMUFD_CMD_IOAS_COPY,
    IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_TYPE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use vfio_ioctls::{VfioError, VfioIommufd};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::iommu::{BackendKind, Backing, DmaMapRequest, IommuBackend, IommuError, IovaRange};

vmm_sys_util::ioctl_io_nr!(
    IOMMU_IOAS_IOVA_RANGES,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_IOVA_RANGES
);
vmm_sys_util::ioctl_io_nr!(IOMMU_IOAS_COPY, IOMMUFD_TYPE as u32, IOMMUFD_CMD_IOAS_COPY);

/// One IOAS (a P2P domain) and the `/dev/iommu` it lives on, possibly shared with others.
pub struct Iommufd {
    vfio: Arc<VfioIommufd>,
}

impl Iommufd {
    /// Opens `/dev/iommu` and allocates an IOAS on it.
    pub fn open() -> Result<Self, IommuError> {
        Self::open_on(open_iommufd()?)
    }

    /// Allocates another IOAS on an open `/dev/iommu`: one P2P domain of a VM whose domains
    /// share the context (so guest RAM can be copied between them, pinned once).
    pub(crate) fn open_on(fd: Arc<IommuFd>) -> Result<Self, IommuError> {
        let vfio = VfioIommufd::new(fd, None, None).map_err(|e| match e {
            VfioError::NewVfioIommufd(e) => IommuError::IoasAlloc(iommufd_io_error(e)),
            e => IommuError::IoasAlloc(io::Error::other(e)),
        })?;
        Ok(Self {
            vfio: Arc::new(vfio),
        })
    }

    /// Whether `other` is an IOAS on the same `/dev/iommu` (then `IOMMU_IOAS_COPY` works).
    pub fn shares_context(&self, other: &Iommufd) -> bool {
        Arc::ptr_eq(self.vfio.iommufd(), other.vfio.iommufd())
    }

    /// Copies the mapping `[iova, iova + size)` of `src` (made by one earlier map of exactly that
    /// range) into this IOAS at the same IOVA: `IOMMU_IOAS_COPY`, which shares the pages `src`
    /// already pinned instead of pinning them again. Both must share the context.
    pub fn copy_from(&self, src: &Iommufd, iova: u64, size: u64) -> Result<(), IommuError> {
        if size == 0 || iova.checked_add(size - 1).is_none() {
            return Err(IommuError::InvalidRange { iova, size });
        }
        let mut copy = iommu_ioas_copy {
            size: size_of::<iommu_ioas_copy>() as u32,
            flags: map_flags(true),
            dst_ioas_id: self.ioas_id(),
            src_ioas_id: src.ioas_id(),
            length: size,
            dst_iova: iova,
            src_iova: iova,
        };
        // SAFETY: the fd is our open /dev/iommu and `copy` a valid iommu_ioas_copy that outlives
        // the call; the kernel only reads it. The copy maps memory `src` already maps, under the
        // contract its caller accepted for that mapping (`IommuBackend::map`).
        let ret =
            unsafe { ioctl_with_mut_ref(&**self.vfio.iommufd(), IOMMU_IOAS_COPY(), &mut copy) };
        if ret != 0 {
            return Err(IommuError::Copy {
                iova,
                size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The IOAS id devices attach to (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`).
    pub fn ioas_id(&self) -> u32 {
        self.vfio.ioas().id()
    }

    /// The vfio-ioctls object `VfioDevice` binds cdevs to; crate-private so callers never see
    /// vfio-ioctls types.
    pub(crate) fn vfio(&self) -> Arc<VfioIommufd> {
        self.vfio.clone()
    }

    fn map_error(&self, req: &DmaMapRequest<'_>, source: io::Error) -> IommuError {
        IommuError::Map {
            backend: BackendKind::Iommufd,
            kind: req.kind,
            iova: req.iova,
            size: req.size,
            source,
        }
    }
}

/// Opens `/dev/iommu`, naming a kernel without iommufd as such.
pub(crate) fn open_iommufd() -> Result<Arc<IommuFd>, IommuError> {
    let fd = IommuFd::new().map_err(|e| match iommufd_io_error(e) {
        e if e.kind() == io::ErrorKind::NotFound => IommuError::NoIommufd,
        e => IommuError::OpenIommufd(e),
    })?;
    Ok(Arc::new(fd))
}

/// `IOMMU_IOAS_MAP` arguments for mapping `req` from host address `user_va`.
fn ioas_map_args(ioas_id: u32, user_va: u64, req: &DmaMapRequest<'_>) -> iommu_ioas_map {
    iommu_ioas_map {
        size: size_of::<iommu_ioas_map>() as u32,
        flags: map_flags(req.writable),
        ioas_id,
        __reserved: 0,
        user_va,
        length: req.size,
        iova: req.iova,
    }
}

/// Always at the IOVA we chose (guest physical = IOVA), readable, writeable on request.
fn map_flags(writable: bool) -> u32 {
    let mut flags = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
        | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
    if writable {
        flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
    }
    flags
}

/// The errno inside an iommufd-ioctls error, so our errors carry `io::Error`s only.
pub(crate) fn iommufd_io_error(e: IommufdError) -> io::Error {
    match e {
        IommufdError::OpenIommufd(e) => e,
        IommufdError::IommuIoasAlloc(e)
        | IommufdError::IommuIoasMap(e)
        | IommufdError::IommuIoasMapFile(e)
        | IommufdError::IommuIoasUnmap(e)
        | IommufdError::IommuDestroy(e) => io::Error::from_raw_os_error(e.errno()),
        other => io::Error::other(other),
    }
}

impl IommuBackend for Iommufd {
    fn kind(&self) -> BackendKind {
        BackendKind::Iommufd
    }

    unsafe fn map(&self, req: &DmaMapRequest<'_>) -> Result<(), IommuError> {
        req.validate()?;
        let by_va = |va| {
            self.vfio
                .iommufd()
                .map_iommu_ioas(&ioas_map_args(self.ioas_id(), va, req))
                .map_err(|e| self.map_error(req, iommufd_io_error(e)))
        };
        match req.backing {
            Backing::File {
                fd,
                offset,
                host_va,
            } => {
                let result = self.vfio.ioas().map_file(
                    fd.as_raw_fd(),
                    offset,
                    req.size,
                    req.iova,
                    req.writable,
                );
                match (result.map_err(iommufd_io_error), host_va) {
                    (Ok(()), _) => Ok(()),
                    // IOMMU_IOAS_MAP_FILE arrived in Linux 6.13; before it, map what the
                    // caller also has mapped by address (fine for RAM; a BAR has no such
                    // fallback and its request carries no address).
                    (Err(e), Some(va)) if e.raw_os_error() == Some(libc::ENOTTY) => {
                        log::debug!("no IOMMU_IOAS_MAP_FILE; mapping {:#x} by address", req.iova);
                        by_va(va)
                    }
                    (Err(e), _) => Err(self.map_error(req, e)),
                }
            }
            Backing::HostVa(va) => by_va(va),
        }
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), IommuError> {
        let mut unmap = iommu_ioas_unmap {
            size: size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: self.ioas_id(),
            iova,
            length: size,
        };
        self.vfio
            .iommufd()
            .unmap_iommu_ioas(&mut unmap)
            .map_err(|e| IommuError::Unmap {
                backend: BackendKind::Iommufd,
                iova,
                size,
                source: iommufd_io_error(e),
            })?;
        // The kernel reports how much it removed: anything else means the range was not one
        // earlier mapping (areas only partly inside are refused, wholly inside ones removed).
        if unmap.length != size {
            return Err(IommuError::PartialUnmap { iova, size });
        }
        Ok(())
    }

    fn iova_ranges(&self) -> Result<Vec<IovaRange>, IommuError> {
        let error = |source| IommuError::IovaRanges {
            backend: BackendKind::Iommufd,
            source,
        };
        let mut ranges = vec![iommu_iova_range::default(); 8];
        loop {
            let mut query = iommu_ioas_iova_ranges {
                size: size_of::<iommu_ioas_iova_ranges>() as u32,
                ioas_id: self.ioas_id(),
                num_iovas: ranges.len() as u32,
                __reserved: 0,
                allowed_iovas: ranges.as_mut_ptr() as u64,
                out_iova_alignment: 0,
            };
            // SAFETY: the fd is our open /dev/iommu; `query` is a valid iommu_ioas_iova_ranges
            // whose `allowed_iovas` points at `ranges`, which has room for exactly `num_iovas`
            // entries, the most the kernel writes; both outlive the call.
            let ret = unsafe {
                ioctl_with_mut_ref(&**self.vfio.iommufd(), IOMMU_IOAS_IOVA_RANGES(), &mut query)
            };
            if ret == 0 {
                ranges.truncate(query.num_iovas as usize);
                return Ok(ranges
                    .iter()
                    .map(|r| IovaRange {
                        start: r.start,
                        last: r.last,
                    })
                    .collect());
            }
            let err = io::Error::last_os_error();
            // EMSGSIZE: more ranges than room; the kernel put the total in num_iovas.
            if err.raw_os_error() == Some(libc::EMSGSIZE) && query.num_iovas as usize > ranges.len()
            {
                ranges.resize(query.num_iovas as usize, iommu_iova_range::default());
                continue;
            }
            return Err(error(err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::DmaKind;

    #[test]
    fn ioas_map_uses_the_fixed_iova_and_honours_writable() {
        let req = DmaMapRequest {
            iova: 0x10_0000,
            size: 0x20_0000,
            kind: DmaKind::Ram,
            backing: Backing::HostVa(0x7f00_0000_0000),
            writable: false,
        };

        let args = ioas_map_args(7, 0x7f00_0000_0000, &req);

        assert_eq!(args.ioas_id, 7);
        assert_eq!(
            (args.iova, args.length, args.user_va),
            (0x10_0000, 0x20_0000, 0x7f00_0000_0000)
        );
        assert_eq!(
            args.flags,
            iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
        );
        assert_ne!(
            map_flags(true) & iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
            0
        );
    }

    #[test]
    fn iommufd_errors_keep_their_errno() {
        let e = iommufd_io_error(IommufdError::IommuIoasMapFile(
            vmm_sys_util::errno::Error::new(libc::ENODEV),
        ));

        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
    }
}
