//! Guest RAM, carved into the regions of the layout: one memfd mapped shared, or anonymous memory
//! with transparent huge pages, whichever the VM's IOMMU backend maps best.
//!
//! A memfd lets iommufd map guest RAM by file (`IOMMU_IOAS_MAP_FILE`) without pinning it through
//! a user address. Legacy type1 can only pin through the process page tables; there, anonymous
//! memory in huge pages lets it map 2 MiB at a time (a memfd gets huge pages only where the
//! host's shmem THP setting allows it, off by default), and guest accesses get large pages too.
//!
//! With `hugepages=on`, guest RAM is a hugetlb memfd (`MFD_HUGETLB`) on every backend: iommufd
//! still maps it by file, type1 pins it by address, both a huge page at a time. It is mapped
//! without `MAP_NORESERVE`, so the kernel reserves every page at mmap time: too few free huge
//! pages fail the start with an error instead of a SIGBUS on some later guest access.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::config::HugePageSize;
use crate::layout::MemoryLayout;

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamBacking {
    /// One memfd, mapped shared: iommufd maps it by file.
    Memfd,
    /// Anonymous memory, advised for transparent huge pages: for type1, which pins by address.
    AnonymousHuge,
    /// One hugetlb memfd of this page size, mapped shared, for any backend.
    HugetlbMemfd(HugePageSize),
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
    #[error("mapping guest RAM at {gpa:#x} in {page} huge pages: {source}")]
    HugeMmap {
        gpa: u64,
        page: HugePageSize,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error(
        "guest RAM of {size:#x} bytes needs {needed} free {page} huge pages, the host has \
         {available} ({pool}: raise nr_hugepages there)"
    )]
    TooFewHugePages {
        size: u64,
        page: HugePageSize,
        needed: u64,
        available: u64,
        pool: String,
    },
    #[error("no {page} huge page pool on this host ({pool}: {source}); is hugetlbfs built in?")]
    NoHugePagePool {
        page: HugePageSize,
        pool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest RAM region at {gpa:#x} of {len:#x} bytes is not a number of {page} huge pages")]
    HugeUnaligned {
        gpa: u64,
        len: u64,
        page: HugePageSize,
    },
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
    /// Another handle on the same RAM (the same mappings and memfd), for a thread that maps it
    /// into the IOMMU while the VM runs.
    pub fn share(&self) -> Result<Self, MemoryError> {
        Ok(Self {
            memory: self.memory.clone(),
            file: match &self.file {
                Some(file) => Some(file.try_clone().map_err(MemoryError::Memfd)?),
                None => None,
            },
        })
    }

    pub fn new(layout: &MemoryLayout, backing: RamBacking) -> Result<Self, MemoryError> {
        let ram = match backing {
            RamBacking::Memfd => Self::memfd(layout)?,
            RamBacking::HugetlbMemfd(page) => return Self::hugetlb_memfd(layout, page),
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

    /// Creates a hugetlb memfd and maps each layout region at consecutive offsets in it, every
    /// page reserved by the kernel at mmap time.
    fn hugetlb_memfd(layout: &MemoryLayout, page: HugePageSize) -> Result<Self, MemoryError> {
        let size = layout.ram_size();
        for &(gpa, len) in &layout.ram {
            if !len.is_multiple_of(page.bytes()) || !gpa.0.is_multiple_of(page.bytes()) {
                return Err(MemoryError::HugeUnaligned {
                    gpa: gpa.0,
                    len,
                    page,
                });
            }
        }
        check_huge_page_pool(size, page)?;
        let file = memfd_with("p2pvmm-guest-ram", page.memfd_flags())?;
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        let mut offset = 0;
        let mut regions = Vec::with_capacity(layout.ram.len());
        for &(gpa, len) in &layout.ram {
            let clone = file.try_clone().map_err(MemoryError::Memfd)?;
            let huge = |source| MemoryError::HugeMmap {
                gpa: gpa.0,
                page,
                source,
            };
            let mapping = MmapRegionBuilder::new(len as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .with_file_offset(FileOffset::new(clone, offset))
                .with_hugetlbfs(true)
                .build()
                .map_err(huge)?;
            let region = GuestRegionMmap::new(mapping, gpa).ok_or(MemoryError::HugeUnaligned {
                gpa: gpa.0,
                len,
                page,
            })?;
            regions.push(region);
            offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Mmap(vm_memory::mmap::FromRangesError::from(e)))?;
        log::info!(
            "guest RAM: {size:#x} bytes in {} {page} huge pages",
            size / page.bytes()
        );
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

/// Whether the host's pool of `page` huge pages has `size` bytes free and unreserved.
fn check_huge_page_pool(size: u64, page: HugePageSize) -> Result<(), MemoryError> {
    let pool = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB",
        page.bytes() / 1024
    );
    let count = |name: &str| -> Result<u64, MemoryError> {
        let path = format!("{pool}/{name}");
        let text =
            std::fs::read_to_string(&path).map_err(|source| MemoryError::NoHugePagePool {
                page,
                pool: pool.clone(),
                source,
            })?;
        text.trim()
            .parse()
            .map_err(|e| MemoryError::NoHugePagePool {
                page,
                pool: pool.clone(),
                source: std::io::Error::other(format!("{path}: {text:?}: {e}")),
            })
    };
    // Reserved pages are free but promised to mappings already made.
    let available = count("free_hugepages")?.saturating_sub(count("resv_hugepages")?);
    let needed = size / page.bytes();
    if available < needed {
        return Err(MemoryError::TooFewHugePages {
            size,
            page,
            needed,
            available,
            pool: format!("{pool}/nr_hugepages"),
        });
    }
    Ok(())
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    memfd_with(name, 0)
}

fn memfd_with(name: &str, flags: libc::c_uint) -> Result<File, MemoryError> {
    let name = CString::new(name).map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
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

    /// No host (this machine's included) keeps 64 free 1G pages unasked: the start fails up
    /// front, naming the pool, instead of a SIGBUS on a guest access.
    #[test]
    fn too_few_free_huge_pages_fail_naming_the_pool() {
        let layout = MemoryLayout::new(64 * GIB, 46).unwrap();
        let e = match GuestRam::new(&layout, RamBacking::HugetlbMemfd(HugePageSize::Size1G)) {
            Err(e) => e,
            Ok(_) => panic!("64 GiB of 1G huge pages were free"),
        };
        let text = e.to_string();
        assert!(
            matches!(
                e,
                MemoryError::TooFewHugePages { needed: 64, .. }
                    | MemoryError::NoHugePagePool { .. }
            ),
            "{text}"
        );
        assert!(
            text.contains("/sys/kernel/mm/hugepages/hugepages-1048576kB"),
            "{text}"
        );
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
