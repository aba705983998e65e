//! The real `ApiServer` on a socket in a temp dir, answered by a fake VMM thread that keeps a
//! small device list, driven through `Client` and through raw bytes where the wire format itself
//! is what is checked.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use api::{
    channel, ApiChannel, ApiFailure, ApiReply, ApiRequest, ApiResult, ApiServer, Client,
    DeviceNode, P2pTable, P2pTableRow, PciDeviceInfo, VmConfig, VmInfoResponse, VmState,
    VmmPingResponse,
};
use tempfile::TempDir;

/// What the fake VMM remembers: device id -> guest BDF.
#[derive(Default)]
struct FakeVm {
    devices: BTreeMap<String, String>,
    next_slot: u8,
}

impl FakeVm {
    fn answer(&mut self, request: ApiRequest) -> ApiResult {
        match request {
            ApiRequest::VmmPing => ApiReply::json(&VmmPingResponse {
                build_version: "test".into(),
                version: "0.1.0".into(),
                pid: i64::from(std::process::id()),
                features: vec!["p2p".into()],
            }),
            ApiRequest::VmInfo => ApiReply::json(&VmInfoResponse {
                config: VmConfig::default(),
                state: VmState::Running,
                memory_actual_size: None,
                device_tree: self
                    .devices
                    .iter()
                    .map(|(id, bdf)| {
                        let node = DeviceNode {
                            id: id.clone(),
                            pci_bdf: Some(bdf.clone()),
                            ..DeviceNode::default()
                        };
                        (id.clone(), node)
                    })
                    .collect(),
            }),
            ApiRequest::VmAddDevice(device) => {
                // Slow enough that concurrent requests overlap on the API side.
                thread::sleep(Duration::from_millis(200));
                let id = device
                    .id
                    .unwrap_or_else(|| format!("dev{}", self.next_slot));
                if self.devices.contains_key(&id) {
                    return Err(ApiFailure::conflict(format!("device id `{id}` is taken")));
                }
                self.next_slot += 1;
                let bdf = format!("0000:00:{:02x}.0", self.next_slot + 4);
                self.devices.insert(id.clone(), bdf.clone());
                ApiReply::json(&PciDeviceInfo { id, bdf })
            }
            ApiRequest::VmRemoveDevice(remove) => match self.devices.remove(&remove.id) {
                Some(_) => Ok(ApiReply::Empty),
                None => Err(ApiFailure::not_found(format!("no device `{}`", remove.id))),
            },
            ApiRequest::VmP2p => ApiReply::json(&P2pTable {
                rows: vec![P2pTableRow {
                    group: "g0".into(),
                    device: "shm".into(),
                    host_bdf: "0000:00:04.0".into(),
                    bar: 2,
                    area_offset: 0,
                    size: 64 << 20,
                    guest_start: Some(0xe000_0000),
                    mechanism: "dmabuf".into(),
                    state: "mapped".into(),
                }],
            }),
            _ => Ok(ApiReply::Empty),
        }
    }
}

/// Runs the fake VMM's event loop: wait on the eventfd, then drain.
fn run_fake_vmm(channel: ApiChannel) {
    let mut vm = FakeVm::default();
    loop {
        let mut pollfd = libc::pollfd {
            fd: channel.eventfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pollfd, 1, 1000) };
        for (request, responder) in channel.drain() {
            responder.send(vm.answer(request));
        }
    }
}

struct Setup {
    _dir: TempDir,
    socket: PathBuf,
}

impl Setup {
    fn client(&self) -> Client {
        Client::new(&self.socket)
    }
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (sender, vmm) = channel().unwrap();
    ApiServer::bind(&socket).unwrap().spawn(sender).unwrap();
    thread::spawn(move || run_fake_vmm(vmm));
    Setup { _dir: dir, socket }
}

/// Sends raw bytes and reads until the server closes. A reset after the answer (the server
/// closing with our unread bytes queued) still leaves the answer read.
fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(out).unwrap()
}

fn error_of(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).unwrap();
    value["error"].as_str().unwrap().to_string()
}

#[test]
fn ping_and_info_answer_from_the_vmm() {
    let setup = start();

    let (ping_status, ping) = setup.client().request("GET", "vmm.ping", None).unwrap();
    let (info_status, info) = setup.client().request("GET", "vm.info", None).unwrap();

    assert_eq!(ping_status, 200);
    assert_eq!(
        serde_json::from_str::<VmmPingResponse>(&ping)
            .unwrap()
            .version,
        "0.1.0"
    );
    assert_eq!(info_status, 200);
    let info: VmInfoResponse = serde_json::from_str(&info).unwrap();
    assert_eq!(info.state, VmState::Running);
}

#[test]
fn add_device_answers_id_and_bdf_and_refuses_a_duplicate() {
    let setup = start();
    let body = r#"{"path":"/sys/bus/pci/devices/0000:00:03.0","id":"gpu0"}"#;

    let (status, first) = setup
        .client()
        .request("PUT", "vm.add-device", Some(body))
        .unwrap();
    let (dup_status, dup) = setup
        .client()
        .request("PUT", "vm.add-device", Some(body))
        .unwrap();

    assert_eq!(status, 200);
    let info: PciDeviceInfo = serde_json::from_str(&first).unwrap();
    assert_eq!(
        (info.id.as_str(), info.bdf.as_str()),
        ("gpu0", "0000:00:05.0")
    );
    assert_eq!(dup_status, 409);
    assert_eq!(error_of(&dup), "device id `gpu0` is taken");
}

#[test]
fn removing_an_unknown_device_is_404() {
    let setup = start();

    let (status, body) = setup
        .client()
        .request("PUT", "vm.remove-device", Some(r#"{"id":"ghost"}"#))
        .unwrap();

    assert_eq!(status, 404);
    assert_eq!(error_of(&body), "no device `ghost`");
}

#[test]
fn bad_bodies_are_400_naming_the_problem() {
    let setup = start();
    let client = setup.client();

    let (malformed, _) = client
        .request("PUT", "vm.add-device", Some("{\"path\":"))
        .unwrap();
    let (unknown, unknown_body) = client
        .request(
            "PUT",
            "vm.add-device",
            Some(r#"{"path":"p","frobnicate":true}"#),
        )
        .unwrap();
    let (invalid, invalid_body) = client
        .request(
            "PUT",
            "vm.add-device",
            Some(r#"{"path":"p","pci_segment":1}"#),
        )
        .unwrap();

    assert_eq!(malformed, 400);
    assert_eq!(unknown, 400);
    assert!(
        error_of(&unknown_body).contains("frobnicate"),
        "{unknown_body}"
    );
    assert_eq!(invalid, 400);
    assert!(
        error_of(&invalid_body).starts_with("pci_segment: "),
        "{invalid_body}"
    );
}

#[test]
fn unknown_route_is_404_and_wrong_method_405() {
    let setup = start();

    let (missing, _) = setup.client().request("GET", "vm.counters", None).unwrap();
    let wrong = raw(&setup.socket, b"GET /api/v1/vm.boot HTTP/1.1\r\n\r\n");

    assert_eq!(missing, 404);
    assert!(wrong.starts_with("HTTP/1.1 405 \r\n"), "{wrong}");
    assert!(wrong.contains("\r\nAllow: PUT\r\n"), "{wrong}");
}

#[test]
fn five_mib_body_is_413_and_the_server_keeps_serving() {
    let setup = start();
    let size = 5 << 20;
    let mut request =
        format!("PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {size}\r\n\r\n").into_bytes();
    request.resize(request.len() + size, b' ');

    // Written in full and read to the end, as a client that does not expect an early answer
    // does: the refusal must arrive, not a reset connection.
    let mut stream = UnixStream::connect(&setup.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&request).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (after, _) = setup.client().request("GET", "vmm.ping", None).unwrap();

    assert!(answer.starts_with("HTTP/1.1 413 \r\n"), "{answer}");
    assert_eq!(after, 200);
}

#[test]
fn concurrent_add_devices_are_both_answered() {
    let setup = start();
    let spawn = |id: &'static str| {
        let client = setup.client();
        thread::spawn(move || {
            let body = format!(r#"{{"path":"0000:00:03.0","id":"{id}"}}"#);
            client.request("PUT", "vm.add-device", Some(&body)).unwrap()
        })
    };

    let (a, b) = (spawn("a"), spawn("b"));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());

    assert_eq!((a.0, b.0), (200, 200));
    let bdf = |body: &str| serde_json::from_str::<PciDeviceInfo>(body).unwrap().bdf;
    assert_ne!(bdf(&a.1), bdf(&b.1));
}

#[test]
fn wire_format_matches_cloud_hypervisor() {
    let setup = start();

    let ping = raw(
        &setup.socket,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    let boot = raw(
        &setup.socket,
        b"PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );

    let (head, body) = ping.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 \r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: application/json\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nContent-Length: {}", body.len())),
        "{head} / {} body bytes",
        body.len()
    );
    let (boot_head, boot_body) = boot.split_once("\r\n\r\n").unwrap();
    assert!(boot_head.starts_with("HTTP/1.1 204 \r\n"), "{boot_head}");
    assert!(!boot_head.contains("Content-Length"), "{boot_head}");
    assert_eq!(boot_body, "");
}

#[test]
fn openapi_document_is_served() {
    let setup = start();

    let (status, body) = setup.client().request("GET", "openapi.json", None).unwrap();

    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(doc["paths"]["/vm.add-p2p-group"]["put"].is_object());
}

#[test]
fn p2p_and_group_requests_reach_the_vmm() {
    let setup = start();
    let client = setup.client();

    let (table_status, table) = client.request("GET", "vm.p2p", None).unwrap();
    let group = r#"{"name":"g1","devices":["a","b"],"mode":"dmabuf","topology":"switch"}"#;
    let (group_status, _) = client
        .request("PUT", "vm.add-p2p-group", Some(group))
        .unwrap();
    let bad = r#"{"name":"g1","mode":"telepathy"}"#;
    let (bad_status, bad_body) = client
        .request("PUT", "vm.add-p2p-group", Some(bad))
        .unwrap();

    assert_eq!(table_status, 200);
    assert_eq!(
        serde_json::from_str::<P2pTable>(&table).unwrap().rows.len(),
        1
    );
    assert_eq!(group_status, 204);
    assert_eq!(bad_status, 400);
    assert!(error_of(&bad_body).starts_with("mode: "), "{bad_body}");
}

#[test]
fn socket_is_private_to_its_owner() {
    let setup = start();

    let mode = std::fs::metadata(&setup.socket)
        .unwrap()
        .permissions()
        .mode();

    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn second_bind_on_a_live_socket_fails_naming_it() {
    let setup = start();

    let error = ApiServer::bind(&setup.socket).unwrap_err().to_string();

    assert!(
        error.contains(&setup.socket.display().to_string()),
        "{error}"
    );
    assert!(error.contains("in use"), "{error}");
    let (still, _) = setup.client().request("GET", "vmm.ping", None).unwrap();
    assert_eq!(still, 200);
}

#[test]
fn stale_socket_without_a_lock_holder_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let (sender, vmm) = channel().unwrap();

    ApiServer::bind(&socket).unwrap().spawn(sender).unwrap();
    thread::spawn(move || run_fake_vmm(vmm));

    let (status, _) = Client::new(&socket)
        .request("GET", "vmm.ping", None)
        .unwrap();
    assert_eq!(status, 200);
}

#[test]
fn stopped_vmm_is_a_500_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (sender, vmm) = channel().unwrap();
    ApiServer::bind(&socket).unwrap().spawn(sender).unwrap();
    drop(vmm);

    let (status, body) = Client::new(&socket)
        .request("PUT", "vm.boot", None)
        .unwrap();

    assert_eq!(status, 500);
    assert_eq!(error_of(&body), "the VMM has stopped");
}

#[test]
fn silent_vmm_times_out_with_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (sender, _vmm) = channel().unwrap();
    ApiServer::bind(&socket)
        .unwrap()
        .with_reply_timeout(Duration::from_millis(100))
        .spawn(sender)
        .unwrap();

    let (status, body) = Client::new(&socket)
        .request("GET", "vm.info", None)
        .unwrap();

    assert_eq!(status, 500);
    assert!(
        error_of(&body).starts_with("the VMM did not answer"),
        "{body}"
    );
}

#[test]
fn remote_cli_exits_0_on_success_and_1_on_failure() {
    use api::cli::{run, RemoteArgs, RemoteCommand};
    let setup = start();
    let args = |socket: &Path, command| RemoteArgs {
        api_socket: socket.to_path_buf(),
        json: false,
        command,
    };

    let ok = run(args(&setup.socket, RemoteCommand::Ping));
    let refused = run(args(
        &setup.socket,
        RemoteCommand::RemoveDevice { id: "ghost".into() },
    ));
    let unreachable = run(args(Path::new("/nonexistent.sock"), RemoteCommand::Ping));

    assert_eq!(
        format!("{ok:?}"),
        format!("{:?}", std::process::ExitCode::SUCCESS)
    );
    assert_eq!(
        format!("{refused:?}"),
        format!("{:?}", std::process::ExitCode::FAILURE)
    );
    assert_eq!(
        format!("{unreachable:?}"),
        format!("{:?}", std::process::ExitCode::FAILURE)
    );
}

#[test]
fn connections_over_the_limit_are_503_and_others_still_served() {
    let setup = start();
    let idle: Vec<UnixStream> = (0..api::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&setup.socket).unwrap())
        .collect();

    let over = raw(&setup.socket, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
    drop(idle);
    // The idle connections' threads see EOF and free their slots shortly after.
    let after = (0..50)
        .map(|_| {
            thread::sleep(Duration::from_millis(100));
            setup.client().request("GET", "vmm.ping", None).unwrap().0
        })
        .find(|status| *status == 200)
        .unwrap_or(503);

    assert!(over.starts_with("HTTP/1.1 503 \r\n"), "{over}");
    assert_eq!(after, 200);
}

#[test]
fn a_slow_client_does_not_block_others_and_gets_408() {
    let setup = start();
    let mut slow = UnixStream::connect(&setup.socket).unwrap();
    slow.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n")
        .unwrap();

    let started = std::time::Instant::now();
    let (other, _) = setup.client().request("GET", "vmm.ping", None).unwrap();
    let other_took = started.elapsed();
    let mut answer = String::new();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = slow.read_to_string(&mut answer);

    assert_eq!(other, 200);
    assert!(other_took < api::IO_TIMEOUT, "{other_took:?}");
    assert!(answer.starts_with("HTTP/1.1 408 \r\n"), "{answer}");
}
