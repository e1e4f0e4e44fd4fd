//! The FUSE filesystem: a passthrough over a backing directory whose file *data* is kept in a
//! per-inode [`Overlay`] until an `fsync`/`fdatasync` of that file.
//!
//! The model (docs/reliability.md, "Power cuts (FUSE)"):
//!
//! - **Data** (writes, hole punches, zeroing, size changes by `ftruncate`/`setattr`) stays in
//!   memory until the file is fsync'd (either kind: `fdatasync` persists the size too, as it
//!   must for reads to work). Reads see it (read-your-writes). `close` (FUSE `flush`/`release`)
//!   persists nothing. A write through a handle opened `O_SYNC`/`O_DSYNC` is synced at once.
//! - **Metadata** (create, mknod, mkdir, unlink, rmdir, rename, chmod, chown, extended
//!   attributes) is applied to the
//!   backing directory at once, as LazyFS does by default. The overlay is keyed by inode, so a
//!   renamed file keeps its unsynced data: renaming a temp file whose data was never fsync'd
//!   exposes, after a cut, a file of the *backing* length and content (typically empty) —
//!   which is what a real filesystem may do too, and what `write_atomic`'s fsync-before-rename
//!   guards against.
//! - **syncfs/sync** never reach a FUSE daemon (the kernel sends `FUSE_SYNCFS` to virtiofs
//!   only), so the filesystem alone cannot see them: data a program makes durable *only* with
//!   `syncfs` would be lost at a cut although a real filesystem keeps it. The control command
//!   `sync` persists every overlay (what `syncfs` does), and the `syncfs` interposer
//!   (`preload/syncfs.rs`, `LD_PRELOAD`ed into the program under test) sends it before each
//!   of the program's `syncfs` calls on the mount. `sync(2)` is not interposed.
//! - A **cut** drops every overlay, refuses every later request (EIO) and unmounts.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirEntryExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};

use crate::overlay::{Backing, Overlay};

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = fuser::FUSE_ROOT_ID;

/// One inode the kernel knows.
#[derive(Debug)]
struct Node {
    /// Path relative to the backing root ("" for the root); stale once `unlinked`.
    path: PathBuf,
    /// Open while any handle is: the backing file the overlay applies to.
    file: Option<File>,
    opens: u32,
    overlay: Overlay,
    unlinked: bool,
}

/// Figures of the layer's life, for the control socket's `status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub writes: u64,
    pub written_bytes: u64,
    pub fsyncs: u64,
    pub synced_bytes: u64,
    pub sync_all: u64,
}

/// The filesystem's state, shared with the control thread.
#[derive(Debug)]
pub struct State {
    root: PathBuf,
    nodes: HashMap<u64, Node>,
    by_backing: HashMap<u64, u64>,
    handles: HashMap<u64, u64>,
    next_ino: u64,
    next_fh: u64,
    dead: bool,
    pub stats: Stats,
}

/// What a cut threw away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub files: u64,
    pub bytes: u64,
}

impl State {
    pub fn new(root: &Path) -> io::Result<State> {
        let m = std::fs::metadata(root)?;
        let mut s = State {
            root: root.to_owned(),
            nodes: HashMap::new(),
            by_backing: HashMap::new(),
            handles: HashMap::new(),
            next_ino: ROOT + 1,
            next_fh: 1,
            dead: false,
            stats: Stats::default(),
        };
        s.nodes.insert(
            ROOT,
            Node {
                path: PathBuf::new(),
                file: None,
                opens: 0,
                overlay: Overlay::default(),
                unlinked: false,
            },
        );
        s.by_backing.insert(m.ino(), ROOT);
        Ok(s)
    }

    /// The power cut: every unsynced byte is dropped, and nothing is ever persisted again.
    pub fn cut(&mut self) -> Dropped {
        let mut d = Dropped { files: 0, bytes: 0 };
        for n in self.nodes.values_mut() {
            if !n.overlay.is_empty() {
                d.files += 1;
                d.bytes += n.overlay.pending_bytes();
            }
            n.overlay = Overlay::default();
            n.file = None;
        }
        self.dead = true;
        d
    }

    /// What `sync(2)` would do on a real filesystem: persist every overlay.
    pub fn sync_all(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.stats.sync_all += 1;
        let root = self.root.clone();
        for n in self.nodes.values_mut() {
            if n.overlay.is_empty() {
                continue;
            }
            let reopened;
            let f = match &n.file {
                Some(f) => f,
                None if n.unlinked => {
                    n.overlay = Overlay::default();
                    continue;
                }
                None => {
                    reopened = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(root.join(&n.path))?;
                    &reopened
                }
            };
            self.stats.synced_bytes += n.overlay.pending_bytes();
            n.overlay.apply(&FileBacking(f), false)?;
        }
        Ok(())
    }

    /// Pending (unsynced) files and bytes.
    pub fn pending(&self) -> Dropped {
        let mut d = Dropped { files: 0, bytes: 0 };
        for n in self.nodes.values() {
            if !n.overlay.is_empty() {
                d.files += 1;
                d.bytes += n.overlay.pending_bytes();
            }
        }
        d
    }

    fn path(&self, ino: u64) -> Result<PathBuf, i32> {
        let n = self.nodes.get(&ino).ok_or(libc::ENOENT)?;
        if n.unlinked {
            return Err(libc::ENOENT);
        }
        Ok(self.root.join(&n.path))
    }

    fn rel_child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        let n = self.nodes.get(&parent).ok_or(libc::ENOENT)?;
        if n.unlinked {
            return Err(libc::ENOENT);
        }
        Ok(n.path.join(name))
    }

    /// The node of the backing file at `rel` (looked up with lstat), made if new.
    fn node_for(&mut self, rel: &Path, fresh: bool) -> Result<(u64, Metadata), i32> {
        let m = std::fs::symlink_metadata(self.root.join(rel)).map_err(errno)?;
        if let Some(&ino) = self.by_backing.get(&m.ino()) {
            if !fresh {
                if let Some(n) = self.nodes.get_mut(&ino) {
                    n.path = rel.to_owned();
                    return Ok((ino, m));
                }
            }
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                path: rel.to_owned(),
                file: None,
                opens: 0,
                overlay: Overlay::default(),
                unlinked: false,
            },
        );
        self.by_backing.insert(m.ino(), ino);
        Ok((ino, m))
    }

    fn meta(&self, ino: u64) -> Result<Metadata, i32> {
        let n = self.nodes.get(&ino).ok_or(libc::ENOENT)?;
        match &n.file {
            Some(f) => f.metadata().map_err(errno),
            None => std::fs::symlink_metadata(self.root.join(&n.path)).map_err(errno),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        let m = self.meta(ino)?;
        let n = &self.nodes[&ino];
        Ok(attr_of(ino, &m, n.overlay.size(m.len())))
    }

    /// The backing file that `ino`'s overlay applies to, opened if it is not.
    fn ensure_open(&mut self, ino: u64) -> Result<(), i32> {
        let root = self.root.clone();
        let n = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        if n.file.is_none() {
            if n.unlinked {
                return Err(libc::ENOENT);
            }
            let p = root.join(&n.path);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .or_else(|_| File::open(&p))
                .map_err(errno)?;
            n.file = Some(f);
        }
        Ok(())
    }

    /// The backing file `rel` lost its name: forget it for lookups; drop its node (and
    /// unsynced data) unless a handle still holds it.
    fn forget_name(&mut self, backing_ino: u64) {
        if let Some(ino) = self.by_backing.remove(&backing_ino) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                if n.opens == 0 {
                    self.nodes.remove(&ino);
                } else {
                    n.unlinked = true;
                }
            }
        }
    }

    fn fsync(&mut self, ino: u64, datasync: bool) -> Result<(), i32> {
        self.ensure_open(ino)?;
        let n = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        let f = n.file.as_ref().expect("opened");
        self.stats.fsyncs += 1;
        self.stats.synced_bytes += n.overlay.pending_bytes();
        n.overlay.apply(&FileBacking(f), datasync).map_err(errno)
    }
}

/// A backing file as an overlay's [`Backing`].
pub struct FileBacking<'a>(pub &'a File);

impl Backing for FileBacking<'_> {
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.0.read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_all_at(buf, off)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self, data_only: bool) -> io::Result<()> {
        if data_only {
            self.0.sync_data()
        } else {
            self.0.sync_all()
        }
    }
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr_of(ino: u64, m: &Metadata, size: u64) -> FileAttr {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512).max(m.blocks()),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// `path` after its ancestor-or-self `from` was renamed to `to` (no trailing slash added).
fn moved(path: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    let rest = path.strip_prefix(from).ok()?;
    Some(if rest.as_os_str().is_empty() {
        to.to_owned()
    } else {
        to.join(rest)
    })
}

/// Runs an xattr call on the node's open descriptor if it has one, else on its path.
fn on_node(
    s: &State,
    ino: u64,
    by_fd: impl FnOnce(i32) -> isize,
    by_path: impl FnOnce(&std::ffi::CStr) -> isize,
) -> Result<usize, i32> {
    use std::os::fd::AsRawFd;
    let n = s.nodes.get(&ino).ok_or(libc::ENOENT)?;
    let r = match &n.file {
        Some(f) => by_fd(f.as_raw_fd()),
        None => by_path(&cpath(&s.root.join(&n.path))?),
    };
    if r < 0 {
        return Err(errno(io::Error::last_os_error()));
    }
    Ok(r as usize)
}

fn reply_xattr(r: Result<(usize, Vec<u8>), i32>, size: u32, reply: ReplyXattr) {
    match r {
        Ok((n, _)) if size == 0 => reply.size(n as u32),
        Ok((n, buf)) => reply.data(&buf[..n]),
        Err(e) => reply.error(e),
    }
}

fn cpath(p: &Path) -> Result<CString, i32> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)
}

/// The FUSE side: every request locks the shared state.
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

impl PowerCutFs {
    pub fn new(state: Arc<Mutex<State>>) -> Self {
        PowerCutFs { state }
    }

    /// The state, or EIO once cut.
    fn live(&self) -> Result<MutexGuard<'_, State>, i32> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.dead {
            return Err(libc::EIO);
        }
        Ok(s)
    }

    fn entry(&self, parent: u64, name: &OsStr, fresh: bool) -> Result<FileAttr, i32> {
        let mut s = self.live()?;
        let rel = s.rel_child(parent, name)?;
        let (ino, _) = s.node_for(&rel, fresh)?;
        s.attr(ino)
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.entry(parent, name, false) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.live().and_then(|s| s.attr(ino)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let mut s = self.live()?;
            let m = s.meta(ino)?;
            let n = s.nodes.get(&ino).ok_or(libc::ENOENT)?;
            // Metadata: at once, on the open file if there is one (it may be unlinked).
            if let Some(mode) = mode {
                let perm = std::fs::Permissions::from_mode(mode & 0o7777);
                match &n.file {
                    Some(f) => f.set_permissions(perm).map_err(errno)?,
                    None => std::fs::set_permissions(s.root.join(&n.path), perm).map_err(errno)?,
                }
            }
            if uid.is_some() || gid.is_some() {
                let p = cpath(&s.root.join(&n.path))?;
                // SAFETY: lchown on a NUL-terminated path; -1 leaves an id unchanged.
                let r = unsafe {
                    libc::lchown(p.as_ptr(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))
                };
                if r != 0 {
                    return Err(errno(io::Error::last_os_error()));
                }
            }
            // The size: data, kept with the overlay until a sync.
            if let Some(size) = size {
                if !m.is_file() {
                    return Err(libc::EINVAL);
                }
                let n = s.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
                n.overlay.truncate(size, m.len());
                s.stats.writes += 1;
            }
            // Times are not modelled: whatever the backing says.
            s.attr(ino)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let rel = self.live()?.rel_child(parent, name)?;
            let p = cpath(&self.live()?.root.join(&rel))?;
            // SAFETY: mknod on a NUL-terminated path; no memory is passed back.
            let r = unsafe { libc::mknod(p.as_ptr(), mode & !umask, rdev as libc::dev_t) };
            if r != 0 {
                return Err(errno(io::Error::last_os_error()));
            }
            self.entry(parent, name, true)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let p = {
                let s = self.live()?;
                s.root.join(s.rel_child(parent, name)?)
            };
            std::fs::create_dir(&p).map_err(errno)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & !umask & 0o7777))
                .map_err(errno)?;
            self.entry(parent, name, true)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let mut s = self.live()?;
            let p = s.root.join(s.rel_child(parent, name)?);
            let m = std::fs::symlink_metadata(&p).map_err(errno)?;
            std::fs::remove_file(&p).map_err(errno)?;
            if m.nlink() <= 1 {
                s.forget_name(m.ino());
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let mut s = self.live()?;
            let p = s.root.join(s.rel_child(parent, name)?);
            let m = std::fs::symlink_metadata(&p).map_err(errno)?;
            std::fs::remove_dir(&p).map_err(errno)?;
            s.forget_name(m.ino());
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let mut s = self.live()?;
            let from = s.rel_child(parent, name)?;
            let to = s.rel_child(newparent, newname)?;
            let (pf, pt) = (cpath(&s.root.join(&from))?, cpath(&s.root.join(&to))?);
            let replaced = std::fs::symlink_metadata(s.root.join(&to)).ok();
            // SAFETY: renameat2 on NUL-terminated paths relative to the cwd (they are absolute).
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    pf.as_ptr(),
                    libc::AT_FDCWD,
                    pt.as_ptr(),
                    flags,
                )
            };
            if r != 0 {
                return Err(errno(io::Error::last_os_error()));
            }
            let exchange = flags & libc::RENAME_EXCHANGE != 0;
            if let Some(m) = &replaced {
                if !exchange && (m.is_dir() || m.nlink() <= 1) {
                    s.forget_name(m.ino());
                }
            }
            // Metadata moved at once; overlays are keyed by inode and move with their files.
            for n in s.nodes.values_mut() {
                if n.unlinked {
                    continue;
                }
                if let Some(p) = moved(&n.path, &from, &to) {
                    n.path = p;
                } else if exchange {
                    if let Some(p) = moved(&n.path, &to, &from) {
                        n.path = p;
                    }
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let r = (|| {
            let mut s = self.live()?;
            s.ensure_open(ino)?;
            let n = s.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
            n.opens += 1;
            let fh = s.next_fh;
            s.next_fh += 1;
            s.handles.insert(fh, ino);
            let _ = flags;
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(fh, 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            let mut s = self.live()?;
            let rel = s.rel_child(parent, name)?;
            let existed = std::fs::symlink_metadata(s.root.join(&rel)).is_ok();
            // Creating the name is metadata (at once); O_TRUNC of an existing file would be
            // data, but the kernel only sends `create` for a name it believes absent.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .custom_flags(flags & libc::O_EXCL)
                .mode(mode & !umask)
                .open(s.root.join(&rel))
                .map_err(errno)?;
            let (ino, _) = s.node_for(&rel, !existed)?;
            let n = s.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
            if n.file.is_none() {
                n.file = Some(f);
            }
            n.opens += 1;
            let fh = s.next_fh;
            s.next_fh += 1;
            s.handles.insert(fh, ino);
            Ok((s.attr(ino)?, fh))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, 0, fh, 0),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let r = (|| {
            let mut s = self.live()?;
            s.ensure_open(ino)?;
            let n = s.nodes.get(&ino).ok_or(libc::ENOENT)?;
            let f = n.file.as_ref().expect("opened");
            n.overlay
                .read(&FileBacking(f), offset.max(0) as u64, size as usize)
                .map_err(errno)
        })();
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let r = (|| {
            let mut s = self.live()?;
            s.ensure_open(ino)?;
            let n = s.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
            let base = FileBacking(n.file.as_ref().expect("opened"))
                .file_len()
                .map_err(errno)?;
            n.overlay.write(offset.max(0) as u64, data, base);
            s.stats.writes += 1;
            s.stats.written_bytes += data.len() as u64;
            // O_DSYNC (and O_SYNC, which includes it): the write is durable when it returns.
            if flags & libc::O_DSYNC != 0 {
                s.fsync(ino, flags & libc::O_SYNC != libc::O_SYNC)?;
            }
            Ok(data.len() as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        // close() persists nothing.
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ino) = s.handles.remove(&fh) {
            let gone = match s.nodes.get_mut(&ino) {
                Some(n) => {
                    n.opens = n.opens.saturating_sub(1);
                    if n.opens == 0 {
                        // The overlay stays (keyed by inode); the descriptor goes.
                        n.file = None;
                    }
                    n.opens == 0 && n.unlinked
                }
                None => false,
            };
            if gone {
                s.nodes.remove(&ino);
            }
        }
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, datasync: bool, reply: ReplyEmpty) {
        match self.live().and_then(|mut s| s.fsync(ino, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let r = (|| {
            let s = self.live()?;
            let p = s.path(ino)?;
            let mut entries: Vec<(u64, FileType, std::ffi::OsString)> = vec![
                (ino, FileType::Directory, ".".into()),
                (ino, FileType::Directory, "..".into()),
            ];
            for e in std::fs::read_dir(&p).map_err(errno)? {
                let e = e.map_err(errno)?;
                let ft = e.file_type().map_err(errno)?;
                let kind = if ft.is_dir() {
                    FileType::Directory
                } else if ft.is_symlink() {
                    FileType::Symlink
                } else if ft.is_socket() {
                    FileType::Socket
                } else if ft.is_fifo() {
                    FileType::NamedPipe
                } else {
                    FileType::RegularFile
                };
                // The inode number here is informational; lookups assign the real ones.
                let hint = s
                    .by_backing
                    .get(&e.ino())
                    .copied()
                    .unwrap_or(u64::MAX - e.ino());
                entries.push((hint, kind, e.file_name()));
            }
            Ok(entries)
        })();
        match r {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(*ino, (i + 1) as i64, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Metadata is applied at once; syncing the backing directory is all there is to do.
        let r = self
            .live()
            .and_then(|s| s.path(ino))
            .and_then(|p| File::open(p).and_then(|d| d.sync_all()).map_err(errno));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let r = (|| {
            let p = cpath(&self.live()?.root)?;
            // SAFETY: statvfs is plain old data (integers only); all-zero is a valid value.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: `p` is a NUL-terminated path that outlives the call; statvfs writes only
            // into `st`, a struct of the right type that we own.
            if unsafe { libc::statvfs(p.as_ptr(), &mut st) } != 0 {
                return Err(errno(io::Error::last_os_error()));
            }
            Ok(st)
        })();
        match r {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let s = self.live()?;
            let name = CString::new(name.as_bytes()).map_err(|_| libc::EINVAL)?;
            // SAFETY: NUL-terminated name and path; value valid for its length.
            on_node(
                &s,
                ino,
                |fd| unsafe {
                    libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), flags)
                        as isize
                },
                |p| unsafe {
                    libc::lsetxattr(
                        p.as_ptr(),
                        name.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        flags,
                    ) as isize
                },
            )
        })();
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let r = (|| {
            let s = self.live()?;
            let name = CString::new(name.as_bytes()).map_err(|_| libc::EINVAL)?;
            let mut buf = vec![0u8; size as usize];
            let (ptr, len) = (buf.as_mut_ptr(), buf.len());
            // SAFETY: NUL-terminated name and path; buf valid for len bytes (0: size query).
            let n = on_node(
                &s,
                ino,
                |fd| unsafe { libc::fgetxattr(fd, name.as_ptr(), ptr.cast(), len) },
                |p| unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), ptr.cast(), len) },
            )?;
            Ok((n, buf))
        })();
        reply_xattr(r, size, reply);
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let r = (|| {
            let s = self.live()?;
            let mut buf = vec![0u8; size as usize];
            let (ptr, len) = (buf.as_mut_ptr(), buf.len());
            // SAFETY: NUL-terminated path; buf valid for len bytes (0: size query).
            let n = on_node(
                &s,
                ino,
                |fd| unsafe { libc::flistxattr(fd, ptr.cast(), len) },
                |p| unsafe { libc::llistxattr(p.as_ptr(), ptr.cast(), len) },
            )?;
            Ok((n, buf))
        })();
        reply_xattr(r, size, reply);
    }

    fn removexattr(&mut self, _req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let s = self.live()?;
            let name = CString::new(name.as_bytes()).map_err(|_| libc::EINVAL)?;
            // SAFETY: NUL-terminated name and path.
            on_node(
                &s,
                ino,
                |fd| unsafe { libc::fremovexattr(fd, name.as_ptr()) as isize },
                |p| unsafe { libc::lremovexattr(p.as_ptr(), name.as_ptr()) as isize },
            )
        })();
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let mut s = self.live()?;
            s.ensure_open(ino)?;
            let n = s.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
            let base = FileBacking(n.file.as_ref().expect("opened"))
                .file_len()
                .map_err(errno)?;
            let (off, len) = (offset.max(0) as u64, length.max(0) as u64);
            let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
            if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                if !keep {
                    return Err(libc::EINVAL);
                }
                n.overlay.zero(off, len, false, base);
            } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                n.overlay.zero(off, len, !keep, base);
            } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
                // Plain allocation: only a size change is visible.
                if !keep && off + len > n.overlay.size(base) {
                    n.overlay.truncate(off + len, base);
                }
            } else {
                return Err(libc::EOPNOTSUPP);
            }
            s.stats.writes += 1;
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
