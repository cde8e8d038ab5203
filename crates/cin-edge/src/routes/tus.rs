//! tus 1.0.0 at `/files/` (https://tus.io/protocols/resumable-upload), with the
//! creation, creation-with-upload, creation-defer-length, termination, checksum,
//! checksum-trailer, expiration, concatenation and concatenation-unfinished
//! extensions. Every tus upload is also a file with a handle and a filelink,
//! replicated like any other.

use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use cin_domain::{FileRecord, FileStatus, StoreOptions, TusConcat, UploadId, UploadMode};

use crate::app::SharedState;
use crate::auth::{Credentials, Target};
use crate::body::{data_stream_keeping_trailers, Trailers};
use crate::error::ApiError;
use crate::input::Path;
use crate::upload::{
    Appended, BodyChecksum, DeclaredChecksum, NewUpload, UploadError, TUS_BASE64, TUS_CHECKSUMS,
};

pub const TUS_VERSION: &str = "1.0.0";
const TUS_EXTENSIONS: &str =
    "creation,creation-with-upload,creation-defer-length,termination,checksum,checksum-trailer,expiration,concatenation,concatenation-unfinished";
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

/// Headers a browser client must be able to read (CORS `Access-Control-Expose-Headers`).
pub const EXPOSED_HEADERS: [&str; 11] = [
    "upload-offset",
    "upload-length",
    "upload-defer-length",
    "upload-metadata",
    "upload-expires",
    "upload-concat",
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-max-size",
    "cin-filelink",
];

/// A tus answer: a status and headers; `Tus-Resumable` is added to every one.
pub struct TusResponse {
    status: StatusCode,
    headers: HeaderMap,
}

impl TusResponse {
    fn new(status: StatusCode) -> Self {
        TusResponse {
            status,
            headers: HeaderMap::new(),
        }
    }

    fn header(mut self, name: &'static str, value: impl ToString) -> Self {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.insert(HeaderName::from_static(name), v);
        }
        self
    }
}

impl IntoResponse for TusResponse {
    fn into_response(mut self) -> Response {
        self.headers
            .insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
        (self.status, self.headers).into_response()
    }
}

/// A tus error answer: the JSON error body with tus's status codes (410 for
/// expired uploads) and `Tus-Resumable`.
pub enum TusError {
    Api(ApiError),
    /// An answer with a status the common error type does not carry (415).
    Raw(Box<Response>),
}

impl From<ApiError> for TusError {
    fn from(e: ApiError) -> Self {
        TusError::Api(e)
    }
}

impl From<UploadError> for TusError {
    fn from(e: UploadError) -> Self {
        TusError::Api(e.into())
    }
}

impl IntoResponse for TusError {
    fn into_response(self) -> Response {
        let error = match self {
            TusError::Raw(response) => return *response,
            TusError::Api(error) => error,
        };
        // tus answers 410 for an upload that is gone.
        let expired = matches!(&error, ApiError::Upload(UploadError::Gone { .. }));
        let mut response = error.into_response();
        if expired {
            *response.status_mut() = StatusCode::GONE;
        }
        response
            .headers_mut()
            .insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
        response
    }
}

pub type TusResult = Result<TusResponse, TusError>;

impl TusError {
    /// `error`'s JSON body under a status the common error type does not carry.
    fn with_status(error: ApiError, status: StatusCode) -> TusError {
        let mut response = TusError::Api(error).into_response();
        *response.status_mut() = status;
        TusError::Raw(Box::new(response))
    }
}

/// 415 for a body that is not `application/offset+octet-stream`.
fn unsupported_body(content_type: &str, what: &str) -> TusError {
    TusError::with_status(
        ApiError::invalid(
            "unsupported_media_type",
            format!("{what} must be {OFFSET_OCTET_STREAM}, got {content_type:?}"),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    )
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Extracted by every tus handler but OPTIONS: the request speaks our tus
/// version; others get 412 and the versions we do speak.
pub struct TusVersion;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for TusVersion {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Response> {
        check_version(&parts.headers)
            .map(|()| TusVersion)
            .map_err(|refused| *refused)
    }
}

fn check_version(headers: &HeaderMap) -> Result<(), Box<Response>> {
    if header(headers, "tus-resumable") == Some(TUS_VERSION) {
        return Ok(());
    }
    let mut response = TusError::Api(ApiError::Invalid {
        code: "unsupported_tus_version",
        message: format!("this server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}"),
    })
    .into_response();
    *response.status_mut() = StatusCode::PRECONDITION_FAILED;
    response
        .headers_mut()
        .insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    Err(Box::new(response))
}

fn parse_u64(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
    header(headers, name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::invalid(
                    "invalid_header",
                    format!("{name} must be a non-negative integer, got {v:?}"),
                )
            })
        })
        .transpose()
}

/// `Upload-Metadata`: comma-separated `key base64value` pairs (the value may be absent).
fn parse_metadata(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut it = pair.splitn(2, ' ');
        let key = it.next().unwrap_or_default().to_owned();
        let value = match it.next().map(str::trim).filter(|v| !v.is_empty()) {
            None => String::new(),
            Some(v) => {
                let bytes = TUS_BASE64.decode(v).map_err(|_| {
                    ApiError::invalid(
                        "invalid_metadata",
                        format!("Upload-Metadata value of {key:?} is not base64"),
                    )
                })?;
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        out.push((key, value));
    }
    Ok(out)
}

fn upload_from_metadata(metadata: &[(String, String)], size: u64) -> NewUpload {
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| {
                metadata
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
            })
            .filter(|v| !v.is_empty())
    };
    NewUpload {
        filename: get(&["filename", "name"]).unwrap_or_default(),
        mimetype: get(&["filetype", "mimetype", "type"]),
        size,
        store: StoreOptions {
            location: get(&["location"]),
            container: get(&["container"]),
            path: get(&["path"]),
            region: get(&["region"]),
            access: get(&["access"]),
        },
        mode: UploadMode::Tus,
        app: None,
    }
}

/// Where a body's checksum comes from: `Upload-Checksum` in the head, or a
/// trailer announced by `Trailer: Upload-Checksum` (checksum-trailer). The
/// body is read through the returned stream, which keeps its trailer.
fn body_checksum(
    headers: &HeaderMap,
    body: Body,
) -> Result<
    (
        BodyChecksum,
        impl futures_util::Stream<Item = Result<bytes::Bytes, cin_storage::BodyError>> + Send,
    ),
    ApiError,
> {
    let announced = headers
        .get_all("trailer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case("upload-checksum"));
    // An empty Upload-Checksum declares nothing.
    let in_head = header(headers, "upload-checksum").filter(|v| !v.trim().is_empty());
    let trailers = Trailers::default();
    let checksum = match (in_head, announced) {
        (Some(_), true) => {
            return Err(ApiError::invalid(
                "invalid_checksum",
                "send Upload-Checksum in the head or as a trailer, not both",
            ))
        }
        (Some(value), false) => BodyChecksum::Declared(DeclaredChecksum::parse(value)?),
        (None, true) => {
            let trailers = trailers.clone();
            BodyChecksum::Trailer(Box::new(move || {
                let fields = trailers.take().unwrap_or_default();
                let value = fields
                    .get("upload-checksum")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        UploadError::invalid(
                            "checksum_trailer_missing",
                            "the body ended without the Upload-Checksum trailer its Trailer header announced; nothing of it was kept, send it again",
                        )
                    })?;
                DeclaredChecksum::parse(value)
            }))
        }
        (None, false) => BodyChecksum::None,
    };
    Ok((checksum, data_stream_keeping_trailers(body, trailers)))
}

fn upload_url(state: &SharedState, upload: &UploadId) -> String {
    format!("{}/files/{}", state.public_url, upload)
}

/// The upload id named by a URL or path ending in `/files/{id}` (for `Upload-Concat: final;...`).
fn upload_id_of(url: &str) -> Result<UploadId, ApiError> {
    let id = url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    UploadId::parse(id).map_err(|_| {
        ApiError::invalid(
            "invalid_concat",
            format!("{url:?} does not name an upload on this server"),
        )
    })
}

fn http_date(ms: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(ms))
}

/// Headers that describe the file behind an upload.
fn with_file_headers(
    state: &SharedState,
    response: TusResponse,
    file: &FileRecord,
) -> Result<TusResponse, ApiError> {
    let mut response = response.header("cin-handle", &file.handle).header(
        "cin-filelink",
        format!("{}/{}", state.public_url, file.handle),
    );
    if let Some(expires) = state.uploads.expires_at_ms(file)? {
        response = response.header("upload-expires", http_date(expires));
    }
    Ok(response)
}

#[utoipa::path(options, path = "/files/", tag = "tus", responses((status = 200, description = "Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm")))]
pub async fn options(State(state): State<SharedState>) -> Response {
    // 200, not 204: the spec allows both, and some clients accept only 200.
    TusResponse::new(StatusCode::OK)
        .header("tus-version", TUS_VERSION)
        .header("tus-extension", TUS_EXTENSIONS)
        .header("tus-max-size", state.config.uploads.max_file_size)
        .header("tus-checksum-algorithm", TUS_CHECKSUMS)
        .into_response()
}

#[utoipa::path(post, path = "/files/", tag = "tus", params(("Upload-Length" = Option<u64>, Header, description = "The upload's size (or Upload-Defer-Length: 1)"), ("Upload-Defer-Length" = Option<u8>, Header, description = "1: the size is given by a later PATCH"), ("Upload-Metadata" = Option<String>, Header, description = "Comma-separated `key base64(value)` pairs"), ("Upload-Concat" = Option<String>, Header, description = "`partial`, or `final;URL URL ...`"), ("Upload-Checksum" = Option<String>, Header, description = "`<algorithm> <base64 digest>` of a creation-with-upload body"), ("Trailer" = Option<String>, Header, description = "`Upload-Checksum`: the checksum follows the body as a trailer")), request_body(content = Vec<u8>, content_type = "application/offset+octet-stream", description = "creation-with-upload: the first bytes of the upload"), responses((status = 201, description = "Location, Cin-Handle, Cin-Filelink, Upload-Expires"), (status = 400, description = "Bad Upload-Length, Upload-Metadata or Upload-Concat"), (status = 413, description = "Above Tus-Max-Size"), (status = 415, description = "A body that is not application/offset+octet-stream"), (status = 460, description = "Checksum mismatch: the upload is created, the body not kept"), (status = 507, description = "Disk below its watermark")))]
pub async fn create(
    _: TusVersion,
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> TusResult {
    create_upload(&state, &headers, body).await
}

async fn create_upload(state: &SharedState, headers: &HeaderMap, body: Body) -> TusResult {
    // creation-with-upload: a body is the first chunk, so it must say so;
    // refused before anything is created.
    let has_body = !http_body::Body::is_end_stream(&body);
    let content_type = header(headers, "content-type").unwrap_or_default();
    if has_body && content_type != OFFSET_OCTET_STREAM {
        return Err(unsupported_body(content_type, "a creation request's body"));
    }
    let raw_metadata = header(headers, "upload-metadata")
        .unwrap_or_default()
        .to_owned();
    let metadata = parse_metadata(&raw_metadata)?;
    let concat = header(headers, "upload-concat").unwrap_or_default();
    let meta_value = |key: &str| {
        metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    // Credentials travel as Upload-Metadata keys (apikey, policy, signature).
    let app = state.services.apps.authorize_upload(
        &Credentials {
            apikey: meta_value("apikey"),
            policy: meta_value("policy"),
            signature: meta_value("signature"),
        },
        &Target {
            handle: None,
            path: meta_value("path"),
            container: meta_value("container"),
            size: parse_u64(headers, "upload-length")?,
        },
    )?;

    if let Some(list) = concat.strip_prefix("final;") {
        if headers.contains_key("upload-length") {
            return Err(ApiError::invalid(
                "invalid_length",
                "a final upload is as long as its partial uploads together: send no Upload-Length",
            )
            .into());
        }
        let partials = list
            .split_whitespace()
            .map(upload_id_of)
            .collect::<Result<Vec<_>, _>>()?;
        if partials.is_empty() {
            return Err(ApiError::invalid(
                "invalid_concat",
                "Upload-Concat: final; lists no partial uploads",
            )
            .into());
        }
        let file = state
            .uploads
            .tus_concat(
                NewUpload {
                    app: app.clone(),
                    ..upload_from_metadata(&metadata, 0)
                },
                partials,
                raw_metadata,
            )
            .await?;
        let response = TusResponse::new(StatusCode::CREATED)
            .header("location", upload_url(state, &file.upload_id));
        return Ok(with_file_headers(state, response, &file)?);
    }
    let partial = match concat {
        "" => false,
        "partial" => true,
        other => {
            return Err(ApiError::invalid(
                "invalid_concat",
                format!("Upload-Concat must be \"partial\" or \"final;<urls>\", got {other:?}"),
            )
            .into())
        }
    };
    let length = parse_u64(headers, "upload-length")?;
    let deferred = match (length, header(headers, "upload-defer-length")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "invalid_length",
                "send Upload-Length or Upload-Defer-Length, not both",
            )
            .into())
        }
        (Some(_), None) => false,
        (None, Some("1")) => true,
        (None, Some(other)) => {
            return Err(ApiError::invalid(
                "invalid_length",
                format!("Upload-Defer-Length must be 1, got {other:?}"),
            )
            .into())
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "length_required",
                "send Upload-Length (or Upload-Defer-Length: 1)",
            )
            .into())
        }
    };
    if has_body && length == Some(0) {
        // An empty upload is complete at creation: no byte of a body can fit.
        return Err(ApiError::from(UploadError::TooLarge {
            message: "Upload-Length is 0, so the request cannot carry a body".into(),
        })
        .into());
    }
    let upload = NewUpload {
        app: app.clone(),
        ..upload_from_metadata(&metadata, length.unwrap_or(0))
    };
    if has_body {
        // creation-with-upload: the POST body is the first chunk (a small
        // file's whole body completes the upload at once).
        let (checksum, body) = body_checksum(headers, body)?;
        let (file, offset) = state
            .uploads
            .tus_create_with_upload(upload, deferred, raw_metadata, partial, checksum, body)
            .await?;
        let response = TusResponse::new(StatusCode::CREATED)
            .header("location", upload_url(state, &file.upload_id))
            .header("upload-offset", offset);
        return Ok(with_file_headers(state, response, &file)?);
    }
    let file = state
        .uploads
        .tus_create(upload, deferred, raw_metadata, partial)
        .await?;
    let response = TusResponse::new(StatusCode::CREATED)
        .header("location", upload_url(state, &file.upload_id));
    Ok(with_file_headers(state, response, &file)?)
}

fn parse_id(id: &str) -> Result<UploadId, ApiError> {
    UploadId::parse(id)
        .map_err(|_| ApiError::not_found("upload_not_found", format!("no upload has id {id:?}")))
}

#[utoipa::path(head, path = "/files/{id}", tag = "tus", params(("id" = String, Path, description = "Upload id")), responses((status = 200, description = "Upload-Offset (not while a final upload waits for its partials), Upload-Length, Upload-Metadata, Upload-Expires"), (status = 404, description = "Unknown upload"), (status = 410, description = "Expired or deleted upload")))]
pub async fn head(
    _: TusVersion,
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> TusResult {
    {
        let file = state.uploads.file_for_upload(&parse_id(&id)?)?;
        let mut response = TusResponse::new(StatusCode::OK).header("cache-control", "no-store");
        // A final upload still waiting for its partials has no offset to give.
        let waiting_final = file.status == FileStatus::Uploading
            && matches!(
                file.tus.as_ref().map(|t| &t.concat),
                Some(TusConcat::Final(_))
            );
        if !waiting_final {
            let offset = state.uploads.tus_resume_offset(&file).await?;
            response = response.header("upload-offset", offset);
        }
        response = if file.length_deferred {
            response.header("upload-defer-length", 1)
        } else {
            response.header("upload-length", file.size)
        };
        if let Some(tus) = &file.tus {
            if !tus.metadata.is_empty() {
                response = response.header("upload-metadata", &tus.metadata);
            }
            match &tus.concat {
                TusConcat::None => {}
                TusConcat::Partial => response = response.header("upload-concat", "partial"),
                TusConcat::Final(parts) => {
                    let urls: Vec<String> = parts.iter().map(|p| upload_url(&state, p)).collect();
                    response =
                        response.header("upload-concat", format!("final;{}", urls.join(" ")));
                }
            }
        }
        Ok(with_file_headers(&state, response, &file)?)
    }
}

#[utoipa::path(patch, path = "/files/{id}", tag = "tus", params(("id" = String, Path, description = "Upload id"), ("Upload-Offset" = u64, Header, description = "Where the body starts"), ("Upload-Length" = Option<u64>, Header, description = "The size, once known, of an upload created with Upload-Defer-Length"), ("Upload-Checksum" = Option<String>, Header, description = "`<algorithm> <base64 digest>` of the body"), ("Trailer" = Option<String>, Header, description = "`Upload-Checksum`: the checksum follows the body as a trailer")), request_body(content = Vec<u8>, content_type = "application/offset+octet-stream"), responses((status = 204, description = "New Upload-Offset"), (status = 400, description = "Bad headers"), (status = 403, description = "A final upload"), (status = 404, description = "Unknown upload"), (status = 409, description = "Offset mismatch (Upload-Offset says the current one)"), (status = 410, description = "Expired or deleted upload"), (status = 413, description = "Past the upload's length"), (status = 415, description = "Wrong Content-Type"), (status = 460, description = "Checksum mismatch"), (status = 507, description = "Disk below its watermark")))]
pub async fn patch(
    _: TusVersion,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> TusResult {
    {
        let upload = parse_id(&id)?;
        let content_type = header(&headers, "content-type").unwrap_or_default();
        if content_type != OFFSET_OCTET_STREAM {
            return Err(unsupported_body(content_type, "PATCH bodies"));
        }
        let offset = parse_u64(&headers, "upload-offset")?
            .ok_or_else(|| ApiError::invalid("offset_required", "PATCH needs Upload-Offset"))?;
        let length = parse_u64(&headers, "upload-length")?;
        let (checksum, body) = body_checksum(&headers, body)?;
        let appended = match state
            .uploads
            .tus_append(&upload, offset, length, checksum, body)
            .await
        {
            Err(
                mismatch @ UploadError::Conflict {
                    code: "offset_mismatch",
                    ..
                },
            ) => {
                // The 409 says where the upload is, so the client continues from there.
                let file = state.uploads.file_for_upload(&upload)?;
                let current = state.uploads.tus_resume_offset(&file).await?;
                let mut response = TusError::from(mismatch).into_response();
                response
                    .headers_mut()
                    .insert("upload-offset", HeaderValue::from(current));
                return Err(TusError::Raw(Box::new(response)));
            }
            appended => appended?,
        };
        let offset = match appended {
            Appended::Complete(o) | Appended::BrokenOff(o) => o,
        };
        let file = state.uploads.file_for_upload(&upload)?;
        let response = TusResponse::new(StatusCode::NO_CONTENT).header("upload-offset", offset);
        Ok(with_file_headers(&state, response, &file)?)
    }
}

#[utoipa::path(delete, path = "/files/{id}", tag = "tus", params(("id" = String, Path, description = "Upload id")), responses((status = 204, description = "Terminated (a finished upload is deleted as a file)"), (status = 404, description = "Unknown upload"), (status = 410, description = "Expired or deleted already")))]
pub async fn terminate(
    _: TusVersion,
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> TusResult {
    let file = state.uploads.tus_terminate(&parse_id(&id)?).await?;
    if file.completed_at_ms.is_some() {
        // A finished file may be in final storage, with a manifest others read.
        state.network.announce_deletion(&file.handle).await;
    }
    Ok(TusResponse::new(StatusCode::NO_CONTENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_pairs_decode() {
        let parsed =
            parse_metadata("filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential")
                .unwrap();
        assert_eq!(
            parsed[0],
            ("filename".into(), "world_domination_plan.pdf".into())
        );
        assert_eq!(parsed[1], ("is_confidential".into(), String::new()));
        assert!(parse_metadata("filename ***").is_err());
    }

    #[test]
    fn concat_urls_name_uploads() {
        let id = UploadId::generate();
        assert_eq!(upload_id_of(&format!("http://pop/files/{id}")).unwrap(), id);
        assert_eq!(upload_id_of(&format!("/files/{id}")).unwrap(), id);
        assert!(upload_id_of("/files/../x").is_err());
    }
}
