//! Resumable uploads: a small JSON file per source file recording where its upload
//! lives (POP, upload id, handle) and which byte ranges the POP acknowledged, so
//! `cin upload --resume` continues without re-sending any of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::error::ClientError;
use crate::ranges::RangeSet;
use crate::transport::StoreOptions;

pub const STATE_VERSION: u32 = 1;

/// What makes "the same file": its path, size and modification time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_secs: u64,
    pub mtime_nanos: u32,
}

impl FileIdentity {
    pub fn of(path: &Path) -> Result<Self, ClientError> {
        let path = std::fs::canonicalize(path).map_err(|e| ClientError::io(path, e))?;
        let meta = std::fs::metadata(&path).map_err(|e| ClientError::io(&path, e))?;
        if !meta.is_file() {
            return Err(ClientError::Invalid(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        // A file system without mtimes gets 0: identity then rests on path and size.
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        Ok(FileIdentity {
            path,
            size: meta.len(),
            mtime_secs: mtime.as_secs(),
            mtime_nanos: mtime.subsec_nanos(),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartProgress {
    /// Byte ranges within the part the POP acknowledged.
    pub acked: RangeSet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    pub version: u32,
    pub pop: String,
    pub upload_id: String,
    pub handle: String,
    pub url: String,
    pub file: FileIdentity,
    pub filename: String,
    pub mimetype: String,
    pub store: StoreOptions,
    pub part_size: u64,
    #[serde(default)]
    pub parts: BTreeMap<u32, PartProgress>,
}

impl UploadState {
    pub fn acked_bytes(&self) -> u64 {
        self.parts.values().map(|p| p.acked.covered()).sum()
    }
}

/// A finished upload of a source file, kept after its state file is removed,
/// so `cin upload --resume` of the same file says where it is rather than
/// uploading it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedUpload {
    pub version: u32,
    pub file: FileIdentity,
    pub pop: String,
    pub upload_id: String,
    pub handle: String,
    pub url: String,
    /// The status the POP reported when the upload completed.
    pub status: String,
    pub size: u64,
}

/// The directory holding state files.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    /// `$XDG_CACHE_HOME/cin/uploads`, else `~/.cache/cin/uploads`.
    pub fn default_location() -> Option<PathBuf> {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(cache.join("cin").join("uploads"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One state file per source path (canonical), named by its hash.
    pub fn file_for(&self, identity: &FileIdentity) -> PathBuf {
        let digest = Sha256::digest(identity.path.to_string_lossy().as_bytes());
        self.dir
            .join(format!("{}.json", hex::encode(&digest[..16])))
    }

    /// The record of the finished upload of the source path, beside its state file.
    pub fn done_file_for(&self, identity: &FileIdentity) -> PathBuf {
        self.file_for(identity).with_extension("done.json")
    }

    /// The finished upload of this very file (same path, size and mtime), if
    /// one is recorded; an unreadable record counts as none (it only saves an upload).
    pub fn completed(&self, identity: &FileIdentity) -> Option<CompletedUpload> {
        let text = std::fs::read(self.done_file_for(identity)).ok()?;
        let done: CompletedUpload = serde_json::from_slice(&text).ok()?;
        (done.version == STATE_VERSION && done.file == *identity).then_some(done)
    }

    /// Records a finished upload (write-then-rename, like the state file).
    pub fn record_completed(&self, done: &CompletedUpload) -> Result<(), ClientError> {
        let path = self.done_file_for(&done.file);
        let bytes = serde_json::to_vec_pretty(done).map_err(|e| ClientError::BadState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::create_dir_all(&self.dir).map_err(|e| ClientError::io(&self.dir, e))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).map_err(|e| ClientError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ClientError::io(&path, e))
    }

    pub fn load(path: &Path) -> Result<Option<UploadState>, ClientError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ClientError::io(path, e)),
        };
        let state: UploadState =
            serde_json::from_slice(&text).map_err(|e| ClientError::BadState {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        if state.version != STATE_VERSION {
            return Err(ClientError::BadState {
                path: path.to_owned(),
                reason: format!(
                    "version {} (this cin writes {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(Some(state))
    }
}

/// The live state of one upload, rewritten after every acknowledged chunk.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    state: Mutex<UploadState>,
}

impl Checkpoint {
    pub async fn create(path: PathBuf, state: UploadState) -> Result<Self, ClientError> {
        let checkpoint = Checkpoint {
            path,
            state: Mutex::new(state),
        };
        {
            let state = checkpoint.state.lock().await;
            checkpoint.write(&state).await?;
        }
        Ok(checkpoint)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn snapshot(&self) -> UploadState {
        self.state.lock().await.clone()
    }

    pub async fn acked(&self, part: u32, start: u64, end: u64) -> Result<(), ClientError> {
        let mut state = self.state.lock().await;
        state
            .parts
            .entry(part)
            .or_default()
            .acked
            .insert(start, end);
        // The lock is held across the write so writes land in order.
        self.write(&state).await
    }

    /// The upload finished: nothing left to resume.
    pub async fn remove(&self) -> Result<(), ClientError> {
        let _state = self.state.lock().await;
        match tokio::fs::remove_file(&self.path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClientError::io(&self.path, e)),
        }
    }

    /// Write-then-rename, so a kill mid-write leaves the previous state intact.
    /// No fsync: the file must survive the client being killed, which the page
    /// cache guarantees; losing the last acks to a power cut only costs a re-send.
    async fn write(&self, state: &UploadState) -> Result<(), ClientError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| ClientError::BadState {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| ClientError::io(dir, e))?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, &bytes).map_err(|e| ClientError::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| ClientError::io(&path, e))
        })
        .await
        .map_err(|e| ClientError::Invalid(format!("state writer failed: {e}")))?
    }
}
