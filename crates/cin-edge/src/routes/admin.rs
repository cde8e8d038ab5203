//! The operator's admin API: a listing of the files this POP holds, filtered
//! and a page at a time (`GET /api/files`), and actions on a file whose
//! replication fails: retry it now, or cancel it (the file stays `InTransit`,
//! served from this POP). Every call needs `Authorization: Bearer {admin.key}`;
//! with no key configured the API is off.

use axum::extract::{FromRequestParts, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::Json;
use cin_domain::{FileRecord, FileStatus, Handle, ReplicationJob};
use cin_storage::{JobChange, MetadataStore, StorageError};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::SharedState;
use crate::config::ReplicatorConfig;
use crate::error::ApiError;
use crate::input::{Path, Query};
use crate::replicator;
use crate::upload::now_ms;

/// Files listed when `limit` is not given, and the most one page may hold.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// Records read from the metadata store at a time while a page is filled.
const SCAN_PAGE: usize = 256;
/// Records one request examines at most: a filter that matches few files ends
/// its page early (with a cursor) rather than reading the whole store at once.
pub const SCAN_BUDGET: usize = 10_000;
/// The largest `older_than` accepted (about 136 years).
const MAX_OLDER_THAN: u64 = u32::MAX as u64;
/// The statuses a listing filters by.
const LISTED_STATUSES: [FileStatus; 3] = [
    FileStatus::Uploading,
    FileStatus::InTransit,
    FileStatus::Stored,
];

/// Proof that a request carries this POP's admin key; the one place admin
/// calls are refused for their credentials.
pub struct AdminKey;

impl FromRequestParts<SharedState> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        check_key(&state.config.admin.key, &parts.headers).map(|()| AdminKey)
    }
}

/// Checks `Authorization: Bearer KEY` against the configured key.
fn check_key(configured: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if configured.is_empty() {
        return Err(ApiError::not_found(
            "admin_disabled",
            "the admin API is off on this POP: set admin.key (at least 32 characters, e.g. \
             CIN__ADMIN__KEY=$(openssl rand -hex 32)) and restart it",
        ));
    }
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::Unauthorized {
            message:
                "the admin API needs the admin key: send Authorization: Bearer KEY (admin.key)"
                    .into(),
        });
    };
    let sent = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        })
        .ok_or_else(|| ApiError::Unauthorized {
            message: "the Authorization header is not `Bearer KEY`: send the admin key (admin.key) as a bearer token".into(),
        })?;
    // Digests first, so the comparison takes as long whatever the lengths.
    let matches = Sha256::digest(sent.as_bytes()).ct_eq(&Sha256::digest(configured.as_bytes()));
    if bool::from(matches) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "admin_key_refused",
            "this is not the POP's admin key: send the value of its admin.key",
        ))
    }
}

/// The query of `GET /api/files`, every field as the client wrote it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    app: Option<String>,
    container: Option<String>,
    older_than: Option<String>,
    replication: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// Which files a listing shows.
#[derive(Debug, Default)]
struct Filter {
    status: Option<FileStatus>,
    /// App names that match (the one asked for, by name or by API key).
    apps: Vec<String>,
    container: Option<String>,
    /// Only files whose status last changed at least this long ago.
    older_than_ms: Option<u64>,
    failing: bool,
}

fn invalid(parameter: &str, message: String) -> ApiError {
    ApiError::invalid("invalid_query", format!("{parameter}: {message}"))
}

impl ListQuery {
    fn parse(self, state: &SharedState) -> Result<(Filter, usize, Option<Handle>), ApiError> {
        let status = self
            .status
            .map(|s| {
                LISTED_STATUSES
                    .into_iter()
                    .find(|known| known.as_str().eq_ignore_ascii_case(&s))
                    .ok_or_else(|| {
                        invalid(
                            "status",
                            format!("{s:?} is not a status to list by: give Uploading, InTransit or Stored"),
                        )
                    })
            })
            .transpose()?;
        let apps = match self.app {
            None => Vec::new(),
            Some(app) => {
                // An app's API key names it too; a name no app has any more still
                // matches the files it uploaded.
                let mut names: Vec<String> = state
                    .config
                    .apps
                    .iter()
                    .filter(|(_, config)| config.apikey == app)
                    .map(|(name, _)| name.clone())
                    .collect();
                names.push(app);
                names
            }
        };
        if let Some(container) = &self.container {
            cin_domain::store::validate_container(container)
                .map_err(|e| invalid("container", e.to_string()))?;
        }
        let older_than_ms = self
            .older_than
            .map(|s| match s.trim().parse::<u64>() {
                Ok(secs) if secs <= MAX_OLDER_THAN => Ok(secs * 1000),
                _ => Err(invalid(
                    "older_than",
                    format!("{s:?} is not a number of seconds from 0 to {MAX_OLDER_THAN}"),
                )),
            })
            .transpose()?;
        let failing = match self.replication.as_deref() {
            None => false,
            Some("failing") => true,
            Some(other) => {
                return Err(invalid(
                    "replication",
                    format!("{other:?} is not a replication filter: give failing"),
                ))
            }
        };
        let limit = match self.limit {
            None => DEFAULT_LIMIT,
            Some(s) => match s.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(invalid(
                        "limit",
                        format!("{s:?} is not a page size from 1 to {MAX_LIMIT}"),
                    ))
                }
            },
        };
        let cursor = self
            .cursor
            .map(|c| {
                Handle::parse(&c).map_err(|_| {
                    invalid(
                        "cursor",
                        format!(
                            "{c:?} is not a cursor: pass next_cursor of the previous page as it is"
                        ),
                    )
                })
            })
            .transpose()?;
        let filter = Filter {
            status,
            apps,
            container: self.container,
            older_than_ms,
            failing,
        };
        Ok((filter, limit, cursor))
    }
}

/// When the file's status last changed (ms since the epoch).
fn updated_at(file: &FileRecord) -> u64 {
    [
        file.completed_at_ms,
        file.stored_at_ms,
        file.expired_at_ms,
        file.deleted_at_ms,
    ]
    .into_iter()
    .flatten()
    .fold(file.created_at_ms, u64::max)
}

/// The replication job of a file that is waiting for final storage.
fn delivery_job(
    meta: &dyn MetadataStore,
    file: &FileRecord,
) -> Result<Option<ReplicationJob>, StorageError> {
    if file.status != FileStatus::InTransit {
        return Ok(None);
    }
    Ok(meta.get_job(&file.handle)?.filter(|job| !job.remove))
}

/// Whether the file's replication has failed and not succeeded since (it may
/// be retrying on its own, given up, or cancelled).
fn is_failing(config: &ReplicatorConfig, file: &FileRecord, job: Option<&ReplicationJob>) -> bool {
    job.is_some_and(|job| file.last_error.is_some() || replicator::parked(config, job))
}

impl Filter {
    /// Whether `file` is listed, without its job (the cheap part).
    fn matches_record(&self, file: &FileRecord, now: u64) -> bool {
        self.status.is_none_or(|s| file.status == s)
            && (self.apps.is_empty()
                || file.app.as_ref().is_some_and(|app| self.apps.contains(app)))
            && self.container.as_ref().is_none_or(|c| file.container == *c)
            && self
                .older_than_ms
                .is_none_or(|age| now.saturating_sub(updated_at(file)) >= age)
            && (!self.failing || file.status == FileStatus::InTransit)
    }
}

/// One file as the listing and the actions show it.
fn item(state: &SharedState, file: &FileRecord, job: Option<&ReplicationJob>) -> Value {
    let config = &state.config.replicator;
    let parked = job.is_some_and(|job| replicator::parked(config, job));
    json!({
        "handle": file.handle,
        "url": format!("{}/{}", state.public_url, file.handle),
        "status": file.status.as_str(),
        "size": file.size,
        "filename": file.filename,
        "mimetype": file.mimetype,
        "app": file.app,
        "container": file.container,
        "key": file.key,
        "profile": file.profile,
        "created_at": file.created_at_ms,
        "updated_at": updated_at(file),
        "replication": {
            "attempts": file.replication_attempts,
            "last_error": file.last_error,
            "failing": is_failing(config, file, job),
            "given_up": job.is_some_and(|job| replicator::given_up(config, job)),
            "cancelled": job.is_some_and(|job| job.cancelled_at_ms.is_some()),
            "cancelled_at": job.and_then(|job| job.cancelled_at_ms),
            "next_attempt_at": job.filter(|_| !parked).map(|job| job.not_before_ms),
            "failure": job.and_then(|job| replicator::failure_message(config, job)),
        },
    })
}

/// Fills one page: up to `limit` matching files after `after`, in handle
/// order, reading the store a page at a time; the cursor of the next page
/// (the last record examined), or None when the store has no more.
fn scan(
    state: &SharedState,
    filter: &Filter,
    limit: usize,
    mut after: Option<Handle>,
) -> Result<(Vec<Value>, Option<Handle>), StorageError> {
    let meta = state.services.meta.as_ref();
    let config = &state.config.replicator;
    let now = now_ms();
    let mut items = Vec::new();
    let mut examined = 0;
    loop {
        let want = SCAN_PAGE.min(SCAN_BUDGET - examined);
        let page = meta.files_after(after.as_ref(), want)?;
        let complete = page.len() < want;
        for file in page {
            examined += 1;
            after = Some(file.handle.clone());
            if !filter.matches_record(&file, now) {
                continue;
            }
            let job = delivery_job(meta, &file)?;
            if filter.failing && !is_failing(config, &file, job.as_ref()) {
                continue;
            }
            items.push(item(state, &file, job.as_ref()));
            if items.len() == limit {
                return Ok((items, after));
            }
        }
        if complete {
            return Ok((items, None));
        }
        if examined >= SCAN_BUDGET {
            return Ok((items, after));
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/files",
    operation_id = "list_files",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("status" = Option<String>, Query, description = "Only files with this status: Uploading, InTransit or Stored"),
        ("app" = Option<String>, Query, description = "Only files of this app, by name or API key"),
        ("container" = Option<String>, Query, description = "Only files delivered to this container (bucket)"),
        ("older_than" = Option<u64>, Query, description = "Only files whose status last changed at least this many seconds ago (updated_at)"),
        ("replication" = Option<String>, Query, description = "`failing`: only files in transit whose replication failed (retrying, given up or cancelled)"),
        ("limit" = Option<u32>, Query, description = "Files per page, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page, as it is"),
    ),
    responses(
        (status = 200, description = "files: a page of files in handle order (handle, url, status, size, filename, mimetype, app, container, key, profile, created_at, updated_at, replication{attempts, last_error, failing, given_up, cancelled, cancelled_at, next_attempt_at, failure}); next_cursor: the next page's cursor, null after the last page. A page may hold fewer than limit files while next_cursor is set"),
        (status = 401, description = "No admin key (Authorization: Bearer KEY)"),
        (status = 403, description = "Not this POP's admin key"),
        (status = 404, description = "The admin API is off (admin.key is empty)"),
    )
)]
pub async fn list(
    _key: AdminKey,
    State(state): State<SharedState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let (filter, limit, cursor) = query.parse(&state)?;
    let scanned = state.clone();
    // A page can examine thousands of records: off the request threads.
    let (files, next) = tokio::task::spawn_blocking(move || scan(&scanned, &filter, limit, cursor))
        .await
        .map_err(|e| StorageError::io("listing files", std::io::Error::other(e)))??;
    let mut answer = Map::new();
    answer.insert("files".into(), Value::Array(files));
    answer.insert("next_cursor".into(), json!(next));
    Ok(Json(Value::Object(answer)))
}

/// What an action does to a failing file's job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Retry,
    Cancel,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::Cancel => "cancel",
        }
    }
}

/// The file behind `handle` and its job, under the file's upload lock, after
/// `action` changed the job; 409 unless the file's replication is failing.
async fn act(state: &SharedState, handle: &str, action: Action) -> Result<Value, ApiError> {
    let handle = Handle::parse(handle).map_err(|_| {
        ApiError::not_found("file_not_found", format!("no file has handle {handle:?}"))
    })?;
    let found = state.services.meta.get_file(&handle)?.ok_or_else(|| {
        ApiError::not_found("file_not_found", format!("no file has handle {handle}"))
    })?;
    let lifecycle = state.uploads.lifecycle();
    let guard = lifecycle.lock(&found.upload_id).await;
    let file = lifecycle.current(&guard, &handle)?;
    let job = delivery_job(state.services.meta.as_ref(), &file)?;
    let verb = action.name();
    let conflict = |why: String| {
        ApiError::conflict(
            "replication_not_failing",
            format!("cannot {verb} the replication of {handle}: {why}"),
            Some(file.status),
        )
    };
    let mut job = match (file.status, job) {
        (FileStatus::Uploading, _) => {
            return Err(conflict(
                "it is still uploading, so its replication has not begun".into(),
            ))
        }
        (FileStatus::Stored, _) => {
            return Err(conflict(
                "it is Stored: final storage confirmed it, nothing is left to replicate".into(),
            ))
        }
        (FileStatus::InTransit, None) if file.is_tus_partial() => {
            return Err(conflict(
                "it is a tus partial upload, never delivered on its own; its final upload is"
                    .into(),
            ))
        }
        (FileStatus::InTransit, Some(job))
            if is_failing(&state.config.replicator, &file, Some(&job)) =>
        {
            job
        }
        (FileStatus::InTransit, _) => {
            return Err(conflict(format!(
                "its replication has not failed (attempts so far: {}); it is queued or under way. \
                 GET /api/files?replication=failing lists the files whose replication fails",
                file.replication_attempts
            )))
        }
        (status, _) => {
            return Err(conflict(format!(
                "it is {}: gone from this POP, nothing to replicate",
                status.as_str()
            )))
        }
    };
    match action {
        Action::Retry => {
            // Due now, no longer given up or cancelled.
            job.not_before_ms = 0;
            job.mismatched_attempts = 0;
            job.cancelled_at_ms = None;
        }
        Action::Cancel => {
            job.cancelled_at_ms = job.cancelled_at_ms.or(Some(now_ms()));
        }
    }
    lifecycle
        .update(&guard, &file, JobChange::Upsert(job.clone()))
        .await?;
    drop(guard);
    if action == Action::Retry {
        state.services.replication_wakeup.notify_one();
    }
    tracing::info!(%handle, action = verb, attempts = file.replication_attempts, "operator action on a failing replication");
    Ok(item(state, &file, Some(&job)))
}

#[utoipa::path(
    post,
    path = "/api/files/{handle}/replication/retry",
    operation_id = "retry_replication",
    tag = "admin",
    security(("admin_key" = [])),
    params(("handle" = String, Path, description = "20-character handle")),
    responses(
        (status = 200, description = "The file as GET /api/files shows it: its replication is due now, no longer given up or cancelled"),
        (status = 401, description = "No admin key (Authorization: Bearer KEY)"),
        (status = 403, description = "Not this POP's admin key"),
        (status = 404, description = "Unknown handle, or the admin API is off (admin.key is empty)"),
        (status = 409, description = "The file's replication is not failing (uploading, queued, Stored, deleted): the message says why"),
    )
)]
pub async fn retry(
    _key: AdminKey,
    State(state): State<SharedState>,
    Path(handle): Path<String>,
) -> Result<Json<Value>, ApiError> {
    act(&state, &handle, Action::Retry).await.map(Json)
}

#[utoipa::path(
    post,
    path = "/api/files/{handle}/replication/cancel",
    operation_id = "cancel_replication",
    tag = "admin",
    security(("admin_key" = [])),
    params(("handle" = String, Path, description = "20-character handle")),
    responses(
        (status = 200, description = "The file as GET /api/files shows it: no more replication attempts until a retry; it stays InTransit and servable here"),
        (status = 401, description = "No admin key (Authorization: Bearer KEY)"),
        (status = 403, description = "Not this POP's admin key"),
        (status = 404, description = "Unknown handle, or the admin API is off (admin.key is empty)"),
        (status = 409, description = "The file's replication is not failing (uploading, queued, Stored, deleted): the message says why"),
    )
)]
pub async fn cancel(
    _key: AdminKey,
    State(state): State<SharedState>,
    Path(handle): Path<String>,
) -> Result<Json<Value>, ApiError> {
    act(&state, &handle, Action::Cancel).await.map(Json)
}

/// What the admin operations declare beyond their annotations: the bearer
/// scheme, and the form of each query field (as `list` checks it).
pub fn complete_document(doc: &mut Value) {
    if let Some(root) = doc.as_object_mut() {
        let components = root.entry("components").or_insert_with(|| json!({}));
        if let Some(components) = components.as_object_mut() {
            let schemes = components
                .entry("securitySchemes")
                .or_insert_with(|| json!({}));
            if let Some(schemes) = schemes.as_object_mut() {
                schemes.insert(
                    "admin_key".into(),
                    json!({
                        "type": "http",
                        "scheme": "bearer",
                        "description": "The POP's admin.key",
                    }),
                );
            }
        }
    }
    let Some(parameters) = doc
        .pointer_mut("/paths/~1api~1files/get/parameters")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let statuses: Vec<&str> = LISTED_STATUSES.iter().map(|s| s.as_str()).collect();
    for parameter in parameters {
        let schema = match parameter["name"].as_str() {
            Some("status") => json!({"type": "string", "enum": statuses}),
            Some("replication") => json!({"type": "string", "enum": ["failing"]}),
            Some("older_than") => {
                json!({"type": "integer", "minimum": 0, "maximum": MAX_OLDER_THAN})
            }
            Some("limit") => json!({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            Some("cursor") => json!({"type": "string", "pattern": Handle::pattern()}),
            _ => continue,
        };
        parameter["schema"] = schema;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_key_is_checked_as_a_bearer_token() {
        let key = "k".repeat(32);
        assert!(check_key(&key, &with_auth(&format!("Bearer {key}"))).is_ok());
        assert!(check_key(&key, &with_auth(&format!("bearer  {key} "))).is_ok());
        let status = |r: Result<(), ApiError>| r.unwrap_err().status_and_code();
        assert_eq!(status(check_key(&key, &HeaderMap::new())).0, 401);
        assert_eq!(status(check_key(&key, &with_auth(&key))).0, 401);
        assert_eq!(
            status(check_key(&key, &with_auth(&format!("Basic {key}")))).0,
            401
        );
        assert_eq!(
            status(check_key(&key, &with_auth("Bearer nope"))),
            (axum::http::StatusCode::FORBIDDEN, "admin_key_refused")
        );
        assert_eq!(
            status(check_key("", &with_auth(&format!("Bearer {key}")))),
            (axum::http::StatusCode::NOT_FOUND, "admin_disabled")
        );
    }

    #[test]
    fn the_last_status_change_is_the_latest_time_recorded() {
        let mut file = FileRecord::new_upload(
            cin_domain::UploadId::generate(),
            1,
            cin_domain::UploadMode::Direct,
            10,
        );
        assert_eq!(updated_at(&file), 10);
        file.completed_at_ms = Some(20);
        file.stored_at_ms = Some(30);
        assert_eq!(updated_at(&file), 30);
    }
}
