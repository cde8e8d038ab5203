//! Metrics (Prometheus text at `/metrics`) and per-request tracing: every request
//! gets an id, returned in `x-request-id`, and a log span carrying it.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

/// Metric names, in one place so dashboards and code agree.
pub mod names {
    pub const UPLOADS_STARTED: &str = "cin_uploads_started_total";
    pub const UPLOADS_COMPLETED: &str = "cin_uploads_completed_total";
    pub const UPLOADS_FAILED: &str = "cin_uploads_failed_total";
    pub const BYTES_RECEIVED: &str = "cin_bytes_received_total";
    pub const CHUNK_FAILURES: &str = "cin_chunk_failures_total";
    pub const REPLICATION_ATTEMPTS: &str = "cin_replication_attempts_total";
    pub const REPLICATION_FAILURES: &str = "cin_replication_failures_total";
    /// Files whose replication was given up after repeated definitive mismatches.
    pub const REPLICATION_GIVEN_UP: &str = "cin_replication_given_up_total";
    pub const REPLICATED_BYTES: &str = "cin_replicated_bytes_total";
    pub const REPLICATION_SECONDS: &str = "cin_replication_duration_seconds";
    pub const REPLICATION_QUEUE: &str = "cin_replication_queue_depth";
    pub const REPLICATION_LAG: &str = "cin_replication_lag_seconds";
    pub const DISK_USED: &str = "cin_disk_used_bytes";
    pub const DISK_FREE: &str = "cin_disk_free_bytes";
    pub const CACHE_EVICTIONS: &str = "cin_cache_evictions_total";
    /// Files deleted by their clients (`DELETE /api/file`, tus `DELETE`).
    pub const FILES_DELETED: &str = "cin_files_deleted_total";
    /// Deleted files whose object (and manifest) final storage no longer holds.
    pub const FINAL_REMOVALS: &str = "cin_final_storage_removals_total";
    /// Bytes no record owned, removed at start, by `kind`: `upload_dir`, `part_file`,
    /// `log_file`, `log_file_trimmed` (a log file still in use gave back ranges), `temp_file`.
    pub const ORPHANS_REMOVED: &str = "cin_orphans_removed_total";
    /// Disk space (allocated blocks) those removals gave back.
    pub const ORPHAN_BYTES_FREED: &str = "cin_orphan_bytes_freed_total";
    /// Files whose local copy was found incomplete at the last start; they are not
    /// served from it (final storage serves them once `Stored`).
    pub const FILES_MISSING_LOCAL_BYTES: &str = "cin_files_missing_local_bytes";
    /// `/events` streams open now (each ends with its client or its file's last status).
    pub const EVENT_STREAMS: &str = "cin_event_streams";
    /// Requests receiving an upload body now (at most `server.max_body_writers`).
    pub const BODIES_RECEIVING: &str = "cin_bodies_receiving";
    /// Requests answered 503 because a limit was reached, by `reason`.
    pub const REQUESTS_SHED: &str = "cin_requests_shed_total";
    /// Connections closed by the POP, by `reason` (head_timeout, idle, write_stalled, evicted, over_limit).
    pub const CONNECTIONS_CLOSED: &str = "cin_connections_closed_total";
    /// Connections open now.
    pub const CONNECTIONS_OPEN: &str = "cin_connections_open";
    /// Bytes this POP passed between clients and other POPs of the network, by
    /// `direction`: `from_origin` (answers relayed: reads, events, forwarded
    /// uploads' answers), `to_origin` (forwarded upload bodies).
    pub const NETWORK_BYTES: &str = "cin_network_relayed_bytes_total";
    /// Calls to another POP of the network that went unanswered (each a 503 `origin_unreachable`).
    pub const NETWORK_UNREACHABLE: &str = "cin_network_origin_unreachable_total";
    pub const HTTP_REQUESTS: &str = "cin_http_requests_total";
    pub const HTTP_SECONDS: &str = "cin_http_request_duration_seconds";
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide metrics recorder once; later calls reuse it.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0,
            ];
            let builder = PrometheusBuilder::new().set_buckets(&buckets).ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

/// Gives the request an id (a sane incoming `x-request-id` is kept), runs it in a
/// span carrying that id, counts it by route and status, and returns the id.
pub async fn track_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().to_string();
    let span = tracing::info_span!("request", id = %id, method = %method, route = %route);
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16().to_string();
    let elapsed = started.elapsed();
    let labels = [("route", route), ("method", method), ("status", status)];
    metrics::counter!(names::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(names::HTTP_SECONDS, &labels).record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            ms = elapsed.as_millis() as u64,
            "answered"
        )
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}
