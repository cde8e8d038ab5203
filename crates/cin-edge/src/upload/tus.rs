//! tus 1.0 on the upload engine: an upload is one part file that grows by PATCH
//! requests at its current offset; a final concatenation is a segment list over
//! partial uploads.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use bytes::Bytes;
use cin_domain::{FileRecord, FileStatus, Segment, Transition, TusConcat, TusState, UploadId};
use cin_storage::{BodyError, ChunkError, ChunkSize, DigestKind, JobChange, OnBreak, PartStore};
use futures_util::{Stream, StreamExt};

use super::locks::Takeover;
use super::{
    defers_dir, not_uploading, now_ms, read_whole, single_part, NewUpload, UploadError,
    UploadGuard, Uploads, WholeBody,
};
use crate::disk::Charge;
use crate::observability::names;

/// The checksum algorithms tus clients may name, as `Tus-Checksum-Algorithm` lists them.
pub const TUS_CHECKSUMS: &str = "sha1,md5,sha256";
/// Base64 as tus clients write it: padded or not, trailing bits ignored.
pub const TUS_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);
/// What [`TUS_BASE64`] decodes, as a regular expression (for API descriptions).
pub const TUS_BASE64_PATTERN: &str =
    r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}(?:==)?|[A-Za-z0-9+/]{3}=?)?";

const TUS_DIGESTS: [DigestKind; 3] = [DigestKind::Sha1, DigestKind::Md5, DigestKind::Sha256];

/// A checksum the client declared for a PATCH body (`Upload-Checksum`).
#[derive(Clone, Debug)]
pub struct DeclaredChecksum {
    pub kind: DigestKind,
    pub digest: Vec<u8>,
}

impl DeclaredChecksum {
    /// An `Upload-Checksum` value: `<algorithm> <base64 digest>`.
    pub fn parse(value: &str) -> Result<Self, UploadError> {
        let (algorithm, digest) = value.trim().split_once(' ').ok_or_else(|| {
            UploadError::invalid(
                "invalid_checksum",
                "Upload-Checksum must be \"<algorithm> <base64 digest>\"",
            )
        })?;
        let kind = match algorithm.to_ascii_lowercase().as_str() {
            "sha1" => DigestKind::Sha1,
            "md5" => DigestKind::Md5,
            "sha256" => DigestKind::Sha256,
            other => {
                return Err(UploadError::invalid(
                    "unsupported_checksum",
                    format!(
                        "checksum algorithm {other:?} is not supported; use one of {TUS_CHECKSUMS}"
                    ),
                ))
            }
        };
        let digest = TUS_BASE64.decode(digest.trim()).map_err(|_| {
            UploadError::invalid(
                "invalid_checksum",
                "the Upload-Checksum digest is not base64",
            )
        })?;
        Ok(DeclaredChecksum { kind, digest })
    }
}

/// Reads the checksum a body's trailer declared, once the body has ended.
pub type LateChecksum = Box<dyn FnOnce() -> Result<DeclaredChecksum, UploadError> + Send>;

/// Where a tus body's checksum comes from.
pub enum BodyChecksum {
    /// No checksum: whatever arrives counts, even if the body breaks off.
    None,
    /// `Upload-Checksum` in the request head.
    Declared(DeclaredChecksum),
    /// A trailer after the body (the checksum-trailer extension). The algorithm
    /// is named only then, so every supported digest is computed while writing.
    Trailer(LateChecksum),
}

/// What became of a body that may be a small file's whole.
enum SmallBody {
    /// In the small-file log, verified; the caller completes the upload.
    Stored(Segment),
    /// Not the whole file as declared: the frames read (an error last, if the
    /// body broke) and the checksum, for the regular path to count.
    Replay(Vec<Result<Bytes, BodyError>>, BodyChecksum),
}

/// How a PATCH ended.
#[derive(Debug)]
pub enum Appended {
    /// The new offset; the whole body is durable.
    Complete(u64),
    /// The body broke off; the new offset covers what arrived and is durable.
    BrokenOff(u64),
}

impl Uploads {
    /// Creates a tus upload. `size` is None with `Upload-Defer-Length`.
    pub async fn tus_create(
        &self,
        upload: NewUpload,
        deferred: bool,
        metadata: String,
        partial: bool,
    ) -> Result<FileRecord, UploadError> {
        let mut record = self.tus_record(&upload, deferred, metadata, partial)?;
        self.tus_register(&mut record).await?;
        Ok(record)
    }

    /// A new tus upload's record, its disk room reserved; not stored yet.
    fn tus_record(
        &self,
        upload: &NewUpload,
        deferred: bool,
        metadata: String,
        partial: bool,
    ) -> Result<FileRecord, UploadError> {
        let mut record = self.new_record(upload)?;
        self.check_size(upload.size)?;
        self.services.disk.admit(&record.upload_id, upload.size)?;
        metrics::counter!(names::UPLOADS_STARTED, "mode" => "tus").increment(1);
        record.length_deferred = deferred;
        record.tus = Some(TusState {
            metadata,
            concat: if partial {
                TusConcat::Partial
            } else {
                TusConcat::None
            },
        });
        Ok(record)
    }

    /// Stores a new upload durably with its (empty) upload directory, so
    /// PATCHes may follow; an empty file is complete at once.
    async fn tus_register(&self, record: &mut FileRecord) -> Result<(), UploadError> {
        let deferred = record.length_deferred;
        let partial = record.is_tus_partial();
        if !defers_dir(record) {
            self.services.parts.create_upload(&record.upload_id).await?;
        }
        if !deferred && record.size == 0 {
            // An empty file is complete at creation.
            record.segments = Vec::new();
            let guard = self.lifecycle.lock(&record.upload_id).await;
            self.finish_tus(&guard, record).await?;
            return Ok(());
        }
        self.services.meta.put_file(record, JobChange::Keep)?;
        self.services.meta.flush().await?;
        tracing::info!(handle = %record.handle, size = record.size, deferred, partial, "tus upload created");
        Ok(())
    }

    /// creation-with-upload: creates a tus upload and appends the request's
    /// body at offset 0. Returns the upload and its offset after the body.
    ///
    /// A body that is the whole of a small file (its length known, not a
    /// partial upload) is held in memory, its checksum verified, and appended
    /// to the small-file log: the upload is complete at creation, with no
    /// upload directory or part file of its own. Any other body, or one that
    /// ends short, long, broken, or with a checksum that does not match, takes
    /// the path of a creation and a PATCH, with the bytes held replayed: the
    /// upload is created and what arrived counts as a PATCH would count it.
    pub async fn tus_create_with_upload<S, E>(
        &self,
        upload: NewUpload,
        deferred: bool,
        metadata: String,
        partial: bool,
        checksum: BodyChecksum,
        body: S,
    ) -> Result<(FileRecord, u64), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        let mut record = self.tus_record(&upload, deferred, metadata, partial)?;
        let mut body = Box::pin(futures_util::TryStreamExt::map_err(body, Into::into));
        let (held, checksum) = if defers_dir(&record) {
            match self
                .tus_create_small(&mut record, checksum, &mut body)
                .await
            {
                Ok(SmallBody::Stored(_)) => {
                    let size = record.size;
                    return Ok((record, size));
                }
                Ok(SmallBody::Replay(held, checksum)) => (held, checksum),
                Err(e) => {
                    self.services.disk.release(&record.upload_id);
                    return Err(e);
                }
            }
        } else {
            (Vec::new(), checksum)
        };
        if let Err(e) = self.tus_register(&mut record).await {
            self.services.disk.release(&record.upload_id);
            return Err(e);
        }
        let replayed = futures_util::stream::iter(held).chain(body);
        let offset = match self
            .tus_append(&record.upload_id, 0, None, checksum, replayed)
            .await?
        {
            Appended::Complete(o) | Appended::BrokenOff(o) => o,
        };
        Ok((self.file_for_upload(&record.upload_id)?, offset))
    }

    /// A small tus creation whose body may be the whole file: stored in the
    /// small-file log and completed at creation, or given back for the regular path.
    async fn tus_create_small<S>(
        &self,
        record: &mut FileRecord,
        checksum: BodyChecksum,
        body: &mut S,
    ) -> Result<SmallBody, UploadError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Send + Unpin,
    {
        // Given back on return, before a replay takes its own place among the body writers.
        let _writing = self.body_writer()?;
        let stored = self.tus_small_body(record, checksum, body).await?;
        if let SmallBody::Stored(segment) = &stored {
            record.segments = vec![segment.clone()];
            // Nobody knows this upload yet; the lock keeps the one rule.
            let guard = self.lifecycle.lock(&record.upload_id).await;
            self.finish_tus(&guard, record).await?;
            tracing::info!(handle = %record.handle, size = record.size, "tus upload created whole, in the small-file log");
        }
        Ok(stored)
    }

    /// Reads a tus body from offset 0 of a small upload; if it is the whole
    /// file and its checksum matches, appends it to the small-file log.
    /// Otherwise gives back what it read, for the part-file path to count as
    /// it counts any PATCH (a prefix kept, a 413 or a 460).
    async fn tus_small_body<S>(
        &self,
        record: &FileRecord,
        checksum: BodyChecksum,
        body: &mut S,
    ) -> Result<SmallBody, UploadError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Send + Unpin,
    {
        let frames = match read_whole(body, record.size).await {
            WholeBody::Whole(frames) => frames,
            WholeBody::Other(held) => return Ok(SmallBody::Replay(held, checksum)),
        };
        let replay = |frames: Vec<Bytes>, checksum| {
            Ok(SmallBody::Replay(
                frames.into_iter().map(Ok).collect(),
                checksum,
            ))
        };
        let declared = match checksum {
            BodyChecksum::None => None,
            BodyChecksum::Declared(c) => Some(c),
            // The body has ended, so its trailer has been read (or never came).
            BodyChecksum::Trailer(read) => match read() {
                Ok(c) => Some(c),
                Err(e) => return replay(frames, BodyChecksum::Trailer(Box::new(move || Err(e)))),
            },
        };
        if let Some(declared) = declared {
            if cin_storage::parts::digest_of(declared.kind, &frames) != declared.digest {
                return replay(frames, BodyChecksum::Declared(declared));
            }
        }
        // The same look at the disk a body written to a part file gets.
        if !self.services.disk.fits(record.size, Charge::Reserved) {
            return replay(frames, BodyChecksum::None);
        }
        match self.append_small(record, &frames).await {
            Some(segment) => {
                metrics::counter!(names::BYTES_RECEIVED).increment(segment.len);
                Ok(SmallBody::Stored(segment))
            }
            None => replay(frames, BodyChecksum::None),
        }
    }

    /// The offset a client resuming the upload continues from: a PATCH still
    /// holding the upload (its client has given up on it, or it would not ask)
    /// is stopped first, and what it received is counted.
    pub async fn tus_resume_offset(&self, file: &FileRecord) -> Result<u64, UploadError> {
        if file.status != FileStatus::Uploading {
            return Ok(file.size);
        }
        let _guard = self
            .part_lock(&file.upload_id, single_part(), Takeover::Always)
            .await?;
        self.tus_offset(&self.file_for_upload(&file.upload_id)?)
    }

    /// The number of bytes received from offset 0 (the tus `Upload-Offset`).
    pub fn tus_offset(&self, file: &FileRecord) -> Result<u64, UploadError> {
        if file.status != FileStatus::Uploading {
            return Ok(file.size);
        }
        Ok(self
            .services
            .meta
            .get_part(&file.upload_id, single_part())?
            .map(|p| p.received.contiguous_prefix())
            .unwrap_or(0))
    }

    /// Appends a PATCH body at `offset`. Concurrent PATCHes on one upload are
    /// serialised; the later one then finds the offset moved and gets a conflict.
    pub async fn tus_append<S, E>(
        &self,
        upload: &UploadId,
        offset: u64,
        new_length: Option<u64>,
        checksum: BodyChecksum,
        body: S,
    ) -> Result<Appended, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BodyError>,
    {
        let _writing = self.body_writer()?;
        // tus has one request at a time per upload: a newer one means the client
        // gave up on the older (most likely stalled on a dead connection).
        let guard = self
            .part_lock(upload, single_part(), Takeover::Always)
            .await?;
        let body = guard.until_taken_over(Box::pin(body));
        let mut file = self.file_for_upload(upload)?;
        if matches!(
            &file.tus,
            Some(TusState {
                concat: TusConcat::Final(_),
                ..
            })
        ) {
            return Err(UploadError::forbidden(
                "final_upload",
                "a final concatenation cannot be patched",
            ));
        }
        let mut part = self
            .services
            .meta
            .get_part(upload, single_part())?
            .unwrap_or_default();
        let current = if file.status == FileStatus::Uploading {
            part.received.contiguous_prefix()
        } else {
            file.size
        };
        if offset != current {
            return Err(UploadError::conflict(
                "offset_mismatch",
                format!("Upload-Offset is {offset} but the upload is at {current}; HEAD it and continue from there"),
                Some(file.status),
            ));
        }
        if file.status != FileStatus::Uploading {
            return Err(UploadError::conflict(
                "upload_complete",
                format!("upload {upload} is already complete"),
                Some(file.status),
            ));
        }
        if let Some(length) = new_length {
            if file.length_deferred {
                let guard = self.lifecycle.lock(upload).await;
                file = self.lifecycle.current(&guard, &file.handle)?;
                self.check_size(length)?;
                if length < current {
                    return Err(UploadError::invalid(
                        "length_too_small",
                        format!(
                            "Upload-Length {length} is below the {current} bytes already received"
                        ),
                    ));
                }
                // Known now: the rest is reserved like any upload's, or refused.
                self.services.disk.admit(upload, length - current)?;
                file.size = length;
                file.length_deferred = false;
                self.lifecycle
                    .update(&guard, &file, JobChange::Keep)
                    .await?;
            } else if length != file.size {
                return Err(UploadError::invalid(
                    "length_fixed",
                    format!("Upload-Length is already {} and cannot change", file.size),
                ));
            }
        }
        let room = if file.length_deferred {
            self.limits.max_file_size - current
        } else {
            file.size - current
        };
        let mut disk_write = self
            .services
            .disk
            .begin_write(upload, || self.remaining(&file))?;
        // A deferred length reserved nothing: its bytes are charged as they come.
        let charge = if file.length_deferred {
            Charge::Growing
        } else {
            Charge::Reserved
        };
        let (body, no_room) = self.services.disk.meter(body, charge);
        let mut body = Box::pin(futures_util::TryStreamExt::map_err(body, Into::into));
        // The whole of a small file in its first PATCH goes to the small-file log.
        let (held, checksum) = if defers_dir(&file) && part.received.is_empty() {
            match self.tus_small_body(&file, checksum, &mut body).await? {
                SmallBody::Stored(segment) => {
                    let guard = self.lifecycle.lock(upload).await;
                    let mut file = match self.lifecycle.current(&guard, &file.handle) {
                        Ok(file) if file.status == FileStatus::Uploading => file,
                        gone => {
                            // Terminated or expired meanwhile: nothing owns these bytes.
                            self.services.small_files.release(&segment).await?;
                            return Err(match gone {
                                Ok(file) => not_uploading(upload, file.status),
                                Err(e) => e,
                            });
                        }
                    };
                    disk_write.consumed(segment.len);
                    file.segments = vec![segment];
                    self.finish_tus(&guard, &mut file).await?;
                    drop(guard);
                    self.assessment.forget(upload);
                    return Ok(Appended::Complete(file.size));
                }
                SmallBody::Replay(held, checksum) => (held, checksum),
            }
        } else {
            (Vec::new(), checksum)
        };
        let (digests, on_break) = match &checksum {
            BodyChecksum::None => (&[][..], OnBreak::KeepPrefix),
            // A checksummed body counts only whole: a broken one cannot be verified.
            BodyChecksum::Declared(c) => (std::slice::from_ref(&c.kind), OnBreak::Refuse),
            BodyChecksum::Trailer(_) => (&TUS_DIGESTS[..], OnBreak::Refuse),
        };
        self.create_deferred_dir(&file).await?;
        let body = futures_util::stream::iter(held).chain(body);
        let written = self
            .services
            .parts
            .write(
                upload,
                single_part(),
                offset,
                ChunkSize::AtMost(room),
                &part.received,
                body,
                digests,
                on_break,
            )
            .await;
        let written = match written {
            Ok(w) => w,
            Err(ChunkError::TooLong { .. }) => {
                return Err(UploadError::TooLarge {
                    message: format!(
                        "the body goes past the upload's length; at most {room} more bytes fit"
                    ),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let declared = match checksum {
            BodyChecksum::None => None,
            BodyChecksum::Declared(c) => Some(c),
            // The body has ended, so its trailer has been read (or never came).
            BodyChecksum::Trailer(read) => Some(read()?),
        };
        if no_room.hit() && declared.is_some() {
            // A checksummed body counts only whole.
            return Err(self.services.disk.no_room());
        }
        if let Some(declared) = declared {
            if written.digest(declared.kind) != Some(declared.digest.as_slice()) {
                metrics::counter!(names::CHUNK_FAILURES, "reason" => "checksum_mismatch")
                    .increment(1);
                return Err(UploadError::ChecksumMismatch);
            }
        }
        let end = offset + written.len;
        disk_write.consumed(written.len);
        metrics::counter!(names::BYTES_RECEIVED).increment(written.len);
        if let Some(broken) = &written.broken_off {
            if broken.says_chunk_too_big() {
                self.assessment.record_failure(upload);
            }
            metrics::counter!(names::CHUNK_FAILURES, "reason" => "truncated").increment(1);
        }
        if written.len > 0 {
            part.received.insert(offset, end);
            part.touched_at_ms = now_ms();
            self.record_part(&file.handle, upload, single_part(), &part)
                .await?;
        }
        if !file.length_deferred && end == file.size {
            let guard = self.lifecycle.lock(upload).await;
            file = self.lifecycle.current(&guard, &file.handle)?;
            file.segments = vec![Segment {
                file: PartStore::part_file(upload, single_part()),
                offset: 0,
                len: file.size,
            }];
            self.finish_tus(&guard, &mut file).await?;
            drop(guard);
            self.assessment.forget(upload);
            if file.is_tus_partial() {
                self.complete_waiting_finals(&file).await?;
            }
        } else {
            self.flush_parts(upload).await?;
        }
        if no_room.hit() {
            // The body stopped where the disk had no more room; what arrived is
            // durable and counted, and the client resumes from it later.
            tracing::info!(%upload, kept = written.len, "PATCH body stopped: no disk room for more");
            return Err(self.services.disk.no_room());
        }
        Ok(match written.broken_off {
            Some(reason) => {
                tracing::info!(%upload, kept = written.len, %reason, "PATCH body broke off; kept what arrived");
                Appended::BrokenOff(end)
            }
            None => Appended::Complete(end),
        })
    }

    /// Marks a tus upload complete: partial uploads wait for their final upload,
    /// everything else is queued for final storage.
    async fn finish_tus(
        &self,
        guard: &UploadGuard<'_>,
        file: &mut FileRecord,
    ) -> Result<(), UploadError> {
        if file.is_tus_partial() {
            self.lifecycle
                .transition(guard, file, Transition::Complete, JobChange::Keep)
                .await?;
            self.services.disk.release(&file.upload_id);
            return Ok(());
        }
        self.finish(guard, file).await
    }

    /// Creates a final upload from complete partial uploads: no bytes are copied.
    /// Each partial first records the final as a reference, so its bytes stay
    /// for as long as the final needs them whatever happens to the partial.
    pub async fn tus_concat(
        &self,
        upload: NewUpload,
        partials: Vec<UploadId>,
        metadata: String,
    ) -> Result<FileRecord, UploadError> {
        let mut segments = Vec::new();
        let mut size = 0u64;
        let mut unfinished = false;
        for id in &partials {
            let part = self.file_for_upload(id)?;
            if !part.is_tus_partial() {
                return Err(UploadError::invalid(
                    "not_partial",
                    format!("upload {id} was not created with Upload-Concat: partial"),
                ));
            }
            if part.status == FileStatus::Uploading {
                // concatenation-unfinished: the final upload waits for it.
                if part.length_deferred {
                    return Err(UploadError::invalid(
                        "partial_length_unknown",
                        format!(
                            "partial upload {id} has no length yet; declare it (Upload-Length) or finish it before concatenating"
                        ),
                    ));
                }
                unfinished = true;
            }
            size += part.size;
            segments.extend(part.segments.iter().cloned());
        }
        self.check_size(size)?;
        let mut record = self.new_record(&NewUpload { size, ..upload })?;
        record.tus = Some(TusState {
            metadata,
            concat: TusConcat::Final(partials.clone()),
        });
        if unfinished {
            // Written before the references, so a partial that completes
            // meanwhile finds the final upload waiting for it.
            self.services.meta.put_file(&record, JobChange::Keep)?;
            self.services.meta.flush().await?;
        } else {
            record.segments = segments;
        }
        let mut referenced: Vec<&UploadId> = Vec::new();
        for id in &partials {
            if referenced.contains(&id) {
                continue;
            }
            if let Err(e) = self.lifecycle.add_reference(id, &record.handle).await {
                // Nothing was answered yet: undo the references made so far.
                for done in referenced {
                    let _ = self.lifecycle.drop_reference(done, &record.handle).await;
                }
                if unfinished {
                    let _ = self.services.meta.delete_file(&record);
                }
                return Err(e);
            }
            referenced.push(id);
        }
        if unfinished {
            tracing::info!(handle = %record.handle, size, "final tus upload waits for its partial uploads");
            // Every partial may have completed while the references were made.
            return Ok(self.complete_final(&record).await?.unwrap_or(record));
        }
        let guard = self.lifecycle.lock(&record.upload_id).await;
        self.finish(&guard, &mut record).await?;
        Ok(record)
    }

    /// At start: final uploads whose partials all completed, with a crash
    /// before the last one's completion reached them, complete now.
    pub async fn complete_ready_finals(&self) -> Result<(), UploadError> {
        for file in self.services.meta.files()? {
            let waiting = file.status == FileStatus::Uploading
                && matches!(
                    file.tus.as_ref().map(|t| &t.concat),
                    Some(TusConcat::Final(_))
                );
            if waiting {
                if let Err(e) = self.complete_final(&file).await {
                    tracing::warn!(handle = %file.handle, error = %e, "a final tus upload whose partials are complete could not be completed at start");
                }
            }
        }
        Ok(())
    }

    /// After partial upload `partial` completed: the final uploads waiting for
    /// it complete, those whose partials are now all complete.
    async fn complete_waiting_finals(&self, partial: &FileRecord) -> Result<(), UploadError> {
        for handle in &partial.referenced_by {
            if let Some(waiting) = self.services.meta.get_file(handle)? {
                if waiting.status == FileStatus::Uploading {
                    self.complete_final(&waiting).await?;
                }
            }
        }
        Ok(())
    }

    /// Completes a final upload whose partial uploads are all complete (its
    /// bytes are theirs: nothing is copied); None while one is not.
    async fn complete_final(
        &self,
        waiting: &FileRecord,
    ) -> Result<Option<FileRecord>, UploadError> {
        let Some(TusConcat::Final(partials)) = waiting.tus.as_ref().map(|t| &t.concat) else {
            return Ok(None);
        };
        let mut segments = Vec::new();
        for id in partials {
            // A partial gone (terminated, expired) leaves the final waiting,
            // until it expires like any unfinished upload.
            let Ok(part) = self.file_for_upload(id) else {
                return Ok(None);
            };
            if part.status != FileStatus::InTransit {
                return Ok(None);
            }
            segments.extend(part.segments.iter().cloned());
        }
        let guard = self.lifecycle.lock(&waiting.upload_id).await;
        let mut file = self.lifecycle.current(&guard, &waiting.handle)?;
        if file.status != FileStatus::Uploading {
            // Another partial's completion finished it first.
            return Ok(Some(file));
        }
        file.segments = segments;
        self.finish(&guard, &mut file).await?;
        tracing::info!(handle = %file.handle, size = file.size, "final tus upload complete: its partial uploads are");
        Ok(Some(file))
    }

    /// Terminates a tus upload. An unfinished (or partial) one loses its
    /// bytes, unless final uploads still reference them (they go with the last
    /// of those); a finished one is deleted as a file. Returns the record as
    /// it was left.
    pub async fn tus_terminate(&self, upload: &UploadId) -> Result<FileRecord, UploadError> {
        let guard = self.lifecycle.lock(upload).await;
        let mut file = self.file_for_upload(upload)?;
        if file.status != FileStatus::Uploading && !file.is_tus_partial() {
            // Termination covers finished uploads: the file is deleted everywhere.
            drop(guard);
            return self.delete(&file.handle).await;
        }
        if file.referenced_by.is_empty() {
            // Nothing else needs the record: forget it outright.
            file.apply(Transition::Delete, now_ms())?;
            self.services.meta.delete_file(&file)?;
            self.services.meta.flush().await?;
        } else {
            self.services.meta.remove_parts(upload)?;
            self.lifecycle
                .transition(&guard, &mut file, Transition::Delete, JobChange::Remove)
                .await?;
        }
        drop(guard);
        self.services.disk.release(upload);
        self.assessment.forget(upload);
        metrics::counter!(names::UPLOADS_FAILED, "reason" => "terminated").increment(1);
        self.lifecycle.release_bytes(&file).await?;
        tracing::info!(handle = %file.handle, kept_for = file.referenced_by.len(), "tus upload terminated");
        Ok(file)
    }
}
