//! The small-file log: whole small files are appended to shared log files under
//! the part store (`{root}/log/{seq:010}`) instead of each getting a file of its
//! own. One thread writes every append queued since its last batch and makes the
//! batch durable with a single `fdatasync`; each append is answered only after
//! that. A file in the log is a segment (file, offset, length) like any other.
//!
//! The log knows which ranges of each file are still owned: a released range's
//! blocks are freed at once, and a log file no longer written whose ranges have
//! all been released is removed.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use cin_domain::Segment;

use crate::group_commit::{BatchError, GroupCommit};
use crate::parts::sync_dir;
use crate::StorageError;

/// The directory of log files inside the part store.
pub const LOG_DIR: &str = "log";
/// A log file is closed and a new one started past this size.
const LOG_FILE_MAX: u64 = 256 << 20;

/// Appends in, where each landed out.
pub struct SegmentLog {
    commit: GroupCommit<Vec<Bytes>, Segment>,
    owned: Arc<Mutex<Owned>>,
    dir: PathBuf,
}

/// The ranges still owned in each log file, as (offset, length): an empty
/// file's range may start where the next one does.
#[derive(Default)]
struct Owned {
    /// The file being written (or the next to be created): never removed.
    current: u64,
    by_file: HashMap<u64, BTreeSet<(u64, u64)>>,
}

fn lock(owned: &Mutex<Owned>) -> MutexGuard<'_, Owned> {
    owned.lock().unwrap_or_else(|p| p.into_inner())
}

impl SegmentLog {
    /// Opens the log under a part store's root. Every start writes to a new log
    /// file (created at its first append), so bytes torn off by a crash are never
    /// followed by new ones.
    pub fn open(parts_root: &Path) -> Result<Self, StorageError> {
        Self::open_with_file_limit(parts_root, LOG_FILE_MAX)
    }

    fn open_with_file_limit(parts_root: &Path, max_file: u64) -> Result<Self, StorageError> {
        let owned = Arc::new(Mutex::new(Owned::default()));
        let mut writer = LogWriter::open(parts_root, max_file, owned.clone())?;
        let dir = writer.dir.clone();
        let commit = GroupCommit::start("segment-log", move |batch| writer.write_batch(batch))?;
        Ok(SegmentLog { commit, owned, dir })
    }

    /// Appends a whole file's bytes; returns where they are once they are durable.
    pub async fn append(&self, frames: Vec<Bytes>) -> Result<Segment, StorageError> {
        self.commit.submit(frames).await
    }

    /// Takes note of ranges records owned at start (the files written before
    /// it), so that a file is removed once they are all released.
    pub fn adopt<'a>(&self, segments: impl IntoIterator<Item = &'a Segment>) {
        let mut owned = lock(&self.owned);
        for segment in segments {
            if let Some(seq) = log_seq(segment) {
                owned
                    .by_file
                    .entry(seq)
                    .or_default()
                    .insert((segment.offset, segment.len));
            }
        }
    }

    /// Gives back a range no record needs any more: its blocks are freed, and
    /// its file is removed if nothing else in it is owned and it is no longer
    /// written. Releasing a range twice frees nothing more.
    pub async fn release(&self, segment: &Segment) -> Result<(), StorageError> {
        let Some(seq) = log_seq(segment) else {
            return Ok(());
        };
        let parts_root = self.dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let owned = self.owned.clone();
        let path = self.dir.join(log_file_name(seq));
        let segment = segment.clone();
        tokio::task::spawn_blocking(move || {
            release_log_segment(&parts_root, &segment)?;
            let unowned = {
                let mut owned = lock(&owned);
                let emptied = owned.by_file.get_mut(&seq).is_some_and(|starts| {
                    starts.remove(&(segment.offset, segment.len));
                    starts.is_empty()
                });
                let unowned = emptied && seq != owned.current;
                if unowned {
                    owned.by_file.remove(&seq);
                }
                unowned
            };
            if unowned {
                remove_log_file(&path)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::io("releasing a log range", std::io::Error::other(e)))?
    }
}

/// The sequence number of the log file a segment lies in.
fn log_seq(segment: &Segment) -> Option<u64> {
    segment
        .file
        .strip_prefix(LOG_DIR)?
        .strip_prefix('/')?
        .parse()
        .ok()
}

/// Removes a log file nothing owns; no sync needed: one a crash brings back is
/// collected at the next start.
fn remove_log_file(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io(format!("removing {}", path.display()), e)),
    }
}

/// The writing end, owned by the log thread.
struct LogWriter {
    dir: PathBuf,
    seq: u64,
    /// The current log file; created at its first append.
    file: Option<File>,
    pos: u64,
    max_file: u64,
    owned: Arc<Mutex<Owned>>,
}

impl LogWriter {
    fn open(
        parts_root: &Path,
        max_file: u64,
        owned: Arc<Mutex<Owned>>,
    ) -> Result<Self, StorageError> {
        let dir = parts_root.join(LOG_DIR);
        let existed = dir.exists();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        if !existed {
            sync_dir(parts_root)?;
        }
        let last = std::fs::read_dir(&dir)
            .map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        lock(&owned).current = last + 1;
        Ok(LogWriter {
            dir,
            seq: last + 1,
            file: None,
            pos: 0,
            max_file,
            owned,
        })
    }

    /// Writes every append of a batch, then makes them durable with one `fdatasync`.
    fn write_batch(&mut self, batch: Vec<Vec<Bytes>>) -> Vec<Result<Segment, BatchError>> {
        let written: Vec<_> = batch
            .iter()
            .map(|frames| self.write(frames).map_err(BatchError::from))
            .collect();
        let synced = match &self.file {
            Some(file) => file.sync_data().map_err(|e| {
                BatchError::from(StorageError::io(
                    format!("syncing {}", self.path(self.seq).display()),
                    e,
                ))
            }),
            None => Ok(()),
        };
        written
            .into_iter()
            .map(|result| result.and_then(|segment| synced.clone().map(|()| segment)))
            .collect()
    }

    fn write(&mut self, frames: &[Bytes]) -> Result<Segment, StorageError> {
        let len: u64 = frames.iter().map(|f| f.len() as u64).sum();
        if self.pos > 0 && self.pos + len > self.max_file {
            self.roll()?;
        }
        let file = match &mut self.file {
            Some(file) => file,
            empty => empty.insert(create_log_file(&self.dir, self.seq)?),
        };
        let offset = self.pos;
        let mut at = offset;
        for frame in frames {
            file.write_all_at(frame, at).map_err(|e| {
                StorageError::io(
                    format!(
                        "writing {}",
                        self.dir.join(log_file_name(self.seq)).display()
                    ),
                    e,
                )
            })?;
            at += frame.len() as u64;
        }
        self.pos = at;
        lock(&self.owned)
            .by_file
            .entry(self.seq)
            .or_default()
            .insert((offset, len));
        Ok(Segment {
            file: format!("{LOG_DIR}/{}", log_file_name(self.seq)),
            offset,
            len,
        })
    }

    /// Makes the current file durable; the next append starts a new one.
    fn roll(&mut self) -> Result<(), StorageError> {
        if let Some(file) = self.file.take() {
            file.sync_data().map_err(|e| {
                StorageError::io(format!("syncing {}", self.path(self.seq).display()), e)
            })?;
        }
        let closed = self.seq;
        self.seq += 1;
        self.pos = 0;
        let unowned = {
            let mut owned = lock(&self.owned);
            owned.current = self.seq;
            let unowned = owned.by_file.get(&closed).is_none_or(BTreeSet::is_empty);
            if unowned {
                owned.by_file.remove(&closed);
            }
            unowned
        };
        // Every range of it was released while it was written.
        if unowned {
            remove_log_file(&self.path(closed))?;
        }
        Ok(())
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(log_file_name(seq))
    }
}

fn log_file_name(seq: u64) -> String {
    format!("{seq:010}")
}

/// Creates a log file and makes its directory entry durable.
fn create_log_file(dir: &Path, seq: u64) -> Result<File, StorageError> {
    let path = dir.join(log_file_name(seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| StorageError::io(format!("creating {}", path.display()), e))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Frees the disk blocks of a segment in a log file: a hole, so the file keeps
/// its length and other segments their offsets.
pub fn release_log_segment(parts_root: &Path, segment: &Segment) -> Result<(), StorageError> {
    let path = parts_root.join(&segment.file);
    let file = match OpenOptions::new().write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io(format!("opening {}", path.display()), e)),
    };
    punch_hole(&file, segment.offset, segment.len)
        .map_err(|e| StorageError::io(format!("freeing bytes of {}", path.display()), e))?;
    Ok(())
}

pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // An empty range (an empty file's segment) frees nothing; fallocate refuses it.
    if len == 0 {
        return Ok(());
    }
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::other("segment out of range"));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open for writing.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    // A filesystem without hole punching keeps the bytes; eviction still succeeds.
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Ok(());
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PartStore;
    use futures_util::TryStreamExt;
    use std::sync::Arc;

    async fn read(parts: &PartStore, segment: &Segment) -> Vec<u8> {
        parts
            .read_range(std::slice::from_ref(segment), 0, segment.len)
            .try_fold(Vec::new(), |mut acc, b| async move {
                acc.extend_from_slice(&b);
                Ok(acc)
            })
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_read_back_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let parts = PartStore::open(dir.path()).unwrap();
        let log = Arc::new(SegmentLog::open(dir.path()).unwrap());
        let appends: Vec<_> = (0..100u32)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    let body = format!("file number {i} ").repeat(i as usize + 1);
                    let half = body.len() / 2;
                    let frames = vec![
                        Bytes::copy_from_slice(&body.as_bytes()[..half]),
                        Bytes::copy_from_slice(&body.as_bytes()[half..]),
                    ];
                    (body, log.append(frames).await.unwrap())
                })
            })
            .collect();
        let mut written = Vec::new();
        for append in appends {
            written.push(append.await.unwrap());
        }
        for (body, segment) in &written {
            assert_eq!(read(&parts, segment).await, body.as_bytes());
        }
        drop(log);

        // A restart writes to a new file and leaves the old segments intact.
        let log = SegmentLog::open(dir.path()).unwrap();
        let after = log
            .append(vec![Bytes::from_static(b"later")])
            .await
            .unwrap();
        assert_ne!(after.file, written[0].1.file);
        assert_eq!(read(&parts, &after).await, b"later");
        for (body, segment) in &written {
            assert_eq!(read(&parts, segment).await, body.as_bytes());
        }
    }

    #[test]
    fn digests_of_frames_are_those_of_their_bytes() {
        let frames = [Bytes::from_static(b"1234"), Bytes::from_static(b"56789")];
        let hex = |kind| hex::encode(crate::parts::digest_of(kind, &frames));
        assert_eq!(hex(crate::DigestKind::Crc32c), "e3069283");
        assert_eq!(
            hex(crate::DigestKind::Md5),
            "25f9e794323b453885f5181f1b624d0b"
        );
        assert_eq!(
            hex(crate::DigestKind::Sha1),
            "f7c3bc1d808e04732adf679965ccc34ca7ae3441"
        );
        assert_eq!(
            hex(crate::DigestKind::Sha256),
            "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225"
        );
    }

    #[tokio::test]
    async fn a_full_log_file_is_closed_and_the_next_append_starts_another() {
        let dir = tempfile::tempdir().unwrap();
        let parts = PartStore::open(dir.path()).unwrap();
        let log = SegmentLog::open_with_file_limit(dir.path(), 10).unwrap();
        let mut segments = Vec::new();
        for body in [
            &b"abcdef"[..],
            b"ghijkl",
            b"mn",
            b"a body longer than the limit",
        ] {
            let segment = log
                .append(vec![Bytes::copy_from_slice(body)])
                .await
                .unwrap();
            assert_eq!(read(&parts, &segment).await, body);
            segments.push(segment);
        }
        let files: Vec<&str> = segments.iter().map(|s| s.file.as_str()).collect();
        assert_ne!(files[0], files[1], "6 + 6 bytes overflow a 10-byte file");
        assert_eq!(files[1], files[2], "a file takes appends up to its limit");
        assert_ne!(files[2], files[3]);
        let offsets: Vec<u64> = segments.iter().map(|s| s.offset).collect();
        assert_eq!(offsets, [0, 0, 6, 0]);
    }

    #[tokio::test]
    async fn a_log_file_no_longer_written_goes_once_its_last_range_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let parts = PartStore::open(dir.path()).unwrap();
        let log = SegmentLog::open_with_file_limit(dir.path(), 10).unwrap();
        let exists = |segment: &Segment| dir.path().join(&segment.file).exists();
        let append = |body: &'static [u8]| log.append(vec![Bytes::from_static(body)]);

        let first = append(b"abcdef").await.unwrap();
        let empty = append(b"").await.unwrap();
        let second = append(b"ghij").await.unwrap();
        assert_eq!(first.file, second.file);
        assert_eq!(
            (empty.offset, second.offset),
            (6, 6),
            "an empty range shares its start"
        );
        let third = append(b"klmnop").await.unwrap();
        assert_ne!(third.file, first.file, "the first file is full and closed");

        log.release(&first).await.unwrap();
        log.release(&empty).await.unwrap();
        log.release(&empty).await.unwrap();
        assert!(exists(&first), "a range in it is still owned");
        assert_eq!(read(&parts, &second).await, b"ghij");
        log.release(&second).await.unwrap();
        assert!(!exists(&first), "nothing in it is owned and it is closed");

        // The file being written stays however little of it is owned; once
        // closed with nothing owned, it goes.
        log.release(&third).await.unwrap();
        assert!(exists(&third));
        let fourth = append(b"qrstuvwxy").await.unwrap();
        assert!(!exists(&third));
        assert_eq!(read(&parts, &fourth).await, b"qrstuvwxy");
        drop(log);

        // After a restart, ranges records still own are adopted; the old file
        // goes when the last of them is released.
        let log = SegmentLog::open_with_file_limit(dir.path(), 10).unwrap();
        log.adopt([&fourth]);
        let fifth = log.append(vec![Bytes::from_static(b"z")]).await.unwrap();
        assert_ne!(fifth.file, fourth.file);
        assert!(exists(&fourth));
        log.release(&fourth).await.unwrap();
        assert!(!exists(&fourth));
        assert_eq!(read(&parts, &fifth).await, b"z");
    }

    #[tokio::test]
    async fn released_segments_free_their_bytes_and_spare_their_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let parts = PartStore::open(dir.path()).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let big = vec![7u8; 1 << 20];
        let first = log.append(vec![Bytes::from(big.clone())]).await.unwrap();
        let second = log
            .append(vec![Bytes::from_static(b"neighbour")])
            .await
            .unwrap();
        let allocated = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.path().join(&first.file))
                .unwrap()
                .blocks()
                * 512
        };
        assert!(allocated() >= 1 << 20);
        release_log_segment(dir.path(), &first).unwrap();
        assert!(
            allocated() < 1 << 20,
            "{} bytes still allocated",
            allocated()
        );
        assert_eq!(read(&parts, &second).await, b"neighbour");
        // The hole reads back as zeros.
        assert_eq!(read(&parts, &first).await, vec![0u8; 1 << 20]);
    }
}
