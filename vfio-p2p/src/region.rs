//! VFIO regions of a host PCI device (BARs 0-5, ROM, config space, VGA and device-specific
//! ones) and owned mmaps of them.
//!
//! Region info is queried with raw `VFIO_DEVICE_GET_REGION_INFO` rather than taken from
//! vfio-ioctls, whose cached list skips regions that fail (the VGA region of every non-VGA
//! device) and so shifts the indices of any region after it; we keep one slot per index.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_BASE, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;

use crate::caps::{cap_chain, read_u32, read_u64, u64_pairs, CapError};

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);

/// Region index of BAR `n` is `n`; these are the others VFIO defines for PCI.
pub const ROM_REGION: u32 = 6;
pub const CONFIG_REGION: u32 = 7;
pub const VGA_REGION: u32 = 8;

/// Access a region allows through the device fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionFlags {
    pub read: bool,
    pub write: bool,
    /// Some or all of it can be mmapped (see [`RegionInfo::mmap_areas`]).
    pub mmap: bool,
}

/// A part of a region that can be mmapped, relative to the region's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MmapArea {
    pub offset: u64,
    pub size: u64,
}

/// What VFIO says about one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub index: u32,
    /// Region size in bytes (a BAR's size; 0 for an unimplemented BAR).
    pub size: u64,
    /// Where the region starts in the device fd, for pread/pwrite/mmap.
    pub fd_offset: u64,
    pub flags: RegionFlags,
    /// The sparse-mmap capability: only these areas may be mmapped (typically a BAR minus the
    /// pages holding the MSI-X table). `None` means the whole region, if `flags.mmap`.
    pub sparse_mmap: Option<Vec<MmapArea>>,
    /// The MSI-X table in this BAR may be mmapped too (the kernel protects it otherwise).
    pub msix_mappable: bool,
}

impl RegionInfo {
    /// The areas that can be mmapped: none without the mmap flag, the sparse list if there is
    /// one, else the whole region.
    pub fn mmap_areas(&self) -> Vec<MmapArea> {
        match (&self.sparse_mmap, self.flags.mmap, self.size) {
            (_, false, _) | (_, _, 0) => Vec::new(),
            (Some(areas), true, _) => areas.iter().copied().filter(|a| a.size > 0).collect(),
            (None, true, size) => vec![MmapArea { offset: 0, size }],
        }
    }

    /// Whether `[offset, offset + len)` lies inside the region.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Decodes a `vfio_region_info` answer, capabilities included, from its bytes.
    pub(crate) fn from_bytes(index: u32, buf: &[u8]) -> Result<Self, CapError> {
        let flags = read_u32(buf, 4).unwrap_or(0);
        let cap_offset = read_u32(buf, 12).unwrap_or(0);
        let mut info = RegionInfo {
            index,
            size: read_u64(buf, 16).unwrap_or(0),
            fd_offset: read_u64(buf, 24).unwrap_or(0),
            flags: RegionFlags {
                read: flags & VFIO_REGION_INFO_FLAG_READ != 0,
                write: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
                mmap: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            },
            sparse_mmap: None,
            msix_mappable: false,
        };
        if flags & VFIO_REGION_INFO_FLAG_CAPS == 0 {
            return Ok(info);
        }
        for cap in cap_chain(buf, cap_offset, size_of::<vfio_region_info>())? {
            match u32::from(cap.id) {
                VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                    let areas = u64_pairs(&cap)?
                        .into_iter()
                        .map(|(offset, size)| MmapArea { offset, size })
                        .collect();
                    info.sparse_mmap = Some(areas);
                }
                VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => info.msix_mappable = true,
                _ => {}
            }
        }
        Ok(info)
    }
}

/// Asks the device for region `index`. `Ok(None)` for a region the device does not have
/// (`EINVAL`, e.g. VGA on a non-VGA device).
pub(crate) fn query_region(device: BorrowedFd<'_>, index: u32) -> io::Result<Option<RegionInfo>> {
    let mut argsz = size_of::<vfio_region_info>();
    loop {
        let mut buf = vec![0u8; argsz];
        buf[0..4].copy_from_slice(&(argsz as u32).to_ne_bytes());
        buf[8..12].copy_from_slice(&index.to_ne_bytes());
        // SAFETY: `device` is an open VFIO device fd; `buf` holds `argsz` bytes, at least a
        // vfio_region_info, and its argsz field stops the kernel from writing past them. The
        // kernel copies with copy_to_user, so the byte buffer's alignment does not matter.
        let ret = unsafe {
            ioctl_with_mut_ptr(
                &device,
                VFIO_DEVICE_GET_REGION_INFO(),
                buf.as_mut_ptr().cast::<vfio_region_info>(),
            )
        };
        if ret != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EINVAL) => Ok(None),
                _ => Err(err),
            };
        }
        // With capabilities, the kernel asks for a bigger buffer through argsz.
        let wanted = read_u32(&buf, 0).unwrap_or(0) as usize;
        if wanted > argsz {
            argsz = wanted;
            continue;
        }
        return RegionInfo::from_bytes(index, &buf)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    }
}

/// An mmap of (part of) a device region, unmapped on drop.
///
/// The memory is device MMIO (or RAM the device exposes): access it only through raw pointers
/// with volatile operations, or hand it to KVM as a memory slot or to type1 as a DMA source.
/// The mapping also keeps the device file open in the kernel, so drop it before expecting the
/// device to be released.
#[derive(Debug)]
pub struct RegionMapping {
    addr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain process memory, valid from any thread until drop; we never
// create references into it, so there is nothing thread-affine to protect.
unsafe impl Send for RegionMapping {}
// SAFETY: as above; shared access only hands out the address.
unsafe impl Sync for RegionMapping {}

/// Huge page sizes the MMU can map a BAR with (x86-64: 1 GiB and 2 MiB), largest first.
const HUGE_PAGES: [usize; 2] = [1 << 30, 2 << 20];

/// The alignment that lets `size` bytes be mapped with the largest huge page that fits.
fn huge_alignment(size: usize) -> Option<usize> {
    HUGE_PAGES.into_iter().find(|&huge| size >= huge)
}

impl RegionMapping {
    /// `mmap(fd, offset, size)` shared, at an address congruent to `offset` modulo the largest
    /// huge page that fits in `size`. vfio-pci then maps the BAR with huge PFN mappings: KVM
    /// gets large pages for guest access, and type1 pins the range a huge page at a time
    /// instead of 4 KiB at a time (a 16 GiB BAR: 16 s with a kernel-chosen address in the lab).
    pub(crate) fn new(fd: BorrowedFd<'_>, offset: u64, size: u64, prot: i32) -> io::Result<Self> {
        let size = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let hint = match huge_alignment(size) {
            Some(align) => Some(Reservation::new(size, align, offset as usize % align)?),
            None => None,
        };
        let (at, flags) = match &hint {
            Some(r) => (r.start.cast(), libc::MAP_SHARED | libc::MAP_FIXED),
            None => (std::ptr::null_mut(), libc::MAP_SHARED),
        };
        // SAFETY: either a NULL hint without MAP_FIXED (the kernel picks an unused address), or
        // MAP_FIXED over `[start, start + size)`, which lies inside our own PROT_NONE reservation
        // that nothing else uses; the result is checked before use.
        let addr = unsafe { libc::mmap(at, size, prot, flags, fd.as_raw_fd(), file_offset) };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if let Some(r) = hint {
            r.release_around(size);
        }
        let addr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { addr, size })
    }

    /// An anonymous mapping, standing in for a BAR mmap in tests of the type1 P2P path.
    #[cfg(any(test, feature = "fake"))]
    pub fn anonymous(size: u64) -> io::Result<Self> {
        let size = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: NULL hint, no MAP_FIXED: a fresh mapping that replaces nothing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { addr, size })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// The start address, as the IOMMU and KVM take it.
    pub fn host_va(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    pub fn size(&self) -> u64 {
        self.size as u64
    }
}

/// Address space reserved (PROT_NONE, nothing backing it) to carve an aligned mapping from.
struct Reservation {
    base: *mut u8,
    len: usize,
    /// Where the mapping goes: `base` rounded up so that `start % align == phase`.
    start: *mut u8,
}

impl Reservation {
    fn new(size: usize, align: usize, phase: usize) -> io::Result<Self> {
        let len = size
            .checked_add(align)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: NULL hint, no MAP_FIXED: fresh inaccessible address space that replaces nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        let skip = (phase + align - (base as usize) % align) % align;
        Ok(Self {
            base,
            len,
            // `skip < align`, so `start + size` stays inside the reservation.
            start: base.wrapping_add(skip),
        })
    }

    /// The mapping now covers `[start, start + size)`: gives back the rest.
    fn release_around(self, size: usize) {
        let this = std::mem::ManuallyDrop::new(self);
        let head = this.start as usize - this.base as usize;
        let tail = this.len - head - size;
        // SAFETY: both ranges are parts of our reservation outside the mapping just made there.
        unsafe {
            if head > 0 {
                libc::munmap(this.base.cast(), head);
            }
            if tail > 0 {
                libc::munmap(this.start.wrapping_add(size).cast(), tail);
            }
        }
    }
}

impl Drop for Reservation {
    /// The mapping failed: give back the whole reservation.
    fn drop(&mut self) {
        // SAFETY: exactly the reservation mmap returned; nothing else maps into it.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`size` are exactly what mmap returned and nothing else unmaps them;
        // no references into the mapping exist (we never hand any out).
        let ret = unsafe { libc::munmap(self.addr.as_ptr().cast(), self.size) };
        if ret != 0 {
            log::error!(
                "munmap of a device region mapping at {:#x}: {}",
                self.host_va(),
                io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::test_support::{chain, pairs};
    use std::io::Write;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn info_bytes(flags: u32, size: u64, fd_offset: u64, caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let (mut buf, first) = chain(size_of::<vfio_region_info>(), caps);
        let argsz = buf.len() as u32;
        buf[0..4].copy_from_slice(&argsz.to_ne_bytes());
        buf[4..8].copy_from_slice(&flags.to_ne_bytes());
        buf[12..16].copy_from_slice(&first.to_ne_bytes());
        buf[16..24].copy_from_slice(&size.to_ne_bytes());
        buf[24..32].copy_from_slice(&fd_offset.to_ne_bytes());
        buf
    }

    const RWM: u32 =
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP;

    #[test]
    fn a_plain_mmappable_bar_is_one_area() {
        let info = RegionInfo::from_bytes(2, &info_bytes(RWM, 0x400_0000, 0x2_0000_0000_0000, &[]))
            .unwrap();

        assert_eq!(info.fd_offset, 0x2_0000_0000_0000);
        assert_eq!(
            info.mmap_areas(),
            vec![MmapArea {
                offset: 0,
                size: 0x400_0000
            }]
        );
    }

    #[test]
    fn sparse_areas_skip_the_msix_table() {
        let caps = [(
            VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16,
            pairs(&[(0, 0x2000), (0x3000, 0xd000)]),
        )];
        let bytes = info_bytes(RWM | VFIO_REGION_INFO_FLAG_CAPS, 0x1_0000, 0, &caps);

        let info = RegionInfo::from_bytes(0, &bytes).unwrap();

        assert_eq!(
            info.mmap_areas(),
            vec![
                MmapArea {
                    offset: 0,
                    size: 0x2000
                },
                MmapArea {
                    offset: 0x3000,
                    size: 0xd000
                }
            ]
        );
        assert!(!info.msix_mappable);
    }

    #[test]
    fn msix_mappable_is_reported() {
        let caps = [(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16, vec![])];
        let bytes = info_bytes(RWM | VFIO_REGION_INFO_FLAG_CAPS, 0x4000, 0, &caps);

        assert!(RegionInfo::from_bytes(0, &bytes).unwrap().msix_mappable);
    }

    #[test]
    fn config_space_has_no_mmap_areas() {
        let flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let info =
            RegionInfo::from_bytes(CONFIG_REGION, &info_bytes(flags, 0x1000, 0x7 << 40, &[]))
                .unwrap();

        assert!(info.mmap_areas().is_empty());
        assert!(info.contains(0xffc, 4));
        assert!(!info.contains(0xffe, 4));
    }

    #[test]
    fn an_anonymous_mapping_is_usable_and_unmapped_on_drop() {
        let m = RegionMapping::anonymous(0x2000).unwrap();

        assert_eq!(m.size(), 0x2000);
        assert_ne!(m.host_va(), 0);
    }

    /// A memfd of `len` bytes whose byte `i` is `i / 4096` (the page number, truncated).
    fn paged_memfd(len: usize) -> OwnedFd {
        // SAFETY: a plain memfd_create with a valid C string; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"region-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let data: Vec<u8> = (0..len).map(|i| (i / 4096) as u8).collect();
        std::fs::File::from(fd.try_clone().unwrap())
            .write_all(&data)
            .unwrap();
        fd
    }

    #[test]
    fn mappings_are_aligned_for_huge_pages_in_step_with_the_file_offset() {
        let fd = paged_memfd(8 << 20);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        for (offset, size, align) in [
            (0, 4 << 20, 2 << 20),
            (4096, 2 << 20, 2 << 20),
            (3 << 20, 4 << 20, 2 << 20),
        ] {
            let m = RegionMapping::new(fd.as_fd(), offset, size, rw).unwrap();
            assert_eq!(m.host_va() % align, offset % align, "offset {offset:#x}");
            // SAFETY: inside the mapping just made; a plain byte read of memfd memory.
            let first = unsafe { m.as_ptr().read_volatile() };
            assert_eq!(
                first,
                (offset / 4096) as u8,
                "the mapping shows the file at offset"
            );
        }
        let small = RegionMapping::new(fd.as_fd(), 0, 64 << 10, rw).unwrap();
        assert_eq!(
            small.size(),
            64 << 10,
            "below 2 MiB the kernel picks the address"
        );
    }

    #[test]
    fn huge_alignment_is_the_largest_huge_page_that_fits() {
        assert_eq!(huge_alignment(4096), None);
        assert_eq!(huge_alignment((2 << 20) - 4096), None);
        assert_eq!(huge_alignment(2 << 20), Some(2 << 20));
        assert_eq!(huge_alignment((1 << 30) - 4096), Some(2 << 20));
        assert_eq!(huge_alignment(16 << 30), Some(1 << 30));
    }
}
