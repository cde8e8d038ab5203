//! Sweeping abandoned uploads: an upload that received no bytes for the configured
//! time loses its bytes and part records; its file record stays as a tombstone so
//! the handle can answer `expired` rather than "never existed".

use cin_domain::{FileRecord, FileStatus, Transition};
use cin_storage::JobChange;

use std::time::Duration;

use super::{now_ms, UploadError, Uploads};
use crate::app::SharedState;
use crate::observability::names;
use crate::worker::{Worker, WorkerState};

impl Uploads {
    /// When bytes last arrived for an upload (or when it started).
    pub fn last_activity_ms(&self, file: &FileRecord) -> Result<u64, UploadError> {
        let parts = self.services.meta.parts(&file.upload_id)?;
        Ok(parts
            .iter()
            .map(|(_, p)| p.touched_at_ms)
            .fold(file.created_at_ms, u64::max))
    }

    /// When an unfinished upload will expire (ms since the Unix epoch).
    pub fn expires_at_ms(&self, file: &FileRecord) -> Result<Option<u64>, UploadError> {
        if file.status != FileStatus::Uploading {
            return Ok(None);
        }
        Ok(Some(
            self.last_activity_ms(file)? + self.limits.expire_after.as_millis() as u64,
        ))
    }

    /// Expires every unfinished upload idle for longer than the configured time.
    /// Returns how many were swept.
    pub async fn sweep_expired(&self) -> Result<usize, UploadError> {
        let now = now_ms();
        let mut swept = 0;
        for file in self.services.meta.uploading_files()? {
            let Some(expires) = self.expires_at_ms(&file)? else {
                continue;
            };
            if expires > now {
                continue;
            }
            let guard = self.lifecycle.lock(&file.upload_id).await;
            // Bytes may have arrived, or the upload completed, while waiting for the lock.
            let mut current = match self.lifecycle.current(&guard, &file.handle) {
                Ok(current) => current,
                Err(UploadError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            if current.status != FileStatus::Uploading
                || self.expires_at_ms(&current)?.is_some_and(|e| e > now)
            {
                continue;
            }
            current.segments.clear();
            self.services.meta.remove_parts(&current.upload_id)?;
            self.lifecycle
                .transition(&guard, &mut current, Transition::Expire, JobChange::Remove)
                .await?;
            drop(guard);
            self.lifecycle.release_bytes(&current).await?;
            self.services.disk.release(&current.upload_id);
            self.assessment.forget(&current.upload_id);
            metrics::counter!(names::UPLOADS_FAILED, "reason" => "expired").increment(1);
            tracing::info!(handle = %current.handle, "expired an abandoned upload");
            swept += 1;
        }
        Ok(swept)
    }
}

/// Sweeps abandoned uploads periodically.
pub struct SweepWorker {
    pub state: SharedState,
}

#[async_trait::async_trait]
impl Worker for SweepWorker {
    fn name(&self) -> &'static str {
        "expiry-sweep"
    }

    async fn work(&mut self) -> WorkerState {
        if let Err(e) = self.state.uploads.sweep_expired().await {
            tracing::error!(error = %e, "sweeping expired uploads failed");
        }
        WorkerState::Idle(Duration::from_secs(
            self.state.config.uploads.sweep_interval_secs.max(1),
        ))
    }
}
