//! The filelink (`GET`/`HEAD /{handle}`) and metadata queries.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG, IF_NONE_MATCH, IF_RANGE, RANGE,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cin_domain::{FileRecord, FileStatus, Handle, PopId};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;

use crate::app::SharedState;
use crate::auth::{Call, Credentials};
use crate::error::ApiError;
use crate::input::{Path, Query};
use crate::observability::names;
use crate::upload::UploadError;

/// The file behind `handle`, if the request's credentials allow `call` on it.
fn find(
    state: &SharedState,
    handle: &str,
    q: &PolicyQuery,
    call: Call,
) -> Result<FileRecord, ApiError> {
    let handle = parse_handle(handle)?;
    let file = state.uploads.file(&handle)?;
    authorize(state, &file, q, call)?;
    Ok(file)
}

/// A handle as clients send it; anything else names no file.
fn parse_handle(handle: &str) -> Result<Handle, ApiError> {
    Handle::parse(handle).map_err(|_| {
        ApiError::not_found("file_not_found", format!("no file has handle {handle:?}"))
    })
}

/// The file's app lets these credentials make `call`.
fn authorize(
    state: &SharedState,
    file: &FileRecord,
    q: &PolicyQuery,
    call: Call,
) -> Result<(), ApiError> {
    state.services.apps.authorize_access(
        file.app.as_deref(),
        &q.credentials(),
        call,
        file.handle.as_str(),
    )
}

/// Query parameters that carry a security policy.
#[derive(Debug, Default, serde::Deserialize)]
pub struct PolicyQuery {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    /// `?dl=true`: served as an attachment (a download), not inline.
    #[serde(default)]
    dl: Option<String>,
}

impl PolicyQuery {
    fn attachment(&self) -> Result<bool, ApiError> {
        match self.dl.as_deref() {
            None | Some("" | "false" | "0" | "no") => Ok(false),
            Some("true" | "1" | "yes") => Ok(true),
            Some(other) => Err(ApiError::invalid(
                "invalid_query",
                format!("dl must be true or false, got {other:?}"),
            )),
        }
    }

    fn credentials(&self) -> Credentials<'_> {
        Credentials {
            apikey: self.key.as_deref(),
            policy: self.policy.as_deref(),
            signature: self.signature.as_deref(),
        }
    }
}

#[utoipa::path(get, path = "/{handle}/metadata", tag = "files", params(("handle" = String, Path, description = "20-character handle")), responses((status = 200, description = "handle, filename, mimetype, size, uploaded, status (Uploading | InTransit | Stored), location, container, key, sha256, replication"), (status = 404, description = "Unknown or expired handle")))]
pub async fn metadata(
    State(state): State<SharedState>,
    Path(handle): Path<String>,
    Query(q): Query<PolicyQuery>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let local = find(&state, &handle, &q, Call::Stat);
    let path = format!("/internal/files/{handle}/metadata");
    // The origin checks the client's credentials itself.
    let from_origin =
        async |origin: PopId| relay(&state, &origin, &path, raw.as_deref().unwrap_or("")).await;
    let selected = |answer: Value| Json(select_attributes(answer, raw.as_deref())).into_response();
    match answer_for(&state, &handle, &q, Call::Stat, local, from_origin).await? {
        Answer::Here(file) => Ok(selected(metadata_json(&state, &file))),
        Answer::Stored(file) => {
            let mut answer = metadata_json(&state, &file);
            answer["pop"] = json!(file.handle.pop());
            Ok(selected(answer))
        }
        Answer::Relayed(response) => Ok(response),
    }
}

/// Query parameters that are not attribute names.
const NOT_ATTRIBUTES: [&str; 4] = ["key", "policy", "signature", "dl"];

/// Filestack's attribute selection: with `?size=true&filename=true`, only those
/// attributes (the ones this POP knows); with none asked, all of them.
fn select_attributes(answer: Value, query: Option<&str>) -> Value {
    let asked: Vec<String> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(query.unwrap_or(""))
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, value)| value == "true" && !NOT_ATTRIBUTES.contains(&name.as_str()))
            .map(|(name, _)| name)
            .collect();
    match answer {
        Value::Object(mut all) if !asked.is_empty() => {
            all.retain(|name, _| asked.contains(name));
            Value::Object(all)
        }
        other => other,
    }
}

/// Who answered for a handle: this POP, final storage, or the POP that minted it.
#[allow(clippy::large_enum_variant)] // Lives for one request, on its way to a response.
enum Answer<T> {
    Here(T),
    /// `Stored` by the network: the record its manifest describes.
    Stored(FileRecord),
    /// Minted by another POP and not found in final storage: that POP's answer.
    Relayed(Response),
}

/// `local`, this POP's own answer, unless it has no record of the handle;
/// then final storage's (through the file's manifest), else the origin's
/// (`from_origin`), else the `local` error.
async fn answer_for<T>(
    state: &SharedState,
    handle: &str,
    q: &PolicyQuery,
    call: Call,
    local: Result<T, ApiError>,
    from_origin: impl AsyncFnOnce(PopId) -> Result<Response, ApiError>,
) -> Result<Answer<T>, ApiError> {
    let unknown = match local {
        Ok(answer) => return Ok(Answer::Here(answer)),
        Err(e) if is_unknown(&e) => e,
        Err(e) => return Err(e),
    };
    // `local` found no record, so the handle is well formed.
    let handle = parse_handle(handle)?;
    if let Some(file) = stored_in_network(state, &handle, q, call).await? {
        return Ok(Answer::Stored(file));
    }
    let Some(origin) = other_origin(state, &handle) else {
        return Err(unknown);
    };
    match from_origin(origin).await {
        // Stored since its manifest was last missed, perhaps: look again.
        Err(unreachable @ ApiError::OriginUnreachable { .. }) => {
            state.network.manifests.forget(&handle);
            match stored_in_network(state, &handle, q, call).await? {
                Some(file) => Ok(Answer::Stored(file)),
                None => Err(unreachable),
            }
        }
        relayed => {
            let response = relayed?;
            let status = response.headers().get(crate::network::FILE_STATUS_HEADER);
            if status.is_some_and(|s| s == FileStatus::Stored.as_str()) {
                // Its manifest is there now: the next read takes it.
                state.network.manifests.forget(&handle);
            }
            Ok(Answer::Relayed(response))
        }
    }
}

/// A handle this POP has no record of, `Stored` by the network: the record its
/// manifest in final storage describes (read from there, whatever its origin's state).
async fn stored_in_network(
    state: &SharedState,
    handle: &Handle,
    q: &PolicyQuery,
    call: Call,
) -> Result<Option<FileRecord>, ApiError> {
    if !state.network.is_networked() {
        return Ok(None);
    }
    // A store that does not answer leaves the origin to ask.
    let found = state
        .network
        .manifests
        .find(&state.services.destinations, handle)
        .await;
    let manifest = match found {
        Ok(Some(manifest)) => manifest,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!(%handle, error = %e, "could not look for the file's manifest in final storage; asking its origin");
            return Ok(None);
        }
    };
    let file = manifest.record();
    authorize(state, &file, q, call)?;
    Ok(Some(file))
}

/// The same as `/{handle}/metadata`, at Filestack's API path.
#[utoipa::path(get, path = "/api/file/{handle}/metadata", tag = "files", params(("handle" = String, Path, description = "20-character handle")), responses((status = 200, description = "As /{handle}/metadata"), (status = 404, description = "Unknown or expired handle")))]
pub async fn api_metadata(
    state: State<SharedState>,
    handle: Path<String>,
    query: Query<PolicyQuery>,
    raw: RawQuery,
) -> Result<Response, ApiError> {
    metadata(state, handle, query, raw).await
}

/// A file's metadata for another POP of the network (signed calls only).
pub async fn internal_metadata(
    State(state): State<SharedState>,
    Path(handle): Path<String>,
    Query(q): Query<PolicyQuery>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let path = format!("/internal/files/{handle}/metadata");
    state.network.check_call("GET", &path, &headers)?;
    let file = find(&state, &handle, &q, Call::Stat)?;
    Ok(Json(select_attributes(
        metadata_json(&state, &file),
        raw.as_deref(),
    )))
}

/// This POP has no record of the handle.
fn is_unknown(error: &ApiError) -> bool {
    matches!(error, ApiError::Upload(UploadError::NotFound { .. }))
}

/// The other POP of the network that minted `handle`, if any.
fn other_origin(state: &SharedState, handle: &Handle) -> Option<PopId> {
    let origin = handle.pop();
    state.network.other_origin(&origin)?;
    Some(origin)
}

/// Another POP's answer to `path`, passed on with its status and naming it.
async fn relay(
    state: &SharedState,
    origin: &PopId,
    path: &str,
    query: &str,
) -> Result<Response, ApiError> {
    let relayed = state.network.get(origin, path, query).await?;
    let mut response = (relayed.status, Json(relayed.body)).into_response();
    if let Ok(pop) = HeaderValue::from_str(origin.as_str()) {
        response
            .headers_mut()
            .insert(crate::network::ANSWERED_BY_HEADER, pop);
    }
    Ok(response)
}

pub fn metadata_json(state: &SharedState, file: &FileRecord) -> Value {
    let location = file
        .store
        .location
        .as_deref()
        .filter(|l| !l.is_empty())
        .unwrap_or("s3")
        .to_ascii_lowercase();
    // Only a file in transit has a job; a failed read leaves the failure unreported, not the metadata.
    let failure = if file.status == FileStatus::InTransit {
        state
            .services
            .meta
            .get_job(&file.handle)
            .ok()
            .flatten()
            .and_then(|job| crate::replicator::failure_message(&state.config.replicator, &job))
    } else {
        None
    };
    // How the file's final store is doing, while the file waits for it.
    let store_health = (file.status != FileStatus::Stored)
        .then(|| state.services.destinations.get(&file.profile))
        .flatten()
        .map(|d| {
            let health = d.health();
            json!({ "profile": d.name, "state": health.label(), "message": health.message() })
        });
    json!({
        "handle": file.handle,
        "url": format!("{}/{}", state.public_url, file.handle),
        "filename": file.filename,
        "mimetype": file.mimetype,
        "size": file.size,
        // Bytes held contiguously from the first: what the filelink serves so far.
        "received": received_bytes(state, file),
        "uploaded": file.created_at_ms,
        "status": file.status.as_str(),
        "location": location,
        "container": file.container,
        "key": file.key,
        "path": file.key,
        "sha256": file.sha256,
        "pop": state.config.server.pop_id,
        // Whether this POP still holds the bytes (evicted copies are read from final storage).
        "local_copy": file.evicted_at_ms.is_none() && file.expired_at_ms.is_none() && !file.local_bytes_missing,
        "local_bytes_missing": file.local_bytes_missing,
        "upload_tags": file.upload_tags,
        "replication": {
            "attempts": file.replication_attempts,
            "last_error": file.last_error,
            "store": store_health,
            "completed_at": file.completed_at_ms,
            "stored_at": file.stored_at_ms,
            // Given up after repeated definitive mismatches: no automatic retry.
            "failed": failure.is_some(),
            "failure": failure,
        },
    })
}

fn received_bytes(state: &SharedState, file: &FileRecord) -> Option<u64> {
    match file.status {
        FileStatus::Uploading => state
            .uploads
            .watch_received(file)
            .ok()
            .map(|prefix| prefix.borrow().len),
        _ if file.completed_at_ms.is_some() && !file.status.is_gone() => Some(file.size),
        _ => None,
    }
}

/// The outcome of reading `Range` against a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    Full,
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range; forms this server does not serve (several
/// ranges, other units, garbage) fall back to the whole file, as RFC 9110 allows.
fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let (start, end) = (start.trim(), end.trim());
    if start.is_empty() {
        // Suffix: the last N bytes.
        return match end.parse::<u64>() {
            Ok(0) => RangeRequest::Unsatisfiable,
            Ok(_) if size == 0 => RangeRequest::Unsatisfiable,
            Ok(n) => RangeRequest::Partial(size.saturating_sub(n), size),
            Err(_) => RangeRequest::Full,
        };
    }
    let Ok(start) = start.parse::<u64>() else {
        return RangeRequest::Full;
    };
    let end = if end.is_empty() {
        size
    } else {
        match end.parse::<u64>() {
            Ok(e) if e >= start => e.saturating_add(1).min(size),
            _ => return RangeRequest::Full,
        }
    };
    if start >= size {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Partial(start, end)
    }
}

fn header_str(headers: &HeaderMap, name: axum::http::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.trim_start_matches("W/") == etag
    })
}

/// `Content-Disposition` with the filename, ASCII-safe plus RFC 5987 UTF-8
/// form: `inline`, or `attachment` for a download.
fn disposition(filename: &str, attachment: bool) -> HeaderValue {
    let kind = if attachment { "attachment" } else { "inline" };
    let ascii: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = filename
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    HeaderValue::from_str(&format!(
        "{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("inline"))
}

#[utoipa::path(get, path = "/{handle}", tag = "files", params(("handle" = String, Path, description = "20-character handle"), ("policy" = Option<String>, Query), ("signature" = Option<String>, Query)), responses((status = 200, description = "The bytes (HEAD: headers only). While the file uploads: its declared length, the bytes received so far, then the rest as they arrive (chunked while a tus length is deferred)"), (status = 206, description = "A single range"), (status = 304, description = "If-None-Match matched"), (status = 416, description = "Range not satisfiable"), (status = 404, description = "Unknown, expired or deleted handle")))]
pub async fn serve(
    State(state): State<SharedState>,
    Path(handle): Path<String>,
    method: Method,
    headers: HeaderMap,
    Query(q): Query<PolicyQuery>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    serve_handle(
        &state,
        &handle,
        &method,
        &headers,
        &q,
        raw.as_deref().unwrap_or(""),
    )
    .await
}

/// The same as `/{handle}`, at Filestack's API path.
#[utoipa::path(get, path = "/api/file/{handle}", tag = "files", params(("handle" = String, Path, description = "20-character handle"), ("dl" = Option<bool>, Query, description = "true: served as an attachment")), responses((status = 200, description = "The bytes (HEAD: headers only). While the file uploads: its declared length, the bytes received so far, then the rest as they arrive (chunked while a tus length is deferred)"), (status = 206, description = "A single range"), (status = 304, description = "If-None-Match matched"), (status = 404, description = "Unknown handle"), (status = 416, description = "Range not satisfiable")))]
pub async fn api_serve(
    state: State<SharedState>,
    handle: Path<String>,
    method: Method,
    headers: HeaderMap,
    query: Query<PolicyQuery>,
    raw: RawQuery,
) -> Result<Response, ApiError> {
    serve(state, handle, method, headers, query, raw).await
}

/// `/{apikey}/{handle}`, the filelink form the Filestack SDKs build: the key
/// in the path counts as the request's API key.
#[utoipa::path(get, path = "/{apikey}/{handle}", tag = "files", params(("apikey" = String, Path), ("handle" = String, Path, description = "20-character handle")), responses((status = 200, description = "The bytes (HEAD: headers only). While the file uploads: its declared length, the bytes received so far, then the rest as they arrive (chunked while a tus length is deferred)"), (status = 206, description = "A single range"), (status = 304, description = "If-None-Match matched"), (status = 404, description = "Unknown handle"), (status = 416, description = "Range not satisfiable")))]
pub async fn serve_keyed(
    State(state): State<SharedState>,
    Path((apikey, handle)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    Query(mut q): Query<PolicyQuery>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    // Only a handle makes this a filelink; any other two segments are no route.
    if Handle::parse(&handle).is_err() {
        return Err(super::route_not_found(&format!("/{apikey}/{handle}")));
    }
    let mut query = raw.unwrap_or_default();
    if q.key.is_none() {
        // The origin, if another POP answers, gets the key as a query parameter.
        let key = serde_urlencoded::to_string([("key", apikey.as_str())]).unwrap_or_default();
        query = if query.is_empty() {
            key
        } else {
            format!("{query}&{key}")
        };
        q.key = Some(apikey);
    }
    serve_handle(&state, &handle, &method, &headers, &q, &query).await
}

async fn serve_handle(
    state: &SharedState,
    handle: &str,
    method: &Method,
    headers: &HeaderMap,
    q: &PolicyQuery,
    query: &str,
) -> Result<Response, ApiError> {
    let attachment = q.attachment()?;
    let local = find(state, handle, q, Call::Read);
    let path = format!("/internal/files/{handle}");
    let from_origin = async |origin: PopId| {
        let idle = state.network.idle();
        relay_bytes(state, &origin, method, &path, query, headers, idle).await
    };
    match answer_for(state, handle, q, Call::Read, local, from_origin).await? {
        Answer::Here(file) | Answer::Stored(file) => {
            serve_file(state, &file, method, headers, attachment).await
        }
        Answer::Relayed(response) => Ok(response),
    }
}

/// Deletes a file everywhere: this POP's copy, the object in final storage
/// (by a removal job), a pending delivery. Later reads answer 404 `deleted`.
#[utoipa::path(delete, path = "/api/file/{handle}", tag = "files", params(("handle" = String, Path, description = "20-character handle"), ("key" = String, Query, description = "API key of the file's app"), ("policy" = Option<String>, Query), ("signature" = Option<String>, Query)), responses((status = 200, description = "handle, status Deleted"), (status = 401, description = "No API key"), (status = 403, description = "Another app's key, or a policy without remove"), (status = 404, description = "Unknown handle, or deleted or expired already")))]
pub async fn delete(
    State(state): State<SharedState>,
    Path(handle): Path<String>,
    Query(q): Query<PolicyQuery>,
) -> Result<Json<Value>, ApiError> {
    let parsed = parse_handle(&handle)?;
    let file = state.uploads.file(&parsed)?;
    state
        .services
        .apps
        .authorize_removal(file.app.as_deref(), &q.credentials(), &handle)?;
    let file = state.uploads.delete(&parsed).await?;
    state.network.announce_deletion(&parsed).await;
    Ok(Json(
        json!({"handle": file.handle, "status": file.status.as_str()}),
    ))
}

/// Another POP deleted a file it minted: this POP believes no manifest of it.
pub async fn internal_deleted(
    State(state): State<SharedState>,
    Path(handle): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let path = format!("/internal/files/{handle}/manifest");
    state.network.check_call("DELETE", &path, &headers)?;
    let parsed = parse_handle(&handle)?;
    state.network.manifests.deleted(&parsed);
    Ok(StatusCode::NO_CONTENT)
}

/// A file's bytes for another POP of the network (signed calls only).
pub async fn internal_serve(
    State(state): State<SharedState>,
    Path(handle): Path<String>,
    method: Method,
    headers: HeaderMap,
    Query(q): Query<PolicyQuery>,
) -> Result<Response, ApiError> {
    let path = format!("/internal/files/{handle}");
    state.network.check_call(method.as_str(), &path, &headers)?;
    let attachment = q.attachment()?;
    let file = find(&state, &handle, &q, Call::Read)?;
    let mut response = serve_file(&state, &file, &method, &headers, attachment).await?;
    response.headers_mut().insert(
        crate::network::FILE_STATUS_HEADER,
        HeaderValue::from_static(file.status.as_str()),
    );
    Ok(response)
}

/// The request headers a relayed read passes on, and the answer headers it returns.
const RELAYED_REQUEST_HEADERS: [axum::http::HeaderName; 3] = [RANGE, IF_NONE_MATCH, IF_RANGE];
const RELAYED_ANSWER_HEADERS: [axum::http::HeaderName; 9] = [
    axum::http::HeaderName::from_static(crate::network::FILE_STATUS_HEADER),
    axum::http::header::CACHE_CONTROL,
    CONTENT_TYPE,
    CONTENT_LENGTH,
    CONTENT_RANGE,
    ACCEPT_RANGES,
    ETAG,
    CONTENT_DISPOSITION,
    axum::http::header::RETRY_AFTER,
];

/// Another POP's answer to a read, streamed through as it arrives (nothing
/// is held whole), naming the POP that served it; ended when the origin sends
/// nothing for `idle`.
async fn relay_bytes(
    state: &SharedState,
    origin: &PopId,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    idle: std::time::Duration,
) -> Result<Response, ApiError> {
    let mut passed = HeaderMap::new();
    for name in RELAYED_REQUEST_HEADERS {
        if let Some(value) = headers.get(&name) {
            passed.insert(name, value.clone());
        }
    }
    let upstream = state
        .network
        .call(origin, method, path, query, &passed)
        .await?;
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut answer_headers = HeaderMap::new();
    for name in RELAYED_ANSWER_HEADERS {
        if let Some(value) = upstream.headers().get(name.as_str()) {
            if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                answer_headers.insert(name, value);
            }
        }
    }
    if let Ok(pop) = HeaderValue::from_str(origin.as_str()) {
        answer_headers.insert(crate::network::ANSWERED_BY_HEADER, pop);
    }
    let body = crate::network::relayed_body(upstream, idle);
    let mut response = (status, body).into_response();
    response.headers_mut().extend(answer_headers);
    Ok(response)
}

/// The bytes of `file`, from the local copy or from final storage.
async fn serve_file(
    state: &SharedState,
    file: &FileRecord,
    method: &Method,
    headers: &HeaderMap,
    attachment: bool,
) -> Result<Response, ApiError> {
    if file.local_bytes_missing && file.status != FileStatus::Stored {
        return Err(ApiError::Unavailable {
            code: "local_copy_incomplete",
            message: format!(
                "file {} lost bytes of its local copy before final storage had it; it cannot be served",
                file.handle
            ),
        });
    }
    let uploading = file.status == FileStatus::Uploading;
    let etag = format!("\"{}\"", file.handle);
    let mut response_headers = HeaderMap::new();
    if uploading {
        // The bytes so far are not the file: nothing may keep them as if they were.
        response_headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    } else {
        response_headers.insert(
            ETAG,
            HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\"")),
        );
    }
    response_headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response_headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(&file.mimetype)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    response_headers.insert(CONTENT_DISPOSITION, disposition(&file.filename, attachment));

    if file.length_deferred && uploading {
        // No length to declare yet: the bytes so far and then the rest, chunked.
        if *method == Method::HEAD {
            return Ok((StatusCode::OK, response_headers).into_response());
        }
        let body = state.uploads.read_growing(file, 0, None)?;
        return Ok((StatusCode::OK, response_headers, Body::from_stream(body)).into_response());
    }
    if !uploading
        && header_str(headers, IF_NONE_MATCH).is_some_and(|list| etag_matches(list, &etag))
    {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let range_applies = match header_str(headers, IF_RANGE) {
        None => true,
        Some(validator) => !uploading && validator.trim() == etag,
    };
    let range = match header_str(headers, RANGE) {
        Some(r) if range_applies => parse_range(r, file.size),
        _ => RangeRequest::Full,
    };
    let (status, start, end) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, file.size),
        RangeRequest::Partial(s, e) => (StatusCode::PARTIAL_CONTENT, s, e),
        RangeRequest::Unsatisfiable => {
            // The error's own JSON, with the range headers; not the file's Content-Type.
            let asked = header_str(headers, RANGE).unwrap_or_default();
            let message = match file.size {
                0 => format!("the range {asked:?} selects no byte: the file is empty (0 bytes); send no Range"),
                size => format!(
                    "the range {asked:?} selects no byte of the file, which has {size} bytes; ask within bytes=0-{}",
                    size - 1
                ),
            };
            let mut response = ApiError::RangeNotSatisfiable { message }.into_response();
            let answer_headers = response.headers_mut();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{}", file.size)) {
                answer_headers.insert(CONTENT_RANGE, value);
            }
            answer_headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            if let Some(etag) = response_headers.remove(ETAG) {
                answer_headers.insert(ETAG, etag);
            }
            return Ok(response);
        }
    };
    if status == StatusCode::PARTIAL_CONTENT {
        response_headers.insert(
            CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {}-{}/{}", start, end - 1, file.size))
                .unwrap_or(HeaderValue::from_static("*")),
        );
    }
    response_headers.insert(CONTENT_LENGTH, HeaderValue::from(end - start));
    if *method == Method::HEAD {
        return Ok((status, response_headers).into_response());
    }
    if uploading {
        // The declared length, and bytes as they become durable.
        let body = state.uploads.read_growing(file, start, Some(end))?;
        return Ok((status, response_headers, Body::from_stream(body)).into_response());
    }
    state.cache.touch(file);
    let local = file.evicted_at_ms.is_none()
        && !file.local_bytes_missing
        && state.services.parts.has_segments(&file.segments).await;
    let body = if local {
        Body::from_stream(state.services.parts.read_range(&file.segments, start, end))
    } else {
        // The local copy is gone (evicted after it was stored): read from final storage.
        let destination = state
            .services
            .destinations
            .get(&file.profile)
            .ok_or_else(|| {
                ApiError::not_found(
                    "file_unavailable",
                    format!(
                        "file {} has no local copy and its storage profile is not configured",
                        file.handle
                    ),
                )
            })?;
        let stream = destination
            .store
            .get(&file.container, &file.key, Some((start, end)))
            .await?;
        Body::from_stream(stream)
    };
    Ok((status, response_headers, body).into_response())
}

/// Progress events of an upload come at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Server-Sent Events: the file's current status, then every change, until
/// `Stored`; while it uploads, the bytes received so far (`progress`).
#[utoipa::path(get, path = "/{handle}/events", tag = "files", params(("handle" = String, Path, description = "20-character handle")), responses((status = 200, description = "text/event-stream of status events until Stored", content_type = "text/event-stream"), (status = 404, description = "Unknown, expired or deleted handle")))]
pub async fn events(
    State(state): State<SharedState>,
    Path(handle): Path<String>,
    Query(q): Query<PolicyQuery>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Subscribe before reading the record, so no change falls in between.
    let changes = state.services.events.subscribe();
    // The stream tells what metadata tells: the same authorization.
    let local = find(&state, &handle, &q, Call::Stat);
    let path = format!("/internal/files/{handle}/events");
    let from_origin = async |origin: PopId| {
        let query = raw.as_deref().unwrap_or("");
        // The origin's keep-alives are the only bytes of a quiet stream.
        let idle = EVENTS_KEEP_ALIVE * 3;
        relay_bytes(&state, &origin, &Method::GET, &path, query, &headers, idle).await
    };
    match answer_for(&state, &handle, &q, Call::Stat, local, from_origin).await? {
        // A file stored by the network says so and the stream ends.
        Answer::Here(file) | Answer::Stored(file) => {
            Ok(status_events(state, file, changes).into_response())
        }
        Answer::Relayed(response) => Ok(response),
    }
}

/// A file's status stream for another POP of the network (signed calls only).
pub async fn internal_events(
    State(state): State<SharedState>,
    Path(handle): Path<String>,
    Query(q): Query<PolicyQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let path = format!("/internal/files/{handle}/events");
    state.network.check_call("GET", &path, &headers)?;
    let changes = state.services.events.subscribe();
    let file = find(&state, &handle, &q, Call::Stat)?;
    Ok(status_events(state, file, changes).into_response())
}

/// Keep-alive comments of a quiet status stream.
const EVENTS_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// `file`'s status, then every change `changes` brings, until a final status.
fn status_events(
    state: SharedState,
    file: FileRecord,
    mut changes: tokio::sync::broadcast::Receiver<crate::events::StatusChange>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let handle = file.handle.clone();
    let stream = async_stream_of(move |tx| async move {
        let _open = OpenStream::count();
        let mut last = file.status;
        let event = |status: FileStatus| {
            Event::default()
                .event("status")
                .data(json!({"handle": handle, "status": status.as_str()}).to_string())
        };
        let size = (!file.length_deferred).then_some(file.size);
        let progress = |received: u64| {
            Event::default()
                .event("progress")
                .data(json!({"handle": handle, "received": received, "size": size}).to_string())
        };
        if tx.send(event(last)).await.is_err() {
            return;
        }
        // While it uploads, the bytes received too, at most every PROGRESS_EVERY.
        let mut received = match last {
            FileStatus::Uploading => state.uploads.watch_received(&file).ok(),
            _ => None,
        };
        if let Some(prefix) = &mut received {
            let now = prefix.borrow_and_update().len;
            if tx.send(progress(now)).await.is_err() {
                return;
            }
        }
        // Ends at a final status, or as soon as the client goes away.
        while !matches!(last, FileStatus::Stored) && !last.is_gone() {
            let advanced = async {
                match &mut received {
                    Some(prefix) => prefix.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let change = tokio::select! {
                _ = tx.closed() => return,
                change = changes.recv() => change,
                more = advanced => {
                    if !more {
                        // No longer uploading: the status change says what it is now.
                        received = None;
                        continue;
                    }
                    tokio::time::sleep(PROGRESS_EVERY).await;
                    let now = received.as_mut().map_or(0, |p| p.borrow_and_update().len);
                    if tx.send(progress(now)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            match change {
                Ok(change) if change.handle == handle && change.status != last => {
                    last = change.status;
                    if tx.send(event(last)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Missed changes: the record says where the file is now.
                    if let Ok(current) = state.uploads.file(&handle) {
                        if current.status != last {
                            last = current.status;
                            if tx.send(event(last)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(EVENTS_KEEP_ALIVE))
}

/// Counts an open `/events` stream for as long as its task lives.
struct OpenStream;

impl OpenStream {
    fn count() -> Self {
        metrics::gauge!(names::EVENT_STREAMS).increment(1.0);
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!(names::EVENT_STREAMS).decrement(1.0);
    }
}

/// A stream fed by a task through a small channel.
fn async_stream_of<F, Fut>(
    producer: F,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(producer(tx));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeRequest::Partial(0, 10));
        assert_eq!(
            parse_range("bytes=90-", 100),
            RangeRequest::Partial(90, 100)
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            RangeRequest::Partial(90, 100)
        );
        assert_eq!(
            parse_range("bytes=-1000", 100),
            RangeRequest::Partial(0, 100)
        );
        assert_eq!(
            parse_range("bytes=95-200", 100),
            RangeRequest::Partial(95, 100)
        );
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeRequest::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=5-1", 100), RangeRequest::Full);
    }
}
