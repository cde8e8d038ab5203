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
    #[error("metadata store error: {0}")]
    Sled(#[from] sled::Error),
    #[error("making writes durable failed: {0}")]
    Commit(String),
    #[error("the {0} thread has stopped; the POP is shutting down")]
    Stopped(&'static str),
    #[error("metadata record {key} is corrupt ({reason}); restore the data directory from a backup or remove the record")]
    Corrupt { key: String, reason: String },
}

impl StorageError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
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
    #[error("reading the request body failed: {0}")]
    Body(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}
