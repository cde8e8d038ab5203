//! Local disk limits: a free-space watermark below which new uploads are refused,
//! and reservations that keep room for the declared size of uploads already accepted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use cin_domain::UploadId;

use crate::upload::UploadError;

pub struct Disk {
    data_dir: PathBuf,
    /// New uploads are refused when free space (less reservations) would drop below this.
    min_free: u64,
    retry_after_secs: u64,
    /// Bytes each accepted, unfinished upload may still write.
    reserved: Mutex<HashMap<UploadId, u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskUsage {
    pub free: u64,
    pub used: u64,
    pub reserved: u64,
}

impl Disk {
    pub fn new(data_dir: PathBuf, min_free: u64, retry_after_secs: u64) -> Self {
        Disk {
            data_dir,
            min_free,
            retry_after_secs,
            reserved: Mutex::new(HashMap::new()),
        }
    }

    fn reservations(&self) -> std::sync::MutexGuard<'_, HashMap<UploadId, u64>> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn usage(&self) -> DiskUsage {
        let (free, total) = match fs4::statvfs(&self.data_dir) {
            Ok(stats) => (stats.available_space(), stats.total_space()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read disk usage");
                (0, 0)
            }
        };
        DiskUsage {
            free,
            used: total.saturating_sub(free),
            reserved: self.reservations().values().sum(),
        }
    }

    /// Why the disk is too full to take new uploads, if it is.
    pub fn below_watermark(&self) -> Option<String> {
        let usage = self.usage();
        let room = usage.free.saturating_sub(usage.reserved);
        (room < self.min_free).then(|| {
            format!(
                "disk has {room} bytes free after reservations, below the watermark of {} bytes",
                self.min_free
            )
        })
    }

    /// Reserves room for a new upload of `size` bytes, or refuses it with 507.
    pub fn admit(&self, upload: &UploadId, size: u64) -> Result<(), UploadError> {
        let usage = self.usage();
        let room = usage
            .free
            .saturating_sub(usage.reserved)
            .saturating_sub(size);
        if room < self.min_free {
            return Err(UploadError::InsufficientStorage {
                message: format!(
                    "this POP is short of disk space ({} bytes free, {} reserved for uploads in progress); try again later or another POP",
                    usage.free, usage.reserved
                ),
                retry_after_secs: self.retry_after_secs,
            });
        }
        self.reservations().insert(upload.clone(), size);
        Ok(())
    }

    /// Restores a reservation on start-up for an upload accepted before.
    pub fn restore(&self, upload: &UploadId, remaining: u64) {
        self.reservations().insert(upload.clone(), remaining);
    }

    /// Bytes of an upload have landed: that much of its reservation is now used disk.
    pub fn consumed(&self, upload: &UploadId, bytes: u64) {
        if let Some(left) = self.reservations().get_mut(upload) {
            *left = left.saturating_sub(bytes);
        }
    }

    /// The upload finished, expired or was terminated.
    pub fn release(&self, upload: &UploadId) {
        self.reservations().remove(upload);
    }
}
