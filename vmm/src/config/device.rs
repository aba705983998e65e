//! VFIO passthrough devices: `[[device]]` tables in the file and repeatable
//! `--device KEY=VALUE,...` flags.
//!
//! Both spellings are funnelled through one raw record, so a device means the
//! same thing in either source and is checked by the same code: the path is
//! normalised (a bare PCI address becomes its sysfs directory) and the
//! `placement`/`switch` pair is resolved into one [`Placement`]. Ids may be
//! left out; they default to `dev<N>` by position in the merged list, and a
//! placement left out comes from the device's P2P group, which only the merged
//! config knows: that is why entries stay [`DeviceEntry`] (id and placement
//! optional) until [`super::layer::PartialConfig::finish`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::p2p_group::{group_placement, P2pGroupConfig};

/// Where sysfs lists PCI functions; a bare address such as `0000:00:03.0`
/// stands for the directory of that name here.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// The keys of a `--device` flag (and of a `[[device]]` table), in the
/// order the help text lists them.
const KEYS: &str = "path, id, backend, placement or switch, clique";

/// Largest GPUDirect P2P clique id: the capability has 4 bits for it.
pub(super) const MAX_CLIQUE: u8 = 15;

/// Kernel interface through which the VMM maps guest memory for device DMA.
///
/// Written `iommufd` or `legacy` (case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IommuBackendKind {
    /// `/dev/iommu` with VFIO device cdevs (`/dev/vfio/devices/vfioN`),
    /// Linux 6.2 and later.
    Iommufd,
    /// The VFIO container and group files (`/dev/vfio/vfio`, `/dev/vfio/N`).
    Legacy,
}

/// Why a backend string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown IOMMU backend {0:?} (use iommufd or legacy)")]
pub struct ParseBackendError(String);

impl FromStr for IommuBackendKind {
    type Err = ParseBackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("iommufd") {
            Ok(Self::Iommufd)
        } else if s.eq_ignore_ascii_case("legacy") {
            Ok(Self::Legacy)
        } else {
            Err(ParseBackendError(s.to_string()))
        }
    }
}

impl fmt::Display for IommuBackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Iommufd => "iommufd",
            Self::Legacy => "legacy",
        })
    }
}

impl Serialize for IommuBackendKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IommuBackendKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(BackendVisitor)
    }
}

/// Answers a wrong value or type with the accepted spellings, like the
/// `--device backend=` error does.
struct BackendVisitor;

impl de::Visitor<'_> for BackendVisitor {
    type Value = IommuBackendKind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#""iommufd" or "legacy""#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<IommuBackendKind, E> {
        v.parse().map_err(E::custom)
    }
}

/// Where the device sits in the guest's PCI hierarchy.
///
/// Written `placement = "root-port"` (the default) or `"root"`, or
/// `switch = "NAME"` instead of `placement`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Placement {
    /// Directly on the root bus, as an integrated endpoint; no PCIe port of
    /// its own.
    Root,
    /// Behind a PCIe root port of its own, as in a typical server.
    #[default]
    RootPort,
    /// Behind a downstream port of the named virtual PCIe switch; devices
    /// under the same switch reach each other without going through the
    /// root complex.
    Switch(String),
}

const ROOT: &str = "root";
const ROOT_PORT: &str = "root-port";

/// A device as given in one source: like [`DeviceConfig`] but the id may
/// still be missing. The placement/switch pair and the path are already
/// resolved, so only the id is left for [`finish`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawDevice")]
pub(super) struct DeviceEntry {
    /// See [`DeviceConfig::id`]; `None` means "`dev<N>` by position".
    pub id: Option<String>,
    /// See [`DeviceConfig::path`].
    pub path: PathBuf,
    /// See [`DeviceConfig::backend`].
    pub backend: Option<IommuBackendKind>,
    /// See [`DeviceConfig::placement`]; `None`: not given (the device's P2P group, if any,
    /// decides, else root-port).
    pub placement: Option<Placement>,
    /// See [`DeviceConfig::clique`].
    pub clique: Option<u8>,
}

/// One host PCI function passed through to the guest with VFIO.
///
/// In TOML an array of tables:
///
/// ```toml
/// [[device]]
/// id = "gpu0"                                # default dev<N>, N = position from 0
/// path = "/sys/bus/pci/devices/0000:00:03.0" # or just "0000:00:03.0"
/// backend = "iommufd"                        # or "legacy"; default: iommufd if /dev/iommu exists
/// placement = "root-port"                    # or "root"; or switch = "sw0" instead;
///                                            # default: the P2P group's topology, else root-port
/// clique = 0                                 # GPUDirect P2P clique id, 0-15
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "RawDevice")]
pub struct DeviceConfig {
    /// Name in logs and errors, unique within the VM: letters, digits, `_`
    /// and `-`. Default `dev<N>`, N being the position in the device list
    /// (file devices first, then `--device` flags), from 0.
    pub id: String,
    /// The function's sysfs directory, `/sys/bus/pci/devices/<BDF>`. A bare
    /// PCI address (`0000:00:03.0` or `00:03.0`) is normalised to it.
    pub path: PathBuf,
    /// IOMMU interface, if chosen explicitly. It is the backend of the
    /// device's P2P domain (its group, or the device alone), so the members of
    /// one group must agree; devices in different domains may differ.
    pub backend: Option<IommuBackendKind>,
    /// Position in the guest's PCI hierarchy: as given, else as the device's P2P group's
    /// topology says, else root-port.
    pub placement: Placement,
    /// NVIDIA GPUDirect P2P clique id (0-15) the guest sees in a vendor
    /// capability, if given explicitly; see [`super::VmConfig::clique_of`] for
    /// the default.
    pub clique: Option<u8>,
}

/// Default id of the device at `index` in the merged list.
pub(super) fn default_id(index: usize) -> String {
    format!("dev{index}")
}

/// The record both sources are read into: the TOML table schema, and what
/// `--device` fills in key by key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backend: Option<IommuBackendKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    placement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    switch: Option<String>,
    /// Wider than the u8 it becomes, so 300 or -1 get the same range error
    /// as 16 rather than serde's "expected u8".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clique: Option<i64>,
}

impl TryFrom<RawDevice> for DeviceEntry {
    type Error = String;

    fn try_from(raw: RawDevice) -> Result<Self, String> {
        Ok(DeviceEntry {
            path: device_path(&raw.path)?,
            placement: placement(raw.placement.as_deref(), raw.switch)?,
            clique: clique(raw.id.as_deref(), raw.clique)?,
            id: raw.id,
            backend: raw.backend,
        })
    }
}

impl From<DeviceConfig> for RawDevice {
    fn from(device: DeviceConfig) -> Self {
        let (placement, switch) = match device.placement {
            Placement::Root => (Some(ROOT.to_string()), None),
            Placement::RootPort => (Some(ROOT_PORT.to_string()), None),
            Placement::Switch(name) => (None, Some(name)),
        };
        RawDevice {
            id: Some(device.id),
            path: device.path,
            backend: device.backend,
            placement,
            switch,
            clique: device.clique.map(i64::from),
        }
    }
}

/// The GPUDirect clique id: 4 bits in the capability. The error names the
/// device when it has an id, since a TOML error only points at its table.
fn clique(id: Option<&str>, clique: Option<i64>) -> Result<Option<u8>, String> {
    let Some(value) = clique else {
        return Ok(None);
    };
    u8::try_from(value)
        .ok()
        .filter(|c| *c <= MAX_CLIQUE)
        .map(Some)
        .ok_or_else(|| {
            let device = id.map_or_else(String::new, |id| format!("device {id}: "));
            format!("{device}clique = {value}: out of range (use 0 to {MAX_CLIQUE})")
        })
}

/// Resolves the `placement` and `switch` keys into one [`Placement`], `None` if neither.
fn placement(placement: Option<&str>, switch: Option<String>) -> Result<Option<Placement>, String> {
    match (placement, switch) {
        (Some(placement), Some(switch)) => Err(format!(
            "placement {placement:?} conflicts with switch {switch:?}: give only one \
             (switch alone puts the device behind that switch)"
        )),
        (None, Some(switch)) => Ok(Some(Placement::Switch(switch))),
        (None, None) => Ok(None),
        (Some(p), None) if p.eq_ignore_ascii_case(ROOT) => Ok(Some(Placement::Root)),
        (Some(p), None) if p.eq_ignore_ascii_case(ROOT_PORT) => Ok(Some(Placement::RootPort)),
        (Some(p), None) if p.eq_ignore_ascii_case("switch") => Err(format!(
            "placement {p:?} needs the switch's name: set switch to it instead of placement"
        )),
        (Some(p), None) => Err(format!(
            "unknown placement {p:?} (use {ROOT_PORT} or {ROOT}, or set switch instead)"
        )),
    }
}

/// A path is taken as given; a value without `/` must be a PCI address and
/// becomes its sysfs directory.
fn device_path(path: &Path) -> Result<PathBuf, String> {
    if path.as_os_str().is_empty() {
        return Err("path is empty (e.g. /sys/bus/pci/devices/0000:00:03.0)".to_string());
    }
    // A path not in UTF-8 (TOML and clap never give one) is no address either.
    let Some(text) = path.to_str().filter(|text| !text.contains('/')) else {
        return Ok(path.to_path_buf());
    };
    parse_bdf(text)
        .map(|bdf| Path::new(SYSFS_PCI_DEVICES).join(bdf))
        .ok_or_else(|| {
            format!(
                "path {text:?} is neither a sysfs directory ({SYSFS_PCI_DEVICES}/0000:00:03.0) \
                 nor a PCI address (0000:00:03.0 or 00:03.0)"
            )
        })
}

/// `[DOMAIN:]BUS:DEVICE.FUNCTION` in hex, as lspci prints it, in sysfs's
/// spelling: lower case, domain padded to 4 digits and defaulting to 0.
fn parse_bdf(text: &str) -> Option<String> {
    let (rest, function) = text.rsplit_once('.')?;
    let mut parts = rest.rsplit(':');
    let device = hex(parts.next()?, 2)?;
    let bus = hex(parts.next()?, 2)?;
    let domain = parts.next().map_or(Some(0), |d| hex(d, 8))?;
    let function = hex(function, 1)?;
    if parts.next().is_some() || device > 0x1f || function > 7 {
        return None;
    }
    Some(format!("{domain:04x}:{bus:02x}:{device:02x}.{function:x}"))
}

/// 1 to `max_digits` hex digits; `from_str_radix` alone would also take a
/// sign.
fn hex(digits: &str, max_digits: usize) -> Option<u32> {
    let ok =
        (1..=max_digits).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_hexdigit());
    ok.then(|| u32::from_str_radix(digits, 16).ok()).flatten()
}

/// Parses one `--device` value, e.g.
/// `path=0000:00:03.0,id=gpu0,backend=legacy`. The error is the reason
/// only; the caller adds the flag and value.
pub(super) fn parse_flag(spec: &str) -> Result<DeviceEntry, String> {
    let mut raw = RawDevice::default();
    let (mut path, mut backend, mut clique) = (None, None, None);
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not KEY=VALUE (keys: {KEYS})"))?;
        let slot = match key {
            "path" => &mut path,
            "id" => &mut raw.id,
            "backend" => &mut backend,
            "placement" => &mut raw.placement,
            "switch" => &mut raw.switch,
            "clique" => &mut clique,
            _ => return Err(format!("unknown key {key:?} (use {KEYS})")),
        };
        if value.is_empty() {
            return Err(format!("empty value for key {key}"));
        }
        if slot.replace(value.to_string()).is_some() {
            return Err(format!("key {key} given twice"));
        }
    }
    raw.path = path
        .ok_or_else(|| format!("missing key path (e.g. path={SYSFS_PCI_DEVICES}/0000:00:03.0)"))?
        .into();
    raw.clique = clique
        .map(|c: String| {
            c.parse::<i64>()
                .map_err(|_| format!("clique {c:?} is not a number (use 0 to {MAX_CLIQUE})"))
        })
        .transpose()?;
    raw.backend = backend
        .map(|b| b.parse())
        .transpose()
        .map_err(|e: ParseBackendError| e.to_string())?;
    DeviceEntry::try_from(raw)
}

/// Appends the `top` devices (from `--device`) to `base` (from the file);
/// a top device whose id is that of a base device replaces it in place.
/// Each base device is replaced at most once, so two flags with the same id
/// both stay and are reported as duplicates by validation.
pub(super) fn merge(mut base: Vec<DeviceEntry>, top: Vec<DeviceEntry>) -> Vec<DeviceEntry> {
    let base_len = base.len();
    let mut replaced = vec![false; base_len];
    for device in top {
        let target = device.id.as_deref().and_then(|id| {
            (0..base_len).find(|&i| {
                !replaced[i] && base[i].id.clone().unwrap_or_else(|| default_id(i)) == id
            })
        });
        match target {
            Some(i) => {
                replaced[i] = true;
                base[i] = device;
            }
            None => base.push(device),
        }
    }
    base
}

/// Gives every device without an id its default one, and without a placement the one its
/// P2P group's topology gives (else root-port).
pub(super) fn finish(entries: Vec<DeviceEntry>, groups: &[P2pGroupConfig]) -> Vec<DeviceConfig> {
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| {
            let id = entry.id.unwrap_or_else(|| default_id(index));
            let placement = entry.placement.unwrap_or_else(|| {
                groups
                    .iter()
                    .find(|g| g.devices.contains(&id))
                    .map_or_else(Placement::default, group_placement)
            });
            DeviceConfig {
                id,
                path: entry.path,
                backend: entry.backend,
                placement,
                clique: entry.clique,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs(bdf: &str) -> PathBuf {
        Path::new(SYSFS_PCI_DEVICES).join(bdf)
    }

    fn entry(id: Option<&str>, bdf: &str) -> DeviceEntry {
        DeviceEntry {
            id: id.map(str::to_string),
            path: sysfs(bdf),
            backend: None,
            placement: Some(Placement::RootPort),
            clique: None,
        }
    }

    #[test]
    fn bare_addresses_become_sysfs_paths() {
        assert_eq!(parse_bdf("0000:00:03.0").as_deref(), Some("0000:00:03.0"));
        assert_eq!(parse_bdf("00:03.0").as_deref(), Some("0000:00:03.0"));
        assert_eq!(parse_bdf("0000:AF:1f.7").as_deref(), Some("0000:af:1f.7"));
        assert_eq!(parse_bdf("1:02:00.1").as_deref(), Some("0001:02:00.1"));
        assert_eq!(parse_bdf("10000:e1:00.0").as_deref(), Some("10000:e1:00.0"));
        for bad in [
            "00:20.0", // device > 0x1f
            "00:03.8", // function > 7
            "00:03",
            "03.0",
            "0:0:00:03.0",
            "00:+3.0",
            "000:03.0",
            "gpu",
            "",
        ] {
            assert_eq!(parse_bdf(bad), None, "{bad}");
        }
        assert_eq!(device_path(Path::new("00:03.0")), Ok(sysfs("0000:00:03.0")));
        assert_eq!(
            device_path(Path::new("/tmp/fake/0000:00:03.0")),
            Ok("/tmp/fake/0000:00:03.0".into())
        );
        assert_eq!(
            device_path(Path::new("gpu")).unwrap_err(),
            "path \"gpu\" is neither a sysfs directory (/sys/bus/pci/devices/0000:00:03.0) \
             nor a PCI address (0000:00:03.0 or 00:03.0)"
        );
    }

    #[test]
    fn flag_with_every_key() {
        let device = parse_flag("path=00:03.0,id=gpu0,backend=legacy,placement=root").unwrap();
        assert_eq!(
            device,
            DeviceEntry {
                id: Some("gpu0".into()),
                path: sysfs("0000:00:03.0"),
                backend: Some(IommuBackendKind::Legacy),
                placement: Some(Placement::Root),
                clique: None,
            }
        );
        let device = parse_flag("switch=sw0,path=/sys/bus/pci/devices/0000:00:04.0").unwrap();
        assert_eq!(device.id, None);
        assert_eq!(device.backend, None);
        assert_eq!(device.placement, Some(Placement::Switch("sw0".into())));
        let device = parse_flag("path=00:03.0,placement=Root-Port,backend=IOMMUFD").unwrap();
        assert_eq!(device.placement, Some(Placement::RootPort));
        assert_eq!(device.backend, Some(IommuBackendKind::Iommufd));
    }

    #[test]
    fn bad_flags_name_the_key() {
        let err = |spec: &str| parse_flag(spec).unwrap_err();
        assert_eq!(
            err("path=00:03.0,colour=red"),
            r#"unknown key "colour" (use path, id, backend, placement or switch, clique)"#
        );
        assert_eq!(
            err("id=gpu0"),
            "missing key path (e.g. path=/sys/bus/pci/devices/0000:00:03.0)"
        );
        assert_eq!(err("path=00:03.0,id="), "empty value for key id");
        assert_eq!(err("path="), "empty value for key path");
        assert_eq!(err("path=00:03.0,path=00:04.0"), "key path given twice");
        assert_eq!(
            err("path=00:03.0,"),
            r#""" is not KEY=VALUE (keys: path, id, backend, placement or switch, clique)"#
        );
        assert_eq!(
            err("path=00:03.0,backend=vfio"),
            r#"unknown IOMMU backend "vfio" (use iommufd or legacy)"#
        );
        assert_eq!(
            err("path=00:03.0,placement=root,switch=sw0"),
            r#"placement "root" conflicts with switch "sw0": give only one (switch alone puts the device behind that switch)"#
        );
        assert_eq!(
            err("path=00:03.0,placement=switch"),
            r#"placement "switch" needs the switch's name: set switch to it instead of placement"#
        );
        assert_eq!(
            err("path=00:03.0,placement=leaf"),
            r#"unknown placement "leaf" (use root-port or root, or set switch instead)"#
        );
    }

    #[test]
    fn flag_devices_replace_file_devices_by_id() {
        let file = vec![
            entry(Some("gpu0"), "0000:00:03.0"),
            entry(None, "0000:00:04.0"),
        ];
        let cli = vec![
            entry(Some("dev1"), "0000:00:05.0"), // replaces the default-named file device
            entry(None, "0000:00:06.0"),
            entry(Some("gpu0"), "0000:00:07.0"),
            entry(Some("gpu0"), "0000:00:08.0"), // second flag with one id: kept, a duplicate
        ];
        let merged = finish(merge(file, cli), &[]);
        let summary: Vec<_> = merged
            .iter()
            .map(|d| (d.id.as_str(), d.path.file_name().unwrap().to_str().unwrap()))
            .collect();
        assert_eq!(
            summary,
            [
                ("gpu0", "0000:00:07.0"),
                ("dev1", "0000:00:05.0"),
                ("dev2", "0000:00:06.0"),
                ("gpu0", "0000:00:08.0"),
            ]
        );
    }

    #[test]
    fn wrong_toml_backend_lists_the_choices() {
        let err = toml::Value::Integer(1)
            .try_into::<IommuBackendKind>()
            .unwrap_err();
        assert_eq!(
            err.message(),
            r#"invalid type: integer `1`, expected "iommufd" or "legacy""#
        );
    }
}
