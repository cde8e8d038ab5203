//! The lifecycle of a file at this POP, in one place:
//! - one lock per upload, taken by every writer of its records (chunk writes to
//!   record their bytes, complete, the expiry sweep, termination, replication,
//!   cache eviction);
//! - one function that changes a file's status ([`Lifecycle::transition`]), a
//!   compare-and-swap against the stored record under that lock;
//! - one rule for freeing bytes: a part directory goes only when no record needs
//!   it, neither its own upload nor a tus final upload whose segments point into it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use cin_domain::{FileRecord, FileStatus, Handle, Segment, Transition, UploadId};
use cin_storage::{JobChange, MetadataStore, PartStore, SegmentLog, SegmentOwner};

use super::locks::{KeyedGuard, KeyedLocks};
use super::received::{Prefix, ReceivedPrefixes};
use super::{now_ms, UploadError};
use crate::events::StatusEvents;
use crate::webhooks::Webhooks;

pub struct Lifecycle {
    meta: Arc<dyn MetadataStore>,
    parts: PartStore,
    small_files: Arc<SegmentLog>,
    locks: KeyedLocks<UploadId>,
    webhooks: Arc<Webhooks>,
    events: Arc<StatusEvents>,
    /// Files waiting for final storage, by completion time: the replication
    /// gauges, kept as transitions happen rather than counted at each scrape.
    in_transit: Mutex<BTreeSet<(u64, Handle)>>,
    /// What uploads in progress hold from byte 0, for readers of their filelinks.
    received: ReceivedPrefixes,
}

/// Holds an upload's lock: the records of that upload may be written.
pub struct UploadGuard<'a> {
    upload: UploadId,
    _held: KeyedGuard<'a, UploadId>,
}

impl UploadGuard<'_> {
    pub fn upload(&self) -> &UploadId {
        &self.upload
    }
}

/// Final uploads one partial upload may be part of: its record lists them all.
const MAX_REFERENCES: usize = 1000;

/// A complete file the replicator has still to deliver (partial uploads never are).
fn awaits_final_storage(file: &FileRecord) -> bool {
    file.status == FileStatus::InTransit && !file.is_tus_partial()
}

/// The webhook event a transition sends, if any.
fn event_name(transition: Transition) -> Option<&'static str> {
    match transition {
        Transition::Complete => Some("InTransit"),
        Transition::Store => Some("Stored"),
        Transition::Expire => Some("expired"),
        Transition::Delete => Some("deleted"),
    }
}

impl Lifecycle {
    /// Builds the lifecycle over the stores, reading once which files wait for
    /// final storage.
    pub fn open(
        meta: Arc<dyn MetadataStore>,
        parts: PartStore,
        small_files: Arc<SegmentLog>,
        webhooks: Arc<Webhooks>,
        events: Arc<StatusEvents>,
    ) -> Result<Self, UploadError> {
        let in_transit = meta
            .files()?
            .into_iter()
            .filter(awaits_final_storage)
            .map(|f| (f.completed_at_ms.unwrap_or(0), f.handle))
            .collect();
        Ok(Lifecycle {
            meta,
            parts,
            small_files,
            locks: KeyedLocks::new(),
            webhooks,
            events,
            in_transit: Mutex::new(in_transit),
            received: ReceivedPrefixes::default(),
        })
    }

    /// How many files wait for final storage, and since when the oldest has (ms since the epoch).
    pub fn replication_backlog(&self) -> (usize, Option<u64>) {
        let waiting = self.in_transit.lock().unwrap_or_else(|p| p.into_inner());
        (waiting.len(), waiting.first().map(|(at, _)| *at))
    }

    pub async fn lock(&self, upload: &UploadId) -> UploadGuard<'_> {
        UploadGuard {
            upload: upload.clone(),
            _held: self.locks.lock(upload.clone()).await,
        }
    }

    /// The stored record of `handle`, read under its upload's lock.
    pub fn current(
        &self,
        guard: &UploadGuard<'_>,
        handle: &Handle,
    ) -> Result<FileRecord, UploadError> {
        let file = self.meta.get_file(handle)?.ok_or_else(|| {
            UploadError::not_found("file_not_found", format!("no file has handle {handle}"))
        })?;
        if file.upload_id != *guard.upload() {
            return Err(UploadError::conflict(
                "wrong_upload",
                format!("file {handle} does not belong to upload {}", guard.upload()),
                Some(file.status),
            ));
        }
        Ok(file)
    }

    /// Checks that the stored record still has the status `file` was read with
    /// (a record not written yet counts as `Uploading`).
    fn compare(&self, file: &FileRecord) -> Result<(), UploadError> {
        let stored = self.meta.get_file(&file.handle)?.map(|f| f.status);
        let stored = stored.unwrap_or(FileStatus::Uploading);
        if stored != file.status {
            return Err(UploadError::conflict(
                "status_changed",
                format!(
                    "file {} is {} now, not {}; read it again",
                    file.handle,
                    stored.as_str(),
                    file.status.as_str()
                ),
                Some(stored),
            ));
        }
        Ok(())
    }

    /// Moves `file` through `transition`: checks it against the stored status,
    /// queues its webhook, writes the record with `job`, makes it durable and
    /// publishes the change. On error the stored record is unchanged.
    pub async fn transition(
        &self,
        guard: &UploadGuard<'_>,
        file: &mut FileRecord,
        transition: Transition,
        job: JobChange,
    ) -> Result<(), UploadError> {
        debug_assert_eq!(&file.upload_id, guard.upload());
        self.compare(file)?;
        let mut next = file.clone();
        next.apply(transition, now_ms())?;
        if let Some(event) = event_name(transition) {
            // Queued before the change itself, so the change is never durable without it.
            self.webhooks.enqueue(&next, event)?;
        }
        self.meta.put_file(&next, job)?;
        self.meta.flush().await?;
        {
            let mut waiting = self.in_transit.lock().unwrap_or_else(|p| p.into_inner());
            if awaits_final_storage(file) {
                waiting.remove(&(file.completed_at_ms.unwrap_or(0), file.handle.clone()));
            }
            if awaits_final_storage(&next) {
                waiting.insert((next.completed_at_ms.unwrap_or(0), next.handle.clone()));
            }
        }
        let left_uploading =
            file.status == FileStatus::Uploading && next.status != FileStatus::Uploading;
        *file = next;
        if left_uploading {
            self.received.forget(&file.upload_id);
        }
        self.events.publish(&file.handle, file.status);
        Ok(())
    }

    /// Follows what an upload in progress holds from byte 0 (see [`ReceivedPrefixes`]).
    pub fn watch_received(
        &self,
        upload: &UploadId,
    ) -> Result<watch::Receiver<Prefix>, UploadError> {
        self.received.watch(&*self.meta, upload)
    }

    /// A part of `upload` was recorded: its readers see the bytes it adds.
    pub fn part_recorded(&self, upload: &UploadId) {
        self.received.recorded(&*self.meta, upload);
    }

    /// Writes a change to `file` that keeps its status (replication bookkeeping,
    /// an eviction, references), durably; refused if the status moved meanwhile.
    pub async fn update(
        &self,
        guard: &UploadGuard<'_>,
        file: &FileRecord,
        job: JobChange,
    ) -> Result<(), UploadError> {
        debug_assert_eq!(&file.upload_id, guard.upload());
        self.compare(file)?;
        self.meta.put_file(file, job)?;
        self.meta.flush().await?;
        Ok(())
    }

    /// Drops the local copy of a `Stored` file (final storage serves it from
    /// now on). Returns false when the file is not such a file any more.
    pub async fn evict(&self, handle: &Handle, upload: &UploadId) -> Result<bool, UploadError> {
        let evicted = {
            let guard = self.lock(upload).await;
            let mut file = self.current(&guard, handle)?;
            if file.status != FileStatus::Stored || file.evicted_at_ms.is_some() {
                return Ok(false);
            }
            file.evicted_at_ms = Some(now_ms());
            self.update(&guard, &file, JobChange::Keep).await?;
            file
        };
        self.release_bytes(&evicted).await?;
        Ok(true)
    }

    /// Frees the local bytes a file no longer needs, once its record says so
    /// durably (evicted, expired, deleted): its own ranges of the small-file
    /// log, its own part directory unless final uploads still reference it, and
    /// its references to the partial uploads it was concatenated from.
    pub async fn release_bytes(&self, file: &FileRecord) -> Result<(), UploadError> {
        if file.has_local_copy() {
            return Ok(());
        }
        let mut partials: Vec<UploadId> = Vec::new();
        // Parts that came whole into the log, of an upload that never
        // completed (a complete file's segments already name them).
        let parts_in_log: Vec<Segment> = match file.completed_at_ms {
            Some(_) => Vec::new(),
            None => self
                .meta
                .parts(&file.upload_id)?
                .into_iter()
                .filter_map(|(_, part)| part.in_log)
                .collect(),
        };
        for segment in file.segments.iter().chain(&parts_in_log) {
            match PartStore::owner(segment) {
                SegmentOwner::Log => self.small_files.release(segment).await?,
                SegmentOwner::Upload(owner) if owner == file.upload_id => {}
                SegmentOwner::Upload(owner) => {
                    if !partials.contains(&owner) {
                        partials.push(owner);
                    }
                }
                SegmentOwner::Unknown => {
                    tracing::warn!(handle = %file.handle, file = %segment.file, "not freeing a segment this POP did not write");
                }
            }
        }
        if file.referenced_by.is_empty() {
            self.parts.remove_upload(&file.upload_id).await?;
        }
        for partial in partials {
            self.drop_reference(&partial, &file.handle).await?;
        }
        Ok(())
    }

    /// Adds `final_handle` to the partial upload's references, so its bytes stay
    /// while the final upload needs them, and a final upload waiting for the
    /// partial is completed when the partial is. Refused unless the partial is
    /// complete or still uploading.
    pub async fn add_reference(
        &self,
        partial: &UploadId,
        final_handle: &Handle,
    ) -> Result<(), UploadError> {
        let guard = self.lock(partial).await;
        let mut file = self.partial_record(&guard)?;
        if !file.is_tus_partial()
            || !matches!(file.status, FileStatus::InTransit | FileStatus::Uploading)
        {
            return Err(UploadError::invalid(
                "partial_unavailable",
                format!(
                    "upload {partial} is not a partial upload that is complete or uploading; it cannot be concatenated"
                ),
            ));
        }
        if !file.referenced_by.contains(final_handle) {
            if file.referenced_by.len() >= MAX_REFERENCES {
                return Err(UploadError::conflict(
                    "too_many_references",
                    format!("partial upload {partial} is already part of {MAX_REFERENCES} final uploads; upload its bytes again for more"),
                    Some(file.status),
                ));
            }
            file.referenced_by.push(final_handle.clone());
            self.update(&guard, &file, JobChange::Keep).await?;
        }
        Ok(())
    }

    /// Removes `final_handle` from a partial upload's references; frees the
    /// partial's bytes (and forgets a terminated partial) once nothing needs them.
    pub async fn drop_reference(
        &self,
        partial: &UploadId,
        final_handle: &Handle,
    ) -> Result<(), UploadError> {
        let guard = self.lock(partial).await;
        let mut file = match self.partial_record(&guard) {
            Ok(file) => file,
            Err(UploadError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let before = file.referenced_by.len();
        file.referenced_by.retain(|h| h != final_handle);
        if file.referenced_by.len() == before {
            return Ok(());
        }
        if file.referenced_by.is_empty() && file.status == FileStatus::Deleted {
            self.meta.delete_file(&file)?;
            self.meta.flush().await?;
        } else {
            self.update(&guard, &file, JobChange::Keep).await?;
        }
        if file.referenced_by.is_empty() && !file.has_local_copy() {
            self.parts.remove_upload(partial).await?;
        }
        Ok(())
    }

    fn partial_record(&self, guard: &UploadGuard<'_>) -> Result<FileRecord, UploadError> {
        let handle = self
            .meta
            .handle_for_upload(guard.upload())?
            .ok_or_else(|| {
                UploadError::not_found(
                    "upload_not_found",
                    format!("no upload has id {}", guard.upload()),
                )
            })?;
        self.current(guard, &handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Apps;
    use cin_domain::UploadMode;
    use cin_storage::SledMetadataStore;

    fn uploading() -> FileRecord {
        FileRecord {
            filename: "a.bin".into(),
            profile: "default".into(),
            container: "default".into(),
            key: "k".into(),
            ..FileRecord::new_upload(UploadId::generate(), 3, UploadMode::Regular, 1)
        }
    }

    fn lifecycle(dir: &std::path::Path) -> (Lifecycle, Arc<dyn MetadataStore>) {
        let meta: Arc<dyn MetadataStore> =
            Arc::new(SledMetadataStore::open(&dir.join("metadata")).unwrap());
        let parts = PartStore::open(dir.join("parts")).unwrap();
        let small_files = Arc::new(SegmentLog::open(&dir.join("parts")).unwrap());
        let webhooks = Arc::new(Webhooks::new(
            meta.clone(),
            Arc::new(Apps::new(Default::default())),
            "http://pop".into(),
            "test".into(),
            Default::default(),
        ));
        let events = Arc::new(StatusEvents::default());
        let lifecycle =
            Lifecycle::open(meta.clone(), parts, small_files, webhooks, events).unwrap();
        (lifecycle, meta)
    }

    /// The sweep read the upload as `Uploading`; `complete` then won the lock.
    /// The sweep's expiry, based on its stale read, must not overwrite the completion.
    #[tokio::test]
    async fn a_transition_based_on_a_stale_read_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (lifecycle, meta) = lifecycle(dir.path());
        let file = uploading();
        meta.put_file(&file, JobChange::Keep).unwrap();
        let mut stale = file.clone();

        let guard = lifecycle.lock(&file.upload_id).await;
        let mut completing = lifecycle.current(&guard, &file.handle).unwrap();
        lifecycle
            .transition(
                &guard,
                &mut completing,
                Transition::Complete,
                JobChange::Keep,
            )
            .await
            .unwrap();
        let refused = lifecycle
            .transition(&guard, &mut stale, Transition::Expire, JobChange::Remove)
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused,
                UploadError::Conflict {
                    status: Some(FileStatus::InTransit),
                    ..
                }
            ),
            "{refused}"
        );
        let stored = meta.get_file(&file.handle).unwrap().unwrap();
        assert_eq!(stored.status, FileStatus::InTransit);
        assert!(stored.expired_at_ms.is_none());
        assert_eq!(
            stale.status,
            FileStatus::Uploading,
            "a refused transition leaves the caller's copy"
        );
        assert_eq!(lifecycle.replication_backlog().0, 1);

        let mut done = lifecycle.current(&guard, &file.handle).unwrap();
        lifecycle
            .transition(&guard, &mut done, Transition::Store, JobChange::Remove)
            .await
            .unwrap();
        assert_eq!(lifecycle.replication_backlog(), (0, None));
    }

    #[tokio::test]
    async fn one_lock_per_upload_serialises_its_writers() {
        let dir = tempfile::tempdir().unwrap();
        let (lifecycle, _meta) = lifecycle(dir.path());
        let lifecycle = Arc::new(lifecycle);
        let upload = UploadId::generate();
        let held = lifecycle.lock(&upload).await;
        let contender = {
            let lifecycle = lifecycle.clone();
            let upload = upload.clone();
            tokio::spawn(async move {
                let _second = lifecycle.lock(&upload).await;
            })
        };
        // Another upload's lock is free meanwhile.
        let _other = lifecycle.lock(&UploadId::generate()).await;
        tokio::task::yield_now().await;
        assert!(!contender.is_finished(), "the second writer waits");
        drop(held);
        contender.await.unwrap();
    }
}
