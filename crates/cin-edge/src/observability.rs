//! Metrics (Prometheus text at `/metrics`) and per-request tracing: every request
//! gets an id, returned in `x-request-id`, and a log span carrying it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
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
    /// Per storage profile: 1 while its final store answers, 0 while it fails or refuses.
    pub const STORAGE_PROFILE_UP: &str = "cin_storage_profile_up";
    /// Bytes this POP holds in its data directory, by `kind`: `files`, `space_reserve`.
    pub const DATA_BYTES: &str = "cin_data_bytes";
    /// Room promised to uploads in progress: declared bytes not received yet.
    pub const DISK_RESERVED: &str = "cin_disk_reserved_bytes";
}

#[derive(Clone, Copy)]
enum Family {
    Counter,
    Gauge,
    Histogram,
}

/// Every family with its help text and the label values it is reported with from
/// the start (at 0), so dashboards and alerts find each one before its first event.
struct Described {
    name: &'static str,
    family: Family,
    help: &'static str,
    /// A label and its known values, each reported at 0 from the start.
    labels: Option<(&'static str, &'static [&'static str])>,
}

const fn d(
    name: &'static str,
    family: Family,
    help: &'static str,
    labels: Option<(&'static str, &'static [&'static str])>,
) -> Described {
    Described {
        name,
        family,
        help,
        labels,
    }
}

const FAMILIES: &[Described] = {
    use names::*;
    use Family::*;
    &[
        d(UPLOADS_STARTED, Counter, "Uploads started (multipart start, tus creation, /api/store, store from URL).", None),
        d(UPLOADS_COMPLETED, Counter, "Uploads completed: every byte received and durable; the file is InTransit.", None),
        d(UPLOADS_FAILED, Counter, "Uploads that ended without completing, by reason.", Some(("reason", &["terminated", "no_space", "body", "expired"]))),
        d(BYTES_RECEIVED, Counter, "Upload body bytes received and made durable.", None),
        d(CHUNK_FAILURES, Counter, "Chunks refused or cut off, by reason.", Some(("reason", &["truncated", "too_long", "conflict", "md5_mismatch", "crc32c_mismatch", "checksum_mismatch", "no_space", "storage"]))),
        d(REPLICATION_ATTEMPTS, Counter, "Attempts to deliver a file to final storage.", None),
        d(REPLICATION_FAILURES, Counter, "Delivery attempts that failed (each is retried with backoff).", None),
        d(REPLICATION_GIVEN_UP, Counter, "Files whose replication was given up after repeated definitive mismatches.", None),
        d(REPLICATED_BYTES, Counter, "Bytes delivered to final storage.", None),
        d(REPLICATION_SECONDS, Histogram, "Time one successful delivery to final storage took.", None),
        d(REPLICATION_QUEUE, Gauge, "Files InTransit waiting for (or in) delivery to final storage.", None),
        d(REPLICATION_LAG, Gauge, "Age in seconds of the oldest file waiting for final storage (0 when none waits).", None),
        d(DISK_USED, Gauge, "Bytes used on the data directory's filesystem by everything on it (its size minus its free space); cin_data_bytes is what this POP holds.", None),
        d(DISK_FREE, Gauge, "Bytes free on the data directory's filesystem (for unprivileged processes).", None),
        d(DATA_BYTES, Gauge, "Bytes this POP holds in its data directory, by kind: files (metadata, upload bodies and local copies, as allocated on disk, measured every 30 s) and space_reserve (set aside for the metadata store).", Some(("kind", &["files", "space_reserve"]))),
        d(DISK_RESERVED, Gauge, "Room promised to uploads in progress: declared bytes not received yet, counted against disk.min_free_bytes.", None),
        d(CACHE_EVICTIONS, Counter, "Local copies of stored files evicted to keep within cache.max_bytes.", None),
        d(FILES_DELETED, Counter, "Files deleted by their clients.", None),
        d(FINAL_REMOVALS, Counter, "Deleted files whose object (and manifest) final storage no longer holds.", None),
        d(ORPHANS_REMOVED, Counter, "Files and directories no record owned, removed at start, by kind.", Some(("kind", &["upload_dir", "part_file", "log_file", "log_file_trimmed", "temp_file"]))),
        d(ORPHAN_BYTES_FREED, Counter, "Disk space given back by removing orphans at start.", None),
        d(FILES_MISSING_LOCAL_BYTES, Gauge, "Files whose local copy was found incomplete at the last start (served from final storage once Stored).", None),
        d(EVENT_STREAMS, Gauge, "/events streams open now.", None),
        d(BODIES_RECEIVING, Gauge, "Requests receiving an upload body now (at most server.max_body_writers).", None),
        d(REQUESTS_SHED, Counter, "Requests answered 503 because a limit was reached, by reason.", Some(("reason", &["connections", "body_writers"]))),
        d(CONNECTIONS_CLOSED, Counter, "Connections closed by the POP, by reason.", Some(("reason", &["head_timeout", "idle", "write_stalled", "evicted", "over_limit", "tls_handshake"]))),
        d(CONNECTIONS_OPEN, Gauge, "Connections open now.", None),
        d(NETWORK_BYTES, Counter, "Bytes passed between clients and other POPs of the network, by direction (from_origin: answers relayed; to_origin: upload bodies forwarded).", Some(("direction", &["from_origin", "to_origin"]))),
        d(NETWORK_UNREACHABLE, Counter, "Calls to another POP of the network that went unanswered (each a 503 origin_unreachable).", None),
        d(HTTP_REQUESTS, Counter, "HTTP requests answered, by route, method and status.", None),
        d(HTTP_SECONDS, Histogram, "Time to answer an HTTP request (until the response head), by route, method and status.", None),
        d(STORAGE_PROFILE_UP, Gauge, "Per storage profile: 1 while its final store answers, 0 while it fails or refuses requests.", None),
    ]
};

/// Gives every family its help text and reports the unlabelled ones, and each
/// known label value of the others, at 0 from the start. HTTP families have one
/// series per route, method and status seen; profiles are set with the first scrape.
fn describe_families() {
    for &Described {
        name,
        family,
        help,
        labels,
    } in FAMILIES
    {
        match family {
            Family::Counter => metrics::describe_counter!(name, help),
            Family::Gauge => metrics::describe_gauge!(name, help),
            Family::Histogram => metrics::describe_histogram!(name, help),
        }
        if matches!(
            name,
            names::HTTP_REQUESTS | names::HTTP_SECONDS | names::STORAGE_PROFILE_UP
        ) {
            continue;
        }
        let series: Vec<Vec<(&'static str, &'static str)>> = match labels {
            None => vec![Vec::new()],
            Some((label, values)) => values.iter().map(|v| vec![(label, *v)]).collect(),
        };
        for labels in series {
            let labels: Vec<metrics::Label> = labels
                .into_iter()
                .map(|(k, v)| metrics::Label::new(k, v))
                .collect();
            match family {
                Family::Counter => metrics::counter!(name, labels).absolute(0),
                Family::Gauge => metrics::gauge!(name, labels).increment(0.0),
                Family::Histogram => {
                    let _ = metrics::histogram!(name, labels);
                }
            }
        }
    }
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
                Ok(handle) => {
                    describe_families();
                    Some(handle)
                }
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
/// span carrying that id, counts it by route and status, returns the id, and (with
/// `log.access`) logs one access line once the response body has been sent.
pub async fn track_request(access_log: bool, request: Request, next: Next) -> Response {
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
    let received = Arc::new(AtomicU64::new(0));
    let line = access_log.then(|| AccessLine {
        started,
        method: method.clone(),
        // The path without its query, which may carry credentials.
        path: request.uri().path().to_owned(),
        route: route.clone(),
        id: id.clone(),
        status: 0,
        received: received.clone(),
        sent: 0,
        finished: false,
    });
    let request = if access_log {
        request.map(|body| Body::new(Counted::new(body, received)))
    } else {
        request
    };
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
    match line {
        Some(mut line) => {
            line.status = response.status().as_u16();
            response.map(|body| {
                Body::new(Logged {
                    inner: body,
                    line: Some(line),
                })
            })
        }
        None => response,
    }
}

/// What the access line of one request reports; logged when dropped, which is
/// when its response body has been sent (or abandoned by the client).
struct AccessLine {
    started: Instant,
    method: String,
    path: String,
    route: String,
    id: String,
    status: u16,
    received: Arc<AtomicU64>,
    sent: u64,
    finished: bool,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: crate::telemetry::ACCESS_TARGET,
            method = %self.method,
            path = %self.path,
            route = %self.route,
            status = self.status,
            bytes_in = self.received.load(Ordering::Relaxed),
            bytes_out = self.sent,
            ms = format_args!("{ms:.1}"),
            complete = self.finished,
            request_id = %self.id,
            "{} {} {}",
            self.method,
            self.path,
            self.status,
        );
    }
}

/// A request body that counts the bytes read from it.
struct Counted {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl Counted {
    fn new(inner: Body, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that logs its request's access line once sent.
struct Logged {
    inner: Body,
    line: Option<AccessLine>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        // A body with nothing to send (HEAD, 204) may never be polled.
        if let Some(line) = self.line.as_mut() {
            line.finished = http_body::Body::is_end_stream(&self.inner);
        }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(line) = self.line.as_mut() {
                    line.sent += len;
                }
            }
            Poll::Ready(None) => {
                if let Some(mut line) = self.line.take() {
                    line.finished = true;
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
