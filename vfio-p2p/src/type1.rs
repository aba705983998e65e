//! The legacy backend: one VFIO container (`/dev/vfio/vfio`) per VM with the type1v2 driver.
//!
//! Built on vfio-ioctls' `VfioContainer`, which adds each device's group to the container
//! (`VFIO_GROUP_SET_CONTAINER`) and sets the IOMMU driver exactly once, when the first group
//! joins. Mapping is by host virtual address only; peer BARs therefore go in through their mmap
//! (no lifetime tie to the device: the use-after-free class the dmabuf path fixes). The map
//! ioctl is raw because vfio-ioctls always maps read+write, and the IOVA-range query is raw
//! because vfio-ioctls does not wrap `VFIO_IOMMU_GET_INFO`.

use std::io;
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use log::warn;
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_info, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioError};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_ref};

use crate::caps::{cap_chain, read_u32, u64_pairs};
use crate::iommu::{BackendKind, Backing, DmaMapRequest, IommuBackend, IommuError, IovaRange};

vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);

/// A VM's VFIO container.
pub struct Type1 {
    container: Arc<VfioContainer>,
    /// Devices opened through this container. The kernel sets the IOMMU driver when the first
    /// group joins and drops it, with every mapping, when the last one leaves, so maps are only
    /// possible while this is non-zero.
    devices: AtomicUsize,
}

impl Type1 {
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 support.
    pub fn open() -> Result<Self, IommuError> {
        let container = VfioContainer::new(None).map_err(|e| match e {
            VfioError::OpenContainer(e) if e.kind() == io::ErrorKind::NotFound => {
                IommuError::NoVfioContainer
            }
            VfioError::OpenContainer(e) => IommuError::OpenContainer(e),
            e => IommuError::Type1Unavailable(io::Error::other(e)),
        })?;
        Ok(Self {
            container: Arc::new(container),
            devices: AtomicUsize::new(0),
        })
    }

    /// The vfio-ioctls object `VfioDevice` adds groups to; crate-private so callers never see
    /// vfio-ioctls types.
    pub(crate) fn container(&self) -> Arc<VfioContainer> {
        self.container.clone()
    }

    /// Records a device opened through this container, until the returned guard drops.
    pub(crate) fn attach(self: &Arc<Self>) -> Type1Attachment {
        self.devices.fetch_add(1, Ordering::SeqCst);
        Type1Attachment(self.clone())
    }

    fn ready(&self) -> Result<(), IommuError> {
        match self.devices.load(Ordering::SeqCst) {
            0 => Err(IommuError::NoDeviceYet),
            _ => Ok(()),
        }
    }
}

/// Held by each device opened through a [`Type1`] container.
pub(crate) struct Type1Attachment(Arc<Type1>);

impl Drop for Type1Attachment {
    fn drop(&mut self) {
        if self.0.devices.fetch_sub(1, Ordering::SeqCst) == 1 {
            warn!(
                "the last device left the type1 container: the kernel dropped every DMA mapping \
                 with it; map guest RAM again before using a new device"
            );
        }
    }
}

/// `VFIO_IOMMU_MAP_DMA` arguments for `req`, or why type1 cannot map it.
fn dma_map_args(req: &DmaMapRequest<'_>) -> Result<vfio_iommu_type1_dma_map, IommuError> {
    let vaddr = match req.backing {
        Backing::HostVa(va)
        | Backing::File {
            host_va: Some(va), ..
        } => va,
        Backing::File { host_va: None, .. } => {
            return Err(IommuError::NeedsHostVa {
                kind: req.kind,
                iova: req.iova,
            })
        }
    };
    let mut flags = VFIO_DMA_MAP_FLAG_READ;
    if req.writable {
        flags |= VFIO_DMA_MAP_FLAG_WRITE;
    }
    Ok(vfio_iommu_type1_dma_map {
        argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags,
        vaddr,
        iova: req.iova,
        size: req.size,
    })
}

/// The IOVA ranges in a `VFIO_IOMMU_GET_INFO` answer. Kernels before 5.4 have no range
/// capability; for them every IOVA is reported valid, which is what they enforce.
fn ranges_from_info(info: &[u8]) -> Result<Vec<IovaRange>, IommuError> {
    let fixed = size_of::<vfio_iommu_type1_info>();
    let flags = read_u32(info, 4).unwrap_or(0);
    let cap_offset = read_u32(info, 16).unwrap_or(0);
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(vec![IovaRange {
            start: 0,
            last: u64::MAX,
        }]);
    }
    let caps = cap_chain(info, cap_offset, fixed)?;
    let Some(cap) = caps
        .iter()
        .find(|c| u32::from(c.id) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE)
    else {
        return Ok(vec![IovaRange {
            start: 0,
            last: u64::MAX,
        }]);
    };
    Ok(u64_pairs(cap)?
        .into_iter()
        .map(|(start, last)| IovaRange { start, last })
        .collect())
}

impl IommuBackend for Type1 {
    fn kind(&self) -> BackendKind {
        BackendKind::Type1
    }

    unsafe fn map(&self, req: &DmaMapRequest<'_>) -> Result<(), IommuError> {
        req.validate()?;
        self.ready()?;
        let args = dma_map_args(req)?;
        // SAFETY: the fd is our open container; `args` is a valid vfio_iommu_type1_dma_map the
        // kernel only reads. That the host range stays valid while mapped is our caller's
        // contract (see `IommuBackend::map`).
        let ret = unsafe { ioctl_with_ref(&*self.container, VFIO_IOMMU_MAP_DMA(), &args) };
        if ret != 0 {
            return Err(IommuError::Map {
                backend: BackendKind::Type1,
                kind: req.kind,
                iova: req.iova,
                size: req.size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), IommuError> {
        self.container
            .vfio_dma_unmap(iova, size as usize)
            .map_err(|e| match e {
                VfioError::InvalidDmaUnmapSize => IommuError::PartialUnmap { iova, size },
                VfioError::IommuDmaUnmap(e) => IommuError::Unmap {
                    backend: BackendKind::Type1,
                    iova,
                    size,
                    source: io::Error::from_raw_os_error(e.errno()),
                },
                e => IommuError::Unmap {
                    backend: BackendKind::Type1,
                    iova,
                    size,
                    source: io::Error::other(e),
                },
            })
    }

    fn iova_ranges(&self) -> Result<Vec<IovaRange>, IommuError> {
        self.ready()?;
        let error = |source| IommuError::IovaRanges {
            backend: BackendKind::Type1,
            source,
        };
        // First ask with the bare struct; the kernel answers with the argsz it needs for the
        // capabilities, then we ask again with that much room.
        let mut argsz = size_of::<vfio_iommu_type1_info>();
        loop {
            let mut buf = vec![0u8; argsz];
            buf[..4].copy_from_slice(&(argsz as u32).to_ne_bytes());
            // SAFETY: the fd is our open container; `buf` is `argsz` bytes, at least a
            // vfio_iommu_type1_info, and its argsz field tells the kernel not to write more.
            // The kernel does not care about the buffer's alignment (copy_to_user).
            let ret = unsafe {
                ioctl_with_mut_ptr(
                    &*self.container,
                    VFIO_IOMMU_GET_INFO(),
                    buf.as_mut_ptr().cast::<vfio_iommu_type1_info>(),
                )
            };
            if ret != 0 {
                return Err(error(io::Error::last_os_error()));
            }
            let wanted = read_u32(&buf, 0).unwrap_or(0) as usize;
            if wanted > argsz {
                argsz = wanted;
                continue;
            }
            return ranges_from_info(&buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::caps::test_support::{chain, pairs};
    use crate::iommu::DmaKind;

    fn info_with_caps(caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let (mut buf, first) = chain(size_of::<vfio_iommu_type1_info>(), caps);
        let len = buf.len() as u32;
        buf[0..4].copy_from_slice(&len.to_ne_bytes());
        buf[4..8].copy_from_slice(&(VFIO_IOMMU_INFO_CAPS | 1).to_ne_bytes());
        buf[16..20].copy_from_slice(&first.to_ne_bytes());
        buf
    }

    #[test]
    fn iova_ranges_come_from_the_range_capability() {
        let info = info_with_caps(&[
            (2, vec![0; 16]), // migration capability, ignored
            (1, pairs(&[(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)])),
        ]);

        let ranges = ranges_from_info(&info).unwrap();

        assert_eq!(
            ranges,
            vec![
                IovaRange {
                    start: 0,
                    last: 0xfedf_ffff
                },
                IovaRange {
                    start: 0xfef0_0000,
                    last: (1 << 39) - 1
                },
            ]
        );
    }

    #[test]
    fn old_kernels_without_capabilities_allow_everything() {
        let info = vec![0u8; size_of::<vfio_iommu_type1_info>()];

        assert_eq!(
            ranges_from_info(&info).unwrap(),
            vec![IovaRange {
                start: 0,
                last: u64::MAX
            }]
        );
    }

    #[test]
    fn maps_a_file_by_its_host_address_and_refuses_one_without() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut req = DmaMapRequest {
            iova: 0x8000_0000,
            size: 0x1000,
            kind: DmaKind::Ram,
            backing: Backing::File {
                fd: file.as_fd(),
                offset: 0,
                host_va: Some(0x7f00_0000_0000),
            },
            writable: true,
        };

        let args = dma_map_args(&req).unwrap();
        assert_eq!(
            (args.vaddr, args.iova, args.size),
            (0x7f00_0000_0000, 0x8000_0000, 0x1000)
        );
        assert_eq!(args.flags, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);

        req.backing = Backing::File {
            fd: file.as_fd(),
            offset: 0,
            host_va: None,
        };
        assert!(matches!(
            dma_map_args(&req),
            Err(IommuError::NeedsHostVa {
                iova: 0x8000_0000,
                ..
            })
        ));
    }
}
