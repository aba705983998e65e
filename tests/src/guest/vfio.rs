//! The few pieces of the VFIO uAPI (`linux/vfio.h`) that the guest test programs need: a legacy
//! container in no-IOMMU mode, one group, one device, its regions (BAR mmap, config space) and
//! INTx, MSI or MSI-X vectors via eventfds.
//! Numbers and layouts were checked against the kernel uAPI header (`_IO(';', 100 + n)`).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use super::{Fail, Result};

const fn vfio_io(nr: u32) -> libc::c_ulong {
    // _IO(VFIO_TYPE = ';', VFIO_BASE = 100 + nr): no size or direction bits.
    (((b';' as u32) << 8) | (100 + nr)) as libc::c_ulong
}
const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const VFIO_DEVICE_GET_IRQ_INFO: libc::c_ulong = vfio_io(9);
const VFIO_DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);

const VFIO_API_VERSION: libc::c_int = 0;
const VFIO_NOIOMMU_IOMMU: libc::c_ulong = 8;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const VFIO_IRQ_SET_ACTION_MASK: u32 = 1 << 3;
const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// Region index of the PCI configuration space.
pub const CONFIG_REGION: u32 = 7;
/// IRQ index of INTx.
pub const INTX_IRQ_INDEX: u32 = 0;
/// IRQ index of MSI.
pub const MSI_IRQ_INDEX: u32 = 1;
/// IRQ index of MSI-X.
pub const MSIX_IRQ_INDEX: u32 = 2;

/// `vfio_irq_info.flags`: eventfd signalling supported.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `vfio_irq_info.flags`: ACTION_MASK / ACTION_UNMASK supported.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `vfio_irq_info.flags`: the kernel masks the interrupt when it fires (INTx).
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// `vfio_irq_info.flags`: the vector count cannot change while enabled.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct RegionInfo {
    argsz: u32,
    pub flags: u32,
    pub index: u32,
    cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_irq_info`: what the device supports for one interrupt index.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct IrqInfo {
    argsz: u32,
    /// `IRQ_INFO_*` bits.
    pub flags: u32,
    pub index: u32,
    /// Vectors (0 when the device lacks that interrupt type).
    pub count: u32,
}

/// A `struct vfio_irq_set` with its flexible `data[]` as 32-bit words (eventfds, or nothing),
/// built as `u32`s so the buffer is aligned for the struct and its layout is plain to see.
fn irq_set_words(flags: u32, index: u32, start: u32, count: u32, fds: &[RawFd]) -> Vec<u32> {
    let argsz = 20 + 4 * fds.len();
    let mut words = vec![argsz as u32, flags, index, start, count];
    words.extend(fds.iter().map(|&fd| fd as u32));
    words
}

/// The name of an errno value for result lines (`ENOTTY`), or its number.
pub fn errno_name(e: &std::io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENOTTY) => "ENOTTY",
        Some(libc::ENOTSUP) => "ENOTSUP",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EBUSY) => "EBUSY",
        Some(libc::ENODEV) => "ENODEV",
        Some(n) => return format!("errno{n}"),
        None => return e.to_string(),
    };
    name.to_string()
}

/// Turn a libc return value into a `Fail` naming the step, with errno read right away.
fn check(ret: libc::c_int, step: &str) -> Result<libc::c_int> {
    if ret < 0 {
        Err(Fail::last_os(step))
    } else {
        Ok(ret)
    }
}

fn open_rw(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Fail::io(format!("open {path}"), e))
}

/// A device opened through a no-IOMMU group attached to a legacy VFIO container.
pub struct Device {
    // Field order is drop order: device, then group, then container.
    device: File,
    _group: File,
    _container: File,
}

impl Device {
    /// Open `/dev/vfio/vfio`, attach `group_path` (a `noiommu-N` node) with the no-IOMMU
    /// backend and get the fd of device `bdf`.
    pub fn open_noiommu(group_path: &str, bdf: &str) -> Result<Self> {
        let container = open_rw("/dev/vfio/vfio")?;
        let cfd = container.as_raw_fd();
        // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns a value.
        let ret = unsafe { libc::ioctl(cfd, VFIO_GET_API_VERSION) };
        let api = check(ret, "VFIO_GET_API_VERSION")?;
        if api != VFIO_API_VERSION {
            return Err(Fail::msg(
                "VFIO_GET_API_VERSION",
                format!("unexpected API version {api}"),
            ));
        }
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension id by value and returns 0 or 1.
        let ext = unsafe { libc::ioctl(cfd, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU) };
        if check(ext, "VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)")? != 1 {
            return Err(Fail::msg(
                "VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)",
                "container lacks the no-IOMMU backend (enable_unsafe_noiommu_mode not set?)",
            ));
        }

        let group = open_rw(group_path)?;
        let gfd = group.as_raw_fd();
        let mut status = GroupStatus {
            argsz: size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: the argument points to a live vfio_group_status with argsz set; the kernel
        // writes at most argsz bytes into it.
        let ret = unsafe { libc::ioctl(gfd, VFIO_GROUP_GET_STATUS, &mut status) };
        check(ret, "VFIO_GROUP_GET_STATUS")?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Fail::msg(
                "VFIO_GROUP_GET_STATUS",
                format!(
                    "{group_path} is not viable (a device of the group is bound to another driver)"
                ),
            ));
        }
        // SAFETY: the argument points to an int holding the container fd; the kernel only reads it.
        let ret = unsafe { libc::ioctl(gfd, VFIO_GROUP_SET_CONTAINER, &cfd) };
        check(ret, "VFIO_GROUP_SET_CONTAINER")?;
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        let ret = unsafe { libc::ioctl(cfd, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU) };
        check(ret, "VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)")?;

        let name = CString::new(bdf)
            .map_err(|_| Fail::msg("VFIO_GROUP_GET_DEVICE_FD", "BDF contains NUL"))?;
        // SAFETY: the argument is a NUL-terminated string that outlives the call; the kernel
        // only reads it and returns a new fd.
        let ret = unsafe { libc::ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) };
        let dfd = check(ret, &format!("VFIO_GROUP_GET_DEVICE_FD({bdf})"))?;
        // SAFETY: dfd is a fresh fd returned by the kernel that nothing else owns.
        let device = File::from(unsafe { OwnedFd::from_raw_fd(dfd) });
        Ok(Self {
            device,
            _group: group,
            _container: container,
        })
    }

    fn fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut info = RegionInfo {
            argsz: size_of::<RegionInfo>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: the argument points to a live vfio_region_info with argsz and index set; the
        // kernel writes at most argsz bytes into it.
        let ret = unsafe { libc::ioctl(self.fd(), VFIO_DEVICE_GET_REGION_INFO, &mut info) };
        check(ret, &format!("VFIO_DEVICE_GET_REGION_INFO({index})"))?;
        Ok(info)
    }

    /// mmap a whole region (a BAR) read/write.
    pub fn map_region(&self, index: u32) -> Result<Mapping> {
        let info = self.region_info(index)?;
        let step = format!("mmap region {index}");
        if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || info.size == 0 {
            return Err(Fail::msg(
                step,
                format!(
                    "not mmappable (flags 0x{:x}, size 0x{:x})",
                    info.flags, info.size
                ),
            ));
        }
        Mapping::new(self.fd(), info.offset, info.size, &step)
    }

    /// Reads `buf.len()` bytes of config space at `off` (as vfio-pci shows it).
    pub fn config_read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let base = self.region_info(CONFIG_REGION)?.offset;
        self.device
            .read_exact_at(buf, base + off)
            .map_err(|e| Fail::io(format!("read config space at 0x{off:x}"), e))
    }

    pub fn config_read16(&self, off: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(off, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn config_read32(&self, off: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.config_read(off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn config_write16(&self, off: u64, val: u16) -> Result<()> {
        let base = self.region_info(CONFIG_REGION)?.offset;
        self.device
            .write_all_at(&val.to_le_bytes(), base + off)
            .map_err(|e| Fail::io(format!("write config space at 0x{off:x}"), e))
    }

    /// What the device supports for IRQ index `index`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let mut info = IrqInfo {
            argsz: size_of::<IrqInfo>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: the argument points to a live vfio_irq_info with argsz and index set; the
        // kernel writes at most argsz bytes into it.
        let ret = unsafe { libc::ioctl(self.fd(), VFIO_DEVICE_GET_IRQ_INFO, &mut info) };
        check(ret, &format!("VFIO_DEVICE_GET_IRQ_INFO({index})"))?;
        Ok(info)
    }

    /// Number of vectors of IRQ index `index` (0 when the device lacks that interrupt type).
    pub fn irq_count(&self, index: u32) -> Result<u32> {
        Ok(self.irq_info(index)?.count)
    }

    /// Route vector 0 of IRQ index `index` to `eventfd` (this enables MSI or INTx on the
    /// device).
    pub fn set_irq_eventfd(&self, index: u32, eventfd: RawFd) -> Result<()> {
        self.set_irq_eventfds(index, 0, &[eventfd])
    }

    /// Route vectors `start..start + eventfds.len()` of IRQ index `index` to `eventfds`; -1
    /// detaches a vector. The first call enables MSI / MSI-X with that many vectors.
    pub fn set_irq_eventfds(&self, index: u32, start: u32, eventfds: &[RawFd]) -> Result<()> {
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let words = irq_set_words(flags, index, start, eventfds.len() as u32, eventfds);
        self.set_irqs(
            &words,
            &format!(
                "VFIO_DEVICE_SET_IRQS(index {index}, vectors {start}..{}, eventfds)",
                start as usize + eventfds.len()
            ),
        )
    }

    /// Tear down all vectors of IRQ index `index` (disables MSI, MSI-X or INTx).
    pub fn disable_irq(&self, index: u32) -> Result<()> {
        self.set_irqs_no_data(VFIO_IRQ_SET_ACTION_TRIGGER, index, 0, 0, "disable")
    }

    /// Unmask INTx: VFIO masks the line on every interrupt; call after acknowledging the device.
    pub fn unmask_intx(&self) -> Result<()> {
        self.set_irqs_no_data(VFIO_IRQ_SET_ACTION_UNMASK, INTX_IRQ_INDEX, 0, 1, "unmask")
    }

    /// ACTION_MASK on vectors `start..start + count` of `index`. The raw OS error is returned so
    /// a caller can tell "not supported" (vfio-pci has no MSI/MSI-X masking) from a failure.
    pub fn mask_irqs(&self, index: u32, start: u32, count: u32) -> std::io::Result<()> {
        self.set_irqs_raw(&irq_set_words(
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
            index,
            start,
            count,
            &[],
        ))
    }

    /// ACTION_UNMASK on vectors `start..start + count` of `index` (see [`Self::mask_irqs`]).
    pub fn unmask_irqs(&self, index: u32, start: u32, count: u32) -> std::io::Result<()> {
        self.set_irqs_raw(&irq_set_words(
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
            index,
            start,
            count,
            &[],
        ))
    }

    /// VFIO_DEVICE_SET_IRQS with `action` on vectors start..start + count and no data.
    fn set_irqs_no_data(
        &self,
        action: u32,
        index: u32,
        start: u32,
        count: u32,
        what: &str,
    ) -> Result<()> {
        let words = irq_set_words(VFIO_IRQ_SET_DATA_NONE | action, index, start, count, &[]);
        self.set_irqs(
            &words,
            &format!("VFIO_DEVICE_SET_IRQS(index {index}, {what})"),
        )
    }

    fn set_irqs(&self, words: &[u32], step: &str) -> Result<()> {
        self.set_irqs_raw(words).map_err(|e| Fail::io(step, e))
    }

    fn set_irqs_raw(&self, words: &[u32]) -> std::io::Result<()> {
        // SAFETY: `words` is a complete vfio_irq_set (header plus the eventfds its argsz and
        // flags announce), 4-byte aligned like the struct; the kernel only reads it.
        let ret = unsafe { libc::ioctl(self.fd(), VFIO_DEVICE_SET_IRQS, words.as_ptr()) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A shared mapping of a device region, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `size` bytes of `fd` at `offset`, shared and read/write; `step` names the failure.
    pub fn new(fd: RawFd, offset: u64, size: u64, step: &str) -> Result<Self> {
        let len = usize::try_from(size).map_err(|_| Fail::msg(step, "size does not fit usize"))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| Fail::msg(step, "offset does not fit off_t"))?;
        // SAFETY: a fresh shared mapping at an address the kernel chooses; it aliases no Rust
        // object, and Mapping unmaps it exactly once.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Fail::last_os(step));
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| Fail::msg(step, "mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Volatile 32-bit read at byte offset `off`; `None` if out of bounds or misaligned.
    pub fn read32(&self, off: usize) -> Option<u32> {
        let p = self.reg_ptr::<u32>(off)?;
        // SAFETY: reg_ptr checked bounds and alignment; the mapping lives as long as self and
        // MMIO must be accessed with volatile operations.
        Some(unsafe { p.read_volatile() })
    }

    pub fn write32(&self, off: usize, val: u32) -> Option<()> {
        let p = self.reg_ptr::<u32>(off)?;
        // SAFETY: as in read32.
        unsafe { p.write_volatile(val) };
        Some(())
    }

    pub fn read64(&self, off: usize) -> Option<u64> {
        let p = self.reg_ptr::<u64>(off)?;
        // SAFETY: as in read32; an aligned u64 volatile access is a single 8-byte MMIO access.
        Some(unsafe { p.read_volatile() })
    }

    pub fn write64(&self, off: usize, val: u64) -> Option<()> {
        let p = self.reg_ptr::<u64>(off)?;
        // SAFETY: as in read64.
        unsafe { p.write_volatile(val) };
        Some(())
    }

    fn reg_ptr<T>(&self, off: usize) -> Option<*mut T> {
        let end = off.checked_add(size_of::<T>())?;
        if end > self.len || !off.is_multiple_of(align_of::<T>()) {
            return None;
        }
        // SAFETY: off + size_of::<T>() <= len, so the result stays inside the mapping.
        Some(unsafe { self.ptr.as_ptr().add(off) }.cast::<T>())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping created by mmap in map_region and unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_set_eventfds_follow_the_header_and_argsz_counts_them() {
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let words = irq_set_words(flags, MSIX_IRQ_INDEX, 2, 3, &[7, -1, 9]);
        assert_eq!(words, vec![32, flags, 2, 2, 3, 7, u32::MAX, 9]);
    }

    #[test]
    fn data_none_is_a_bare_header() {
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK;
        assert_eq!(
            irq_set_words(flags, MSIX_IRQ_INDEX, 1, 1, &[]),
            vec![20, flags, 2, 1, 1]
        );
    }
}
