//! The embedded default final store: a directory. An object larger than
//! [`PACKED_MAX`] is a file, `{root}/{container}/{key}`; a smaller one is a
//! record in a pack (see [`super::pack`]), so a small file costs no inode.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use std::io::{Read, Write};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::pack::{PackPut, Packs, PACK_DIR};
use super::{FinalStore, FinalStoreError, ObjectInfo, ObjectToStore, PutJournal, PutOutcome};
use crate::background::BackgroundPool;
use crate::parts::{join_error, sync_dir};
use crate::{ByteStream, StorageError};

pub struct LocalDirStore {
    root: PathBuf,
    copies: BackgroundPool,
    packs: Arc<Packs>,
}

/// Objects up to this size go into packs; larger ones are files of their own.
pub const PACKED_MAX: u64 = 1 << 20;

/// Files copied into the store at the same time.
const COPY_THREADS: usize = 1;

impl LocalDirStore {
    /// Objects are written under a temporary name starting so, then renamed into
    /// place; one left behind is a copy a crash interrupted.
    pub const TEMP_FILE_PREFIX: &'static str = ".incoming-";

    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| StorageError::io(format!("creating {}", root.display()), e))?;
        if let Some(parent) = root.parent() {
            sync_dir(parent)?;
        }
        let packs = Arc::new(Packs::open(root.join(PACK_DIR))?);
        Ok(LocalDirStore {
            root,
            copies: BackgroundPool::start("local-store", COPY_THREADS)?,
            packs,
        })
    }

    /// Appends a small object to a pack. Reads look for a file first, so a
    /// file an earlier, larger version left under the name goes before: a
    /// crash in between leaves no object, and the put is retried.
    async fn put_packed(
        &self,
        name: String,
        path: PathBuf,
        data: bytes::Bytes,
    ) -> Result<PutOutcome, FinalStoreError> {
        remove_if_present(&path).await?;
        Ok(self.packs.put(PackPut { name, data }).await?)
    }

    /// Runs a blocking read of the packs.
    async fn in_packs<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Packs) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, FinalStoreError> {
        let packs = self.packs.clone();
        tokio::task::spawn_blocking(move || read(&packs))
            .await
            .map_err(join_error)?
            .map_err(FinalStoreError::from)
    }

    fn object_path(&self, container: &str, key: &str) -> Result<PathBuf, FinalStoreError> {
        let rel = Path::new(container).join(key);
        // Keys come from validated store options, but the store must not trust that.
        if container.is_empty()
            || key.is_empty()
            || key.ends_with('/')
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(FinalStoreError::Rejected(format!(
                "object name {container}/{key} is not a plain relative path"
            )));
        }
        Ok(self.root.join(rel))
    }
}

/// An object's name in the packs.
fn packed_name(container: &str, key: &str) -> String {
    format!("{container}/{key}")
}

/// Removes the file at `path`, if there is one (a directory there holds
/// other objects).
async fn remove_if_present(path: &Path) -> Result<(), FinalStoreError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::IsADirectory
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
    }
}

/// Reads a small local copy whole, checking it has the size its record says.
fn read_small(mut source: impl Read, size: u64) -> Result<bytes::Bytes, FinalStoreError> {
    let mut data = Vec::with_capacity(size as usize);
    source
        .read_to_end(&mut data)
        .map_err(io_err("reading the local copy".into()))?;
    if data.len() as u64 != size {
        return Err(FinalStoreError::Verification(format!(
            "local copy has {} bytes, the record says {size}",
            data.len()
        )));
    }
    Ok(data.into())
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> FinalStoreError {
    move |e| FinalStoreError::Local(StorageError::io(context, e))
}

const COPY_BUFFER: usize = 256 * 1024;

/// Reads everything from `reader`, hashing it and handing each piece to `sink`.
fn hash_through(
    reader: &mut impl Read,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        sink(&buf[..n])?;
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Copies a local file into `path` through a temporary name: written, fsync'd,
/// read back and compared, then renamed into place and its directory fsync'd.
fn copy_durably(
    mut source: impl Read,
    size: u64,
    root: &Path,
    path: &Path,
) -> Result<PutOutcome, FinalStoreError> {
    let dir = path
        .parent()
        .ok_or_else(|| FinalStoreError::Rejected(format!("{} has no parent", path.display())))?;
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let tmp = dir.join(format!(
        "{}{}",
        LocalDirStore::TEMP_FILE_PREFIX,
        cin_domain::UploadId::generate()
    ));
    let result = (|| {
        let mut out =
            std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let (sent, written) = hash_through(&mut source, |piece| out.write_all(piece)).map_err(
            io_err(format!("copying the local copy to {}", tmp.display())),
        )?;
        out.sync_all()
            .map_err(io_err(format!("syncing {}", tmp.display())))?;
        drop(out);
        if written != size {
            return Err(FinalStoreError::Verification(format!(
                "local copy has {written} bytes, the record says {size}"
            )));
        }
        // Read back what landed: the contract is verified, not merely written.
        let mut landed_file =
            std::fs::File::open(&tmp).map_err(io_err(format!("opening {}", tmp.display())))?;
        let (landed, landed_size) = hash_through(&mut landed_file, |_| Ok(()))
            .map_err(io_err(format!("reading {}", tmp.display())))?;
        if landed != sent || landed_size != written {
            return Err(FinalStoreError::Verification(format!(
                "wrote sha256 {sent} ({written} bytes) but read back {landed} ({landed_size} bytes)"
            )));
        }
        std::fs::rename(&tmp, path).map_err(io_err(format!("renaming into {}", path.display())))?;
        // Every directory from the object's up to the store root: an earlier
        // attempt may have created some of them and failed before syncing.
        for ancestor in dir.ancestors().take_while(|d| d.starts_with(root)) {
            sync_dir(ancestor)?;
        }
        Ok(PutOutcome {
            sha256: sent,
            size: written,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[async_trait]
impl FinalStore for LocalDirStore {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    async fn put(
        &self,
        object: &ObjectToStore<'_>,
        _journal: &dyn PutJournal,
    ) -> Result<PutOutcome, FinalStoreError> {
        let path = self.object_path(object.container, object.key)?;
        let name = packed_name(object.container, object.key);
        let source = object.source.reader();
        let size = object.source.size;
        if size <= PACKED_MAX {
            let data = self.copies.run(move || read_small(source, size)).await??;
            return self.put_packed(name, path, data).await;
        }
        let root = self.root.clone();
        // The whole copy in one job, on threads that yield to request handling.
        let outcome = self
            .copies
            .run(move || copy_durably(source, size, &root, &path))
            .await??;
        // Found after the file, but its bytes are freed.
        self.in_packs(move |packs| packs.delete(&name)).await?;
        Ok(outcome)
    }

    async fn put_bytes(
        &self,
        container: &str,
        key: &str,
        bytes: bytes::Bytes,
        _content_type: &str,
    ) -> Result<(), FinalStoreError> {
        let path = self.object_path(container, key)?;
        let name = packed_name(container, key);
        let size = bytes.len() as u64;
        if size <= PACKED_MAX {
            return self.put_packed(name, path, bytes).await.map(|_| ());
        }
        let root = self.root.clone();
        self.copies
            .run(move || copy_durably(io::Cursor::new(bytes), size, &root, &path))
            .await??;
        self.in_packs(move |packs| packs.delete(&name)).await
    }

    async fn head(
        &self,
        container: &str,
        key: &str,
    ) -> Result<Option<ObjectInfo>, FinalStoreError> {
        let path = self.object_path(container, key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => {
                return Ok(Some(ObjectInfo {
                    size: m.len(),
                    sha256: None,
                }))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("inspecting {}", path.display()))(e)),
        }
        let name = packed_name(container, key);
        let size = self.in_packs(move |packs| packs.size(&name)).await?;
        Ok(size.map(|size| ObjectInfo { size, sha256: None }))
    }

    async fn get(
        &self,
        container: &str,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ByteStream, FinalStoreError> {
        let path = self.object_path(container, key)?;
        // Small objects are packed; a file is a large one (a directory under
        // the name holds other objects' files).
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => match f.metadata().await {
                Ok(m) if m.is_file() => Some(f),
                Ok(_) => None,
                Err(e) => return Err(io_err(format!("inspecting {}", path.display()))(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
        };
        let Some(mut file) = file else {
            let name = packed_name(container, key);
            let data = self
                .in_packs(move |packs| packs.bytes(&name))
                .await?
                .ok_or_else(|| FinalStoreError::NotFound {
                    container: container.into(),
                    key: key.into(),
                })?;
            let len = data.len();
            let (start, end) = range.map_or((0, len), |(start, end)| {
                let end = usize::try_from(end).unwrap_or(usize::MAX).min(len);
                (usize::try_from(start).unwrap_or(usize::MAX).min(end), end)
            });
            let piece = data.slice(start..end);
            return Ok(Box::pin(futures_util::stream::once(async move {
                Ok::<_, io::Error>(piece)
            })));
        };
        let len = match range {
            Some((start, end)) => {
                file.seek(io::SeekFrom::Start(start))
                    .await
                    .map_err(io_err(format!("seeking {}", path.display())))?;
                end.saturating_sub(start)
            }
            None => u64::MAX,
        };
        Ok(Box::pin(ReaderStream::with_capacity(
            file.take(len),
            256 * 1024,
        )))
    }

    async fn delete(&self, container: &str, key: &str) -> Result<(), FinalStoreError> {
        let path = self.object_path(container, key)?;
        let name = packed_name(container, key);
        self.in_packs(move |packs| packs.delete(&name)).await?;
        remove_if_present(&path).await
    }

    async fn check(&self) -> Result<(), FinalStoreError> {
        tokio::fs::metadata(&self.root)
            .await
            .map(|_| ())
            .map_err(io_err(format!("inspecting {}", self.root.display())))
    }
}
