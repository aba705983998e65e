//! PCI sysfs plumbing: find a function by its IDs, turn on VFIO's no-IOMMU mode, bind vfio-pci,
//! find the noiommu group node, resolve/enable a peer BAR, and map a BAR through its sysfs
//! resource file.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::{Fail, Result};

const PCI_DEVICES: &str = "/sys/bus/pci/devices";

fn dev_path(bdf: &str) -> PathBuf {
    Path::new(PCI_DEVICES).join(bdf)
}

fn read_trim(p: &Path) -> Result<String> {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| Fail::io(format!("read {}", p.display()), e))
}

fn write_str(p: &Path, s: &str) -> Result<()> {
    fs::write(p, s).map_err(|e| Fail::io(format!("write '{s}' to {}", p.display()), e))
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// (vendor, device) of a PCI function.
pub fn ids(bdf: &str) -> Result<(u16, u16)> {
    let d = dev_path(bdf);
    let get = |name: &str| -> Result<u16> {
        let p = d.join(name);
        let s = read_trim(&p)?;
        parse_hex(&s)
            .and_then(|v| u16::try_from(v).ok())
            .ok_or_else(|| {
                Fail::msg(
                    format!("parse {}", p.display()),
                    format!("'{s}' is not a 16-bit hex id"),
                )
            })
    };
    Ok((get("vendor")?, get("device")?))
}

/// BDF of the first function with these IDs (sorted, so the choice is stable).
pub fn find_device(vendor: u16, device: u16) -> Result<String> {
    let rd = fs::read_dir(PCI_DEVICES).map_err(|e| Fail::io(format!("list {PCI_DEVICES}"), e))?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .find(|b| ids(b).is_ok_and(|i| i == (vendor, device)))
        .ok_or_else(|| {
            Fail::msg(
                "find device",
                format!("no PCI device {vendor:04x}:{device:04x} in {PCI_DEVICES}"),
            )
        })
}

/// Name of the driver bound to `bdf`, if any.
pub fn driver(bdf: &str) -> Option<String> {
    fs::read_link(dev_path(bdf).join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Turn on `enable_unsafe_noiommu_mode` (vfio built in or as a module); returns the
/// parameter's path.
pub fn enable_noiommu() -> Result<PathBuf> {
    let mut path = PathBuf::from("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode");
    if !path.exists() {
        // Older kernels and some configs keep it under another module name.
        let found = fs::read_dir("/sys/module")
            .map_err(|e| Fail::io("list /sys/module", e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("parameters/enable_unsafe_noiommu_mode"))
            .find(|p| p.exists());
        path = found.ok_or_else(|| {
            Fail::msg(
                "enable no-IOMMU mode",
                "no enable_unsafe_noiommu_mode parameter (kernel lacks CONFIG_VFIO_NOIOMMU)",
            )
        })?;
    }
    if read_trim(&path)? != "Y" {
        write_str(&path, "1")?;
        let now = read_trim(&path)?;
        if now != "Y" {
            return Err(Fail::msg(
                "enable no-IOMMU mode",
                format!("{} reads '{now}' after writing 1", path.display()),
            ));
        }
    }
    Ok(path)
}

/// Bind `bdf` to vfio-pci (driver_override + drivers_probe) unless it already is.
pub fn bind_vfio_pci(bdf: &str) -> Result<()> {
    let d = dev_path(bdf);
    let cur = driver(bdf);
    if cur.as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    write_str(&d.join("driver_override"), "vfio-pci")?;
    if let Some(drv) = &cur {
        write_str(&d.join("driver/unbind"), bdf)
            .map_err(|f| f.context(format!("unbind from {drv}")))?;
    }
    write_str(Path::new("/sys/bus/pci/drivers_probe"), bdf).map_err(|f| {
        f.context("vfio-pci probe failed (see dmesg; without an IOMMU it needs no-IOMMU mode)")
    })?;
    match driver(bdf) {
        Some(n) if n == "vfio-pci" => Ok(()),
        other => Err(Fail::msg(
            "bind vfio-pci",
            format!("{bdf} is bound to {other:?} after drivers_probe"),
        )),
    }
}

/// Maps BAR `bar` of `bdf` through its sysfs `resourceN` file: the CPU's view of the BAR at the
/// address the kernel assigned, whichever driver owns the function (here: to watch the MSI-X
/// table the kernel programs).
pub fn map_resource(bdf: &str, bar: usize) -> Result<crate::guest::vfio::Mapping> {
    let path = dev_path(bdf).join(format!("resource{bar}"));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Fail::io(format!("open {}", path.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| Fail::io(format!("stat {}", path.display()), e))?
        .len();
    // The mapping stays valid after the file is closed.
    crate::guest::vfio::Mapping::new(
        std::os::fd::AsRawFd::as_raw_fd(&file),
        0,
        size,
        &format!("mmap {}", path.display()),
    )
}

/// `/dev/vfio/noiommu-N` of `bdf`'s group, waiting up to 2 s for devtmpfs to show it.
pub fn noiommu_group_node(bdf: &str) -> Result<String> {
    let link = dev_path(bdf).join("iommu_group");
    let target =
        fs::read_link(&link).map_err(|e| Fail::io(format!("readlink {}", link.display()), e))?;
    let n = target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .ok_or_else(|| Fail::msg("iommu group", format!("odd link {}", target.display())))?;
    let node = format!("/dev/vfio/noiommu-{n}");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        if Path::new(&node).exists() {
            return Ok(node);
        }
        if Path::new(&format!("/dev/vfio/{n}")).exists() {
            return Err(Fail::msg(
                "iommu group",
                format!("{bdf} is in group /dev/vfio/{n} behind a real IOMMU; only no-IOMMU mode is supported"),
            ));
        }
        sleep(Duration::from_millis(20));
    }
    Err(Fail::msg("iommu group", format!("{node} did not appear")))
}

/// The function's interrupt line as the kernel assigned it (`irq N`), for messages.
pub fn irq_line(bdf: &str) -> String {
    match read_trim(&dev_path(bdf).join("irq")) {
        Ok(irq) => format!("irq {irq}"),
        Err(f) => f.to_string(),
    }
}

/// The `/proc/interrupts` line of the interrupt named `name` (e.g. `vfio-intx(0000:03:00.0)`),
/// whitespace collapsed: shows the controller, input and trigger (`IO-APIC 18-fasteoi`).
pub fn interrupts_line(name: &str) -> Option<String> {
    let text = fs::read_to_string("/proc/interrupts").ok()?;
    let line = text.lines().find(|l| l.contains(name))?;
    Some(line.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Resolve BAR `bar` of `bdf` to its bus address (= physical address without an IOMMU) and
/// size, and make sure the device decodes memory so the BAR answers DMA. Returns (addr, size).
pub fn peer_bar(bdf: &str, bar: usize) -> Result<(u64, u64)> {
    let d = dev_path(bdf);
    let res = read_trim(&d.join("resource"))?;
    let line = res
        .lines()
        .nth(bar)
        .ok_or_else(|| Fail::msg("peer BAR", format!("{bdf} has no BAR {bar}")))?;
    let f: Vec<u64> = line.split_whitespace().filter_map(parse_hex).collect();
    let (start, end, flags) = match f[..] {
        [s, e, fl] => (s, e, fl),
        _ => {
            return Err(Fail::msg(
                "peer BAR",
                format!("cannot parse resource line '{line}'"),
            ))
        }
    };
    if start == 0 || end < start || flags & 0x200 == 0 {
        return Err(Fail::msg(
            "peer BAR",
            format!("{bdf} BAR {bar} is not an assigned memory BAR ('{line}')"),
        ));
    }
    // Memory Space Enable in the command register: a device without a driver may have it off.
    let cfg_path = d.join("config");
    let cfg = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cfg_path)
        .map_err(|e| Fail::io(format!("open {}", cfg_path.display()), e))?;
    let mut b = [0u8; 2];
    cfg.read_exact_at(&mut b, 4)
        .map_err(|e| Fail::io(format!("read {} command", cfg_path.display()), e))?;
    let cmd = u16::from_le_bytes(b);
    if cmd & 0x2 == 0 {
        cfg.write_all_at(&(cmd | 0x2).to_le_bytes(), 4)
            .map_err(|e| {
                Fail::io(
                    format!("enable memory decoding in {}", cfg_path.display()),
                    e,
                )
            })?;
    }
    Ok((start, end - start + 1))
}
