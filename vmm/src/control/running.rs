//! API requests against a running VM, and the configuration edits `vm.add-device`,
//! `vm.remove-device` and `vm.add-p2p-group` make before it boots.

use api::{ApiFailure, ApiReply, ApiRequest, ApiResult, VmState};

use super::{convert, ApiService, ApiStop};
use crate::config::{P2pGroupConfig, VmConfig};
use crate::vm::RunningVm;

/// The endpoint a request came in on, for logs and errors.
pub fn request_name(request: &ApiRequest) -> &'static str {
    match request {
        ApiRequest::VmmPing => "vmm.ping",
        ApiRequest::VmInfo => "vm.info",
        ApiRequest::VmCreate(_) => "vm.create",
        ApiRequest::VmBoot => "vm.boot",
        ApiRequest::VmPause => "vm.pause",
        ApiRequest::VmResume => "vm.resume",
        ApiRequest::VmShutdown => "vm.shutdown",
        ApiRequest::VmReboot => "vm.reboot",
        ApiRequest::VmPowerButton => "vm.power-button",
        ApiRequest::VmmShutdown => "vmm.shutdown",
        ApiRequest::VmAddDevice(_) => "vm.add-device",
        ApiRequest::VmRemoveDevice(_) => "vm.remove-device",
        ApiRequest::VmP2p => "vm.p2p",
        ApiRequest::VmAddP2pGroup(_) => "vm.add-p2p-group",
    }
}

pub fn ping() -> ApiResult {
    ApiReply::json(&api::VmmPingResponse {
        build_version: env!("CARGO_PKG_VERSION").to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: i64::from(std::process::id()),
        features: vec!["p2p_groups".to_owned(), "vfio_hotplug".to_owned()],
    })
}

/// Adds `device` to a configuration that has not booted; returns its id.
pub fn add_to_config(
    config: &mut VmConfig,
    device: &api::DeviceConfig,
) -> Result<String, ApiFailure> {
    let id = device.id.clone().unwrap_or_else(|| fresh_id(config));
    if config.devices.iter().any(|d| d.id == id) {
        return Err(ApiFailure::conflict(format!(
            "a device with id {id:?} exists"
        )));
    }
    let mut api_config = convert::api_vm_config(config);
    let mut with_id = device.clone();
    with_id.id = Some(id.clone());
    api_config
        .devices
        .get_or_insert_with(Vec::new)
        .push(with_id);
    *config = convert::vm_config(&api_config).map_err(ApiFailure::bad_request)?;
    Ok(id)
}

/// The first `devN` no device has.
pub fn fresh_id(config: &VmConfig) -> String {
    (config.devices.len()..)
        .map(|n| format!("dev{n}"))
        .find(|id| config.devices.iter().all(|d| &d.id != id))
        .unwrap_or_else(|| "dev".to_owned())
}

pub fn remove_from_config(config: &mut VmConfig, id: &str) -> Result<(), ApiFailure> {
    let before = config.devices.len();
    config.devices.retain(|d| d.id != id);
    if config.devices.len() == before {
        return Err(ApiFailure::not_found(format!("no device with id {id:?}")));
    }
    for group in &mut config.p2p_groups {
        group.devices.retain(|d| d != id);
    }
    Ok(())
}

pub fn add_group_to_config(
    config: &mut VmConfig,
    group: &api::P2pGroupConfig,
) -> Result<(), ApiFailure> {
    if config.p2p_groups.iter().any(|g| g.name == group.name) {
        return Err(ApiFailure::conflict(format!(
            "a P2P group named {:?} exists",
            group.name
        )));
    }
    let mut api_config = convert::api_vm_config(config);
    api_config
        .p2p_groups
        .get_or_insert_with(Vec::new)
        .push(group.clone());
    *config = convert::vm_config(&api_config).map_err(ApiFailure::bad_request)?;
    Ok(())
}

/// The P2P tables of a running VM.
fn p2p(vm: &RunningVm<'_>) -> ApiResult {
    ApiReply::json(&crate::device_manager::api_table(vm.devices.p2p_rows()))
}

fn info(vm: &RunningVm<'_>) -> ApiResult {
    let state = if vm.is_paused() {
        VmState::Paused
    } else {
        VmState::Running
    };
    let device_tree = vm
        .devices
        .placements()
        .into_iter()
        .map(|(id, bdf)| {
            let node = api::DeviceNode {
                id: id.clone(),
                pci_bdf: Some(bdf.to_string()),
                ..Default::default()
            };
            (id, node)
        })
        .collect();
    ApiReply::json(&api::VmInfoResponse {
        config: convert::api_vm_config(vm.config),
        state,
        memory_actual_size: Some(vm.config.memory.size.0),
        device_tree,
    })
}

impl ApiService {
    /// Serves every queued request against the running VM; returns a stop when one asked the
    /// VM to end (its answer waits in `pending` until the VM is down).
    pub fn serve_running(&mut self, vm: &mut RunningVm<'_>) -> Option<ApiStop> {
        while let Some((request, responder)) = self.channel.try_recv() {
            let name = request_name(&request);
            log::info!("API: {name}");
            let stop = match request {
                ApiRequest::VmShutdown => Some(ApiStop::Shutdown),
                ApiRequest::VmReboot => Some(ApiStop::Reboot),
                ApiRequest::VmmShutdown => Some(ApiStop::VmmShutdown),
                _ => None,
            };
            if let Some(stop) = stop {
                self.pending = Some(responder);
                return Some(stop);
            }
            let result = self.running_request(request, vm);
            if let Err(e) = &result {
                log::warn!("API: {name}: {} {}", e.status, e.message);
            }
            responder.send(result);
        }
        None
    }

    fn running_request(&mut self, request: ApiRequest, vm: &mut RunningVm<'_>) -> ApiResult {
        match request {
            ApiRequest::VmmPing => ping(),
            ApiRequest::VmInfo => info(vm),
            ApiRequest::VmP2p => p2p(vm),
            ApiRequest::VmCreate(_) => Err(ApiFailure::conflict("the VM is already created")),
            ApiRequest::VmBoot => Err(ApiFailure::conflict("the VM is already running")),
            ApiRequest::VmPause if vm.is_paused() => {
                Err(ApiFailure::conflict("the VM is already paused"))
            }
            ApiRequest::VmPause => {
                vm.pause();
                Ok(ApiReply::Empty)
            }
            ApiRequest::VmResume if !vm.is_paused() => {
                Err(ApiFailure::conflict("the VM is not paused"))
            }
            ApiRequest::VmResume => {
                vm.resume();
                Ok(ApiReply::Empty)
            }
            ApiRequest::VmPowerButton => vm
                .devices
                .power_button()
                .map(|()| ApiReply::Empty)
                .map_err(|e| ApiFailure::internal(e.to_string())),
            ApiRequest::VmAddDevice(device) => self.hot_add(vm, &device),
            ApiRequest::VmRemoveDevice(remove) => {
                vm.devices.hot_remove(&remove.id).map(|()| ApiReply::Empty)
            }
            ApiRequest::VmAddP2pGroup(group) => Err(ApiFailure::conflict(format!(
                "P2P group {:?}: groups are added before boot (the group's switch and slots are \
                 part of the guest's topology)",
                group.name
            ))),
            ApiRequest::VmShutdown | ApiRequest::VmReboot | ApiRequest::VmmShutdown => Err(
                ApiFailure::internal("stop requests are handled before this"),
            ),
        }
    }

    /// `vm.add-device` on a running VM: the same checks as a cold-plugged device, then hotplug.
    fn hot_add(&mut self, vm: &mut RunningVm<'_>, device: &api::DeviceConfig) -> ApiResult {
        let mut next = vm.config.clone();
        let id = add_to_config(&mut next, device)?;
        let next = self.checked(next)?;
        let Some(added) = next.devices.iter().find(|d| d.id == id) else {
            return Err(ApiFailure::internal(format!(
                "device {id} vanished from the config"
            )));
        };
        let group = next.group_of(&id).map(|g: &P2pGroupConfig| g.name.clone());
        let clique = next
            .clique_of(&id, crate::config::host_vendor)
            .map_err(|e| ApiFailure::bad_request(e.to_string()))?;
        let bdf = vm.devices.hot_add(added, group.as_deref(), clique)?;
        vm.set_config(next);
        ApiReply::json(&api::PciDeviceInfo {
            id,
            bdf: bdf.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        super::convert::vm_config(
            &serde_json::from_str(
                r#"{"payload": {"kernel": "/k"},
                    "devices": [{"path": "0000:00:03.0", "id": "edu", "p2p_group": "g"}],
                    "p2p_groups": [{"name": "g", "slots": 1}]}"#,
            )
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn devices_come_and_go_from_the_config_with_their_group() {
        let mut config = config();
        let shm = api::DeviceConfig {
            path: "0000:00:04.0".into(),
            p2p_group: Some("g".into()),
            ..Default::default()
        };
        let id = add_to_config(&mut config, &shm).unwrap();
        assert_eq!(id, "dev1");
        assert_eq!(config.group_of("dev1").map(|g| g.name.as_str()), Some("g"));
        let again = api::DeviceConfig {
            id: Some("edu".into()),
            ..shm.clone()
        };
        assert_eq!(add_to_config(&mut config, &again).unwrap_err().status, 409);
        remove_from_config(&mut config, "dev1").unwrap();
        assert!(config.group_of("dev1").is_none());
        assert_eq!(config.devices.len(), 1);
        assert_eq!(
            remove_from_config(&mut config, "dev1").unwrap_err().status,
            404
        );
    }

    #[test]
    fn groups_are_added_once() {
        let mut config = config();
        let group = api::P2pGroupConfig {
            name: "h".into(),
            slots: Some(2),
            ..Default::default()
        };
        add_group_to_config(&mut config, &group).unwrap();
        assert_eq!(config.p2p_groups[1].slots, 2);
        assert_eq!(
            add_group_to_config(&mut config, &group).unwrap_err().status,
            409
        );
    }
}
