//! The one place where failures become HTTP answers: every error is
//! `{"error": {"code": "...", "message": "..."}}` with a status that fits it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cin_domain::{DomainError, FileStatus};
use cin_storage::{BodyError, ChunkError, FinalStoreError, StorageError};
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
    /// A request body past what the call accepts (not a file: control calls' fields).
    #[error("{message}")]
    BodyTooLarge { message: String },
    /// A `Range` that starts past the end of the file.
    #[error("{message}")]
    RangeNotSatisfiable { message: String },
    /// The path exists, but not for this method.
    #[error("{message}")]
    MethodNotAllowed { message: String },
    /// The file exists but this POP cannot serve its bytes (its local copy is
    /// incomplete and final storage does not have it yet).
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// The file belongs to another POP of the network, which did not answer.
    #[error("{message}")]
    OriginUnreachable { origin: String, message: String },
    /// What the upload engine refused or failed at.
    #[error(transparent)]
    Upload(#[from] UploadError),
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

    /// The file status a conflict was about, when it is known.
    fn conflict_status(&self) -> Option<FileStatus> {
        match self {
            ApiError::Conflict { status, .. }
            | ApiError::Upload(UploadError::Conflict { status, .. }) => *status,
            ApiError::Upload(UploadError::Domain(DomainError::IllegalTransition {
                from, ..
            })) => FileStatus::ALL.into_iter().find(|s| s.as_str() == *from),
            _ => None,
        }
    }

    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code),
            ApiError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code),
            ApiError::OriginUnreachable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "origin_unreachable")
            }
            ApiError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
            ApiError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large"),
            ApiError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable")
            }
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::Upload(e) => upload_status(e),
            // A full disk is not a fault: the client tries again later.
            ApiError::Storage(e) if e.is_no_space() => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            ApiError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
            ApiError::FinalStore(FinalStoreError::NotFound { .. }) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ApiError::FinalStore(_) => (StatusCode::BAD_GATEWAY, "final_store_error"),
        }
    }
}

/// Where the engine's errors land: each rule's status and code.
fn upload_status(e: &UploadError) -> (StatusCode, &'static str) {
    match e {
        // Whichever write ran out of space (part file, small-file log, metadata):
        // a full disk is not a fault, and what was acknowledged stays.
        UploadError::Storage(e) | UploadError::Chunk(ChunkError::Storage(e)) if e.is_no_space() => {
            (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
        }
        UploadError::Invalid { code, .. } => (StatusCode::BAD_REQUEST, code),
        UploadError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code),
        // Filestack answers 404 for a handle that is gone; tus turns it into 410.
        UploadError::Gone { code, .. } => (StatusCode::NOT_FOUND, code),
        UploadError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
        UploadError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
        UploadError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large"),
        UploadError::InsufficientStorage { .. } => {
            (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
        }
        UploadError::Locked { .. } => (StatusCode::LOCKED, "upload_busy"),
        UploadError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        // 460 is tus's "Checksum Mismatch".
        UploadError::ChecksumMismatch => (
            StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
            "checksum_mismatch",
        ),
        UploadError::Chunk(e) => match e {
            ChunkError::TooLong { .. } => (StatusCode::BAD_REQUEST, "chunk_too_long"),
            ChunkError::Truncated { .. } => (StatusCode::BAD_REQUEST, "chunk_truncated"),
            ChunkError::Md5Mismatch { .. } => (StatusCode::BAD_REQUEST, "md5_mismatch"),
            ChunkError::Crc32cMismatch { .. } | ChunkError::BlockCrc32cMismatch { .. } => {
                (StatusCode::BAD_REQUEST, "crc32c_mismatch")
            }
            ChunkError::Conflict { .. } => (StatusCode::CONFLICT, "chunk_conflict"),
            ChunkError::Body(e) => match e {
                BodyError::Stalled { .. } => (StatusCode::REQUEST_TIMEOUT, "body_stalled"),
                BodyError::Superseded => (StatusCode::CONFLICT, "superseded"),
                BodyError::Malformed(_) => (StatusCode::BAD_REQUEST, "body_malformed"),
                BodyError::Interrupted(_) => (StatusCode::BAD_REQUEST, "body_unreadable"),
            },
            ChunkError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
        },
        UploadError::Domain(e) => match e {
            DomainError::IllegalTransition { .. } => (StatusCode::CONFLICT, "illegal_transition"),
            DomainError::InvalidHandle(_) => (StatusCode::BAD_REQUEST, "invalid_handle"),
            DomainError::InvalidUploadId(_) => (StatusCode::BAD_REQUEST, "invalid_upload_id"),
            DomainError::InvalidPopId(_) => (StatusCode::BAD_REQUEST, "invalid_pop_id"),
            DomainError::PartOutOfRange { .. } => (StatusCode::BAD_REQUEST, "part_out_of_range"),
            DomainError::InvalidStorePath(_) => (StatusCode::BAD_REQUEST, "invalid_store_path"),
            DomainError::InvalidContainer(_) => (StatusCode::BAD_REQUEST, "invalid_container"),
        },
        UploadError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        ApiError::Upload(e.into())
    }
}

impl From<ChunkError> for ApiError {
    fn from(e: ChunkError) -> Self {
        ApiError::Upload(e.into())
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
        if let Some(s) = self.conflict_status() {
            error["status"] = json!(s.as_str());
        }
        if let ApiError::OriginUnreachable { origin, .. } = &self {
            error["origin"] = json!(origin);
        }
        let mut response = (status, Json(json!({ "error": error }))).into_response();
        let retry_after = match &self {
            ApiError::OriginUnreachable { .. } => Some(crate::network::RETRY_AFTER_SECS),
            ApiError::Upload(
                UploadError::InsufficientStorage {
                    retry_after_secs, ..
                }
                | UploadError::Locked {
                    retry_after_secs, ..
                }
                | UploadError::Overloaded {
                    retry_after_secs, ..
                },
            ) => Some(*retry_after_secs),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

/// The innermost error of a chain, the one that says what happened (e.g.
/// "connection refused" under a client library's layers).
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
