//! `POST /api/store/{location}`: a whole file in one request, raw or as the
//! multipart field `fileUpload`.

use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::Json;
use cin_domain::{StoreOptions, UploadMode};
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::multipart::filelink;
use crate::app::SharedState;
use crate::auth::{Credentials, Target};
use crate::error::ApiError;
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
}

const FILE_FIELD: &str = "fileUpload";

#[utoipa::path(post, path = "/api/store/{location}", tag = "uploads", params(("location" = String, Path, description = "Storage kind, e.g. s3"), ("key" = Option<String>, Query, description = "API key"), ("filename" = Option<String>, Query), ("mimetype" = Option<String>, Query), ("path" = Option<String>, Query), ("container" = Option<String>, Query), ("policy" = Option<String>, Query), ("signature" = Option<String>, Query)), request_body(content = Vec<u8>, description = "Raw bytes, or multipart/form-data with the field fileUpload"), responses((status = 200, description = "url, handle, size, type, filename, key, container, status"), (status = 413, description = "Too large"), (status = 507, description = "Disk below its watermark")))]
pub async fn store(
    State(state): State<SharedState>,
    Path(location): Path<String>,
    Query(q): Query<StoreQuery>,
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
    let file = if is_form {
        let mut form = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::invalid("malformed_multipart", e.body_text()))?;
        loop {
            let field = form
                .next_field()
                .await
                .map_err(|e| ApiError::invalid("malformed_multipart", e.body_text()))?
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
            let body = field.map_err(|e| e.body_text());
            break state.uploads.store_whole(upload, None, body).await?;
        }
    } else {
        let upload = NewUpload {
            filename: q.filename.unwrap_or_default(),
            mimetype: q.mimetype.or(content_type),
            size: declared.unwrap_or(0),
            store,
            mode: UploadMode::Direct,
            app: app.clone(),
        };
        let body = request.into_body().into_data_stream();
        state.uploads.store_whole(upload, declared, body).await?
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
