//! Liveness, readiness and metrics.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::app::SharedState;
use crate::error::ApiError;
use crate::observability::{metrics_handle, names};
use crate::upload::now_ms;

/// The process is up and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process serves HTTP")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

const READINESS_TIMEOUT: Duration = Duration::from_secs(3);

/// Ready to take uploads: the metadata store is writable, the disk is above its
/// watermark, and the default final store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "Ready: metadata store writable, disk above the watermark, default final store reachable"), (status = 503, description = "Not ready, with the reasons")))]
pub async fn readyz(State(state): State<SharedState>) -> Response {
    let mut failures = Vec::new();
    if let Err(e) = state.uploads.check_metadata_writable().await {
        failures.push(format!("metadata store is not writable: {e}"));
    }
    if let Some(reason) = state.services.disk.below_watermark() {
        failures.push(reason);
    }
    if let Some(default) = state.services.destinations.default_destination() {
        match tokio::time::timeout(READINESS_TIMEOUT, default.store.check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("default final store: {e}")),
            Err(_) => failures.push(format!(
                "default final store did not answer within {READINESS_TIMEOUT:?}"
            )),
        }
    }
    if failures.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        // The error shape every failure has, beside the fields probes read.
        let error = json!({ "code": "not_ready", "message": format!("not ready for uploads: {}", failures.join("; ")) });
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reasons": failures, "error": error })),
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
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
