//! P2P groups: `[[p2p_group]]` tables and repeatable
//! `--p2p-group name=g0,devices=gpu0:nic0[,mode=dmabuf][,topology=switch]` flags.
//!
//! A group is the unit of peer-to-peer DMA: its members reach each other's BARs and nothing
//! else reaches them. Each group is one IOMMU address space (a "domain"), and so is each device
//! in no group ([`VmConfig::domains`]), so isolation is the host IOMMU's, not a promise of ours.
//! That is also why the backend rule is per domain: one address space lives in one backend,
//! but two address spaces need not share one.
//!
//! The rules here need no host; the ones that look at `/dev` and sysfs (a mode's interface
//! exists, no host IOMMU group split across domains, clique ids left) are in
//! [`super::device_check`], next to the other sysfs checks.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::device::MAX_CLIQUE;
use super::device_check::check_name;
use super::{ConfigError, DeviceConfig, IommuBackendKind, Placement, VmConfig};

/// The keys of a `--p2p-group` flag and a `[[p2p_group]]` table, for "unknown key" errors.
const KEYS: &str = "name, devices, mode, topology, slots";
/// Most hotplug slots a group may ask for: the downstream ports one switch has room for.
pub const MAX_SLOTS: u8 = 16;

/// NVIDIA's PCI vendor id: its devices in a group get the group's clique id without asking,
/// since NVIDIA's driver only does P2P between GPUs that report one clique.
pub const NVIDIA_VENDOR: u16 = 0x10de;

/// How a group's members reach each other's BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum P2pMode {
    /// dmabuf export + `IOMMU_IOAS_MAP_FILE` on iommufd, mapping by address on type1: whatever
    /// the domain's backend does.
    #[default]
    Auto,
    /// Demand dmabufs: the group needs iommufd (fails at start rather than degrade silently).
    Dmabuf,
    /// Demand mapping by address: the group gets a type1 container of its own.
    Legacy,
    /// The group's topology (and its own address space) without P2P.
    Off,
}

/// Where a group's members sit in the guest's PCIe tree (a member's own placement wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupTopology {
    /// Behind one emulated PCIe switch named after the group: what drivers (NVIDIA, NCCL) read
    /// as "P2P-capable", so the default.
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
    /// Unique among groups, same alphabet as device ids: it is also the name of the group's
    /// switch and its label in the P2P table.
    pub name: String,
    /// Member device ids; may be empty (a group to fill later).
    #[serde(default)]
    pub devices: Vec<String>,
    /// How members reach each other's BARs. Default auto.
    #[serde(default)]
    pub mode: P2pMode,
    /// Where members without a placement of their own go. Default switch.
    #[serde(default)]
    pub topology: GroupTopology,
    /// Empty hotplug slots kept for devices added at run time (API `vm.add-device`): downstream
    /// ports of the group's switch, or root ports with `topology = "root-ports"`. Default 0.
    #[serde(default, skip_serializing_if = "is_zero", deserialize_with = "slots")]
    pub slots: u8,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// `slots`, with a range error that says the limit.
fn slots<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
    let n = i64::deserialize(deserializer)?;
    parse_slots(&n.to_string()).map_err(serde::de::Error::custom)
}

fn parse_slots(value: &str) -> Result<u8, String> {
    value
        .parse::<u8>()
        .ok()
        .filter(|n| *n <= MAX_SLOTS)
        .ok_or_else(|| format!("slots {value:?}: expected 0 to {MAX_SLOTS}"))
}

/// One IOMMU address space of the VM: a group, or a device in no group. The device manager
/// opens one backend domain per plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPlan {
    /// The group's name, or the ungrouped device's id.
    pub name: String,
    /// Member device ids, in the group's order.
    pub devices: Vec<String>,
    /// The group's mode; [`P2pMode::Off`] for an ungrouped device (it reaches no BAR).
    pub mode: P2pMode,
    /// Whether this is a P2P group (false: a lone ungrouped device).
    pub grouped: bool,
    /// The backend the domain needs: dmabuf → iommufd, legacy → legacy, else the first
    /// explicit `backend` of its members; `None`: the host's default.
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

impl fmt::Display for GroupTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupTopology::Switch => "switch",
            GroupTopology::RootPorts => "root-ports",
            GroupTopology::Flat => "flat",
        })
    }
}

impl P2pMode {
    /// The backend this mode demands, if it demands one.
    pub fn backend(self) -> Option<IommuBackendKind> {
        match self {
            P2pMode::Dmabuf => Some(IommuBackendKind::Iommufd),
            P2pMode::Legacy => Some(IommuBackendKind::Legacy),
            P2pMode::Auto | P2pMode::Off => None,
        }
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
/// `devices=` may be empty (an empty group, like `devices = []`), but not have empty ids.
pub(super) fn parse_flag(spec: &str) -> Result<P2pGroupConfig, String> {
    let (mut name, mut devices, mut mode, mut topology, mut slots) = (None, None, None, None, None);
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not KEY=VALUE (keys: {KEYS})"))?;
        let slot = match key {
            "name" => &mut name,
            "devices" => &mut devices,
            "mode" => &mut mode,
            "topology" => &mut topology,
            "slots" => &mut slots,
            _ => return Err(format!("unknown key {key:?} (use {KEYS})")),
        };
        if value.is_empty() && key != "devices" {
            return Err(format!("empty value for key {key}"));
        }
        if slot.replace(value.to_string()).is_some() {
            return Err(format!("key {key} given twice"));
        }
    }
    let name = name.ok_or("missing key name (e.g. name=g0)")?;
    let devices = match devices.as_deref() {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(':')
            .map(|id| {
                (!id.is_empty()).then(|| id.to_string()).ok_or_else(|| {
                    format!("devices {list:?} has an empty id (separate ids with one ':')")
                })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(P2pGroupConfig {
        name,
        devices,
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
        slots: slots.as_deref().map(parse_slots).transpose()?.unwrap_or(0),
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

/// The rules that need no host: names, members, one group per device, no switch shared with
/// outsiders, one backend per group that its mode can live with.
pub(super) fn check_group_rules(vm: &VmConfig) -> Result<(), ConfigError> {
    for (index, group) in vm.p2p_groups.iter().enumerate() {
        let name = &group.name;
        check_name(name).map_err(|reason| ConfigError::InvalidGroup {
            group: name.clone(),
            field: "name",
            value: name.clone(),
            reason,
        })?;
        if group.slots > 0 && group.topology == GroupTopology::Flat {
            return Err(ConfigError::InvalidGroup {
                group: name.clone(),
                field: "slots",
                value: group.slots.to_string(),
                reason: "hotplug slots are switch downstream ports or root ports; topology \"flat\" has neither".to_owned(),
            });
        }
        let earlier = &vm.p2p_groups[..index];
        if earlier.iter().any(|g| &g.name == name) {
            return Err(ConfigError::DuplicateGroup {
                group: name.clone(),
            });
        }
        for (i, id) in group.devices.iter().enumerate() {
            let (group_name, device) = (name.clone(), id.clone());
            if !vm.devices.iter().any(|d| &d.id == id) {
                return Err(ConfigError::GroupUnknownDevice {
                    group: group_name,
                    device,
                });
            }
            if group.devices[..i].contains(id) {
                return Err(ConfigError::GroupRepeatedDevice {
                    group: group_name,
                    device,
                });
            }
            if let Some(first) = earlier.iter().find(|g| g.devices.contains(id)) {
                return Err(ConfigError::DeviceInTwoGroups {
                    group: group_name,
                    device,
                    first: first.name.clone(),
                });
            }
        }
        // Switches are made by name, so an outsider behind a switch of the group's name
        // would silently join the group's topology.
        let switch = Placement::Switch(name.clone());
        if let Some(outsider) = vm
            .devices
            .iter()
            .find(|d| d.placement == switch && !group.devices.contains(&d.id))
        {
            return Err(ConfigError::GroupSwitchClash {
                group: name.clone(),
                device: outsider.id.clone(),
            });
        }
        check_group_backends(vm, group)?;
    }
    Ok(())
}

/// A group is one IOMMU address space, in one backend: its members must not disagree, and
/// none may refuse the backend its mode demands.
fn check_group_backends(vm: &VmConfig, group: &P2pGroupConfig) -> Result<(), ConfigError> {
    let mut first: Option<(&str, IommuBackendKind)> = None;
    for member in vm.members(group) {
        let Some(backend) = member.backend else {
            continue;
        };
        if let Some(needs) = group.mode.backend().filter(|needs| *needs != backend) {
            return Err(ConfigError::GroupModeBackend {
                group: group.name.clone(),
                mode: group.mode,
                needs,
                device: member.id.clone(),
                backend,
            });
        }
        match first {
            Some((other, other_backend)) if other_backend != backend => {
                return Err(ConfigError::GroupBackendConflict {
                    group: group.name.clone(),
                    device: member.id.clone(),
                    backend,
                    other: other.to_string(),
                    other_backend,
                });
            }
            Some(_) => {}
            None => first = Some((&member.id, backend)),
        }
    }
    Ok(())
}

impl VmConfig {
    /// The configured devices of `group`, in the group's order (unknown ids skipped: that is
    /// a validation error, reported by [`VmConfig::validate`]).
    pub(super) fn members<'a>(
        &'a self,
        group: &'a P2pGroupConfig,
    ) -> impl Iterator<Item = &'a DeviceConfig> + 'a {
        group
            .devices
            .iter()
            .filter_map(|id| self.devices.iter().find(|d| &d.id == id))
    }

    /// The P2P group device `id` is in, if any.
    pub fn group_of(&self, id: &str) -> Option<&P2pGroupConfig> {
        self.p2p_groups
            .iter()
            .find(|g| g.devices.iter().any(|d| d == id))
    }

    /// The VM's IOMMU address spaces: one per group (in config order), then one per device in
    /// no group (in device order). Each is opened as its own backend domain, which is what
    /// keeps a domain's BARs out of reach of every other domain's devices.
    pub fn domains(&self) -> Vec<DomainPlan> {
        let groups = self.p2p_groups.iter().map(|g| DomainPlan {
            name: g.name.clone(),
            devices: g.devices.clone(),
            mode: g.mode,
            grouped: true,
            backend: g
                .mode
                .backend()
                .or_else(|| self.members(g).find_map(|d| d.backend)),
        });
        let ungrouped = self
            .devices
            .iter()
            .filter(|d| self.group_of(&d.id).is_none())
            .map(|d| DomainPlan {
                name: d.id.clone(),
                devices: vec![d.id.clone()],
                mode: P2pMode::Off,
                grouped: false,
                backend: d.backend,
            });
        groups.chain(ungrouped).collect()
    }

    /// The VM's default IOMMU backend: the first one a device asks for explicitly. Backends
    /// are chosen per domain now ([`DomainPlan::backend`]); this stays for callers that want
    /// one answer for the whole VM, e.g. a default for domains that ask for nothing.
    #[allow(dead_code, reason = "API kept for device-manager callers")]
    pub fn iommu_backend(&self) -> Option<IommuBackendKind> {
        self.devices.iter().find_map(|d| d.backend)
    }

    /// The GPUDirect P2P clique id device `id` shows the guest, `None` for no capability.
    ///
    /// Its own `clique` wins; a clique on a device that is not NVIDIA's is allowed (so the
    /// lab can test the capability) with a warning. Otherwise an NVIDIA device (`vendor` says
    /// which: [`super::host_vendor`] reads sysfs) in a group gets the group's id, see
    /// [`VmConfig::group_cliques`]. Errors if more groups need ids than there are.
    pub fn clique_of(
        &self,
        id: &str,
        vendor: impl Fn(&DeviceConfig) -> Option<u16>,
    ) -> Result<Option<u8>, ConfigError> {
        let Some(device) = self.devices.iter().find(|d| d.id == id) else {
            return Ok(None);
        };
        let own_vendor = vendor(device);
        if let Some(clique) = device.clique {
            if own_vendor != Some(NVIDIA_VENDOR) {
                let vendor = own_vendor.map_or("unknown".to_string(), |v| format!("{v:#06x}"));
                log::warn!(
                    "device {id}: clique={clique} on a non-NVIDIA device (vendor {vendor}): \
                     allowed so the lab can test it; only NVIDIA's driver reads it"
                );
            }
            return Ok(Some(clique));
        }
        if own_vendor != Some(NVIDIA_VENDOR) {
            return Ok(None);
        }
        let Some(index) = self
            .p2p_groups
            .iter()
            .position(|g| g.devices.iter().any(|d| d == id))
        else {
            return Ok(None);
        };
        Ok(self.group_cliques(&vendor)?[index])
    }

    /// The clique id of each group, by group index: groups with an NVIDIA member and P2P on
    /// (mode not off: a clique would tell the driver P2P works) are numbered from 0 in config
    /// order, others get none. Only 16 ids exist (4 bits), so a 17th such group is an error.
    pub(super) fn group_cliques(
        &self,
        vendor: &dyn Fn(&DeviceConfig) -> Option<u16>,
    ) -> Result<Vec<Option<u8>>, ConfigError> {
        let mut next = 0usize;
        self.p2p_groups
            .iter()
            .map(|g| {
                let nvidia = g.mode != P2pMode::Off
                    && self.members(g).any(|d| vendor(d) == Some(NVIDIA_VENDOR));
                if !nvidia {
                    return Ok(None);
                }
                let clique = next;
                next += 1;
                u8::try_from(clique)
                    .ok()
                    .filter(|c| *c <= MAX_CLIQUE)
                    .map(Some)
                    .ok_or_else(|| ConfigError::TooManyCliques {
                        group: g.name.clone(),
                        clique,
                    })
            })
            .collect()
    }

    /// The warning for a VM whose devices cannot reach each other's BARs for want of a group
    /// (the secure default, but likely a surprise to whoever passed two GPUs through).
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
