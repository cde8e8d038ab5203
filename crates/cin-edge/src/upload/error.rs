//! The upload engine's errors. Each names the rule that failed and says what
//! the client can do; the HTTP layer (`crate::error`) maps them to statuses.

use cin_domain::{DomainError, FileStatus};
use cin_storage::{ChunkError, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The request breaks an upload rule; `code` names the rule.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// The file was there and is no more (expired, terminated).
    #[error("{message}")]
    Gone { code: &'static str, message: String },
    /// Not allowed for this file, app or POP.
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// The request conflicts with the file's state; `status` is reported when known.
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        status: Option<FileStatus>,
    },
    #[error("{message}")]
    TooLarge { message: String },
    /// The disk is below its free-space watermark.
    #[error("{message}")]
    InsufficientStorage {
        message: String,
        retry_after_secs: u64,
    },
    /// Another request is writing the same part and did not give way in time.
    #[error("{message}")]
    Locked {
        message: String,
        retry_after_secs: u64,
    },
    /// The POP is at its limit of requests writing bodies.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_secs: u64,
    },
    /// tus: the body's checksum differs from `Upload-Checksum`; nothing of it was kept.
    #[error("the body does not match Upload-Checksum; nothing of it was kept, send it again")]
    ChecksumMismatch,
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl UploadError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        UploadError::Invalid {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        UploadError::NotFound {
            code,
            message: message.into(),
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        UploadError::Forbidden {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(
        code: &'static str,
        message: impl Into<String>,
        status: Option<FileStatus>,
    ) -> Self {
        UploadError::Conflict {
            code,
            message: message.into(),
            status,
        }
    }
}
