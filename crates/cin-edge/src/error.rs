//! The one place where failures become HTTP answers: every error is
//! `{"error": {"code": "...", "message": "..."}}` with a status that fits it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cin_domain::{DomainError, FileStatus};
use cin_storage::{ChunkError, FinalStoreError, StorageError};
use serde_json::json;

use crate::upload::UploadError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or breaks a rule; `code` names the rule.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// No credentials where they are required.
    #[error("{message}")]
    Unauthorized { message: String },
    /// The request conflicts with the file's state; `status` is reported when known.
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        status: Option<FileStatus>,
    },
    #[error("{message}")]
    TooLarge { message: String },
    #[error("the request body could not be read: {0}")]
    Body(String),
    /// The disk is below its free-space watermark.
    #[error("{message}")]
    InsufficientStorage {
        message: String,
        retry_after_secs: u64,
    },
    /// tus: the body's checksum differs from `Upload-Checksum`; nothing of it was kept.
    #[error("the body does not match Upload-Checksum; nothing of it was kept, send it again")]
    ChecksumMismatch,
    /// The file was there and is no more (expired, terminated).
    #[error("{message}")]
    Gone { code: &'static str, message: String },
    /// The file exists but this POP cannot serve its bytes (its local copy is
    /// incomplete and final storage does not have it yet).
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    FinalStore(#[from] FinalStoreError),
}

impl ApiError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::NotFound {
            code,
            message: message.into(),
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Forbidden {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(
        code: &'static str,
        message: impl Into<String>,
        status: Option<FileStatus>,
    ) -> Self {
        ApiError::Conflict {
            code,
            message: message.into(),
            status,
        }
    }

    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code),
            // Filestack answers 404 for a handle that is gone; tus turns it into 410.
            ApiError::Gone { code, .. } => (StatusCode::NOT_FOUND, code),
            ApiError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code),
            ApiError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
            ApiError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large"),
            ApiError::Body(_) => (StatusCode::BAD_REQUEST, "body_unreadable"),
            ApiError::InsufficientStorage { .. } => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            // 460 is tus's "Checksum Mismatch".
            ApiError::ChecksumMismatch => (
                StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
                "checksum_mismatch",
            ),
            ApiError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
            ApiError::FinalStore(FinalStoreError::NotFound { .. }) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ApiError::FinalStore(_) => (StatusCode::BAD_GATEWAY, "final_store_error"),
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        if let DomainError::IllegalTransition { from, .. } = &e {
            let status = FileStatus::ALL.into_iter().find(|s| s.as_str() == *from);
            return ApiError::conflict("illegal_transition", e.to_string(), status);
        }
        let code = match &e {
            DomainError::IllegalTransition { .. } => "illegal_transition",
            DomainError::InvalidHandle(_) => "invalid_handle",
            DomainError::InvalidUploadId(_) => "invalid_upload_id",
            DomainError::PartOutOfRange { .. } => "part_out_of_range",
            DomainError::InvalidStorePath(_) => "invalid_store_path",
            DomainError::InvalidContainer(_) => "invalid_container",
        };
        ApiError::invalid(code, e.to_string())
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Invalid { code, message } => ApiError::Invalid { code, message },
            UploadError::NotFound { code, message } => ApiError::NotFound { code, message },
            UploadError::Gone { code, message } => ApiError::Gone { code, message },
            UploadError::Forbidden { code, message } => ApiError::Forbidden { code, message },
            UploadError::Conflict {
                code,
                message,
                status,
            } => ApiError::Conflict {
                code,
                message,
                status,
            },
            UploadError::TooLarge { message } => ApiError::TooLarge { message },
            UploadError::InsufficientStorage {
                message,
                retry_after_secs,
            } => ApiError::InsufficientStorage {
                message,
                retry_after_secs,
            },
            UploadError::ChecksumMismatch => ApiError::ChecksumMismatch,
            UploadError::Chunk(e) => e.into(),
            UploadError::Domain(e) => e.into(),
            UploadError::Storage(e) => ApiError::Storage(e),
        }
    }
}

impl From<ChunkError> for ApiError {
    fn from(e: ChunkError) -> Self {
        match e {
            ChunkError::TooLong { .. } => ApiError::invalid("chunk_too_long", e.to_string()),
            ChunkError::Truncated { .. } => ApiError::invalid("chunk_truncated", e.to_string()),
            ChunkError::Md5Mismatch { .. } => ApiError::invalid("md5_mismatch", e.to_string()),
            ChunkError::Conflict { .. } => {
                ApiError::conflict("chunk_conflict", e.to_string(), None)
            }
            ChunkError::Body(_) => ApiError::Body(e.to_string()),
            ChunkError::Storage(s) => ApiError::Storage(s),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, code, "request failed");
        } else {
            tracing::debug!(error = %self, code, "request refused");
        }
        let mut error = json!({ "code": code, "message": self.to_string() });
        if let ApiError::Conflict {
            status: Some(s), ..
        } = &self
        {
            error["status"] = json!(s.as_str());
        }
        let mut response = (status, Json(json!({ "error": error }))).into_response();
        if let ApiError::InsufficientStorage {
            retry_after_secs, ..
        } = &self
        {
            if let Ok(v) = axum::http::HeaderValue::from_str(&retry_after_secs.to_string()) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        response
    }
}
