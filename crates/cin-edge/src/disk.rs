//! Local disk accounting. Every byte an upload writes is counted against the disk:
//! - an upload of known size reserves its declared size when it starts; its
//!   writes claim new bytes from that reservation, so it can never hold more
//!   than it declared, and a reservation keeps room for it while others write;
//! - bytes of unknown size (tus `Upload-Defer-Length`, a `/api/store` body
//!   without `Content-Length`) are charged against the free-space watermark
//!   frame by frame, and stop there with 507;
//! - a reservation nobody writes to for `reservation_idle_secs` is given back and
//!   taken again (or refused, 507) when its upload continues;
//! - a space reserve (a file of zeros in the data directory) keeps room for the
//!   metadata store: when the disk fills it is given back, so records can still be
//!   written and a POP killed on a full disk starts again, and uploads may not use
//!   that room until the reserve is back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cin_domain::UploadId;
use futures_util::Stream;

use crate::config::DiskConfig;
use crate::upload::UploadError;
use crate::worker::{Worker, WorkerState};

/// The file holding the metadata store's reserve, in the data directory.
pub const SPACE_RESERVE_FILE: &str = "space-reserve";

/// How often idle reservations are looked for on the paths that sum reservations.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// How often the watch worker looks at the disk.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// A metered body looks at the disk again after at most this many bytes (fewer
/// when the room left is smaller), so a fast upload does not ask per frame.
const CHARGE_EVERY: u64 = 256 * 1024;

pub struct Disk {
    data_dir: PathBuf,
    /// Uploads are refused when free space (less reservations) would drop below this.
    min_free: u64,
    retry_after_secs: u64,
    /// A reservation whose upload writes nothing for this long is given back.
    idle_after: Duration,
    reserve: SpaceReserve,
    reservations: Mutex<Reservations>,
    /// Bytes allocated to files in the data directory (the space reserve aside),
    /// as last measured, and when.
    files_bytes: AtomicU64,
    files_measured: Mutex<Option<Instant>>,
}

/// How often the data directory's files are measured (a walk over the directory).
const MEASURE_FILES_EVERY: Duration = Duration::from_secs(30);

/// What this POP holds in its data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeld {
    /// Bytes allocated to its files (metadata, upload bodies, local copies), as
    /// last measured.
    pub files: u64,
    /// Bytes of the space set aside for the metadata store, while held.
    pub space_reserve: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskUsage {
    pub free: u64,
    pub used: u64,
    pub reserved: u64,
}

/// How a body's bytes are charged as they arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// The upload reserved room for these bytes: they only must not eat the
    /// metadata store's reserve.
    Reserved,
    /// Nothing was reserved (the size is not known): every frame must leave
    /// the watermark and every reservation intact.
    Growing,
}

#[derive(Default)]
struct Reservations {
    by_upload: HashMap<UploadId, Reservation>,
    /// Sum of `room + writing` over every reservation.
    total: u64,
    last_pruned: Option<Instant>,
}

struct Reservation {
    /// Bytes of the declared size neither written nor being written.
    room: u64,
    /// Bytes claimed by writes in progress; held until they are on disk.
    writing: u64,
    /// Writes in progress: a reservation with writers is never idle.
    writers: u32,
    last_active: Instant,
}

impl Reservation {
    fn new(room: u64) -> Self {
        Reservation {
            room,
            writing: 0,
            writers: 0,
            last_active: Instant::now(),
        }
    }
}

impl Reservations {
    fn held(&self, upload: &UploadId) -> u64 {
        self.by_upload.get(upload).map_or(0, |r| r.room + r.writing)
    }

    /// Sets an upload's room (keeping writes in progress), or adds the upload.
    fn set_room(&mut self, upload: &UploadId, room: u64) {
        let entry = self
            .by_upload
            .entry(upload.clone())
            .or_insert_with(|| Reservation::new(0));
        self.total = self.total - entry.room + room;
        entry.room = room;
        entry.last_active = Instant::now();
    }

    fn remove(&mut self, upload: &UploadId) {
        if let Some(r) = self.by_upload.remove(upload) {
            self.total -= r.room + r.writing;
        }
    }

    /// Gives back the reservations of uploads idle for `idle` or longer.
    fn prune(&mut self, idle: Duration) {
        let now = Instant::now();
        self.last_pruned = Some(now);
        let idle_ones: Vec<UploadId> = self
            .by_upload
            .iter()
            .filter(|(_, r)| r.writers == 0 && now.duration_since(r.last_active) >= idle)
            .map(|(id, _)| id.clone())
            .collect();
        for upload in idle_ones {
            let held = self.held(&upload);
            self.remove(&upload);
            if held > 0 {
                tracing::info!(%upload, bytes = held, idle_secs = idle.as_secs(), "gave back the disk room of an idle upload; it is taken again when the upload continues");
            }
        }
    }
}

impl Disk {
    /// Opens the disk accounting of `data_dir`. At start, before the metadata store
    /// opens: a full disk gets the space reserve back, so the store has room to open.
    pub fn open(data_dir: PathBuf, config: &DiskConfig) -> Self {
        let reserve = SpaceReserve::open(
            data_dir.join(SPACE_RESERVE_FILE),
            config.metadata_reserve_bytes,
        );
        let disk = Disk {
            data_dir,
            min_free: config.min_free_bytes,
            retry_after_secs: config.retry_after_secs,
            idle_after: Duration::from_secs(config.reservation_idle_secs),
            reserve,
            reservations: Mutex::new(Reservations::default()),
            files_bytes: AtomicU64::new(0),
            files_measured: Mutex::new(None),
        };
        disk.maintain_reserve();
        disk
    }

    /// Seconds a client refused for lack of disk is told to wait.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after_secs
    }

    fn reservations(&self, prune: bool) -> MutexGuard<'_, Reservations> {
        let mut r = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        let due = r
            .last_pruned
            .is_none_or(|at| at.elapsed() >= PRUNE_EVERY.min(self.idle_after));
        if prune || due {
            r.prune(self.idle_after);
        }
        r
    }

    /// Free and total bytes of the data directory's filesystem, as statvfs
    /// reports them; unreadable counts as full.
    fn space(&self) -> (u64, u64) {
        match fs4::statvfs(&self.data_dir) {
            Ok(stats) => (stats.available_space(), stats.total_space()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read disk usage");
                (0, 0)
            }
        }
    }

    fn free(&self) -> u64 {
        self.space().0
    }

    /// Free bytes uploads may use: the metadata store keeps the reserve's worth
    /// while the reserve is given back. A disk running low gives it back now.
    fn spendable(&self) -> u64 {
        let mut free = self.free();
        if self.reserve.held() && free < self.reserve.bytes {
            self.reserve.give_back();
            free = self.free();
        }
        if self.reserve.held() {
            free
        } else {
            free.saturating_sub(self.reserve.bytes)
        }
    }

    pub fn usage(&self) -> DiskUsage {
        let (free, total) = self.space();
        DiskUsage {
            free,
            used: total.saturating_sub(free),
            reserved: self.reservations(false).total,
        }
    }

    /// Why the disk is too full to take new uploads, if it is.
    pub fn below_watermark(&self) -> Option<String> {
        let spendable = self.spendable();
        if !self.reserve.held() && self.reserve.bytes > 0 {
            return Some(format!(
                "the disk is (nearly) full: the {} bytes kept for the metadata store are not set aside, so uploads are refused until space is freed",
                self.reserve.bytes
            ));
        }
        let reserved = self.reservations(true).total;
        let room = spendable.saturating_sub(reserved);
        (room < self.min_free).then(|| {
            format!(
                "disk has {room} bytes free after reservations, below the watermark of {} bytes",
                self.min_free
            )
        })
    }

    fn short_of_space(&self, spendable: u64, reserved: u64) -> UploadError {
        UploadError::InsufficientStorage {
            message: format!(
                "this POP is short of disk space ({spendable} bytes free, {reserved} reserved for uploads in progress); try again later or another POP"
            ),
            retry_after_secs: self.retry_after_secs,
        }
    }

    /// The 507 for a body stopped because the disk had no room for it.
    pub fn no_room(&self) -> UploadError {
        UploadError::InsufficientStorage {
            message: "this POP's disk has no room for the rest of this body, so it stopped reading it; bytes acknowledged before are kept; try again later or another POP".into(),
            retry_after_secs: self.retry_after_secs,
        }
    }

    /// Whether `size` more bytes fit next to every reservation (`own` is what the
    /// upload asking already holds) and the watermark.
    fn fits_beside_reservations(
        &self,
        r: &Reservations,
        spendable: u64,
        own: u64,
        size: u64,
    ) -> bool {
        let others = r.total - own;
        others
            .checked_add(size)
            .and_then(|n| n.checked_add(self.min_free))
            .is_some_and(|needed| spendable >= needed)
    }

    /// Reserves room for a new upload of `size` bytes (or sets the room of one
    /// whose size just became known), or refuses it with 507.
    pub fn admit(&self, upload: &UploadId, size: u64) -> Result<(), UploadError> {
        let spendable = self.spendable();
        let mut r = self.reservations(true);
        let own = r.held(upload);
        if !self.fits_beside_reservations(&r, spendable, own, size) {
            return Err(self.short_of_space(spendable, r.total));
        }
        r.set_room(upload, size);
        Ok(())
    }

    /// Restores a reservation on start-up for an upload accepted before.
    pub fn restore(&self, upload: &UploadId, remaining: u64) {
        self.reservations(false).set_room(upload, remaining);
    }

    /// The upload finished, expired or was terminated.
    pub fn release(&self, upload: &UploadId) {
        self.reservations(false).remove(upload);
    }

    /// A write into an upload begins. An upload whose reservation was given back
    /// while it was idle takes it again first: `remaining` says how many bytes it
    /// may still write, and with no room for them the write is refused with 507.
    pub fn begin_write(
        &self,
        upload: &UploadId,
        remaining: impl FnOnce() -> Result<u64, UploadError>,
    ) -> Result<DiskWrite<'_>, UploadError> {
        if self.join(upload) {
            return Ok(self.write_guard(upload));
        }
        let remaining = remaining()?;
        let spendable = self.spendable();
        let mut r = self.reservations(false);
        // Another write of the same upload may have taken it again meanwhile.
        if !r.by_upload.contains_key(upload) {
            if !self.fits_beside_reservations(&r, spendable, 0, remaining) {
                return Err(UploadError::InsufficientStorage {
                    message: format!(
                        "upload {upload} sent nothing for a while, so its reserved disk room went to others; there is no room for its remaining {remaining} bytes now; try again later"
                    ),
                    retry_after_secs: self.retry_after_secs,
                });
            }
            r.set_room(upload, remaining);
            tracing::info!(%upload, bytes = remaining, "an idle upload came back and took its disk room again");
        }
        if let Some(entry) = r.by_upload.get_mut(upload) {
            entry.writers += 1;
        }
        drop(r);
        Ok(self.write_guard(upload))
    }

    /// Counts a write on an upload that holds a reservation; false when it holds none.
    fn join(&self, upload: &UploadId) -> bool {
        let mut r = self.reservations(false);
        match r.by_upload.get_mut(upload) {
            Some(entry) => {
                entry.writers += 1;
                entry.last_active = Instant::now();
                true
            }
            None => false,
        }
    }

    fn write_guard(&self, upload: &UploadId) -> DiskWrite<'_> {
        DiskWrite {
            disk: self,
            upload: upload.clone(),
            claimed: 0,
        }
    }

    /// Whether a frame of `len` bytes may be written now, and if so how many
    /// bytes more would still fit after it.
    /// Whether `len` more bytes may be written now, charged as `charge`.
    pub fn fits(&self, len: u64, charge: Charge) -> bool {
        self.headroom(len, charge).is_some()
    }

    fn headroom(&self, len: u64, charge: Charge) -> Option<u64> {
        let spendable = self.spendable();
        let needed = match charge {
            Charge::Reserved => Some(len),
            Charge::Growing => {
                let r = self.reservations(false);
                r.total
                    .checked_add(self.min_free)
                    .and_then(|n| n.checked_add(len))
            }
        }?;
        spendable.checked_sub(needed)
    }

    /// Charges `body`'s frames against the disk as they arrive. When one does not
    /// fit, the body ends there (the frame is not passed on) and the returned
    /// [`NoRoom`] says so: the caller answers 507 rather than take a short body.
    pub fn meter<S>(self: &Arc<Self>, body: S, charge: Charge) -> (Metered<S>, NoRoom) {
        let stopped = NoRoom(Arc::new(AtomicBool::new(false)));
        let metered = Metered {
            inner: Box::pin(body),
            disk: self.clone(),
            charge,
            credit: 0,
            stopped: stopped.clone(),
        };
        (metered, stopped)
    }

    /// One look at the disk: idle reservations are given back, and the space
    /// reserve is given back on a full disk or made again once there is room.
    pub fn maintain(&self) {
        drop(self.reservations(true));
        self.maintain_reserve();
        self.measure_files();
    }

    /// What this POP holds in its data directory.
    pub fn held(&self) -> DataHeld {
        DataHeld {
            files: self.files_bytes.load(Ordering::Relaxed),
            space_reserve: if self.reserve.held() {
                self.reserve.bytes
            } else {
                0
            },
        }
    }

    /// Sums the blocks allocated to the data directory's files, at most every
    /// [`MEASURE_FILES_EVERY`]: what the POP holds, whatever else fills the disk.
    fn measure_files(&self) {
        {
            let mut measured = self
                .files_measured
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if measured.is_some_and(|at| at.elapsed() < MEASURE_FILES_EVERY) {
                return;
            }
            *measured = Some(Instant::now());
        }
        let reserve = self.data_dir.join(SPACE_RESERVE_FILE);
        let mut total = 0u64;
        let mut pending = vec![self.data_dir.clone()];
        while let Some(dir) = pending.pop() {
            // Files come and go while uploads run: what cannot be read is skipped.
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    pending.push(entry.path());
                } else if entry.path() != reserve {
                    use std::os::unix::fs::MetadataExt;
                    total += meta.blocks() * 512;
                }
            }
        }
        self.files_bytes.store(total, Ordering::Relaxed);
    }

    fn maintain_reserve(&self) {
        let free = self.free();
        let bytes = self.reserve.bytes;
        if self.reserve.held() {
            if free < bytes {
                self.reserve.give_back();
            }
        } else if bytes > 0 && free >= bytes.saturating_mul(3) {
            // Room for the reserve and as much again before it would be given back.
            self.reserve.make();
        }
    }
}

/// A write in progress on an upload; see [`Disk::begin_write`]. Claimed bytes
/// that never landed go back to the upload's reservation when it is dropped.
pub struct DiskWrite<'a> {
    disk: &'a Disk,
    upload: UploadId,
    claimed: u64,
}

impl DiskWrite<'_> {
    /// Claims `bytes` of the upload's reservation for new bytes about to be written.
    /// Refused with the room left when they do not fit: the upload would hold more
    /// than its declared size.
    pub fn claim(&mut self, bytes: u64) -> Result<(), u64> {
        if bytes == 0 {
            return Ok(());
        }
        let mut guard = self.disk.reservations(false);
        let Some(entry) = guard.by_upload.get_mut(&self.upload) else {
            return Err(0);
        };
        if entry.room < bytes {
            return Err(entry.room);
        }
        entry.room -= bytes;
        entry.writing += bytes;
        self.claimed += bytes;
        Ok(())
    }

    /// The claimed bytes are written and acknowledged: the disk holds them now.
    pub fn landed(&mut self) {
        let claimed = std::mem::take(&mut self.claimed);
        let mut guard = self.disk.reservations(false);
        let r = &mut *guard;
        let Some(entry) = r.by_upload.get_mut(&self.upload) else {
            return;
        };
        let landed = claimed.min(entry.writing);
        entry.writing -= landed;
        r.total -= landed;
    }

    /// Only `bytes` of the claim were written and acknowledged (a body broke
    /// off after some of its checked blocks); the rest goes back to the
    /// reservation when this write ends.
    pub fn landed_part(&mut self, bytes: u64) {
        let rest = self.claimed.saturating_sub(bytes);
        self.claimed -= rest;
        self.landed();
        self.claimed = rest;
    }

    /// `bytes` were written and acknowledged without a claim (a body whose length
    /// was not known before it ended): that much of the reservation is used disk.
    pub fn consumed(&mut self, bytes: u64) {
        let mut guard = self.disk.reservations(false);
        let r = &mut *guard;
        let Some(entry) = r.by_upload.get_mut(&self.upload) else {
            return;
        };
        let used = bytes.min(entry.room);
        entry.room -= used;
        r.total -= used;
    }
}

impl Drop for DiskWrite<'_> {
    fn drop(&mut self) {
        let mut r = self.disk.reservations(false);
        if let Some(entry) = r.by_upload.get_mut(&self.upload) {
            // Not acknowledged: the upload may still write these bytes.
            let unlanded = self.claimed.min(entry.writing);
            entry.writing -= unlanded;
            entry.room += unlanded;
            entry.writers = entry.writers.saturating_sub(1);
            entry.last_active = Instant::now();
        }
    }
}

/// Set when a [`Metered`] body stopped for lack of disk room.
#[derive(Clone, Debug)]
pub struct NoRoom(Arc<AtomicBool>);

impl NoRoom {
    pub fn hit(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A body whose frames are charged against the disk (see [`Disk::meter`]).
pub struct Metered<S> {
    inner: Pin<Box<S>>,
    disk: Arc<Disk>,
    charge: Charge,
    /// Bytes that may pass before the disk is looked at again.
    credit: u64,
    stopped: NoRoom,
}

impl<S, E> Stream for Metered<S>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.stopped.hit() {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.len() as u64;
                if len <= this.credit {
                    this.credit -= len;
                    return Poll::Ready(Some(Ok(frame)));
                }
                match this.disk.headroom(len, this.charge) {
                    Some(left) => {
                        this.credit = left.min(CHARGE_EVERY);
                        Poll::Ready(Some(Ok(frame)))
                    }
                    None => {
                        this.stopped.0.store(true, Ordering::Release);
                        Poll::Ready(None)
                    }
                }
            }
            other => other,
        }
    }
}

/// Room set aside for the metadata store: a file of `bytes` zeros. sled stops
/// for good at its first failed write, so it must never find the disk full.
struct SpaceReserve {
    path: PathBuf,
    bytes: u64,
    held: AtomicBool,
    /// Serialises giving back and making again.
    changing: Mutex<()>,
}

impl SpaceReserve {
    fn open(path: PathBuf, bytes: u64) -> Self {
        let present = std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes);
        let reserve = SpaceReserve {
            path,
            bytes,
            held: AtomicBool::new(bytes > 0 && present),
            changing: Mutex::new(()),
        };
        let _ = std::fs::remove_file(reserve.temporary());
        if bytes == 0 || !present {
            // None configured, or one of another size: what is there goes.
            remove_durably(&reserve.path);
        }
        reserve
    }

    fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    fn temporary(&self) -> PathBuf {
        self.path.with_extension("tmp")
    }

    /// Frees the reserve's room for the metadata store.
    fn give_back(&self) {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.held() {
            return;
        }
        remove_durably(&self.path);
        self.held.store(false, Ordering::Release);
        tracing::warn!(
            bytes = self.bytes,
            "the disk is full: gave the space reserve to the metadata store; uploads get 507 and /readyz fails until space is freed"
        );
    }

    /// Sets the room aside again (the disk has room once more).
    fn make(&self) {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if self.held() {
            return;
        }
        let tmp = self.temporary();
        let made = allocate(&tmp, self.bytes)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| e.to_string())
            .and_then(|()| sync_parent(&self.path).map_err(|e| e.to_string()));
        match made {
            Ok(()) => {
                self.held.store(true, Ordering::Release);
                tracing::info!(
                    bytes = self.bytes,
                    "set disk space aside for the metadata store"
                );
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(error = %e, bytes = self.bytes, "could not set disk space aside for the metadata store; trying again later");
            }
        }
    }
}

/// Creates `path` with `bytes` allocated (not a sparse file), synced.
fn allocate(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::create(path)?;
    let len = libc::off_t::try_from(bytes).map_err(std::io::Error::other)?;
    // SAFETY: posix_fallocate only reads its integer arguments; the file is open for writing.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    file.sync_all()
}

fn remove_durably(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Err(e) = sync_parent(path) {
                tracing::warn!(error = %e, path = %path.display(), "syncing a removal");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, path = %path.display(), "cannot remove"),
    }
}

/// Makes a change to `path`'s directory entry durable.
fn sync_parent(path: &Path) -> Result<(), cin_storage::StorageError> {
    path.parent().map_or(Ok(()), cin_storage::sync_dir)
}

/// Looks at the disk every second (see [`Disk::maintain`]).
pub struct DiskWatch(pub Arc<Disk>);

#[async_trait::async_trait]
impl Worker for DiskWatch {
    fn name(&self) -> &'static str {
        "disk-watch"
    }

    async fn work(&mut self) -> WorkerState {
        let disk = self.0.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || disk.maintain()).await {
            tracing::error!(error = %e, "watching the disk failed");
        }
        WorkerState::Idle(WATCH_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, min_free: u64) -> Disk {
        Disk::open(
            dir.to_path_buf(),
            &DiskConfig {
                min_free_bytes: min_free,
                metadata_reserve_bytes: 0,
                ..DiskConfig::default()
            },
        )
    }

    #[test]
    fn claims_stay_within_the_declared_size_and_unlanded_ones_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk(dir.path(), 0);
        let upload = UploadId::generate();
        disk.admit(&upload, 100).unwrap();
        let mut first = disk.begin_write(&upload, || Ok(100)).unwrap();
        let mut second = disk.begin_write(&upload, || Ok(100)).unwrap();
        first.claim(60).unwrap();
        assert_eq!(second.claim(60), Err(40), "60 + 60 > 100");
        second.claim(40).unwrap();
        first.landed();
        drop(first);
        // The second write failed: its 40 bytes may be written again.
        drop(second);
        assert_eq!(disk.usage().reserved, 40);
        let mut again = disk.begin_write(&upload, || Ok(0)).unwrap();
        assert_eq!(again.claim(41), Err(40));
        again.claim(40).unwrap();
        again.landed();
        drop(again);
        assert_eq!(disk.usage().reserved, 0);
    }

    #[test]
    fn idle_reservations_are_given_back_and_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(
            dir.path().to_path_buf(),
            &DiskConfig {
                min_free_bytes: 0,
                metadata_reserve_bytes: 0,
                reservation_idle_secs: 0,
                ..DiskConfig::default()
            },
        );
        let upload = UploadId::generate();
        disk.admit(&upload, 100).unwrap();
        let writing = disk.begin_write(&upload, || Ok(100)).unwrap();
        disk.maintain();
        assert_eq!(
            disk.usage().reserved,
            100,
            "a write in progress is not idle"
        );
        drop(writing);
        disk.maintain();
        assert_eq!(disk.usage().reserved, 0, "given back once idle");
        let mut back = disk.begin_write(&upload, || Ok(70)).unwrap();
        assert_eq!(back.claim(71), Err(70));
        back.claim(70).unwrap();
    }

    #[test]
    fn admission_counts_the_size_against_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk(dir.path(), 0);
        let free = disk.usage().free;
        assert!(disk.admit(&UploadId::generate(), free + (1 << 30)).is_err());
        assert!(disk.admit(&UploadId::generate(), u64::MAX).is_err());
        disk.admit(&UploadId::generate(), 0).unwrap();
    }
}
