//! P2P groups: `[[p2p_group]]` tables and repeatable
//! `--p2p-group name=g0,devices=gpu0:nic0[,mode=dmabuf][,topology=switch]` flags.
//!
//! A group is the unit of peer-to-peer DMA: its members reach each other's BARs and nothing
//! else reaches them. Each group is one IOMMU address space (a "domain"), and so is each device
//! in no group ([`VmConfig::domains`]), so isolation is the host IOMMU's, not a promise of ours.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DeviceConfig, IommuBackendKind, Placement, VmConfig};

/// The keys of a `--p2p-group` flag and a `[[p2p_group]]` table.
const KEYS: &str = "name, devices, mode, topology";

/// How a group's members reach each other's BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum P2pMode {
    /// dmabuf export + `IOMMU_IOAS_MAP_FILE` on iommufd, mapping by address on type1.
    #[default]
    Auto,
    /// Demand dmabufs: the group needs iommufd.
    Dmabuf,
    /// Demand mapping by address: the group gets a type1 container of its own.
    Legacy,
    /// The group's topology without P2P.
    Off,
}

/// Where a group's members sit in the guest's PCIe tree (a member's own placement wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupTopology {
    /// Behind one emulated PCIe switch named after the group: what drivers (NVIDIA, NCCL) read
    /// as "P2P-capable".
    #[default]
    Switch,
    /// Each member on a root port of its own.
    RootPorts,
    /// On the root bus.
    Flat,
}

/// One P2P group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2pGroupConfig {
    /// Unique among groups; also the name of the group's switch.
    pub name: String,
    /// Device ids; may be empty.
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub mode: P2pMode,
    #[serde(default)]
    pub topology: GroupTopology,
}

/// One IOMMU address space of the VM: a group, or a device in no group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPlan {
    /// The group's name, or the ungrouped device's id.
    pub name: String,
    pub devices: Vec<String>,
    /// [`P2pMode::Off`] for an ungrouped device.
    pub mode: P2pMode,
    pub grouped: bool,
    /// The backend the domain needs: from the mode, else from its members' explicit choice.
    pub backend: Option<IommuBackendKind>,
}

impl fmt::Display for P2pMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            P2pMode::Auto => "auto",
            P2pMode::Dmabuf => "dmabuf",
            P2pMode::Legacy => "legacy",
            P2pMode::Off => "off",
        })
    }
}

fn parse_mode(v: &str) -> Result<P2pMode, String> {
    match v {
        "auto" => Ok(P2pMode::Auto),
        "dmabuf" => Ok(P2pMode::Dmabuf),
        "legacy" => Ok(P2pMode::Legacy),
        "off" => Ok(P2pMode::Off),
        _ => Err(format!(
            "unknown mode {v:?} (use auto, dmabuf, legacy or off)"
        )),
    }
}

fn parse_topology(v: &str) -> Result<GroupTopology, String> {
    match v {
        "switch" => Ok(GroupTopology::Switch),
        "root-ports" => Ok(GroupTopology::RootPorts),
        "flat" => Ok(GroupTopology::Flat),
        _ => Err(format!(
            "unknown topology {v:?} (use switch, root-ports or flat)"
        )),
    }
}

/// Parses one `--p2p-group` value; the error is the reason only (the caller adds the flag).
pub(super) fn parse_flag(spec: &str) -> Result<P2pGroupConfig, String> {
    let (mut name, mut devices, mut mode, mut topology) = (None, None, None, None);
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not KEY=VALUE (keys: {KEYS})"))?;
        let slot = match key {
            "name" => &mut name,
            "devices" => &mut devices,
            "mode" => &mut mode,
            "topology" => &mut topology,
            _ => return Err(format!("unknown key {key:?} (use {KEYS})")),
        };
        if slot.replace(value.to_string()).is_some() {
            return Err(format!("key {key} given twice"));
        }
    }
    let name = name.ok_or("missing key name (e.g. name=g0)")?;
    Ok(P2pGroupConfig {
        name,
        devices: devices
            .map(|d| {
                d.split(':')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        mode: mode
            .as_deref()
            .map(parse_mode)
            .transpose()?
            .unwrap_or_default(),
        topology: topology
            .as_deref()
            .map(parse_topology)
            .transpose()?
            .unwrap_or_default(),
    })
}

/// The placement a group's topology gives a member that names none itself.
pub(super) fn group_placement(group: &P2pGroupConfig) -> Placement {
    match group.topology {
        GroupTopology::Switch => Placement::Switch(group.name.clone()),
        GroupTopology::RootPorts => Placement::RootPort,
        GroupTopology::Flat => Placement::Root,
    }
}

fn group_error(group: &str, field: &'static str, value: &str, reason: String) -> ConfigError {
    ConfigError::InvalidGroup {
        group: group.to_string(),
        field,
        value: value.to_string(),
        reason,
    }
}

/// The rules that need no host: names, members, one group per device, per-domain backends.
pub(super) fn check_group_rules(vm: &VmConfig) -> Result<(), ConfigError> {
    for (index, group) in vm.p2p_groups.iter().enumerate() {
        let name = &group.name;
        super::device_check::check_name(name)
            .map_err(|reason| group_error(name, "name", name, reason))?;
        if vm.p2p_groups[..index].iter().any(|g| &g.name == name) {
            return Err(group_error(
                name,
                "name",
                name,
                "another group has it".into(),
            ));
        }
        for (i, id) in group.devices.iter().enumerate() {
            if !vm.devices.iter().any(|d| &d.id == id) {
                return Err(group_error(
                    name,
                    "devices",
                    id,
                    "no such device (give it with --device ...,id=ID)".into(),
                ));
            }
            if group.devices[..i].contains(id) {
                return Err(group_error(name, "devices", id, "listed twice".into()));
            }
            if let Some(other) = vm.p2p_groups[..index]
                .iter()
                .find(|g| g.devices.contains(id))
            {
                return Err(group_error(
                    name,
                    "devices",
                    id,
                    format!(
                        "already in group {}: a device is in at most one group",
                        other.name
                    ),
                ));
            }
        }
        // A device outside the group behind a switch of the group's name would share its switch.
        if let Some(outsider) = vm.devices.iter().find(|d| {
            d.placement == Placement::Switch(name.clone()) && !group.devices.contains(&d.id)
        }) {
            return Err(group_error(
                name,
                "name",
                name,
                format!(
                    "device {} (not a member) is behind a switch of that name",
                    outsider.id
                ),
            ));
        }
        let members: Vec<&DeviceConfig> = vm
            .devices
            .iter()
            .filter(|d| group.devices.contains(&d.id))
            .collect();
        let wanted = match group.mode {
            P2pMode::Dmabuf => Some(IommuBackendKind::Iommufd),
            P2pMode::Legacy => Some(IommuBackendKind::Legacy),
            P2pMode::Auto | P2pMode::Off => None,
        };
        for member in &members {
            let Some(backend) = member.backend else {
                continue;
            };
            if let Some(wanted) = wanted.filter(|w| *w != backend) {
                return Err(group_error(
                    name,
                    "mode",
                    &group.mode.to_string(),
                    format!(
                        "needs the {wanted} backend, but device {} asks for backend={backend}",
                        member.id
                    ),
                ));
            }
            if let Some(other) = members
                .iter()
                .find(|m| m.backend.is_some_and(|b| b != backend))
            {
                return Err(group_error(
                    name,
                    "devices",
                    &other.id,
                    format!(
                        "asks for a different backend than {}: a group is one IOMMU address \
                         space, in one backend",
                        member.id
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The checks that look at the host: the mechanism a mode demands exists, and no host IOMMU
/// group is split across domains (the host IOMMU cannot isolate its functions from each other).
pub(super) fn check_group_host(vm: &VmConfig, dev_root: &Path) -> Result<(), ConfigError> {
    for group in &vm.p2p_groups {
        let (needs, what) = match group.mode {
            P2pMode::Dmabuf => ("iommu", "iommufd (/dev/iommu, CONFIG_IOMMUFD)"),
            P2pMode::Legacy => ("vfio/vfio", "the VFIO type1 container (/dev/vfio/vfio)"),
            P2pMode::Auto | P2pMode::Off => continue,
        };
        if !dev_root.join(needs).exists() {
            return Err(group_error(
                &group.name,
                "mode",
                &group.mode.to_string(),
                format!("needs {what}, which this host does not have"),
            ));
        }
    }
    let domains = vm.domains();
    let domain_of = |id: &str| {
        domains
            .iter()
            .position(|d| d.devices.iter().any(|m| m == id))
    };
    let mut seen: Vec<(String, &DeviceConfig)> = Vec::new();
    for device in &vm.devices {
        let Ok(link) = std::fs::read_link(device.path.join("iommu_group")) else {
            continue;
        };
        let host_group = link
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some((_, other)) = seen
            .iter()
            .find(|(g, other)| *g == host_group && domain_of(&other.id) != domain_of(&device.id))
        {
            let domain = |id: &str| {
                domain_of(id)
                    .and_then(|i| domains.get(i))
                    .filter(|d| d.grouped)
                    .map_or("no group".to_string(), |d| format!("group {}", d.name))
            };
            let reason = format!(
                "shares host IOMMU group {host_group} with {} ({}): the host IOMMU cannot \
                 isolate them, put both in the same P2P group",
                other.id,
                domain(&other.id)
            );
            let grouped = domain_of(&device.id).is_some_and(|i| domains[i].grouped);
            return Err(if grouped {
                group_error(&domain(&device.id)[6..], "devices", &device.id, reason)
            } else {
                ConfigError::InvalidDevice {
                    device: format!("device {}", device.id),
                    field: "path",
                    value: format!("{:?}", device.path),
                    reason: format!("in no P2P group, {reason}"),
                }
            });
        }
        seen.push((host_group, device));
    }
    Ok(())
}

/// NVIDIA's PCI vendor id: its members get the group's clique id without asking.
const NVIDIA: u16 = 0x10de;

impl VmConfig {
    /// One domain per group (in order), then one per device in no group.
    pub fn domains(&self) -> Vec<DomainPlan> {
        let mut domains: Vec<DomainPlan> = self
            .p2p_groups
            .iter()
            .map(|g| DomainPlan {
                name: g.name.clone(),
                devices: g.devices.clone(),
                mode: g.mode,
                grouped: true,
                backend: match g.mode {
                    P2pMode::Dmabuf => Some(IommuBackendKind::Iommufd),
                    P2pMode::Legacy => Some(IommuBackendKind::Legacy),
                    P2pMode::Auto | P2pMode::Off => self
                        .devices
                        .iter()
                        .filter(|d| g.devices.contains(&d.id))
                        .find_map(|d| d.backend),
                },
            })
            .collect();
        for device in &self.devices {
            if !self
                .p2p_groups
                .iter()
                .any(|g| g.devices.contains(&device.id))
            {
                domains.push(DomainPlan {
                    name: device.id.clone(),
                    devices: vec![device.id.clone()],
                    mode: P2pMode::Off,
                    grouped: false,
                    backend: device.backend,
                });
            }
        }
        domains
    }

    /// The GPUDirect clique id of device `id`: its own `clique`, else the index of its group
    /// when the host function is NVIDIA's (`vendor`, from sysfs). A clique set on another
    /// vendor's device is allowed (the lab tests it) with a warning.
    pub fn clique_of(&self, id: &str, vendor: Option<u16>) -> Result<Option<u8>, ConfigError> {
        let device = self.devices.iter().find(|d| d.id == id);
        if let Some(clique) = device.and_then(|d| d.clique) {
            if vendor != Some(NVIDIA) {
                log::warn!(
                    "device {id}: clique={clique} on a non-NVIDIA device (vendor {:04x}); \
                     only NVIDIA's driver reads it",
                    vendor.unwrap_or(0)
                );
            }
            return Ok(Some(clique));
        }
        if vendor != Some(NVIDIA) {
            return Ok(None);
        }
        let Some(index) = self
            .p2p_groups
            .iter()
            .position(|g| g.devices.iter().any(|d| d == id))
        else {
            return Ok(None);
        };
        let group = &self.p2p_groups[index].name;
        u8::try_from(index)
            .ok()
            .filter(|i| *i <= 15)
            .map(Some)
            .ok_or_else(|| {
                group_error(
                    group,
                    "devices",
                    id,
                    format!("the clique id would be {index}, beyond 15: give the device clique=N"),
                )
            })
    }

    /// The warning for a VM whose devices cannot reach each other's BARs for want of a group.
    pub fn ungrouped_warning(&self) -> Option<String> {
        (self.devices.len() >= 2 && self.p2p_groups.is_empty()).then(|| {
            format!(
                "{} devices and no --p2p-group: devices cannot DMA to each other's BARs (secure \
                 default); add --p2p-group name=NAME,devices=ID:ID to allow it",
                self.devices.len()
            )
        })
    }
}

#[cfg(test)]
#[path = "p2p_group_tests.rs"]
mod tests;
