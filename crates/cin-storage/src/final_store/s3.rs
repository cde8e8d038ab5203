//! Final storage on S3 or an S3-compatible service, through `aws-sdk-s3`.
//!
//! Small files go up in one `PutObject`; larger ones as a multipart upload read
//! part by part from the local segments (at most `concurrency` parts in memory).
//! Every request carries a checksum the service verifies (SHA-256 for a single
//! PutObject; CRC32 per part, the SDK's own default, which costs the service far
//! less than SHA-256); the finished object's size and checksum are checked with
//! `HeadObject` before `put` returns. The file's SHA-256 goes in its metadata.
//! Services differ in how they report a multipart object's CRC32 (AWS: the
//! composite `base64-N`; moto: the composite without `-N`; others: the whole
//! file's CRC32), so every documented form is accepted, and only an answer that
//! cannot be the bytes sent is a [`FinalStoreError::Mismatch`].
//! Multipart progress is journaled, so a restarted replicator resumes the same
//! upload, and uploads that cannot be resumed are aborted, never left behind.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload,
    CompletedPart as S3CompletedPart, ObjectCannedAcl,
};
use aws_sdk_s3::Client;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use cin_domain::{CompletedPart, MultipartCheckpoint};
use futures_util::stream::{FuturesUnordered, StreamExt};
use sha2::{Digest, Sha256};
use tokio_util::io::ReaderStream;

use super::{FinalStore, FinalStoreError, ObjectInfo, ObjectToStore, PutJournal, PutOutcome};
use crate::{ByteStream, LocalObject};

/// S3 requires parts of at least 5 MiB (but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// How to reach one S3 (or S3-compatible) service.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// The bucket `check` probes.
    pub bucket: String,
    pub region: String,
    /// Empty: AWS's own endpoint for the region.
    pub endpoint: String,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint`.
    pub force_path_style: bool,
    /// Empty: the standard AWS credential chain (environment, profile, instance role...).
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Parts of this many bytes; files up to this size go in one PutObject.
    pub part_size: u64,
    /// Parts in flight at once per file.
    pub concurrency: usize,
}

pub struct S3Store {
    client: Client,
    settings: S3Settings,
}

impl S3Store {
    pub async fn connect(settings: S3Settings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            );
        if !settings.access_key_id.is_empty() {
            loader = loader.credentials_provider(Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.clone(),
                None,
                None,
                "cin-edge-config",
            ));
        }
        if !settings.endpoint.is_empty() {
            loader = loader.endpoint_url(settings.endpoint.clone());
        }
        let shared = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.force_path_style)
            .build();
        let settings = S3Settings {
            part_size: settings.part_size.max(MIN_PART_SIZE),
            concurrency: settings.concurrency.max(1),
            ..settings
        };
        S3Store {
            client: Client::from_conf(config),
            settings,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The endpoint as people know it, for messages.
    fn endpoint_label(&self) -> String {
        if self.settings.endpoint.is_empty() {
            format!("AWS S3 ({})", self.settings.region)
        } else {
            self.settings.endpoint.clone()
        }
    }

    fn classify<E>(&self, error: SdkError<E, HttpResponse>) -> FinalStoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        classify(&self.endpoint_label(), error)
    }

    async fn put_single(&self, object: &ObjectToStore<'_>) -> Result<PutOutcome, FinalStoreError> {
        let bytes = read_bytes(object.source, 0, object.source.size).await?;
        let digest = Sha256::digest(&bytes);
        let sha256 = hex::encode(digest);
        self.client
            .put_object()
            .bucket(object.container)
            .key(object.key)
            .content_type(object.mimetype)
            .set_acl(acl(object.acl))
            .set_metadata(Some(object_metadata(object, &sha256)))
            .checksum_sha256(B64.encode(digest))
            .body(S3Body::from(bytes))
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        self.verify(object, &sha256, Expected::Sha256(B64.encode(digest)))
            .await?;
        Ok(PutOutcome {
            sha256,
            size: object.source.size,
        })
    }

    async fn put_multipart(
        &self,
        object: &ObjectToStore<'_>,
        journal: &dyn PutJournal,
    ) -> Result<PutOutcome, FinalStoreError> {
        let size = object.source.size;
        let part_size = journal
            .resume()
            .map(|cp| cp.part_size)
            .filter(|&p| p >= MIN_PART_SIZE)
            .unwrap_or(self.settings.part_size);
        // One read up front gives the whole-file SHA-256 (object metadata, set at
        // creation) and CRC32 (to verify the finished object).
        let (sha256, whole_crc32) = hash_file(object.source).await?;
        let part_count = size.div_ceil(part_size).max(1) as u32;
        let mut resume_from = journal.resume();
        let parts = loop {
            let resuming = resume_from.is_some();
            let (checkpoint, confirmed) = self
                .resume_or_create(object, journal, resume_from.take(), part_size, &sha256)
                .await?;
            match self
                .send_parts(
                    object,
                    journal,
                    &checkpoint,
                    confirmed,
                    part_count,
                    part_size,
                )
                .await
            {
                Err(FinalStoreError::Rejected(reason)) => {
                    // The service refused the upload as it stands (e.g. it no longer
                    // knows a journaled upload id): drop it, and start afresh once.
                    self.abort(object.container, object.key, &checkpoint.upload_id)
                        .await;
                    journal.record(None).await?;
                    if resuming {
                        tracing::warn!(key = object.key, %reason, "resumed multipart upload refused; starting over");
                        continue;
                    }
                    return Err(FinalStoreError::Rejected(reason));
                }
                Err(FinalStoreError::Unreachable(reason))
                    if resuming && self.bucket_answers(object.container).await =>
                {
                    // The service answers, yet a request of the resumed upload broke
                    // off: services that refuse an unknown upload id before reading
                    // the body cut the connection. Treat the upload as stale.
                    self.abort(object.container, object.key, &checkpoint.upload_id)
                        .await;
                    journal.record(None).await?;
                    tracing::warn!(key = object.key, %reason, "resumed multipart upload failed while the service answers; starting over");
                    continue;
                }
                Err(mismatch @ FinalStoreError::Mismatch { .. }) => {
                    // The service holds other bytes for a part: sending the rest
                    // cannot fix it. Leave no upload open; a later attempt starts afresh.
                    self.abort(object.container, object.key, &checkpoint.upload_id)
                        .await;
                    journal.record(None).await?;
                    return Err(mismatch);
                }
                Err(other) => return Err(other),
                Ok(parts) => break parts,
            }
        };
        let expected = Expected::Crc32(MultipartCrc32 {
            composite: composite_crc32(&parts),
            full_object: B64.encode(whole_crc32.to_be_bytes()),
            parts: parts.len(),
        });
        if let Err(e) = self.verify(object, &sha256, expected).await {
            if matches!(e, FinalStoreError::Mismatch { .. }) {
                // The journaled upload is complete: nothing is left to resume.
                journal.record(None).await?;
            }
            return Err(e);
        }
        Ok(PutOutcome { sha256, size })
    }

    /// Uploads the parts the service has not confirmed yet and completes the
    /// upload; returns the parts in order.
    async fn send_parts(
        &self,
        object: &ObjectToStore<'_>,
        journal: &dyn PutJournal,
        checkpoint: &MultipartCheckpoint,
        confirmed: HashMap<u32, CompletedPart>,
        part_count: u32,
        part_size: u64,
    ) -> Result<Vec<CompletedPart>, FinalStoreError> {
        let size = object.source.size;
        let mut done: Vec<CompletedPart> = Vec::with_capacity(part_count as usize);
        let mut in_flight = FuturesUnordered::new();

        for number in 1..=part_count {
            // The local file never changes once complete: a part the service
            // confirmed (with the checksum journaled for it) is not sent again.
            if let Some(part) = confirmed.get(&number) {
                done.push(part.clone());
                continue;
            }
            if journal.should_stop() {
                // Parts already sent are journaled; the next attempt resumes after them.
                while let Some(result) = in_flight.next().await {
                    done.push(result?);
                    self.save_progress(journal, checkpoint, &done).await?;
                }
                return Err(FinalStoreError::Unreachable(
                    "stopping: this POP is shutting down".into(),
                ));
            }
            while in_flight.len() >= self.settings.concurrency {
                if let Some(result) = in_flight.next().await {
                    done.push(result?);
                    self.save_progress(journal, checkpoint, &done).await?;
                }
            }
            let start = u64::from(number - 1) * part_size;
            let bytes = read_bytes(object.source, start, (start + part_size).min(size)).await?;
            let checksum = B64.encode(crc32fast::hash(&bytes).to_be_bytes());
            in_flight.push(self.upload_part(
                object,
                &checkpoint.upload_id,
                number,
                bytes,
                checksum,
            ));
        }
        while let Some(result) = in_flight.next().await {
            done.push(result?);
            self.save_progress(journal, checkpoint, &done).await?;
        }
        done.sort_by_key(|p| p.number);
        self.check_listed_parts(object, checkpoint, &done, part_size)
            .await?;

        let parts: Vec<S3CompletedPart> = done
            .iter()
            .map(|p| {
                S3CompletedPart::builder()
                    .part_number(p.number as i32)
                    .e_tag(&p.etag)
                    .set_checksum_crc32(p.checksum.clone())
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(object.container)
            .key(object.key)
            .upload_id(&checkpoint.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        journal.record(None).await?;
        Ok(done)
    }

    async fn bucket_answers(&self, bucket: &str) -> bool {
        self.client
            .head_bucket()
            .bucket(bucket)
            .send()
            .await
            .is_ok()
    }

    /// Resumes the journaled multipart upload when the service still knows it
    /// (returning the parts it confirmed), or starts a new one.
    async fn resume_or_create(
        &self,
        object: &ObjectToStore<'_>,
        journal: &dyn PutJournal,
        resume_from: Option<MultipartCheckpoint>,
        part_size: u64,
        sha256: &str,
    ) -> Result<(MultipartCheckpoint, HashMap<u32, CompletedPart>), FinalStoreError> {
        if let Some(cp) = resume_from {
            if cp.container == object.container && cp.key == object.key && cp.part_size == part_size
            {
                match self.confirmed_parts(&cp, object.source.size).await {
                    Ok(parts) => {
                        tracing::info!(key = object.key, upload_id = %cp.upload_id, confirmed = parts.len(), "resuming multipart upload");
                        return Ok((cp, parts));
                    }
                    Err(FinalStoreError::Rejected(reason)) => {
                        tracing::warn!(key = object.key, %reason, "journaled multipart upload is gone; starting over");
                        self.abort(&cp.container, &cp.key, &cp.upload_id).await;
                    }
                    Err(other) => return Err(other),
                }
            } else {
                self.abort(&cp.container, &cp.key, &cp.upload_id).await;
            }
            journal.record(None).await?;
        }
        // An upload created just before a crash, before its id was journaled, would be orphaned.
        self.abort_stale_uploads(object.container, object.key).await;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(object.container)
            .key(object.key)
            .content_type(object.mimetype)
            .set_acl(acl(object.acl))
            .set_metadata(Some(object_metadata(object, sha256)))
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                FinalStoreError::Rejected("CreateMultipartUpload answered no upload id".into())
            })?
            .to_owned();
        let cp = MultipartCheckpoint {
            upload_id,
            container: object.container.to_owned(),
            key: object.key.to_owned(),
            part_size,
            parts: Vec::new(),
        };
        journal.record(Some(cp.clone())).await?;
        Ok((cp, HashMap::new()))
    }

    /// The journaled parts the service still lists for the upload (matched by number
    /// and, where the service reports them, size and checksum).
    async fn confirmed_parts(
        &self,
        cp: &MultipartCheckpoint,
        size: u64,
    ) -> Result<HashMap<u32, CompletedPart>, FinalStoreError> {
        let listed = self.list_parts(cp).await?;
        Ok(cp
            .parts
            .iter()
            .filter(|part| {
                listed.get(&part.number).is_some_and(|l| {
                    l.contradicts(part, part_len(part.number, cp.part_size, size))
                        .is_none()
                })
            })
            .map(|part| (part.number, part.clone()))
            .collect())
    }

    /// Before completing: every part as the service lists it must be the part sent
    /// (size, and checksum where listed). Parts whose checksum UploadPart did not
    /// echo are confirmed here. A service that cannot list parts is not held to it.
    async fn check_listed_parts(
        &self,
        object: &ObjectToStore<'_>,
        cp: &MultipartCheckpoint,
        parts: &[CompletedPart],
        part_size: u64,
    ) -> Result<(), FinalStoreError> {
        let listed = match self.list_parts(cp).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::debug!(key = object.key, error = %e, "cannot list the parts of a multipart upload; HeadObject still verifies it");
                return Ok(());
            }
        };
        for part in parts {
            let expected_len = part_len(part.number, part_size, object.source.size);
            let detail = match listed.get(&part.number) {
                None => Some(format!("part {} is not listed", part.number)),
                Some(l) => l.contradicts(part, expected_len),
            };
            if let Some(detail) = detail {
                return Err(mismatch(object, detail));
            }
        }
        Ok(())
    }

    /// Every part of the upload the service lists, by number.
    async fn list_parts(
        &self,
        cp: &MultipartCheckpoint,
    ) -> Result<HashMap<u32, ListedPart>, FinalStoreError> {
        let mut listed = HashMap::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_parts()
                .bucket(&cp.container)
                .key(&cp.key)
                .upload_id(&cp.upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| self.classify(e))?;
            for p in page.parts() {
                if let Some(n) = p.part_number() {
                    listed.insert(
                        n as u32,
                        ListedPart {
                            size: p.size(),
                            crc32: p.checksum_crc32().map(str::to_owned),
                        },
                    );
                }
            }
            marker = page.next_part_number_marker().map(str::to_owned);
            if page.is_truncated() != Some(true) || marker.is_none() {
                break;
            }
        }
        Ok(listed)
    }

    async fn abort_stale_uploads(&self, bucket: &str, key: &str) {
        let listed = match self
            .client
            .list_multipart_uploads()
            .bucket(bucket)
            .prefix(key)
            .send()
            .await
        {
            Ok(listed) => listed,
            Err(e) => {
                // Some S3-compatible services do not implement the listing; the journal still covers every upload but one created in the instant before a crash.
                tracing::debug!(bucket, key, error = %self.classify(e), "cannot list open multipart uploads");
                return;
            }
        };
        for upload in listed.uploads() {
            if let (Some(k), Some(id)) = (upload.key(), upload.upload_id()) {
                if k == key {
                    self.abort(bucket, key, id).await;
                }
            }
        }
    }

    async fn abort(&self, bucket: &str, key: &str, upload_id: &str) {
        let result = self
            .client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = result {
            tracing::warn!(bucket, key, upload_id, error = %self.classify(e), "could not abort a multipart upload");
        }
    }

    async fn upload_part(
        &self,
        object: &ObjectToStore<'_>,
        upload_id: &str,
        number: u32,
        bytes: Bytes,
        checksum: String,
    ) -> Result<CompletedPart, FinalStoreError> {
        let answer = self
            .client
            .upload_part()
            .bucket(object.container)
            .key(object.key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .checksum_crc32(&checksum)
            .body(S3Body::from(bytes))
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        if let Some(echoed) = answer.checksum_crc32() {
            if echoed != checksum {
                return Err(mismatch(
                    object,
                    format!("part {number}: sent CRC32 {checksum}, the service recorded {echoed}"),
                ));
            }
        }
        let etag = answer.e_tag().ok_or_else(|| {
            FinalStoreError::Rejected(format!("UploadPart {number} answered no ETag"))
        })?;
        Ok(CompletedPart {
            number,
            etag: etag.to_owned(),
            checksum: Some(checksum),
        })
    }

    async fn save_progress(
        &self,
        journal: &dyn PutJournal,
        checkpoint: &MultipartCheckpoint,
        done: &[CompletedPart],
    ) -> Result<(), FinalStoreError> {
        let mut cp = checkpoint.clone();
        cp.parts = done.to_vec();
        journal.record(Some(cp)).await?;
        Ok(())
    }

    /// Checks the stored object's size, and its checksum when the service reports one.
    async fn verify(
        &self,
        object: &ObjectToStore<'_>,
        sha256: &str,
        expected: Expected,
    ) -> Result<(), FinalStoreError> {
        let head = self
            .client
            .head_object()
            .bucket(object.container)
            .key(object.key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let size = head.content_length().unwrap_or(-1);
        if size != object.source.size as i64 {
            return Err(mismatch(
                object,
                format!("it has {size} bytes, {} were sent", object.source.size),
            ));
        }
        // Services that keep no checksum report none; size was checked above.
        let contradiction = match &expected {
            Expected::Sha256(sum) => head
                .checksum_sha256()
                .filter(|stored| stored != sum)
                .map(|stored| format!("SHA-256 {stored}, sent {sum}")),
            Expected::Crc32(crc) => head
                .checksum_crc32()
                .and_then(|stored| crc.contradicts(stored, head.checksum_type())),
        };
        match contradiction {
            Some(detail) => Err(mismatch(object, format!("{detail} (sha256 {sha256})"))),
            None => Ok(()),
        }
    }
}

/// The checksum a finished object must report, when the service reports one.
enum Expected {
    Sha256(String),
    Crc32(MultipartCrc32),
}

/// The CRC32 forms a multipart object of the bytes sent may report.
#[derive(Debug)]
struct MultipartCrc32 {
    /// Base64 CRC32 of the parts' big-endian CRC32s: S3's composite checksum, without `-N`.
    composite: String,
    /// Base64 CRC32 of the whole file: a full-object checksum.
    full_object: String,
    parts: usize,
}

impl MultipartCrc32 {
    /// Why `reported` (HeadObject's CRC32, and its `ChecksumType` when the service
    /// gave one) cannot be the bytes sent; None when it can. Accepted: the composite
    /// or the full-object CRC32, each with or without the `-N` part count; a
    /// reported type narrows it to that one.
    fn contradicts(&self, reported: &str, kind: Option<&ChecksumType>) -> Option<String> {
        let (value, count) = match reported.rsplit_once('-') {
            Some((value, count)) if count.parse::<usize>().is_ok() => {
                (value, count.parse::<usize>().ok())
            }
            _ => (reported, None),
        };
        if let Some(count) = count.filter(|&n| n != self.parts) {
            return Some(format!(
                "CRC32 {reported} counts {count} parts, {} were sent",
                self.parts
            ));
        }
        let (accepted, form): (Vec<&str>, &str) = match kind {
            Some(ChecksumType::Composite) => (vec![&self.composite], "composite"),
            Some(ChecksumType::FullObject) => (vec![&self.full_object], "full-object"),
            _ => (
                vec![&self.composite, &self.full_object],
                "composite or full-object",
            ),
        };
        if accepted.contains(&value) {
            None
        } else {
            Some(format!(
                "CRC32 {reported}, expected the {form} CRC32 {} of {} parts",
                accepted.join(" or "),
                self.parts
            ))
        }
    }
}

/// A part as ListParts reports it.
struct ListedPart {
    size: Option<i64>,
    crc32: Option<String>,
}

impl ListedPart {
    /// Why this listing cannot be `part` (of `len` bytes); None when it can.
    fn contradicts(&self, part: &CompletedPart, len: u64) -> Option<String> {
        if let Some(size) = self.size.filter(|&s| s != len as i64) {
            return Some(format!(
                "part {} is listed with {size} bytes, {len} were sent",
                part.number
            ));
        }
        match (&self.crc32, &part.checksum) {
            (Some(listed), Some(sent)) if listed != sent => Some(format!(
                "part {} is listed with CRC32 {listed}, sent {sent}",
                part.number
            )),
            _ => None,
        }
    }
}

/// S3's composite checksum of `parts` (in order): the CRC32 of their CRC32s, base64.
fn composite_crc32(parts: &[CompletedPart]) -> String {
    let mut h = crc32fast::Hasher::new();
    for part in parts {
        let raw = part
            .checksum
            .as_deref()
            .and_then(|c| B64.decode(c).ok())
            .unwrap_or_default();
        h.update(&raw);
    }
    B64.encode(h.finalize().to_be_bytes())
}

/// The length of part `number` (1-based) of a file of `size` bytes in parts of `part_size`.
fn part_len(number: u32, part_size: u64, size: u64) -> u64 {
    let start = u64::from(number.saturating_sub(1)) * part_size;
    size.saturating_sub(start).min(part_size)
}

fn mismatch(object: &ObjectToStore<'_>, detail: String) -> FinalStoreError {
    FinalStoreError::Mismatch {
        container: object.container.to_owned(),
        key: object.key.to_owned(),
        detail,
    }
}

fn acl(access: Option<&str>) -> Option<ObjectCannedAcl> {
    match access.map(|a| a.to_ascii_lowercase()) {
        Some(a) if a == "public" || a == "public-read" => Some(ObjectCannedAcl::PublicRead),
        Some(a) if a == "private" => Some(ObjectCannedAcl::Private),
        _ => None,
    }
}

/// Object metadata: filename (percent-encoded, as header values must be ASCII), mimetype, sha256.
fn object_metadata(object: &ObjectToStore<'_>, sha256: &str) -> HashMap<String, String> {
    let filename: String = object
        .filename
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~ ".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert("filename".to_owned(), filename);
    meta.insert("mimetype".to_owned(), object.mimetype.to_owned());
    meta.insert("sha256".to_owned(), sha256.to_owned());
    meta
}

/// The whole file's hex SHA-256 and its CRC32, in one read on the blocking pool.
async fn hash_file(source: &LocalObject) -> Result<(String, u32), FinalStoreError> {
    let mut reader = source.reader();
    let hashed = tokio::task::spawn_blocking(move || {
        let mut sha256 = Sha256::new();
        let mut crc32 = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            sha256.update(&buf[..n]);
            crc32.update(&buf[..n]);
        }
        Ok((hex::encode(sha256.finalize()), crc32.finalize()))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))
    .and_then(|r| r);
    hashed.map_err(|e| FinalStoreError::Local(crate::StorageError::io("reading the local copy", e)))
}

/// Bytes `[start, end)` of the local copy, read in one trip to the blocking pool.
async fn read_bytes(source: &LocalObject, start: u64, end: u64) -> Result<Bytes, FinalStoreError> {
    let mut reader = source.range_reader(start, end);
    let len = (end - start) as usize;
    let out = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(len);
        std::io::Read::read_to_end(&mut reader, &mut out).map(|_| out)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))
    .and_then(|r| r)
    .map_err(|e| FinalStoreError::Local(crate::StorageError::io("reading the local copy", e)))?;
    if out.len() as u64 != end - start {
        return Err(FinalStoreError::Local(crate::StorageError::io(
            "reading the local copy",
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("expected {} bytes, read {}", end - start, out.len()),
            ),
        )));
    }
    Ok(Bytes::from(out))
}

/// Connection trouble and 5xx answers are `Unreachable` (retry later); an answer
/// refusing the request (credentials, missing bucket, bad request) is `Rejected`.
/// Messages are for people: `cannot reach http://10.0.0.9:9000: connection refused`,
/// not the SDK's nested debug output.
fn classify<E>(endpoint: &str, error: SdkError<E, HttpResponse>) -> FinalStoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &error {
        // Credentials are resolved when a request is dispatched: their failure is
        // a dispatch failure too, and says nothing about the network.
        SdkError::DispatchFailure(_) if mentions_credentials(&error) => {
            FinalStoreError::Unreachable(format!(
                "no credentials to sign requests to {endpoint} with ({}): set access_key_id and secret_access_key in the storage profile, or provide them through the AWS credential chain (AWS_ACCESS_KEY_ID, a shared profile, an instance or container role)",
                root_cause(&error)
            ))
        }
        SdkError::DispatchFailure(_) => {
            FinalStoreError::Unreachable(format!("cannot reach {endpoint}: {}", root_cause(&error)))
        }
        SdkError::TimeoutError(_) => FinalStoreError::Unreachable(format!(
            "cannot reach {endpoint}: no answer in time"
        )),
        SdkError::ResponseError(_) => FinalStoreError::Unreachable(format!(
            "{endpoint} answered with something that is not an S3 response ({}); is endpoint an S3 service?",
            root_cause(&error)
        )),
        SdkError::ServiceError(service) => {
            let e = service.err();
            let status = service.raw().status().as_u16();
            let detail = format!(
                "{endpoint} answered {} (HTTP {status}): {}",
                e.code().unwrap_or("an error"),
                e.message().unwrap_or("no message")
            );
            if status >= 500 {
                FinalStoreError::Unreachable(detail)
            } else {
                FinalStoreError::Rejected(detail)
            }
        }
        _ => FinalStoreError::Rejected(format!(
            "the request to {endpoint} could not be made: {}",
            root_cause(&error)
        )),
    }
}

/// Whether any cause in the chain is about credentials.
fn mentions_credentials(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.to_string().to_ascii_lowercase().contains("credentials") {
            return true;
        }
        current = e.source();
    }
    false
}

/// The innermost cause of an error, in words: `connection refused` rather than a
/// chain of wrappers.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = error;
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(words) = io_words(io) {
                return words.to_owned();
            }
        }
        deepest = e;
        current = e.source();
    }
    let text = deepest.to_string();
    // `Connection refused (os error 111)` reads as `connection refused`.
    let text = match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "an unknown error".to_owned(),
    }
}

fn io_words(error: &std::io::Error) -> Option<&'static str> {
    use std::io::ErrorKind::*;
    Some(match error.kind() {
        ConnectionRefused => "connection refused",
        ConnectionReset => "the connection was reset",
        ConnectionAborted => "the connection was aborted",
        TimedOut => "the connection timed out",
        HostUnreachable => "no route to the host",
        NetworkUnreachable => "the network is unreachable",
        AddrNotAvailable => "the address is not available",
        _ => return None,
    })
}

#[async_trait]
impl FinalStore for S3Store {
    fn describe(&self) -> String {
        let endpoint = if self.settings.endpoint.is_empty() {
            "aws"
        } else {
            &self.settings.endpoint
        };
        format!(
            "s3:{endpoint}/{} ({})",
            self.settings.bucket, self.settings.region
        )
    }

    async fn put(
        &self,
        object: &ObjectToStore<'_>,
        journal: &dyn PutJournal,
    ) -> Result<PutOutcome, FinalStoreError> {
        if object.source.size <= self.settings.part_size {
            self.put_single(object).await
        } else {
            self.put_multipart(object, journal).await
        }
    }

    async fn put_bytes(
        &self,
        container: &str,
        key: &str,
        bytes: bytes::Bytes,
        content_type: &str,
    ) -> Result<(), FinalStoreError> {
        let digest = Sha256::digest(&bytes);
        // The store checks the body against the declared SHA-256 before it keeps it.
        self.client
            .put_object()
            .bucket(container)
            .key(key)
            .content_type(content_type)
            .checksum_sha256(B64.encode(digest))
            .body(S3Body::from(bytes))
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    async fn head(
        &self,
        container: &str,
        key: &str,
    ) -> Result<Option<ObjectInfo>, FinalStoreError> {
        match self
            .client
            .head_object()
            .bucket(container)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(ObjectInfo {
                size: head.content_length().unwrap_or(0).max(0) as u64,
                sha256: head.metadata().and_then(|m| m.get("sha256")).cloned(),
            })),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(None),
            Err(e) => Err(self.classify(e)),
        }
    }

    async fn get(
        &self,
        container: &str,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ByteStream, FinalStoreError> {
        let request = self.client.get_object().bucket(container).key(key);
        let request = match range {
            Some((start, end)) if end > start => {
                request.range(format!("bytes={}-{}", start, end - 1))
            }
            _ => request,
        };
        match request.send().await {
            Ok(answer) => Ok(Box::pin(ReaderStream::with_capacity(
                answer.body.into_async_read(),
                256 * 1024,
            ))),
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => {
                Err(FinalStoreError::NotFound {
                    container: container.into(),
                    key: key.into(),
                })
            }
            Err(e) => Err(self.classify(e)),
        }
    }

    async fn delete(&self, container: &str, key: &str) -> Result<(), FinalStoreError> {
        self.client
            .delete_object()
            .bucket(container)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify(e))
    }

    async fn check(&self) -> Result<(), FinalStoreError> {
        self.client
            .head_bucket()
            .bucket(&self.settings.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file the reported forms below describe: three parts, 12 MiB in all.
    fn twelve_mib() -> (MultipartCrc32, Vec<CompletedPart>) {
        let data: Vec<u8> = (0..12 * 1024 * 1024u32)
            .map(|i| (i * 7 + i / 13) as u8)
            .collect();
        let parts: Vec<CompletedPart> = data
            .chunks(MIN_PART_SIZE as usize)
            .enumerate()
            .map(|(i, bytes)| CompletedPart {
                number: i as u32 + 1,
                etag: String::new(),
                checksum: Some(B64.encode(crc32fast::hash(bytes).to_be_bytes())),
            })
            .collect();
        let crc = MultipartCrc32 {
            composite: composite_crc32(&parts),
            full_object: B64.encode(crc32fast::hash(&data).to_be_bytes()),
            parts: parts.len(),
        };
        (crc, parts)
    }

    #[test]
    fn every_documented_form_of_the_multipart_crc32_is_accepted() {
        let (crc, _) = twelve_mib();
        let composite = crc.composite.clone();
        let full = crc.full_object.clone();
        // AWS: composite with the part count, typed or not.
        assert_eq!(crc.contradicts(&format!("{composite}-3"), None), None);
        assert_eq!(
            crc.contradicts(&format!("{composite}-3"), Some(&ChecksumType::Composite)),
            None
        );
        // moto: the composite without the count.
        assert_eq!(crc.contradicts(&composite, None), None);
        // Full-object CRC32, bare, with a count, or typed.
        assert_eq!(crc.contradicts(&full, None), None);
        assert_eq!(crc.contradicts(&format!("{full}-3"), None), None);
        assert_eq!(
            crc.contradicts(&full, Some(&ChecksumType::FullObject)),
            None
        );
    }

    #[test]
    fn a_crc32_that_cannot_be_the_bytes_is_a_contradiction() {
        let (crc, _) = twelve_mib();
        let other = B64.encode(0x1234_5678u32.to_be_bytes());
        assert!(crc.contradicts(&other, None).is_some());
        assert!(crc.contradicts(&format!("{other}-3"), None).is_some());
        // The right value with the wrong part count.
        assert!(crc
            .contradicts(&format!("{}-4", crc.composite), None)
            .is_some());
        // A type the value does not fit.
        assert!(crc
            .contradicts(&crc.full_object, Some(&ChecksumType::Composite))
            .is_some());
        assert!(crc
            .contradicts(&crc.composite, Some(&ChecksumType::FullObject))
            .is_some());
    }

    #[test]
    fn listed_parts_are_checked_by_size_and_listed_checksum() {
        let (_, parts) = twelve_mib();
        let size = 12 * 1024 * 1024;
        assert_eq!(part_len(1, MIN_PART_SIZE, size), MIN_PART_SIZE);
        assert_eq!(part_len(3, MIN_PART_SIZE, size), 2 * 1024 * 1024);
        let last = &parts[2];
        let listed = |size: i64, crc32: Option<&str>| ListedPart {
            size: Some(size),
            crc32: crc32.map(str::to_owned),
        };
        let len = 2 * 1024 * 1024;
        assert!(listed(len as i64, None).contradicts(last, len).is_none());
        assert!(listed(len as i64, last.checksum.as_deref())
            .contradicts(last, len)
            .is_none());
        assert!(listed(len as i64 - 1, None)
            .contradicts(last, len)
            .is_some());
        assert!(listed(len as i64, Some("AAAAAA=="))
            .contradicts(last, len)
            .is_some());
    }
}
