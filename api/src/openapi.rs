//! The OpenAPI 3 document of the API, served at `GET /api/v1/openapi.json`. Schemas come from the
//! serde types through `utoipa`'s derive, so they cannot drift from what the server parses; the
//! paths are generated from the route table the server routes with, for the same reason.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use utoipa::openapi::path::{HttpMethod, OperationBuilder, Paths};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::{
    ContentBuilder, ObjectBuilder, Ref, RefOr, Required, ResponseBuilder, ResponsesBuilder, Schema,
};
use utoipa::OpenApi;

use crate::p2p_table::{P2pTable, P2pTableRow};
use crate::routes::{routes, Method, Route, Success};
use crate::types::{
    ConsoleConfig, ConsoleMode, CpusConfig, DeviceConfig, DeviceNode, ErrorBody, MemoryConfig,
    P2pGroupConfig, PayloadConfig, PciDeviceInfo, VmConfig, VmInfoResponse, VmRemoveDevice,
    VmState, VmmPingResponse,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "p2pvmm API",
        description = "Local HTTP API of p2pvmm over a Unix socket. The endpoints it shares \
                       with Cloud Hypervisor take and answer the same JSON; vm.p2p and \
                       vm.add-p2p-group are p2pvmm's own. Errors answer {\"error\": \"...\"}.",
        license(name = "Apache-2.0")
    ),
    servers((url = "http://localhost/api/v1")),
    components(schemas(
        ErrorBody,
        VmmPingResponse,
        VmConfig,
        PayloadConfig,
        CpusConfig,
        MemoryConfig,
        ConsoleConfig,
        ConsoleMode,
        DeviceConfig,
        PciDeviceInfo,
        VmRemoveDevice,
        VmState,
        VmInfoResponse,
        DeviceNode,
        P2pGroupConfig,
        P2pTableRow,
        P2pTable,
    ))
)]
struct ApiDoc;

/// Failures every route can answer: the server produces them before the VMM sees the request.
const COMMON_FAILURES: [(u16, &str); 4] = [
    (
        400,
        "The request is malformed, or a field is unknown or has a value p2pvmm refuses.",
    ),
    (405, "The endpoint does not take this HTTP method."),
    (413, "The request body is over 1 MiB."),
    (500, "The VMM failed, has stopped or did not answer."),
];

fn json_content(schema: Option<&str>) -> utoipa::openapi::Content {
    let schema: RefOr<Schema> = match schema {
        Some(name) => Ref::from_schema_name(name).into(),
        None => ObjectBuilder::new().build().into(),
    };
    ContentBuilder::new().schema(Some(schema)).build()
}

fn operation(route: &Route) -> utoipa::openapi::path::Operation {
    let mut responses = ResponsesBuilder::new();
    responses = match route.success {
        Success::Empty => responses.response("204", ResponseBuilder::new().description("Done.")),
        Success::Json(schema) => responses.response(
            "200",
            ResponseBuilder::new()
                .description("Done; the answer.")
                .content("application/json", json_content(schema)),
        ),
    };
    let failures: BTreeMap<u16, &str> = COMMON_FAILURES
        .iter()
        .chain(route.failures)
        .copied()
        .collect();
    for (status, description) in failures {
        responses = responses.response(
            status.to_string(),
            ResponseBuilder::new()
                .description(description)
                .content("application/json", json_content(Some("ErrorBody"))),
        );
    }
    let mut builder = OperationBuilder::new()
        .summary(Some(route.summary))
        .operation_id(Some(route.name.replace(['.', '-'], "_")))
        .responses(responses.build());
    if let Some(schema) = route.body {
        builder = builder.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content("application/json", json_content(Some(schema)))
                .build(),
        ));
    }
    builder.build()
}

fn paths() -> Paths {
    let mut paths = Paths::new();
    for route in routes() {
        let method = match route.method {
            Method::Get => HttpMethod::Get,
            Method::Put => HttpMethod::Put,
        };
        paths.add_path_operation(format!("/{}", route.name), vec![method], operation(route));
    }
    paths
}

/// The document as pretty-printed JSON.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.paths = paths();
    doc.to_pretty_json()
        .expect("an OpenAPI document always serializes")
}

/// [`document`], built once: the API thread serves it on every `GET openapi.json`.
pub(crate) fn cached_document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(document)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed() -> serde_json::Value {
        serde_json::from_str(&document()).unwrap()
    }

    #[test]
    fn document_lists_every_route_with_its_method() {
        let doc = parsed();

        for route in routes() {
            let method = route.method.as_str().to_lowercase();
            let op = &doc["paths"][format!("/{}", route.name)][&method];
            assert!(op.is_object(), "{} {} missing", method, route.name);
        }
        assert_eq!(doc["paths"].as_object().unwrap().len(), routes().len());
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    }

    #[test]
    fn request_bodies_and_answers_point_at_schemas_that_exist() {
        let doc = parsed();
        let schemas = doc["components"]["schemas"].as_object().unwrap();

        let add = &doc["paths"]["/vm.add-device"]["put"];
        let body = &add["requestBody"]["content"]["application/json"]["schema"]["$ref"];
        let answer = &add["responses"]["200"]["content"]["application/json"]["schema"]["$ref"];

        assert_eq!(body, "#/components/schemas/DeviceConfig");
        assert_eq!(answer, "#/components/schemas/PciDeviceInfo");
        assert!(add["responses"]["409"].is_object());
        for route in routes() {
            if let Some(name) = route.body {
                assert!(schemas.contains_key(name), "schema {name} missing");
            }
            if let Success::Json(Some(name)) = route.success {
                assert!(schemas.contains_key(name), "schema {name} missing");
            }
        }
    }

    #[test]
    fn schemas_keep_ch_field_names() {
        let doc = parsed();
        let schemas = &doc["components"]["schemas"];

        let device = schemas["DeviceConfig"]["properties"].as_object().unwrap();
        let ping = schemas["VmmPingResponse"]["properties"]
            .as_object()
            .unwrap();

        for field in [
            "path",
            "id",
            "iommu",
            "pci_segment",
            "x_nv_gpudirect_clique",
        ] {
            assert!(device.contains_key(field), "DeviceConfig.{field}");
        }
        for field in ["build_version", "version", "pid", "features"] {
            assert!(ping.contains_key(field), "VmmPingResponse.{field}");
        }
    }
}
