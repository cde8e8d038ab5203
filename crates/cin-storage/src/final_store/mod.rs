//! Final stores: where complete files end up. The replicator hands a file to a
//! [`FinalStore`] and marks it `Stored` only after `put` returned Ok.

mod local;
mod pack;
mod s3;

use async_trait::async_trait;
use cin_domain::MultipartCheckpoint;
use thiserror::Error;

use crate::{ByteStream, LocalObject, StorageError};

pub use local::{LocalDirStore, PACKED_MAX};
pub use pack::PACK_DIR;
pub use s3::{S3Settings, S3Store, MIN_PART_SIZE};

#[derive(Debug, Error)]
pub enum FinalStoreError {
    #[error("object {container}/{key} not found in final storage")]
    NotFound { container: String, key: String },
    /// Says what could not be reached and why (`cannot reach URL: connection refused`).
    #[error("{0}")]
    Unreachable(String),
    #[error("final storage refused the request: {0}")]
    Rejected(String),
    /// The object could not be verified this time (a local read-back differed);
    /// another attempt may well succeed.
    #[error("final storage holds a different object than was sent: {0}")]
    Verification(String),
    /// Definitive: the store reports a size or checksum that cannot be the bytes
    /// sent (not a transient failure). Retrying sends the same bytes and gets the
    /// same answer, so callers give up after a few of these.
    #[error("final storage reports {container}/{key} is not the bytes sent: {detail}")]
    Mismatch {
        container: String,
        key: String,
        detail: String,
    },
    #[error("{0}")]
    Local(#[from] StorageError),
}

/// A file to deliver.
pub struct ObjectToStore<'a> {
    pub container: &'a str,
    pub key: &'a str,
    pub source: &'a LocalObject,
    pub filename: &'a str,
    pub mimetype: &'a str,
    /// Canned ACL such as `private` or `public-read`, where the store supports it.
    pub acl: Option<&'a str>,
}

/// Durable progress of one `put`, so a restarted replicator resumes instead of
/// starting over (and never leaves an orphan multipart upload behind).
#[async_trait]
pub trait PutJournal: Send + Sync {
    /// The checkpoint saved by an earlier attempt, if any.
    fn resume(&self) -> Option<MultipartCheckpoint>;
    /// Persists progress; `None` clears it. Must be durable before returning.
    async fn record(&self, checkpoint: Option<MultipartCheckpoint>) -> Result<(), StorageError>;
    /// True when the caller is shutting down: a multipart put stops before its next
    /// part (its progress is journaled) and returns `Unreachable`.
    fn should_stop(&self) -> bool {
        false
    }
}

/// A journal that keeps nothing, for stores that write in one step.
pub struct NoJournal;

#[async_trait]
impl PutJournal for NoJournal {
    fn resume(&self) -> Option<MultipartCheckpoint> {
        None
    }
    async fn record(&self, _: Option<MultipartCheckpoint>) -> Result<(), StorageError> {
        Ok(())
    }
}

/// What final storage confirmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutOutcome {
    /// Lower-case hex SHA-256 of the bytes sent, verified against the store.
    pub sha256: String,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// Lower-case hex SHA-256 when the store records it.
    pub sha256: Option<String>,
}

/// A place complete files are delivered to.
///
/// Contract: `put` returns Ok only once the object is durable in the store and its
/// size and checksum were verified there; anything less is an error, and the caller
/// keeps its local copy and tries again later. `put` of the same key again replaces
/// the object (replication is retried, so it must be idempotent).
#[async_trait]
pub trait FinalStore: Send + Sync {
    /// A short description for logs, such as `local:/var/lib/cin/origin`.
    fn describe(&self) -> String;

    async fn put(
        &self,
        object: &ObjectToStore<'_>,
        journal: &dyn PutJournal,
    ) -> Result<PutOutcome, FinalStoreError>;

    /// Stores a small object held in memory (a manifest), durably, as `put` does.
    async fn put_bytes(
        &self,
        container: &str,
        key: &str,
        bytes: bytes::Bytes,
        content_type: &str,
    ) -> Result<(), FinalStoreError>;

    async fn head(&self, container: &str, key: &str)
        -> Result<Option<ObjectInfo>, FinalStoreError>;

    /// Streams `[start, end)` of an object, or all of it when `range` is None.
    async fn get(
        &self,
        container: &str,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ByteStream, FinalStoreError>;

    async fn delete(&self, container: &str, key: &str) -> Result<(), FinalStoreError>;

    /// Succeeds when the store answers; for readiness checks.
    async fn check(&self) -> Result<(), FinalStoreError>;
}
