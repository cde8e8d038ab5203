//! Upload payloads: incompressible bytes made without holding the whole file in
//! memory or reading it from disk, so neither the client's RAM nor its reads
//! weigh on what is measured.

use std::io::Write;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use cin_client::{ByteSource, ClientError};
use rand::{RngCore, SeedableRng};

pub const MIB: u64 = 1024 * 1024;

/// The pattern repeats every `PERIOD` bytes.
const PERIOD: u64 = 64 * MIB;
/// Reads up to this long are slices of the pool (no copy).
const MAX_SLICE: u64 = 8 * MIB;

/// Random bytes repeating with a 64 MiB period.
#[derive(Clone)]
pub struct Pattern {
    /// `PERIOD + MAX_SLICE` bytes: the period, then its first `MAX_SLICE` bytes again.
    pool: Bytes,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut pool = vec![0u8; (PERIOD + MAX_SLICE) as usize];
        let (period, tail) = pool.split_at_mut(PERIOD as usize);
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(period);
        tail.copy_from_slice(&period[..MAX_SLICE as usize]);
        Pattern {
            pool: Bytes::from(pool),
        }
    }

    /// `len` bytes of the pattern from `offset`.
    pub fn bytes(&self, offset: u64, len: u64) -> Bytes {
        let start = offset % PERIOD;
        if len <= MAX_SLICE {
            return self.pool.slice(start as usize..(start + len) as usize);
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut at = offset;
        while (out.len() as u64) < len {
            let take = (len - out.len() as u64).min(MAX_SLICE);
            out.extend_from_slice(&self.bytes(at, take));
            at += take;
        }
        Bytes::from(out)
    }

    /// Writes `len` bytes of the pattern to `path` (not synced).
    pub fn write_file(&self, path: &Path, len: u64) -> std::io::Result<()> {
        let mut file =
            std::io::BufWriter::with_capacity(MAX_SLICE as usize, std::fs::File::create(path)?);
        let mut at = 0;
        while at < len {
            let take = (len - at).min(MAX_SLICE);
            file.write_all(&self.bytes(at, take))?;
            at += take;
        }
        file.flush()
    }
}

/// A file of `len` bytes of the pattern, as the client library reads it.
pub struct PatternSource {
    pub pattern: Pattern,
    pub len: u64,
}

#[async_trait]
impl ByteSource for PatternSource {
    fn len(&self) -> u64 {
        self.len
    }

    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        if offset.saturating_add(len) > self.len {
            return Err(ClientError::Invalid(format!(
                "read of {len} bytes at {offset} past the end ({} bytes)",
                self.len
            )));
        }
        Ok(self.pattern.bytes(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reads_equal_short_ones() {
        let p = Pattern::new(1);
        let long = p.bytes(PERIOD - 5, 3 * MAX_SLICE + 7);
        let mut short = Vec::new();
        let mut at = PERIOD - 5;
        for len in [MAX_SLICE, MAX_SLICE, MAX_SLICE, 7] {
            short.extend_from_slice(&p.bytes(at, len));
            at += len;
        }
        assert_eq!(long, Bytes::from(short));
        assert_eq!(p.bytes(PERIOD + 3, 10), p.bytes(3, 10));
    }
}
