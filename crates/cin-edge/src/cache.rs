//! Local copies of `Stored` files are a cache with a byte budget: when it is over
//! budget, the copies read least recently are removed (the filelink then reads
//! from final storage). A file is never evicted before final storage confirmed it.
//!
//! The cache keeps an index of the local copies it may evict (loaded once, then
//! updated as files are stored), so a stored file costs one record read, not a
//! scan of every record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cin_domain::{FileRecord, FileStatus, Handle, UploadId};
use cin_storage::MetadataStore;

use std::time::Duration;

use tokio::sync::broadcast;

use crate::events::{StatusChange, StatusEvents};
use crate::observability::names;
use crate::upload::{now_ms, Lifecycle, UploadError};
use crate::worker::{Worker, WorkerState};

pub struct LocalCache {
    meta: Arc<dyn MetadataStore>,
    lifecycle: Arc<Lifecycle>,
    /// Bytes of local copies of stored files to keep; 0 keeps everything.
    budget: u64,
    /// When each file was last read through its filelink (ms since the Unix epoch).
    last_read: Mutex<HashMap<Handle, u64>>,
    /// The evictable copies; None until loaded (and again when updates were missed).
    copies: Mutex<Option<EvictableCopies>>,
}

#[derive(Default)]
struct EvictableCopies {
    /// Handle -> (bytes, stored at ms, upload).
    files: HashMap<Handle, (u64, u64, UploadId)>,
    total: u64,
}

impl EvictableCopies {
    fn add(&mut self, file: &FileRecord) {
        if !is_evictable(file) {
            return;
        }
        let entry = (
            file.size,
            file.stored_at_ms.unwrap_or(0),
            file.upload_id.clone(),
        );
        if let Some((old, _, _)) = self.files.insert(file.handle.clone(), entry) {
            self.total -= old;
        }
        self.total += file.size;
    }

    fn remove(&mut self, handle: &Handle) {
        if let Some((size, _, _)) = self.files.remove(handle) {
            self.total -= size;
        }
    }
}

fn is_evictable(file: &FileRecord) -> bool {
    file.status == FileStatus::Stored && file.evicted_at_ms.is_none() && !file.segments.is_empty()
}

impl LocalCache {
    pub fn new(meta: Arc<dyn MetadataStore>, lifecycle: Arc<Lifecycle>, budget: u64) -> Self {
        LocalCache {
            meta,
            lifecycle,
            budget,
            last_read: Mutex::new(HashMap::new()),
            copies: Mutex::new(None),
        }
    }

    /// Notes a read of a stored file's local copy (the only copies it may evict,
    /// so the map holds no more entries than the cache holds files).
    pub fn touch(&self, file: &FileRecord) {
        if self.budget == 0 || !is_evictable(file) {
            return;
        }
        let handle = &file.handle;
        self.last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.clone(), now_ms());
    }

    fn copies(&self) -> MutexGuard<'_, Option<EvictableCopies>> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that a file reached final storage: its local copy becomes evictable.
    pub fn stored(&self, handle: &Handle) -> Result<(), UploadError> {
        if self.budget == 0 {
            return Ok(());
        }
        let Some(file) = self.meta.get_file(handle)? else {
            return Ok(());
        };
        if let Some(copies) = self.copies().as_mut() {
            copies.add(&file);
        }
        Ok(())
    }

    /// Drops the index; the next pass rebuilds it from the records (after missed updates).
    pub fn reload(&self) {
        *self.copies() = None;
    }

    /// Evicts least-recently-read local copies of stored files until the cache
    /// fits its budget. Returns how many were evicted.
    pub async fn evict(&self) -> Result<usize, UploadError> {
        if self.budget == 0 {
            return Ok(0);
        }
        if self.copies().is_none() {
            // Loaded once (and after missed updates), off the request threads.
            let meta = self.meta.clone();
            let files = tokio::task::spawn_blocking(move || meta.files())
                .await
                .map_err(|e| {
                    cin_storage::StorageError::io(
                        "loading the cache index",
                        std::io::Error::other(e),
                    )
                })??;
            let mut loaded = EvictableCopies::default();
            for file in &files {
                loaded.add(file);
            }
            *self.copies() = Some(loaded);
        }
        let candidates = {
            let mut guard = self.copies();
            let Some(copies) = guard.as_mut() else {
                return Ok(0);
            };
            if copies.total <= self.budget {
                return Ok(0);
            }
            let last_read = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
            // Never read: as old as the moment it was stored.
            let mut candidates: Vec<(u64, Handle, UploadId)> = copies
                .files
                .iter()
                .map(|(handle, (_, stored_at, upload))| {
                    let used = last_read.get(handle).copied().unwrap_or(*stored_at);
                    (used, handle.clone(), upload.clone())
                })
                .collect();
            candidates.sort();
            candidates
        };
        let mut evicted = 0;
        for (_, handle, upload) in candidates {
            let over_budget = self
                .copies()
                .as_ref()
                .is_some_and(|c| c.total > self.budget);
            if !over_budget {
                break;
            }
            if let Some(copies) = self.copies().as_mut() {
                copies.remove(&handle);
            }
            if !self.lifecycle.evict(&handle, &upload).await? {
                continue;
            }
            self.last_read
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&handle);
            evicted += 1;
            metrics::counter!(names::CACHE_EVICTIONS).increment(1);
            tracing::info!(%handle, "evicted local copy; final storage serves it");
        }
        Ok(evicted)
    }
}

/// Keeps the local cache within budget: periodically, and whenever a file is stored.
pub struct EvictionWorker {
    cache: Arc<LocalCache>,
    changes: broadcast::Receiver<StatusChange>,
    interval: Duration,
}

impl EvictionWorker {
    pub fn new(cache: Arc<LocalCache>, events: &StatusEvents, interval: Duration) -> Self {
        EvictionWorker {
            cache,
            changes: events.subscribe(),
            interval: interval.max(Duration::from_secs(1)),
        }
    }
}

#[async_trait::async_trait]
impl Worker for EvictionWorker {
    fn name(&self) -> &'static str {
        "cache-eviction"
    }

    async fn work(&mut self) -> WorkerState {
        if let Err(e) = self.cache.evict().await {
            tracing::error!(error = %e, "cache eviction failed");
        }
        WorkerState::Idle(self.interval)
    }

    async fn wait_for_work(&mut self, idle: Duration) {
        let deadline = tokio::time::sleep(idle);
        tokio::pin!(deadline);
        loop {
            let change = tokio::select! {
                _ = &mut deadline => return,
                change = self.changes.recv() => change,
            };
            match change {
                Ok(c) if c.status == FileStatus::Stored => {
                    if let Err(e) = self.cache.stored(&c.handle) {
                        tracing::error!(error = %e, "cache bookkeeping failed");
                        self.cache.reload();
                    }
                    return;
                }
                Ok(_) => {}
                // Missed changes: rebuild the index from the records.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.cache.reload();
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
