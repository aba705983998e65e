//! Checks of the passthrough device list, part of [`super::VmConfig::validate`].
//!
//! The rules between devices (ids, paths, switch names)
//! are pure; only [`check_device_dirs`] looks at the host, and only at the
//! configured paths, so tests can point devices at a fake sysfs in a temp
//! dir. Driver binding and IOMMU groups are deliberately not checked here:
//! the VFIO layer opens the device anyway and can say more precisely what
//! is wrong.

use std::fs;
use std::io;
use std::path::PathBuf;

use super::device::SYSFS_PCI_DEVICES;
use super::{ConfigError, DeviceConfig, Placement};

/// Files every PCI function's sysfs directory has; a directory without
/// them is not a PCI device (e.g. a typo that names the bus directory).
const PCI_ATTRIBUTES: [&str; 2] = ["vendor", "device"];

/// Checks the rules that involve no file system: id and switch names,
/// unique ids and paths, and a single IOMMU backend.
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

    use super::super::IommuBackendKind;
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
}
