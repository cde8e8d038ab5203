//! Where the bytes of an upload come from. Chunks are read on demand at their
//! offset, so memory stays at (parts in flight x chunk size) whatever the file size.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::ClientError;
use crate::state::FileIdentity;

#[async_trait]
pub trait ByteSource: Send + Sync {
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes, ClientError>;

    /// Fails when the source changed since the upload began (checked before completing).
    fn check_unchanged(&self) -> Result<(), ClientError> {
        Ok(())
    }
}

/// A file on disk.
#[derive(Debug, Clone)]
pub struct FileSource {
    file: Arc<std::fs::File>,
    identity: FileIdentity,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let identity = FileIdentity::of(path)?;
        let file = std::fs::File::open(&identity.path).map_err(|e| ClientError::io(path, e))?;
        Ok(FileSource {
            file: Arc::new(file),
            identity,
        })
    }

    pub fn identity(&self) -> &FileIdentity {
        &self.identity
    }

    pub fn path(&self) -> &PathBuf {
        &self.identity.path
    }
}

#[async_trait]
impl ByteSource for FileSource {
    fn len(&self) -> u64 {
        self.identity.size
    }

    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        let file = self.file.clone();
        let path = self.identity.path.clone();
        let expected = self.identity.size;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            match read_exact_at(&file, &mut buf, offset) {
                Ok(()) => Ok(Bytes::from(buf)),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    let actual = file.metadata().map(|m| m.len()).unwrap_or(0);
                    Err(ClientError::SourceChanged {
                        path,
                        expected,
                        actual,
                    })
                }
                Err(e) => Err(ClientError::io(path, e)),
            }
        })
        .await
        .map_err(|e| ClientError::Invalid(format!("file reader failed: {e}")))?
    }

    fn check_unchanged(&self) -> Result<(), ClientError> {
        let now = FileIdentity::of(&self.identity.path)?;
        if now != self.identity {
            return Err(ClientError::SourceChanged {
                path: self.identity.path.clone(),
                expected: self.identity.size,
                actual: now.size,
            });
        }
        Ok(())
    }
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Bytes already in memory.
#[derive(Debug, Clone)]
pub struct MemorySource(pub Bytes);

#[async_trait]
impl ByteSource for MemorySource {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(len as usize);
        if end > self.0.len() {
            return Err(ClientError::Invalid(format!(
                "read of {len} bytes at {offset} past the end ({} bytes)",
                self.0.len()
            )));
        }
        Ok(self.0.slice(start..end))
    }
}
