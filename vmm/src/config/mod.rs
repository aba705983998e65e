//! VM configuration: command line, optional TOML file, and validation.
//!
//! Flow: [`load`] parses the flags ([`Cli`]), reads the `--config` file if
//! given, lets each flag that was actually passed override the file's value,
//! and fills in defaults, yielding a [`VmConfig`]. [`VmConfig::validate`]
//! then checks it against the host ([`HostLimits`]); that step is separate
//! because the vCPU limit comes from KVM, which this module does not open.
//!
//! Example file:
//!
//! ```toml
//! kernel = "bzImage"            # relative to this file
//! initramfs = "initrd.img"
//! cmdline = "console=ttyS0 reboot=k panic=1"
//! cpus = 4
//! memory = "2G"                 # or an integer number of bytes
//! serial = "file=/tmp/guest.log" # or "stdout" / "off"
//! mmio64_size = "256G"         # 64-bit MMIO window, a multiple of 256G
//! kernel_decompress = "host"    # or "guest": who decompresses a bzImage's kernel
//! slot_zap = "all"              # or "slot": what KVM drops when a BAR's memory slot goes
//!
//! [[device]]                    # VFIO passthrough; repeat per device
//! id = "gpu0"                   # default dev<N>, N = position from 0
//! path = "/sys/bus/pci/devices/0000:00:03.0" # or just "0000:00:03.0"
//! backend = "iommufd"           # or "legacy"; default iommufd if /dev/iommu exists
//! placement = "root-port"       # (default) or "root"
//!
//! [[device]]
//! id = "nvme0"
//! path = "00:04.0"
//! switch = "sw0"                # behind PCIe switch sw0, instead of placement
//!
//! [[device]]
//! id = "gpu1"
//! path = "00:05.0"
//! clique = 3                    # GPUDirect P2P clique id 0-15; default: the group's
//!
//! [[p2p_group]]                 # who may DMA into whose BARs; repeat per group
//! name = "g0"                   # also the name of the group's switch
//! devices = ["gpu1"]            # device ids, each in at most one group; may be []
//! mode = "auto"                 # or "dmabuf" (needs iommufd), "legacy" (type1), "off"
//! topology = "switch"           # or "root-ports", "flat"; a member's placement wins
//! ```
//!
//! `--device path=...,id=...` flags add devices after the file's; one with
//! the id of a file device replaces it. `--p2p-group` flags add groups after
//! the file's. A device in no group is an IOMMU address space of its own and
//! reaches no BAR ([`VmConfig::domains`]).

mod cli;
mod device;
mod device_check;
mod error;
mod file;
mod kernel_decompress;
mod layer;
pub mod memory;
mod p2p_group;
mod serial;
mod size;
mod slot_zap;
mod validate;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{de, Deserialize, Deserializer, Serialize};

pub use cli::Cli;
pub use device::IommuBackendKind;
pub use device::{DeviceConfig, Placement};
pub use device_check::host_vendor;
pub use error::ConfigError;
pub use kernel_decompress::KernelDecompress;
pub use memory::{HugePageSize, MemoryConfig};
pub use p2p_group::{DomainPlan, P2pGroupConfig, P2pMode};
#[allow(
    unused_imports,
    reason = "public API: the type of P2pGroupConfig::topology"
)]
pub use p2p_group::{GroupTopology, NVIDIA_VENDOR};
pub use serial::SerialConfig;
pub use size::ByteSize;
pub use slot_zap::SlotZap;
pub use validate::HostLimits;

/// Everything needed to build and boot one VM.
///
/// Serialized as the `--config` file's schema; deserialized through that same
/// schema and its defaults (see the `Deserialize` impl), so a VmConfig read
/// directly means what the file would.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmConfig {
    /// Guest kernel image to boot (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// Optional initial ramdisk, loaded into guest memory and passed to the
    /// kernel through the boot parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line, e.g. "console=ttyS0 reboot=k panic=1"; at most
    /// 2047 bytes, no NUL. Empty by default.
    pub cmdline: String,
    /// Number of vCPUs, from 1 to the host's KVM limit. Default 1.
    pub cpus: u8,
    /// Guest RAM size ("512M", "4G" or bytes): at least 64M, a multiple of
    /// 4K, and no more than host RAM. Default 512M. With huge pages:
    /// "size=4G,hugepages=on[,hugepage_size=2M|1G]" (the size a multiple of
    /// the huge page size, the pages reserved on the host).
    pub memory: MemoryConfig,
    /// Where the guest's serial console goes: "stdout", "off" or
    /// "file=PATH". Default stdout.
    pub serial: SerialConfig,
    /// Size of the guest's 64-bit prefetchable MMIO window ("512G"), which starts at the first
    /// 256 GiB boundary above RAM: a multiple of 256 GiB. Default 256 GiB, which keeps the
    /// window inside a 39-bit host IOMMU with up to 252 GiB of RAM; a larger window may reach
    /// past what the host IOMMU translates, and BARs the guest puts there get no peer mapping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmio64_size: Option<ByteSize>,
    /// Who decompresses a bzImage's kernel: "host" (p2pvmm, before the guest starts; the
    /// default) or "guest" (the bzImage's own decompressor, which also applies KASLR).
    #[serde(skip_serializing_if = "KernelDecompress::is_host")]
    pub kernel_decompress: KernelDecompress,
    /// What KVM drops when a memory slot goes away (a BAR at decode off or in a move): "all"
    /// the guest's page mappings (KVM's default) or only the "slot"'s (Linux 6.12 and later;
    /// a BAR move then costs the guest no refaults).
    #[serde(skip_serializing_if = "SlotZap::is_all")]
    pub slot_zap: SlotZap,
    /// Host PCI functions passed through with VFIO, as `[[device]]` tables
    /// (file devices first, then `--device` flags). Placements are the
    /// effective ones (a device's own, else its group's topology). None by
    /// default.
    #[serde(rename = "device", skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceConfig>,
    /// P2P groups, as `[[p2p_group]]` tables (file groups first, then
    /// `--p2p-group` flags): members reach each other's BARs, and a device in
    /// no group reaches no BAR. None by default.
    #[serde(rename = "p2p_group", skip_serializing_if = "Vec::is_empty")]
    pub p2p_groups: Vec<P2pGroupConfig>,
}

impl<'de> Deserialize<'de> for VmConfig {
    /// Reads the `--config` file's schema (unknown keys rejected) and fills
    /// in its defaults, group topologies included, exactly as [`load`] does
    /// for the file; paths are taken as written.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        layer::PartialConfig::deserialize(deserializer)?
            .finish()
            .map_err(de::Error::custom)
    }
}

/// Default vCPU count: one is enough to boot and the least surprising.
fn default_cpus() -> u8 {
    1
}

/// Default guest RAM: comfortably boots a distro kernel with an initramfs.
fn default_memory() -> MemoryConfig {
    MemoryConfig::of_size(ByteSize(512 << 20))
}

/// The result of [`load`]: the VM settings plus how chatty to be.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    /// The merged, defaulted (but not yet validated) VM configuration.
    pub vm: VmConfig,
    /// Number of `-v` flags given.
    pub verbosity: u8,
}

#[cfg(test)]
impl LoadedConfig {
    /// Log level for the `-v` count: warnings by default, then info, debug
    /// and trace; the same ladder cloud-hypervisor uses.
    pub fn log_level(&self) -> log::LevelFilter {
        log_level(self.verbosity)
    }
}

fn log_level(verbosity: u8) -> log::LevelFilter {
    match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// What `p2pvmm` starts with: a VM to boot at once (or none, when only the API socket was
/// given), the API socket, and how chatty to be.
#[derive(Debug, Clone, PartialEq)]
pub struct Startup {
    pub vm: Option<VmConfig>,
    pub api_socket: Option<PathBuf>,
    pub verbosity: u8,
    pub seccomp: crate::seccomp::SeccompMode,
}

impl Startup {
    /// See [`LoadedConfig::log_level`].
    pub fn log_level(&self) -> log::LevelFilter {
        log_level(self.verbosity)
    }
}

/// Like [`load`], for `main`: see [`Cli::into_startup`].
pub fn load_startup<I, T>(args: I) -> Result<Startup, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    Cli::try_parse_from(args)
        .map_err(ConfigError::Usage)?
        .into_startup()
}

/// Parses `text` as the `--config` file's contents, as [`load`] reads a file: toml with the
/// one-line error reporting (`path` only names the file in errors), then the defaults; paths
/// stay as written. Exists so the TOML path can be driven without a file (the fuzz target).
pub fn parse_file_text(text: &str, path: &Path) -> Result<VmConfig, ConfigError> {
    file::parse(text, path)?.finish()
}

/// Parses `args` (including the program name, as from
/// [`std::env::args_os`]) and builds the configuration: file first, flags
/// override, then defaults. Host validation is left to
/// [`VmConfig::validate`].
///
/// On [`ConfigError::Usage`] (bad syntax, `--help`, `--version`) the caller
/// should call `err.exit()` so clap prints its usage text.
#[cfg(test)]
pub fn load<I, T>(args: I) -> Result<LoadedConfig, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    Cli::try_parse_from(args)
        .map_err(ConfigError::Usage)?
        .into_config()
}
