//! Local copies of `Stored` files are a cache with a byte budget: when it is over
//! budget, the copies read least recently are removed (the filelink then reads
//! from final storage). A file is never evicted before final storage confirmed it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cin_domain::{FileStatus, Handle};
use cin_storage::{JobChange, MetadataStore, PartStore};

use crate::error::ApiError;
use crate::observability::names;
use crate::upload::now_ms;

pub struct LocalCache {
    meta: Arc<dyn MetadataStore>,
    parts: PartStore,
    /// Bytes of local copies of stored files to keep; 0 keeps everything.
    budget: u64,
    /// When each file was last read through its filelink (ms since the Unix epoch).
    last_read: Mutex<HashMap<Handle, u64>>,
}

impl LocalCache {
    pub fn new(meta: Arc<dyn MetadataStore>, parts: PartStore, budget: u64) -> Self {
        LocalCache {
            meta,
            parts,
            budget,
            last_read: Mutex::new(HashMap::new()),
        }
    }

    pub fn touch(&self, handle: &Handle) {
        self.last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.clone(), now_ms());
    }

    /// Evicts least-recently-read local copies of stored files until the cache
    /// fits its budget. Returns how many were evicted.
    pub async fn evict(&self) -> Result<usize, ApiError> {
        if self.budget == 0 {
            return Ok(0);
        }
        let mut cached: Vec<_> = self
            .meta
            .files()?
            .into_iter()
            .filter(|f| {
                f.status == FileStatus::Stored
                    && f.evicted_at_ms.is_none()
                    && !f.segments.is_empty()
            })
            .collect();
        let mut total: u64 = cached.iter().map(|f| f.size).sum();
        if total <= self.budget {
            return Ok(0);
        }
        {
            let last_read = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
            // Never read: as old as the moment it was stored.
            cached.sort_by_key(|f| {
                last_read
                    .get(&f.handle)
                    .copied()
                    .unwrap_or(f.stored_at_ms.unwrap_or(0))
            });
        }
        let mut evicted = 0;
        for mut file in cached {
            if total <= self.budget {
                break;
            }
            // Segments of a tus final upload live in its partial uploads' directories.
            let uploads: std::collections::BTreeSet<String> = file
                .segments
                .iter()
                .filter_map(|s| s.file.split('/').next().map(str::to_owned))
                .collect();
            file.evicted_at_ms = Some(now_ms());
            self.meta.put_file(&file, JobChange::Keep)?;
            self.meta.flush().await?;
            for upload in uploads {
                if let Ok(id) = cin_domain::UploadId::parse(&upload) {
                    self.parts.remove_upload(&id).await?;
                }
            }
            total = total.saturating_sub(file.size);
            evicted += 1;
            metrics::counter!(names::CACHE_EVICTIONS).increment(1);
            tracing::info!(handle = %file.handle, bytes = file.size, "evicted local copy; final storage serves it");
        }
        Ok(evicted)
    }
}
