//! The durability barrier under sled. sled 0.34's `flush()` ends in
//! `sync_file_range` on its log file on Linux, which writes the pages out but
//! neither the file's grown size nor the device's cache, and it writes large
//! values to blob files with no sync at all; a power cut after a "flushed" write
//! can lose it. After every flush the barrier `fdatasync`s the log file and
//! fsyncs every blob file (and the blob directory) that appeared since the last
//! barrier, so an acknowledgment that follows it survives a power cut.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::parts::sync_dir;
use crate::StorageError;

pub struct SledDurability {
    log: File,
    log_path: PathBuf,
    blobs: PathBuf,
    /// Blob files already made durable; blobs are written once and never changed.
    synced_blobs: HashSet<OsString>,
}

impl SledDurability {
    /// Opens the barrier over an open sled database at `path`, making the files
    /// and directories sled created at its first open durable too.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let log_path = path.join("db");
        let log = File::open(&log_path)
            .map_err(|e| StorageError::io(format!("opening {}", log_path.display()), e))?;
        let blobs = path.join("blobs");
        let mut barrier = SledDurability {
            log,
            log_path,
            blobs,
            synced_blobs: HashSet::new(),
        };
        for name in ["conf", "db"] {
            let file = path.join(name);
            File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|e| StorageError::io(format!("syncing {}", file.display()), e))?;
        }
        barrier.sync()?;
        sync_dir(path)?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(barrier)
    }

    /// Makes everything sled has flushed so far durable.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.log
            .sync_data()
            .map_err(|e| StorageError::io(format!("syncing {}", self.log_path.display()), e))?;
        self.sync_new_blobs()
    }

    fn sync_new_blobs(&mut self) -> Result<(), StorageError> {
        let listing = match std::fs::read_dir(&self.blobs) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(StorageError::io(
                    format!("listing {}", self.blobs.display()),
                    e,
                ))
            }
        };
        let mut present = HashSet::new();
        let mut synced_any = false;
        for entry in listing {
            let entry = entry
                .map_err(|e| StorageError::io(format!("listing {}", self.blobs.display()), e))?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                let path = entry.path();
                match File::open(&path).and_then(|f| f.sync_data()) {
                    Ok(()) => synced_any = true,
                    // Collected by sled meanwhile: nothing left to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(StorageError::io(format!("syncing {}", path.display()), e))
                    }
                }
            }
            present.insert(name);
        }
        if synced_any {
            sync_dir(&self.blobs)?;
        }
        // Forget blobs sled has removed, so the set stays as small as the directory.
        self.synced_blobs = present;
        Ok(())
    }
}
