//! `p2pvmm remote`: drives a running p2pvmm through its API socket. Prints a short human answer
//! by default and the raw JSON with `--json`; any non-2xx answer or connection failure goes to
//! stderr as one line and exits 1. Device and group specs use the same comma-separated
//! `key=value` form as p2pvmm's `--device` and `--p2p-group` flags.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::p2p_table::{format_table, P2pTable};
use crate::types::{
    DeviceConfig, ErrorBody, P2pGroupConfig, PciDeviceInfo, VmInfoResponse, VmRemoveDevice,
    VmmPingResponse,
};

/// Control a running p2pvmm through its API socket.
#[derive(Debug, Parser)]
#[command(name = "p2pvmm remote")]
pub struct RemoteArgs {
    /// The API socket of the p2pvmm to control (its `--api-socket`).
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Print the API's JSON answer as it came instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: RemoteCommand,
}

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Check the VMM answers; prints its version.
    Ping,
    /// The VM's state and each device with its guest BDF.
    Info,
    /// The P2P table: each BAR area of each P2P group member, where it is and whether mapped.
    P2p,
    /// Create the VM from a JSON file in Cloud Hypervisor's vm.create format.
    Create { file: PathBuf },
    /// Boot the created VM.
    Boot,
    /// Pause the running VM.
    Pause,
    /// Resume the paused VM.
    Resume,
    /// Shut the VM down.
    Shutdown,
    /// Reboot the VM.
    Reboot,
    /// Press the VM's ACPI power button.
    PowerButton,
    /// Stop the p2pvmm process.
    ShutdownVmm,
    /// Hot-plug a device: path=...,id=...,p2p_group=...,placement=...,switch=...,clique=N
    AddDevice {
        #[arg(value_parser = parse_device_spec)]
        spec: DeviceConfig,
    },
    /// Hot-unplug the device with this id.
    RemoveDevice { id: String },
    /// Add a P2P group: name=g,devices=a:b,mode=...,topology=...,slots=N
    AddP2pGroup {
        #[arg(value_parser = parse_group_spec)]
        spec: P2pGroupConfig,
    },
}

/// `key=value` pairs of a spec, refusing repeated keys and pairs without `=`.
fn pairs(spec: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut seen = Vec::new();
    spec.split(',')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            if seen.contains(&key) {
                return Err(format!("{key} given twice"));
            }
            seen.push(key);
            Ok((key, value))
        })
        .collect()
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{key}: `{value}` is not a number in range"))
}

/// Parses `path=...,id=...,p2p_group=...,placement=...,switch=...,clique=N`.
pub fn parse_device_spec(spec: &str) -> Result<DeviceConfig, String> {
    let mut device = DeviceConfig::default();
    for (key, value) in pairs(spec)? {
        match key {
            "path" => device.path = value.to_string(),
            "id" => device.id = Some(value.to_string()),
            "p2p_group" => device.p2p_group = Some(value.to_string()),
            "placement" => device.placement = Some(value.to_string()),
            "switch" => device.switch = Some(value.to_string()),
            "clique" => device.x_nv_gpudirect_clique = Some(number(key, value)?),
            other => {
                return Err(format!(
                    "unknown key `{other}` (known: path, id, p2p_group, placement, switch, clique)"
                ))
            }
        }
    }
    if device.path.is_empty() {
        return Err("path= is required".into());
    }
    device.validate().map_err(|e| e.to_string())?;
    Ok(device)
}

/// Parses `name=g,devices=a:b,mode=...,topology=...,slots=N`.
pub fn parse_group_spec(spec: &str) -> Result<P2pGroupConfig, String> {
    let mut group = P2pGroupConfig::default();
    for (key, value) in pairs(spec)? {
        match key {
            "name" => group.name = value.to_string(),
            "devices" => {
                group.devices = value
                    .split(':')
                    .filter(|d| !d.is_empty())
                    .map(String::from)
                    .collect()
            }
            "mode" => group.mode = Some(value.to_string()),
            "topology" => group.topology = Some(value.to_string()),
            "slots" => group.slots = Some(number(key, value)?),
            other => {
                return Err(format!(
                    "unknown key `{other}` (known: name, devices, mode, topology, slots)"
                ))
            }
        }
    }
    if group.name.is_empty() {
        return Err("name= is required".into());
    }
    group.validate().map_err(|e| e.to_string())?;
    Ok(group)
}

/// The JSON of a request type; these hold only strings and numbers, so it cannot fail.
fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Method, endpoint and body of the command's request.
fn request_of(
    command: &RemoteCommand,
) -> Result<(&'static str, &'static str, Option<String>), String> {
    Ok(match command {
        RemoteCommand::Ping => ("GET", "vmm.ping", None),
        RemoteCommand::Info => ("GET", "vm.info", None),
        RemoteCommand::P2p => ("GET", "vm.p2p", None),
        RemoteCommand::Create { file } => {
            let body = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            ("PUT", "vm.create", Some(body))
        }
        RemoteCommand::Boot => ("PUT", "vm.boot", None),
        RemoteCommand::Pause => ("PUT", "vm.pause", None),
        RemoteCommand::Resume => ("PUT", "vm.resume", None),
        RemoteCommand::Shutdown => ("PUT", "vm.shutdown", None),
        RemoteCommand::Reboot => ("PUT", "vm.reboot", None),
        RemoteCommand::PowerButton => ("PUT", "vm.power-button", None),
        RemoteCommand::ShutdownVmm => ("PUT", "vmm.shutdown", None),
        RemoteCommand::AddDevice { spec } => ("PUT", "vm.add-device", Some(to_json(spec))),
        RemoteCommand::RemoveDevice { id } => (
            "PUT",
            "vm.remove-device",
            Some(to_json(&VmRemoveDevice { id: id.clone() })),
        ),
        RemoteCommand::AddP2pGroup { spec } => ("PUT", "vm.add-p2p-group", Some(to_json(spec))),
    })
}

fn decode<T: DeserializeOwned>(body: &str) -> Result<T, String> {
    serde_json::from_str(body).map_err(|e| format!("unexpected answer from the VMM: {e}"))
}

/// The human form of a successful answer.
pub fn describe(command: &RemoteCommand, body: &str) -> Result<String, String> {
    Ok(match command {
        RemoteCommand::Ping => format!("{}\n", decode::<VmmPingResponse>(body)?.version),
        RemoteCommand::Info => {
            let info: VmInfoResponse = decode(body)?;
            let mut out = format!("state: {:?}\n", info.state);
            for node in info.device_tree.values() {
                if let Some(bdf) = &node.pci_bdf {
                    out.push_str(&format!("{} {bdf}\n", node.id));
                }
            }
            out
        }
        RemoteCommand::P2p => format_table(&decode::<P2pTable>(body)?),
        RemoteCommand::AddDevice { .. } => {
            let info: PciDeviceInfo = decode(body)?;
            format!("id {} at {}\n", info.id, info.bdf)
        }
        _ if body.is_empty() => String::new(),
        _ => format!("{body}\n"),
    })
}

/// The message of an error answer: the `error` of `{"error": ...}`, else the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| body.trim().to_string())
}

/// Runs the command; exit 1 on any failure, with one line on stderr.
pub fn run(args: RemoteArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("p2pvmm remote: {message}");
        ExitCode::FAILURE
    };
    let (method, endpoint, body) = match request_of(&args.command) {
        Ok(request) => request,
        Err(message) => return fail(message),
    };
    let client = Client::new(&args.api_socket);
    let (status, answer) = match client.request(method, endpoint, body.as_deref()) {
        Ok(reply) => reply,
        Err(e) => return fail(e.to_string()),
    };
    if !(200..300).contains(&status) {
        return fail(format!("{status}: {}", error_message(&answer)));
    }
    if args.json {
        if !answer.is_empty() {
            println!("{answer}");
        }
        return ExitCode::SUCCESS;
    }
    match describe(&args.command, &answer) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => fail(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_sets_every_key() {
        let spec = "path=0000:00:03.0,id=gpu0,p2p_group=g0,placement=switch,switch=sw0,clique=3";

        let device = parse_device_spec(spec).unwrap();

        assert_eq!(
            device,
            DeviceConfig {
                path: "0000:00:03.0".into(),
                id: Some("gpu0".into()),
                p2p_group: Some("g0".into()),
                placement: Some("switch".into()),
                switch: Some("sw0".into()),
                x_nv_gpudirect_clique: Some(3),
                ..DeviceConfig::default()
            }
        );
    }

    #[test]
    fn device_spec_refuses_unknown_repeated_and_bad_values() {
        let unknown = parse_device_spec("path=p,colour=red").unwrap_err();
        let twice = parse_device_spec("path=p,id=a,id=b").unwrap_err();
        let clique = parse_device_spec("path=p,clique=16").unwrap_err();
        let not_number = parse_device_spec("path=p,clique=x").unwrap_err();
        let no_path = parse_device_spec("id=a").unwrap_err();

        assert!(unknown.contains("unknown key `colour`"), "{unknown}");
        assert!(twice.contains("id given twice"), "{twice}");
        assert!(clique.contains("x_nv_gpudirect_clique"), "{clique}");
        assert!(not_number.contains("clique"), "{not_number}");
        assert!(no_path.contains("path"), "{no_path}");
    }

    #[test]
    fn group_spec_splits_devices_on_colons() {
        let group = parse_group_spec("name=g0,devices=gpu0:nic0,mode=dmabuf,slots=2").unwrap();

        assert_eq!(group.devices, ["gpu0", "nic0"]);
        assert_eq!(group.mode.as_deref(), Some("dmabuf"));
        assert_eq!(group.slots, Some(2));
        assert!(parse_group_spec("name=g0,mode=fast").is_err());
        assert!(parse_group_spec("devices=a").is_err());
    }

    #[test]
    fn clap_accepts_the_subcommands() {
        let args = RemoteArgs::try_parse_from([
            "p2pvmm remote",
            "--api-socket",
            "/run/p.sock",
            "add-device",
            "path=0000:00:03.0,id=gpu0",
        ])
        .unwrap();
        let bad = RemoteArgs::try_parse_from([
            "p2pvmm remote",
            "--api-socket",
            "/s",
            "add-device",
            "path=p,nope=1",
        ]);

        assert!(matches!(args.command, RemoteCommand::AddDevice { .. }));
        assert!(bad.unwrap_err().to_string().contains("nope"));
        assert!(RemoteArgs::try_parse_from(["x", "--api-socket", "/s", "shutdown-vmm"]).is_ok());
        assert!(RemoteArgs::try_parse_from(["x", "--api-socket", "/s", "power-button"]).is_ok());
    }

    #[test]
    fn answers_are_summarised() {
        let info = r#"{"config":{"payload":{"kernel":"/k"}},"state":"Running",
            "device_tree":{"gpu0":{"id":"gpu0","resources":[],"children":[],"pci_bdf":"0000:00:05.0"}}}"#;
        let added = r#"{"id":"gpu0","bdf":"0000:00:05.0"}"#;
        let spec = parse_device_spec("path=p").unwrap();

        assert_eq!(
            describe(&RemoteCommand::Info, info).unwrap(),
            "state: Running\ngpu0 0000:00:05.0\n"
        );
        assert_eq!(
            describe(&RemoteCommand::AddDevice { spec }, added).unwrap(),
            "id gpu0 at 0000:00:05.0\n"
        );
        assert_eq!(describe(&RemoteCommand::Boot, "").unwrap(), "");
        assert!(describe(&RemoteCommand::Ping, "not json").is_err());
    }

    #[test]
    fn error_message_prefers_the_error_field() {
        assert_eq!(error_message(r#"{"error":"no VM"}"#), "no VM");
        assert_eq!(error_message("plain text\n"), "plain text");
    }
}
