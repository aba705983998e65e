//! DMA memory without a kernel driver: one locked anonymous page whose physical address comes
//! from `/proc/self/pagemap` (needs CAP_SYS_ADMIN, else the kernel reports PFN 0). In VFIO
//! no-IOMMU mode a device's DMA address is that physical address.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use super::{Fail, Result};

const PM_PRESENT: u64 = 1 << 63;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Opened `/proc/self/pagemap` plus the page size.
pub struct Pagemap {
    file: File,
    page_size: usize,
}

impl Pagemap {
    pub fn open() -> Result<Self> {
        let file = File::open("/proc/self/pagemap").map_err(|e| {
            Fail::io(
                "open /proc/self/pagemap (kernel needs CONFIG_PROC_PAGE_MONITOR)",
                e,
            )
        })?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page_size = usize::try_from(ps)
            .ok()
            .filter(|&p| p >= 4096)
            .ok_or_else(|| Fail::msg("sysconf(_SC_PAGESIZE)", format!("returned {ps}")))?;
        Ok(Self { file, page_size })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Physical address of the byte at virtual address `va` (its page must be resident).
    fn phys(&self, va: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        let off = (va / self.page_size) as u64 * 8;
        self.file
            .read_exact_at(&mut b, off)
            .map_err(|e| Fail::io(format!("read /proc/self/pagemap for va 0x{va:x}"), e))?;
        let ent = u64::from_le_bytes(b);
        if ent & PM_PRESENT == 0 {
            return Err(Fail::msg(
                "pagemap",
                format!("page of va 0x{va:x} is not present (entry 0x{ent:x})"),
            ));
        }
        let pfn = ent & PM_PFN_MASK;
        if pfn == 0 {
            return Err(Fail::msg(
                "pagemap",
                "PFN reads as 0: run as root (CAP_SYS_ADMIN)",
            ));
        }
        Ok(pfn * self.page_size as u64 + (va % self.page_size) as u64)
    }
}

/// One page of anonymous memory, populated and mlock'ed so its physical address stays put.
pub struct DmaPage {
    ptr: NonNull<u8>,
    len: usize,
    phys: u64,
}

impl DmaPage {
    pub fn new(pm: &Pagemap) -> Result<Self> {
        let len = pm.page_size;
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address; it aliases no
        // Rust object and DmaPage unmaps it exactly once.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Fail::last_os("mmap DMA page"));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| Fail::msg("mmap DMA page", "returned NULL"))?;
        let mut page = Self { ptr, len, phys: 0 };
        // SAFETY: the range is exactly the mapping created above.
        if unsafe { libc::mlock(p, len) } != 0 {
            return Err(Fail::last_os("mlock DMA page"));
        }
        // Write every byte so the page is a private, resident page (not the shared zero page).
        page.fill(|_| 0);
        page.phys = pm.phys(ptr.as_ptr() as usize)?;
        Ok(page)
    }

    /// Bus address of byte 0 (no-IOMMU: the physical address).
    pub fn phys(&self) -> u64 {
        self.phys
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true for a page; for clippy's `len` convention now that the type is public.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set every byte i to f(i). Volatile, so the stores reach memory before a later DMA.
    pub fn fill(&self, f: impl Fn(usize) -> u8) {
        for i in 0..self.len {
            // SAFETY: i < len, inside the mapping; volatile because a device reads the memory.
            unsafe { self.ptr.as_ptr().add(i).write_volatile(f(i)) };
        }
    }

    /// Byte i (volatile: a device may have written it behind the compiler's back).
    pub fn get(&self, i: usize) -> Option<u8> {
        if i >= self.len {
            return None;
        }
        // SAFETY: i < len, inside the mapping.
        Some(unsafe { self.ptr.as_ptr().add(i).read_volatile() })
    }
}

impl Drop for DmaPage {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping created in new and unmapped only here (munmap
        // also drops the mlock).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
