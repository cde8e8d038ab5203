//! The metadata store: records of files, of the parts of uploads in progress, and
//! of pending replication jobs. Writes are visible at once; `flush` makes them
//! durable and must complete before a client is told about them.

use std::path::Path;
use std::time::{Duration, Instant};

use cin_domain::{
    FileRecord, FileStatus, Handle, PartNumber, PartRecord, ReplicationJob, UploadId,
    WebhookDelivery,
};
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::group_commit::{BatchError, GroupCommit};
use crate::sled_durability::SledDurability;
use crate::StorageError;

/// What to do with a file's replication job when its record is written.
#[derive(Clone, Debug)]
pub enum JobChange {
    Keep,
    Upsert(ReplicationJob),
    Remove,
}

/// Records of files, parts and replication jobs.
pub trait MetadataStore: Send + Sync {
    fn get_file(&self, handle: &Handle) -> Result<Option<FileRecord>, StorageError>;
    /// Writes a file record (and the upload id index) and changes its job. A file
    /// is never complete without a pending job, a crash in between included.
    fn put_file(&self, file: &FileRecord, job: JobChange) -> Result<(), StorageError>;
    fn handle_for_upload(&self, upload: &UploadId) -> Result<Option<Handle>, StorageError>;
    /// Every file record; for start-up checks.
    fn files(&self) -> Result<Vec<FileRecord>, StorageError>;
    /// Up to `limit` file records in handle order, starting after `after` (from
    /// the first with None): a listing reads a page at a time, never every record.
    fn files_after(
        &self,
        after: Option<&Handle>,
        limit: usize,
    ) -> Result<Vec<FileRecord>, StorageError>;
    /// The records of uploads in progress (status `Uploading`), read from an
    /// index: sweeps and reservations never decode the other records.
    fn uploading_files(&self) -> Result<Vec<FileRecord>, StorageError>;

    fn get_part(
        &self,
        upload: &UploadId,
        part: PartNumber,
    ) -> Result<Option<PartRecord>, StorageError>;
    fn put_part(
        &self,
        upload: &UploadId,
        part: PartNumber,
        record: &PartRecord,
    ) -> Result<(), StorageError>;
    /// Parts of an upload in part-number order.
    fn parts(&self, upload: &UploadId) -> Result<Vec<(PartNumber, PartRecord)>, StorageError>;
    /// Forgets every part record of an upload.
    fn remove_parts(&self, upload: &UploadId) -> Result<(), StorageError>;
    /// Forgets a file entirely: its record, upload index, parts and job.
    fn delete_file(&self, file: &FileRecord) -> Result<(), StorageError>;

    fn get_job(&self, handle: &Handle) -> Result<Option<ReplicationJob>, StorageError>;
    fn put_job(&self, job: &ReplicationJob) -> Result<(), StorageError>;
    fn remove_job(&self, handle: &Handle) -> Result<(), StorageError>;
    /// Up to `limit` jobs in handle order, starting after `after` (from the first with None).
    fn jobs_after(
        &self,
        after: Option<&Handle>,
        limit: usize,
    ) -> Result<Vec<ReplicationJob>, StorageError>;

    /// Adds deliveries at the end of the webhook queue, numbering them.
    fn enqueue_webhooks(&self, deliveries: Vec<WebhookDelivery>) -> Result<(), StorageError>;
    /// The webhook queue in order.
    fn webhooks(&self) -> Result<Vec<WebhookDelivery>, StorageError>;
    fn put_webhook(&self, delivery: &WebhookDelivery) -> Result<(), StorageError>;
    fn remove_webhook(&self, seq: u64) -> Result<(), StorageError>;

    /// Makes every write so far durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>>;

    /// Writes and flushes a probe value: succeeds when the store can take writes.
    fn check_writable(&self) -> BoxFuture<'_, Result<(), StorageError>>;
}

/// Format version of every stored value; bumped when a record's shape changes incompatibly.
const VALUE_VERSION: u8 = 1;

/// [`MetadataStore`] on sled: one tree per record kind, values versioned and checksummed.
pub struct SledMetadataStore {
    db: sled::Db,
    /// Flushes for concurrent requests are grouped. (sled 0.34's own
    /// `flush_async` deadlocks with concurrent writers, spacejam/sled#1308.)
    flusher: GroupCommit<(), ()>,
    files: sled::Tree,
    /// Handles of the files whose status is `Uploading` (values empty).
    uploading: sled::Tree,
    uploads: sled::Tree,
    parts: sled::Tree,
    jobs: sled::Tree,
    webhooks: sled::Tree,
}

impl SledMetadataStore {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = open_sled(
            sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput),
            path,
        )?;
        let jobs = db.open_tree("jobs")?;
        let files = db.open_tree("files")?;
        let uploading = db.open_tree("uploading")?;
        check_indexes(&files, &jobs, &uploading)?;
        let flushed = db.clone();
        let mut durability = SledDurability::open(path)?;
        // One flush and one sync answer every request queued since the last batch.
        let flusher = GroupCommit::start("metadata", move |batch: Vec<()>| {
            let flushed = flushed
                .flush()
                .map_err(StorageError::from)
                .and_then(|_| durability.sync())
                .map_err(BatchError::from);
            vec![flushed; batch.len()]
        })?;
        Ok(SledMetadataStore {
            flusher,
            files,
            uploading,
            uploads: db.open_tree("uploads")?,
            parts: db.open_tree("parts")?,
            jobs,
            webhooks: db.open_tree("webhooks")?,
            db,
        })
    }
}

/// How long opening waits for the store's lock. A closed instance releases it
/// from a background thread a moment after the last handle goes, so a store
/// reopened at once (a restart in place) would otherwise find it taken.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Opens a sled database, waiting up to [`LOCK_WAIT`] for its lock. sled
/// reports a taken lock only as text, so the lock (an `flock` on `db`, as sled
/// takes it) is probed first.
pub(crate) fn open_sled(config: sled::Config, path: &Path) -> Result<sled::Db, StorageError> {
    let deadline = Instant::now() + LOCK_WAIT;
    while lock_is_taken(&path.join("db"))? {
        if Instant::now() >= deadline {
            return Err(StorageError::InUse {
                path: path.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(config.open()?)
}

/// Whether another open instance holds the lock on sled's `db` file.
fn lock_is_taken(db: &Path) -> Result<bool, StorageError> {
    use std::os::fd::AsRawFd;
    let file = match std::fs::File::open(db) {
        Ok(file) => file,
        // A new store: nobody can hold it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StorageError::io(format!("opening {}", db.display()), e)),
    };
    // SAFETY: flock on a descriptor owned here; closing it drops the probe lock.
    let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
    Ok(taken)
}

/// Brings what a crash between two writes may have left out of step back in
/// step with the file records: a replication job for every complete file
/// without one, and the index of uploads in progress.
fn check_indexes(
    files: &sled::Tree,
    jobs: &sled::Tree,
    uploading: &sled::Tree,
) -> Result<(), StorageError> {
    let mut changed = false;
    for kv in files.iter() {
        let (key, value) = kv?;
        let file = decode::<FileRecord>(&key, &value)?.upgrade();
        if file.status == FileStatus::InTransit
            && !file.is_tus_partial()
            && !jobs.contains_key(&key)?
        {
            tracing::warn!(handle = %file.handle, "queueing replication of a complete file that had no job");
            jobs.insert(&key, encode(&ReplicationJob::new(file.handle.clone())))?;
            changed = true;
        }
        let indexed = uploading.contains_key(&key)?;
        if (file.status == FileStatus::Uploading) != indexed {
            if indexed {
                uploading.remove(&key)?;
            } else {
                uploading.insert(&key, &[])?;
            }
            changed = true;
        }
    }
    for key in uploading.iter().keys() {
        let key = key?;
        if !files.contains_key(&key)? {
            uploading.remove(&key)?;
            changed = true;
        }
    }
    if changed {
        jobs.flush()?;
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(VALUE_VERSION);
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode<T: DeserializeOwned>(key: &[u8], raw: &[u8]) -> Result<T, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    if raw.len() < 5 {
        return Err(corrupt("value too short".into()));
    }
    if raw[0] != VALUE_VERSION {
        return Err(corrupt(format!("unknown format version {}", raw[0])));
    }
    let crc = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]);
    let body = &raw[5..];
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))
}

fn part_key(upload: &UploadId, part: PartNumber) -> Vec<u8> {
    let mut key = upload.as_str().as_bytes().to_vec();
    key.extend_from_slice(&part.get().to_be_bytes());
    key
}

impl MetadataStore for SledMetadataStore {
    fn get_file(&self, handle: &Handle) -> Result<Option<FileRecord>, StorageError> {
        let key = handle.as_str().as_bytes();
        let file: Option<FileRecord> = self.files.get(key)?.map(|v| decode(key, &v)).transpose()?;
        Ok(file.map(FileRecord::upgrade))
    }

    fn put_file(&self, file: &FileRecord, job: JobChange) -> Result<(), StorageError> {
        // No sled transaction: once one runs, sled makes every later operation
        // take a process-wide lock that a flush holds while it waits for the disk.
        // Plain writes instead, each state in between covered: the replicator
        // drops a job whose file is not complete or already stored, and `open`
        // queues any complete file a crash left without a job.
        let key = file.handle.as_str().as_bytes();
        self.uploads
            .insert(file.upload_id.as_str().as_bytes(), key)?;
        self.files.insert(key, encode(file))?;
        if file.status == FileStatus::Uploading {
            self.uploading.insert(key, &[])?;
        } else {
            self.uploading.remove(key)?;
        }
        match &job {
            JobChange::Upsert(j) => {
                self.jobs.insert(key, encode(j))?;
            }
            JobChange::Remove => {
                self.jobs.remove(key)?;
            }
            JobChange::Keep => {}
        }
        Ok(())
    }

    fn handle_for_upload(&self, upload: &UploadId) -> Result<Option<Handle>, StorageError> {
        let key = upload.as_str().as_bytes();
        match self.uploads.get(key)? {
            None => Ok(None),
            Some(v) => {
                let s = std::str::from_utf8(&v).map_err(|e| StorageError::Corrupt {
                    key: upload.to_string(),
                    reason: e.to_string(),
                })?;
                Handle::parse(s)
                    .map(Some)
                    .map_err(|e| StorageError::Corrupt {
                        key: upload.to_string(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    fn files(&self) -> Result<Vec<FileRecord>, StorageError> {
        self.files
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v).map(FileRecord::upgrade)
            })
            .collect()
    }

    fn files_after(
        &self,
        after: Option<&Handle>,
        limit: usize,
    ) -> Result<Vec<FileRecord>, StorageError> {
        let range = match after {
            Some(handle) => self.files.range::<&[u8], _>((
                std::ops::Bound::Excluded(handle.as_str().as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.files.iter(),
        };
        range
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v).map(FileRecord::upgrade)
            })
            .collect()
    }

    fn uploading_files(&self) -> Result<Vec<FileRecord>, StorageError> {
        let mut out = Vec::new();
        for key in self.uploading.iter().keys() {
            let key = key?;
            if let Some(value) = self.files.get(&key)? {
                out.push(decode::<FileRecord>(&key, &value)?.upgrade());
            }
        }
        Ok(out)
    }

    fn get_part(
        &self,
        upload: &UploadId,
        part: PartNumber,
    ) -> Result<Option<PartRecord>, StorageError> {
        let key = part_key(upload, part);
        self.parts.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    fn put_part(
        &self,
        upload: &UploadId,
        part: PartNumber,
        record: &PartRecord,
    ) -> Result<(), StorageError> {
        self.parts.insert(part_key(upload, part), encode(record))?;
        Ok(())
    }

    fn parts(&self, upload: &UploadId) -> Result<Vec<(PartNumber, PartRecord)>, StorageError> {
        self.parts
            .scan_prefix(upload.as_str().as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                let n = k
                    .get(k.len().saturating_sub(4)..)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(|| StorageError::Corrupt {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        reason: "bad part key".into(),
                    })?;
                let part = PartNumber::new(i64::from(n)).map_err(|e| StorageError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: e.to_string(),
                })?;
                Ok((part, decode(&k, &v)?))
            })
            .collect()
    }

    fn remove_parts(&self, upload: &UploadId) -> Result<(), StorageError> {
        for key in self.parts.scan_prefix(upload.as_str().as_bytes()).keys() {
            self.parts.remove(key?)?;
        }
        Ok(())
    }

    fn delete_file(&self, file: &FileRecord) -> Result<(), StorageError> {
        self.remove_parts(&file.upload_id)?;
        let key = file.handle.as_str().as_bytes();
        self.jobs.remove(key)?;
        self.uploads.remove(file.upload_id.as_str().as_bytes())?;
        self.uploading.remove(key)?;
        self.files.remove(key)?;
        Ok(())
    }

    fn get_job(&self, handle: &Handle) -> Result<Option<ReplicationJob>, StorageError> {
        let key = handle.as_str().as_bytes();
        self.jobs.get(key)?.map(|v| decode(key, &v)).transpose()
    }

    fn put_job(&self, job: &ReplicationJob) -> Result<(), StorageError> {
        self.jobs
            .insert(job.handle.as_str().as_bytes(), encode(job))?;
        Ok(())
    }

    fn remove_job(&self, handle: &Handle) -> Result<(), StorageError> {
        self.jobs.remove(handle.as_str().as_bytes())?;
        Ok(())
    }

    fn jobs_after(
        &self,
        after: Option<&Handle>,
        limit: usize,
    ) -> Result<Vec<ReplicationJob>, StorageError> {
        let range = match after {
            Some(handle) => self.jobs.range::<&[u8], _>((
                std::ops::Bound::Excluded(handle.as_str().as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.jobs.iter(),
        };
        range
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn enqueue_webhooks(&self, deliveries: Vec<WebhookDelivery>) -> Result<(), StorageError> {
        for mut delivery in deliveries {
            // Monotonic across restarts, so the key order is the delivery order.
            delivery.seq = self.db.generate_id()?;
            self.put_webhook(&delivery)?;
        }
        Ok(())
    }

    fn webhooks(&self) -> Result<Vec<WebhookDelivery>, StorageError> {
        self.webhooks
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn put_webhook(&self, delivery: &WebhookDelivery) -> Result<(), StorageError> {
        self.webhooks
            .insert(delivery.seq.to_be_bytes(), encode(delivery))?;
        Ok(())
    }

    fn remove_webhook(&self, seq: u64) -> Result<(), StorageError> {
        self.webhooks.remove(seq.to_be_bytes())?;
        Ok(())
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(self.flusher.submit(()))
    }

    fn check_writable(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            self.db.insert(b"readiness-probe", &stamp.to_be_bytes())?;
            self.flusher.submit(()).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cin_domain::{FileStatus, UploadMode};

    fn record() -> FileRecord {
        FileRecord {
            filename: "a.txt".into(),
            mimetype: "text/plain".into(),
            profile: "default".into(),
            container: "default".into(),
            key: "k".into(),
            ..FileRecord::new_upload(UploadId::generate(), 10, UploadMode::Regular, 1)
        }
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let file = record();
        {
            let store = SledMetadataStore::open(dir.path()).unwrap();
            store
                .put_file(
                    &file,
                    JobChange::Upsert(ReplicationJob::new(file.handle.clone())),
                )
                .unwrap();
            let mut part = PartRecord::default();
            part.received.insert(0, 5);
            store
                .put_part(&file.upload_id, PartNumber::new(2).unwrap(), &part)
                .unwrap();
            store
                .put_part(&file.upload_id, PartNumber::new(1).unwrap(), &part)
                .unwrap();
            store.flush().await.unwrap();
        }
        let store = SledMetadataStore::open(dir.path()).unwrap();
        assert_eq!(store.get_file(&file.handle).unwrap(), Some(file.clone()));
        assert_eq!(
            store.handle_for_upload(&file.upload_id).unwrap(),
            Some(file.handle.clone())
        );
        let parts = store.parts(&file.upload_id).unwrap();
        assert_eq!(
            parts.iter().map(|(n, _)| n.get()).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(store.jobs_after(None, 10).unwrap().len(), 1);
        store.put_file(&file, JobChange::Remove).unwrap();
        assert!(store.jobs_after(None, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_complete_file_left_without_a_job_is_queued_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = record();
        file.status = FileStatus::InTransit;
        {
            let store = SledMetadataStore::open(dir.path()).unwrap();
            // As a crash between the record and its job would leave it.
            store.put_file(&file, JobChange::Keep).unwrap();
            store.put_file(&record(), JobChange::Keep).unwrap();
            store.flush().await.unwrap();
        }
        let store = SledMetadataStore::open(dir.path()).unwrap();
        let jobs = store.jobs_after(None, 10).unwrap();
        assert_eq!(
            jobs.iter().map(|j| &j.handle).collect::<Vec<_>>(),
            vec![&file.handle],
            "only the complete file gets a job"
        );
    }

    #[tokio::test]
    async fn jobs_come_a_page_at_a_time_in_handle_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledMetadataStore::open(dir.path()).unwrap();
        let mut handles: Vec<Handle> = (0..5).map(|_| Handle::generate()).collect();
        for handle in &handles {
            store.put_job(&ReplicationJob::new(handle.clone())).unwrap();
        }
        handles.sort();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.jobs_after(after.as_ref(), 2).unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some(last.handle.clone());
            seen.extend(page.into_iter().map(|j| j.handle));
        }
        assert_eq!(seen, handles);
    }

    #[tokio::test]
    async fn uploads_in_progress_are_indexed_and_the_index_is_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let uploading = record();
        let mut complete = record();
        complete.status = FileStatus::InTransit;
        {
            let store = SledMetadataStore::open(dir.path()).unwrap();
            store.put_file(&uploading, JobChange::Keep).unwrap();
            store.put_file(&complete, JobChange::Keep).unwrap();
            let listed = store.uploading_files().unwrap();
            assert_eq!(listed, vec![uploading.clone()]);
            // As a crash before the index write would leave it.
            store.uploading.remove(uploading.handle.as_str()).unwrap();
            store
                .uploading
                .insert(complete.handle.as_str(), &[])
                .unwrap();
            store.flush().await.unwrap();
        }
        let store = SledMetadataStore::open(dir.path()).unwrap();
        assert_eq!(store.uploading_files().unwrap(), vec![uploading.clone()]);
        let mut done = uploading.clone();
        done.status = FileStatus::InTransit;
        store.put_file(&done, JobChange::Keep).unwrap();
        assert!(store.uploading_files().unwrap().is_empty());
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        assert!(decode::<FileRecord>(b"k", b"\x01\0\0\0\0{}").is_err());
        assert!(decode::<FileRecord>(b"k", b"").is_err());
        let mut good = encode(&record());
        let last = good.len() - 2;
        good[last] ^= 0x55;
        assert!(decode::<FileRecord>(b"k", &good).is_err());
    }
}
