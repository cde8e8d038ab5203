//! A filesystem that can lose power: an in-memory FUSE filesystem, mounted in the
//! test process, that remembers for every file the bytes last made durable by an
//! `fsync`/`fdatasync` of that file, and for every directory the entries last made
//! durable by an `fsync` of that directory. [`LossyFs::cut`] freezes it and brings
//! everything back to that durable state, as a power cut would: a new file, a
//! `mkdir`, an unlink or a rename survives only once its parent directory was
//! synced; bytes survive only once their file was synced. `sync_file_range` never
//! reaches a FUSE filesystem, so it makes nothing durable here (as on a real disk,
//! where it flushes no drive cache and no metadata).
//!
//! Every file is opened with direct I/O and nothing is cached by the kernel
//! (entry and attribute lifetimes are zero), so what a process reads after a cut is
//! exactly the reverted state.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use tempfile::TempDir;

/// Nothing is cached in the kernel: after a cut every lookup sees the reverted tree.
const TTL: Duration = Duration::ZERO;
const BLOCK_SIZE: u32 = 4096;
/// The size `statfs` reports; only used bytes count against it.
const CAPACITY_BYTES: u64 = 64 << 30;
const ROOT: u64 = 1;
/// Dirty ranges kept per file before they are merged into one.
const MAX_DIRTY_RANGES: usize = 256;

/// A mounted [`LossyFs`]; unmounted on drop.
pub struct LossyFs {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    _dir: TempDir,
}

/// What a cut threw away, path by path (relative to the mount point).
#[derive(Debug, Default)]
pub struct CutReport {
    pub lost: Vec<String>,
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lost.is_empty() {
            return write!(f, "  (nothing: every file and entry was durable)");
        }
        for line in &self.lost {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl LossyFs {
    /// Mounts an empty filesystem on a new temporary directory (needs /dev/fuse
    /// and root, or `fusermount3`).
    pub fn mount() -> LossyFs {
        let dir = tempfile::tempdir().expect("mount point");
        let mountpoint = dir.path().canonicalize().expect("mount point path");
        let owner = std::fs::metadata(&mountpoint).expect("mount point metadata");
        let state = Arc::new(Mutex::new(State::new(owner.uid(), owner.gid())));
        let mut config = fuser::Config::default();
        config.mount_options = vec![MountOption::FSName("lossyfs".into())];
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(
            Daemon {
                state: state.clone(),
            },
            &mountpoint,
            &config,
        )
        .unwrap_or_else(|e| {
            panic!(
                "mounting the power-cut filesystem on {}: {e} \
                 (it needs /dev/fuse, and root or fusermount3 from Debian's fuse3)",
                mountpoint.display()
            )
        });
        LossyFs {
            state,
            session: Some(session),
            mountpoint,
            _dir: dir,
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The power cut: from now on every operation fails with EIO (nothing more is
    /// applied), and every file and directory is back in its durable state.
    /// Returns what was lost.
    pub fn cut(&self) -> CutReport {
        let mut state = self.lock();
        state.frozen = true;
        let report = state.unsynced();
        state.revert();
        report
    }

    /// Power is back: operations are applied again.
    pub fn resume(&self) {
        self.lock().frozen = false;
    }

    /// `fsync`/`fdatasync` calls seen per file, and `fsync` calls per directory,
    /// by the path the file or directory had then ("" is the mount point).
    pub fn fsyncs(&self) -> BTreeMap<String, u64> {
        self.lock().fsyncs.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for LossyFs {
    fn drop(&mut self) {
        // Never leave the power off for whoever still holds a file open.
        self.resume();
        if let Some(session) = self.session.take() {
            if session.umount_and_join().is_err() {
                // Still in use (a process that outlived its test): detach it
                // lazily, so the temporary directory can go.
                if let Ok(path) =
                    std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
                {
                    // SAFETY: `path` is a valid NUL-terminated string for the call's duration.
                    unsafe {
                        libc::umount2(path.as_ptr(), libc::MNT_DETACH);
                    }
                }
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct State {
    /// Set by a cut: every operation fails until `resume`.
    frozen: bool,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    next_fh: u64,
    uid: u32,
    gid: u32,
    fsyncs: BTreeMap<String, u64>,
}

struct Node {
    /// Where the node was last linked, for the paths in reports.
    parent: u64,
    name: OsString,
    perm: u16,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    body: Body,
}

enum Body {
    File(FileBody),
    Dir(DirBody),
}

#[derive(Default)]
struct FileBody {
    data: Vec<u8>,
    /// The bytes (and length) as of the last fsync of this file.
    durable: Vec<u8>,
    /// Ranges changed since the last fsync (they may overlap).
    dirty: Vec<(u64, u64)>,
}

#[derive(Default)]
struct DirBody {
    entries: BTreeMap<OsString, u64>,
    /// The entries as of the last fsync of this directory.
    durable: BTreeMap<OsString, u64>,
}

impl FileBody {
    fn mark(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        if let Some(last) = self.dirty.last_mut() {
            if start <= last.1 && end >= last.0 {
                *last = (last.0.min(start), last.1.max(end));
                return;
            }
        }
        self.dirty.push((start, end));
        if self.dirty.len() > MAX_DIRTY_RANGES {
            let lo = self.dirty.iter().map(|r| r.0).min().unwrap_or(0);
            let hi = self.dirty.iter().map(|r| r.1).max().unwrap_or(0);
            self.dirty = vec![(lo, hi)];
        }
    }

    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), Errno> {
        let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
        let end = start + buf.len();
        let old_len = self.len();
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(buf);
        // A write past the end also changes the gap it leaves (zeros now).
        self.mark(offset.min(old_len), end as u64);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> Result<(), Errno> {
        let new_len = usize::try_from(len).map_err(|_| Errno::EFBIG)?;
        let old_len = self.len();
        self.data.resize(new_len, 0);
        self.mark(old_len.min(len), old_len.max(len));
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.len());
        if offset < end {
            self.data[offset as usize..end as usize].fill(0);
            self.mark(offset, end);
        }
    }

    fn sync(&mut self) {
        let len = self.data.len();
        self.durable.resize(len, 0);
        for &(a, b) in &self.dirty {
            let (a, b) = ((a as usize).min(len), (b as usize).min(len));
            self.durable[a..b].copy_from_slice(&self.data[a..b]);
        }
        self.dirty.clear();
    }

    fn revert(&mut self) {
        self.data.clone_from(&self.durable);
        self.dirty.clear();
    }

    /// Bytes changed since the last fsync, within the current length.
    fn unsynced(&self) -> u64 {
        self.dirty
            .iter()
            .map(|&(a, b)| b.min(self.len()).saturating_sub(a))
            .sum()
    }
}

impl State {
    fn new(uid: u32, gid: u32) -> State {
        let now = SystemTime::now();
        let root = Node {
            parent: ROOT,
            name: OsString::new(),
            perm: 0o755,
            atime: now,
            mtime: now,
            ctime: now,
            body: Body::Dir(DirBody::default()),
        };
        State {
            frozen: false,
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            next_fh: 1,
            uid,
            gid,
            fsyncs: BTreeMap::new(),
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&DirBody, Errno> {
        match &self.node(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirBody, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileBody, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::File(file) => Ok(file),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.node(ino)?;
        let (kind, size, nlink) = match &node.body {
            Body::File(file) => (FileType::RegularFile, file.len(), 1),
            Body::Dir(_) => (FileType::Directory, u64::from(BLOCK_SIZE), 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
            crtime: node.ctime,
            kind,
            perm: node.perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        })
    }

    /// Links a new node under `parent` (not durable until `parent` is synced).
    fn add(&mut self, parent: u64, name: &OsStr, perm: u16, body: Body) -> Result<u64, Errno> {
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_owned(),
                perm,
                atime: now,
                mtime: now,
                ctime: now,
                body,
            },
        );
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.touch(parent);
        Ok(ino)
    }

    fn touch(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let now = SystemTime::now();
            node.mtime = now;
            node.ctime = now;
        }
    }

    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name)?;
        match (&self.node(ino)?.body, want_dir) {
            (Body::File(_), true) => return Err(Errno::ENOTDIR),
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::Dir(dir), true) if !dir.entries.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.touch(parent);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.child(parent, name)?;
        let source_is_dir = matches!(self.node(ino)?.body, Body::Dir(_));
        if let Ok(target) = self.child(new_parent, new_name) {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (&self.node(target)?.body, source_is_dir) {
                (Body::Dir(_), false) => return Err(Errno::EISDIR),
                (Body::File(_), true) => return Err(Errno::ENOTDIR),
                (Body::Dir(dir), true) if !dir.entries.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        self.dir_mut(new_parent)?; // the target must be a directory
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(new_parent)?
            .entries
            .insert(new_name.to_owned(), ino);
        let node = self.node_mut(ino)?;
        node.parent = new_parent;
        node.name = new_name.to_owned();
        node.ctime = SystemTime::now();
        self.touch(parent);
        self.touch(new_parent);
        Ok(())
    }

    fn path_of(&self, mut ino: u64) -> String {
        let mut names = Vec::new();
        while ino != ROOT {
            let Some(node) = self.nodes.get(&ino) else {
                break;
            };
            names.push(node.name.to_string_lossy().into_owned());
            ino = node.parent;
        }
        names.reverse();
        names.join("/")
    }

    fn count_fsync(&mut self, ino: u64) {
        let path = self.path_of(ino);
        *self.fsyncs.entry(path).or_default() += 1;
    }

    /// Every path reachable from the root through current (or durable) entries.
    fn tree(&self, durable: bool) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(ROOT, String::new())];
        while let Some((ino, path)) = stack.pop() {
            let Ok(dir) = self.dir(ino) else {
                continue;
            };
            let entries = if durable { &dir.durable } else { &dir.entries };
            for (name, &child) in entries {
                let child_path = if path.is_empty() {
                    name.to_string_lossy().into_owned()
                } else {
                    format!("{path}/{}", name.to_string_lossy())
                };
                // A rename can leave a directory durably linked in two places;
                // visit each path once.
                if out.insert(child_path.clone(), child).is_none() {
                    stack.push((child, child_path));
                }
            }
        }
        out
    }

    /// What reverting to the durable state would throw away.
    fn unsynced(&self) -> CutReport {
        let now = self.tree(false);
        let durable = self.tree(true);
        let mut lost = Vec::new();
        for (path, &ino) in &now {
            let Some(node) = self.nodes.get(&ino) else {
                continue;
            };
            let kind = match node.body {
                Body::File(_) => "file",
                Body::Dir(_) => "directory",
            };
            match durable.get(path) {
                None => lost.push(format!("{path}: {kind} entry not durable (gone)")),
                Some(&old) if old != ino => lost.push(format!(
                    "{path}: replaced {kind} not durable (the old one is back)"
                )),
                Some(_) => {}
            }
            if let Body::File(file) = &node.body {
                if file.unsynced() > 0 || file.durable.len() != file.data.len() {
                    lost.push(format!(
                        "{path}: {} bytes, {} durable; {} bytes written since its last fsync",
                        file.len(),
                        file.durable.len(),
                        file.unsynced()
                    ));
                }
            }
        }
        for path in durable.keys() {
            if !now.contains_key(path) {
                lost.push(format!("{path}: removal not durable (it is back)"));
            }
        }
        CutReport { lost }
    }

    fn revert(&mut self) {
        for node in self.nodes.values_mut() {
            match &mut node.body {
                Body::File(file) => file.revert(),
                Body::Dir(dir) => dir.entries.clone_from(&dir.durable),
            }
        }
        // Names for reports follow the reverted tree.
        let mut stack = vec![ROOT];
        let mut seen = std::collections::HashSet::from([ROOT]);
        while let Some(ino) = stack.pop() {
            let Ok(dir) = self.dir(ino) else {
                continue;
            };
            let children: Vec<(OsString, u64)> =
                dir.entries.iter().map(|(n, &c)| (n.clone(), c)).collect();
            for (name, child) in children {
                if seen.insert(child) {
                    if let Some(node) = self.nodes.get_mut(&child) {
                        node.parent = ino;
                        node.name = name;
                    }
                    stack.push(child);
                }
            }
        }
    }

    fn used_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match &n.body {
                Body::File(f) => f.len() + f.durable.len() as u64,
                Body::Dir(_) => u64::from(BLOCK_SIZE),
            })
            .sum()
    }

    fn new_fh(&mut self) -> FileHandle {
        let fh = self.next_fh;
        self.next_fh += 1;
        FileHandle(fh)
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

/// The FUSE side: every operation runs under the one state lock, so a cut falls
/// between two operations.
struct Daemon {
    state: Arc<Mutex<State>>,
}

impl Daemon {
    /// Runs `op` unless the power is off.
    fn live<T>(&self, op: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut state = lock(&self.state);
        if state.frozen {
            return Err(Errno::EIO);
        }
        op(&mut state)
    }
}

fn reply_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Daemon {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.live(|s| s.attr(s.child(parent.0, name)?)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.live(|s| s.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.live(|s| {
            if let Some(size) = size {
                s.file_mut(ino.0)?.set_len(size)?;
                s.touch(ino.0);
            }
            let node = s.node_mut(ino.0)?;
            if let Some(mode) = mode {
                node.perm = perm(mode, 0);
                node.ctime = SystemTime::now();
            }
            if let Some(t) = atime {
                node.atime = time(t);
            }
            if let Some(t) = mtime {
                node.mtime = time(t);
            }
            s.attr(ino.0)
        });
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.live(|s| {
                let ino = s.add(
                    parent.0,
                    name,
                    perm(mode, umask),
                    Body::Dir(DirBody::default()),
                )?;
                s.attr(ino)
            }),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.live(|s| s.remove(parent.0, name, false)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.live(|s| s.remove(parent.0, name, true)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.live(|s| s.rename(parent.0, name, newparent.0, newname, flags)),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = self.live(|s| {
            if flags.0 & libc::O_TRUNC != 0 {
                s.file_mut(ino.0)?.set_len(0)?;
            } else {
                s.node(ino.0)?;
            }
            Ok(s.new_fh())
        });
        match result {
            Ok(fh) => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.live(|s| {
            let ino = match s.child(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Ok(ino) => {
                    if flags & libc::O_TRUNC != 0 {
                        s.file_mut(ino)?.set_len(0)?;
                    }
                    ino
                }
                Err(_) => s.add(
                    parent.0,
                    name,
                    perm(mode, umask),
                    Body::File(FileBody::default()),
                )?,
            };
            Ok((s.attr(ino)?, s.new_fh()))
        });
        match result {
            Ok((attr, fh)) => {
                reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.live(|s| {
            let file = s.file_mut(ino.0)?;
            let start = (offset.min(file.len())) as usize;
            let end = (offset.saturating_add(u64::from(size)).min(file.len())) as usize;
            Ok(file.data[start..end].to_vec())
        });
        match result {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.live(|s| {
            s.file_mut(ino.0)?.write(offset, data)?;
            s.touch(ino.0);
            Ok(())
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(): nothing to write back (there is no cache), nothing made durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fdatasync makes the length durable too: it is needed to read the data back.
        reply_empty(
            reply,
            self.live(|s| {
                s.file_mut(ino.0)?.sync();
                s.count_fsync(ino.0);
                Ok(())
            }),
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.live(|s| {
            s.dir(ino.0)?;
            Ok(s.new_fh())
        }) {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = self.live(|s| {
            let node = s.node(ino.0)?;
            let parent = node.parent;
            let mut listing = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (parent, FileType::Directory, OsString::from("..")),
            ];
            for (name, &child) in &s.dir(ino.0)?.entries {
                let kind = match s.node(child)?.body {
                    Body::File(_) => FileType::RegularFile,
                    Body::Dir(_) => FileType::Directory,
                };
                listing.push((child, kind, name.clone()));
            }
            Ok(listing)
        });
        match result {
            Ok(listing) => {
                for (i, (child, kind, name)) in
                    listing.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.live(|s| {
                let dir = s.dir_mut(ino.0)?;
                dir.durable.clone_from(&dir.entries);
                s.count_fsync(ino.0);
                Ok(())
            }),
        );
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.live(|s| Ok((s.used_bytes(), s.nodes.len() as u64))) {
            Ok((used, files)) => {
                let blocks = CAPACITY_BYTES / u64::from(BLOCK_SIZE);
                let free = blocks.saturating_sub(used.div_ceil(u64::from(BLOCK_SIZE)));
                let inodes = 1 << 20;
                reply.statfs(
                    blocks,
                    free,
                    free,
                    inodes,
                    inodes - files.min(inodes),
                    BLOCK_SIZE,
                    255,
                    BLOCK_SIZE,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply_empty(reply, self.live(|s| s.node(ino.0).map(|_| ())));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let result = self.live(|s| {
            let file = s.file_mut(ino.0)?;
            match mode {
                // Reserve space (and grow the file): zeros past the end.
                0 => {
                    let end = offset.saturating_add(length);
                    if end > file.len() {
                        file.set_len(end)?;
                    }
                }
                libc::FALLOC_FL_KEEP_SIZE => {}
                PUNCH => file.zero(offset, length),
                _ => return Err(Errno::EOPNOTSUPP),
            }
            s.touch(ino.0);
            Ok(())
        });
        reply_empty(reply, result);
    }
}
