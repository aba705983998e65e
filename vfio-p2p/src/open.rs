//! Opening a host PCI device for assignment: viability checks on sysfs first, then the cdev
//! flow (iommufd) or the group flow (legacy container).
//!
//! The kernel's own refusals are terse (`EBUSY`, `EINVAL`, "group not viable"), so before
//! touching `/dev` we read sysfs and turn the usual mistakes into errors that name the device
//! and say what to do: wrong driver, a group member bound to a host driver, IOMMU off, no cdev
//! support. The sysfs part is plain file reads and is tested against a fake tree.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_ioctls::{VfioDevice, VfioError, VfioOps};

use crate::bdf::Bdf;
use crate::device::{DeviceKey, HostPciDevice};
use crate::iommu::{BackendKind, VfioBackend};
use crate::iommufd::Iommufd;
use crate::type1::Type1;

/// A device in the same IOMMU group that keeps the group from being assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupBlocker {
    /// Its sysfs name (normally a BDF).
    pub device: String,
    pub driver: String,
}

/// The blockers of a group, printed as a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupBlockers(pub Vec<GroupBlocker>);

impl fmt::Display for GroupBlockers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("the kernel reports it not viable");
        }
        for (i, b) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{} is bound to {}", b.device, b.driver)?;
        }
        Ok(())
    }
}

fn describe_driver(driver: &Option<String>) -> String {
    match driver {
        Some(d) => format!("it is bound to {d}"),
        None => "it has no driver".to_string(),
    }
}

/// Why a host device could not be opened; every variant names the device.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("attaching {bdf} to IOAS {ioas}: {source}")]
    AttachIoas {
        bdf: Bdf,
        ioas: u32,
        #[source]
        source: io::Error,
    },
    #[error("binding {bdf} to /dev/iommu: {source}")]
    BindIommufd {
        bdf: Bdf,
        #[source]
        source: io::Error,
    },
    #[error("{bdf} is busy ({path} is already open, by another VMM or a driver in this process)")]
    Busy { bdf: Bdf, path: PathBuf },
    #[error("reading the VFIO device info of {bdf}: {source}")]
    DeviceInfo {
        bdf: Bdf,
        #[source]
        source: io::Error,
    },
    #[error(
        "IOMMU group {group} of {bdf} is not viable: {blockers}; unbind those devices or bind \
         them to vfio-pci too"
    )]
    GroupNotViable {
        bdf: Bdf,
        group: u32,
        blockers: GroupBlockers,
    },
    #[error(
        "the host cannot isolate interrupts of {bdf} (no interrupt remapping), so the kernel \
         refused it; if that is acceptable, boot the host with iommufd.allow_unsafe_interrupts=1 \
         and vfio_iommu_type1.allow_unsafe_interrupts=1"
    )]
    InterruptIsolation { bdf: Bdf },
    #[error("{path} is not a PCI device directory (expected /sys/bus/pci/devices/DDDD:BB:DD.F)")]
    InvalidPath { path: PathBuf },
    #[error(
        "{bdf} has no VFIO device cdev (no vfio-dev/vfioN in sysfs): the kernel lacks \
         CONFIG_VFIO_DEVICE_CDEV; use backend=legacy"
    )]
    NoCdev { bdf: Bdf },
    #[error("/dev/vfio/{group} (IOMMU group of {bdf}) is missing: is vfio-pci loaded?")]
    NoGroupNode { bdf: Bdf, group: u32 },
    #[error("{bdf} has no IOMMU group: the host IOMMU is off (boot with intel_iommu=on or amd_iommu=on)")]
    NoIommuGroup { bdf: Bdf },
    #[error("no such PCI device: {bdf}")]
    NoSuchDevice { bdf: Bdf },
    #[error("{bdf} is not bound to vfio-pci: {}", describe_driver(.driver))]
    NotBoundToVfio { bdf: Bdf, driver: Option<String> },
    #[error("{bdf} is not a PCI device according to VFIO")]
    NotPci { bdf: Bdf },
    #[error("opening {path} for {bdf}: {source}")]
    Open {
        bdf: Bdf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path} for {bdf}: {source}")]
    Sysfs {
        bdf: Bdf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting up {bdf} in the VFIO container: {source}")]
    Vfio {
        bdf: Bdf,
        #[source]
        source: io::Error,
    },
}

/// What sysfs says about a device that passed the viability checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SysfsDevice {
    pub bdf: Bdf,
    pub dir: PathBuf,
    pub group: u32,
    /// The name of its VFIO cdev (`vfioN`), if the kernel has cdevs.
    pub cdev: Option<String>,
}

/// Drivers that may hold a device in a group we assign: VFIO drivers (vfio-pci and the variant
/// drivers, which all carry "vfio" in their name) and the ones the kernel lets share a group
/// with a user-owned device because they do no DMA (`driver_managed_dma`).
fn driver_allows_assignment(driver: &str) -> bool {
    driver.contains("vfio") || driver == "pci-stub" || driver == "pcieport"
}

/// The last component of a symlink's target, e.g. the driver name of `<dev>/driver`.
fn link_name(link: &Path) -> io::Result<Option<String>> {
    match fs::read_link(link) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads and checks a device's sysfs directory: it exists, it is bound to a VFIO driver, it has
/// an IOMMU group, and every other device of the group is unbound or on an allowed driver.
pub(crate) fn inspect(dir: &Path) -> Result<SysfsDevice, OpenError> {
    let invalid = || OpenError::InvalidPath {
        path: dir.to_path_buf(),
    };
    let bdf: Bdf = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(invalid)?
        .parse()
        .map_err(|_| invalid())?;
    let sysfs = |path: PathBuf| move |source| OpenError::Sysfs { bdf, path, source };
    if !dir.exists() {
        return Err(OpenError::NoSuchDevice { bdf });
    }

    let driver = link_name(&dir.join("driver")).map_err(sysfs(dir.join("driver")))?;
    match &driver {
        Some(d) if d.contains("vfio") => {}
        _ => return Err(OpenError::NotBoundToVfio { bdf, driver }),
    }

    let group = link_name(&dir.join("iommu_group"))
        .map_err(sysfs(dir.join("iommu_group")))?
        .ok_or(OpenError::NoIommuGroup { bdf })?
        .parse::<u32>()
        .map_err(|_| OpenError::NoIommuGroup { bdf })?;

    let members_dir = dir.join("iommu_group").join("devices");
    let members = fs::read_dir(&members_dir).map_err(sysfs(members_dir.clone()))?;
    let mut blockers = Vec::new();
    for member in members {
        let member = member.map_err(sysfs(members_dir.clone()))?;
        let link = member.path().join("driver");
        if let Some(driver) = link_name(&link).map_err(sysfs(link))? {
            if !driver_allows_assignment(&driver) {
                let device = member.file_name().to_string_lossy().into_owned();
                blockers.push(GroupBlocker { device, driver });
            }
        }
    }
    if !blockers.is_empty() {
        blockers.sort_by(|a, b| a.device.cmp(&b.device));
        return Err(OpenError::GroupNotViable {
            bdf,
            group,
            blockers: GroupBlockers(blockers),
        });
    }

    let cdev = match fs::read_dir(dir.join("vfio-dev")) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("vfio")),
        Err(_) => None,
    };
    Ok(SysfsDevice {
        bdf,
        dir: dir.to_path_buf(),
        group,
        cdev,
    })
}

/// An `open()` failure on a `/dev` node, with `EBUSY` made explicit.
fn open_error(bdf: Bdf, path: PathBuf, source: io::Error) -> OpenError {
    match source.raw_os_error() {
        Some(libc::EBUSY) => OpenError::Busy { bdf, path },
        _ => OpenError::Open { bdf, path, source },
    }
}

/// The errors vfio-ioctls reports once the device node is open, with their errno where it kept
/// one. `node` is the cdev or group node, for `EBUSY`.
fn vfio_error(bdf: Bdf, node: &Path, ioas: u32, e: VfioError) -> OpenError {
    let errno = |e: vmm_sys_util::errno::Error| io::Error::from_raw_os_error(e.errno());
    let busy = || OpenError::Busy {
        bdf,
        path: node.to_path_buf(),
    };
    match e {
        VfioError::VfioDeviceBindIommufd(e) | VfioError::ContainerSetIOMMU(e)
            if e.errno() == libc::EPERM =>
        {
            OpenError::InterruptIsolation { bdf }
        }
        VfioError::VfioDeviceBindIommufd(e) | VfioError::GroupGetDeviceFD(e)
            if e.errno() == libc::EBUSY =>
        {
            busy()
        }
        VfioError::VfioDeviceBindIommufd(e) => OpenError::BindIommufd {
            bdf,
            source: errno(e),
        },
        VfioError::VfioDeviceAttachIommufdPt(e) => OpenError::AttachIoas {
            bdf,
            ioas,
            source: errno(e),
        },
        VfioError::OpenGroup(e, _) if e.raw_os_error() == Some(libc::EBUSY) => busy(),
        VfioError::OpenGroup(source, _) => OpenError::Open {
            bdf,
            path: node.to_path_buf(),
            source,
        },
        VfioError::GroupViable => OpenError::GroupNotViable {
            bdf,
            group: group_of(node),
            blockers: GroupBlockers(Vec::new()),
        },
        VfioError::VfioDeviceGetInfo(e) => OpenError::DeviceInfo {
            bdf,
            source: errno(e),
        },
        VfioError::VfioDeviceGetInfoPCI | VfioError::VfioDeviceGetInfoOther => {
            OpenError::NotPci { bdf }
        }
        VfioError::ContainerSetIOMMU(e) | VfioError::GroupGetDeviceFD(e) => OpenError::Vfio {
            bdf,
            source: errno(e),
        },
        other => OpenError::Vfio {
            bdf,
            source: io::Error::other(other),
        },
    }
}

fn group_of(node: &Path) -> u32 {
    node.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl HostPciDevice {
    /// Opens the device at `sysfs_path` (`/sys/bus/pci/devices/DDDD:BB:DD.F`) for assignment
    /// and attaches it to the VM's IOMMU: on iommufd its cdev is bound to `/dev/iommu` and
    /// attached to the VM's IOAS; on type1 its group joins the VM's container.
    ///
    /// All devices of a VM must be opened against the same `backend`, so that they share one
    /// IO address space and can reach each other's BARs.
    pub fn open(sysfs_path: impl AsRef<Path>, backend: &VfioBackend) -> Result<Self, OpenError> {
        let sys = inspect(sysfs_path.as_ref())?;
        match backend {
            VfioBackend::Iommufd(iommufd) => open_cdev(sys, iommufd),
            VfioBackend::Type1(type1) => open_group(sys, type1),
        }
    }
}

/// `/dev/vfio/devices/vfioN`, then `VFIO_DEVICE_BIND_IOMMUFD` and `VFIO_DEVICE_ATTACH_IOMMUFD_PT`
/// (done by `VfioDevice::new_from_fd`). Opening the node ourselves gives us its identity and a
/// clear `EBUSY`.
fn open_cdev(sys: SysfsDevice, iommufd: &Arc<Iommufd>) -> Result<HostPciDevice, OpenError> {
    let bdf = sys.bdf;
    let name = sys.cdev.ok_or(OpenError::NoCdev { bdf })?;
    let node = Path::new("/dev/vfio/devices").join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node)
        .map_err(|e| open_error(bdf, node.clone(), e))?;
    let meta = file.metadata().map_err(|source| OpenError::Open {
        bdf,
        path: node.clone(),
        source,
    })?;
    let key = DeviceKey::Cdev {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let ioas = iommufd.ioas_id();
    let vfio = VfioDevice::new_from_fd(file, iommufd.vfio(), true)
        .map_err(|e| vfio_error(bdf, &node, ioas, e))?;
    HostPciDevice::new(bdf, key, BackendKind::Iommufd, vfio, None)
}

/// `/dev/vfio/<group>`, `VFIO_GROUP_SET_CONTAINER`, `VFIO_SET_IOMMU` (first group only) and
/// `VFIO_GROUP_GET_DEVICE_FD`, all done by `VfioDevice::new` against the VM's container.
fn open_group(sys: SysfsDevice, type1: &Arc<Type1>) -> Result<HostPciDevice, OpenError> {
    let bdf = sys.bdf;
    let node = PathBuf::from(format!("/dev/vfio/{}", sys.group));
    if !node.exists() {
        return Err(OpenError::NoGroupNode {
            bdf,
            group: sys.group,
        });
    }
    let container: Arc<dyn VfioOps> = type1.container();
    let vfio =
        VfioDevice::new(&sys.dir, container, false).map_err(|e| vfio_error(bdf, &node, 0, e))?;
    let key = DeviceKey::Group {
        group: sys.group,
        bdf,
    };
    HostPciDevice::new(bdf, key, BackendKind::Type1, vfio, Some(type1.attach()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A throwaway sysfs-like tree: `devices/<bdf>` with `driver`, `iommu_group` and optional
    /// `vfio-dev/vfioN`, groups under `groups/<n>/devices`.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "vfio-p2p-sysfs-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            fs::create_dir_all(root.join("devices")).unwrap();
            Self(root)
        }

        fn device(
            &self,
            bdf: &str,
            driver: Option<&str>,
            group: Option<u32>,
            cdev: bool,
        ) -> PathBuf {
            let dir = self.0.join("devices").join(bdf);
            fs::create_dir_all(&dir).unwrap();
            if let Some(d) = driver {
                let target = self.0.join("drivers").join(d);
                fs::create_dir_all(&target).unwrap();
                symlink(target, dir.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = self.0.join("groups").join(g.to_string());
                fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&gdir, dir.join("iommu_group")).unwrap();
                symlink(&dir, gdir.join("devices").join(bdf)).unwrap();
            }
            if cdev {
                fs::create_dir_all(dir.join("vfio-dev").join("vfio3")).unwrap();
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
    fn a_lone_vfio_device_passes_and_reports_its_group_and_cdev() {
        let sys = FakeSysfs::new();
        let dir = sys.device("0000:00:03.0", Some("vfio-pci"), Some(5), true);

        let found = inspect(&dir).unwrap();

        assert_eq!(found.bdf.to_string(), "0000:00:03.0");
        assert_eq!(found.group, 5);
        assert_eq!(found.cdev.as_deref(), Some("vfio3"));
    }

    #[test]
    fn a_missing_device_is_named() {
        let sys = FakeSysfs::new();

        let err = inspect(&sys.0.join("devices/0000:00:09.0")).unwrap_err();

        assert_eq!(err.to_string(), "no such PCI device: 0000:00:09.0");
    }

    #[test]
    fn a_path_that_is_not_a_bdf_is_rejected() {
        let err = inspect(Path::new("/sys/class/net/eth0")).unwrap_err();

        assert!(matches!(err, OpenError::InvalidPath { .. }));
    }

    #[test]
    fn a_device_on_a_host_driver_reports_that_driver() {
        let sys = FakeSysfs::new();
        let dir = sys.device("0000:00:03.0", Some("e1000e"), Some(5), false);

        let err = inspect(&dir).unwrap_err();

        assert!(matches!(&err, OpenError::NotBoundToVfio { driver: Some(d), .. } if d == "e1000e"));
        assert_eq!(
            err.to_string(),
            "0000:00:03.0 is not bound to vfio-pci: it is bound to e1000e"
        );
    }

    #[test]
    fn an_unbound_device_says_it_has_no_driver() {
        let sys = FakeSysfs::new();
        let dir = sys.device("0000:00:03.0", None, Some(5), false);

        let err = inspect(&dir).unwrap_err();

        assert!(err.to_string().ends_with("it has no driver"));
    }

    #[test]
    fn a_variant_vfio_driver_is_accepted() {
        let sys = FakeSysfs::new();
        let dir = sys.device("0000:01:00.0", Some("nvgrace_gpu_vfio_pci"), Some(9), true);

        assert!(inspect(&dir).is_ok());
    }

    #[test]
    fn no_iommu_group_means_the_iommu_is_off() {
        let sys = FakeSysfs::new();
        let dir = sys.device("0000:00:03.0", Some("vfio-pci"), None, false);

        assert!(matches!(
            inspect(&dir).unwrap_err(),
            OpenError::NoIommuGroup { .. }
        ));
    }

    #[test]
    fn a_group_member_on_a_host_driver_makes_the_group_not_viable() {
        let sys = FakeSysfs::new();
        let dir = sys.device("0000:00:03.0", Some("vfio-pci"), Some(7), true);
        sys.device("0000:00:03.1", Some("snd_hda_intel"), Some(7), false);
        sys.device("0000:00:03.2", None, Some(7), false);
        sys.device("0000:00:01.0", Some("pcieport"), Some(7), false);

        let err = inspect(&dir).unwrap_err();

        assert_eq!(
            err.to_string(),
            "IOMMU group 7 of 0000:00:03.0 is not viable: 0000:00:03.1 is bound to \
             snd_hda_intel; unbind those devices or bind them to vfio-pci too"
        );
    }

    #[test]
    fn ebusy_on_open_becomes_busy() {
        let bdf: Bdf = "0000:00:03.0".parse().unwrap();

        let err = open_error(
            bdf,
            "/dev/vfio/5".into(),
            io::Error::from_raw_os_error(libc::EBUSY),
        );

        assert!(matches!(err, OpenError::Busy { .. }));
    }

    #[test]
    fn eperm_on_bind_is_about_interrupt_isolation() {
        let bdf: Bdf = "0000:00:03.0".parse().unwrap();
        let e = VfioError::VfioDeviceBindIommufd(vmm_sys_util::errno::Error::new(libc::EPERM));

        let err = vfio_error(bdf, Path::new("/dev/vfio/devices/vfio0"), 1, e);

        assert!(matches!(err, OpenError::InterruptIsolation { .. }));
    }
}
