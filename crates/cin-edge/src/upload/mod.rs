//! The upload engine behind every wire protocol: start an upload, write chunks
//! durably, commit parts, complete the file. Handlers translate requests into these
//! calls; the rules live here.

mod assessment;
pub mod blocks;
mod delete;
mod error;
mod expiry;
mod lifecycle;
mod locks;
pub mod received;
mod reconcile;
mod tus;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use cin_domain::{
    sanitize_filename, FileRecord, FileStatus, Handle, PartNumber, PartRecord, PopId,
    ReplicationJob, Segment, StoreOptions, Transition, UploadId, UploadMode,
};
use cin_storage::{
    BodyError, ByteStream, ChunkError, ChunkSize, DigestKind, JobChange, MetadataStore, OnBreak,
    PartStore, SegmentLog, StorageError,
};
use futures_util::{Stream, StreamExt};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::auth::Apps;
use crate::destinations::Destinations;
use crate::disk::{Charge, Disk};
use crate::events::StatusEvents;
use crate::observability::names;
use crate::webhooks::Webhooks;
use assessment::Assessment;
pub use error::UploadError;
pub use expiry::SweepWorker;
pub use lifecycle::{Lifecycle, UploadGuard};
use locks::{KeyedLocks, Takeover};
pub use received::Prefix;
pub use reconcile::{reconcile, Reconciled};
pub use tus::{
    Appended, BodyChecksum, DeclaredChecksum, TUS_BASE64, TUS_BASE64_PATTERN, TUS_CHECKSUMS,
};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a client declares when it starts an upload.
#[derive(Clone, Debug)]
pub struct NewUpload {
    pub filename: String,
    pub mimetype: Option<String>,
    pub size: u64,
    pub store: StoreOptions,
    pub mode: UploadMode,
    /// The app uploading (from its API key); None on an open POP.
    pub app: Option<String>,
}

/// A chunk as the client sends it.
pub struct IncomingChunk<S> {
    pub upload_id: UploadId,
    pub part: PartNumber,
    /// Offset inside the part (always 0 in regular mode).
    pub offset: u64,
    pub size: u64,
    /// Base64 MD5 the client declared for the bytes.
    pub md5: Option<String>,
    /// Base64 big-endian CRC32C the client declared instead (cheaper to compute
    /// on both ends); when present, no MD5 is computed.
    pub crc32c: Option<String>,
    /// CRC32Cs of the chunk's blocks: when declared, a body that breaks off
    /// keeps the blocks that arrived whole and matched.
    pub blocks: Option<blocks::BlockSums>,
    pub body: S,
}

/// How long a question about a part waits for its writer to finish on its own.
const WRITER_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// A part the client says it uploaded, with the ETag it was given.
#[derive(Clone, Debug)]
pub struct ClaimedPart {
    pub number: PartNumber,
    pub etag: Option<String>,
}

/// What the engine works with; built once and shared with the HTTP layer.
pub struct Services {
    pub meta: Arc<dyn MetadataStore>,
    pub parts: PartStore,
    /// Where whole small files go, many to a shared fsync.
    pub small_files: Arc<SegmentLog>,
    pub destinations: Arc<Destinations>,
    pub disk: Arc<Disk>,
    pub events: Arc<StatusEvents>,
    pub apps: Arc<Apps>,
    pub webhooks: Arc<Webhooks>,
    /// Woken when a file is queued for replication.
    pub replication_wakeup: Arc<Notify>,
    /// This POP: the first characters of every handle and upload id it mints.
    pub pop: PopId,
}

/// The engine's limits, from configuration.
pub struct UploadLimits {
    pub max_file_size: u64,
    /// Unfinished uploads idle this long expire.
    pub expire_after: std::time::Duration,
    /// Longest wait for a part that another request is writing. Its holder
    /// finishes or stalls out within the body idle time, so that bounds it.
    pub lock_wait: std::time::Duration,
    /// Requests that may write bodies at the same time; more get 503.
    pub max_body_writers: usize,
    /// How long a read of a file still uploading waits for new bytes.
    pub play_idle: std::time::Duration,
}

pub struct Uploads {
    services: Arc<Services>,
    lifecycle: Arc<Lifecycle>,
    limits: UploadLimits,
    /// Serialises the bodies written into one part (its record is written under
    /// the upload's lock, taken only briefly).
    part_locks: KeyedLocks<(UploadId, u32)>,
    /// One permit per request writing a body.
    body_writers: Arc<Semaphore>,
    assessment: Assessment,
}

const DEFAULT_MIMETYPE: &str = "application/octet-stream";

/// Whole files of up to this many bytes are held in memory and appended to the
/// small-file log instead of a part file of their own: a body of declared size,
/// a body of unknown size that ends within it, a tus creation that carries the
/// whole file.
const SMALL_FILE_MAX: u64 = 1 << 20;

impl Uploads {
    pub fn new(services: Arc<Services>, lifecycle: Arc<Lifecycle>, limits: UploadLimits) -> Self {
        Uploads {
            services,
            lifecycle,
            body_writers: Arc::new(Semaphore::new(limits.max_body_writers)),
            limits,
            part_locks: KeyedLocks::new(),
            assessment: Assessment::default(),
        }
    }

    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// A place among the requests writing bodies, or 503 when all are taken.
    fn body_writer(&self) -> Result<BodyWriter, UploadError> {
        let permit = self.body_writers.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!(names::REQUESTS_SHED, "reason" => "body_writers").increment(1);
            UploadError::Overloaded {
                message: format!(
                    "this POP is already receiving {} request bodies; send this one again in a moment",
                    self.limits.max_body_writers
                ),
                retry_after_secs: 1,
            }
        })?;
        metrics::gauge!(names::BODIES_RECEIVING).increment(1.0);
        Ok(BodyWriter { _permit: permit })
    }

    /// Takes the lock of the part a body is written into (see [`Takeover`]).
    async fn part_lock(
        &self,
        upload: &UploadId,
        part: PartNumber,
        takeover: Takeover,
    ) -> Result<locks::KeyedGuard<'_, (UploadId, u32)>, UploadError> {
        self.part_locks
            .acquire((upload.clone(), part.get()), takeover, self.limits.lock_wait)
            .await
            .map_err(|_| UploadError::Locked {
                message: format!(
                    "part {part} of upload {upload} is being written by another request; try again in a moment"
                ),
                retry_after_secs: 1,
            })
    }

    fn check_size(&self, size: u64) -> Result<(), UploadError> {
        if size > self.limits.max_file_size {
            return Err(UploadError::TooLarge {
                message: format!(
                    "the file is {size} bytes; this POP accepts files up to {} bytes",
                    self.limits.max_file_size
                ),
            });
        }
        Ok(())
    }

    fn new_record(&self, upload: &NewUpload) -> Result<FileRecord, UploadError> {
        let handle = Handle::mint(&self.services.pop);
        let filename = sanitize_filename(&upload.filename);
        let placement =
            self.services
                .destinations
                .place(&upload.store, handle.as_str(), &filename)?;
        if !self
            .services
            .apps
            .allows_profile(upload.app.as_deref(), &placement.profile)
        {
            return Err(UploadError::forbidden(
                "profile_not_allowed",
                format!(
                    "this app may not deliver to container {:?}; ask the operator to allow storage profile {:?}",
                    placement.container, placement.profile
                ),
            ));
        }
        let upload_app = upload.app.clone();
        let mimetype = upload
            .mimetype
            .clone()
            .filter(|m| !m.trim().is_empty())
            .or_else(|| cin_domain::mimetype_for_filename(&filename).map(str::to_owned))
            .unwrap_or_else(|| DEFAULT_MIMETYPE.to_owned());
        Ok(FileRecord {
            handle,
            filename,
            mimetype,
            store: upload.store.clone(),
            profile: placement.profile,
            container: placement.container,
            key: placement.key,
            app: upload_app,
            ..FileRecord::new_upload(
                UploadId::mint(&self.services.pop),
                upload.size,
                upload.mode,
                now_ms(),
            )
        })
    }

    /// Registers a new upload; its handle and filelink are valid from now on.
    pub async fn start(&self, upload: NewUpload) -> Result<FileRecord, UploadError> {
        self.check_size(upload.size)?;
        let record = self.new_record(&upload)?;
        self.services.disk.admit(&record.upload_id, record.size)?;
        let created = async {
            if defers_dir(&record) {
                // No byte is acknowledged yet and the whole file will most
                // likely come in one request, whose flush makes this record
                // durable with its part: one flush per small file, not two.
                self.services.meta.put_file(&record, JobChange::Keep)?;
                return Ok(());
            }
            self.services.parts.create_upload(&record.upload_id).await?;
            self.services.meta.put_file(&record, JobChange::Keep)?;
            self.services.meta.flush().await?;
            Ok::<_, UploadError>(())
        }
        .await;
        if let Err(e) = created {
            self.services.disk.release(&record.upload_id);
            return Err(e);
        }
        metrics::counter!(names::UPLOADS_STARTED, "mode" => mode_label(record.mode)).increment(1);
        tracing::info!(handle = %record.handle, size = record.size, mode = ?record.mode, "upload started");
        Ok(record)
    }

    pub fn file(&self, handle: &Handle) -> Result<FileRecord, UploadError> {
        let file = self.services.meta.get_file(handle)?.ok_or_else(|| {
            UploadError::not_found("file_not_found", format!("no file has handle {handle}"))
        })?;
        match file.status {
            FileStatus::Expired => Err(UploadError::Gone {
                code: "expired",
                message: format!(
                    "the upload of {handle} was abandoned and has expired; upload the file again"
                ),
            }),
            FileStatus::Deleted => Err(UploadError::Gone {
                code: "deleted",
                message: format!(
                    "file {handle} was deleted by its client (or its upload terminated); it is gone from this POP and final storage"
                ),
            }),
            _ => Ok(file),
        }
    }

    /// The byte ranges of a part that are durable and acknowledged. A client
    /// asks after giving up on a chunk. A request still writing the part gets
    /// a moment to finish on its own (its connection may have closed with
    /// bytes still to read); then, as a tus HEAD does, the question takes the
    /// part over: the writer, most likely waiting on that dead connection,
    /// records the blocks it has and ends first.
    pub async fn part_received(
        &self,
        upload: &UploadId,
        part: PartNumber,
    ) -> Result<Vec<(u64, u64)>, UploadError> {
        self.file_for_upload(upload)?;
        let key = (upload.clone(), part.get());
        let _guard = match self
            .part_locks
            .acquire(key.clone(), Takeover::Never, WRITER_GRACE)
            .await
        {
            Ok(guard) => guard,
            Err(_) => self.part_lock(upload, part, Takeover::Always).await?,
        };
        Ok(self
            .services
            .meta
            .get_part(upload, part)?
            .map(|p| p.received.intersect(0, u64::MAX))
            .unwrap_or_default())
    }

    pub fn file_for_upload(&self, upload: &UploadId) -> Result<FileRecord, UploadError> {
        let handle = self
            .services
            .meta
            .handle_for_upload(upload)?
            .ok_or_else(|| {
                UploadError::not_found(
                    "upload_not_found",
                    format!("no upload has id {upload}; start a new upload with /multipart/start"),
                )
            })?;
        self.file(&handle)
    }

    fn uploading(&self, upload: &UploadId) -> Result<FileRecord, UploadError> {
        let file = self.file_for_upload(upload)?;
        if file.status != FileStatus::Uploading {
            return Err(UploadError::conflict(
                "upload_complete",
                format!(
                    "upload {upload} is already complete; its file is {}",
                    file.handle
                ),
                Some(file.status),
            ));
        }
        Ok(file)
    }

    /// Checks a chunk's position before any of its bytes are read.
    pub fn check_chunk(
        &self,
        upload: &UploadId,
        offset: u64,
        size: u64,
    ) -> Result<FileRecord, UploadError> {
        let file = self.uploading(upload)?;
        let end = offset.checked_add(size);
        if end.is_none_or(|end| end > file.size) {
            return Err(UploadError::invalid(
                "chunk_out_of_range",
                format!(
                    "a chunk of {size} bytes at offset {offset} goes past the declared file size of {} bytes",
                    file.size
                ),
            ));
        }
        Ok(file)
    }

    /// Writes one chunk durably and records it. Returns the chunk's quoted MD5 ETag
    /// only once the bytes are fsync'd and the range is flushed to the metadata store.
    pub async fn write_chunk<S, E>(&self, chunk: IncomingChunk<S>) -> Result<String, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        let file = self.check_chunk(&chunk.upload_id, chunk.offset, chunk.size)?;
        let declared_md5 = declared_digest(chunk.md5.as_deref(), 16, "invalid_md5", "md5")?;
        let declared_crc32c =
            declared_digest(chunk.crc32c.as_deref(), 4, "invalid_crc32c", "crc32c")?;
        // One checksum is computed while writing: the declared CRC32C when there
        // is one, else the MD5 (Filestack clients send it, and it is the ETag).
        // Declared block sums are checked as the bytes pass; once every block
        // matched, the chunk's CRC32C is theirs combined, not computed again.
        let from_blocks = match (&chunk.blocks, &declared_crc32c) {
            (Some(sums), Some(_)) => Some(sums.combined(chunk.size)),
            _ => None,
        };
        let digest = match (&from_blocks, &declared_crc32c) {
            (Some(_), _) => None,
            (None, Some(_)) => Some(DigestKind::Crc32c),
            (None, None) => Some(DigestKind::Md5),
        };

        let _writing = self.body_writer()?;
        // A newer request for the same chunk is a retry: the older one, most
        // likely stalled on a dead connection, gives way to it.
        let guard = self
            .part_lock(
                &chunk.upload_id,
                chunk.part,
                Takeover::SameClaim(chunk.offset),
            )
            .await?;
        let check = blocks::BlockCheck::default();
        let on_break = if chunk.blocks.is_some() {
            OnBreak::KeepPrefix
        } else {
            OnBreak::Refuse
        };
        let body = guard.until_taken_over(Box::pin(chunk.body));
        let body: futures_util::stream::BoxStream<'_, Result<Bytes, BodyError>> = match chunk.blocks
        {
            Some(sums) => Box::pin(blocks::checked(body, sums, chunk.size, check.clone())),
            None => Box::pin(futures_util::TryStreamExt::map_err(body, Into::into)),
        };
        let mut part = self
            .services
            .meta
            .get_part(&chunk.upload_id, chunk.part)?
            .unwrap_or_default();
        let whole_part = file.mode != UploadMode::Intelligent;
        if whole_part {
            if let Some(len) = part.committed_len.filter(|&len| len != chunk.size) {
                return Err(UploadError::conflict(
                    "part_conflict",
                    format!(
                        "part {} was already uploaded with {len} bytes; it cannot be replaced by {} bytes",
                        chunk.part, chunk.size
                    ),
                    None,
                ));
            }
        }
        // Only bytes not acknowledged yet are new; with every other part's they
        // may not pass the declared size.
        let new_bytes = chunk.size - acknowledged_within(&part.received, chunk.offset, chunk.size);
        let mut disk_write = self
            .services
            .disk
            .begin_write(&chunk.upload_id, || self.remaining(&file))?;
        disk_write.claim(new_bytes).map_err(|room| {
            UploadError::invalid(
                "over_declared_size",
                format!(
                    "this chunk brings {new_bytes} new bytes, but only {room} of the declared {} bytes are neither uploaded nor being uploaded; an upload holds no more than its declared size",
                    file.size
                ),
            )
        })?;
        let (mut body, no_room) = self.services.disk.meter(body, Charge::Reserved);
        let receiving = std::time::Instant::now();
        if let Some(logged) = part.in_log.clone() {
            // The part came whole into the log: this is a resend of acknowledged bytes.
            let frames = match self
                .compare_with_log(&logged, chunk.offset, chunk.size, &mut body)
                .await
            {
                Ok(frames) => frames,
                Err(e) => {
                    count_chunk_failure(&e);
                    return Err(e.into());
                }
            };
            disk_write.landed();
            // Without a recorded ETag (intelligent ingestion), the one this
            // chunk gets from the part-file path: its MD5, or its CRC32C.
            let kind = digest.unwrap_or(DigestKind::Crc32c);
            return Ok(part.etag.clone().unwrap_or_else(|| {
                format!(
                    "\"{}\"",
                    hex::encode(cin_storage::parts::digest_of(kind, &frames))
                )
            }));
        }
        // A whole small file in one chunk goes to the small-file log. A body
        // that is not (short, long, broken) fails as it would on the part-file
        // path, or, when its verified blocks count, is replayed into a part file.
        let mut held = Vec::new();
        let mut in_log = None;
        let whole_small_file = chunk.part.get() == 1
            && chunk.offset == 0
            && chunk.size == file.size
            && (1..=SMALL_FILE_MAX).contains(&chunk.size)
            && part.received.is_empty();
        if whole_small_file {
            match read_whole(&mut body, chunk.size).await {
                WholeBody::Whole(frames) => match self.append_small(&file, &frames).await {
                    Some(segment) => in_log = Some((segment, frames)),
                    None => held = frames.into_iter().map(Ok).collect(),
                },
                WholeBody::Other(_) if no_room.hit() => {
                    metrics::counter!(names::CHUNK_FAILURES, "reason" => "no_space").increment(1);
                    return Err(self.services.disk.no_room());
                }
                WholeBody::Other(frames) if on_break == OnBreak::KeepPrefix => held = frames,
                WholeBody::Other(frames) => {
                    let e = unwhole_error(frames, chunk.size);
                    count_chunk_failure(&e);
                    return Err(e.into());
                }
            }
        }
        let written = match in_log {
            Some((segment, frames)) => {
                let written = cin_storage::ChunkWritten {
                    len: segment.len,
                    digests: digest
                        .iter()
                        .map(|&kind| (kind, cin_storage::parts::digest_of(kind, &frames)))
                        .collect(),
                    broken_off: None,
                };
                part.in_log = Some(segment);
                Ok(written)
            }
            None => {
                self.create_deferred_dir(&file).await?;
                self.services
                    .parts
                    .write(
                        &chunk.upload_id,
                        chunk.part,
                        chunk.offset,
                        ChunkSize::Exact(chunk.size),
                        &part.received,
                        futures_util::stream::iter(held).chain(body),
                        digest.as_slice(),
                        on_break,
                    )
                    .await
            }
        };
        let written = match written {
            Ok(cin_storage::ChunkWritten {
                broken_off: Some(broken),
                len,
                ..
            }) => {
                // The prefix that arrived is fsync'd; the blocks of it that
                // matched their sums are acknowledged, so a retry sends the rest.
                let kept = check.verified().min(len);
                if kept > 0 {
                    let kept_new = kept - acknowledged_within(&part.received, chunk.offset, kept);
                    part.received.insert(chunk.offset, chunk.offset + kept);
                    part.touched_at_ms = now_ms();
                    self.record_part(&file.handle, &chunk.upload_id, chunk.part, &part)
                        .await?;
                    self.flush_parts(&chunk.upload_id).await?;
                    disk_write.landed_part(kept_new);
                    metrics::counter!(names::BYTES_RECEIVED).increment(kept);
                }
                if no_room.hit() {
                    return Err(self.services.disk.no_room());
                }
                if broken.says_chunk_too_big() {
                    self.assessment.record_failure(&chunk.upload_id);
                }
                let error = if check.mismatch() {
                    ChunkError::BlockCrc32cMismatch {
                        kept,
                        detail: broken.to_string(),
                    }
                } else {
                    ChunkError::Body(broken)
                };
                count_chunk_failure(&error);
                return Err(error.into());
            }
            Ok(w) => w,
            Err(_) if no_room.hit() => {
                metrics::counter!(names::CHUNK_FAILURES, "reason" => "no_space").increment(1);
                return Err(self.services.disk.no_room());
            }
            Err(e) => {
                let size_related = match &e {
                    ChunkError::Truncated { .. } => true,
                    ChunkError::Body(b) => b.says_chunk_too_big(),
                    _ => false,
                };
                if size_related {
                    self.assessment.record_failure(&chunk.upload_id);
                }
                count_chunk_failure(&e);
                return Err(e.into());
            }
        };
        metrics::counter!(names::BYTES_RECEIVED).increment(written.len);
        self.assessment
            .record_success(&chunk.upload_id, written.len, receiving.elapsed());
        let digest_hex = match from_blocks {
            // The body ended whole, so every block passed its check.
            Some(crc) if check.verified() == chunk.size => hex::encode(crc.to_be_bytes()),
            Some(_) => {
                return Err(UploadError::invalid(
                    "invalid_block_crc32c",
                    "the chunk's blocks were not all checked; send it again",
                ))
            }
            None => hex::encode(digest.and_then(|k| written.digest(k)).unwrap_or_default()),
        };
        let mismatch = match (declared_crc32c, declared_md5) {
            (Some(declared), _) if declared != digest_hex => Some(ChunkError::Crc32cMismatch {
                declared,
                actual: digest_hex.clone(),
            }),
            (None, Some(declared)) if declared != digest_hex => Some(ChunkError::Md5Mismatch {
                declared,
                actual: digest_hex.clone(),
            }),
            _ => None,
        };
        if let Some(mismatch) = mismatch {
            count_chunk_failure(&mismatch);
            if let Some(segment) = &part.in_log {
                // Not acknowledged, so nothing owns it.
                self.services.small_files.release(segment).await?;
            }
            return Err(mismatch.into());
        }
        let etag = format!("\"{digest_hex}\"");
        part.received
            .insert(chunk.offset, chunk.offset + chunk.size);
        part.touched_at_ms = now_ms();
        if whole_part {
            part.committed_len = Some(chunk.size);
            part.etag = Some(etag.clone());
        }
        if let Err(e) = self
            .record_part(&file.handle, &chunk.upload_id, chunk.part, &part)
            .await
        {
            if let Some(segment) = &part.in_log {
                // Appended by this request for an upload that ended meanwhile.
                self.services.small_files.release(segment).await?;
            }
            return Err(e);
        }
        self.flush_parts(&chunk.upload_id).await?;
        disk_write.landed();
        Ok(etag)
    }

    /// Bytes an upload may still write: its declared size less what it holds.
    fn remaining(&self, file: &FileRecord) -> Result<u64, UploadError> {
        let held: u64 = self
            .services
            .meta
            .parts(&file.upload_id)?
            .iter()
            .map(|(_, p)| p.received.total())
            .sum();
        Ok(file.size.saturating_sub(held))
    }

    /// Records a part's bytes if the upload is still taking them (it may have
    /// been completed, expired or terminated while the body streamed). The
    /// caller flushes: the lock covers the check and the write, not the sync.
    async fn record_part(
        &self,
        handle: &Handle,
        upload: &UploadId,
        number: PartNumber,
        part: &PartRecord,
    ) -> Result<(), UploadError> {
        let guard = self.lifecycle.lock(upload).await;
        let file = self.lifecycle.current(&guard, handle)?;
        if file.status != FileStatus::Uploading {
            return Err(not_uploading(upload, file.status));
        }
        self.services.meta.put_part(upload, number, part)?;
        Ok(())
    }

    /// Makes the parts recorded so far durable, then lets readers of the growing
    /// file see them: a reader is never served bytes a crash could take back.
    async fn flush_parts(&self, upload: &UploadId) -> Result<(), UploadError> {
        self.services.meta.flush().await?;
        self.lifecycle.part_recorded(upload);
        Ok(())
    }

    /// Follows what an upload in progress holds from byte 0: its length, and
    /// the prefix's advances as parts are recorded.
    pub fn watch_received(
        &self,
        file: &FileRecord,
    ) -> Result<watch::Receiver<Prefix>, UploadError> {
        self.lifecycle.watch_received(&file.upload_id)
    }

    /// Bytes `[start, end)` of a file still uploading, streamed as they arrive
    /// (see [`received::read_growing`]); `end` None reads to wherever it ends.
    pub fn read_growing(
        &self,
        file: &FileRecord,
        start: u64,
        end: Option<u64>,
    ) -> Result<ByteStream, UploadError> {
        Ok(received::read_growing(
            self.watch_received(file)?,
            self.services.meta.clone(),
            self.services.parts.clone(),
            file.handle.clone(),
            (start, end),
            self.limits.play_idle,
        ))
    }

    /// Every file record (for gauges and sweeps).
    pub fn all_files(&self) -> Result<Vec<FileRecord>, UploadError> {
        Ok(self.services.meta.files()?)
    }

    pub async fn check_metadata_writable(&self) -> Result<(), UploadError> {
        Ok(self.services.meta.check_writable().await?)
    }

    /// Re-reserves disk room for the uploads in progress, after a restart.
    pub fn restore_reservations(&self) -> Result<(), UploadError> {
        for file in self.services.meta.uploading_files()? {
            let remaining = self.remaining(&file)?;
            self.services.disk.restore(&file.upload_id, remaining);
        }
        Ok(())
    }

    /// The chunk size (bytes) this upload's network has been handling well.
    pub fn chunk_size_hint(&self, upload: &UploadId) -> u64 {
        self.assessment.hint(upload)
    }

    /// Intelligent ingestion: declares a part whole. Its chunks must cover it from byte 0 without gaps.
    pub async fn commit_part(
        &self,
        upload: &UploadId,
        part_number: PartNumber,
    ) -> Result<u64, UploadError> {
        let file = self.file_for_upload(upload)?;
        let _guard = self.part_lock(upload, part_number, Takeover::Never).await?;
        let mut part = self
            .services
            .meta
            .get_part(upload, part_number)?
            .ok_or_else(|| {
                UploadError::invalid(
                    "part_missing",
                    format!(
                    "part {part_number} has no bytes yet; upload its chunks before committing it"
                ),
                )
            })?;
        if file.status != FileStatus::Uploading {
            return Ok(part
                .committed_len
                .unwrap_or(part.received.contiguous_prefix()));
        }
        let len = whole_length(&part).ok_or_else(|| {
            UploadError::invalid(
                "part_incomplete",
                format!(
                    "part {part_number} has gaps: only bytes {:?} arrived; send the missing chunks, then commit again",
                    part.received.intersect(0, u64::MAX)
                ),
            )
        })?;
        part.committed_len = Some(len);
        self.record_part(&file.handle, upload, part_number, &part)
            .await?;
        self.flush_parts(upload).await?;
        Ok(len)
    }

    /// Completes an upload: checks every part is there, records the segment list
    /// (no bytes are copied) and queues the file for replication. Idempotent.
    pub async fn complete(
        &self,
        upload: &UploadId,
        claimed: Option<Vec<ClaimedPart>>,
        upload_tags: std::collections::BTreeMap<String, String>,
    ) -> Result<FileRecord, UploadError> {
        let guard = self.lifecycle.lock(upload).await;
        let mut file = self.file_for_upload(upload)?;
        if file.status != FileStatus::Uploading {
            return Ok(file);
        }
        let parts = self.services.meta.parts(upload)?;
        if let Some(claimed) = &claimed {
            check_claimed_parts(claimed, &parts)?;
        }
        let mut segments = Vec::with_capacity(parts.len());
        let mut missing = Vec::new();
        let mut expected_number = 1u32;
        for (number, part) in &parts {
            missing.extend(expected_number..number.get());
            expected_number = number.get() + 1;
            match part.committed_len.or_else(|| whole_length(part)) {
                Some(len) if len > 0 => {
                    segments.push(PartStore::part_segment(upload, *number, part, len))
                }
                _ => missing.push(number.get()),
            }
        }
        if !missing.is_empty() {
            return Err(UploadError::invalid(
                "missing_parts",
                format!(
                    "cannot complete: parts {} are missing or have gaps",
                    join_numbers(&missing)
                ),
            ));
        }
        let total: u64 = segments.iter().map(|s| s.len).sum();
        if segments.is_empty() && file.size > 0 {
            return Err(UploadError::invalid(
                "missing_parts",
                "cannot complete: no part has arrived yet; upload the parts first",
            ));
        }
        if total != file.size {
            return Err(UploadError::invalid(
                "size_mismatch",
                if total < file.size {
                    format!(
                        "cannot complete: {total} of the declared {} bytes arrived in parts 1..={}; upload the parts after part {}",
                        file.size,
                        expected_number - 1,
                        expected_number - 1
                    )
                } else {
                    format!(
                        "the parts hold {total} bytes but the declared size is {} bytes",
                        file.size
                    )
                },
            ));
        }
        file.segments = segments;
        file.upload_tags = upload_tags;
        self.finish(&guard, &mut file).await?;
        self.assessment.forget(upload);
        Ok(file)
    }

    /// Marks a file complete at this POP and queues it for final storage, durably.
    async fn finish(
        &self,
        guard: &UploadGuard<'_>,
        file: &mut FileRecord,
    ) -> Result<(), UploadError> {
        let job = JobChange::Upsert(ReplicationJob::new(file.handle.clone()));
        self.lifecycle
            .transition(guard, file, Transition::Complete, job)
            .await?;
        self.services.disk.release(&file.upload_id);
        metrics::counter!(names::UPLOADS_COMPLETED, "mode" => mode_label(file.mode)).increment(1);
        self.services.replication_wakeup.notify_one();
        tracing::info!(handle = %file.handle, size = file.size, "upload complete, queued for replication");
        Ok(())
    }

    /// A whole file in one request (`/api/store`). `declared_size` is the body's
    /// length when the client said it; otherwise the body is read up to the size limit.
    pub async fn store_whole<S, E>(
        &self,
        upload: NewUpload,
        declared_size: Option<u64>,
        body: S,
    ) -> Result<FileRecord, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        if let Some(size) = declared_size {
            self.check_size(size)?;
        }
        let _writing = self.body_writer()?;
        let mut file = self.new_record(&upload)?;
        self.services
            .disk
            .admit(&file.upload_id, declared_size.unwrap_or(0))?;
        metrics::counter!(names::UPLOADS_STARTED, "mode" => mode_label(file.mode)).increment(1);
        // A body of unknown length reserved nothing: it is charged as it grows.
        let charge = match declared_size {
            Some(_) => Charge::Reserved,
            None => Charge::Growing,
        };
        let (body, no_room) = self.services.disk.meter(body, charge);
        let stored = match declared_size {
            Some(size) if size <= SMALL_FILE_MAX => self.store_small(size, body).await,
            Some(size) => {
                self.store_in_part_file(&file.upload_id, ChunkSize::Exact(size), body)
                    .await
            }
            None => self.store_unsized(&file.upload_id, body, &no_room).await,
        };
        if no_room.hit() {
            // The body was cut where the disk had no more room: none of it counts.
            if stored.is_ok() {
                let _ = self.services.parts.remove_upload(&file.upload_id).await;
            }
            self.services.disk.release(&file.upload_id);
            metrics::counter!(names::UPLOADS_FAILED, "reason" => "no_space").increment(1);
            return Err(self.services.disk.no_room());
        }
        let segment = match stored {
            Ok(segment) => segment,
            Err(e) => {
                // Nothing was acknowledged.
                self.services.disk.release(&file.upload_id);
                count_chunk_failure(&e);
                metrics::counter!(names::UPLOADS_FAILED, "reason" => "body").increment(1);
                return Err(match e {
                    ChunkError::TooLong { .. } if declared_size.is_none() => {
                        UploadError::TooLarge {
                            message: format!(
                                "the body exceeds this POP's limit of {} bytes",
                                self.limits.max_file_size
                            ),
                        }
                    }
                    other => other.into(),
                });
            }
        };
        metrics::counter!(names::BYTES_RECEIVED).increment(segment.len);
        file.size = segment.len;
        file.segments = vec![segment];
        // Nobody else knows this upload yet; the lock keeps the one rule.
        let guard = self.lifecycle.lock(&file.upload_id).await;
        self.finish(&guard, &mut file).await?;
        Ok(file)
    }

    /// Appends a small file's bytes, which have all arrived, to the small-file
    /// log. None when the log failed: the caller writes a part file instead.
    async fn append_small(&self, file: &FileRecord, frames: &[Bytes]) -> Option<Segment> {
        match self.services.small_files.append(frames.to_vec()).await {
            Ok(segment) => Some(segment),
            Err(e) => {
                tracing::warn!(handle = %file.handle, error = %e, "appending a small file to the log failed; writing it to a part file instead");
                None
            }
        }
    }

    /// Reads a chunk resent for a part that lies in the small-file log and
    /// checks it holds the bytes acknowledged there.
    async fn compare_with_log<S>(
        &self,
        logged: &Segment,
        offset: u64,
        size: u64,
        body: &mut S,
    ) -> Result<Vec<Bytes>, ChunkError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        let frames = match read_whole(body, size).await {
            WholeBody::Whole(frames) => frames,
            WholeBody::Other(held) => return Err(unwhole_error(held, size)),
        };
        let acknowledged = futures_util::TryStreamExt::try_fold(
            self.services
                .parts
                .read_range(std::slice::from_ref(logged), offset, offset + size),
            Vec::new(),
            |mut all, piece| async move {
                all.extend_from_slice(&piece);
                Ok(all)
            },
        )
        .await
        .map_err(|e| ChunkError::Storage(StorageError::io("reading the small-file log", e)))?;
        if acknowledged != frames.concat() {
            return Err(ChunkError::Conflict { offset });
        }
        Ok(frames)
    }

    /// Creates the directory of an upload that deferred it (see [`defers_dir`]),
    /// before a body that is not its whole file goes to a part file.
    async fn create_deferred_dir(&self, file: &FileRecord) -> Result<(), UploadError> {
        if !defers_dir(file) {
            return Ok(());
        }
        // Once per upload, not per chunk: under the upload's lock, a request
        // that finds the directory knows its creator has made it durable.
        let _guard = self.lifecycle.lock(&file.upload_id).await;
        if !self.services.parts.has_upload(&file.upload_id).await {
            self.services.parts.create_upload(&file.upload_id).await?;
        }
        Ok(())
    }

    /// Reads a small body of exactly `size` bytes and appends it to the small-file log.
    async fn store_small<S, E>(&self, size: u64, body: S) -> Result<Segment, ChunkError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        let mut body = Box::pin(futures_util::TryStreamExt::map_err(body, Into::into));
        let frames = match read_whole(&mut body, size).await {
            WholeBody::Whole(frames) => frames,
            WholeBody::Other(held) => return Err(unwhole_error(held, size)),
        };
        Ok(self.services.small_files.append(frames).await?)
    }

    /// A body of unknown size (chunked, or a form's field): held in memory while
    /// it fits [`SMALL_FILE_MAX`] and appended to the small-file log if it ends
    /// there; past that, what was held and the rest go to a part file.
    async fn store_unsized<S, E>(
        &self,
        upload: &UploadId,
        body: S,
        no_room: &crate::disk::NoRoom,
    ) -> Result<Segment, ChunkError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        let mut body = Box::pin(futures_util::TryStreamExt::map_err(body, Into::into));
        let mut frames = Vec::new();
        let mut held = 0u64;
        while held <= SMALL_FILE_MAX {
            match body.next().await {
                Some(frame) => {
                    let frame = frame.map_err(ChunkError::Body)?;
                    held += frame.len() as u64;
                    frames.push(frame);
                }
                None if no_room.hit() => {
                    // The disk stopped the body: the caller answers 507.
                    return Err(ChunkError::Truncated {
                        received: held,
                        expected: held + 1,
                    });
                }
                None => return Ok(self.services.small_files.append(frames).await?),
            }
        }
        let held = futures_util::stream::iter(frames.into_iter().map(Ok::<_, BodyError>));
        self.store_in_part_file(
            upload,
            ChunkSize::AtMost(self.limits.max_file_size),
            held.chain(body),
        )
        .await
    }

    /// Writes a whole file as part 1 of its own upload; a failure removes the bytes.
    async fn store_in_part_file<S, E>(
        &self,
        upload: &UploadId,
        size: ChunkSize,
        body: S,
    ) -> Result<Segment, ChunkError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        let part = single_part();
        self.services.parts.create_upload(upload).await?;
        let written = self
            .services
            .parts
            // Nothing to compare a digest with: the file's SHA-256 is checked at final storage.
            .write(
                upload,
                part,
                0,
                size,
                &Default::default(),
                body,
                &[],
                OnBreak::Refuse,
            )
            .await;
        match written {
            Ok(written) => Ok(Segment {
                file: PartStore::part_file(upload, part),
                offset: 0,
                len: written.len,
            }),
            Err(e) => {
                let _ = self.services.parts.remove_upload(upload).await;
                Err(e)
            }
        }
    }
}

/// A request's place among those writing bodies.
struct BodyWriter {
    _permit: OwnedSemaphorePermit,
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        metrics::gauge!(names::BODIES_RECEIVING).decrement(1.0);
    }
}

/// An upload small enough that its whole file may come in one body creates
/// its directory only when a body goes to a part file: a file that arrives
/// whole goes to the small-file log and never needs one.
fn defers_dir(file: &FileRecord) -> bool {
    !file.length_deferred && !file.is_tus_partial() && (1..=SMALL_FILE_MAX).contains(&file.size)
}

/// What a body that should be a whole small file turned out to be.
enum WholeBody {
    /// Exactly the bytes expected, and the body ended cleanly.
    Whole(Vec<Bytes>),
    /// Anything else: the frames read (an error last, if the body broke),
    /// for the part-file path to count as it counts any body.
    Other(Vec<Result<Bytes, BodyError>>),
}

/// Reads a body expected to be exactly `size` bytes; holds at most one frame more.
async fn read_whole<S>(body: &mut S, size: u64) -> WholeBody
where
    S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
{
    let mut held = Vec::new();
    let mut received = 0u64;
    loop {
        match body.next().await {
            Some(Ok(frame)) => {
                received += frame.len() as u64;
                held.push(Ok(frame));
                if received > size {
                    return WholeBody::Other(held);
                }
            }
            Some(Err(e)) => {
                held.push(Err(e));
                return WholeBody::Other(held);
            }
            None if received == size => {
                return WholeBody::Whole(held.into_iter().filter_map(Result::ok).collect())
            }
            None => return WholeBody::Other(held),
        }
    }
}

/// Bytes arrived for an upload that was completed, expired or terminated meanwhile.
fn not_uploading(upload: &UploadId, status: FileStatus) -> UploadError {
    UploadError::conflict(
        "upload_not_uploading",
        format!(
            "upload {upload} is {} now; these bytes were not recorded",
            status.as_str()
        ),
        Some(status),
    )
}

/// Why a body expected to be exactly `size` bytes was not.
fn unwhole_error(mut held: Vec<Result<Bytes, BodyError>>, size: u64) -> ChunkError {
    if let Some(Err(e)) = held.pop_if(|frame| frame.is_err()) {
        return ChunkError::Body(e);
    }
    let received: u64 = held.iter().flatten().map(|f| f.len() as u64).sum();
    if received > size {
        ChunkError::TooLong { expected: size }
    } else {
        ChunkError::Truncated {
            received,
            expected: size,
        }
    }
}

/// The part of uploads that keep their bytes in a single part (tus, `/api/store`).
fn single_part() -> PartNumber {
    // 1 is always a valid part number.
    PartNumber::new(1).unwrap_or_else(|_| unreachable!())
}

fn mode_label(mode: UploadMode) -> &'static str {
    match mode {
        UploadMode::Regular => "regular",
        UploadMode::Intelligent => "intelligent",
        UploadMode::Direct => "direct",
        UploadMode::Tus => "tus",
    }
}

fn count_chunk_failure(e: &ChunkError) {
    let reason = match e {
        ChunkError::Truncated { .. } | ChunkError::Body(_) => "truncated",
        ChunkError::TooLong { .. } => "too_long",
        ChunkError::Conflict { .. } => "conflict",
        ChunkError::Md5Mismatch { .. } => "md5_mismatch",
        ChunkError::Crc32cMismatch { .. } | ChunkError::BlockCrc32cMismatch { .. } => {
            "crc32c_mismatch"
        }
        ChunkError::Storage(_) => "storage",
    };
    metrics::counter!(names::CHUNK_FAILURES, "reason" => reason).increment(1);
}

/// How many of the bytes `[offset, offset + size)` were acknowledged already.
fn acknowledged_within(received: &cin_domain::RangeSet, offset: u64, size: u64) -> u64 {
    received
        .intersect(offset, offset.saturating_add(size))
        .iter()
        .map(|(start, end)| end - start)
        .sum()
}

/// A digest the client declared (base64 of `len` bytes), as hex.
fn declared_digest(
    value: Option<&str>,
    len: usize,
    code: &'static str,
    name: &str,
) -> Result<Option<String>, UploadError> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()
        .filter(|d| d.len() == len)
        .map(|d| Some(hex::encode(d)))
        .ok_or_else(|| {
            UploadError::invalid(
                code,
                format!("{name} {value:?} is not the base64 of a {len}-byte digest"),
            )
        })
}

/// The part's length when its received bytes are one run from byte 0.
fn whole_length(part: &PartRecord) -> Option<u64> {
    (part.received.len() == 1)
        .then(|| part.received.contiguous_prefix())
        .filter(|&len| len > 0)
}

fn check_claimed_parts(
    claimed: &[ClaimedPart],
    stored: &[(PartNumber, PartRecord)],
) -> Result<(), UploadError> {
    let mut missing = Vec::new();
    for claim in claimed {
        match stored.iter().find(|(n, _)| *n == claim.number) {
            None => missing.push(claim.number.get()),
            Some((_, part)) => {
                let (Some(theirs), Some(ours)) = (claim.etag.as_deref(), part.etag.as_deref())
                else {
                    continue;
                };
                if theirs.trim_matches('"') != ours.trim_matches('"') {
                    return Err(UploadError::invalid(
                        "etag_mismatch",
                        format!(
                            "part {} has ETag {ours}, not {theirs}; upload the part again or send its ETag",
                            claim.number
                        ),
                    ));
                }
            }
        }
    }
    if !missing.is_empty() {
        return Err(UploadError::invalid(
            "missing_parts",
            format!(
                "cannot complete: parts {} were never uploaded",
                join_numbers(&missing)
            ),
        ));
    }
    Ok(())
}

fn join_numbers(numbers: &[u32]) -> String {
    numbers
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
