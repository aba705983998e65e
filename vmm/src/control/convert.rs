//! Cloud Hypervisor-shaped API bodies to p2pvmm's configuration and back. An API `vm.create`
//! goes through the `--config` file's schema (`config::VmConfig`'s deserializer), so it gets
//! the same defaults and the same checks as a file, and errors name the same keys.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::config::{self, Placement, SerialConfig};

/// `vm.create`'s body as a p2pvmm configuration (not yet checked against the host).
pub fn vm_config(api: &api::VmConfig) -> Result<config::VmConfig, String> {
    api.validate().map_err(|e| e.to_string())?;
    let mut file = Map::new();
    let kernel = api
        .payload
        .kernel
        .as_ref()
        .ok_or("payload.kernel: required (p2pvmm boots a kernel directly)")?;
    file.insert("kernel".into(), json!(kernel));
    if let Some(initramfs) = &api.payload.initramfs {
        file.insert("initramfs".into(), json!(initramfs));
    }
    if let Some(cmdline) = &api.payload.cmdline {
        file.insert("cmdline".into(), json!(cmdline));
    }
    if let Some(cpus) = &api.cpus {
        file.insert("cpus".into(), json!(cpus.boot_vcpus));
    }
    if let Some(memory) = &api.memory {
        file.insert("memory".into(), memory_value(memory)?);
    }
    if let Some(serial) = serial(api)? {
        file.insert("serial".into(), json!(serial));
    }
    let mut groups: Vec<Value> = Vec::new();
    for group in api.p2p_groups.iter().flatten() {
        groups.push(p2p_group(group));
    }
    let mut devices = Vec::new();
    for (index, device) in api.devices.iter().flatten().enumerate() {
        let id = device.id.clone().unwrap_or_else(|| format!("dev{index}"));
        devices.push(device_table(device, &id)?);
        if let Some(name) = &device.p2p_group {
            join_group(&mut groups, name, &id)?;
        }
    }
    if !devices.is_empty() {
        file.insert("device".into(), Value::Array(devices));
    }
    if !groups.is_empty() {
        file.insert("p2p_group".into(), Value::Array(groups));
    }
    serde_json::from_value(Value::Object(file)).map_err(|e| e.to_string())
}

/// CH's `memory` as the file's `memory` value: the size in bytes, or with `hugepages` the
/// `size=...,hugepages=on,hugepage_size=...` text (CH's default huge page size is the host's,
/// 2M on x86).
fn memory_value(memory: &api::MemoryConfig) -> Result<Value, String> {
    if !memory.hugepages {
        if memory.hugepage_size.is_some() {
            return Err("memory.hugepage_size: needs memory.hugepages".to_owned());
        }
        return Ok(json!(memory.size));
    }
    let page = match memory.hugepage_size {
        None | Some(0x20_0000) => "2M",
        Some(0x4000_0000) => "1G",
        Some(other) => {
            return Err(format!(
                "memory.hugepage_size: {other} bytes: use 2097152 (2M) or 1073741824 (1G)"
            ))
        }
    };
    Ok(json!(format!(
        "size={},hugepages=on,hugepage_size={page}",
        memory.size
    )))
}

/// CH's `serial` (or, when that is absent, `console`) as p2pvmm's serial setting.
fn serial(api: &api::VmConfig) -> Result<Option<String>, String> {
    let Some(console) = api.serial.as_ref().or(api.console.as_ref()) else {
        return Ok(None);
    };
    Ok(Some(match console.mode {
        api::ConsoleMode::Tty => "stdout".to_owned(),
        api::ConsoleMode::Off | api::ConsoleMode::Null => "off".to_owned(),
        api::ConsoleMode::File => {
            let file = console
                .file
                .as_ref()
                .ok_or("serial.file: required with mode File")?;
            format!("file={file}")
        }
    }))
}

/// One `[[device]]` table of the file schema.
fn device_table(device: &api::DeviceConfig, id: &str) -> Result<Value, String> {
    device.validate().map_err(|e| e.to_string())?;
    let mut table = Map::new();
    table.insert("id".into(), json!(id));
    table.insert("path".into(), json!(device.path));
    match (device.placement.as_deref(), &device.switch) {
        (Some("switch"), None) if device.p2p_group.is_none() => {
            return Err(format!(
                "device {id}: placement \"switch\" needs a switch name or a p2p_group"
            ))
        }
        (Some("switch") | None, None) => {}
        (Some("switch") | None, Some(switch)) => {
            table.insert("switch".into(), json!(switch));
        }
        (Some(placement), None) => {
            table.insert("placement".into(), json!(placement));
        }
        (Some(placement), Some(_)) => {
            return Err(format!(
                "device {id}: placement \"{placement}\" and switch exclude each other"
            ))
        }
    }
    if let Some(clique) = device.x_nv_gpudirect_clique {
        table.insert("clique".into(), json!(clique));
    }
    Ok(Value::Object(table))
}

fn p2p_group(group: &api::P2pGroupConfig) -> Value {
    let mut table = Map::new();
    table.insert("name".into(), json!(group.name));
    table.insert("devices".into(), json!(group.devices));
    if let Some(mode) = &group.mode {
        table.insert("mode".into(), json!(mode));
    }
    if let Some(topology) = &group.topology {
        table.insert("topology".into(), json!(topology));
    }
    if let Some(slots) = group.slots {
        table.insert("slots".into(), json!(slots));
    }
    Value::Object(table)
}

/// Adds device `id` to the group called `name` (which `groups` must hold).
fn join_group(groups: &mut [Value], name: &str, id: &str) -> Result<(), String> {
    let group = groups
        .iter_mut()
        .find(|g| g["name"] == name)
        .ok_or_else(|| format!("device {id}: p2p_group: no group named {name:?}"))?;
    if let Some(devices) = group["devices"].as_array_mut() {
        if !devices.iter().any(|d| d == id) {
            devices.push(json!(id));
        }
    }
    Ok(())
}

/// The configuration as CH shows it in `vm.info`.
pub fn api_vm_config(config: &config::VmConfig) -> api::VmConfig {
    let group_of: BTreeMap<&str, &str> = config
        .p2p_groups
        .iter()
        .flat_map(|g| g.devices.iter().map(|d| (d.as_str(), g.name.as_str())))
        .collect();
    api::VmConfig {
        payload: api::PayloadConfig {
            firmware: None,
            kernel: Some(config.kernel.display().to_string()),
            initramfs: config.initramfs.as_ref().map(|p| p.display().to_string()),
            cmdline: Some(config.cmdline.clone()),
        },
        cpus: Some(api::CpusConfig {
            boot_vcpus: config.cpus,
            max_vcpus: Some(config.cpus),
        }),
        memory: Some(api::MemoryConfig {
            hugepages: config.memory.hugepages.is_some(),
            hugepage_size: config.memory.hugepages.map(|p| p.bytes()),
            ..api::MemoryConfig::of_size(config.memory.size.0)
        }),
        devices: Some(
            config
                .devices
                .iter()
                .map(|d| api_device(d, group_of.get(d.id.as_str()).copied()))
                .collect(),
        ),
        p2p_groups: Some(config.p2p_groups.iter().map(api_group).collect()),
        serial: Some(match &config.serial {
            SerialConfig::Stdout => api::ConsoleConfig {
                mode: api::ConsoleMode::Tty,
                file: None,
                iommu: false,
            },
            SerialConfig::Off => api::ConsoleConfig {
                mode: api::ConsoleMode::Off,
                file: None,
                iommu: false,
            },
            SerialConfig::File(path) => api::ConsoleConfig {
                mode: api::ConsoleMode::File,
                file: Some(path.display().to_string()),
                iommu: false,
            },
        }),
        console: None,
    }
}

pub fn api_device(device: &config::DeviceConfig, group: Option<&str>) -> api::DeviceConfig {
    let (placement, switch) = match &device.placement {
        Placement::Root => (Some("root".to_owned()), None),
        Placement::RootPort => (Some("root-port".to_owned()), None),
        Placement::Switch(name) => (Some("switch".to_owned()), Some(name.clone())),
    };
    api::DeviceConfig {
        path: device.path.display().to_string(),
        id: Some(device.id.clone()),
        x_nv_gpudirect_clique: device.clique,
        p2p_group: group.map(str::to_owned),
        placement,
        switch,
        ..Default::default()
    }
}

fn api_group(group: &config::P2pGroupConfig) -> api::P2pGroupConfig {
    api::P2pGroupConfig {
        name: group.name.clone(),
        devices: group.devices.clone(),
        mode: Some(group.mode.to_string()),
        topology: Some(group.topology.to_string()),
        slots: (group.slots > 0).then_some(group.slots),
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
