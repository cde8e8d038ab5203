//! The OpenAPI 3 description of the HTTP API, generated from the handlers' annotations,
//! then completed here with what holds for many routes at once: the form of every
//! handle, upload id and part number (the same names mean the same thing in every
//! route), tus's `Tus-Resumable` header, binary bodies, `HEAD` beside the file reads,
//! the 400 every route that reads input can answer and the 503 of an overloaded POP.

use std::sync::LazyLock;

use axum::Json;
use cin_domain::store::{CONTAINER_LEN, CONTAINER_PATTERN, STORE_PATH_MAX, STORE_PATH_PATTERN};
use cin_domain::{Handle, PartNumber, UploadId};
use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use super::{admin, files, health, multipart, page, store_api, tus};
use crate::destinations::KNOWN_LOCATIONS;
use crate::input::BOOL_SPELLINGS;
use crate::upload::{TUS_BASE64_PATTERN, TUS_CHECKSUMS};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "CIN edge",
        description = "An ingestion point of presence for file uploads: Filestack-compatible multipart uploads, tus 1.0, filelinks and status metadata."
    ),
    paths(
        health::healthz,
        health::readyz,
        health::metrics,
        multipart::start,
        multipart::upload,
        multipart::put_chunk,
        multipart::part_received,
        multipart::commit,
        multipart::complete,
        store_api::store,
        files::metadata,
        files::api_metadata,
        files::serve,
        files::api_serve,
        files::delete,
        files::serve_keyed,
        files::events,
        admin::list,
        admin::retry,
        admin::cancel,
        tus::options,
        tus::create,
        tus::head,
        tus::patch,
        tus::terminate,
        page::index,
        page::app_js,
        page::app_css,
        document,
    ),
    components(schemas(
        multipart::ClaimedPartShape,
        multipart::StartRequest,
        multipart::UploadRequest,
        multipart::CommitRequest,
        multipart::CompleteRequest
    ))
)]
pub struct ApiDoc;

static DOCUMENT: LazyLock<Value> = LazyLock::new(|| {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    complete(&mut doc);
    admin::complete_document(&mut doc);
    doc
});

#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "This document")))]
pub async fn document() -> Json<Value> {
    Json(DOCUMENT.clone())
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
/// Routes whose `GET` also answers `HEAD` with the same headers and no body.
const FILE_READS: [&str; 3] = ["/{handle}", "/api/file/{handle}", "/{apikey}/{handle}"];

/// The schema of a value by the name it goes by, in a path, a query or a JSON body.
fn schema_for(name: &str) -> Option<Value> {
    Some(match name {
        "handle" => json!({"type": "string", "pattern": Handle::pattern()}),
        "upload_id" | "id" => json!({"type": "string", "pattern": UploadId::pattern()}),
        "part" | "part_number" => {
            json!({"type": "integer", "minimum": 1, "maximum": PartNumber::MAX})
        }
        "container" => json!({
            "type": "string",
            "pattern": CONTAINER_PATTERN,
            "minLength": CONTAINER_LEN.start(),
            "maxLength": CONTAINER_LEN.end(),
        }),
        "path" => {
            json!({"type": "string", "pattern": STORE_PATH_PATTERN, "maxLength": STORE_PATH_MAX})
        }
        "fii" => json!({"oneOf": [
            {"type": ["boolean", "null"]},
            {"type": "string", "enum": BOOL_SPELLINGS},
        ]}),
        "location" => json!({"type": "string", "enum": KNOWN_LOCATIONS}),
        "Upload-Checksum" => json!({
            "type": "string",
            "pattern": format!("^(?:{}) {TUS_BASE64_PATTERN}$", TUS_CHECKSUMS.replace(',', "|")),
        }),
        "Upload-Defer-Length" => json!({"type": "integer", "enum": [1]}),
        "Upload-Concat" => json!({"type": "string", "pattern": "^(?:partial|final;.+)$"}),
        "Upload-Metadata" => {
            let pair = format!("[^ ,]+(?: {TUS_BASE64_PATTERN})?");
            json!({"type": "string", "pattern": format!("^(?:{pair}(?:,{pair})*)?$")})
        }
        _ => return None,
    })
}

fn complete(doc: &mut Value) {
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for schema in schemas.values_mut() {
            constrain_properties(schema);
        }
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        if FILE_READS.contains(&path.as_str()) && !item.contains_key("head") {
            if let Some(mut head) = item.get("get").cloned() {
                if let Some(id) = head.get_mut("operationId") {
                    *id = json!(format!("{}_head", id.as_str().unwrap_or("read")));
                }
                item.insert("head".into(), head);
            }
        }
        for method in METHODS {
            if let Some(operation) = item.get_mut(method).and_then(Value::as_object_mut) {
                complete_operation(path, method, operation);
            }
        }
    }
}

fn constrain_properties(schema: &mut Value) {
    let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (name, property) in properties.iter_mut() {
        if let Some(constrained) = schema_for(name) {
            *property = constrained;
        }
    }
}

fn complete_operation(path: &str, method: &str, operation: &mut Map<String, Value>) {
    let overload_applies = !crate::server::ALWAYS_SERVED.contains(&path);
    let is_tus = operation
        .get("tags")
        .and_then(Value::as_array)
        .is_some_and(|tags| tags.iter().any(|t| t == "tus"));
    let parameters = operation.entry("parameters").or_insert_with(|| json!([]));
    if let Some(parameters) = parameters.as_array_mut() {
        for parameter in parameters.iter_mut() {
            let name = parameter["name"].as_str().unwrap_or_default().to_owned();
            if let Some(constrained) = schema_for(&name) {
                parameter["schema"] = constrained;
            }
            // A header or query field is absent or has a value: never null.
            if let Some(types) = parameter
                .pointer_mut("/schema/type")
                .and_then(Value::as_array_mut)
            {
                types.retain(|t| t != "null");
                if let [only] = types.as_slice() {
                    let only = only.clone();
                    parameter["schema"]["type"] = only;
                }
            }
        }
        if is_tus && method != "options" {
            parameters.retain(|p| p["name"] != "Tus-Resumable");
            parameters.push(json!({
                "name": "Tus-Resumable",
                "in": "header",
                "required": true,
                "description": "The tus version the client speaks; any other (or none) is refused with 412 and Tus-Version",
                "schema": {"type": "string", "enum": [tus::TUS_VERSION]},
            }));
        }
    }
    let reads_input = operation
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty())
        || operation.contains_key("requestBody");
    if operation
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
    {
        operation.remove("parameters");
    }
    if let Some(content) = operation
        .get_mut("requestBody")
        .and_then(|b| b.get_mut("content"))
        .and_then(Value::as_object_mut)
    {
        for (media_type, body) in content.iter_mut() {
            if media_type.ends_with("octet-stream") {
                body["schema"] = json!({"type": "string", "format": "binary"});
            } else if let Some(schema) = body.get_mut("schema") {
                constrain_properties(schema);
            }
        }
    }
    let responses = operation.entry("responses").or_insert_with(|| json!({}));
    if let Some(responses) = responses.as_object_mut() {
        if is_tus && method != "options" {
            responses.entry("412").or_insert_with(|| {
                json!({"description": "Tus-Resumable missing or not 1.0.0 (Tus-Version says which version is spoken)"})
            });
        }
        if overload_applies {
            responses.entry("503").or_insert_with(|| {
                json!({"description": "Overloaded: the POP is at its connection or body-writer limit; Retry-After says when to try again"})
            });
        }
        if reads_input {
            responses.entry("400").or_insert_with(|| {
                json!({"description": "The request cannot be read: a query field given twice or malformed, a path that is not UTF-8, a body that is not what the route takes"})
            });
        }
    }
}
