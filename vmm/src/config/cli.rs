//! Command-line flags, cloud-hypervisor style (`--kernel`, `--memory 2G`).
//!
//! Value flags that need domain parsing (`--cpus`, `--memory`, `--serial`,
//! `--device`, `--p2p-group`) are taken as raw strings and converted here rather than by
//! clap, so that a bad value produces the same one-line
//! `invalid --memory "12Q": ...` error as every other configuration problem
//! instead of clap's usage dump.

use std::path::PathBuf;

use clap::{ArgAction, Parser};

use super::layer::PartialConfig;
use super::{
    device, file, p2p_group, ByteSize, ConfigError, LoadedConfig, MemoryConfig, SerialConfig,
    Startup,
};
use crate::seccomp::SeccompMode;

/// p2pvmm: boot a Linux guest on KVM.
///
/// Settings come from the --config TOML file (if any), then from flags,
/// which override the file field by field.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "p2pvmm", version, about, long_about = None)]
pub struct Cli {
    /// TOML file with VM settings (keys: kernel, initramfs, cmdline, cpus,
    /// memory, serial, mmio64_size, [[device]] tables with the --device keys and
    /// [[p2p_group]] tables with the --p2p-group keys);
    /// relative paths in it are relative to the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Guest kernel image (bzImage or ELF vmlinux); required unless the
    /// config file sets `kernel`.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk loaded next to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line, e.g. "console=ttyS0 reboot=k panic=1" [default: empty].
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,

    /// Number of vCPUs, 1 to the host's KVM limit [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<String>,

    /// Guest RAM: a whole number with K, M, G or T suffix (binary units,
    /// e.g. 512M, 4G, 2GiB); at least 64M [default: 512M].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// Guest serial console: stdout, off or file=PATH [default: stdout].
    #[arg(long, value_name = "MODE")]
    pub serial: Option<String>,

    /// Size of the 64-bit prefetchable MMIO window, from the first 256 GiB boundary above RAM:
    /// a multiple of 256G [default: 256G]. BARs the guest places past what the host IOMMU
    /// translates (39 bits on many IOMMUs) get no peer mapping, with a warning.
    #[arg(long, value_name = "SIZE")]
    pub mmio64_size: Option<String>,

    /// Who decompresses a bzImage's kernel: host (p2pvmm, then the guest enters the kernel
    /// directly; falls back to guest when it cannot) or guest (the bzImage's own decompressor,
    /// slower, but it randomises the kernel's address) [default: host].
    #[arg(long, value_name = "WHO")]
    pub kernel_decompress: Option<String>,

    /// What KVM drops when a memory slot goes away (a BAR's mmap at decode off or in a move):
    /// all (every guest page mapping, which the guest faults back in: KVM's default) or slot
    /// (only the deleted slot's; needs Linux 6.12) [default: all].
    #[arg(long, value_name = "WHAT")]
    pub slot_zap: Option<String>,

    /// Host PCI device to pass through with VFIO; repeatable. Keys:
    /// path=/sys/bus/pci/devices/BDF or a bare BDF such as 0000:00:03.0 or
    /// 00:03.0 (required); id=NAME (letters, digits, _ and -) [default:
    /// dev<N>, N = position from 0]; backend=iommufd|legacy, the backend of
    /// the device's P2P domain, so members of one group must agree [default:
    /// iommufd if /dev/iommu exists, else legacy]; placement=root-port|root
    /// [default: the P2P group's topology, else root-port]; switch=NAME puts
    /// the device behind that PCIe switch instead; clique=0-15 sets the NVIDIA
    /// GPUDirect P2P clique id the guest sees [default: for an NVIDIA device
    /// in a group with P2P on, the group's number among such groups; allowed
    /// on other vendors with a warning]. Added after the config file's
    /// devices; one with a file device's id replaces it.
    #[arg(long = "device", value_name = "KEY=VALUE,...")]
    pub devices: Vec<String>,

    /// P2P group, repeatable:
    /// name=NAME,devices=ID:ID[,mode=auto|dmabuf|legacy|off][,topology=switch|root-ports|flat].
    /// Members reach each other's BARs; a device in no group reaches no BAR (its DMA still
    /// reaches guest RAM). Keys: name=NAME (required; letters, digits, _ and -; unique) names
    /// the group and its switch; devices=ID:ID lists member device ids, each in at most one
    /// group (may be empty); mode=auto (default: dmabuf on iommufd, by address on type1),
    /// dmabuf (needs iommufd), legacy (a type1 container of the group's own) or off (the
    /// topology without P2P); topology=switch (default: behind one PCIe switch named NAME),
    /// root-ports (a root port each) or flat (on the root bus); a member's own placement or
    /// switch wins. Each group is its own IOMMU address space, so functions of one host IOMMU
    /// group must be in the same P2P group. Added after the config file's [[p2p_group]]
    /// tables.
    #[arg(long = "p2p-group", value_name = "KEY=VALUE,...")]
    pub p2p_groups: Vec<String>,

    /// Serve the REST API (Cloud Hypervisor's wire format) on this Unix socket, created 0600.
    /// Without --kernel (and no config file), p2pvmm waits for `vm.create` and `vm.boot`;
    /// `p2pvmm remote --api-socket PATH ...` is the client.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Seccomp filters, one per thread: true traps any other system call (named on stderr,
    /// exit status 159), log lets it through for the kernel's audit log, false installs none.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "true",
        env = "P2PVMM_SECCOMP"
    )]
    pub seccomp: SeccompMode,

    /// More log output; repeat for more (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
}

impl Cli {
    /// Reads the `--config` file (if any), applies the flags on top and
    /// fills in defaults. Does not validate against the host: see
    /// [`super::VmConfig::validate`].
    pub fn into_config(self) -> Result<LoadedConfig, ConfigError> {
        let overrides = self.overrides()?;
        let base = match &self.config {
            Some(path) => file::read(path)?,
            None => PartialConfig::default(),
        };
        Ok(LoadedConfig {
            vm: base.overlay(overrides).finish()?,
            verbosity: self.verbose,
        })
    }

    /// Like [`into_config`](Self::into_config), but with `--api-socket` and no kernel anywhere
    /// there is no VM yet: the API creates it.
    pub fn into_startup(self) -> Result<Startup, ConfigError> {
        let api_socket = self.api_socket.clone();
        let verbosity = self.verbose;
        let seccomp = self.seccomp;
        match self.into_config() {
            Err(ConfigError::MissingKernel) if api_socket.is_some() => Ok(Startup {
                vm: None,
                api_socket,
                verbosity,
                seccomp,
            }),
            loaded => loaded.map(|loaded| Startup {
                vm: Some(loaded.vm),
                api_socket,
                verbosity,
                seccomp,
            }),
        }
    }

    /// The settings given as flags. Parsed before the file is read so that a
    /// typo on the command line is reported even if the file is also broken.
    fn overrides(&self) -> Result<PartialConfig, ConfigError> {
        Ok(PartialConfig {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
            // std's "invalid digit found in string" would not say what is wanted.
            cpus: parse_flag("--cpus", self.cpus.as_deref(), |v| {
                v.parse::<u8>()
                    .map_err(|_| "expected a vCPU count from 1 to 255".to_string())
            })?,
            memory: parse_flag("--memory", self.memory.as_deref(), |v| {
                v.parse::<MemoryConfig>()
            })?,
            serial: parse_flag("--serial", self.serial.as_deref(), |v| {
                v.parse::<SerialConfig>().map_err(|e| e.to_string())
            })?,
            mmio64_size: parse_flag("--mmio64-size", self.mmio64_size.as_deref(), |v| {
                v.parse::<ByteSize>().map_err(|e| e.to_string())
            })?,
            kernel_decompress: parse_flag(
                "--kernel-decompress",
                self.kernel_decompress.as_deref(),
                str::parse,
            )?,
            slot_zap: parse_flag("--slot-zap", self.slot_zap.as_deref(), str::parse)?,
            devices: self
                .devices
                .iter()
                .map(|v| parse_flag("--device", Some(v), device::parse_flag))
                .filter_map(Result::transpose)
                .collect::<Result<_, _>>()?,
            p2p_groups: self
                .p2p_groups
                .iter()
                .map(|v| parse_flag("--p2p-group", Some(v), p2p_group::parse_flag))
                .filter_map(Result::transpose)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Parses an optional flag value, naming the flag and value on failure.
fn parse_flag<T>(
    flag: &'static str,
    value: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    value
        .map(|v| {
            parse(v).map_err(|reason| ConfigError::InvalidFlag {
                flag,
                value: v.to_string(),
                reason,
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent_and_every_flag_has_help() {
        Cli::command().debug_assert();
        for arg in Cli::command().get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(!help.is_empty(), "--{} has no help text", arg.get_id());
        }
    }

    #[test]
    fn verbose_is_counted() {
        let cli = Cli::try_parse_from(["p2pvmm", "-vv", "--verbose"]).unwrap();
        assert_eq!(cli.verbose, 3);
    }

    #[test]
    fn cmdline_may_start_with_a_dash() {
        let cli = Cli::try_parse_from(["p2pvmm", "--cmdline", "-- init=/bin/sh"]).unwrap();
        assert_eq!(cli.cmdline.as_deref(), Some("-- init=/bin/sh"));
    }

    #[test]
    fn bad_flag_values_are_one_line_errors() {
        let err = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            cli.overrides().unwrap_err().to_string()
        };
        assert_eq!(
            err(&["p2pvmm", "--memory", "12Q"]),
            r#"invalid --memory "12Q": unknown size suffix "Q" (use K, M, G or T)"#
        );
        assert_eq!(
            err(&["p2pvmm", "--cpus", "300"]),
            r#"invalid --cpus "300": expected a vCPU count from 1 to 255"#
        );
        assert_eq!(
            err(&["p2pvmm", "--serial", "tty"]),
            r#"invalid --serial "tty": unknown serial mode "tty" (use stdout, off or file=PATH)"#
        );
    }
}
