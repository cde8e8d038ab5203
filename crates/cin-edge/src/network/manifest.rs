//! The manifest the replicator stores beside each file it delivers, in the
//! network's default store, at a key any POP derives from the handle alone.
//! With it, a `Stored` file is answered by every POP from final storage
//! without asking its origin, which may be gone for good.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cin_domain::{FileRecord, FileStatus, Handle, UploadId, UploadMode};
use serde::{Deserialize, Serialize};

use crate::destinations::Destinations;
use crate::error::ApiError;
use cin_storage::FinalStoreError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub handle: Handle,
    /// The storage profile, bucket and key of the file's object.
    pub profile: String,
    pub container: String,
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub mimetype: String,
    pub filename: String,
    /// The app the file belongs to: its access rules apply at every POP.
    pub app: Option<String>,
    pub uploaded_ms: u64,
    pub stored_at_ms: u64,
    #[serde(default)]
    pub upload_tags: std::collections::BTreeMap<String, String>,
}

/// Where a handle's manifest is, inside the default store's bucket.
pub fn key(handle: &Handle) -> String {
    format!("cin-manifests/{handle}.json")
}

impl Manifest {
    pub fn of(file: &FileRecord, sha256: &str, stored_at_ms: u64) -> Self {
        Manifest {
            handle: file.handle.clone(),
            profile: file.profile.clone(),
            container: file.container.clone(),
            key: file.key.clone(),
            size: file.size,
            sha256: sha256.to_owned(),
            mimetype: file.mimetype.clone(),
            filename: file.filename.clone(),
            app: file.app.clone(),
            uploaded_ms: file.created_at_ms,
            stored_at_ms,
            upload_tags: file.upload_tags.clone(),
        }
    }

    /// The file as a record of this POP would describe it: `Stored`, with no
    /// local copy, so it is read from final storage.
    pub fn record(&self) -> FileRecord {
        let mut file = FileRecord::new_upload(
            // Never written anywhere: the file has no upload here.
            UploadId::mint(&self.handle.pop()),
            self.size,
            UploadMode::Regular,
            self.uploaded_ms,
        );
        file.handle = self.handle.clone();
        file.status = FileStatus::Stored;
        file.profile = self.profile.clone();
        file.container = self.container.clone();
        file.key = self.key.clone();
        file.sha256 = Some(self.sha256.clone());
        file.mimetype = self.mimetype.clone();
        file.filename = self.filename.clone();
        file.app = self.app.clone();
        file.stored_at_ms = Some(self.stored_at_ms);
        file.upload_tags = self.upload_tags.clone();
        file.evicted_at_ms = Some(self.stored_at_ms);
        file
    }

    /// Stores the manifest in the default store.
    pub async fn store(&self, destinations: &Destinations) -> Result<(), String> {
        let destination = destinations
            .default_destination()
            .ok_or("the default storage profile is not configured")?;
        let body = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        destination
            .store
            .put_bytes(
                &destination.profile.bucket,
                &key(&self.handle),
                Bytes::from(body),
                "application/json",
            )
            .await
            .map_err(|e| format!("storing the manifest of {}: {e}", self.handle))
    }

    /// Removes the handle's manifest from the default store (done if it is not there).
    pub async fn remove(destinations: &Destinations, handle: &Handle) -> Result<(), String> {
        let Some(destination) = destinations.default_destination() else {
            return Ok(());
        };
        match destination
            .store
            .delete(&destination.profile.bucket, &key(handle))
            .await
        {
            Ok(()) | Err(FinalStoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(format!("removing the manifest of {handle}: {e}")),
        }
    }

    /// The handle's manifest in the default store, if it was stored.
    pub async fn find(
        destinations: &Destinations,
        handle: &Handle,
    ) -> Result<Option<Manifest>, ApiError> {
        let Some(destination) = destinations.default_destination() else {
            return Ok(None);
        };
        let stream = match destination
            .store
            .get(&destination.profile.bucket, &key(handle), None)
            .await
        {
            Ok(stream) => stream,
            Err(FinalStoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut body = Vec::new();
        let mut stream = stream;
        while let Some(piece) = futures_util::StreamExt::next(&mut stream).await {
            let piece = piece.map_err(|e| ApiError::Unavailable {
                code: "manifest_unreadable",
                message: format!("reading the manifest of {handle} from final storage failed: {e}"),
            })?;
            body.extend_from_slice(&piece);
            if body.len() > 64 * 1024 {
                break;
            }
        }
        Ok(serde_json::from_slice(&body).ok())
    }
}

/// Manifests already read, so a foreign `Stored` file costs this POP one read
/// of final storage a minute, not one per request; and, for a short while,
/// handles that had none (files in transit at their origin) or whose lookup
/// failed, so their reads go straight to the origin. A manifest changes only
/// by its file's deletion.
#[derive(Default)]
pub struct ManifestCache {
    entries: Mutex<HashMap<Handle, Cached>>,
}

enum Cached {
    Found {
        manifest: Arc<Manifest>,
        since: Instant,
    },
    Missing {
        since: Instant,
    },
    /// Its origin said the file was deleted: reads go to the origin, which
    /// knows, until final storage has surely let go of the manifest too.
    Deleted {
        since: Instant,
    },
}

/// A read waits no longer for final storage to say whether a manifest is
/// there (its client's own retries included): its origin may answer instead.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// Manifests kept at most; past it, one is dropped for each one added.
const CACHED_MANIFESTS: usize = 10_000;
/// How long a manifest read is believed: a file deleted at its origin is gone
/// from every POP within this.
const FOUND_FOR: Duration = Duration::from_secs(60);
/// How long a missing manifest is believed: a file just stored is still served
/// by its origin meanwhile.
const MISSING_FOR: Duration = Duration::from_secs(2);

impl ManifestCache {
    /// The handle's manifest, from memory or from the default store.
    pub async fn find(
        &self,
        destinations: &Destinations,
        handle: &Handle,
    ) -> Result<Option<Arc<Manifest>>, ApiError> {
        match self.entries().get(handle) {
            Some(Cached::Found { manifest, since }) if since.elapsed() < FOUND_FOR => {
                return Ok(Some(manifest.clone()))
            }
            Some(Cached::Missing { since }) if since.elapsed() < MISSING_FOR => return Ok(None),
            Some(Cached::Deleted { since }) if since.elapsed() < FOUND_FOR => return Ok(None),
            _ => {}
        }
        let found = match tokio::time::timeout(LOOKUP_TIMEOUT, Manifest::find(destinations, handle))
            .await
        {
            Ok(found) => found.map(|found| found.map(Arc::new)),
            Err(_) => Err(ApiError::Unavailable {
                code: "manifest_unreadable",
                message: format!(
                    "final storage did not answer for the manifest of {handle} in {} ms",
                    LOOKUP_TIMEOUT.as_millis()
                ),
            }),
        };
        // A store that fails is not asked again by every read meanwhile.
        let entry = match &found {
            Ok(Some(manifest)) => Cached::Found {
                manifest: manifest.clone(),
                since: Instant::now(),
            },
            Ok(None) | Err(_) => Cached::Missing {
                since: Instant::now(),
            },
        };
        let mut entries = self.entries();
        if entries.len() >= CACHED_MANIFESTS && !entries.contains_key(handle) {
            if let Some(victim) = entries.keys().next().cloned() {
                entries.remove(&victim);
            }
        }
        entries.insert(handle.clone(), entry);
        found
    }

    /// The file was deleted at its origin: no manifest of it is believed for a while.
    pub fn deleted(&self, handle: &Handle) {
        self.entries().insert(
            handle.clone(),
            Cached::Deleted {
                since: Instant::now(),
            },
        );
    }

    /// Drops what is known of `handle`, so the next lookup reads final storage.
    pub fn forget(&self, handle: &Handle) {
        self.entries().remove(handle);
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Handle, Cached>> {
        // The map holds no invariant a panic could break.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}
