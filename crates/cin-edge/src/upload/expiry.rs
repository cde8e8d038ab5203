//! Sweeping abandoned uploads: an upload that received no bytes for the configured
//! time loses its bytes and part records; its file record stays as a tombstone so
//! the handle can answer `expired` rather than "never existed".

use cin_domain::{FileRecord, FileStatus};
use cin_storage::JobChange;

use super::{now_ms, Uploads};
use crate::error::ApiError;
use crate::observability::names;

impl Uploads {
    /// When bytes last arrived for an upload (or when it started).
    pub fn last_activity_ms(&self, file: &FileRecord) -> Result<u64, ApiError> {
        let parts = self.meta.parts(&file.upload_id)?;
        Ok(parts
            .iter()
            .map(|(_, p)| p.touched_at_ms)
            .fold(file.created_at_ms, u64::max))
    }

    /// When an unfinished upload will expire (ms since the Unix epoch).
    pub fn expires_at_ms(&self, file: &FileRecord) -> Result<Option<u64>, ApiError> {
        if file.status != FileStatus::Uploading {
            return Ok(None);
        }
        Ok(Some(
            self.last_activity_ms(file)? + self.expire_after.as_millis() as u64,
        ))
    }

    /// Expires every unfinished upload idle for longer than the configured time.
    /// Returns how many were swept.
    pub async fn sweep_expired(&self) -> Result<usize, ApiError> {
        let now = now_ms();
        let mut swept = 0;
        for file in self.meta.files()? {
            if file.status != FileStatus::Uploading || file.expired_at_ms.is_some() {
                continue;
            }
            let Some(expires) = self.expires_at_ms(&file)? else {
                continue;
            };
            if expires > now {
                continue;
            }
            let _guard = self.part_locks.lock((file.upload_id.clone(), 1)).await;
            // Bytes may have arrived while waiting for the lock.
            let Some(mut current) = self.meta.get_file(&file.handle)? else {
                continue;
            };
            if current.status != FileStatus::Uploading
                || self.expires_at_ms(&current)?.is_some_and(|e| e > now)
            {
                continue;
            }
            current.expired_at_ms = Some(now);
            current.segments.clear();
            self.webhooks.enqueue(&current, "expired")?;
            self.meta.remove_parts(&current.upload_id)?;
            self.meta.put_file(&current, JobChange::Remove)?;
            self.meta.flush().await?;
            self.parts.remove_upload(&current.upload_id).await?;
            self.disk.release(&current.upload_id);
            metrics::counter!(names::UPLOADS_FAILED, "reason" => "expired").increment(1);
            tracing::info!(handle = %current.handle, "expired an abandoned upload");
            swept += 1;
        }
        Ok(swept)
    }
}
