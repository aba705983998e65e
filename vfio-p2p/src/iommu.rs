//! The host IOMMU as seen by the VMM: one trait, [`IommuBackend`], with two implementations,
//! [`Iommufd`](crate::Iommufd) (an IOAS on `/dev/iommu`) and [`Type1`](crate::Type1) (a legacy
//! `/dev/vfio/vfio` container); each is one address space, a P2P domain.
//!
//! Everything that puts guest memory or a peer BAR into the IOMMU goes through the trait, so the
//! memory map (guest RAM) and the P2P table (BARs) need not know which interface the host has.
//! [`VfioBackend`] is the concrete handle of one domain: devices attach to it (so a group's
//! devices share one IOAS or one container) and it hands out the trait object.

use std::any::Any;
use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::caps::CapError;
use crate::iommufd::Iommufd;
use crate::type1::Type1;

/// Which host IOMMU interface a VM uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// `/dev/iommu` + VFIO device cdevs: maps by file, so peer BARs go in as dmabufs.
    Iommufd,
    /// The legacy VFIO container with the type1v2 IOMMU driver: maps by host virtual address.
    Type1,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Iommufd => "iommufd",
            BackendKind::Type1 => "legacy type1",
        })
    }
}

/// What a DMA mapping is for. The backends treat both alike; callers differ in how they handle
/// failure (RAM: fatal; peer BAR: a warning, P2P unavailable), and the fakes check invariants
/// per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaKind {
    Ram,
    DeviceBar,
}

impl fmt::Display for DmaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DmaKind::Ram => "guest RAM",
            DmaKind::DeviceBar => "device BAR",
        })
    }
}

/// Where the bytes of a mapping come from.
#[derive(Clone, Copy, Debug)]
pub enum Backing<'a> {
    /// `size` bytes of a file from `offset`: a memfd for guest RAM, a VFIO dmabuf for a peer
    /// BAR. iommufd maps the file itself (`IOMMU_IOAS_MAP_FILE`, falling back to `host_va` on
    /// kernels before 6.13). Type1 can only map by address, so it uses `host_va` (where this
    /// process has the same bytes mapped) and fails without it.
    File {
        fd: BorrowedFd<'a>,
        offset: u64,
        host_va: Option<u64>,
    },
    /// `size` bytes at this host virtual address (`IOMMU_IOAS_MAP` / `VFIO_IOMMU_MAP_DMA`). On
    /// iommufd this fails with `EFAULT` for BAR mmaps (GUP refuses `VM_PFNMAP`).
    HostVa(u64),
}

/// One request to make `[iova, iova + size)` reach `backing`.
#[derive(Clone, Copy, Debug)]
pub struct DmaMapRequest<'a> {
    pub iova: u64,
    pub size: u64,
    pub kind: DmaKind,
    pub backing: Backing<'a>,
    /// Whether devices may write (RAM and BARs: yes; a ROM would be read-only).
    pub writable: bool,
}

impl DmaMapRequest<'_> {
    /// Rejects empty and wrapping ranges before they reach an ioctl.
    pub fn validate(&self) -> Result<(), IommuError> {
        if self.size == 0 || self.iova.checked_add(self.size - 1).is_none() {
            return Err(IommuError::InvalidRange {
                iova: self.iova,
                size: self.size,
            });
        }
        Ok(())
    }
}

/// An inclusive IOVA range `[start, last]` the host IOMMU can translate, as both kernel
/// interfaces report it. Guest RAM and every guest MMIO window that peers DMA into must lie in
/// these, or mapping fails (`EINVAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IovaRange {
    pub start: u64,
    pub last: u64,
}

impl IovaRange {
    /// The range `[start, start + size)`, for callers that think in base and length. `size`
    /// must be non-zero.
    pub fn with_size(start: u64, size: u64) -> Self {
        Self {
            start,
            last: start.saturating_add(size.saturating_sub(1)),
        }
    }

    /// Whether `[iova, iova + size)` lies entirely inside this range.
    pub fn covers(&self, iova: u64, size: u64) -> bool {
        match (size, iova.checked_add(size.wrapping_sub(1))) {
            (0, _) => iova >= self.start && iova <= self.last,
            (_, Some(end)) => iova >= self.start && end <= self.last,
            (_, None) => false,
        }
    }
}

/// Whether `[iova, iova + size)` lies inside the union of `ranges` (adjacent ranges count as
/// one).
pub fn ranges_cover(ranges: &[IovaRange], iova: u64, size: u64) -> bool {
    let Some(end) = iova.checked_add(size.saturating_sub(1)) else {
        return false;
    };
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut next = iova;
    for r in sorted {
        if r.start <= next && next <= r.last {
            if end <= r.last {
                return true;
            }
            match r.last.checked_add(1) {
                Some(n) => next = n,
                None => return true,
            }
        }
    }
    false
}

/// One IO address space of the host IOMMU (a P2P domain), shared by the devices attached to it.
///
/// Implementations: [`Iommufd`](crate::Iommufd), [`Type1`](crate::Type1) and, for tests,
/// `fake::FakeIommu`. Callers map only whole ranges and unmap exactly what they mapped (both
/// kernels refuse to split a mapping). `Any` lets two domains find out whether they can share
/// mappings (`copy_mapping_from`, on `dyn IommuBackend`).
pub trait IommuBackend: Any + Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Makes `[req.iova, req.iova + req.size)` reach `req.backing` for every attached device.
    ///
    /// # Safety
    ///
    /// From a successful call until [`unmap`](Self::unmap) of the same range succeeds, devices
    /// may read and (if `writable`) write the backing memory at any time, without
    /// synchronisation. So:
    /// - for [`Backing::HostVa`], and for the `host_va` of a [`Backing::File`] (which type1
    ///   always maps instead of the file, and iommufd before Linux 6.13), the address range
    ///   must stay mapped to the same memory until the unmap, and no Rust reference to it may
    ///   exist meanwhile (only raw-pointer, volatile or syscall access);
    /// - for [`Backing::File`], the file range must exist and must not be truncated while
    ///   mapped, and the bytes it holds must be ones the VM may see and change (guest RAM, or a
    ///   BAR of a device assigned to this VM). The kernel holds its own reference to the file,
    ///   so the fd may be closed after the call.
    unsafe fn map(&self, req: &DmaMapRequest<'_>) -> Result<(), IommuError>;

    /// Removes a mapping made by [`map`](Self::map) with the same `iova` and `size`.
    fn unmap(&self, iova: u64, size: u64) -> Result<(), IommuError>;

    /// The IOVA ranges the host IOMMU translates right now. They narrow as devices attach, so
    /// query after opening the VM's devices and before laying out guest RAM and MMIO windows.
    fn iova_ranges(&self) -> Result<Vec<IovaRange>, IommuError>;
}

impl dyn IommuBackend {
    /// Gives this domain the mapping `[iova, iova + size)` that `src` has (made by one earlier
    /// map of exactly that range), sharing `src`'s pinned pages (`IOMMU_IOAS_COPY`) when both
    /// are IOASes on one `/dev/iommu`. `Ok(false)`: they cannot share (type1, different
    /// `/dev/iommu`s, fakes), so map it yourself.
    pub fn copy_mapping_from(
        &self,
        src: &dyn IommuBackend,
        iova: u64,
        size: u64,
    ) -> Result<bool, IommuError> {
        let (dst, src): (&dyn Any, &dyn Any) = (self, src);
        match (dst.downcast_ref::<Iommufd>(), src.downcast_ref::<Iommufd>()) {
            (Some(dst), Some(src)) if dst.shares_context(src) => {
                dst.copy_from(src, iova, size)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Errors of the IOMMU backends; each names the IOVA range involved.
#[derive(Debug, thiserror::Error)]
pub enum IommuError {
    #[error("allocating an IOAS on /dev/iommu: {0}")]
    IoasAlloc(#[source] io::Error),
    #[error("copying the mapping at IOVA [{iova:#x}, +{size:#x}) into another IOAS: {source}")]
    Copy {
        iova: u64,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "malformed capability list in VFIO_IOMMU_GET_INFO (the IOVA ranges of the type1 \
         container): {0}"
    )]
    InfoCaps(#[from] CapError),
    #[error("invalid DMA range: {size:#x} bytes at IOVA {iova:#x}")]
    InvalidRange { iova: u64, size: u64 },
    #[error("querying the valid IOVA ranges of the {backend} IOMMU: {source}")]
    IovaRanges {
        backend: BackendKind,
        #[source]
        source: io::Error,
    },
    #[error("mapping {kind} at IOVA [{iova:#x}, +{size:#x}) into the {backend} IOMMU: {source}")]
    Map {
        backend: BackendKind,
        kind: DmaKind,
        iova: u64,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "the legacy type1 IOMMU maps by host address, but the {kind} mapping at IOVA {iova:#x} \
         was given a file with no host address"
    )]
    NeedsHostVa { kind: DmaKind, iova: u64 },
    #[error(
        "the type1 container has no device yet (its IOMMU is set when the first device's group \
         joins): open a device before mapping or querying IOVA ranges"
    )]
    NoDeviceYet,
    #[error(
        "/dev/iommu is missing: this kernel has no iommufd (CONFIG_IOMMUFD); use backend=legacy"
    )]
    NoIommufd,
    #[error("/dev/vfio/vfio is missing: the vfio module is not loaded")]
    NoVfioContainer,
    #[error("opening /dev/iommu: {0}")]
    OpenIommufd(#[source] io::Error),
    #[error("opening the VFIO container /dev/vfio/vfio: {0}")]
    OpenContainer(#[source] io::Error),
    #[error(
        "unmapping IOVA [{iova:#x}, +{size:#x}) removed a different amount: it was not exactly \
         one earlier mapping"
    )]
    PartialUnmap { iova: u64, size: u64 },
    #[error("unmapping IOVA [{iova:#x}, +{size:#x}) from the {backend} IOMMU: {source}")]
    Unmap {
        backend: BackendKind,
        iova: u64,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("the VFIO container does not offer the type1v2 IOMMU: {0}")]
    Type1Unavailable(#[source] io::Error),
}

impl IommuError {
    /// The kernel's errno, when an ioctl failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            IommuError::Map { source, .. }
            | IommuError::Unmap { source, .. }
            | IommuError::Copy { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// One IOMMU address space (a P2P domain), concretely: devices are opened against it (so they
/// join its IOAS or container) and [`iommu`](Self::iommu) hands out the trait object for
/// mapping. [`DomainOpener`](crate::DomainOpener) opens several that share one `/dev/iommu`.
#[derive(Clone)]
pub enum VfioBackend {
    Iommufd(Arc<Iommufd>),
    Type1(Arc<Type1>),
}

impl VfioBackend {
    /// One domain on its own: opens `/dev/iommu` and allocates an IOAS, or opens a type1
    /// container. A VM with several domains uses [`DomainOpener`](crate::DomainOpener).
    pub fn open(kind: BackendKind) -> Result<Self, IommuError> {
        Ok(match kind {
            BackendKind::Iommufd => VfioBackend::Iommufd(Arc::new(Iommufd::open()?)),
            BackendKind::Type1 => VfioBackend::Type1(Arc::new(Type1::open()?)),
        })
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            VfioBackend::Iommufd(_) => BackendKind::Iommufd,
            VfioBackend::Type1(_) => BackendKind::Type1,
        }
    }

    /// Guest RAM for a second domain, pinned once: see
    /// `<dyn IommuBackend>::copy_mapping_from`. `Ok(false)`: map it yourself.
    pub fn copy_mapping_from(
        &self,
        src: &VfioBackend,
        iova: u64,
        size: u64,
    ) -> Result<bool, IommuError> {
        self.iommu().copy_mapping_from(&*src.iommu(), iova, size)
    }

    /// The mapping interface, for the memory map (guest RAM) and the P2P table (BARs).
    pub fn iommu(&self) -> Arc<dyn IommuBackend> {
        match self {
            VfioBackend::Iommufd(b) => b.clone(),
            VfioBackend::Type1(b) => b.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_covers_only_what_lies_inside_it() {
        let r = IovaRange {
            start: 0x1000,
            last: 0x1fff,
        };

        assert!(r.covers(0x1000, 0x1000));
        assert!(!r.covers(0x1000, 0x1001));
        assert!(!r.covers(0xfff, 2));
        assert!(!r.covers(u64::MAX, 2));
    }

    #[test]
    fn adjacent_ranges_cover_a_span_across_their_border() {
        let ranges = [
            IovaRange {
                start: 0x2000,
                last: 0x2fff,
            },
            IovaRange {
                start: 0,
                last: 0x1fff,
            },
        ];

        assert!(ranges_cover(&ranges, 0x1000, 0x2000));
        assert!(!ranges_cover(&ranges, 0x1000, 0x2001));
    }

    #[test]
    fn a_hole_between_ranges_is_not_covered() {
        // The x86 MSI window is reserved: a typical VT-d answer.
        let ranges = [
            IovaRange {
                start: 0,
                last: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                last: (1 << 39) - 1,
            },
        ];

        assert!(ranges_cover(&ranges, 0, 0x8000_0000));
        assert!(!ranges_cover(&ranges, 0xfe00_0000, 0x0200_0000));
        assert!(!ranges_cover(&ranges, 1 << 39, 0x1000));
    }

    #[test]
    fn with_size_makes_an_inclusive_range() {
        assert_eq!(
            IovaRange::with_size(0x1000, 0x1000),
            IovaRange {
                start: 0x1000,
                last: 0x1fff
            }
        );
    }

    #[test]
    fn domains_that_cannot_share_pages_say_so_instead_of_copying() {
        use crate::fake::FakeIommu;
        let iommufd = FakeIommu::new(BackendKind::Iommufd);
        let type1 = FakeIommu::new(BackendKind::Type1);
        let (a, b): (&dyn IommuBackend, &dyn IommuBackend) = (&iommufd, &type1);

        assert!(!a.copy_mapping_from(b, 0, 1 << 30).unwrap());
        assert!(!b.copy_mapping_from(a, 0, 1 << 30).unwrap());
        assert!(!a.copy_mapping_from(a, 0, 1 << 30).unwrap());
        assert!(
            iommufd.events().is_empty(),
            "nothing mapped behind the caller's back"
        );
    }

    #[test]
    fn empty_and_wrapping_requests_are_rejected() {
        let req = |iova, size| DmaMapRequest {
            iova,
            size,
            kind: DmaKind::Ram,
            backing: Backing::HostVa(0),
            writable: true,
        };

        assert!(req(0, 0).validate().is_err());
        assert!(req(u64::MAX, 2).validate().is_err());
        assert!(req(u64::MAX, 1).validate().is_ok());
    }
}
