use std::io;

use thiserror::Error;

/// Failures of the POP's own storage (metadata store and part files).
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The filesystem is full (ENOSPC) or the POP's quota is used up (EDQUOT).
    /// Nothing is wrong with what is stored; writes succeed again once space is freed.
    #[error("{context}: the disk is full ({source})")]
    NoSpace {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("metadata store error: {0}")]
    Sled(sled::Error),
    /// Another process holds the metadata store's lock.
    #[error("the metadata store {path} is in use by another process: stop the other cin-edge using this data_dir, or give this one its own")]
    InUse { path: String },
    #[error("making writes durable failed: {0}")]
    Commit(String),
    #[error("the {0} thread has stopped; the POP is shutting down")]
    Stopped(&'static str),
    #[error("metadata record {key} is corrupt ({reason}); restore the data directory from a backup or remove the record")]
    Corrupt { key: String, reason: String },
}

impl StorageError {
    /// An I/O failure; running out of space is told apart, as it passes once space is freed.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if is_no_space(&source) {
            StorageError::NoSpace { context, source }
        } else {
            StorageError::Io { context, source }
        }
    }

    /// The disk is full (or over quota): the answer is 507, not a server fault.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StorageError::NoSpace { .. })
    }
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(source) if is_no_space(&source) => StorageError::NoSpace {
                context: "writing the metadata store".into(),
                source,
            },
            other => StorageError::Sled(other),
        }
    }
}

/// ENOSPC or EDQUOT, whichever way the error was built.
pub fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Why a chunk was not accepted. Nothing of a refused chunk is acknowledged.
#[derive(Debug, Error)]
pub enum ChunkError {
    #[error("the body is longer than the declared {expected} bytes")]
    TooLong { expected: u64 },
    #[error("the body ended after {received} of {expected} bytes; send the chunk again")]
    Truncated { received: u64, expected: u64 },
    #[error("bytes at offset {offset} differ from bytes already acknowledged there; acknowledged bytes cannot be replaced")]
    Conflict { offset: u64 },
    #[error("the body's MD5 is {actual}, not the declared {declared}; the chunk was corrupted in transit, send it again")]
    Md5Mismatch { declared: String, actual: String },
    #[error("the body's CRC32C is {actual}, not the declared {declared}; the chunk was corrupted in transit, send it again")]
    Crc32cMismatch { declared: String, actual: String },
    #[error("{detail}; the {kept} bytes before it were kept, send the rest of the chunk again")]
    BlockCrc32cMismatch { kept: u64, detail: String },
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ChunkError {
    /// The chunk failed because the disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, ChunkError::Storage(e) if e.is_no_space())
    }
}

/// Why a request body stopped before its end.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    /// No bytes arrived for the configured idle time; the request was ended.
    #[error(
        "no body bytes arrived for {idle_secs} s, so the request was ended; send the rest again"
    )]
    Stalled { idle_secs: u64 },
    /// A newer request for the same bytes took the upload over.
    #[error("a newer request for the same bytes took over this upload; this request was ended")]
    Superseded,
    /// The body's framing is broken (e.g. bad chunked encoding).
    #[error("the request body is malformed: {0}")]
    Malformed(String),
    /// The connection broke (closed or reset) before the body's end.
    #[error("the request body broke off: {0}")]
    Interrupted(String),
}

impl BodyError {
    /// Whether smaller chunks would have fared better: a connection that broke
    /// mid-body may well (the fewer bytes, the fewer chances to break), one
    /// that went silent, or was given up for a newer one, says nothing of size.
    pub fn says_chunk_too_big(&self) -> bool {
        matches!(self, BodyError::Interrupted(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_body_cut_off_mid_way_counts_against_the_chunk_size() {
        assert!(BodyError::Interrupted("reset".into()).says_chunk_too_big());
        assert!(!BodyError::Stalled { idle_secs: 30 }.says_chunk_too_big());
        assert!(!BodyError::Superseded.says_chunk_too_big());
        assert!(!BodyError::Malformed("bad chunk size".into()).says_chunk_too_big());
    }
}
