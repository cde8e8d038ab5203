//! The calls the upload algorithm makes to a POP, behind a trait so the algorithm
//! runs against a simulated transport in unit tests and against HTTP for real.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::adaptive::ChunkDeadlines;
use crate::error::TransportError;

/// Where the POP delivers the finished file (Filestack's `store` options).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreOptions {
    /// `s3` (the only location Filestack clients name; any POP store is "s3").
    pub location: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl StoreOptions {
    pub fn s3() -> Self {
        StoreOptions {
            location: "s3".into(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct StartRequest {
    pub filename: String,
    pub mimetype: String,
    pub size: u64,
    pub store: StoreOptions,
}

/// `/multipart/start`'s answer. The handle and filelink are valid from now on.
#[derive(Debug, Clone, Deserialize)]
pub struct Started {
    pub upload_id: String,
    pub handle: String,
    pub url: String,
    #[serde(default)]
    pub location_url: String,
    /// Signs any chunk of this upload, so a chunk needs no URL of its own.
    #[serde(default)]
    pub upload_grant: Option<UploadGrant>,
}

/// A POP's signature for any chunk of one upload (`upload_grant` in the start
/// and upload answers): chunks go to `{url}/{part}?offset=..&size=..&grant=upload&expires=..&signature=..`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UploadGrant {
    pub url: String,
    /// Unix seconds.
    pub expires: u64,
    pub signature: String,
}

/// Bytes covered by each of a chunk's block checksums: when a chunk breaks off,
/// the POP keeps the blocks that arrived whole, and the retry sends the rest.
pub const CHECK_BLOCK: u64 = 256 * 1024;

/// One chunk: `body` goes at `offset` inside part `part` (1-based).
#[derive(Debug, Clone)]
pub struct ChunkRequest {
    pub upload_id: String,
    pub part: u32,
    pub offset: u64,
    /// Base64 of the chunk's big-endian CRC32C: as strong as a transfer check
    /// needs, and hardware-accelerated on both ends (an MD5 would cost more CPU
    /// than the upload itself on a fast link). The file's SHA-256 is checked
    /// once, at final storage.
    pub crc32c: String,
    /// Base64 of the big-endian CRC32C of every [`CHECK_BLOCK`] bytes.
    pub block_crc32c: String,
    pub body: Bytes,
}

impl ChunkRequest {
    pub fn new(upload_id: String, part: u32, offset: u64, body: Bytes) -> Self {
        let mut whole = 0u32;
        let mut blocks = Vec::with_capacity(4 * body.len().div_ceil(CHECK_BLOCK as usize));
        for block in body.chunks(CHECK_BLOCK as usize) {
            let sum = crc32c::crc32c(block);
            // One pass: the chunk's sum is its blocks' sums combined.
            whole = crc32c::crc32c_combine(whole, sum, block.len());
            blocks.extend_from_slice(&sum.to_be_bytes());
        }
        let b64 = &base64::engine::general_purpose::STANDARD;
        ChunkRequest {
            upload_id,
            part,
            offset,
            crc32c: b64.encode(whole.to_be_bytes()),
            block_crc32c: b64.encode(blocks),
            body,
        }
    }
}

/// The POP acknowledged a chunk: its bytes are durable there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkAck {
    /// The POP's preferred largest chunk, in bytes, when it said one.
    pub size_hint: Option<u64>,
    /// How long the answer took once the whole body was handed to the connection.
    pub answer_wait: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct CompleteRequest {
    pub upload_id: String,
    pub filename: String,
    pub mimetype: String,
    pub size: u64,
    pub store: StoreOptions,
}

/// `/multipart/complete`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Completed {
    pub handle: String,
    pub url: String,
    #[serde(default)]
    pub status: String,
}

#[async_trait]
pub trait Transport: Send + Sync {
    async fn start(&self, pop: &str, req: &StartRequest) -> Result<Started, TransportError>;

    /// Sends one chunk within `deadlines`: a PUT, preceded by a call for its URL
    /// when no upload grant covers it.
    async fn send_chunk(
        &self,
        pop: &str,
        chunk: &ChunkRequest,
        deadlines: ChunkDeadlines,
    ) -> Result<ChunkAck, TransportError>;

    /// The byte ranges of `part` the POP holds, as `[start, end)` within the
    /// part: after a chunk broke off, what it kept need not be sent again.
    async fn received(
        &self,
        pop: &str,
        upload_id: &str,
        part: u32,
        timeout: Duration,
    ) -> Result<Vec<(u64, u64)>, TransportError>;

    /// Completes the upload. The POP takes every part whose chunks cover it
    /// from byte 0 as whole, so parts need no commit call of their own.
    async fn complete(&self, pop: &str, req: &CompleteRequest)
        -> Result<Completed, TransportError>;

    /// `GET /{handle}/metadata`.
    async fn metadata(&self, pop: &str, handle: &str) -> Result<Value, TransportError>;

    /// `GET /healthz`, for round-trip time probes.
    async fn probe(&self, pop: &str, timeout: Duration) -> Result<(), TransportError>;
}
