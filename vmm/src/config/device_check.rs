//! Checks of the passthrough device list, part of [`super::VmConfig::validate`].
//!
//! The rules between devices (ids, paths, switch names, clique range)
//! are pure; only [`check_device_dirs`] and [`check_p2p_host`] look at the
//! host, and only at the configured paths and an injectable `/dev`, so tests
//! can point devices at a fake sysfs in a temp dir. Driver binding and IOMMU
//! group viability are deliberately not checked here: the VFIO layer opens
//! the device anyway and can say more precisely what is wrong. What is
//! checked here is what VFIO cannot know: how the host IOMMU groups line up
//! with the configured P2P domains.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::device::{MAX_CLIQUE, SYSFS_PCI_DEVICES};
use super::{ConfigError, DeviceConfig, P2pMode, Placement, VmConfig};

/// Where the IOMMU backends' device nodes are; [`check_p2p_host`] takes it as
/// a parameter so tests can use a temp dir.
pub(super) const DEV: &str = "/dev";

/// Files every PCI function's sysfs directory has; a directory without
/// them is not a PCI device (e.g. a typo that names the bus directory).
const PCI_ATTRIBUTES: [&str; 2] = ["vendor", "device"];

/// Checks the rules that involve no file system: id and switch names,
/// unique ids and paths, clique range. (Backends are a per-domain rule: see
/// the P2P group checks.)
pub(super) fn check_device_rules(devices: &[DeviceConfig]) -> Result<(), ConfigError> {
    for (index, device) in devices.iter().enumerate() {
        let earlier = &devices[..index];
        let id_error = |reason: String| ConfigError::InvalidDevice {
            device: format!("device[{index}]"),
            field: "id",
            value: format!("{:?}", device.id),
            reason,
        };
        check_name(&device.id).map_err(id_error)?;
        if let Some(other) = earlier.iter().position(|d| d.id == device.id) {
            return Err(id_error(format!("already used by device[{other}]")));
        }
        if let Some(other) = earlier.iter().find(|d| d.path == device.path) {
            return Err(invalid(
                device,
                "path",
                format!("{:?}", device.path),
                format!("already used by device {}", other.id),
            ));
        }
        if let Placement::Switch(name) = &device.placement {
            check_name(name)
                .map_err(|reason| invalid(device, "switch", format!("{name:?}"), reason))?;
        }
        // Parsing checks this too; a VmConfig built in code gets here unchecked.
        if let Some(clique) = device.clique.filter(|c| *c > MAX_CLIQUE) {
            return Err(invalid(
                device,
                "clique",
                clique.to_string(),
                format!("out of range (use 0 to {MAX_CLIQUE})"),
            ));
        }
    }
    Ok(())
}

/// Ids and switch names end up in logs, errors and guest-visible names, so
/// they are kept to a safe alphabet.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_string());
    }
    match name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed (use letters, digits, '_' and '-')"
        )),
        None => Ok(()),
    }
}

/// Checks that each path is a PCI device directory and that no two paths
/// name the same device (say, one through `/sys/bus/pci/devices` and one
/// through `/sys/devices/pci0000:00`).
pub(super) fn check_device_dirs(devices: &[DeviceConfig]) -> Result<(), ConfigError> {
    let mut seen: Vec<(PathBuf, &str)> = Vec::with_capacity(devices.len());
    for device in devices {
        let real = check_device_dir(device)?;
        if let Some((_, other)) = seen.iter().find(|(path, _)| *path == real) {
            return Err(path_error(
                device,
                format!("same device as {other} ({})", real.display()),
            ));
        }
        seen.push((real, &device.id));
    }
    Ok(())
}

/// Returns the canonical path of a device directory that has the PCI
/// attribute files.
fn check_device_dir(device: &DeviceConfig) -> Result<PathBuf, ConfigError> {
    let os_error = |err: io::Error| {
        path_error(
            device,
            match err.kind() {
                io::ErrorKind::NotFound => {
                    "no such device (lspci -D lists the host's PCI addresses)".to_string()
                }
                _ => err.to_string(),
            },
        )
    };
    if !fs::metadata(&device.path).map_err(os_error)?.is_dir() {
        return Err(path_error(
            device,
            format!("not a directory (expected {SYSFS_PCI_DEVICES}/DOMAIN:BUS:DEVICE.FUNCTION)"),
        ));
    }
    for attribute in PCI_ATTRIBUTES {
        if !device.path.join(attribute).is_file() {
            return Err(path_error(
                device,
                format!("not a PCI device directory (it has no {attribute} file)"),
            ));
        }
    }
    fs::canonicalize(&device.path).map_err(os_error)
}

/// The host checks of the P2P configuration: each group's mode has its
/// kernel interface under `dev_root` (normally [`DEV`]), no host IOMMU group
/// is split across P2P domains, and there are clique ids for every group
/// with NVIDIA members. Run after [`check_device_dirs`], so the paths are PCI
/// device directories.
pub(super) fn check_p2p_host(vm: &VmConfig, dev_root: &Path) -> Result<(), ConfigError> {
    for group in &vm.p2p_groups {
        let (node, needs) = match group.mode {
            P2pMode::Dmabuf => ("iommu", "iommufd (/dev/iommu, CONFIG_IOMMUFD)"),
            P2pMode::Legacy => (
                "vfio/vfio",
                "the VFIO type1 container (/dev/vfio/vfio, CONFIG_VFIO_CONTAINER)",
            ),
            P2pMode::Auto | P2pMode::Off => continue,
        };
        if !dev_root.join(node).exists() {
            return Err(ConfigError::GroupModeUnsupported {
                group: group.name.clone(),
                mode: group.mode,
                needs,
            });
        }
    }
    check_iommu_groups(vm)?;
    vm.group_cliques(&host_vendor).map(drop)
}

/// Two functions of one host IOMMU group must be in one P2P domain: the host
/// IOMMU cannot tell their DMA apart, so splitting them would promise an
/// isolation that does not exist (and type1 refuses to split a group across
/// containers). A device in no group is a domain of its own, so it may share
/// its host group with nobody. A device without an `iommu_group` link (no
/// host IOMMU) is left to VFIO to refuse.
fn check_iommu_groups(vm: &VmConfig) -> Result<(), ConfigError> {
    let group_name = |id: &str| vm.group_of(id).map(|g| g.name.clone());
    let same_domain = |a: &str, b: &str| match (group_name(a), group_name(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    };
    let mut seen: Vec<(String, &DeviceConfig)> = Vec::with_capacity(vm.devices.len());
    for device in &vm.devices {
        let Some(host_group) = host_iommu_group(&device.path) else {
            continue;
        };
        if let Some((_, other)) = seen
            .iter()
            .find(|(g, other)| *g == host_group && !same_domain(&other.id, &device.id))
        {
            return Err(ConfigError::IommuGroupSplit {
                device: device.id.clone(),
                group: group_name(&device.id),
                other: other.id.clone(),
                other_group: group_name(&other.id),
                host_group,
            });
        }
        seen.push((host_group, device));
    }
    Ok(())
}

/// The host IOMMU group number of a PCI device directory: the name its
/// `iommu_group` link points at (`../../kernel/iommu_groups/7`).
fn host_iommu_group(path: &Path) -> Option<String> {
    let link = fs::read_link(path.join("iommu_group")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// The PCI vendor id of a device's host function, from its sysfs `vendor`
/// file (`0x10de`); `None` if it cannot be read. The vendor source for
/// [`VmConfig::clique_of`] on a real host.
pub fn host_vendor(device: &DeviceConfig) -> Option<u16> {
    let text = fs::read_to_string(device.path.join("vendor")).ok()?;
    let text = text.trim();
    let hex = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u16::from_str_radix(hex, 16).ok()
}

fn path_error(device: &DeviceConfig, reason: String) -> ConfigError {
    invalid(device, "path", format!("{:?}", device.path), reason)
}

fn invalid(
    device: &DeviceConfig,
    field: &'static str,
    value: String,
    reason: String,
) -> ConfigError {
    ConfigError::InvalidDevice {
        device: format!("device {}", device.id),
        field,
        value,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{
        GroupTopology, IommuBackendKind, KernelDecompress, P2pGroupConfig, SlotZap, NVIDIA_VENDOR,
    };
    use super::*;

    fn device(id: &str, path: impl Into<PathBuf>) -> DeviceConfig {
        DeviceConfig {
            id: id.into(),
            path: path.into(),
            backend: None,
            placement: Placement::RootPort,
            clique: None,
        }
    }

    fn rules_error(devices: &[DeviceConfig]) -> String {
        check_device_rules(devices).unwrap_err().to_string()
    }

    /// A fake `/sys/bus/pci/devices` in a temp dir, removed on drop.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("p2pvmm-cfg-sysfs-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            FakeSysfs(dir)
        }

        /// A device directory with `files` in it.
        fn add(&self, bdf: &str, files: &[&str]) -> PathBuf {
            let dir = self.0.join(bdf);
            fs::create_dir_all(&dir).unwrap();
            for file in files {
                fs::write(dir.join(file), "0x1af4\n").unwrap();
            }
            dir
        }

        /// A PCI device directory in host IOMMU group `group` (`None`: no IOMMU).
        fn add_in_group(&self, bdf: &str, group: Option<u32>) -> PathBuf {
            let dir = self.add(bdf, &["vendor", "device"]);
            if let Some(group) = group {
                let target = self.0.join(format!("kernel/iommu_groups/{group}"));
                fs::create_dir_all(&target).unwrap();
                std::os::unix::fs::symlink(&target, dir.join("iommu_group")).unwrap();
            }
            dir
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn distinct_devices_pass() {
        let mut devices = vec![
            device("gpu0", "/sys/bus/pci/devices/0000:00:03.0"),
            device("nvme_1", "/sys/bus/pci/devices/0000:00:04.0"),
        ];
        devices[1].backend = Some(IommuBackendKind::Iommufd);
        devices[1].placement = Placement::Switch("sw-0".into());
        assert!(check_device_rules(&devices).is_ok());
        assert!(check_device_rules(&[]).is_ok());
    }

    #[test]
    fn ids_must_be_unique_names() {
        let a = device("gpu0", "/sys/bus/pci/devices/0000:00:03.0");
        let b = device("gpu0", "/sys/bus/pci/devices/0000:00:04.0");
        assert_eq!(
            rules_error(&[a.clone(), b]),
            r#"device[1]: id = "gpu0": already used by device[0]"#
        );
        assert_eq!(
            rules_error(&[device("", "/x")]),
            r#"device[0]: id = "": must not be empty"#
        );
        assert_eq!(
            rules_error(&[a, device("gpu 1", "/y")]),
            r#"device[1]: id = "gpu 1": ' ' is not allowed (use letters, digits, '_' and '-')"#
        );
    }

    #[test]
    fn paths_must_be_unique() {
        let path = "/sys/bus/pci/devices/0000:00:03.0";
        assert_eq!(
            rules_error(&[device("a", path), device("b", path)]),
            r#"device b: path = "/sys/bus/pci/devices/0000:00:03.0": already used by device a"#
        );
    }

    #[test]
    fn switch_names_are_checked() {
        let mut d = device("a", "/x");
        d.placement = Placement::Switch("sw.0".into());
        assert_eq!(
            rules_error(&[d]),
            r#"device a: switch = "sw.0": '.' is not allowed (use letters, digits, '_' and '-')"#
        );
    }

    #[test]
    fn devices_in_different_domains_may_use_different_backends() {
        let mut devices = vec![device("a", "/a"), device("b", "/b")];
        devices[0].backend = Some(IommuBackendKind::Legacy);
        devices[1].backend = Some(IommuBackendKind::Iommufd);
        // Each ungrouped device is an IOMMU address space of its own.
        assert!(check_device_rules(&devices).is_ok());
    }

    #[test]
    fn device_dirs_need_pci_attributes() {
        let sysfs = FakeSysfs::new("attrs");
        let good = sysfs.add("0000:00:03.0", &["vendor", "device", "config"]);
        let no_device = sysfs.add("0000:00:04.0", &["vendor"]);
        let missing = sysfs.0.join("0000:00:05.0");
        let file = sysfs.0.join("0000:00:03.0/vendor");

        assert!(check_device_dirs(&[device("a", &good)]).is_ok());
        let err = |path: &Path| {
            check_device_dirs(&[device("a", &good), device("b", path)])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&no_device),
            format!("device b: path = {no_device:?}: not a PCI device directory (it has no device file)")
        );
        assert_eq!(
            err(&missing),
            format!("device b: path = {missing:?}: no such device (lspci -D lists the host's PCI addresses)")
        );
        assert_eq!(
            err(&file),
            format!("device b: path = {file:?}: not a directory (expected /sys/bus/pci/devices/DOMAIN:BUS:DEVICE.FUNCTION)")
        );
    }

    #[test]
    fn one_device_by_two_paths_is_a_duplicate() {
        let sysfs = FakeSysfs::new("alias");
        let real = sysfs.add("0000:00:03.0", &["vendor", "device"]);
        let alias = sysfs.0.join("alias");
        std::os::unix::fs::symlink(&real, &alias).unwrap();
        let msg = check_device_dirs(&[device("a", &real), device("b", &alias)])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!("device b: path = {alias:?}: same device as a (")),
            "{msg}"
        );
    }

    fn group(name: &str, members: &[&str], mode: P2pMode) -> P2pGroupConfig {
        P2pGroupConfig {
            name: name.into(),
            devices: members.iter().map(|m| m.to_string()).collect(),
            mode,
            topology: GroupTopology::Switch,
            slots: 0,
        }
    }

    /// A VM of `devices` and `groups`; only what the P2P checks read matters.
    fn vm(devices: Vec<DeviceConfig>, groups: Vec<P2pGroupConfig>) -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: String::new(),
            cpus: 1,
            memory: super::super::MemoryConfig::of_size(super::super::ByteSize(512 << 20)),
            serial: Default::default(),
            mmio64_size: None,
            kernel_decompress: KernelDecompress::Host,
            slot_zap: SlotZap::All,
            devices,
            p2p_groups: groups,
        }
    }

    #[test]
    fn host_iommu_groups_must_not_be_split_across_domains() {
        let sysfs = FakeSysfs::new("iommu-groups");
        let a = device("a", sysfs.add_in_group("0000:00:03.0", Some(7)));
        let b = device("b", sysfs.add_in_group("0000:00:04.0", Some(7)));
        let c = device("c", sysfs.add_in_group("0000:00:05.0", Some(8)));
        let d = device("d", sysfs.add_in_group("0000:00:06.0", None));
        let dev = sysfs.0.join("dev");
        let devices = vec![a, b, c, d];
        let check = |groups: Vec<P2pGroupConfig>| {
            check_p2p_host(&vm(devices.clone(), groups), &dev).map_err(|e| e.to_string())
        };
        let auto = P2pMode::Auto;
        assert_eq!(check(vec![group("g0", &["a", "b"], auto)]), Ok(()));
        assert_eq!(
            check(vec![
                group("g0", &["a"], auto),
                group("g1", &["b", "c"], auto)
            ]),
            Err(
                "device b (group g1) and device a (group g0) share host IOMMU group 7: the host \
                 IOMMU cannot isolate them from each other, put both in the same P2P group"
                    .into()
            )
        );
        assert_eq!(
            check(vec![group("g0", &["a"], auto)]),
            Err(
                "device b (no group) and device a (group g0) share host IOMMU group 7: the host \
                 IOMMU cannot isolate them from each other, put both in the same P2P group"
                    .into()
            )
        );
        // Ungrouped devices are a domain each, so two of them may not share a host group.
        assert!(matches!(
            check_p2p_host(&vm(devices.clone(), vec![]), &dev),
            Err(ConfigError::IommuGroupSplit { device, other, group: None, other_group: None, host_group })
                if device == "b" && other == "a" && host_group == "7"
        ));
        // Alone in its host group, or without an IOMMU (VFIO's to refuse): fine anywhere.
        assert_eq!(check(vec![group("g0", &["a", "b", "d"], auto)]), Ok(()));
    }

    #[test]
    fn modes_need_their_kernel_interface() {
        let sysfs = FakeSysfs::new("dev-nodes");
        let devices = vec![device("a", sysfs.add_in_group("0000:00:03.0", Some(1)))];
        let dev = sysfs.0.join("dev");
        fs::create_dir_all(&dev).unwrap();
        let check =
            |mode| check_p2p_host(&vm(devices.clone(), vec![group("g0", &["a"], mode)]), &dev);
        assert_eq!(
            check(P2pMode::Dmabuf).unwrap_err().to_string(),
            r#"p2p_group g0: mode = "dmabuf": needs iommufd (/dev/iommu, CONFIG_IOMMUFD), which this host does not have"#
        );
        assert_eq!(
            check(P2pMode::Legacy).unwrap_err().to_string(),
            r#"p2p_group g0: mode = "legacy": needs the VFIO type1 container (/dev/vfio/vfio, CONFIG_VFIO_CONTAINER), which this host does not have"#
        );
        assert!(check(P2pMode::Auto).is_ok());
        assert!(check(P2pMode::Off).is_ok());
        fs::write(dev.join("iommu"), "").unwrap();
        fs::create_dir_all(dev.join("vfio")).unwrap();
        fs::write(dev.join("vfio/vfio"), "").unwrap();
        assert!(check(P2pMode::Dmabuf).is_ok());
        assert!(check(P2pMode::Legacy).is_ok());
    }

    #[test]
    fn vendor_is_read_from_sysfs() {
        let sysfs = FakeSysfs::new("vendor");
        let dir = sysfs.add("0000:00:03.0", &["vendor"]);
        assert_eq!(host_vendor(&device("a", &dir)), Some(0x1af4));
        fs::write(dir.join("vendor"), "0x10de\n").unwrap();
        assert_eq!(host_vendor(&device("a", &dir)), Some(NVIDIA_VENDOR));
        fs::write(dir.join("vendor"), "nvidia\n").unwrap();
        assert_eq!(host_vendor(&device("a", &dir)), None);
        assert_eq!(host_vendor(&device("b", sysfs.0.join("nope"))), None);
    }

    #[test]
    fn validation_counts_nvidia_groups_from_sysfs() {
        let sysfs = FakeSysfs::new("cliques");
        let dev = sysfs.0.join("dev");
        let mut devices = Vec::new();
        let mut groups = Vec::new();
        for i in 0..17 {
            let dir = sysfs.add_in_group(&format!("0000:00:{:02x}.0", i + 1), Some(i));
            fs::write(dir.join("vendor"), "0x10de\n").unwrap();
            let id = format!("gpu{i}");
            groups.push(group(&format!("g{i}"), &[&id], P2pMode::Auto));
            devices.push(device(&id, dir));
        }
        let err = check_p2p_host(&vm(devices.clone(), groups.clone()), &dev).unwrap_err();
        assert!(
            matches!(&err, ConfigError::TooManyCliques { group, clique: 16 } if group == "g16"),
            "{err}"
        );
        // With P2P off, the 17th group needs no clique id.
        groups[16].mode = P2pMode::Off;
        assert!(check_p2p_host(&vm(devices, groups), &dev).is_ok());
    }

    #[test]
    fn cliques_out_of_range_are_device_errors() {
        let mut d = device("a", "/a");
        d.clique = Some(16);
        assert_eq!(
            rules_error(&[d]),
            "device a: clique = 16: out of range (use 0 to 15)"
        );
    }
}
