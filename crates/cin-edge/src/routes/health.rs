//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::app::SharedState;
use crate::destinations::Health;
use crate::error::ApiError;
use crate::observability::{metrics_handle, names};
use crate::upload::now_ms;

/// The process is up and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process serves HTTP")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready to take uploads: the metadata store is writable, the disk is above its
/// watermark, and the default final store answers. Every storage profile's state
/// is reported under `storage`; a failing non-default profile does not make the
/// POP unready (its uploads wait here until it answers), and is listed in `warnings`.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "Ready: metadata store writable, disk above the watermark, default final store reachable; `storage` gives each profile's state, `warnings` any failing profile"), (status = 503, description = "Not ready, with the reasons")))]
pub async fn readyz(State(state): State<SharedState>) -> Response {
    let mut failures = Vec::new();
    if let Err(e) = state.uploads.check_metadata_writable().await {
        failures.push(format!("metadata store is not writable: {e}"));
    }
    if let Some(reason) = state.services.disk.below_watermark() {
        failures.push(reason);
    }
    let destinations = &state.services.destinations;
    if let Some(default) = destinations.default_destination() {
        // Asked now, not from the last probe: readiness is about this moment.
        default.probe().await;
        if let Some(message) = default.health().message() {
            failures.push(format!(
                "the default storage profile {:?} is {}: {message}",
                default.name,
                default.health().label()
            ));
        }
    }
    let mut warnings = Vec::new();
    let mut storage = serde_json::Map::new();
    for d in destinations.all() {
        let health = d.health();
        let is_default = destinations
            .default_destination()
            .is_some_and(|default| default.name == d.name);
        if let Some(message) = health.message().filter(|_| !is_default) {
            warnings.push(format!(
                "storage profile {:?} is {}: {message}; its uploads are accepted and wait here",
                d.name,
                health.label()
            ));
        }
        let mut entry = serde_json::to_value(&health).unwrap_or(Value::Null);
        if let Value::Object(fields) = &mut entry {
            fields.insert("kind".into(), json!(d.profile.kind));
            fields.insert("store".into(), json!(d.store.describe()));
        }
        storage.insert(d.name.clone(), entry);
    }
    if failures.is_empty() {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "storage": storage, "warnings": warnings })),
        )
            .into_response()
    } else {
        // The error shape every failure has, beside the fields probes read.
        let error = json!({ "code": "not_ready", "message": format!("not ready for uploads: {}", failures.join("; ")) });
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reasons": failures, "error": error, "storage": storage, "warnings": warnings })),
        )
            .into_response()
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics(State(state): State<SharedState>) -> Response {
    let Some(handle) = metrics_handle() else {
        return ApiError::Unavailable {
            code: "metrics_unavailable",
            message:
                "the metrics recorder could not be installed in this process; see the POP's log"
                    .into(),
        }
        .into_response();
    };
    let (waiting, oldest) = state.uploads.lifecycle().replication_backlog();
    metrics::gauge!(names::REPLICATION_QUEUE).set(waiting as f64);
    let lag_ms = oldest.map_or(0, |at| now_ms().saturating_sub(at));
    metrics::gauge!(names::REPLICATION_LAG).set(lag_ms as f64 / 1000.0);
    let disk = state.services.disk.usage();
    metrics::gauge!(names::DISK_USED).set(disk.used as f64);
    metrics::gauge!(names::DISK_FREE).set(disk.free as f64);
    metrics::gauge!(names::DISK_RESERVED).set(disk.reserved as f64);
    let held = state.services.disk.held();
    metrics::gauge!(names::DATA_BYTES, "kind" => "files").set(held.files as f64);
    metrics::gauge!(names::DATA_BYTES, "kind" => "space_reserve").set(held.space_reserve as f64);
    for d in state.services.destinations.all() {
        let up = matches!(d.health(), Health::Ok | Health::Unknown);
        metrics::gauge!(names::STORAGE_PROFILE_UP, "profile" => d.name.clone()).set(if up {
            1.0
        } else {
            0.0
        });
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
