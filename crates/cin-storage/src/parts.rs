//! Local part files. Every chunk is written in place inside its part's file and
//! fsync'd before it is acknowledged; a complete file is a list of segments over
//! these files, read back without any concatenation copy.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use cin_domain::{PartNumber, PartRecord, RangeSet, Segment, UploadId};
use futures_util::{Stream, StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::{BodyError, ChunkError, StorageError};

/// A stream of file bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Bytes gathered from the request body before one trip to the blocking pool.
const WRITE_BATCH: usize = 1 << 20;
const READ_BUFFER: usize = 256 * 1024;

/// The directory of part files: `{root}/{upload_id}/{part:05}`.
#[derive(Clone, Debug)]
pub struct PartStore {
    root: Arc<PathBuf>,
}

/// How long a chunk's body must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkSize {
    /// Exactly this many bytes; a shorter body is a truncated chunk.
    Exact(u64),
    /// Whatever the body holds, up to this many bytes.
    AtMost(u64),
}

impl ChunkSize {
    pub fn limit(self) -> u64 {
        match self {
            ChunkSize::Exact(n) | ChunkSize::AtMost(n) => n,
        }
    }
}

/// A digest computed over a chunk's bytes as they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestKind {
    /// Castagnoli CRC, hardware-accelerated: what the `cin` client declares per chunk.
    Crc32c,
    Md5,
    Sha1,
    Sha256,
}

/// What to do when the request body breaks off before its declared end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBreak {
    /// Nothing of the chunk counts: the client sends it again.
    Refuse,
    /// Keep (fsync) the bytes that arrived; the caller records them.
    KeepPrefix,
}

/// What a successfully written chunk looked like.
#[derive(Clone, Debug)]
pub struct ChunkWritten {
    /// Bytes written and fsync'd.
    pub len: u64,
    /// Raw digests of those bytes, one per kind asked for.
    pub digests: Vec<(DigestKind, Vec<u8>)>,
    /// Set when the body broke off and `OnBreak::KeepPrefix` kept what arrived.
    pub broken_off: Option<BodyError>,
}

impl ChunkWritten {
    /// The raw digest of the given kind, if it was asked for.
    pub fn digest(&self, kind: DigestKind) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| d.as_slice())
    }
}

/// The digest of bytes held in memory, as a body written to a part file gets it.
pub fn digest_of(kind: DigestKind, frames: &[Bytes]) -> Vec<u8> {
    let mut hasher = Hasher::new(kind);
    for frame in frames {
        hasher.update(frame);
    }
    hasher.finish()
}

enum Hasher {
    Crc32c(u32),
    Md5(Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl Hasher {
    fn new(kind: DigestKind) -> Self {
        match kind {
            DigestKind::Crc32c => Hasher::Crc32c(0),
            DigestKind::Md5 => Hasher::Md5(Md5::new()),
            DigestKind::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            DigestKind::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Crc32c(crc) => *crc = crc32c::crc32c_append(*crc, bytes),
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Crc32c(crc) => crc.to_be_bytes().to_vec(),
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

impl PartStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| StorageError::io(format!("creating {}", root.display()), e))?;
        Ok(PartStore {
            root: Arc::new(root),
        })
    }

    /// The segment name of a part, relative to the root.
    pub fn part_file(upload: &UploadId, part: PartNumber) -> String {
        format!("{}/{:05}", upload, part.get())
    }

    /// Where the first `len` bytes of a part lie: its own file, or the range of
    /// the small-file log it went to whole.
    pub fn part_segment(
        upload: &UploadId,
        part: PartNumber,
        record: &PartRecord,
        len: u64,
    ) -> Segment {
        match &record.in_log {
            Some(segment) => Segment {
                len: len.min(segment.len),
                ..segment.clone()
            },
            None => Segment {
                file: Self::part_file(upload, part),
                offset: 0,
                len,
            },
        }
    }

    /// How many bytes a part's file holds on disk (0 when it does not exist).
    pub async fn part_len(&self, upload: &UploadId, part: PartNumber) -> u64 {
        tokio::fs::metadata(self.resolve(&Self::part_file(upload, part)))
            .await
            .map_or(0, |m| m.len())
    }

    fn resolve(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// The directory holding every upload's part files and the small-file log.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the upload's directory exists.
    pub async fn has_upload(&self, upload: &UploadId) -> bool {
        tokio::fs::metadata(self.root.join(upload.as_str()))
            .await
            .is_ok_and(|m| m.is_dir())
    }

    /// Creates the upload's directory durably, so later part files have a home after a crash.
    pub async fn create_upload(&self, upload: &UploadId) -> Result<(), StorageError> {
        let dir = self.root.join(upload.as_str());
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
            sync_dir(&root)
        })
        .await
        .map_err(join_error)?
    }

    /// Removes every part file of an upload.
    pub async fn remove_upload(&self, upload: &UploadId) -> Result<(), StorageError> {
        let dir = self.root.join(upload.as_str());
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(format!("removing {}", dir.display()), e)),
        }
    }

    /// Writes a chunk of `size` bytes at `offset` in a part file and
    /// fsyncs it, with an MD5 of the bytes. Bytes over ranges in `acknowledged` are
    /// compared, never overwritten: a resend of the same bytes succeeds, different
    /// bytes fail with `Conflict`. Returns only once the bytes are durable; the
    /// caller then records the range.
    pub async fn write_chunk<S, E>(
        &self,
        upload: &UploadId,
        part: PartNumber,
        offset: u64,
        size: ChunkSize,
        acknowledged: &RangeSet,
        body: S,
    ) -> Result<ChunkWritten, ChunkError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        self.write(
            upload,
            part,
            offset,
            size,
            acknowledged,
            body,
            &[DigestKind::Md5],
            OnBreak::Refuse,
        )
        .await
    }

    /// [`PartStore::write_chunk`] with chosen digests (none, one, or several
    /// when the one to check is named only after the body) and a choice of what a
    /// body that breaks off leaves behind.
    #[allow(clippy::too_many_arguments)]
    pub async fn write<S, E>(
        &self,
        upload: &UploadId,
        part: PartNumber,
        offset: u64,
        size: ChunkSize,
        acknowledged: &RangeSet,
        body: S,
        digests: &[DigestKind],
        on_break: OnBreak,
    ) -> Result<ChunkWritten, ChunkError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        let path = self.resolve(&Self::part_file(upload, part));
        let expected_len = size.limit();
        let overlap = acknowledged.intersect(offset, offset.saturating_add(expected_len));
        // Until a byte of the part is acknowledged, its file's directory entry may
        // not be durable (an earlier attempt may have created the file and failed),
        // so the first acknowledgment syncs the directory whoever created the file.
        let sync_entry = acknowledged.is_empty();
        let writer = ChunkWriter::open(path, offset, overlap, digests.to_vec(), sync_entry).await?;
        let mut writer = Some(writer);
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batch_len = 0usize;
        let mut received: u64 = 0;
        let mut body = std::pin::pin!(body);
        let mut broken_off = None;
        while let Some(frame) = body.next().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) if on_break == OnBreak::KeepPrefix => {
                    broken_off = Some(e.into());
                    break;
                }
                Err(e) => return Err(ChunkError::Body(e.into())),
            };
            received += frame.len() as u64;
            if received > expected_len {
                return Err(ChunkError::TooLong {
                    expected: expected_len,
                });
            }
            batch_len += frame.len();
            batch.push(frame);
            if batch_len >= WRITE_BATCH {
                writer = Some(run_batch(writer.take(), std::mem::take(&mut batch)).await?);
                batch_len = 0;
            }
        }
        if received < expected_len && matches!(size, ChunkSize::Exact(_)) && broken_off.is_none() {
            return Err(ChunkError::Truncated {
                received,
                expected: expected_len,
            });
        }
        let w = run_batch(writer.take(), batch).await?;
        let mut written = tokio::task::spawn_blocking(move || w.finish())
            .await
            .map_err(join_error)??;
        written.broken_off = broken_off;
        Ok(written)
    }

    /// Streams bytes `[start, end)` of the file made of `segments`.
    pub fn read_range(&self, segments: &[Segment], start: u64, end: u64) -> ByteStream {
        let pieces = slice_segments(segments, start, end)
            .into_iter()
            .map(|piece| (self.resolve(&piece.file), piece.offset, piece.len))
            .collect::<Vec<_>>();
        let stream = futures_util::stream::iter(pieces)
            .then(|(path, at, len)| async move {
                let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
                })?;
                file.seek(io::SeekFrom::Start(at)).await?;
                Ok::<_, io::Error>(ReaderStream::with_capacity(file.take(len), READ_BUFFER))
            })
            .try_flatten();
        Box::pin(stream)
    }

    /// Which bytes a segment lies in, so the caller can tell whose they are.
    pub fn owner(segment: &Segment) -> SegmentOwner {
        let dir = segment.file.split('/').next().unwrap_or_default();
        if dir == crate::segment_log::LOG_DIR {
            return SegmentOwner::Log;
        }
        match UploadId::parse(dir) {
            Ok(upload) => SegmentOwner::Upload(upload),
            Err(_) => SegmentOwner::Unknown,
        }
    }

    /// True when every segment's file is present with at least the bytes it names.
    pub async fn has_segments(&self, segments: &[Segment]) -> bool {
        for seg in segments {
            match tokio::fs::metadata(self.resolve(&seg.file)).await {
                Ok(m) if m.len() >= seg.offset + seg.len => {}
                _ => return false,
            }
        }
        true
    }
}

/// Where a segment's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentOwner {
    /// A range of the shared small-file log.
    Log,
    /// A part file in this upload's directory.
    Upload(UploadId),
    /// A name this POP did not write.
    Unknown,
}

/// A complete local file: its segments in the part store.
#[derive(Clone, Debug)]
pub struct LocalObject {
    pub parts: PartStore,
    pub segments: Vec<Segment>,
    pub size: u64,
}

impl LocalObject {
    pub fn read_range(&self, start: u64, end: u64) -> ByteStream {
        self.parts.read_range(&self.segments, start, end)
    }

    pub fn read_all(&self) -> ByteStream {
        self.read_range(0, self.size)
    }

    /// A blocking reader over the whole file, for copies on the blocking pool.
    pub fn reader(&self) -> SegmentReader {
        self.range_reader(0, self.size)
    }

    /// A blocking reader over bytes `[start, end)` of the file.
    pub fn range_reader(&self, start: u64, end: u64) -> SegmentReader {
        SegmentReader {
            root: self.parts.root.clone(),
            segments: slice_segments(&self.segments, start, end).into(),
            current: None,
        }
    }
}

/// The pieces of `segments` that hold bytes `[start, end)` of the file they make up.
fn slice_segments(segments: &[Segment], start: u64, end: u64) -> Vec<Segment> {
    let mut pieces = Vec::new();
    let mut file_pos = 0u64;
    for seg in segments {
        let (seg_start, seg_end) = (file_pos, file_pos + seg.len);
        file_pos = seg_end;
        let (s, e) = (start.max(seg_start), end.min(seg_end));
        if s < e {
            pieces.push(Segment {
                file: seg.file.clone(),
                offset: seg.offset + (s - seg_start),
                len: e - s,
            });
        }
    }
    pieces
}

/// Reads a complete file's segments one after the other (blocking I/O).
pub struct SegmentReader {
    root: Arc<PathBuf>,
    segments: std::collections::VecDeque<Segment>,
    current: Option<io::Take<File>>,
}

impl io::Read for SegmentReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Seek;
        loop {
            if let Some(current) = &mut self.current {
                let n = current.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                self.current = None;
            }
            let Some(segment) = self.segments.pop_front() else {
                return Ok(0);
            };
            let path = self.root.join(&segment.file);
            let mut file = File::open(&path).map_err(|e| {
                io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
            })?;
            file.seek(io::SeekFrom::Start(segment.offset))?;
            self.current = Some(io::Read::take(file, segment.len));
        }
    }
}

/// The blocking half of a chunk write: owns the file and the running digests.
struct ChunkWriter {
    file: File,
    path: PathBuf,
    /// Sync the parent directory with the data: the file's entry may not be durable yet.
    sync_entry: bool,
    pos: u64,
    /// Acknowledged ranges inside this chunk, compared instead of written.
    overlap: Vec<(u64, u64)>,
    hashers: Vec<(DigestKind, Hasher)>,
    len: u64,
}

impl ChunkWriter {
    async fn open(
        path: PathBuf,
        offset: u64,
        overlap: Vec<(u64, u64)>,
        digests: Vec<DigestKind>,
        sync_entry: bool,
    ) -> Result<Self, ChunkError> {
        tokio::task::spawn_blocking(move || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
            Ok(ChunkWriter {
                file,
                path,
                sync_entry,
                pos: offset,
                overlap,
                hashers: digests.into_iter().map(|k| (k, Hasher::new(k))).collect(),
                len: 0,
            })
        })
        .await
        .map_err(join_error)?
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), ChunkError> {
        for (_, hasher) in &mut self.hashers {
            hasher.update(buf);
        }
        let start = self.pos;
        let end = start + buf.len() as u64;
        let mut cursor = start;
        // Walk the acknowledged ranges inside [start, end): compare those, write the gaps.
        for &(a, b) in &self.overlap {
            let (a, b) = (a.max(start), b.min(end));
            if a >= b {
                continue;
            }
            if cursor < a {
                self.write_at(
                    &buf[(cursor - start) as usize..(a - start) as usize],
                    cursor,
                )?;
            }
            self.compare_at(&buf[(a - start) as usize..(b - start) as usize], a)?;
            cursor = b;
        }
        if cursor < end {
            self.write_at(&buf[(cursor - start) as usize..], cursor)?;
        }
        self.pos = end;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Starts writing bytes `[from, pos)` to disk without waiting, so the fsync at
    /// the end of the chunk finds most of them written (as a streaming write
    /// does, where the kernel writes back while the bytes keep coming).
    fn start_writeback(&self, from: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(self.pos - from)) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments. A failure
        // changes nothing: the fsync at the end of the chunk still covers every byte.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn write_at(&self, buf: &[u8], at: u64) -> Result<(), ChunkError> {
        self.file
            .write_all_at(buf, at)
            .map_err(|e| StorageError::io(format!("writing {}", self.path.display()), e).into())
    }

    fn compare_at(&self, buf: &[u8], at: u64) -> Result<(), ChunkError> {
        let mut existing = vec![0u8; buf.len()];
        self.file
            .read_exact_at(&mut existing, at)
            .map_err(|e| StorageError::io(format!("reading {}", self.path.display()), e))?;
        match existing.iter().zip(buf).position(|(x, y)| x != y) {
            Some(i) => Err(ChunkError::Conflict {
                offset: at + i as u64,
            }),
            None => Ok(()),
        }
    }

    fn finish(self) -> Result<ChunkWritten, ChunkError> {
        self.file
            .sync_data()
            .map_err(|e| StorageError::io(format!("syncing {}", self.path.display()), e))?;
        if self.sync_entry {
            if let Some(dir) = self.path.parent() {
                sync_dir(dir)?;
            }
        }
        Ok(ChunkWritten {
            len: self.len,
            digests: self
                .hashers
                .into_iter()
                .map(|(k, h)| (k, h.finish()))
                .collect(),
            broken_off: None,
        })
    }
}

async fn run_batch(
    writer: Option<ChunkWriter>,
    batch: Vec<Bytes>,
) -> Result<ChunkWriter, ChunkError> {
    let mut w = writer.ok_or_else(|| {
        StorageError::io(
            "writing a chunk",
            io::Error::other("the chunk writer was lost after an earlier failure"),
        )
    })?;
    if batch.is_empty() {
        return Ok(w);
    }
    tokio::task::spawn_blocking(move || {
        let from = w.pos;
        for frame in &batch {
            w.write(frame)?;
        }
        w.start_writeback(from);
        Ok(w)
    })
    .await
    .map_err(join_error)?
}

/// Makes a directory entry (a new file, a rename) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("syncing directory {}", dir.display()), e))
}

pub(crate) fn join_error(e: tokio::task::JoinError) -> StorageError {
    StorageError::io("background I/O task", io::Error::other(e.to_string()))
}

impl From<tokio::task::JoinError> for ChunkError {
    fn from(e: tokio::task::JoinError) -> Self {
        ChunkError::Storage(join_error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: Vec<&'static [u8]>) -> impl Stream<Item = Result<Bytes, BodyError>> + Send {
        futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from_static(c))))
    }

    async fn collect(s: ByteStream) -> Vec<u8> {
        s.try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn chunks_land_at_offsets_and_read_back_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let store = PartStore::open(dir.path()).unwrap();
        let up = UploadId::generate();
        store.create_upload(&up).await.unwrap();
        let p1 = PartNumber::new(1).unwrap();
        let p2 = PartNumber::new(2).unwrap();
        let none = RangeSet::new();
        store
            .write_chunk(&up, p1, 3, ChunkSize::Exact(3), &none, body(vec![b"def"]))
            .await
            .unwrap();
        store
            .write_chunk(
                &up,
                p1,
                0,
                ChunkSize::Exact(3),
                &none,
                body(vec![b"a", b"bc"]),
            )
            .await
            .unwrap();
        store
            .write_chunk(&up, p2, 0, ChunkSize::Exact(2), &none, body(vec![b"gh"]))
            .await
            .unwrap();
        let segments = vec![
            Segment {
                file: PartStore::part_file(&up, p1),
                offset: 0,
                len: 6,
            },
            Segment {
                file: PartStore::part_file(&up, p2),
                offset: 0,
                len: 2,
            },
        ];
        assert_eq!(
            collect(store.read_range(&segments, 0, 8)).await,
            b"abcdefgh"
        );
        assert_eq!(collect(store.read_range(&segments, 4, 7)).await, b"efg");

        // The blocking reader sees the same bytes, from offsets inside files too.
        let object = LocalObject {
            parts: store.clone(),
            segments: vec![
                Segment {
                    offset: 2,
                    len: 3,
                    ..segments[0].clone()
                },
                segments[1].clone(),
            ],
            size: 5,
        };
        let mut read = Vec::new();
        io::Read::read_to_end(&mut object.reader(), &mut read).unwrap();
        assert_eq!(read, b"cdegh");
    }

    #[tokio::test]
    async fn resends_compare_instead_of_overwriting() {
        let dir = tempfile::tempdir().unwrap();
        let store = PartStore::open(dir.path()).unwrap();
        let up = UploadId::generate();
        store.create_upload(&up).await.unwrap();
        let p1 = PartNumber::new(1).unwrap();
        store
            .write_chunk(
                &up,
                p1,
                0,
                ChunkSize::Exact(4),
                &RangeSet::new(),
                body(vec![b"abcd"]),
            )
            .await
            .unwrap();
        let mut acked = RangeSet::new();
        acked.insert(0, 4);
        store
            .write_chunk(&up, p1, 0, ChunkSize::Exact(4), &acked, body(vec![b"abcd"]))
            .await
            .unwrap();
        let err = store
            .write_chunk(&up, p1, 2, ChunkSize::Exact(4), &acked, body(vec![b"cXef"]))
            .await
            .unwrap_err();
        assert!(matches!(err, ChunkError::Conflict { offset: 3 }), "{err}");
        let seg = vec![Segment {
            file: PartStore::part_file(&up, p1),
            offset: 0,
            len: 4,
        }];
        assert_eq!(collect(store.read_range(&seg, 0, 4)).await, b"abcd");
    }

    #[tokio::test]
    async fn short_and_long_bodies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = PartStore::open(dir.path()).unwrap();
        let up = UploadId::generate();
        store.create_upload(&up).await.unwrap();
        let p1 = PartNumber::new(1).unwrap();
        let none = RangeSet::new();
        let short = store
            .write_chunk(&up, p1, 0, ChunkSize::Exact(5), &none, body(vec![b"abc"]))
            .await;
        assert!(matches!(
            short,
            Err(ChunkError::Truncated {
                received: 3,
                expected: 5
            })
        ));
        let long = store
            .write_chunk(&up, p1, 0, ChunkSize::Exact(2), &none, body(vec![b"abc"]))
            .await;
        assert!(matches!(long, Err(ChunkError::TooLong { expected: 2 })));
    }
}
