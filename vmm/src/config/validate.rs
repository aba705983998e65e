//! Checks a complete [`VmConfig`] against sanity rules and the host.
//!
//! Everything that can be checked before creating the VM is checked here,
//! so that a bad setting fails fast with a message naming it, instead of
//! surfacing later as an opaque KVM ioctl or loader error.

use std::fs::{self, File};
use std::path::Path;

use super::device_check::{check_device_dirs, check_device_rules, check_p2p_host, DEV};
use super::p2p_group;
use super::{ByteSize, ConfigError, MemoryConfig, VmConfig};

/// Smallest guest RAM accepted: below this a stock kernel plus initramfs
/// does not boot, and the failure would be an obscure guest panic.
pub const MIN_MEMORY: ByteSize = ByteSize(64 << 20);

/// Guest RAM is mapped into KVM memory slots, which must be page-aligned.
const PAGE_SIZE: u64 = 4 << 10;

/// Size of the kernel's x86 command-line buffer (`COMMAND_LINE_SIZE`),
/// which includes the terminating NUL; so at most 2047 characters fit.
pub const CMDLINE_CAPACITY: usize = 2048;

const MEMINFO: &str = "/proc/meminfo";

/// The 64-bit MMIO window's alignment and size granule: 256 GiB.
pub const MMIO64_GRANULE: u64 = 256 << 30;

/// Host resources a configuration must fit into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Total host RAM in bytes (`MemTotal` in /proc/meminfo).
    pub memory_bytes: u64,
    /// Most vCPUs KVM allows per VM (`KVM_CAP_MAX_VCPUS`); only KVM knows,
    /// so [`HostLimits::probe`] puts a common default here for the caller
    /// to overwrite.
    pub max_vcpus: u32,
}

impl HostLimits {
    /// `max_vcpus` used by [`HostLimits::probe`] until the caller asks KVM.
    pub const DEFAULT_MAX_VCPUS: u32 = 254;

    /// Reads total memory from /proc/meminfo; `max_vcpus` is set to
    /// [`HostLimits::DEFAULT_MAX_VCPUS`].
    pub fn probe() -> Result<Self, ConfigError> {
        let text = fs::read_to_string(MEMINFO).map_err(|e| ConfigError::HostProbe {
            path: MEMINFO,
            reason: e.to_string(),
        })?;
        let memory_bytes = parse_mem_total(&text).ok_or_else(|| ConfigError::HostProbe {
            path: MEMINFO,
            reason: "no parsable \"MemTotal: N kB\" line".to_string(),
        })?;
        Ok(Self {
            memory_bytes,
            max_vcpus: Self::DEFAULT_MAX_VCPUS,
        })
    }
}

/// Extracts `MemTotal` in bytes from /proc/meminfo text.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let rest = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?;
    let mut words = rest.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    // The kernel always reports kB (KiB); anything else is not understood.
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

impl VmConfig {
    /// Checks that the kernel (and initramfs) can be read, that vCPU
    /// count, memory size and command line are usable on `host`, that the
    /// passthrough devices are distinct PCI functions, and that the P2P
    /// groups are consistent (members exist, each in one group, one backend
    /// per group that its mode can use) and fit the host (the mode's kernel
    /// interface exists, host IOMMU groups are not split across domains,
    /// clique ids suffice). Returns the first problem found.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        check_readable_file("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_readable_file("initramfs", initramfs)?;
        }
        check_cpus(self.cpus, host.max_vcpus)?;
        check_memory(self.memory.size, host.memory_bytes)?;
        check_huge_pages(self.memory)?;
        check_mmio64_size(self.mmio64_size)?;
        check_cmdline(&self.cmdline)?;
        // Rules between devices first: they need no file system access.
        check_device_rules(&self.devices)?;
        p2p_group::check_group_rules(self)?;
        check_device_dirs(&self.devices)?;
        check_p2p_host(self, Path::new(DEV))
    }
}

/// The file must be a regular file we can open for reading.
fn check_readable_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let access = |cause| ConfigError::FileAccess {
        field,
        path: path.to_path_buf(),
        cause,
    };
    // stat before open: opening a FIFO for reading would block until a
    // writer appears, hanging startup.
    if !fs::metadata(path).map_err(access)?.is_file() {
        return Err(ConfigError::NotAFile {
            field,
            path: path.to_path_buf(),
        });
    }
    File::open(path).map(drop).map_err(access)
}

fn check_cpus(cpus: u8, max_vcpus: u32) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: "cpus",
        value: cpus.to_string(),
        reason,
    };
    if cpus == 0 {
        return Err(invalid("at least one vCPU is required".to_string()));
    }
    if u32::from(cpus) > max_vcpus {
        return Err(invalid(format!(
            "exceeds the host's KVM limit of {max_vcpus} vCPUs"
        )));
    }
    Ok(())
}

fn check_memory(memory: ByteSize, host_bytes: u64) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: "memory",
        value: memory.to_string(),
        reason,
    };
    if memory < MIN_MEMORY {
        return Err(invalid(format!("at least {MIN_MEMORY} is required")));
    }
    // Rejected rather than rounded: silently giving the guest a different
    // amount than configured would be surprising. Rounding down stays
    // >= MIN_MEMORY because MIN_MEMORY is page-aligned.
    if !memory.0.is_multiple_of(PAGE_SIZE) {
        let suggestion = ByteSize(memory.0 - memory.0 % PAGE_SIZE);
        return Err(invalid(format!(
            "must be a multiple of the {} page size (e.g. {suggestion})",
            ByteSize(PAGE_SIZE)
        )));
    }
    if memory.0 > host_bytes {
        return Err(invalid(format!(
            "exceeds host memory {}",
            ByteSize(host_bytes).approx()
        )));
    }
    Ok(())
}

/// Huge pages back guest RAM whole: the size must be a number of them. (Whether the host has
/// that many free is checked when the memory is allocated, like every other host resource.)
fn check_huge_pages(memory: MemoryConfig) -> Result<(), ConfigError> {
    let Some(page) = memory.hugepages else {
        return Ok(());
    };
    if memory.size.0.is_multiple_of(page.bytes()) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        field: "memory",
        value: memory.to_string(),
        reason: format!(
            "the size must be a multiple of the {page} huge page size (e.g. {})",
            ByteSize((memory.size.0 / page.bytes()).max(1) * page.bytes())
        ),
    })
}

/// The 64-bit window keeps its 256 GiB alignment and granule (`layout::MMIO64_MIN_SIZE`); the
/// guest's physical address width is checked when the VM is laid out.
fn check_mmio64_size(size: Option<ByteSize>) -> Result<(), ConfigError> {
    let Some(size) = size else {
        return Ok(());
    };
    if size.0 == 0 || !size.0.is_multiple_of(MMIO64_GRANULE) {
        return Err(ConfigError::Invalid {
            field: "mmio64_size",
            value: size.to_string(),
            reason: format!(
                "must be a non-zero multiple of {} (the window's alignment)",
                ByteSize(MMIO64_GRANULE)
            ),
        });
    }
    Ok(())
}

fn check_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    let max_len = CMDLINE_CAPACITY - 1;
    if cmdline.len() > max_len {
        return Err(ConfigError::Invalid {
            field: "cmdline",
            value: format!("<{} bytes>", cmdline.len()),
            reason: format!(
                "longer than {max_len} bytes (the kernel's {CMDLINE_CAPACITY}-byte buffer includes the final NUL)"
            ),
        });
    }
    if let Some(offset) = cmdline.find('\0') {
        return Err(ConfigError::Invalid {
            field: "cmdline",
            value: preview(cmdline),
            reason: format!("contains a NUL byte at offset {offset}"),
        });
    }
    Ok(())
}

/// Quoted, escaped, and shortened so the error stays one readable line.
fn preview(text: &str) -> String {
    const MAX_CHARS: usize = 40;
    if text.chars().count() <= MAX_CHARS {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX_CHARS).collect();
        format!("{head:?}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let text = "MemFree:   100 kB\nMemTotal:       24534724 kB\nSwapTotal: 0 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_534_724 * 1024));
        assert_eq!(parse_mem_total("MemTotal: 12 MB\n"), None);
        assert_eq!(parse_mem_total("MemTotal:\n"), None);
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn probe_reads_this_host() {
        let host = HostLimits::probe().unwrap();
        assert!(host.memory_bytes > MIN_MEMORY.0, "{host:?}");
        assert_eq!(host.max_vcpus, HostLimits::DEFAULT_MAX_VCPUS);
    }

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline(&"a".repeat(CMDLINE_CAPACITY - 1)).is_ok());
        let long = check_cmdline(&"a".repeat(CMDLINE_CAPACITY)).unwrap_err();
        assert!(
            long.to_string()
                .starts_with("cmdline = <2048 bytes>: longer than 2047 bytes"),
            "{long}"
        );
        let nul = check_cmdline("console=ttyS0\0x").unwrap_err();
        assert_eq!(
            nul.to_string(),
            r#"cmdline = "console=ttyS0\0x": contains a NUL byte at offset 13"#
        );
    }

    #[test]
    fn unaligned_memory_suggests_a_multiple() {
        let err = check_memory(ByteSize((100 << 20) + 1), u64::MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory = 104857601: must be a multiple of the 4K page size (e.g. 100M)"
        );
    }

    #[test]
    fn directory_is_not_a_kernel() {
        let dir = std::env::temp_dir();
        let err = check_readable_file("kernel", &dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("kernel {dir:?}: not a regular file")
        );
    }
}
