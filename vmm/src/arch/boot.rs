//! Loading the guest kernel and initramfs and filling the Linux zero page.
//!
//! A bzImage's kernel is decompressed here ([`super::kernel_payload`]) and entered as the ELF
//! `vmlinux` it is, with the bzImage's setup header in the zero page; when that cannot be done
//! (or `kernel_decompress = "guest"`), the bzImage goes through linux-loader's `BzImage` and is
//! entered at its 64-bit entry point, to decompress itself. An ELF `vmlinux` goes through
//! `Elf`. All boot with the Linux 64-bit boot protocol.

use std::fs::File;
use std::io::{Cursor, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel_cache;
use super::kernel_payload::{self, PayloadError};
use crate::config::KernelDecompress;
use crate::layout::{
    MemoryLayout, ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_MEMORY_START,
    PCI_ECAM_SIZE, PCI_ECAM_START, ZERO_PAGE,
};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// Offset of the 64-bit entry point from where a bzImage's protected-mode code is loaded.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initramfs address for kernels whose header does not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {what} {path:?}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading kernel {path:?}: neither a bzImage ({bzimage}) nor an ELF vmlinux ({elf})")]
    Kernel {
        path: PathBuf,
        bzimage: linux_loader::loader::Error,
        elf: linux_loader::loader::Error,
    },
    #[error("the thread reading the kernel panicked")]
    ReadThreadPanicked,
    #[error("loading the kernel decompressed from bzImage {path:?}: {source}")]
    Vmlinux {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("initramfs {path:?} ({size} bytes) does not fit in guest RAM below {limit:#x} after the kernel")]
    InitramfsTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("reading initramfs {path:?} into guest memory: {source}")]
    InitramfsRead {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing the zero page: {0}")]
    ZeroPage(#[source] linux_loader::configurator::Error),
}

/// What the vCPU setup needs from the loaded kernel.
pub struct LoadedKernel {
    pub entry: GuestAddress,
}

/// The kernel file, read before guest memory exists (so it can be read and decompressed beside
/// the rest of the VM's setup).
pub struct KernelImage {
    path: PathBuf,
    form: KernelForm,
}

enum KernelForm {
    /// A bzImage's kernel, decompressed, with the bzImage's setup header.
    Decompressed {
        header: setup_header,
        vmlinux: Vmlinux,
    },
    /// The file as it is: a bzImage the guest decompresses, or an ELF vmlinux.
    AsIs(Vec<u8>),
}

/// A decompressed kernel: decompressed just now, or the kernel cache's file, read straight into
/// guest RAM when it is loaded.
enum Vmlinux {
    Decompressed(Vec<u8>),
    Cached(File),
}

/// Reads the kernel at `path` and, for a bzImage with `decompress` = host, decompresses it.
/// A bzImage that cannot be decompressed here is kept as it is, with a log line saying why.
pub fn read_kernel(path: &Path, decompress: KernelDecompress) -> Result<KernelImage, BootError> {
    let bytes = std::fs::read(path).map_err(|source| BootError::Open {
        what: "kernel",
        path: path.to_owned(),
        source,
    })?;
    let form = match decompress {
        KernelDecompress::Guest => KernelForm::AsIs(bytes),
        KernelDecompress::Host => match kernel_payload::locate(&bytes) {
            Ok(compressed) => match decompressed(path, compressed) {
                Ok(form) => form,
                Err(e) => {
                    log::info!("kernel {path:?}: {e}; the guest decompresses it");
                    KernelForm::AsIs(bytes)
                }
            },
            Err(PayloadError::NotBzImage) => KernelForm::AsIs(bytes),
            Err(e) => {
                log::info!("kernel {path:?}: {e}; the guest decompresses it");
                KernelForm::AsIs(bytes)
            }
        },
    };
    Ok(KernelImage {
        path: path.to_owned(),
        form,
    })
}

/// The kernel of the bzImage at `path`, from the kernel cache or decompressed now (and
/// then cached).
fn decompressed(
    path: &Path,
    compressed: kernel_payload::Compressed<'_>,
) -> Result<KernelForm, PayloadError> {
    let started = Instant::now();
    let header = compressed.header;
    let cache = kernel_cache::dir()
        .zip(std::fs::metadata(path).ok())
        .map(|(dir, meta)| (dir, kernel_cache::key(&meta)));
    let cached = cache.as_ref().and_then(|(dir, key)| {
        kernel_cache::load(dir, key, compressed.recorded_size()).map(|f| (f, dir.join(key)))
    });
    if let Some((vmlinux, file)) = cached {
        log::info!(
            "kernel {path:?}: decompressed kernel read from the kernel cache {file:?} into guest \
             RAM (opened in {:?})",
            started.elapsed()
        );
        return Ok(KernelForm::Decompressed {
            header,
            vmlinux: Vmlinux::Cached(vmlinux),
        });
    }
    let payload = compressed.decompress()?;
    log::info!(
        "kernel {path:?}: {} payload of {} KiB decompressed to {} KiB in {:?}",
        payload.compression.name(),
        header.payload_length / 1024,
        payload.vmlinux.len() / 1024,
        started.elapsed()
    );
    if let Some((dir, key)) = &cache {
        kernel_cache::store(dir, key, &payload.vmlinux);
    }
    Ok(KernelForm::Decompressed {
        header,
        vmlinux: Vmlinux::Decompressed(payload.vmlinux),
    })
}

/// Loads the kernel at its link address; returns what the loader found and where to enter.
fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &KernelImage,
) -> Result<(KernelLoaderResult, GuestAddress), BootError> {
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    match &kernel.form {
        KernelForm::Decompressed { header, vmlinux } => {
            let loaded = match vmlinux {
                Vmlinux::Decompressed(bytes) => Elf::load(mem, None, &mut Cursor::new(bytes), high),
                Vmlinux::Cached(file) => {
                    let mut file: &File = file;
                    Elf::load(mem, None, &mut file, high)
                }
            };
            let mut loaded = loaded.map_err(|source| BootError::Vmlinux {
                path: kernel.path.clone(),
                source,
            })?;
            loaded.setup_header = Some(*header);
            Ok((loaded, loaded.kernel_load))
        }
        KernelForm::AsIs(bytes) => match BzImage::load(mem, None, &mut Cursor::new(bytes), high) {
            Ok(r) => Ok((r, r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET))),
            Err(bzimage) => match Elf::load(mem, None, &mut Cursor::new(bytes), high) {
                Ok(r) => Ok((r, r.kernel_load)),
                Err(elf) => Err(BootError::Kernel {
                    path: kernel.path.clone(),
                    bzimage,
                    elf,
                }),
            },
        },
    }
}

/// Loads kernel, initramfs and command line and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &KernelImage,
    initramfs_path: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel, BootError> {
    let open = |what, path: &Path| {
        File::open(path).map_err(|source| BootError::Open {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let (loaded, entry) = load_kernel(mem, kernel)?;

    let mut hdr = loaded.setup_header.unwrap_or_default();
    complete_header(&mut hdr);

    let cmdline = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len() as u32;

    if let Some(path) = initramfs_path {
        let mut file = open("initramfs", path)?;
        // Both loaders report the absolute end of what they loaded.
        let kernel_end = loaded.kernel_end;
        let (addr, size) = load_initramfs(mem, layout, &hdr, kernel_end, path, &mut file)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: ACPI_START,
        ..Default::default()
    };
    let e820 = e820_map(layout);
    for (slot, entry) in params.e820_table.iter_mut().zip(&e820) {
        *slot = *entry;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(BootError::ZeroPage)?;
    Ok(LoadedKernel { entry })
}

/// Fields the boot protocol asks the boot loader to set (an ELF kernel has no header at all).
fn complete_header(hdr: &mut setup_header) {
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
}

/// Places the initramfs as high as the kernel allows in low RAM, page aligned.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    hdr: &setup_header,
    kernel_end: u64,
    path: &Path,
    file: &mut File,
) -> Result<(u64, u64), BootError> {
    let io = |source: std::io::Error| BootError::Open {
        what: "initramfs",
        path: path.to_owned(),
        source,
    };
    let size = file.seek(SeekFrom::End(0)).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let addr_max = match hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        max => u64::from(max),
    };
    let limit = layout.low_ram_end().min(addr_max + 1);
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_owned(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|source| BootError::InitramfsRead {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

/// The firmware memory map: RAM, the legacy BIOS area, and the ECAM window reserved so the guest
/// trusts MCFG.
fn e820_map(layout: &MemoryLayout) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
        entry(
            HIGH_MEMORY_START,
            layout.low_ram_end() - HIGH_MEMORY_START,
            E820_RAM,
        ),
        entry(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
    ];
    for &(gpa, len) in layout.ram.iter().skip(1) {
        map.push(entry(gpa.0, len, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{GIB, MIB};

    #[test]
    fn e820_covers_all_ram_and_reserves_ecam() {
        let layout = MemoryLayout::new(3 * GIB + 512 * MIB, 40).unwrap();
        let map = e820_map(&layout);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, layout.ram_size() - (HIGH_MEMORY_START - EBDA_START));
        assert!(map
            .iter()
            .any(|e| e.r#type == E820_RESERVED && e.addr == PCI_ECAM_START));
        assert_eq!(map.last().map(|e| e.addr), Some(4 * GIB));
    }
}
