//! The VMM's control loop: boots the VM given at start, or waits for the API to create and boot
//! one, and answers API requests on the VMM thread (the HTTP thread only parses and forwards, as
//! in Cloud Hypervisor and Firecracker), so a request never races the VM it changes.

pub mod convert;
mod running;

use std::sync::Arc;

use api::{ApiChannel, ApiFailure, ApiReply, ApiRequest, ApiResult, Responder, VmState};
use devices::legacy::{ExitSignal, GuestExit};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{HostLimits, VmConfig};
use crate::event_loop::EventLoop;
use crate::signals::StopSignals;
use crate::vm::{Vm, VmEnd, VmError};

/// An API request that ends the running VM; answered once it is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiStop {
    /// `vm.shutdown`: the VM stops, the VMM keeps serving (it may be booted again).
    Shutdown,
    /// `vm.reboot`: the VM stops and boots again from the same configuration.
    Reboot,
    /// `vmm.shutdown`: the VM stops and p2pvmm exits.
    VmmShutdown,
}

/// How the VMM ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest ended (poweroff, reset, crash) or a stop signal ended p2pvmm.
    Guest(GuestExit),
    /// `vmm.shutdown`.
    VmmShutdown,
}

/// Where the VM is in its life, between runs.
enum Phase {
    /// No `vm.create` yet.
    Empty,
    /// Created (or shut down): this configuration boots on `vm.boot`.
    Created { config: VmConfig, shut_down: bool },
    /// Boot this now.
    Boot(VmConfig),
}

/// The VMM side of the API channel, with what it needs to answer without a VM.
pub struct ApiService {
    channel: ApiChannel,
    host: HostLimits,
    /// The stop request being carried out, answered once the VM is down.
    pending: Option<Responder>,
}

impl ApiService {
    pub fn new(channel: ApiChannel, host: HostLimits) -> Self {
        Self {
            channel,
            host,
            pending: None,
        }
    }

    pub fn eventfd(&self) -> &EventFd {
        self.channel.eventfd()
    }

    fn answer_pending(&mut self, result: ApiResult) {
        if let Some(responder) = self.pending.take() {
            responder.send(result);
        }
    }

    /// Serves every queued request while no VM runs; returns the next phase when one changed it.
    fn serve_idle(&mut self, phase: &mut Phase) -> Option<Outcome> {
        while let Some((request, responder)) = self.channel.try_recv() {
            log::info!("API: {}", running::request_name(&request));
            if let ApiRequest::VmmShutdown = request {
                responder.send(Ok(ApiReply::Empty));
                return Some(Outcome::VmmShutdown);
            }
            if let (ApiRequest::VmBoot, Phase::Created { config, .. }) = (&request, &*phase) {
                // Answered once the VM is built (or failed to be).
                *phase = Phase::Boot(config.clone());
                self.pending = Some(responder);
                return None;
            }
            responder.send(self.idle_request(request, phase));
        }
        None
    }

    fn idle_request(&mut self, request: ApiRequest, phase: &mut Phase) -> ApiResult {
        let not_created = || ApiFailure::not_found("the VM is not created (PUT vm.create first)");
        match (request, &mut *phase) {
            (ApiRequest::VmmPing, _) => running::ping(),
            (
                ApiRequest::VmCreate(body),
                Phase::Empty
                | Phase::Created {
                    shut_down: true, ..
                },
            ) => {
                let config =
                    self.checked(convert::vm_config(&body).map_err(ApiFailure::bad_request)?)?;
                *phase = Phase::Created {
                    config,
                    shut_down: false,
                };
                Ok(ApiReply::Empty)
            }
            (ApiRequest::VmCreate(_), _) => Err(ApiFailure::conflict("the VM is already created")),
            (ApiRequest::VmInfo, Phase::Created { config, shut_down }) => {
                let state = if *shut_down {
                    VmState::Shutdown
                } else {
                    VmState::Created
                };
                ApiReply::json(&api::VmInfoResponse {
                    config: convert::api_vm_config(config),
                    state,
                    memory_actual_size: Some(config.memory.size.0),
                    device_tree: Default::default(),
                })
            }
            (ApiRequest::VmAddDevice(device), Phase::Created { config, .. }) => {
                let mut next = config.clone();
                running::add_to_config(&mut next, &device)?;
                *config = self.checked(next)?;
                Ok(ApiReply::Empty)
            }
            (ApiRequest::VmRemoveDevice(remove), Phase::Created { config, .. }) => {
                running::remove_from_config(config, &remove.id)?;
                Ok(ApiReply::Empty)
            }
            (ApiRequest::VmAddP2pGroup(group), Phase::Created { config, .. }) => {
                let mut next = config.clone();
                running::add_group_to_config(&mut next, &group)?;
                *config = self.checked(next)?;
                Ok(ApiReply::Empty)
            }
            (_, Phase::Empty) => Err(not_created()),
            (request, _) => Err(ApiFailure::conflict(format!(
                "{}: the VM is not running",
                running::request_name(&request)
            ))),
        }
    }

    /// A configuration from the API, checked against the host as a command line would be.
    fn checked(&self, config: VmConfig) -> Result<VmConfig, ApiFailure> {
        config
            .validate(&self.host)
            .map_err(|e| ApiFailure::bad_request(crate::error_chain(&e)))?;
        Ok(config)
    }
}

/// Runs the VMM: boots `config` if given, else waits for the API; returns how it ended.
pub fn run(config: Option<VmConfig>, mut api: Option<ApiService>) -> Result<Outcome, VmError> {
    let mut phase = match config {
        Some(config) => Phase::Boot(config),
        None => Phase::Empty,
    };
    loop {
        phase = match phase {
            Phase::Boot(config) => match boot(&config, api.as_mut()) {
                Ok(VmEnd::Guest(exit)) => return Ok(Outcome::Guest(exit)),
                Ok(VmEnd::Api(stop)) => match stop {
                    ApiStop::VmmShutdown => {
                        answer(&mut api, Ok(ApiReply::Empty));
                        return Ok(Outcome::VmmShutdown);
                    }
                    // Answered once the new VM is built.
                    ApiStop::Reboot => Phase::Boot(config),
                    ApiStop::Shutdown => {
                        answer(&mut api, Ok(ApiReply::Empty));
                        Phase::Created {
                            config,
                            shut_down: true,
                        }
                    }
                },
                // A boot the API asked for fails to its client; the VMM stays up.
                Err(e) if api.as_ref().is_some_and(|a| a.pending.is_some()) => {
                    let message = crate::error_chain(&e);
                    log::error!("booting the VM: {message}");
                    answer(&mut api, Err(ApiFailure::internal(message)));
                    Phase::Created {
                        config,
                        shut_down: false,
                    }
                }
                Err(e) => return Err(e),
            },
            mut idle => {
                let Some(api) = api.as_mut() else {
                    return Ok(Outcome::Guest(GuestExit::Poweroff));
                };
                if let Some(outcome) = wait_idle(api, &mut idle)? {
                    return Ok(outcome);
                }
                idle
            }
        };
    }
}

fn answer(api: &mut Option<ApiService>, result: ApiResult) {
    if let Some(api) = api.as_mut() {
        api.answer_pending(result);
    }
}

/// Builds and runs one VM; a pending `vm.boot` or `vm.reboot` is answered once it is built.
fn boot(config: &VmConfig, mut api: Option<&mut ApiService>) -> Result<VmEnd, VmError> {
    let vm = Vm::new(config)?;
    if let Some(api) = api.as_deref_mut() {
        api.answer_pending(Ok(ApiReply::Empty));
    }
    vm.run(api)
}

/// Serves the API with no VM running until a request boots one, `vmm.shutdown`, or a stop
/// signal.
fn wait_idle(api: &mut ApiService, phase: &mut Phase) -> Result<Option<Outcome>, VmError> {
    let exit = Arc::new(ExitSignal::new().map_err(|source| VmError::Io {
        what: "creating the exit eventfd",
        source,
    })?);
    let stop = StopSignals::new(exit.clone()).map_err(|source| VmError::Io {
        what: "watching for SIGTERM/SIGINT/SIGHUP",
        source,
    })?;
    let mut events = EventLoop::new(&exit, None, stop, &[api.eventfd()])?;
    loop {
        // Requests may have queued before the loop existed.
        if let Some(outcome) = api.serve_idle(phase) {
            return Ok(Some(outcome));
        }
        if matches!(phase, Phase::Boot(_)) {
            return Ok(None);
        }
        if exit.reason().is_some() {
            return Ok(Some(Outcome::Guest(GuestExit::Stopped)));
        }
        events.wait()?;
    }
}
