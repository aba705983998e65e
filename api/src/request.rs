//! What crosses from the API thread to the VMM thread and back. The API thread only parses and
//! validates; every action on the VM happens on the VMM thread, which owns the VM. A request is
//! sent over an mpsc channel together with a one-shot reply channel, and an `EventFd` is written
//! after each send so the VMM's epoll loop wakes without polling the channel.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::types::{DeviceConfig, P2pGroupConfig, VmConfig, VmRemoveDevice};

/// One API action for the VMM thread. Bodies are already parsed and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    VmmPing,
    VmInfo,
    VmCreate(Box<VmConfig>),
    VmBoot,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmPowerButton,
    VmmShutdown,
    VmAddDevice(DeviceConfig),
    VmRemoveDevice(VmRemoveDevice),
    VmP2p,
    VmAddP2pGroup(P2pGroupConfig),
}

/// A successful answer: `Empty` becomes 204 No Content, `Json` becomes 200 with that body.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiReply {
    Empty,
    Json(serde_json::Value),
}

impl ApiReply {
    /// A 200 reply carrying `value` serialized, e.g. a [`crate::VmInfoResponse`].
    pub fn json<T: Serialize>(value: &T) -> ApiResult {
        serde_json::to_value(value)
            .map(ApiReply::Json)
            .map_err(|e| ApiFailure::internal(format!("cannot serialize the reply: {e}")))
    }
}

/// A failed request: the HTTP status (400, 404, 409, 500) and a message for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: u16,
    pub message: String,
}

impl ApiFailure {
    pub fn new(status: u16, message: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status,
            message: message.into(),
        }
    }

    /// The request is wrong (bad value, missing VM config).
    pub fn bad_request(message: impl Into<String>) -> ApiFailure {
        ApiFailure::new(400, message)
    }

    /// What the request names does not exist (no VM, no device with that id).
    pub fn not_found(message: impl Into<String>) -> ApiFailure {
        ApiFailure::new(404, message)
    }

    /// The request clashes with the current state (duplicate id, VM already booted).
    pub fn conflict(message: impl Into<String>) -> ApiFailure {
        ApiFailure::new(409, message)
    }

    /// The VMM tried and failed.
    pub fn internal(message: impl Into<String>) -> ApiFailure {
        ApiFailure::new(500, message)
    }
}

pub type ApiResult = Result<ApiReply, ApiFailure>;

type Envelope = (ApiRequest, Sender<ApiResult>);

/// The API thread's end: sends requests and waits for their answers. Cheap to clone, one per
/// connection.
#[derive(Clone, Debug)]
pub struct ApiSender {
    requests: Sender<Envelope>,
    wake: Arc<EventFd>,
}

impl ApiSender {
    /// Sends `request` to the VMM and waits up to `timeout` for its answer. A stopped VMM (its
    /// [`ApiChannel`] dropped) and a VMM that does not answer in time are 500s naming the cause.
    pub fn request(&self, request: ApiRequest, timeout: Duration) -> ApiResult {
        let (reply_tx, reply_rx) = mpsc::channel();
        if self.requests.send((request, reply_tx)).is_err() {
            return Err(ApiFailure::internal("the VMM has stopped"));
        }
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the VMM thread for an API request: {e}");
        }
        match reply_rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(ApiFailure::internal(format!(
                "the VMM did not answer within {timeout:?}"
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(ApiFailure::internal("the VMM has stopped before answering"))
            }
        }
    }
}

/// Where the VMM answers one request. Dropping it unanswered makes the request a 500.
#[derive(Debug)]
pub struct Responder {
    reply: Sender<ApiResult>,
}

impl Responder {
    /// Answers the request. If the API side already gave up (timeout, client gone) the answer
    /// is dropped: the VMM has nothing to do about it.
    pub fn send(self, result: ApiResult) {
        if self.reply.send(result).is_err() {
            log::debug!("API request answered after its client went away");
        }
    }
}

/// The VMM thread's end. Register [`ApiChannel::eventfd`] in the event loop; when it is
/// readable, call [`ApiChannel::drain`] (or read the eventfd, then [`ApiChannel::try_recv`]
/// until `None`). Reading the eventfd before draining means a request sent meanwhile writes it
/// again, so no request is left waiting for a wake-up that already happened.
#[derive(Debug)]
pub struct ApiChannel {
    requests: Receiver<Envelope>,
    wake: Arc<EventFd>,
}

impl ApiChannel {
    /// Readable when requests are waiting. Non-blocking.
    pub fn eventfd(&self) -> &EventFd {
        &self.wake
    }

    /// The next waiting request, if any.
    pub fn try_recv(&self) -> Option<(ApiRequest, Responder)> {
        match self.requests.try_recv() {
            Ok((request, reply)) => Some((request, Responder { reply })),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }

    /// Clears the eventfd and takes every waiting request, in arrival order.
    pub fn drain(&self) -> Vec<(ApiRequest, Responder)> {
        // EAGAIN (counter already 0) is the only expected error on a non-blocking eventfd.
        let _ = self.wake.read();
        std::iter::from_fn(|| self.try_recv()).collect()
    }
}

/// A connected pair: the sender for the API server, the channel for the VMM's event loop.
pub fn channel() -> std::io::Result<(ApiSender, ApiChannel)> {
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (requests_tx, requests_rx) = mpsc::channel();
    Ok((
        ApiSender {
            requests: requests_tx,
            wake: Arc::clone(&wake),
        },
        ApiChannel {
            requests: requests_rx,
            wake,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn request_reaches_the_vmm_and_its_answer_comes_back() {
        let (sender, channel) = channel().unwrap();
        let vmm = thread::spawn(move || loop {
            let waiting = channel.drain();
            if let Some((request, responder)) = waiting.into_iter().next() {
                assert_eq!(request, ApiRequest::VmBoot);
                responder.send(Err(ApiFailure::conflict("already booted")));
                return;
            }
            thread::sleep(Duration::from_millis(5));
        });

        let result = sender.request(ApiRequest::VmBoot, Duration::from_secs(10));

        vmm.join().unwrap();
        assert_eq!(result, Err(ApiFailure::conflict("already booted")));
    }

    #[test]
    fn send_writes_the_eventfd() {
        let (sender, channel) = channel().unwrap();
        let client =
            thread::spawn(move || sender.request(ApiRequest::VmmPing, Duration::from_secs(10)));
        while channel.eventfd().read().is_err() {
            thread::sleep(Duration::from_millis(5));
        }

        let (request, responder) = channel.try_recv().unwrap();
        responder.send(Ok(ApiReply::Empty));

        assert_eq!(request, ApiRequest::VmmPing);
        assert_eq!(client.join().unwrap(), Ok(ApiReply::Empty));
    }

    #[test]
    fn stopped_vmm_is_a_500() {
        let (sender, channel) = channel().unwrap();
        drop(channel);

        let result = sender.request(ApiRequest::VmInfo, Duration::from_secs(1));

        assert_eq!(result, Err(ApiFailure::internal("the VMM has stopped")));
    }

    #[test]
    fn silent_vmm_times_out() {
        let (sender, _channel) = channel().unwrap();

        let result = sender.request(ApiRequest::VmInfo, Duration::from_millis(50));

        assert_eq!(
            result.unwrap_err().message,
            "the VMM did not answer within 50ms"
        );
    }
}
