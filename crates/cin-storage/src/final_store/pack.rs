//! Packs: the small objects of a local final store, appended to pack files
//! (`{root}/.packs/{writer}-{seq:06}.pack`) instead of each getting a file.
//! Storing one costs an append and a share of one group-committed `fdatasync`,
//! not an inode, a directory entry and three fsyncs.
//!
//! A pack describes itself: each record carries its object's name, so every
//! process sharing the store's directory (several POPs on one shared origin)
//! finds objects by reading the packs; there is no index file to keep
//! consistent. A process writes only packs of its own (named by a random writer
//! id) and indexes what it reads; a name it does not know sends it to read what
//! the packs gained since. A record replaced or deleted is marked gone in place
//! and its bytes are freed (a punched hole). Every read checks the mark and the
//! checksums, so a process never serves what another one removed. Two
//! processes putting one name at the same moment may each keep serving their
//! own version until they restart (then the higher stamp wins); object keys
//! are handle-based unless a client names one.
//!
//! Packs are not rewritten: a record left behind costs its header and name.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::PutOutcome;
use crate::group_commit::{BatchError, GroupCommit};
use crate::parts::sync_dir;
use crate::segment_log::punch_hole;
use crate::StorageError;

/// The directory of packs under a local store's root (a name no container has:
/// containers never start with a dot).
pub const PACK_DIR: &str = ".packs";
/// A writer starts a new pack past this size.
const PACK_MAX: u64 = 64 << 20;

const MAGIC: [u8; 4] = *b"CINp";
const LIVE: u8 = 1;
const GONE: u8 = 2;
/// Magic, state, 3 reserved, stamp, data length, name length, data CRC32C,
/// header CRC32C (over the stamp to the data CRC, and the name), 4 reserved.
const HEADER_LEN: u64 = 40;
const STATE_AT: u64 = 4;

/// Where an object's current record is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Location {
    pack: Arc<str>,
    offset: u64,
    name_len: u64,
    data_len: u64,
    stamp: u64,
}

impl Location {
    fn data_offset(&self) -> u64 {
        self.offset + HEADER_LEN + self.name_len
    }
}

/// What this process knows of the packs: each object's newest record, and how
/// far each pack has been read.
#[derive(Default)]
struct Index {
    objects: HashMap<String, Location>,
    scanned: HashMap<Arc<str>, u64>,
}

fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

/// One object to append.
pub struct PackPut {
    pub name: String,
    pub data: Bytes,
}

pub struct Packs {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    commit: GroupCommit<PackPut, PutOutcome>,
}

impl Packs {
    /// Opens (creating) the pack directory and reads every pack in it.
    pub fn open(dir: PathBuf) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        // Its entry in the store's root; a pack's entry is synced when it is created.
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let index = Arc::new(Mutex::new(Index::default()));
        scan(&dir, &mut lock(&index))?;
        let mut writer = PackWriter {
            dir: dir.clone(),
            writer: format!("{:016x}", rand::random::<u64>()),
            seq: 0,
            current: None,
            index: index.clone(),
            last_stamp: 0,
        };
        let commit = GroupCommit::start("local-store-pack", move |batch| writer.write(batch))?;
        Ok(Packs { dir, index, commit })
    }

    /// Appends an object; returns once it is durable and read back.
    pub async fn put(&self, put: PackPut) -> Result<PutOutcome, StorageError> {
        self.commit.submit(put).await
    }

    /// The object's size, or None when no pack holds it. Blocking.
    pub fn size(&self, name: &str) -> Result<Option<u64>, StorageError> {
        Ok(self.read(name, false)?.map(|(loc, _)| loc.data_len))
    }

    /// The object's bytes, or None when no pack holds it. Blocking.
    pub fn bytes(&self, name: &str) -> Result<Option<Bytes>, StorageError> {
        Ok(self.read(name, true)?.map(|(_, data)| data))
    }

    /// Marks the object gone and frees its bytes; nothing when no pack holds it. Blocking.
    pub fn delete(&self, name: &str) -> Result<(), StorageError> {
        let removed = {
            let mut index = lock(&self.index);
            scan(&self.dir, &mut index)?;
            index.objects.remove(name)
        };
        match removed {
            Some(loc) => mark_gone(&self.dir, &loc, true),
            None => Ok(()),
        }
    }

    /// Reads the object's current record, checking it is still live and
    /// intact; a record another process replaced or deleted sends it to read
    /// the packs again.
    fn read(&self, name: &str, with_data: bool) -> Result<Option<(Location, Bytes)>, StorageError> {
        for attempt in 0..3 {
            let found = lock(&self.index).objects.get(name).cloned();
            let Some(loc) = found else {
                if attempt > 0 {
                    return Ok(None);
                }
                scan(&self.dir, &mut lock(&self.index))?;
                continue;
            };
            match read_record(&self.dir, &loc, name, with_data)? {
                Some(data) => return Ok(Some((loc, data))),
                None => {
                    let mut index = lock(&self.index);
                    if index.objects.get(name) == Some(&loc) {
                        index.objects.remove(name);
                    }
                    scan(&self.dir, &mut index)?;
                }
            }
        }
        Ok(None)
    }
}

fn io_error(path: &Path, doing: &str) -> impl FnOnce(io::Error) -> StorageError {
    let context = format!("{doing} {}", path.display());
    move |e| StorageError::io(context, e)
}

/// The record at `loc`, if it is still `name`'s live record: its data (empty
/// unless `with_data`, which also checks the data's checksum).
fn read_record(
    dir: &Path,
    loc: &Location,
    name: &str,
    with_data: bool,
) -> Result<Option<Bytes>, StorageError> {
    let path = dir.join(&*loc.pack);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&path, "opening")(e)),
    };
    let len = if with_data { loc.data_len } else { 0 };
    let mut record = vec![0u8; (HEADER_LEN + loc.name_len + len) as usize];
    match file.read_exact_at(&mut record, loc.offset) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io_error(&path, "reading")(e)),
    }
    let Some(header) = Header::parse(&record) else {
        return Ok(None);
    };
    let name_end = (HEADER_LEN + header.name_len) as usize;
    let intact = header.state == LIVE
        && header.stamp == loc.stamp
        && header.data_len == loc.data_len
        && header.name_len == loc.name_len
        && header.crc_matches(&record[HEADER_LEN as usize..name_end])
        && &record[HEADER_LEN as usize..name_end] == name.as_bytes();
    if !intact {
        return Ok(None);
    }
    if !with_data {
        return Ok(Some(Bytes::new()));
    }
    let data = Bytes::from(record).slice(name_end..);
    if crc32c::crc32c(&data) != header.data_crc {
        return Ok(None);
    }
    Ok(Some(data))
}

/// Marks a record gone, then frees its bytes. The mark is made durable when
/// the object is deleted; a replaced record needs no sync, as the newer stamp
/// wins when the packs are read after a crash.
fn mark_gone(dir: &Path, loc: &Location, durably: bool) -> Result<(), StorageError> {
    let path = dir.join(&*loc.pack);
    let file = match OpenOptions::new().write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(&path, "opening")(e)),
    };
    file.write_all_at(&[GONE], loc.offset + STATE_AT)
        .map_err(io_error(&path, "marking a record gone in"))?;
    if durably {
        file.sync_data().map_err(io_error(&path, "syncing"))?;
    }
    punch_hole(&file, loc.data_offset(), loc.data_len).map_err(io_error(&path, "freeing bytes of"))
}

struct Header {
    state: u8,
    stamp: u64,
    data_len: u64,
    name_len: u64,
    data_crc: u32,
    header_crc: u32,
    /// Bytes 8..32, which the header CRC covers with the name.
    covered: [u8; 24],
}

impl Header {
    /// Appends a live record of `name` holding `data` to `out`.
    fn encode(out: &mut Vec<u8>, stamp: u64, name: &[u8], data: &[u8]) {
        let mut covered = [0u8; 24];
        covered[0..8].copy_from_slice(&stamp.to_le_bytes());
        covered[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        covered[16..20].copy_from_slice(&(name.len() as u32).to_le_bytes());
        covered[20..24].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
        let header_crc = crc32c::crc32c_append(crc32c::crc32c(&covered), name);
        out.reserve(HEADER_LEN as usize + name.len() + data.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[LIVE, 0, 0, 0]);
        out.extend_from_slice(&covered);
        out.extend_from_slice(&header_crc.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(name);
        out.extend_from_slice(data);
    }

    /// None when `bytes` does not start with a record header.
    fn parse(bytes: &[u8]) -> Option<Header> {
        let bytes = bytes.get(..HEADER_LEN as usize)?;
        if bytes[0..4] != MAGIC {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let mut covered = [0u8; 24];
        covered.copy_from_slice(&bytes[8..32]);
        Some(Header {
            state: bytes[STATE_AT as usize],
            stamp: u64_at(8),
            data_len: u64_at(16),
            name_len: u64::from(u32_at(24)),
            data_crc: u32_at(28),
            header_crc: u32_at(32),
            covered,
        })
    }

    fn crc_matches(&self, name: &[u8]) -> bool {
        crc32c::crc32c_append(crc32c::crc32c(&self.covered), name) == self.header_crc
    }
}

/// Reads what every pack gained since it was last read: records past the
/// last whole one (a pack being written, or torn by a crash) are read again
/// next time.
fn scan(dir: &Path, index: &mut Index) -> Result<(), StorageError> {
    let entries = std::fs::read_dir(dir).map_err(io_error(dir, "listing"))?;
    for entry in entries {
        let entry = entry.map_err(io_error(dir, "listing"))?;
        let file_name = entry.file_name();
        let Some(pack) = file_name.to_str().filter(|n| n.ends_with(".pack")) else {
            continue;
        };
        let len = entry
            .metadata()
            .map_err(io_error(&entry.path(), "inspecting"))?
            .len();
        let (pack, from): (Arc<str>, u64) = match index.scanned.get_key_value(pack) {
            Some((_, &from)) if from >= len => continue,
            Some((known, &from)) => (known.clone(), from),
            None => (pack.into(), 0),
        };
        let path = entry.path();
        let file = match File::open(&path) {
            Ok(file) => file,
            // Removed since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&path, "opening")(e)),
        };
        let end = scan_pack(&file, &pack, from, len, index).map_err(io_error(&path, "reading"))?;
        index.scanned.insert(pack, end);
    }
    Ok(())
}

/// Indexes the whole records of `[from, len)`; returns where the last ended.
fn scan_pack(
    file: &File,
    pack: &Arc<str>,
    from: u64,
    len: u64,
    index: &mut Index,
) -> io::Result<u64> {
    let mut at = from;
    let mut head = [0u8; HEADER_LEN as usize];
    while at + HEADER_LEN <= len {
        file.read_exact_at(&mut head, at)?;
        let Some(header) = Header::parse(&head) else {
            break;
        };
        let end = at + HEADER_LEN + header.name_len + header.data_len;
        if end > len {
            break;
        }
        let mut name = vec![0u8; header.name_len as usize];
        file.read_exact_at(&mut name, at + HEADER_LEN)?;
        if !header.crc_matches(&name) {
            break;
        }
        let Ok(name) = String::from_utf8(name) else {
            break;
        };
        let loc = Location {
            pack: pack.clone(),
            offset: at,
            name_len: header.name_len,
            data_len: header.data_len,
            stamp: header.stamp,
        };
        if header.state != LIVE {
            if index.objects.get(&name) == Some(&loc) {
                index.objects.remove(&name);
            }
        } else if index
            .objects
            .get(&name)
            .is_none_or(|known| known.stamp < loc.stamp)
        {
            index.objects.insert(name, loc);
        }
        at = end;
    }
    Ok(at)
}

struct OpenPack {
    name: Arc<str>,
    path: PathBuf,
    file: File,
    len: u64,
}

/// The committer thread's state: the pack it appends to.
struct PackWriter {
    dir: PathBuf,
    /// Unique to this process, so no two processes ever append to one pack.
    writer: String,
    seq: u32,
    current: Option<OpenPack>,
    index: Arc<Mutex<Index>>,
    last_stamp: u64,
}

impl PackWriter {
    fn write(&mut self, batch: Vec<PackPut>) -> Vec<Result<PutOutcome, BatchError>> {
        match self.write_batch(&batch) {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(e) => {
                // Whatever of the batch landed is never followed by new records.
                self.current = None;
                let e = BatchError::from(e);
                vec![Err(e); batch.len()]
            }
        }
    }

    fn write_batch(&mut self, batch: &[PackPut]) -> Result<Vec<PutOutcome>, StorageError> {
        // The versions these replace, other processes' included: taken before
        // the append, as a read meanwhile may index the new records in their place.
        let replaced: Vec<Option<Location>> = {
            let mut index = lock(&self.index);
            scan(&self.dir, &mut index)?;
            batch
                .iter()
                .map(|put| index.objects.get(&put.name).cloned())
                .collect()
        };
        let mut buf = Vec::new();
        let mut records = Vec::with_capacity(batch.len());
        let mut outcomes = Vec::with_capacity(batch.len());
        for put in batch {
            let stamp = self.next_stamp();
            records.push((buf.len() as u64, stamp));
            Header::encode(&mut buf, stamp, put.name.as_bytes(), &put.data);
            outcomes.push(PutOutcome {
                sha256: hex::encode(Sha256::digest(&put.data)),
                size: put.data.len() as u64,
            });
        }
        let current = self.pack()?;
        let at = current.len;
        let path = &current.path;
        current
            .file
            .write_all_at(&buf, at)
            .map_err(io_error(path, "appending to"))?;
        current
            .file
            .sync_data()
            .map_err(io_error(path, "syncing"))?;
        // Read back what landed: the store's contract is verified, not merely written.
        let mut back = vec![0u8; buf.len()];
        current
            .file
            .read_exact_at(&mut back, at)
            .map_err(io_error(path, "reading back"))?;
        if back != buf {
            return Err(StorageError::Commit(format!(
                "{} holds different bytes than were appended",
                path.display()
            )));
        }
        current.len += buf.len() as u64;
        let pack = current.name.clone();
        let mut index = lock(&self.index);
        for ((put, (offset, stamp)), replaced) in batch.iter().zip(records).zip(replaced) {
            let loc = Location {
                pack: pack.clone(),
                offset: at + offset,
                name_len: put.name.len() as u64,
                data_len: put.data.len() as u64,
                stamp,
            };
            let displaced = index.objects.insert(put.name.clone(), loc.clone());
            for older in [replaced, displaced].into_iter().flatten() {
                if older != loc {
                    mark_gone(&self.dir, &older, false)?;
                }
            }
        }
        Ok(outcomes)
    }

    /// The pack to append to: a new one when there is none or it is full.
    fn pack(&mut self) -> Result<&mut OpenPack, StorageError> {
        if self.current.as_ref().is_none_or(|p| p.len >= PACK_MAX) {
            self.seq += 1;
            let name: Arc<str> = format!("{}-{:06}.pack", self.writer, self.seq).into();
            let path = self.dir.join(&*name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_error(&path, "creating"))?;
            sync_dir(&self.dir)?;
            self.current = Some(OpenPack {
                name,
                path,
                file,
                len: 0,
            });
        }
        self.current
            .as_mut()
            .ok_or_else(|| StorageError::Commit("no pack is open".into()))
    }

    /// Later than every stamp this writer gave, and than the clock: the newest
    /// record of a name is the one with the highest stamp.
    fn next_stamp(&mut self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.last_stamp = now.max(self.last_stamp + 1);
        self.last_stamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn put(name: &str, data: &[u8]) -> PackPut {
        PackPut {
            name: name.into(),
            data: Bytes::copy_from_slice(data),
        }
    }

    fn pack_files(dir: &Path) -> Vec<PathBuf> {
        let mut packs: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        packs.sort();
        packs
    }

    #[tokio::test]
    async fn objects_are_found_again_after_a_restart() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(PACK_DIR);
        let packs = Packs::open(dir.clone()).unwrap();
        let outcome = packs.put(put("c/a", b"first")).await.unwrap();
        assert_eq!(outcome.size, 5);
        assert_eq!(outcome.sha256, hex::encode(Sha256::digest(b"first")));
        packs.put(put("c/b", &[7u8; 20_000])).await.unwrap();
        drop(packs);

        let reopened = Packs::open(dir.clone()).unwrap();
        assert_eq!(reopened.bytes("c/a").unwrap().unwrap(), &b"first"[..]);
        assert_eq!(reopened.size("c/b").unwrap(), Some(20_000));
        assert_eq!(reopened.bytes("c/missing").unwrap(), None);
        assert_eq!(pack_files(&dir).len(), 1, "two objects, one pack file");
    }

    #[tokio::test]
    async fn processes_sharing_the_directory_see_each_others_puts_replacements_and_deletes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(PACK_DIR);
        let a = Packs::open(dir.clone()).unwrap();
        let b = Packs::open(dir.clone()).unwrap();
        a.put(put("c/manifest", b"version 1")).await.unwrap();
        assert_eq!(b.bytes("c/manifest").unwrap().unwrap(), &b"version 1"[..]);

        // b's index still points at version 1, which a's replacement marked gone.
        a.put(put("c/manifest", b"version 2, longer"))
            .await
            .unwrap();
        assert_eq!(
            b.bytes("c/manifest").unwrap().unwrap(),
            &b"version 2, longer"[..]
        );
        b.put(put("c/manifest", b"version 3")).await.unwrap();
        assert_eq!(a.bytes("c/manifest").unwrap().unwrap(), &b"version 3"[..]);

        a.delete("c/manifest").unwrap();
        assert_eq!(b.bytes("c/manifest").unwrap(), None);
        assert_eq!(b.size("c/manifest").unwrap(), None);
        assert_eq!(
            pack_files(&dir).len(),
            2,
            "each process writes packs of its own"
        );

        let third = Packs::open(dir).unwrap();
        assert_eq!(
            third.bytes("c/manifest").unwrap(),
            None,
            "gone after a restart too"
        );
    }

    #[tokio::test]
    async fn a_record_torn_by_a_crash_hides_nothing_before_it_and_nothing_follows_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(PACK_DIR);
        let packs = Packs::open(dir.clone()).unwrap();
        packs.put(put("c/kept", b"acknowledged")).await.unwrap();
        drop(packs);
        let torn = &pack_files(&dir)[0];
        let mut whole = Vec::new();
        Header::encode(&mut whole, 1, b"c/torn", &[1u8; 1000]);
        let end = std::fs::metadata(torn).unwrap().len();
        let file = OpenOptions::new().write(true).open(torn).unwrap();
        file.write_all_at(&whole[..500], end).unwrap();
        drop(file);
        let torn_len = std::fs::metadata(torn).unwrap().len();

        let reopened = Packs::open(dir.clone()).unwrap();
        assert_eq!(
            reopened.bytes("c/kept").unwrap().unwrap(),
            &b"acknowledged"[..]
        );
        assert_eq!(reopened.bytes("c/torn").unwrap(), None);
        reopened.put(put("c/after", b"new")).await.unwrap();
        assert_eq!(std::fs::metadata(torn).unwrap().len(), torn_len);
        assert_eq!(
            pack_files(&dir).len(),
            2,
            "the new record went to a new pack"
        );
        assert_eq!(reopened.bytes("c/after").unwrap().unwrap(), &b"new"[..]);
    }

    #[tokio::test]
    async fn a_deleted_objects_blocks_are_freed_and_damaged_bytes_are_not_served() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(PACK_DIR);
        let packs = Packs::open(dir.clone()).unwrap();
        packs.put(put("c/big", &[9u8; 512 << 10])).await.unwrap();
        packs.put(put("c/damaged", &[3u8; 4096])).await.unwrap();
        let pack = pack_files(&dir)[0].clone();
        let before = std::fs::metadata(&pack).unwrap().blocks();
        packs.delete("c/big").unwrap();
        let after = std::fs::metadata(&pack).unwrap().blocks();
        assert!(after + 900 < before, "blocks went from {before} to {after}");

        let len = std::fs::metadata(&pack).unwrap().len();
        let file = OpenOptions::new().write(true).open(&pack).unwrap();
        file.write_all_at(b"X", len - 10).unwrap();
        assert_eq!(
            packs.bytes("c/damaged").unwrap(),
            None,
            "a checksum mismatch"
        );
    }
}
