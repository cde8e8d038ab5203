//! Collecting bytes no record owns: upload directories and part files that no
//! record needs, small-file log files none of whose ranges is referenced (and,
//! in log files still in use, the ranges between and after the referenced ones),
//! and the temporary files a crash left in a local final store.
//!
//! The caller knows the records and says what is referenced ([`References`]);
//! this module only lists and removes. It runs at start, before the first
//! request: nothing is written meanwhile, and the small-file log writes each
//! start to a new file created at its first append, so no file listed here is in
//! use. Removals need no sync: one a crash undoes is found again at the next start.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use cin_domain::{Segment, UploadId};

use crate::final_store::LocalDirStore;
use crate::parts::{PartStore, SegmentOwner};
use crate::segment_log::{punch_hole, LOG_DIR};
use crate::StorageError;

/// What records reference in the part store.
#[derive(Debug, Default)]
pub struct References {
    /// Upload directories kept whole, whatever they hold: uploads in progress.
    uploads: BTreeSet<String>,
    /// Part files named by a segment, relative to the part store root.
    part_files: BTreeSet<String>,
    /// Referenced byte ranges `[start, end)` of each log file, by file name.
    log_ranges: BTreeMap<String, Vec<(u64, u64)>>,
}

impl References {
    /// Keeps an upload's directory and every file in it.
    pub fn keep_upload(&mut self, upload: &UploadId) {
        self.uploads.insert(upload.as_str().to_owned());
    }

    /// Keeps the bytes a segment names.
    pub fn keep_segment(&mut self, segment: &Segment) {
        match PartStore::owner(segment) {
            SegmentOwner::Log => {
                let name = segment
                    .file
                    .strip_prefix(LOG_DIR)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .unwrap_or_default();
                let end = segment.offset.saturating_add(segment.len);
                self.log_ranges
                    .entry(name.to_owned())
                    .or_default()
                    .push((segment.offset, end));
            }
            SegmentOwner::Upload(_) => {
                self.part_files.insert(segment.file.clone());
            }
            // Nothing this module collects has such a name.
            SegmentOwner::Unknown => {}
        }
    }
}

/// What a collection removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub upload_dirs_removed: u64,
    /// Part files removed from directories kept for their other files.
    pub part_files_removed: u64,
    /// Log files removed; the newest is emptied instead, so its name is never
    /// given to a later file while old records may still name it.
    pub log_files_removed: u64,
    /// Log files still referenced that gave back the blocks of unreferenced ranges.
    pub log_files_trimmed: u64,
    pub temp_files_removed: u64,
    /// Disk space given back: allocated blocks, not apparent sizes.
    pub bytes_freed: u64,
    /// Entries this POP did not write, left alone.
    pub unknown_entries: u64,
    /// Orphans that could not be removed (each logged); tried again at the next start.
    pub failures: u64,
}

impl Collected {
    fn add(&mut self, other: &Collected) {
        self.upload_dirs_removed += other.upload_dirs_removed;
        self.part_files_removed += other.part_files_removed;
        self.log_files_removed += other.log_files_removed;
        self.log_files_trimmed += other.log_files_trimmed;
        self.temp_files_removed += other.temp_files_removed;
        self.bytes_freed += other.bytes_freed;
        self.unknown_entries += other.unknown_entries;
        self.failures += other.failures;
    }

    /// Counts a failed removal; a leftover is no reason to refuse to start.
    fn failed(&mut self, what: &Path, error: &io::Error) {
        tracing::warn!(path = %what.display(), %error, "could not remove an orphan; trying again at the next start");
        self.failures += 1;
    }
}

fn allocated(meta: &Metadata) -> u64 {
    meta.blocks() * 512
}

fn list(dir: &Path) -> Result<Vec<fs::DirEntry>, StorageError> {
    let listing = |e| StorageError::io(format!("listing {}", dir.display()), e);
    fs::read_dir(dir)
        .map_err(listing)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(listing)
}

/// Removes from the part store what `references` does not name. Blocking.
pub fn collect_part_store(
    parts: &PartStore,
    references: &References,
) -> Result<Collected, StorageError> {
    let root = parts.root();
    let mut collected = Collected::default();
    for entry in list(root)? {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if name == LOG_DIR && is_dir {
            collected.add(&collect_log(&entry.path(), references)?);
        } else if is_dir && UploadId::parse(&name).is_ok() {
            collected.add(&collect_upload_dir(&entry.path(), &name, references)?);
        } else {
            collected.unknown_entries += 1;
            tracing::warn!(path = %entry.path().display(), "leaving alone an entry of the part store this POP did not write");
        }
    }
    Ok(collected)
}

fn collect_upload_dir(
    dir: &Path,
    upload: &str,
    references: &References,
) -> Result<Collected, StorageError> {
    let mut collected = Collected::default();
    if references.uploads.contains(upload) {
        return Ok(collected);
    }
    let entries = list(dir)?;
    let referenced = |file: &str| references.part_files.contains(&format!("{upload}/{file}"));
    let keeps_some = entries
        .iter()
        .any(|e| referenced(&e.file_name().to_string_lossy()));
    if !keeps_some {
        let bytes: u64 = entries
            .iter()
            .filter_map(|e| e.metadata().ok())
            .map(|m| allocated(&m))
            .sum();
        match fs::remove_dir_all(dir) {
            Ok(()) => {
                collected.upload_dirs_removed += 1;
                collected.bytes_freed += bytes;
            }
            Err(e) => collected.failed(dir, &e),
        }
        return Ok(collected);
    }
    for entry in entries {
        if referenced(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let bytes = entry.metadata().map(|m| allocated(&m)).unwrap_or(0);
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                collected.part_files_removed += 1;
                collected.bytes_freed += bytes;
            }
            Err(e) => collected.failed(&path, &e),
        }
    }
    Ok(collected)
}

/// The sequence number of a log file's name (`{seq:010}`), or None for other names.
fn log_seq(name: &str) -> Option<u64> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

fn collect_log(dir: &Path, references: &References) -> Result<Collected, StorageError> {
    let mut collected = Collected::default();
    let mut files = Vec::new();
    for entry in list(dir)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        match log_seq(&name) {
            Some(seq) if entry.file_type().is_ok_and(|t| t.is_file()) => files.push((seq, name)),
            _ => {
                collected.unknown_entries += 1;
                tracing::warn!(path = %entry.path().display(), "leaving alone an entry of the small-file log this POP did not write");
            }
        }
    }
    let newest = files.iter().map(|(seq, _)| *seq).max();
    for (seq, name) in files {
        let path = dir.join(&name);
        let result = match references.log_ranges.get(&name) {
            None if Some(seq) == newest => empty_log_file(&path).map(|freed| {
                if freed > 0 {
                    collected.log_files_removed += 1;
                    collected.bytes_freed += freed;
                }
            }),
            None => remove_log_file(&path).map(|freed| {
                collected.log_files_removed += 1;
                collected.bytes_freed += freed;
            }),
            Some(ranges) => trim_log_file(&path, ranges).map(|freed| {
                if freed > 0 {
                    collected.log_files_trimmed += 1;
                    collected.bytes_freed += freed;
                }
            }),
        };
        if let Err(e) = result {
            collected.failed(&path, &e);
        }
    }
    Ok(collected)
}

fn remove_log_file(path: &Path) -> io::Result<u64> {
    let bytes = fs::metadata(path).map(|m| allocated(&m))?;
    fs::remove_file(path)?;
    Ok(bytes)
}

/// Empties a log file and keeps its name. Returns the bytes freed.
fn empty_log_file(path: &Path) -> io::Result<u64> {
    let before = fs::metadata(path)?;
    if before.len() == 0 && before.blocks() == 0 {
        return Ok(0);
    }
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(allocated(&before))
}

/// Frees the blocks of a log file outside `ranges`: the tail past the last
/// referenced byte is cut off, the whole blocks between referenced ranges become
/// holes (partial blocks are left as they are: zeroing them would write to disk
/// at every start). Returns the bytes freed.
fn trim_log_file(path: &Path, ranges: &[(u64, u64)]) -> io::Result<u64> {
    let file = OpenOptions::new().write(true).open(path)?;
    let before = file.metadata()?;
    let block = before.blksize().max(512);
    let mut ranges = ranges.to_vec();
    ranges.sort_unstable();
    let mut cursor = 0u64;
    for (start, end) in ranges {
        if start > cursor {
            let hole_start = cursor.div_ceil(block) * block;
            let hole_end = start / block * block;
            if hole_start < hole_end {
                punch_hole(&file, hole_start, hole_end - hole_start)?;
            }
        }
        cursor = cursor.max(end);
    }
    if cursor < before.len() {
        file.set_len(cursor)?;
    }
    let after = file.metadata()?;
    Ok(allocated(&before).saturating_sub(allocated(&after)))
}

/// Removes the temporary files a local final store writes objects through
/// (left by a crash in the middle of a copy), anywhere under its root. Blocking.
pub fn collect_temp_files(store_root: &Path) -> Result<Collected, StorageError> {
    let mut collected = Collected::default();
    if !store_root.exists() {
        return Ok(collected);
    }
    let mut pending = vec![store_root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in list(&dir)? {
            // Symbolic links are not followed: only what the store itself wrote.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file()
                && entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(LocalDirStore::TEMP_FILE_PREFIX)
            {
                let bytes = entry.metadata().map(|m| allocated(&m)).unwrap_or(0);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        collected.temp_files_removed += 1;
                        collected.bytes_freed += bytes;
                    }
                    Err(e) => collected.failed(&path, &e),
                }
            }
        }
    }
    Ok(collected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, len: usize) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = fs::File::create(path).unwrap();
        file.write_all(&vec![0x5a; len]).unwrap();
        file.sync_all().unwrap();
    }

    fn allocated_at(path: &Path) -> u64 {
        allocated(&fs::metadata(path).unwrap())
    }

    fn segment(file: &str, offset: u64, len: u64) -> Segment {
        Segment {
            file: file.into(),
            offset,
            len,
        }
    }

    #[test]
    fn upload_dirs_go_unless_in_progress_or_named_by_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let parts = PartStore::open(dir.path()).unwrap();
        let (active, complete, orphan) = (
            UploadId::generate(),
            UploadId::generate(),
            UploadId::generate(),
        );
        for upload in [&active, &complete, &orphan] {
            write(&dir.path().join(format!("{upload}/00001")), 10_000);
            write(&dir.path().join(format!("{upload}/00002")), 10_000);
        }
        write(&dir.path().join("operator-notes.txt"), 10);
        let mut refs = References::default();
        refs.keep_upload(&active);
        refs.keep_segment(&segment(&format!("{complete}/00001"), 0, 10_000));

        let collected = collect_part_store(&parts, &refs).unwrap();
        assert_eq!(collected.upload_dirs_removed, 1);
        assert_eq!(
            collected.part_files_removed, 1,
            "part 2 of the complete upload"
        );
        assert_eq!(collected.unknown_entries, 1);
        assert!(collected.bytes_freed >= 30_000, "{collected:?}");
        assert!(!dir.path().join(orphan.as_str()).exists());
        assert!(dir.path().join(format!("{active}/00002")).exists());
        assert!(dir.path().join(format!("{complete}/00001")).exists());
        assert!(!dir.path().join(format!("{complete}/00002")).exists());
        assert!(dir.path().join("operator-notes.txt").exists());

        // A second pass finds nothing more.
        let again = collect_part_store(&parts, &refs).unwrap();
        assert_eq!(again.bytes_freed, 0);
        assert_eq!(again.upload_dirs_removed + again.part_files_removed, 0);
    }

    #[test]
    fn log_files_lose_what_no_segment_names_and_the_newest_keeps_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let parts = PartStore::open(dir.path()).unwrap();
        let log = dir.path().join(LOG_DIR);
        const MIB: u64 = 1 << 20;
        write(&log.join("0000000001"), 4 * MIB as usize);
        write(&log.join("0000000002"), MIB as usize);
        write(&log.join("0000000003"), MIB as usize);
        let mut refs = References::default();
        // File 1: two ranges with a 2 MiB gap between, and a 1 MiB tail after them.
        refs.keep_segment(&segment("log/0000000001", 0, 1000));
        refs.keep_segment(&segment("log/0000000001", 2 * MIB + 100, 1000));
        let before = allocated_at(&log.join("0000000001"));

        let collected = collect_part_store(&parts, &refs).unwrap();
        assert!(!log.join("0000000002").exists(), "unreferenced: removed");
        let newest = fs::metadata(log.join("0000000003")).unwrap();
        assert_eq!(
            (newest.len(), newest.blocks()),
            (0, 0),
            "the newest is emptied, not removed"
        );
        assert_eq!(collected.log_files_removed, 2);
        assert_eq!(collected.log_files_trimmed, 1);
        let trimmed = fs::metadata(log.join("0000000001")).unwrap();
        assert_eq!(trimmed.len(), 2 * MIB + 1100, "the tail is cut off");
        assert!(
            allocated(&trimmed) < before - 3 * MIB + 64 * 1024,
            "{} of {before} bytes still allocated",
            allocated(&trimmed)
        );
        // Referenced bytes are untouched.
        let bytes = fs::read(log.join("0000000001")).unwrap();
        assert!(bytes[..1000].iter().all(|&b| b == 0x5a));
        assert!(bytes[2 * MIB as usize + 100..].iter().all(|&b| b == 0x5a));
        assert!(
            collected.bytes_freed >= 5 * MIB - 64 * 1024,
            "{collected:?}"
        );

        let again = collect_part_store(&parts, &refs).unwrap();
        assert_eq!(again, Collected::default(), "nothing left to free");
    }

    #[test]
    fn temp_files_of_a_local_store_go_and_objects_stay() {
        const PREFIX: &str = LocalDirStore::TEMP_FILE_PREFIX;
        let dir = tempfile::tempdir().unwrap();
        let object = dir.path().join("bucket/a/b/obj.bin");
        let tmp = dir
            .path()
            .join(format!("bucket/a/b/{PREFIX}{}", UploadId::generate()));
        let top_tmp = dir
            .path()
            .join(format!("bucket/{PREFIX}{}", UploadId::generate()));
        write(&object, 100);
        write(&tmp, 50_000);
        write(&top_tmp, 10);
        let collected = collect_temp_files(dir.path()).unwrap();
        assert_eq!(collected.temp_files_removed, 2);
        assert!(object.exists() && !tmp.exists() && !top_tmp.exists());
        assert_eq!(
            collect_temp_files(&dir.path().join("missing")).unwrap(),
            Collected::default()
        );
    }
}
