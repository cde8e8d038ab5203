//! `POST /api/store/{location}`: a whole file in one request, raw or as the
//! multipart field `fileUpload`.

use std::sync::OnceLock;

use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::Json;
use cin_domain::{StoreOptions, UploadMode};
use cin_storage::{BodyError, ChunkError};
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::multipart::filelink;
use crate::app::SharedState;
use crate::auth::{Credentials, Target};
use crate::error::ApiError;
use crate::input::{Path, Query};
use crate::upload::NewUpload;

#[derive(Debug, Deserialize)]
pub struct StoreQuery {
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    mimetype: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    access: Option<String>,
    /// The API key.
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    /// Store from URL: the POP fetches this file.
    #[serde(default)]
    url: Option<String>,
}

const FILE_FIELD: &str = "fileUpload";

/// A form or JSON body at most this big may name a URL (`url=`) to store from;
/// a bigger one is the file itself.
const MAX_URL_BODY: u64 = 8 * 1024;

/// The URL a request asks to store from: `?url=`, or the `url` of a small form
/// or JSON body. A body that names none is given back, to be the file.
async fn url_to_store(
    query_url: Option<String>,
    content_type: Option<&str>,
    declared: Option<u64>,
    request: Request,
) -> Result<(Option<String>, Request), ApiError> {
    if query_url.is_some() {
        return Ok((query_url, request));
    }
    let kind = content_type.unwrap_or_default().to_ascii_lowercase();
    let form = kind.starts_with("application/x-www-form-urlencoded");
    let json = kind.starts_with("application/json");
    if !(form || json) || declared.is_none_or(|len| len > MAX_URL_BODY) {
        return Ok((None, request));
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_URL_BODY as usize)
        .await
        .map_err(|e| ChunkError::Body(crate::body::classify(e)))?;
    let url = if json {
        serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["url"].as_str().map(str::to_owned))
    } else {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()
            .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "url").map(|(_, v)| v))
    };
    Ok((url, Request::from_parts(parts, Body::from(bytes))))
}

/// The last segment of a URL's path, as a filename.
fn filename_in(url: &reqwest::Url) -> String {
    url.path_segments()
        .and_then(|mut segments| segments.next_back().map(str::to_owned))
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "file".into())
}

/// Room a form gets beyond its file: boundaries, part headers, small other fields.
const FORM_OVERHEAD: u64 = 1 << 20;

/// The file size a request may not pass, enforced on the bytes as they stream
/// (a form, or a raw body without Content-Length, says its size only by ending).
/// Once passed, the stream ends with an error and the handler answers 413 with
/// the refusal kept here, not the body error the engine saw.
struct SizeCap {
    limit: u64,
    /// Whose limit it is, for the message: "this POP" or "this app".
    whose: &'static str,
    refusal: OnceLock<String>,
}

impl SizeCap {
    /// The POP's `uploads.max_file_size`, or the app's own `max_file_size` when lower.
    fn for_request(state: &SharedState, app: Option<&str>) -> SizeCap {
        let pop = state.config.uploads.max_file_size;
        let own = app
            .and_then(|name| state.services.apps.get(name))
            .map_or(0, |a| a.max_file_size);
        let (limit, whose) = if own > 0 && own < pop {
            (own, "this app")
        } else {
            (pop, "this POP")
        };
        SizeCap {
            limit,
            whose,
            refusal: OnceLock::new(),
        }
    }

    /// The most a whole form may carry: the file's limit plus [`FORM_OVERHEAD`].
    fn form_limit(&self) -> usize {
        usize::try_from(self.limit.saturating_add(FORM_OVERHEAD)).unwrap_or(usize::MAX)
    }

    fn refuse(&self, message: String) -> BodyError {
        let _ = self.refusal.set(message.clone());
        BodyError::Interrupted(message)
    }

    fn refuse_file(&self) -> BodyError {
        self.refuse(format!(
            "the file is larger than {} bytes, the most {} accepts",
            self.limit, self.whose
        ))
    }

    fn refuse_form(&self) -> BodyError {
        self.refuse(format!(
            "the form is larger than {} bytes: its file may have up to {} bytes (the most {} accepts), its other fields {} bytes",
            self.form_limit(),
            self.limit,
            self.whose,
            FORM_OVERHEAD
        ))
    }

    /// 413 if the cap ended the body.
    fn refusal(&self) -> Option<ApiError> {
        self.refusal.get().map(|message| ApiError::TooLarge {
            message: message.clone(),
        })
    }

    /// `body`, ended with an error once it passes the limit.
    fn guard<'a, S>(&'a self, body: S) -> impl Stream<Item = Result<Bytes, BodyError>> + Send + 'a
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Send + 'a,
    {
        let mut seen = 0u64;
        body.map(move |frame| {
            let frame = frame?;
            seen = seen.saturating_add(frame.len() as u64);
            if seen > self.limit {
                return Err(self.refuse_file());
            }
            Ok(frame)
        })
    }

    /// What a multipart error means: the form past its limit (413), a body that
    /// broke or stalled (as for raw bodies), or a malformed form (400).
    fn form_error(&self, e: &MultipartError) -> BodyError {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            self.refuse_form()
        } else if e.status().is_server_error() {
            // Reading the request failed under the form parser.
            crate::body::classify_error(e)
        } else {
            BodyError::Malformed(format!(
                "the multipart form is malformed: {}",
                e.body_text()
            ))
        }
    }
}

#[utoipa::path(post, path = "/api/store/{location}", tag = "uploads", params(("location" = String, Path, description = "Storage kind, e.g. s3"), ("key" = Option<String>, Query, description = "API key"), ("filename" = Option<String>, Query), ("mimetype" = Option<String>, Query), ("path" = Option<String>, Query), ("container" = Option<String>, Query), ("policy" = Option<String>, Query), ("signature" = Option<String>, Query)), request_body(content = Vec<u8>, description = "Raw bytes, or multipart/form-data with the field fileUpload"), responses((status = 200, description = "url, handle, size, type, filename, key, container, status"), (status = 413, description = "Too large"), (status = 507, description = "Disk below its watermark"), (status = 400, description = "Bad input, or a URL refused or failing"), (status = 401, description = "API key or policy missing"), (status = 403, description = "Key, policy or container refused")))]
pub async fn store(
    State(state): State<SharedState>,
    Path(location): Path<String>,
    Query(mut q): Query<StoreQuery>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (url, request) =
        url_to_store(q.url.take(), content_type.as_deref(), declared, request).await?;
    // A URL's file has the size its server says, not this request's.
    let declared = if url.is_some() { None } else { declared };
    let store = StoreOptions {
        location: Some(location),
        container: q.container,
        path: q.path,
        region: q.region,
        access: q.access,
    };
    let app = state.services.apps.authorize_upload(
        &Credentials {
            apikey: q.key.as_deref(),
            policy: q.policy.as_deref(),
            signature: q.signature.as_deref(),
        },
        &Target {
            handle: None,
            path: store.path.as_deref(),
            container: store.container.as_deref(),
            size: declared,
        },
    )?;
    let is_form = content_type
        .as_deref()
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("multipart/form-data"));
    let cap = SizeCap::for_request(&state, app.as_deref());
    let stored = if let Some(url) = url {
        let answer = state.fetcher.get(&url).await?;
        let length = answer.content_length();
        let upload = NewUpload {
            filename: q.filename.unwrap_or_else(|| filename_in(answer.url())),
            mimetype: q.mimetype.or_else(|| {
                answer
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            }),
            size: length.unwrap_or(0),
            store,
            mode: UploadMode::Direct,
            app: app.clone(),
        };
        // Streams to disk as it arrives, within the same size limit as any upload.
        let body = cap.guard(
            answer
                .bytes_stream()
                .map_err(|e| BodyError::Interrupted(format!("fetching {url}: {e}"))),
        );
        state.uploads.store_whole(upload, length, body).await
    } else if is_form {
        // The route has axum's own body limit off: this one is the file's.
        let request =
            request.map(|body| Body::new(http_body_util::Limited::new(body, cap.form_limit())));
        let mut form = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::invalid("malformed_multipart", e.body_text()))?;
        loop {
            let field = form
                .next_field()
                .await
                .map_err(|e| match cap.form_error(&e) {
                    BodyError::Malformed(message) => {
                        ApiError::invalid("malformed_multipart", message)
                    }
                    other => cap
                        .refusal()
                        .unwrap_or_else(|| ChunkError::Body(other).into()),
                })?
                .ok_or_else(|| {
                    ApiError::invalid(
                        "file_missing",
                        format!("the form has no {FILE_FIELD:?} field"),
                    )
                })?;
            if field.name() != Some(FILE_FIELD) {
                continue;
            }
            let upload = NewUpload {
                filename: q
                    .filename
                    .clone()
                    .or_else(|| field.file_name().map(str::to_owned))
                    .unwrap_or_default(),
                mimetype: q
                    .mimetype
                    .clone()
                    .or_else(|| field.content_type().map(str::to_owned)),
                size: 0,
                store: store.clone(),
                mode: UploadMode::Direct,
                app: app.clone(),
            };
            // The field streams to disk as it arrives, like a raw body.
            let body = cap.guard(field.map_err(|e| cap.form_error(&e)));
            break state.uploads.store_whole(upload, None, body).await;
        }
    } else {
        // curl sends `application/x-www-form-urlencoded` for any --data-binary
        // body: that says nothing about the file, and the filename says more.
        let filename = q.filename.unwrap_or_default();
        let mimetype = q
            .mimetype
            .or_else(|| cin_domain::mimetype_for_filename(&filename).map(str::to_owned))
            .or(content_type.filter(|c| {
                !c.to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            }));
        let upload = NewUpload {
            filename,
            mimetype,
            size: declared.unwrap_or(0),
            store,
            mode: UploadMode::Direct,
            app: app.clone(),
        };
        let body = cap.guard(crate::body::data_stream(request.into_body()));
        state.uploads.store_whole(upload, declared, body).await
    };
    let file = match stored {
        Ok(file) => file,
        Err(e) => return Err(cap.refusal().unwrap_or_else(|| e.into())),
    };
    Ok(Json(json!({
        "url": filelink(&state, &file),
        "handle": file.handle,
        "size": file.size,
        "type": file.mimetype,
        "filename": file.filename,
        "key": file.key,
        "container": file.container,
        "status": file.status.as_str(),
    })))
}
