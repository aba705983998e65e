//! The JSON bodies of the API. Field names and shapes follow Cloud Hypervisor's OpenAPI document
//! for the endpoints both VMMs have, so CH's `ch-remote` and clients generated from CH's document
//! talk to p2pvmm unchanged; p2pvmm's own additions (P2P groups, placement) are optional fields.
//!
//! Request types reject unknown fields, so a CH option p2pvmm lacks fails with a 400 naming it
//! instead of being silently dropped. Where CH's client always sends a field with its default
//! (`memory.thp: true`), the field is accepted and only a non-default value is refused, by
//! `validate`.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// The body of every error response: `{"error": "<what went wrong, naming the field>"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// `PUT vm.create`: the whole VM. `payload` is required as in CH.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpusConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceConfig>>,
    /// p2pvmm extension: which devices may DMA into each other's BARs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_groups: Option<Vec<P2pGroupConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
}

/// What the guest boots. p2pvmm loads a kernel directly; `firmware` is accepted as a key so a
/// CH body with `"firmware": null` parses, and refused with a value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// vCPUs. p2pvmm has no vCPU hotplug, so `max_vcpus` may only repeat `boot_vcpus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u8>,
}

fn default_hotplug_method() -> String {
    "Acpi".into()
}

fn default_true() -> bool {
    true
}

/// Guest RAM, in bytes. The other keys are CH's with CH's defaults: accepted so bodies CH's
/// tools write parse, and refused (by `validate`) when set to anything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default = "default_hotplug_method")]
    pub hotplug_method: String,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub reserve: bool,
    #[serde(default = "default_true")]
    pub thp: bool,
    /// CH's memory zones; only an empty list is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<Vec<serde_json::Value>>,
}

impl MemoryConfig {
    /// `size` bytes with every other key at CH's default.
    pub fn of_size(size: u64) -> MemoryConfig {
        MemoryConfig {
            size,
            hotplug_size: None,
            hotplugged_size: None,
            mergeable: false,
            hotplug_method: default_hotplug_method(),
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            reserve: false,
            thp: true,
            zones: None,
        }
    }
}

/// Where the guest's serial port (or CH's virtio console) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ConsoleMode {
    Off,
    Tty,
    File,
    Null,
}

/// CH's console/serial body: `mode`, and `file` for `File`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default)]
    pub iommu: bool,
}

/// A VFIO passthrough device (`PUT vm.add-device`, or an entry of `vm.create`'s `devices`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The host function: a sysfs path or a bare BDF.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_nv_gpudirect_clique: Option<u8>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub x_exclude_mmap_bars: Vec<u8>,
    /// p2pvmm extension: the P2P group the device joins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_group: Option<String>,
    /// p2pvmm extension: `root`, `root-port` or `switch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// p2pvmm extension: the switch the device sits behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
}

/// The placements `DeviceConfig::placement` may name.
pub const PLACEMENTS: [&str; 3] = ["root", "root-port", "switch"];
/// The modes `P2pGroupConfig::mode` may name.
pub const P2P_MODES: [&str; 4] = ["auto", "dmabuf", "legacy", "off"];
/// The topologies `P2pGroupConfig::topology` may name.
pub const P2P_TOPOLOGIES: [&str; 3] = ["switch", "root-ports", "flat"];

/// The answer to `vm.add-device`: where the device landed in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PciDeviceInfo {
    pub id: String,
    /// Guest BDF in CH's form, `0000:00:05.0`.
    pub bdf: String,
}

/// `PUT vm.remove-device`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRemoveDevice {
    pub id: String,
}

/// The VM's run state, spelled as CH spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

/// `GET vm.info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmInfoResponse {
    pub config: VmConfig,
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
    #[serde(default)]
    pub device_tree: BTreeMap<String, DeviceNode>,
}

/// One node of `vm.info`'s device tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceNode {
    pub id: String,
    #[serde(default)]
    pub resources: Vec<serde_json::Value>,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub children: Vec<String>,
    #[serde(default)]
    pub pci_bdf: Option<String>,
}

/// p2pvmm extension (`PUT vm.add-p2p-group`, or an entry of `vm.create`'s `p2p_groups`): devices
/// that may DMA into each other's BARs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct P2pGroupConfig {
    pub name: String,
    #[serde(default)]
    pub devices: Vec<String>,
    /// `auto`, `dmabuf`, `legacy` or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `switch`, `root-ports` or `flat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
    /// Hot-plug slots reserved behind the group's switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u8>,
}

fn reject_empty(field: &str, value: &Option<String>) -> Result<(), ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(ApiError::invalid(field, "must not be empty")),
        _ => Ok(()),
    }
}

fn one_of(field: &str, value: &Option<String>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::invalid(
            field,
            format!("`{v}` is not one of {}", allowed.join(", ")),
        )),
        _ => Ok(()),
    }
}

impl VmConfig {
    /// The value checks serde cannot express; errors name the field by its JSON path.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.payload.validate().map_err(|e| e.within("payload"))?;
        if let Some(cpus) = &self.cpus {
            cpus.validate().map_err(|e| e.within("cpus"))?;
        }
        if let Some(memory) = &self.memory {
            memory.validate().map_err(|e| e.within("memory"))?;
        }
        let mut ids = HashSet::new();
        for (i, device) in self.devices.iter().flatten().enumerate() {
            let at = format!("devices[{i}]");
            device.validate().map_err(|e| e.within(&at))?;
            if let Some(id) = &device.id {
                if !ids.insert(id.as_str()) {
                    return Err(ApiError::invalid(
                        format!("{at}.id"),
                        format!("`{id}` is used by another device"),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, group) in self.p2p_groups.iter().flatten().enumerate() {
            let at = format!("p2p_groups[{i}]");
            group.validate().map_err(|e| e.within(&at))?;
            if !names.insert(group.name.as_str()) {
                return Err(ApiError::invalid(
                    format!("{at}.name"),
                    format!("`{}` names another group", group.name),
                ));
            }
        }
        if let Some(serial) = &self.serial {
            serial.validate().map_err(|e| e.within("serial"))?;
        }
        if let Some(console) = &self.console {
            console.validate().map_err(|e| e.within("console"))?;
            if !matches!(console.mode, ConsoleMode::Off | ConsoleMode::Null) {
                return Err(ApiError::invalid(
                    "console.mode",
                    "p2pvmm has no virtio console (use serial); only Off or Null",
                ));
            }
        }
        Ok(())
    }
}

impl PayloadConfig {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.firmware.is_some() {
            return Err(ApiError::invalid(
                "firmware",
                "not supported: p2pvmm boots a kernel directly",
            ));
        }
        match &self.kernel {
            None => Err(ApiError::invalid("kernel", "required")),
            Some(_) => reject_empty("kernel", &self.kernel),
        }
    }
}

impl CpusConfig {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.boot_vcpus == 0 {
            return Err(ApiError::invalid("boot_vcpus", "must be at least 1"));
        }
        match self.max_vcpus {
            Some(max) if max != self.boot_vcpus => Err(ApiError::invalid(
                "max_vcpus",
                format!(
                    "{max} differs from boot_vcpus {}: p2pvmm has no vCPU hotplug",
                    self.boot_vcpus
                ),
            )),
            _ => Ok(()),
        }
    }
}

impl MemoryConfig {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.size == 0 {
            return Err(ApiError::invalid("size", "must be more than 0"));
        }
        let unsupported = |field: &str| Err(ApiError::invalid(field, "not supported by p2pvmm"));
        if self.hotplug_size.is_some() {
            return unsupported("hotplug_size");
        }
        if self.hotplugged_size.is_some() {
            return unsupported("hotplugged_size");
        }
        if self.mergeable {
            return unsupported("mergeable");
        }
        if self.hotplug_method != "Acpi" {
            return unsupported("hotplug_method");
        }
        if self.shared {
            return unsupported("shared");
        }
        if self.prefault {
            return unsupported("prefault");
        }
        if self.reserve {
            return unsupported("reserve");
        }
        if !self.thp {
            return unsupported("thp");
        }
        if self.zones.as_ref().is_some_and(|z| !z.is_empty()) {
            return unsupported("zones");
        }
        Ok(())
    }
}

impl ConsoleConfig {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.iommu {
            return Err(ApiError::invalid(
                "iommu",
                "p2pvmm does not expose a virtual IOMMU",
            ));
        }
        match (self.mode, &self.file) {
            (ConsoleMode::File, None) => Err(ApiError::invalid("file", "required by mode File")),
            (ConsoleMode::File, Some(_)) => reject_empty("file", &self.file),
            (_, Some(_)) => Err(ApiError::invalid("file", "only allowed with mode File")),
            (_, None) => Ok(()),
        }
    }
}

impl DeviceConfig {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.path.is_empty() {
            return Err(ApiError::invalid("path", "must not be empty"));
        }
        reject_empty("id", &self.id)?;
        if self.iommu {
            return Err(ApiError::invalid(
                "iommu",
                "p2pvmm does not expose a virtual IOMMU",
            ));
        }
        if self.pci_segment != 0 {
            return Err(ApiError::invalid(
                "pci_segment",
                format!("{}: p2pvmm has one PCI segment, 0", self.pci_segment),
            ));
        }
        if let Some(slot) = self.pci_device_id {
            if slot == 0 || slot > 31 {
                return Err(ApiError::invalid(
                    "pci_device_id",
                    format!("{slot} is not a device slot 1-31 (0 is the host bridge)"),
                ));
            }
        }
        if let Some(clique) = self.x_nv_gpudirect_clique {
            if clique > 15 {
                return Err(ApiError::invalid(
                    "x_nv_gpudirect_clique",
                    format!("{clique} is not a clique id 0-15"),
                ));
            }
        }
        if !self.x_exclude_mmap_bars.is_empty() {
            return Err(ApiError::invalid("x_exclude_mmap_bars", "not supported"));
        }
        reject_empty("p2p_group", &self.p2p_group)?;
        one_of("placement", &self.placement, &PLACEMENTS)?;
        reject_empty("switch", &self.switch)?;
        if let (Some(_), Some(placement)) = (&self.switch, &self.placement) {
            if placement != "switch" {
                return Err(ApiError::invalid(
                    "switch",
                    format!("conflicts with placement `{placement}`"),
                ));
            }
        }
        Ok(())
    }
}

impl P2pGroupConfig {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.name.is_empty() {
            return Err(ApiError::invalid("name", "must not be empty"));
        }
        let mut seen = HashSet::new();
        for (i, device) in self.devices.iter().enumerate() {
            if device.is_empty() {
                return Err(ApiError::invalid(
                    format!("devices[{i}]"),
                    "must not be empty",
                ));
            }
            if !seen.insert(device.as_str()) {
                return Err(ApiError::invalid(
                    format!("devices[{i}]"),
                    format!("`{device}` is listed twice"),
                ));
            }
        }
        one_of("mode", &self.mode, &P2P_MODES)?;
        one_of("topology", &self.topology, &P2P_TOPOLOGIES)?;
        if self.slots == Some(0) {
            return Err(ApiError::invalid("slots", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "types_tests.rs"]
mod tests;
