//! Per-block checksums of a chunk. A client may declare the CRC32C of every
//! `block` bytes of a chunk besides the chunk's own; the POP then checks each
//! block as it arrives, and when the body breaks off (a reset, a stall given
//! up) the blocks already checked are kept and acknowledged, so the retry
//! sends only the rest. Bytes past the last checked block are never counted:
//! what the POP acknowledges is always verified.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use cin_storage::BodyError;
use futures_util::{Stream, StreamExt};

use super::UploadError;

/// Blocks smaller than this would make the list of sums longer than it is worth.
pub const MIN_BLOCK: u64 = 64 * 1024;

/// The declared sums of one chunk's blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSums {
    block: u64,
    sums: Vec<u32>,
}

impl BlockSums {
    /// Reads `encoded` (base64 of one big-endian CRC32C per block) for a chunk
    /// of `chunk_size` bytes cut into blocks of `block` bytes (the last one shorter).
    pub fn parse(block: u64, encoded: &str, chunk_size: u64) -> Result<Self, UploadError> {
        let invalid = |detail: String| UploadError::invalid("invalid_block_crc32c", detail);
        if block < MIN_BLOCK {
            return Err(invalid(format!(
                "block_size must be at least {MIN_BLOCK} bytes, not {block}"
            )));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| invalid(format!("block_crc32c is not base64: {e}")))?;
        let blocks = chunk_size.div_ceil(block);
        if raw.len() as u64 != 4 * blocks {
            return Err(invalid(format!(
                "a chunk of {chunk_size} bytes has {blocks} blocks of {block} bytes, so block_crc32c must hold {} bytes, not {}",
                4 * blocks,
                raw.len()
            )));
        }
        let sums = raw
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(BlockSums { block, sums })
    }

    /// The CRC32C of a whole chunk of `chunk_size` bytes whose every block
    /// matched these sums.
    pub fn combined(&self, chunk_size: u64) -> u32 {
        self.sums.iter().enumerate().fold(0, |whole, (i, &sum)| {
            let start = i as u64 * self.block;
            let len = (start + self.block).min(chunk_size) - start;
            crc32c::crc32c_combine(whole, sum, len as usize)
        })
    }
}

/// What a checked body found, read once the write is over.
#[derive(Clone, Debug, Default)]
pub struct BlockCheck {
    verified: Arc<AtomicU64>,
    mismatch: Arc<AtomicBool>,
}

impl BlockCheck {
    /// Bytes from the chunk's start that lie in blocks whose sum matched.
    pub fn verified(&self) -> u64 {
        self.verified.load(Ordering::Acquire)
    }

    /// Whether a block's bytes differed from its declared sum.
    pub fn mismatch(&self) -> bool {
        self.mismatch.load(Ordering::Acquire)
    }
}

/// Passes `body` through, checking every block against `sums`; a block that
/// does not match ends the body (as a malformed one) before its bytes could count.
pub fn checked<S, E>(
    body: S,
    sums: BlockSums,
    chunk_size: u64,
    check: BlockCheck,
) -> impl Stream<Item = Result<Bytes, BodyError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: Into<BodyError>,
{
    let mut position = 0u64;
    let mut running = 0u32;
    body.map(move |frame| {
        let frame = frame.map_err(Into::into)?;
        let mut rest: &[u8] = &frame;
        while !rest.is_empty() {
            let index = position / sums.block;
            let block_end = ((index + 1) * sums.block).min(chunk_size);
            // Bytes past the chunk's end are the writer's to refuse.
            let Some(&declared) = sums.sums.get(index as usize) else {
                break;
            };
            let take = (block_end - position).min(rest.len() as u64) as usize;
            running = crc32c::crc32c_append(running, &rest[..take]);
            position += take as u64;
            rest = &rest[take..];
            if position == block_end {
                if running != declared {
                    check.mismatch.store(true, Ordering::Release);
                    return Err(BodyError::Malformed(format!(
                        "block {index} (bytes {}..{block_end} of the chunk) does not match its declared CRC32C",
                        index * sums.block
                    )));
                }
                check.verified.store(block_end, Ordering::Release);
                running = 0;
            }
        }
        Ok(frame)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_of(bytes: &[u8], block: usize) -> String {
        let raw: Vec<u8> = bytes
            .chunks(block)
            .flat_map(|b| crc32c::crc32c(b).to_be_bytes())
            .collect();
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    async fn run(frames: Vec<Result<Bytes, BodyError>>, sums: BlockSums, size: u64) -> BlockCheck {
        let check = BlockCheck::default();
        let body = checked(
            futures_util::stream::iter(frames),
            sums,
            size,
            check.clone(),
        );
        let _: Vec<_> = body.collect().await;
        check
    }

    #[tokio::test]
    async fn blocks_are_checked_across_frames_and_a_break_keeps_the_checked_ones() {
        let block = MIN_BLOCK as usize;
        let bytes: Vec<u8> = (0..block * 3 + 100).map(|i| (i * 31 % 251) as u8).collect();
        let size = bytes.len() as u64;
        let sums = BlockSums::parse(MIN_BLOCK, &sums_of(&bytes, block), size).unwrap();
        // Frames that straddle block boundaries.
        let frames: Vec<_> = bytes
            .chunks(block / 3 + 7)
            .map(|f| Ok(Bytes::copy_from_slice(f)))
            .collect();
        let whole = run(frames.clone(), sums.clone(), size).await;
        assert_eq!(whole.verified(), size);
        assert!(!whole.mismatch());

        // Cut off inside the third block: two blocks count.
        let mut cut: Vec<_> = bytes[..block * 2 + 500]
            .chunks(1000)
            .map(|f| Ok(Bytes::copy_from_slice(f)))
            .collect();
        cut.push(Err(BodyError::Interrupted("reset".into())));
        assert_eq!(run(cut, sums.clone(), size).await.verified(), 2 * MIN_BLOCK);

        // A flipped byte in the second block: only the first counts.
        let mut damaged = bytes.clone();
        damaged[block + 5] ^= 1;
        let frames = vec![Ok(Bytes::from(damaged))];
        let found = run(frames, sums, size).await;
        assert_eq!(found.verified(), MIN_BLOCK);
        assert!(found.mismatch());
    }

    #[test]
    fn the_blocks_sums_combine_into_the_chunks() {
        let block = MIN_BLOCK as usize;
        let bytes: Vec<u8> = (0..block * 2 + 77).map(|i| (i * 13 % 253) as u8).collect();
        let sums =
            BlockSums::parse(MIN_BLOCK, &sums_of(&bytes, block), bytes.len() as u64).unwrap();
        assert_eq!(sums.combined(bytes.len() as u64), crc32c::crc32c(&bytes));
    }

    #[test]
    fn sums_must_fit_the_chunk() {
        let four = base64::engine::general_purpose::STANDARD.encode([0u8; 8]);
        assert!(BlockSums::parse(MIN_BLOCK, &four, 2 * MIN_BLOCK).is_ok());
        assert!(BlockSums::parse(MIN_BLOCK, &four, 3 * MIN_BLOCK).is_err());
        assert!(BlockSums::parse(MIN_BLOCK / 2, &four, MIN_BLOCK).is_err());
        assert!(BlockSums::parse(MIN_BLOCK, "!!", MIN_BLOCK).is_err());
    }
}
