//! The single error type of the configuration layer.
//!
//! Every message is one line that names the offending field (or flag, or
//! file) and the value it had, so a user can fix the problem without having
//! to guess which of several sources the value came from. Underlying OS and
//! parser errors are folded into that line rather than exposed as
//! `source()`, so error reporters that walk the chain do not print them twice.

use std::io;
use std::path::PathBuf;

use super::{IommuBackendKind, P2pMode};

/// Anything that can go wrong while building or checking a [`super::VmConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Command-line syntax error, or `--help`/`--version`. `main` should call
    /// [`clap::Error::exit`] on it: clap prints the full, styled usage text
    /// and uses the conventional exit code (0 for help, 2 for misuse). The
    /// `Display` here is just the first line, for logs.
    #[error("{}", first_line(.0))]
    Usage(clap::Error),

    /// A flag's value could not be parsed, e.g. `--memory 12Q`.
    #[error("invalid {flag} {value:?}: {reason}")]
    InvalidFlag {
        /// The flag as typed, e.g. `--memory`.
        flag: &'static str,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },

    /// Neither `--kernel` nor the config file named a kernel.
    #[error("--kernel is required (or set kernel = \"PATH\" in the --config file)")]
    MissingKernel,

    /// The `--config` file could not be read.
    #[error("config file {path:?}: {cause}")]
    ConfigRead {
        /// The `--config` path.
        path: PathBuf,
        /// The OS error.
        cause: io::Error,
    },

    /// The `--config` file is not valid TOML or does not match the schema
    /// (unknown key, wrong type, bad size, ...).
    #[error("config file {path:?}{}: {message}", location(*.line, .key.as_deref(), .message))]
    ConfigParse {
        /// The `--config` path.
        path: PathBuf,
        /// 1-based line of the problem, when the parser knows it.
        line: Option<usize>,
        /// Key on that line, when one could be identified.
        key: Option<String>,
        /// The parser's message condensed to one line.
        message: String,
    },

    /// A file named by the config (kernel, initramfs) cannot be opened.
    #[error("{field} {path:?}: {cause}")]
    FileAccess {
        /// Which setting named the file, e.g. `kernel`.
        field: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// The OS error.
        cause: io::Error,
    },

    /// A file named by the config is a directory, device, FIFO, ...
    #[error("{field} {path:?}: not a regular file")]
    NotAFile {
        /// Which setting named the file, e.g. `kernel`.
        field: &'static str,
        /// The path as configured.
        path: PathBuf,
    },

    /// A setting parsed fine but is out of range for this VM or host.
    #[error("{field} = {value}: {reason}")]
    Invalid {
        /// Config field name, e.g. `cpus`.
        field: &'static str,
        /// The value, formatted as the user would write it.
        value: String,
        /// What is wrong and, where possible, what would be accepted.
        reason: String,
    },

    /// A passthrough device (`[[device]]` or `--device`) is unusable.
    #[error("{device}: {field} = {value}: {reason}")]
    InvalidDevice {
        /// Which device: `device gpu0`, or `device[1]` (its position in the
        /// merged list, from 0) when the id itself is the problem.
        device: String,
        /// The device's key, e.g. `path`.
        field: &'static str,
        /// The value, formatted as the user would write it.
        value: String,
        /// What is wrong and, where possible, what would be accepted.
        reason: String,
    },

    /// A P2P group (`[[p2p_group]]` or `--p2p-group`) has a bad name.
    #[error("p2p_group {group}: {field} = {value:?}: {reason}")]
    InvalidGroup {
        /// The group's name as given.
        group: String,
        /// The group's key, e.g. `name`.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// What is wrong and, where possible, what would be accepted.
        reason: String,
    },

    /// Two groups have one name (the name is the group's switch and its table label).
    #[error("p2p_group {group}: name = {group:?}: another group has this name")]
    DuplicateGroup {
        /// The repeated name.
        group: String,
    },

    /// A group lists a device id that no `--device` / `[[device]]` has.
    #[error(
        "p2p_group {group}: devices = {device:?}: no such device (give it with --device ...,id={device})"
    )]
    GroupUnknownDevice {
        /// The group.
        group: String,
        /// The unknown id.
        device: String,
    },

    /// A group lists one device twice.
    #[error("p2p_group {group}: devices = {device:?}: listed twice")]
    GroupRepeatedDevice {
        /// The group.
        group: String,
        /// The repeated id.
        device: String,
    },

    /// A device is in two groups: it can be in one IOMMU address space only.
    #[error(
        "p2p_group {group}: devices = {device:?}: already in group {first} (a device is in at most one group)"
    )]
    DeviceInTwoGroups {
        /// The later group.
        group: String,
        /// The device.
        device: String,
        /// The group that listed it first.
        first: String,
    },

    /// A device outside the group sits behind a switch named like the group: one name, one
    /// switch, so the two topologies would silently merge.
    #[error(
        "p2p_group {group}: name = {group:?}: device {device} is not a member but has switch={group}, which would put it behind the group's switch (rename the group or that switch)"
    )]
    GroupSwitchClash {
        /// The group.
        group: String,
        /// The outsider.
        device: String,
    },

    /// A group's mode demands a backend one of its members refuses.
    #[error(
        "p2p_group {group}: mode = {:?}: needs the {needs} backend, but device {device} has backend={backend}",
        mode.to_string()
    )]
    GroupModeBackend {
        /// The group.
        group: String,
        /// Its mode.
        mode: P2pMode,
        /// The backend the mode needs.
        needs: IommuBackendKind,
        /// The member that asks for another one.
        device: String,
        /// What it asks for.
        backend: IommuBackendKind,
    },

    /// A group's mode needs a host interface this host does not have.
    #[error(
        "p2p_group {group}: mode = {:?}: needs {needs}, which this host does not have",
        mode.to_string()
    )]
    GroupModeUnsupported {
        /// The group.
        group: String,
        /// Its mode.
        mode: P2pMode,
        /// The missing interface, e.g. `iommufd (/dev/iommu)`.
        needs: &'static str,
    },

    /// Two members of one group ask for different backends: a group is one IOMMU address
    /// space, and an address space lives in one backend.
    #[error(
        "p2p_group {group}: devices = {device:?}: backend={backend} conflicts with backend={other_backend} of device {other} (a group is one IOMMU address space, in one backend)"
    )]
    GroupBackendConflict {
        /// The group.
        group: String,
        /// The later member.
        device: String,
        /// Its backend.
        backend: IommuBackendKind,
        /// The earlier member.
        other: String,
        /// Its backend.
        other_backend: IommuBackendKind,
    },

    /// Two functions of one host IOMMU group are in different P2P domains. The host IOMMU
    /// cannot tell them apart, so the isolation between the domains would be a fiction (and
    /// VFIO refuses to split a group across containers anyway).
    #[error(
        "device {device} ({}) and device {other} ({}) share host IOMMU group {host_group}: the host IOMMU cannot isolate them from each other, put both in the same P2P group",
        in_group(.group.as_deref()),
        in_group(.other_group.as_deref())
    )]
    IommuGroupSplit {
        /// The later device.
        device: String,
        /// Its P2P group, `None` if it is in none.
        group: Option<String>,
        /// The earlier device of the same host IOMMU group.
        other: String,
        /// Its P2P group, `None` if it is in none.
        other_group: Option<String>,
        /// The host IOMMU group number (`/sys/kernel/iommu_groups/N`).
        host_group: String,
    },

    /// More groups with NVIDIA members than GPUDirect clique ids (4 bits).
    #[error(
        "p2p_group {group}: clique = {clique}: beyond 15, this is group number {clique} (from 0) with NVIDIA members; give its NVIDIA devices clique=N"
    )]
    TooManyCliques {
        /// The first group without an id.
        group: String,
        /// The id it would get.
        clique: usize,
    },

    /// Host limits could not be determined.
    #[error("cannot determine host memory from {path}: {reason}")]
    HostProbe {
        /// The file that was read, e.g. `/proc/meminfo`.
        path: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// `group g0` or `no group`, for errors about a device's P2P domain.
fn in_group(group: Option<&str>) -> String {
    group.map_or_else(|| "no group".to_string(), |g| format!("group {g}"))
}

/// First line of a clap error without its `error: ` prefix; the rest is
/// usage text that only makes sense on a terminal.
fn first_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// `, line 3, key `memory`` — the key is left out when the message already
/// quotes it (serde's "unknown field `cpu`"), to avoid saying it twice.
fn location(line: Option<usize>, key: Option<&str>, message: &str) -> String {
    let mut out = String::new();
    if let Some(line) = line {
        out.push_str(&format!(", line {line}"));
    }
    if let Some(key) = key {
        if !message.contains(&format!("`{key}`")) {
            out.push_str(&format!(", key `{key}`"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_error_location_is_condensed() {
        let err = ConfigError::ConfigParse {
            path: "vm.toml".into(),
            line: Some(4),
            key: Some("memory".into()),
            message: "unknown size suffix \"Q\" (use K, M, G or T)".into(),
        };
        assert_eq!(
            err.to_string(),
            r#"config file "vm.toml", line 4, key `memory`: unknown size suffix "Q" (use K, M, G or T)"#
        );
        let dup = ConfigError::ConfigParse {
            path: "vm.toml".into(),
            line: Some(2),
            key: Some("cpu".into()),
            message: "unknown field `cpu`".into(),
        };
        assert_eq!(
            dup.to_string(),
            r#"config file "vm.toml", line 2: unknown field `cpu`"#
        );
    }

    #[test]
    fn file_access_names_field_and_path() {
        let err = ConfigError::FileAccess {
            field: "kernel",
            path: "/nope/bzImage".into(),
            cause: io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            err.to_string(),
            r#"kernel "/nope/bzImage": No such file or directory (os error 2)"#
        );
    }
}
