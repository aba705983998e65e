//! Guest RAM, carved into the regions of the layout: one memfd mapped shared, or anonymous memory
//! with transparent huge pages, whichever the VM's IOMMU backend maps best.
//!
//! A memfd lets iommufd map guest RAM by file (`IOMMU_IOAS_MAP_FILE`) without pinning it through
//! a user address. Legacy type1 can only pin through the process page tables; there, anonymous
//! memory in huge pages lets it map 2 MiB at a time (a memfd gets huge pages only where the
//! host's shmem THP setting allows it, off by default), and guest accesses get large pages too.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::MemoryLayout;

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamBacking {
    /// One memfd, mapped shared: iommufd maps it by file.
    Memfd,
    /// Anonymous memory, advised for transparent huge pages: for type1, which pins by address.
    AnonymousHuge,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create for guest RAM: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the guest RAM memfd to {size:#x} bytes: {source}")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest RAM: {0}")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    #[error("registering guest RAM slot {slot} at {gpa:#x} with KVM: {source}")]
    KvmSlot {
        slot: u32,
        gpa: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM and the memfd behind it, if any.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// With [`RamBacking::Memfd`], the file every region maps; region offsets in it follow the
    /// layout order. The IOMMU maps guest RAM from it by file.
    pub file: Option<File>,
}

impl GuestRam {
    pub fn new(layout: &MemoryLayout, backing: RamBacking) -> Result<Self, MemoryError> {
        let ram = match backing {
            RamBacking::Memfd => Self::memfd(layout)?,
            RamBacking::AnonymousHuge => {
                let ranges: Vec<_> = layout
                    .ram
                    .iter()
                    .map(|&(gpa, len)| (gpa, len as usize, None))
                    .collect();
                let memory =
                    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Mmap)?;
                Self { memory, file: None }
            }
        };
        ram.advise_huge_pages();
        Ok(ram)
    }

    /// Asks for transparent huge pages on every region. Only advice: the host's THP settings
    /// decide (for a memfd, the shmem setting), and RAM works either way.
    fn advise_huge_pages(&self) {
        for region in self.memory.iter() {
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            // SAFETY: madvise(MADV_HUGEPAGE) only changes how the kernel backs this range of our
            // own live mapping; its contents and validity are unchanged.
            let ret =
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
            if ret != 0 {
                log::debug!(
                    "guest RAM at {:#x}: no transparent huge pages: {}",
                    region.start_addr().0,
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// Creates the memfd and maps each layout region at consecutive offsets in it.
    fn memfd(layout: &MemoryLayout) -> Result<Self, MemoryError> {
        let file = memfd("p2pvmm-guest-ram")?;
        let size = layout.ram_size();
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        let mut offset = 0;
        let mut ranges = Vec::with_capacity(layout.ram.len());
        for &(gpa, len) in &layout.ram {
            let clone = file.try_clone().map_err(MemoryError::Memfd)?;
            ranges.push((gpa, len as usize, Some(FileOffset::new(clone, offset))));
            offset += len;
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Mmap)?;
        Ok(Self {
            memory,
            file: Some(file),
        })
    }

    /// Tells KVM about every RAM region, one slot each starting at slot 0. Returns the next free
    /// slot.
    pub fn register(&self, vm: &VmFd) -> Result<u32, MemoryError> {
        let mut slot = 0;
        for region in self.memory.iter() {
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            let gpa = region.start_addr().0;
            let mem_region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `self.memory`, which outlives
            // the VM (the Vm struct drops the VM fd before the memory).
            unsafe { vm.set_user_memory_region(mem_region) }
                .map_err(|source| MemoryError::KvmSlot { slot, gpa, source })?;
            slot += 1;
        }
        Ok(slot)
    }
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    let name = CString::new(name).map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{GIB, MIB};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn regions_share_one_memfd_at_layout_offsets() {
        let layout = MemoryLayout::new(3 * GIB + 64 * MIB, 40).unwrap();
        let ram = GuestRam::new(&layout, RamBacking::Memfd).unwrap();
        let file = ram.file.as_ref().unwrap();
        assert_eq!(file.metadata().unwrap().len(), 3 * GIB + 64 * MIB);
        ram.memory
            .write_obj(0xabcdu32, GuestAddress(4 * GIB))
            .unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut buf, 3 * GIB).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
    }

    #[test]
    fn anonymous_ram_has_the_layout_and_no_file() {
        let layout = MemoryLayout::new(3 * GIB + 64 * MIB, 40).unwrap();
        let ram = GuestRam::new(&layout, RamBacking::AnonymousHuge).unwrap();
        assert!(ram.file.is_none());
        let regions: Vec<_> = ram
            .memory
            .iter()
            .map(|r| (r.start_addr(), r.len()))
            .collect();
        assert_eq!(regions, layout.ram);
        ram.memory
            .write_obj(0xabcdu32, GuestAddress(4 * GIB))
            .unwrap();
        assert_eq!(
            ram.memory.read_obj::<u32>(GuestAddress(4 * GIB)).unwrap(),
            0xabcd
        );
    }
}
