use serde::{Deserialize, Serialize};

use crate::{FileStatus, Handle, RangeSet, StoreOptions, UploadId};

/// How the client sends the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadMode {
    /// Filestack regular multipart: each part in one PUT.
    Regular,
    /// Filestack intelligent ingestion: chunks at offsets inside parts, then a commit per part.
    Intelligent,
    /// One request carries the whole file (`/api/store`).
    Direct,
    /// tus 1.0: bytes appended at the current offset by PATCH requests.
    Tus,
}

/// tus concatenation: how an upload relates to others.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TusConcat {
    #[default]
    None,
    /// A piece of a later final upload; never delivered to final storage on its own.
    Partial,
    /// The concatenation of these partial uploads, in order.
    Final(Vec<UploadId>),
}

/// What a tus upload carries beyond the common record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TusState {
    /// `Upload-Metadata` as the client sent it, echoed on HEAD.
    pub metadata: String,
    pub concat: TusConcat,
}

/// A run of bytes in a local file. A complete file is the concatenation of its
/// segments, so completing an upload never copies bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Path relative to the POP's parts directory.
    pub file: String,
    pub offset: u64,
    pub len: u64,
}

/// What the POP knows about one file. Stored in the metadata store under its handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub handle: Handle,
    pub upload_id: UploadId,
    pub filename: String,
    pub mimetype: String,
    /// Declared size in bytes; the upload is complete only when exactly this many arrived.
    pub size: u64,
    pub mode: UploadMode,
    pub status: FileStatus,
    /// Milliseconds since the Unix epoch when the upload started.
    pub created_at_ms: u64,
    pub completed_at_ms: Option<u64>,
    pub stored_at_ms: Option<u64>,
    /// Store options as the client sent them, validated.
    pub store: StoreOptions,
    /// Name of the storage profile the replicator delivers to.
    pub profile: String,
    /// Bucket (or directory) in final storage.
    pub container: String,
    /// Object key in final storage.
    pub key: String,
    /// Set when the upload completes.
    pub segments: Vec<Segment>,
    /// Lower-case hex SHA-256 of the whole file, once the replicator has read it.
    pub sha256: Option<String>,
    pub replication_attempts: u32,
    pub last_error: Option<String>,
    /// The client has not declared the size yet (tus `Upload-Defer-Length`); `size` is 0 until it does.
    #[serde(default)]
    pub length_deferred: bool,
    /// Set when an abandoned upload was swept: its bytes are gone, the record stays as a tombstone.
    #[serde(default)]
    pub expired_at_ms: Option<u64>,
    #[serde(default)]
    pub tus: Option<TusState>,
    /// The app (API key) that uploaded the file; None on an open POP.
    #[serde(default)]
    pub app: Option<String>,
    /// When the local copy was evicted from the cache (final storage serves it since).
    #[serde(default)]
    pub evicted_at_ms: Option<u64>,
    /// When the client terminated the upload (status `Deleted`).
    #[serde(default)]
    pub deleted_at_ms: Option<u64>,
    /// tus partial uploads: the final uploads whose segments point into this
    /// upload's bytes. The bytes stay while any of them keeps its local copy.
    #[serde(default)]
    pub referenced_by: Vec<Handle>,
    /// Found at start: a segment of the local copy is gone or shorter than it
    /// should be. The filelink does not serve the local copy (final storage does
    /// once the file is `Stored`); checked again at every start.
    #[serde(default)]
    pub local_bytes_missing: bool,
    /// Tags the client gave at completion (Filestack's `upload_tags`), returned
    /// by `complete` and metadata.
    #[serde(default)]
    pub upload_tags: std::collections::BTreeMap<String, String>,
}

impl FileRecord {
    /// A new upload of `size` bytes with a fresh handle: nothing received,
    /// nothing delivered yet; the caller fills in names and placement.
    pub fn new_upload(
        upload_id: UploadId,
        size: u64,
        mode: UploadMode,
        created_at_ms: u64,
    ) -> Self {
        FileRecord {
            handle: Handle::generate(),
            upload_id,
            filename: String::new(),
            mimetype: String::new(),
            size,
            mode,
            status: FileStatus::Uploading,
            created_at_ms,
            completed_at_ms: None,
            stored_at_ms: None,
            store: StoreOptions::default(),
            profile: String::new(),
            container: String::new(),
            key: String::new(),
            segments: Vec::new(),
            sha256: None,
            replication_attempts: 0,
            last_error: None,
            length_deferred: false,
            expired_at_ms: None,
            tus: None,
            app: None,
            evicted_at_ms: None,
            deleted_at_ms: None,
            referenced_by: Vec::new(),
            local_bytes_missing: false,
            upload_tags: Default::default(),
        }
    }

    pub fn is_tus_partial(&self) -> bool {
        matches!(
            &self.tus,
            Some(TusState {
                concat: TusConcat::Partial,
                ..
            })
        )
    }
}

/// The bytes received for one part of an upload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    /// Byte ranges inside the part that are on disk (fsync'd) and acknowledged.
    pub received: RangeSet,
    /// Length of the part once it is whole: set by a regular PUT or an FII commit.
    pub committed_len: Option<u64>,
    /// Quoted MD5 of the part, returned as the PUT's ETag (regular mode).
    pub etag: Option<String>,
    /// When bytes last arrived (ms since the Unix epoch), for sweeping abandoned uploads.
    #[serde(default)]
    pub touched_at_ms: u64,
    /// Where the part lies when it arrived whole in one small body and went to
    /// the small-file log; None: in its own part file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_log: Option<Segment>,
}

/// A pending delivery of a complete file to final storage. Kept in the metadata store
/// until final storage confirms the object, so it survives restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationJob {
    pub handle: Handle,
    pub attempts: u32,
    /// Do not try again before this time (ms since the Unix epoch).
    pub not_before_ms: u64,
    pub last_error: Option<String>,
    /// Progress of a multipart upload to final storage, so a restart resumes it.
    pub checkpoint: Option<MultipartCheckpoint>,
    /// The `replication_failing` webhook went out for this job.
    #[serde(default)]
    pub failing_reported: bool,
    /// Attempts final storage answered with a definitive mismatch (it holds other
    /// bytes than the file's); at the replicator's limit the job is given up.
    #[serde(default)]
    pub mismatched_attempts: u32,
    /// The file was deleted: this job takes its object (and manifest) out of
    /// final storage instead of delivering it.
    #[serde(default)]
    pub remove: bool,
    /// When an operator cancelled the delivery (ms since the Unix epoch): the
    /// job is parked, like a given-up one, until an operator retries it.
    #[serde(default)]
    pub cancelled_at_ms: Option<u64>,
}

impl ReplicationJob {
    pub fn new(handle: Handle) -> Self {
        ReplicationJob {
            handle,
            attempts: 0,
            not_before_ms: 0,
            last_error: None,
            checkpoint: None,
            failing_reported: false,
            remove: false,
            mismatched_attempts: 0,
            cancelled_at_ms: None,
        }
    }

    /// A job that removes a deleted file's object from final storage.
    pub fn removal(handle: Handle) -> Self {
        ReplicationJob {
            remove: true,
            ..ReplicationJob::new(handle)
        }
    }
}

/// A status change to POST to an app's webhook URL. Kept in the metadata store
/// until the receiver answered 2xx (at least once, in order per handle and URL).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    /// Position in the queue; deliveries for one handle and URL go in this order.
    pub seq: u64,
    pub url: String,
    /// The app whose secret signs the body.
    pub app: String,
    pub handle: Handle,
    /// The JSON body, exactly as signed and sent.
    pub body: String,
    pub attempts: u32,
    pub not_before_ms: u64,
    pub last_error: Option<String>,
}

/// A multipart upload to final storage in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartCheckpoint {
    /// The final store's id for the multipart upload.
    pub upload_id: String,
    pub container: String,
    pub key: String,
    pub part_size: u64,
    /// Parts the final store has confirmed.
    pub parts: Vec<CompletedPart>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedPart {
    pub number: u32,
    pub etag: String,
    /// Base64 checksum the final store confirmed for the part.
    pub checksum: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh upload record for rule tests.
    pub(crate) fn record() -> FileRecord {
        FileRecord {
            filename: "a.txt".into(),
            mimetype: "text/plain".into(),
            profile: "default".into(),
            container: "default".into(),
            key: "k".into(),
            ..FileRecord::new_upload(UploadId::generate(), 10, UploadMode::Tus, 1)
        }
    }
}
