//! The endpoint table: one row per `/api/v1/<name>`, with its method, body and answers. The
//! server routes with it and the OpenAPI document is generated from it, so the document cannot
//! list an endpoint the server does not serve or miss one it does.

use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::request::{ApiFailure, ApiRequest};
use crate::types::{DeviceConfig, P2pGroupConfig, VmConfig, VmRemoveDevice};

/// Every endpoint lives under this prefix, as in CH.
pub const API_ROOT: &str = "/api/v1/";

/// The HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// What a successful call answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Success {
    /// 204, no body.
    Empty,
    /// 200 with a body of the named schema (`None`: any JSON, for openapi.json).
    Json(Option<&'static str>),
}

/// Turns a request body into the request for the VMM.
pub type Parse = fn(&[u8]) -> Result<ApiRequest, ApiFailure>;

/// How the server answers a route.
#[derive(Clone, Debug)]
pub enum Handler {
    /// Forward this request; any body is ignored (CH's client may send an empty one).
    Fixed(ApiRequest),
    /// Parse and validate the body, then forward.
    Parse(Parse),
    /// The API thread answers itself with the OpenAPI document.
    Document,
}

impl Handler {
    /// The request for the VMM, or `None` for [`Handler::Document`].
    pub fn request(&self, body: &[u8]) -> Option<Result<ApiRequest, ApiFailure>> {
        match self {
            Handler::Fixed(request) => Some(Ok(request.clone())),
            Handler::Parse(parse) => Some(parse(body)),
            Handler::Document => None,
        }
    }
}

/// One endpoint.
#[derive(Clone, Debug)]
pub struct Route {
    /// The part after `/api/v1/`, e.g. `vm.add-device`.
    pub name: &'static str,
    pub method: Method,
    pub summary: &'static str,
    /// The schema of the request body, if it takes one.
    pub body: Option<&'static str>,
    pub success: Success,
    /// Failure statuses the VMM may answer besides 400/405/413/500, which every route has.
    pub failures: &'static [(u16, &'static str)],
    pub handler: Handler,
}

/// Parses `body` as `T`, naming the offending field on failure, then runs `check`. Every
/// failure message is [`one_line`].
fn parse_json<T: DeserializeOwned>(
    body: &[u8],
    check: impl FnOnce(&T) -> Result<(), ApiError>,
) -> Result<T, ApiFailure> {
    parse_json_raw(body, check).map_err(|f| ApiFailure::new(f.status, one_line(&f.message)))
}

/// `message` with control characters escaped (`\n`, `\u{1b}`). Refusals quote what the client
/// sent (an unknown key, a bad id), and JSON strings may hold newlines and escape sequences:
/// quoted raw, they would split the one-line error that `p2pvmm remote` prints and the log
/// records, or drive the terminal that shows it (found by the `api_body` fuzz target).
fn one_line(message: &str) -> String {
    let mut line = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

fn parse_json_raw<T: DeserializeOwned>(
    body: &[u8],
    check: impl FnOnce(&T) -> Result<(), ApiError>,
) -> Result<T, ApiFailure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiFailure::bad_request("this endpoint needs a JSON body"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiFailure::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiFailure::bad_request(format!("invalid JSON body: {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiFailure::bad_request(format!("invalid JSON body: {e}")))?;
    check(&value).map_err(|e| ApiFailure::bad_request(e.to_string()))?;
    Ok(value)
}

const NO_VM: (u16, &str) = (404, "The VM is not created.");
const WRONG_STATE: (u16, &str) = (409, "The VM is not in a state that allows this.");

fn action(name: &'static str, summary: &'static str, request: ApiRequest) -> Route {
    Route {
        name,
        method: Method::Put,
        summary,
        body: None,
        success: Success::Empty,
        failures: &[NO_VM, WRONG_STATE],
        handler: Handler::Fixed(request),
    }
}

/// Every endpoint.
pub fn routes() -> &'static [Route] {
    static ROUTES: std::sync::OnceLock<Vec<Route>> = std::sync::OnceLock::new();
    ROUTES.get_or_init(|| {
        vec![
            Route {
                name: "vmm.ping",
                method: Method::Get,
                summary: "Ping the VMM: its version, pid and features.",
                body: None,
                success: Success::Json(Some("VmmPingResponse")),
                failures: &[],
                handler: Handler::Fixed(ApiRequest::VmmPing),
            },
            Route {
                name: "vmm.shutdown",
                method: Method::Put,
                summary: "Stop the VMM process (and its VM).",
                body: None,
                success: Success::Empty,
                failures: &[],
                handler: Handler::Fixed(ApiRequest::VmmShutdown),
            },
            Route {
                name: "vm.info",
                method: Method::Get,
                summary: "The VM's configuration, state and device tree.",
                body: None,
                success: Success::Json(Some("VmInfoResponse")),
                failures: &[NO_VM],
                handler: Handler::Fixed(ApiRequest::VmInfo),
            },
            Route {
                name: "vm.create",
                method: Method::Put,
                summary: "Create the VM (not booted).",
                body: Some("VmConfig"),
                success: Success::Empty,
                failures: &[(409, "A VM is already created.")],
                handler: Handler::Parse(|body| {
                    parse_json(body, VmConfig::validate)
                        .map(|config| ApiRequest::VmCreate(Box::new(config)))
                }),
            },
            action("vm.boot", "Boot the created VM.", ApiRequest::VmBoot),
            action("vm.pause", "Pause the running VM.", ApiRequest::VmPause),
            action("vm.resume", "Resume the paused VM.", ApiRequest::VmResume),
            action("vm.shutdown", "Shut the VM down.", ApiRequest::VmShutdown),
            action("vm.reboot", "Reboot the VM.", ApiRequest::VmReboot),
            action(
                "vm.power-button",
                "Press the VM's ACPI power button.",
                ApiRequest::VmPowerButton,
            ),
            Route {
                name: "vm.add-device",
                method: Method::Put,
                summary: "Hot-plug a VFIO device; answers where it sits in the guest.",
                body: Some("DeviceConfig"),
                success: Success::Json(Some("PciDeviceInfo")),
                failures: &[
                    NO_VM,
                    (409, "A device with the same id or path already exists."),
                ],
                handler: Handler::Parse(|body| {
                    parse_json(body, DeviceConfig::validate).map(ApiRequest::VmAddDevice)
                }),
            },
            Route {
                name: "vm.remove-device",
                method: Method::Put,
                summary: "Hot-unplug a device by id.",
                body: Some("VmRemoveDevice"),
                success: Success::Empty,
                failures: &[(404, "No VM, or no device with that id.")],
                handler: Handler::Parse(|body| {
                    parse_json(body, |_: &VmRemoveDevice| Ok(())).map(ApiRequest::VmRemoveDevice)
                }),
            },
            Route {
                name: "vm.p2p",
                method: Method::Get,
                summary: "p2pvmm: the P2P table, one row per BAR area of each group member.",
                body: None,
                success: Success::Json(Some("P2pTable")),
                failures: &[NO_VM],
                handler: Handler::Fixed(ApiRequest::VmP2p),
            },
            Route {
                name: "vm.add-p2p-group",
                method: Method::Put,
                summary: "p2pvmm: add a P2P group of devices that may DMA into each other's BARs.",
                body: Some("P2pGroupConfig"),
                success: Success::Empty,
                failures: &[
                    NO_VM,
                    (409, "The group clashes with the VM's devices or groups."),
                ],
                handler: Handler::Parse(|body| {
                    parse_json(body, P2pGroupConfig::validate).map(ApiRequest::VmAddP2pGroup)
                }),
            },
            Route {
                name: "openapi.json",
                method: Method::Get,
                summary: "This document.",
                body: None,
                success: Success::Json(None),
                failures: &[],
                handler: Handler::Document,
            },
        ]
    })
}

/// The route for a request path (`/api/v1/vm.boot`), if any.
pub fn find(path: &str) -> Option<&'static Route> {
    let name = path.strip_prefix(API_ROOT)?;
    routes().iter().find(|route| route.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, body: &str) -> Result<ApiRequest, ApiFailure> {
        let route = find(&format!("{API_ROOT}{name}")).unwrap();
        route.handler.request(body.as_bytes()).unwrap()
    }

    #[test]
    fn bodyless_actions_ignore_any_body() {
        assert_eq!(parse("vm.boot", ""), Ok(ApiRequest::VmBoot));
        assert_eq!(
            parse("vm.power-button", "{}"),
            Ok(ApiRequest::VmPowerButton)
        );
        assert_eq!(parse("vmm.shutdown", ""), Ok(ApiRequest::VmmShutdown));
    }

    #[test]
    fn unknown_field_is_named() {
        let failure = parse("vm.add-device", r#"{"path":"0000:00:03.0","bogus":1}"#).unwrap_err();

        assert_eq!(failure.status, 400);
        assert!(
            failure.message.contains("unknown field `bogus`"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn wrong_type_names_the_nested_field() {
        let body =
            r#"{"payload":{"kernel":"k"},"devices":[{"path":"p","x_nv_gpudirect_clique":-1}]}"#;

        let failure = parse("vm.create", body).unwrap_err();

        assert!(
            failure.message.contains("devices[0].x_nv_gpudirect_clique"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn validation_failure_is_a_400_naming_the_field() {
        let failure = parse("vm.add-device", r#"{"path":"p","iommu":true}"#).unwrap_err();

        assert_eq!(
            failure,
            ApiFailure::bad_request("iommu: p2pvmm does not expose a virtual IOMMU")
        );
    }

    #[test]
    fn control_characters_the_client_sent_stay_escaped_on_one_line() {
        // The fuzz target's reproducer: an unknown key holding a newline.
        let body = "{\"\\naapn\\\"*\":1}";
        let failure = parse("vm.create", body).unwrap_err();

        assert_eq!(failure.status, 400);
        assert!(!failure.message.contains('\n'), "{:?}", failure.message);
        assert!(
            failure.message.contains("unknown field `\\naapn\"*`"),
            "{:?}",
            failure.message
        );
        let failure = parse("vm.add-device", "{\"\\u001b[2J\":2}").unwrap_err();
        assert!(!failure.message.contains('\u{1b}'), "{:?}", failure.message);
        assert!(
            failure.message.contains("\\u{1b}[2J"),
            "{:?}",
            failure.message
        );
    }

    #[test]
    fn missing_body_and_trailing_garbage_are_400() {
        assert_eq!(parse("vm.add-device", "").unwrap_err().status, 400);
        assert_eq!(
            parse("vm.remove-device", r#"{"id":"a"} x"#)
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn create_carries_the_config() {
        let request = parse(
            "vm.create",
            r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":2}}"#,
        );

        let Ok(ApiRequest::VmCreate(config)) = request else {
            panic!("{request:?}");
        };
        assert_eq!(config.cpus.unwrap().boot_vcpus, 2);
    }

    #[test]
    fn paths_outside_the_root_or_unknown_have_no_route() {
        assert!(find("/api/v1/vm.nmi").is_none());
        assert!(find("/vm.boot").is_none());
        assert!(find("/api/v1/").is_none());
    }
}
