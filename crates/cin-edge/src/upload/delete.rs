//! Deleting a file: gone from this POP at once, and from final storage by a
//! removal job the replicator runs (retried until final storage answers, and
//! across restarts, as deliveries are).

use cin_domain::{FileRecord, FileStatus, Handle, ReplicationJob, Transition};
use cin_storage::JobChange;

use super::{UploadError, Uploads};
use crate::observability::names;

impl Uploads {
    /// Deletes the file behind `handle`, whatever its status: its record turns
    /// `Deleted` (reads answer 410), its local bytes are released, a pending
    /// delivery is replaced by the removal of whatever final storage holds of
    /// it, and a `deleted` webhook goes out.
    pub async fn delete(&self, handle: &Handle) -> Result<FileRecord, UploadError> {
        let found = self.file(handle)?;
        let guard = self.lifecycle.lock(&found.upload_id).await;
        let mut file = self.lifecycle.current(&guard, handle)?;
        if file.status.is_gone() {
            // Deleted or expired meanwhile: answered as a read would be.
            drop(guard);
            return self.file(handle);
        }
        // Anything past Uploading may have reached final storage (a delivery
        // attempt may be writing it now): its removal is queued in the same write.
        let job = match file.status {
            FileStatus::Uploading => JobChange::Remove,
            _ if file.is_tus_partial() => JobChange::Remove,
            _ => JobChange::Upsert(ReplicationJob::removal(handle.clone())),
        };
        if file.status == FileStatus::Uploading {
            self.services.meta.remove_parts(&file.upload_id)?;
        }
        self.lifecycle
            .transition(&guard, &mut file, Transition::Delete, job)
            .await?;
        drop(guard);
        self.services.disk.release(&file.upload_id);
        self.assessment.forget(&file.upload_id);
        self.lifecycle.release_bytes(&file).await?;
        self.services.replication_wakeup.notify_one();
        metrics::counter!(names::FILES_DELETED).increment(1);
        tracing::info!(handle = %file.handle, "file deleted");
        Ok(file)
    }
}
