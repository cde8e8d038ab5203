//! The Filestack-compatible multipart calls: start, upload (hands out a signed PUT
//! URL), the PUT itself, commit (intelligent ingestion) and complete.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{CONTENT_LENGTH, ETAG};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cin_domain::{FileRecord, PartNumber, StoreOptions, UploadId, UploadMode};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::app::SharedState;
use crate::auth::{Credentials, Target};
use crate::error::ApiError;
use crate::input::{
    lenient_bool, lenient_i64, lenient_opt_u64, lenient_u64, object_only, JsonOrForm, Path, Query,
};
use crate::signing::{now_unix, ChunkGrant, UploadGrant};
use crate::upload::blocks::BlockSums;
use crate::upload::{ClaimedPart, IncomingChunk, NewUpload};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct StartRequest {
    #[serde(default)]
    #[schema(required = true, min_length = 1)]
    pub filename: String,
    #[serde(default)]
    pub mimetype: Option<String>,
    #[serde(deserialize_with = "lenient_u64")]
    pub size: u64,
    #[serde(default, deserialize_with = "object_only")]
    #[schema(value_type = Option<Object>)]
    pub store: StoreOptions,
    #[serde(default, deserialize_with = "lenient_bool")]
    #[schema(value_type = Option<bool>)]
    pub fii: bool,
    #[serde(default)]
    pub apikey: Option<String>,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
}

#[utoipa::path(post, path = "/multipart/start", tag = "multipart", request_body(content = StartRequest, description = "JSON or form fields"), responses((status = 200, description = "uri, region, upload_id, location_url, upload_type, handle, url"), (status = 400, description = "Bad input"), (status = 401, description = "API key or policy missing"), (status = 403, description = "Key, policy or container refused"), (status = 413, description = "Too large"), (status = 507, description = "Disk below its watermark")))]
pub async fn start(
    State(state): State<SharedState>,
    JsonOrForm(req): JsonOrForm<StartRequest>,
) -> Result<Json<Value>, ApiError> {
    if req.filename.trim().is_empty() {
        return Err(ApiError::invalid(
            "filename_required",
            "filename is required",
        ));
    }
    let app = state.services.apps.authorize_upload(
        &Credentials {
            apikey: req.apikey.as_deref(),
            policy: req.policy.as_deref(),
            signature: req.signature.as_deref(),
        },
        &Target {
            handle: None,
            path: req.store.path.as_deref(),
            container: req.store.container.as_deref(),
            size: Some(req.size),
        },
    )?;
    let file = state
        .uploads
        .start(NewUpload {
            app,
            filename: req.filename,
            mimetype: req.mimetype,
            size: req.size,
            store: req.store,
            mode: if req.fii {
                UploadMode::Intelligent
            } else {
                UploadMode::Regular
            },
        })
        .await?;
    let mut answer = json!({
        "uri": format!("/{}/{}", file.container, file.key),
        "region": state.config.server.pop_id,
        "upload_id": file.upload_id,
        "location_url": state.location_url,
        "handle": file.handle,
        "url": filelink(&state, &file),
        "upload_grant": upload_grant(&state, &file.upload_id),
    });
    if req.fii {
        answer["upload_type"] = json!("intelligent_ingestion");
    }
    Ok(Json(answer))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UploadRequest {
    #[schema(value_type = String)]
    pub upload_id: UploadId,
    #[serde(deserialize_with = "lenient_i64")]
    pub part: i64,
    #[serde(deserialize_with = "lenient_u64")]
    #[schema(minimum = 1)]
    pub size: u64,
    #[serde(default)]
    pub md5: Option<String>,
    /// Base64 big-endian CRC32C of the chunk, verified instead of an MD5.
    #[serde(default)]
    pub crc32c: Option<String>,
    #[serde(default, deserialize_with = "lenient_opt_u64")]
    pub offset: Option<u64>,
}

#[utoipa::path(post, path = "/multipart/upload", tag = "multipart", request_body(content = UploadRequest, description = "JSON or form fields"), responses((status = 200, description = "url (signed PUT URL), headers, location_url, chunk_size_hint"), (status = 400, description = "Bad part number or chunk out of range"), (status = 404, description = "Unknown upload"), (status = 409, description = "The upload is complete already")))]
pub async fn upload(
    State(state): State<SharedState>,
    JsonOrForm(req): JsonOrForm<UploadRequest>,
) -> Result<Json<Value>, ApiError> {
    let part = PartNumber::new(req.part)?;
    let offset = req.offset.unwrap_or(0);
    if req.size == 0 {
        return Err(ApiError::invalid(
            "empty_chunk",
            "size must be at least 1 byte",
        ));
    }
    state
        .uploads
        .check_chunk(&req.upload_id, offset, req.size)?;
    let md5 = req.md5.filter(|m| !m.is_empty());
    let crc32c = req.crc32c.filter(|c| !c.is_empty());
    let grant = ChunkGrant {
        upload_id: req.upload_id.to_string(),
        part: part.get(),
        offset,
        size: req.size,
        md5: md5.clone(),
        crc32c: crc32c.clone(),
        expires: now_unix() + state.config.uploads.upload_url_ttl_secs,
    };
    let signature = state.signer.sign(&grant);
    let mut query = vec![
        ("offset", grant.offset.to_string()),
        ("size", grant.size.to_string()),
        ("md5", md5.clone().unwrap_or_default()),
    ];
    if let Some(crc32c) = crc32c {
        query.push(("crc32c", crc32c));
    }
    query.push(("expires", grant.expires.to_string()));
    query.push(("signature", signature));
    let query = serde_urlencoded::to_string(query)
        .map_err(|e| ApiError::invalid("invalid_request", e.to_string()))?;
    let mut headers = Map::new();
    if let Some(md5) = md5 {
        headers.insert("Content-MD5".into(), json!(md5));
    }
    Ok(Json(json!({
        "url": format!("{}/upload/{}/{}?{}", state.public_url, req.upload_id, part, query),
        "headers": headers,
        "location_url": state.location_url,
        "chunk_size_hint": state.uploads.chunk_size_hint(&req.upload_id),
        "upload_grant": upload_grant(&state, &req.upload_id),
    })))
}

/// Signs a grant for any chunk of `upload` and says how to use it: `PUT
/// {url}/{part}?offset=..&size=..&grant=upload&expires=..&signature=..`, with an
/// optional `crc32c` or `md5` in the query. A chunk then costs one request, not
/// two; the per-chunk `/multipart/upload` stays for the official SDKs, and its
/// answer renews the grant.
fn upload_grant(state: &SharedState, upload: &UploadId) -> Value {
    let grant = UploadGrant {
        upload_id: upload.to_string(),
        expires: now_unix() + state.config.uploads.upload_url_ttl_secs,
    };
    json!({
        "url": format!("{}/upload/{}", state.public_url, upload),
        "expires": grant.expires,
        "signature": state.signer.sign(&grant),
    })
}

/// Whether `signature` is this POP's upload grant for `upload` until `expires`.
fn upload_grant_signed(
    state: &SharedState,
    upload: &UploadId,
    expires: u64,
    signature: &str,
) -> bool {
    let grant = UploadGrant {
        upload_id: upload.to_string(),
        expires,
    };
    state.signer.verify(&grant, signature)
}

#[derive(Debug, Deserialize)]
pub struct ChunkQuery {
    #[serde(deserialize_with = "lenient_u64")]
    offset: u64,
    #[serde(deserialize_with = "lenient_u64")]
    size: u64,
    #[serde(default)]
    md5: String,
    #[serde(default)]
    crc32c: String,
    #[serde(deserialize_with = "lenient_u64")]
    expires: u64,
    signature: String,
    /// `upload` when the URL was built from an upload grant.
    #[serde(default)]
    grant: String,
    /// Per-block CRC32Cs (base64 of one big-endian sum per `block_size`
    /// bytes): a body that breaks off keeps its whole, matching blocks.
    #[serde(default, deserialize_with = "lenient_opt_u64")]
    block_size: Option<u64>,
    #[serde(default)]
    block_crc32c: String,
}

#[derive(Debug, Deserialize)]
pub struct GrantQuery {
    #[serde(deserialize_with = "lenient_u64")]
    expires: u64,
    signature: String,
    #[serde(default)]
    grant: String,
}

#[utoipa::path(get, path = "/upload/{upload_id}/{part}", tag = "multipart", params(("upload_id" = String, Path, description = "Upload id"), ("part" = u32, Path, description = "Part number, 1-based"), ("grant" = String, Query, description = "`upload`"), ("expires" = u64, Query, description = "The upload grant's expiry"), ("signature" = String, Query, description = "The upload grant's signature")), responses((status = 200, description = "part, received: the acknowledged [start, end) byte ranges of the part"), (status = 403, description = "Not signed by an upload grant of this upload, or expired"), (status = 404, description = "Unknown upload")))]
/// Which bytes of a part the POP holds: a client whose chunk broke off asks,
/// then sends only the rest (the upload grant authorises it).
pub async fn part_received(
    State(state): State<SharedState>,
    Path((upload_id, part)): Path<(String, String)>,
    query: Result<Query<GrantQuery>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let refused = || {
        ApiError::forbidden(
            "invalid_signature",
            "sign this request with the upload grant of the start answer",
        )
    };
    let Query(q) = query.map_err(|_| refused())?;
    let upload_id = UploadId::parse(&upload_id).map_err(|_| refused())?;
    if q.grant != UploadGrant::SCOPE
        || !upload_grant_signed(&state, &upload_id, q.expires, &q.signature)
    {
        return Err(refused());
    }
    if q.expires < now_unix() {
        return Err(ApiError::forbidden(
            "url_expired",
            "this upload grant has expired; ask /multipart/upload for a new one",
        ));
    }
    let part = PartNumber::new(part.parse::<i64>().map_err(|_| refused())?)?;
    let received = state.uploads.part_received(&upload_id, part).await?;
    Ok(Json(json!({ "part": part.get(), "received": received })))
}

#[utoipa::path(put, path = "/upload/{upload_id}/{part}", tag = "multipart", params(("upload_id" = String, Path, description = "Upload id"), ("part" = u32, Path, description = "Part number, 1-based"), ("offset" = u64, Query, description = "Offset inside the part"), ("size" = u64, Query, description = "Chunk size"), ("md5" = String, Query, description = "Declared base64 MD5"), ("expires" = u64, Query, description = "Unix expiry of the URL"), ("signature" = String, Query, description = "The POP's signature"), ("grant" = String, Query, description = "`upload` for a URL built from the upload grant of the start answer")), request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 200, description = "Durable: ETag is the chunk's MD5; Cin-Chunk-Size-Hint"), (status = 400, description = "MD5 mismatch, truncated or overlong body"), (status = 403, description = "Unsigned, altered or expired URL"), (status = 404, description = "Unknown upload"), (status = 409, description = "Different bytes over acknowledged ones, or the upload is complete"), (status = 507, description = "Disk below its watermark")))]
pub async fn put_chunk(
    State(state): State<SharedState>,
    Path((upload_id, part)): Path<(String, String)>,
    query: Result<Query<ChunkQuery>, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Only this POP writes these queries: one that does not parse was altered or cut.
    let Query(q) = query.map_err(|e| {
        ApiError::invalid(
            "invalid_query",
            format!("{e}; use the url /multipart/upload returned, unchanged"),
        )
    })?;
    let refused = || {
        ApiError::forbidden(
            "invalid_signature",
            "this upload URL is not one this POP signed, or it was altered; ask /multipart/upload for a new one",
        )
    };
    let upload_id = UploadId::parse(&upload_id).map_err(|_| refused())?;
    let part_number: i64 = part.parse().map_err(|_| refused())?;
    let grant = ChunkGrant {
        upload_id: upload_id.to_string(),
        part: u32::try_from(part_number).map_err(|_| refused())?,
        offset: q.offset,
        size: q.size,
        md5: Some(q.md5.clone()).filter(|m| !m.is_empty()),
        crc32c: Some(q.crc32c.clone()).filter(|c| !c.is_empty()),
        expires: q.expires,
    };
    let signed = match q.grant.as_str() {
        "" => state.signer.verify(&grant, &q.signature),
        UploadGrant::SCOPE => upload_grant_signed(&state, &upload_id, q.expires, &q.signature),
        _ => false,
    };
    if !signed {
        return Err(refused());
    }
    if q.expires < now_unix() {
        return Err(ApiError::forbidden(
            "url_expired",
            "this upload URL has expired; ask /multipart/upload for a new one",
        ));
    }
    if let Some(len) = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()) {
        if len.parse::<u64>().ok() != Some(q.size) {
            return Err(ApiError::invalid(
                "chunk_size_mismatch",
                format!(
                    "Content-Length is {len} but this URL is for exactly {} bytes",
                    q.size
                ),
            ));
        }
    }
    let header_md5 = headers.get("content-md5").and_then(|v| v.to_str().ok());
    if let (Some(header), Some(signed)) = (header_md5, grant.md5.as_deref()) {
        if header != signed {
            return Err(ApiError::invalid(
                "md5_mismatch",
                "Content-MD5 differs from the md5 declared to /multipart/upload",
            ));
        }
    }
    let blocks = match (q.block_crc32c.is_empty(), q.block_size) {
        (true, _) => None,
        (false, Some(block)) => Some(BlockSums::parse(block, &q.block_crc32c, q.size)?),
        (false, None) => {
            return Err(ApiError::invalid(
                "invalid_block_crc32c",
                "block_crc32c needs block_size, the bytes each sum covers",
            ))
        }
    };
    let written = state
        .uploads
        .write_chunk(IncomingChunk {
            upload_id: upload_id.clone(),
            part: PartNumber::new(part_number)?,
            offset: q.offset,
            size: q.size,
            md5: grant.md5.or_else(|| header_md5.map(str::to_owned)),
            crc32c: grant.crc32c,
            blocks,
            body: crate::body::data_stream(body),
        })
        .await;
    // Success or not, the answer carries the size this network seems to handle.
    let hint = (
        CHUNK_SIZE_HINT,
        state.uploads.chunk_size_hint(&upload_id).to_string(),
    );
    Ok(match written {
        Ok(etag) => (StatusCode::OK, [(ETAG.as_str(), etag), hint]).into_response(),
        Err(e) => ([hint], ApiError::from(e)).into_response(),
    })
}

/// Response header with the chunk size (bytes) the POP suggests for this upload.
pub const CHUNK_SIZE_HINT: &str = "cin-chunk-size-hint";

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CommitRequest {
    #[schema(value_type = String)]
    pub upload_id: UploadId,
    #[serde(deserialize_with = "lenient_i64")]
    pub part: i64,
}

#[utoipa::path(post, path = "/multipart/commit", tag = "multipart", request_body(content = CommitRequest, description = "JSON or form fields"), responses((status = 200, description = "The part is whole"), (status = 400, description = "The part has gaps"), (status = 404, description = "Unknown upload")))]
pub async fn commit(
    State(state): State<SharedState>,
    JsonOrForm(req): JsonOrForm<CommitRequest>,
) -> Result<Json<Value>, ApiError> {
    let part = PartNumber::new(req.part)?;
    let size = state.uploads.commit_part(&req.upload_id, part).await?;
    Ok(Json(json!({ "part": part.get(), "size": size })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CompleteRequest {
    #[schema(value_type = String)]
    pub upload_id: UploadId,
    #[serde(default)]
    #[schema(value_type = Option<Vec<ClaimedPartShape>>)]
    pub parts: Option<Value>,
    /// Tags kept with the file and returned by metadata: string keys, string
    /// (or number, or boolean) values.
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub upload_tags: Option<Value>,
}

/// The shape of one of `parts` in a JSON body, as [`parse_claimed_parts`] reads it
/// (for the API description; forms send `"N:etag;N:etag"` instead).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ClaimedPartShape {
    part_number: u32,
    etag: Option<String>,
}

/// Tags a file may carry at most, and the longest key or value.
const MAX_UPLOAD_TAGS: usize = 50;
const MAX_UPLOAD_TAG_LEN: usize = 256;

/// `upload_tags` as kept: an object of strings (numbers and booleans as text).
fn parse_upload_tags(tags: Option<Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let invalid = |message: String| ApiError::invalid("invalid_upload_tags", message);
    let object = match tags {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(object)) => object,
        Some(other) => {
            return Err(invalid(format!(
                "upload_tags must be an object of string values, like {{\"project\": \"x\"}}; got {other}"
            )))
        }
    };
    if object.len() > MAX_UPLOAD_TAGS {
        return Err(invalid(format!(
            "upload_tags has {} tags; a file carries at most {MAX_UPLOAD_TAGS}",
            object.len()
        )));
    }
    let mut tags = BTreeMap::new();
    for (key, value) in object {
        let value = match value {
            Value::String(text) => text,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(invalid(format!(
                    "upload_tags.{key} must be a string; got {other}"
                )))
            }
        };
        if key.len() > MAX_UPLOAD_TAG_LEN || value.len() > MAX_UPLOAD_TAG_LEN {
            return Err(invalid(format!(
                "upload_tags.{key}: keys and values are at most {MAX_UPLOAD_TAG_LEN} bytes"
            )));
        }
        tags.insert(key, value);
    }
    Ok(tags)
}

#[utoipa::path(post, path = "/multipart/complete", tag = "multipart", request_body(content = CompleteRequest, description = "JSON or form fields"), responses((status = 200, description = "handle, url, filename, size, mimetype, status, container, key"), (status = 400, description = "Missing parts or size mismatch"), (status = 404, description = "Unknown upload"), (status = 409, description = "Completed already, or a part still being written")))]
pub async fn complete(
    State(state): State<SharedState>,
    JsonOrForm(req): JsonOrForm<CompleteRequest>,
) -> Result<Json<Value>, ApiError> {
    let claimed = req
        .parts
        .map(parse_claimed_parts)
        .transpose()?
        .filter(|p| !p.is_empty());
    let tags = parse_upload_tags(req.upload_tags)?;
    let file = state
        .uploads
        .complete(&req.upload_id, claimed, tags)
        .await?;
    Ok(Json(json!({
        "handle": file.handle,
        "url": filelink(&state, &file),
        "filename": file.filename,
        "size": file.size,
        "mimetype": file.mimetype,
        "status": file.status.as_str(),
        "container": file.container,
        "key": file.key,
        "upload_tags": file.upload_tags,
    })))
}

/// `parts` arrives as `[{"part_number": 1, "etag": "..."}]` (JSON) or `"1:etag;2:etag"` (forms).
fn parse_claimed_parts(parts: Value) -> Result<Vec<ClaimedPart>, ApiError> {
    let bad = |detail: String| {
        ApiError::invalid(
            "invalid_parts",
            format!("parts must be [{{\"part_number\": N, \"etag\": \"...\"}}] or \"N:etag;N:etag\": {detail}"),
        )
    };
    let mut out = Vec::new();
    match parts {
        Value::Null => {}
        Value::String(s) => {
            for item in s.split(';').filter(|i| !i.trim().is_empty()) {
                let (n, etag) = item.split_once(':').unwrap_or((item, ""));
                let n: i64 = n.trim().parse().map_err(|_| bad(format!("{item:?}")))?;
                out.push(ClaimedPart {
                    number: PartNumber::new(n)?,
                    etag: Some(etag.trim().to_owned()).filter(|e| !e.is_empty()),
                });
            }
        }
        Value::Array(items) => {
            for item in items {
                let n = item
                    .get("part_number")
                    .or_else(|| item.get("PartNumber"))
                    .and_then(|n| {
                        n.as_i64()
                            .or_else(|| n.as_str().and_then(|s| s.parse().ok()))
                    })
                    .ok_or_else(|| bad(format!("{item}")))?;
                let etag = item
                    .get("etag")
                    .or_else(|| item.get("ETag"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                out.push(ClaimedPart {
                    number: PartNumber::new(n)?,
                    etag,
                });
            }
        }
        other => return Err(bad(format!("{other}"))),
    }
    Ok(out)
}

pub fn filelink(state: &SharedState, file: &FileRecord) -> String {
    format!("{}/{}", state.public_url, file.handle)
}
