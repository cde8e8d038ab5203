//! Reconciling the bytes on disk with the records, at start. A crash between a
//! record's flush and the removal of bytes it no longer needs (eviction, expiry,
//! termination), or between an append to the small-file log and the record of
//! it, leaves bytes no record owns; this collects them. It also finds records
//! whose local bytes are gone (a disk fault, an operator's mistake) and marks
//! them, so the filelink never serves a truncated copy as if it were whole.
//!
//! Which bytes a record references:
//! - an upload in progress: its whole upload directory, and the ranges of the
//!   small-file log its parts went to whole;
//! - a file with a local copy ([`FileRecord::has_local_copy`]): every segment
//!   it names, in upload directories (its own, or a tus final upload's partial
//!   uploads') and in the small-file log.
//!
//! Runs once, after the stores open and before the first request or background
//! task: nothing else writes records or bytes meanwhile.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cin_domain::{FileRecord, FileStatus, Handle, RangeSet};
use cin_storage::orphans::{self, Collected, References};
use cin_storage::{JobChange, MetadataStore, PartStore, SegmentLog, SegmentOwner, StorageError};

use crate::config::{Config, ProfileKind};
use crate::observability::names;

/// What reconciliation found and did.
#[derive(Clone, Debug, Default)]
pub struct Reconciled {
    pub collected: Collected,
    /// Files with a local copy whose bytes are not all on disk (for an upload in
    /// progress: whose acknowledged ranges were forgotten).
    pub missing_local_bytes: u64,
}

/// Collects what no record references, marks records whose bytes are missing,
/// logs a summary and counts it in the metrics.
pub async fn reconcile(
    meta: &dyn MetadataStore,
    parts: &PartStore,
    small_files: &SegmentLog,
    config: &Config,
) -> Result<Reconciled, StorageError> {
    let mut references = References::default();
    let mut missing_local_bytes = 0;
    let mut changed = false;
    // Ranges of the small-file log records own, for the log to free files by.
    let mut owned_in_log = Vec::new();
    let files = meta.files()?;
    let handles: BTreeSet<Handle> = files.iter().map(|f| f.handle.clone()).collect();
    for mut file in files {
        if file.referenced_by.iter().any(|h| !handles.contains(h)) {
            // A crash came between adding the reference and writing the final.
            file.referenced_by.retain(|h| handles.contains(h));
            if file.referenced_by.is_empty() && file.status == FileStatus::Deleted {
                tracing::info!(handle = %file.handle, "forgetting a terminated partial upload no final upload needs");
                meta.delete_file(&file)?;
                changed = true;
                continue;
            }
            meta.put_file(&file, JobChange::Keep)?;
            changed = true;
        }
        if file.status == FileStatus::Uploading {
            references.keep_upload(&file.upload_id);
            for (_, part) in meta.parts(&file.upload_id)? {
                if let Some(segment) = &part.in_log {
                    references.keep_segment(segment);
                    owned_in_log.push(segment.clone());
                }
            }
            if forget_missing_ranges(meta, parts, &file).await? {
                missing_local_bytes += 1;
                changed = true;
            }
        }
        if !file.has_local_copy() {
            continue;
        }
        for segment in &file.segments {
            references.keep_segment(segment);
            if PartStore::owner(segment) == SegmentOwner::Log {
                owned_in_log.push(segment.clone());
            }
        }
        if file.status == FileStatus::Uploading {
            continue;
        }
        let missing = first_missing_segment(parts, &file).await;
        if let Some(segment) = &missing {
            missing_local_bytes += 1;
            tracing::warn!(
                handle = %file.handle,
                status = file.status.as_str(),
                segment = %segment,
                "local copy is incomplete: not serving it{}",
                if file.status == FileStatus::Stored { "; final storage serves the file" } else { "" }
            );
        }
        if file.local_bytes_missing != missing.is_some() {
            file.local_bytes_missing = missing.is_some();
            meta.put_file(&file, JobChange::Keep)?;
            changed = true;
        }
    }
    if changed {
        meta.flush().await?;
    }

    let parts = parts.clone();
    let stores = local_store_roots(config);
    let collected = tokio::task::spawn_blocking(move || {
        let mut collected = orphans::collect_part_store(&parts, &references)?;
        for root in stores {
            let temp = orphans::collect_temp_files(&root)?;
            collected.temp_files_removed += temp.temp_files_removed;
            collected.bytes_freed += temp.bytes_freed;
            collected.failures += temp.failures;
        }
        Ok::<_, StorageError>(collected)
    })
    .await
    .map_err(|e| StorageError::io("reconciling the part store", std::io::Error::other(e)))??;
    small_files.adopt(&owned_in_log);

    let reconciled = Reconciled {
        collected,
        missing_local_bytes,
    };
    report(&reconciled);
    Ok(reconciled)
}

/// Forgets the recorded ranges of an upload in progress that its part files no
/// longer hold, so that the client is asked for them again instead of the
/// upload completing over missing bytes. Returns whether any were forgotten.
async fn forget_missing_ranges(
    meta: &dyn MetadataStore,
    parts: &PartStore,
    file: &FileRecord,
) -> Result<bool, StorageError> {
    let mut forgot = false;
    for (number, mut part) in meta.parts(&file.upload_id)? {
        let on_disk = match &part.in_log {
            Some(segment) if parts.has_segments(std::slice::from_ref(segment)).await => segment.len,
            Some(_) => 0,
            None => parts.part_len(&file.upload_id, number).await,
        };
        if part.received.end() <= on_disk {
            continue;
        }
        tracing::warn!(
            handle = %file.handle,
            part = number.get(),
            recorded = part.received.end(),
            on_disk,
            "acknowledged bytes of an upload in progress are missing; the client will be asked for them again"
        );
        let mut kept = RangeSet::new();
        for (start, end) in part.received.intersect(0, on_disk) {
            kept.insert(start, end);
        }
        part.received = kept;
        if part.committed_len.is_some_and(|len| len > on_disk) {
            part.committed_len = None;
            part.etag = None;
        }
        meta.put_part(&file.upload_id, number, &part)?;
        forgot = true;
    }
    Ok(forgot)
}

/// The first segment of a complete file that is absent or shorter than it names.
async fn first_missing_segment(parts: &PartStore, file: &FileRecord) -> Option<String> {
    for segment in &file.segments {
        if !parts.has_segments(std::slice::from_ref(segment)).await {
            return Some(format!(
                "{} [{}, {})",
                segment.file,
                segment.offset,
                segment.offset + segment.len
            ));
        }
    }
    None
}

/// The directories of the local final stores, as `Destinations::open` opens them.
fn local_store_roots(config: &Config) -> BTreeSet<PathBuf> {
    config
        .storage
        .profiles
        .values()
        .filter(|p| p.kind == ProfileKind::Local)
        .map(|p| config.server.data_dir.join(&p.path))
        .collect()
}

fn report(reconciled: &Reconciled) {
    let c = &reconciled.collected;
    for (kind, count) in [
        ("upload_dir", c.upload_dirs_removed),
        ("part_file", c.part_files_removed),
        ("log_file", c.log_files_removed),
        ("log_file_trimmed", c.log_files_trimmed),
        ("temp_file", c.temp_files_removed),
    ] {
        metrics::counter!(names::ORPHANS_REMOVED, "kind" => kind).increment(count);
    }
    metrics::counter!(names::ORPHAN_BYTES_FREED).increment(c.bytes_freed);
    metrics::gauge!(names::FILES_MISSING_LOCAL_BYTES).set(reconciled.missing_local_bytes as f64);
    tracing::info!(
        upload_dirs_removed = c.upload_dirs_removed,
        part_files_removed = c.part_files_removed,
        log_files_removed = c.log_files_removed,
        log_files_trimmed = c.log_files_trimmed,
        temp_files_removed = c.temp_files_removed,
        bytes_freed = c.bytes_freed,
        unknown_entries = c.unknown_entries,
        failures = c.failures,
        files_missing_local_bytes = reconciled.missing_local_bytes,
        "reconciled local bytes with the metadata"
    );
}
