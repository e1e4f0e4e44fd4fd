//! The per-disk applier: a writer thread and a group-commit flusher thread.
//!
//! ```text
//!  submit(Op) ─▶ [queue] ─▶ writer: pwrite ─▶ written_seq ──▶ flusher: fdatasync ─▶ durable_seq
//!                                                                     └─▶ ApplierEvent::Durable
//! ```
//!
//! Two positions are kept apart, as neon's safekeeper does: `written` (in the page cache) and
//! `durable` (covered by a completed `fdatasync`). The flusher takes a snapshot of `written`,
//! flushes, and only then publishes that snapshot as durable; every write that finished while a
//! flush was running is covered by the next one, so many writes share one `fdatasync` (group
//! commit) without any timer, and the writer never waits for the disk to acknowledge.
//!
//! The disk's metadata (its durable position, the resume point after a restart) is written by a
//! third thread, at most once per `meta_interval` after a flush: a metadata write costs two
//! fsyncs (file and directory), and in the flusher it delayed the next `fdatasync` and every
//! ack waiting on it. The file may lag `durable`, never lead it: it is set from a completed
//! flush.
//!
//! A failed write or flush stops the applier for good: nothing after the failure is ever
//! reported durable, the caller sees [`ApplierEvent::Failed`], and recovery means a fresh
//! applier that resumes from the metadata.
//!
//! Consistency markers pause the writer: once everything before a marker is durable the applier
//! reports [`ApplierEvent::MarkerReached`] and holds further writes until
//! [`ApplierHandle::release_marker`] — the window in which a snapshot of the volume is exact.
//!
//! A [`Capture`] keeps a point-in-time image readable after the writer resumes: before the
//! writer overwrites a block the capture has not read yet, it preserves the block's old
//! contents — in memory up to [`ApplierConfig::capture_memory_bytes`], beyond that in an
//! unlinked spill file under [`ApplierConfig::spill_dir`]. A full capture (the change map is
//! untrusted after any crash) can preserve up to the whole disk, so memory must not be where
//! all of it goes. A spill that fails (disk full, I/O error) fails that capture — its restore
//! point — and never the writer: replication is what protects the source, a restore point can
//! be taken again (the changes of a failed capture are merged back for the next one).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::changes::{blocks_for, ChangeMap, BLOCK};
use crate::meta::DiskMeta;
use crate::volume::Volume;
use crate::StoreError;

/// One unit of work for a disk, in the source's sequence order.
pub enum Op {
    Write {
        seq: u64,
        offset: u64,
        data: Bytes,
        /// Dropped once the bytes are handed to the volume: callers bound their queues with it.
        guard: Option<Box<dyn Send>>,
    },
    Zeroes {
        seq: u64,
        offset: u64,
        len: u64,
        /// Dropped once the range is zeroed: every queued op holds a share of the caller's
        /// budget, so no kind of op can grow the queue without bound.
        guard: Option<Box<dyn Send>>,
    },
    Marker {
        seq: u64,
        marker_id: u64,
        /// Dropped once the writer has passed the marker.
        guard: Option<Box<dyn Send>>,
    },
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write {
                seq, offset, data, ..
            } => write!(f, "Write(seq {seq}, {} bytes at {offset})", data.len()),
            Op::Zeroes {
                seq, offset, len, ..
            } => write!(f, "Zeroes(seq {seq}, {len} at {offset})"),
            Op::Marker { seq, marker_id, .. } => write!(f, "Marker(seq {seq}, id {marker_id})"),
        }
    }
}

impl Op {
    pub fn seq(&self) -> u64 {
        match self {
            Op::Write { seq, .. } | Op::Zeroes { seq, .. } | Op::Marker { seq, .. } => *seq,
        }
    }
}

/// What the applier tells its owner. Delivered from the applier's threads, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplierEvent {
    /// Every op with `seq <= seq` is on stable storage.
    Durable {
        seq: u64,
        /// Writes covered by this flush (0: nothing to flush, e.g. only a marker).
        writes: u64,
        bytes: u64,
        /// Time the `fdatasync` took.
        flush: Duration,
    },
    /// Everything up to the marker is durable; the writer holds until released.
    MarkerReached { marker_id: u64, seq: u64 },
    /// The volume failed; nothing at or after `seq` will ever be reported durable.
    Failed {
        seq: u64,
        errno: Option<i32>,
        error: String,
    },
}

/// Tuning knobs.
#[derive(Debug, Clone)]
pub struct ApplierConfig {
    /// Rewrite the metadata after a flush at most this often (it is always rewritten on close).
    pub meta_interval: Duration,
    /// Where the change map lives; `None` tracks changes in memory only.
    pub changes_path: Option<PathBuf>,
    /// Bytes of preserved (copy-on-write) blocks a capture of this disk keeps in memory;
    /// beyond it they go to a spill file in `spill_dir`.
    pub capture_memory_bytes: u64,
    /// Directory of captures' spill files (created when first needed). `None`: a capture
    /// that needs more than `capture_memory_bytes` fails — the bound holds either way.
    pub spill_dir: Option<PathBuf>,
    /// Flushes in flight at once (flusher threads), at least one. With one, a write that
    /// lands just after a flush began waits for that flush and the whole next one; with two,
    /// the next flush starts at once. Measured on one device queue, two bought no ack p99 and
    /// cost 38–53% more `fdatasync`s per write (docs/decisions.md, "One flush in flight per
    /// disk, measured"), so the default is one.
    pub flushers: usize,
}

/// Default of [`ApplierConfig::capture_memory_bytes`] (the server's
/// `replication.capture_memory`).
pub const DEFAULT_CAPTURE_MEMORY: u64 = 64 << 20;

impl Default for ApplierConfig {
    fn default() -> Self {
        ApplierConfig {
            meta_interval: Duration::from_secs(1),
            changes_path: None,
            capture_memory_bytes: DEFAULT_CAPTURE_MEMORY,
            spill_dir: None,
            flushers: 1,
        }
    }
}

/// The receiving end of an applier's events, polled by its owner.
///
/// Data flows one way: the applier's threads publish what happened (durable positions,
/// markers reached, a failure) and never run their owner's code; the owner polls when it is
/// ready, in its own task, and does its own work there (metrics, metadata records, acks). So
/// nothing of the owner — least of all a metadata fsync — can delay the next flush. The
/// channel closes once the applier has stopped (closed or dropped) and every event is out.
pub struct ApplierEvents {
    rx: tokio::sync::mpsc::UnboundedReceiver<ApplierEvent>,
}

impl ApplierEvents {
    /// Every event published since the last poll, in order; waits for at least one.
    /// `None`: the applier has stopped and nothing is left.
    pub async fn next_batch(&mut self) -> Option<Vec<ApplierEvent>> {
        let first = self.rx.recv().await?;
        let mut batch = vec![first];
        while let Ok(e) = self.rx.try_recv() {
            batch.push(e);
        }
        Some(batch)
    }

    /// The next event, blocking the calling thread (not for async code). `None`: stopped.
    pub fn blocking_next(&mut self) -> Option<ApplierEvent> {
        self.rx.blocking_recv()
    }
}

/// The publishing end, dropped when the applier stops so its owner sees the end.
type EventTx = Mutex<Option<tokio::sync::mpsc::UnboundedSender<ApplierEvent>>>;

/// Held by each of the applier's threads: the last one to stop closes the event channel, so
/// the owner's poll ends whether the applier was closed or dropped, and whatever handles
/// remain.
struct Publisher(Arc<Shared>);

impl Drop for Publisher {
    fn drop(&mut self) {
        if self.0.publishers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.events.lock().unwrap().take();
        }
    }
}

fn publish(s: &Shared, e: ApplierEvent) {
    if let Some(tx) = s.events.lock().unwrap().as_ref() {
        // An owner that stopped polling has let go of the applier: nothing to tell.
        let _ = tx.send(e);
    }
}

struct Shared {
    vol: Arc<dyn Volume>,
    state: Mutex<State>,
    cv: Condvar,
    meta: Mutex<DiskMeta>,
    meta_path: PathBuf,
    /// Serialises metadata files: each store writes a copy taken under it, so a later store
    /// never writes an older copy over a newer one.
    store_lock: Mutex<()>,
    /// Wakes the metadata thread: a newer durable position to write, or closing.
    meta_sync: Mutex<MetaSync>,
    meta_cv: Condvar,
    events: EventTx,
    /// Threads still running that may publish (see [`Publisher`]).
    publishers: AtomicUsize,
    config: ApplierConfig,
    changes: Mutex<ChangeMap>,
    capture: Mutex<Option<Arc<Capture>>>,
}

#[derive(Default)]
struct State {
    written: u64,
    durable: u64,
    writes_since: u64,
    bytes_since: u64,
    /// Highest position a flush has been started for (in flight or done).
    flushing_to: u64,
    /// Tickets of flushes in start order: a flush publishes only after every flush started
    /// before it has (`published` is the next ticket allowed to).
    next_ticket: u64,
    published: u64,
    failed: bool,
    closing: bool,
    /// The owner is closing: a writer held at a marker stops waiting for its release.
    abandon: bool,
    released: Vec<u64>,
}

#[derive(Default)]
struct MetaSync {
    dirty: bool,
    closing: bool,
}

/// Writes a copy of the in-memory metadata (temp file, fsync, rename, directory fsync).
fn store_meta(s: &Shared) -> Result<(), StoreError> {
    let _g = s.store_lock.lock().unwrap();
    let mut m = s.meta.lock().unwrap().clone();
    m.store(&s.meta_path)
}

/// Cloneable view of a running applier, for the owner's other tasks.
#[derive(Clone)]
pub struct ApplierHandle {
    shared: Arc<Shared>,
}

impl ApplierHandle {
    /// Highest sequence known durable.
    pub fn durable_seq(&self) -> u64 {
        self.shared.state.lock().unwrap().durable
    }

    /// Whether the applier has stopped on a volume failure.
    pub fn failed(&self) -> bool {
        self.shared.state.lock().unwrap().failed
    }

    /// Lets the writer continue past marker `marker_id`.
    pub fn release_marker(&self, marker_id: u64) {
        self.shared.state.lock().unwrap().released.push(marker_id);
        self.shared.cv.notify_all();
    }

    /// A copy of the metadata as last updated in memory.
    pub fn meta(&self) -> DiskMeta {
        self.shared.meta.lock().unwrap().clone()
    }

    /// Changes metadata fields other than the durable position and writes it durably.
    /// `durable_seq` is owned by the flusher; a change to it here is overwritten.
    pub fn update_meta(&self, f: impl FnOnce(&mut DiskMeta)) -> Result<(), StoreError> {
        let _g = self.shared.store_lock.lock().unwrap();
        let mut m = {
            let mut m = self.shared.meta.lock().unwrap();
            let durable = m.durable_seq;
            f(&mut m);
            m.durable_seq = durable;
            m.clone()
        };
        m.store(&self.shared.meta_path)
    }

    pub fn volume(&self) -> Arc<dyn Volume> {
        self.shared.vol.clone()
    }

    /// Starts capturing the volume as it is now, for a snapshot whose parent is `parent`.
    ///
    /// Call it only while the writer is held at a marker (after
    /// [`ApplierEvent::MarkerReached`], before [`ApplierHandle::release_marker`]): the volume
    /// is then exactly the marker's image. From then on the writer copies any block of the
    /// capture set aside before overwriting it, so the snapshot can be read after the writer
    /// resumes (copy-on-write) and the pause stays short. Change tracking restarts relative
    /// to `new_base`.
    pub fn begin_capture(&self, parent: Option<&str>, new_base: &str) -> Arc<Capture> {
        let (size, spill_path) = {
            let m = self.shared.meta.lock().unwrap();
            let name = format!("{}-{}-{new_base}.spill", m.source_id, m.disk_id);
            (
                m.size,
                self.shared.config.spill_dir.as_ref().map(|d| d.join(name)),
            )
        };
        let mut changes = self.shared.changes.lock().unwrap();
        let old = std::mem::replace(&mut *changes, ChangeMap::new(size, Some(new_base.into())));
        let full = !old.usable_against(parent);
        let set = if full {
            ChangeMap::untrusted(size)
        } else {
            old.clone()
        };
        let cap = Arc::new(Capture {
            vol: self.shared.vol.clone(),
            size,
            full,
            set,
            old,
            memory_bound: self.shared.config.capture_memory_bytes,
            spill_path,
            state: Mutex::new(CaptureState {
                done: vec![false; blocks_for(size) as usize],
                saved: HashMap::new(),
                memory: 0,
                peak_memory: 0,
                spill: None,
                spilled: HashMap::new(),
                spilled_bytes: 0,
                failed: None,
            }),
        });
        *self.shared.capture.lock().unwrap() = Some(cap.clone());
        cap
    }

    /// Ends a capture. When the snapshot failed, the changes it was to record are merged back
    /// so the next snapshot includes them. The capture's preserved blocks (memory, spill file)
    /// are freed, and reading it from now on fails: the writer no longer preserves anything
    /// for it.
    pub fn end_capture(&self, cap: &Capture, ok: bool) {
        self.shared.capture.lock().unwrap().take();
        cap.state
            .lock()
            .unwrap()
            .fail("the capture has ended".into());
        if !ok {
            let mut changes = self.shared.changes.lock().unwrap();
            let mut restored = cap.old.clone();
            restored.merge(&changes);
            *changes = restored;
        }
    }
}

/// A point-in-time image of a volume, read while the writer keeps going.
pub struct Capture {
    vol: Arc<dyn Volume>,
    size: u64,
    /// Whether every block must be read (no usable change map against the parent).
    pub full: bool,
    set: ChangeMap,
    old: ChangeMap,
    /// Bytes of preserved blocks kept in memory; the rest is spilled.
    memory_bound: u64,
    /// The spill file to create when memory is full (`None`: none may be created).
    spill_path: Option<PathBuf>,
    state: Mutex<CaptureState>,
}

/// How much a capture holds, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Bytes of preserved blocks now in memory.
    pub memory_bytes: u64,
    /// The most `memory_bytes` ever was.
    pub peak_memory_bytes: u64,
    /// Bytes ever written to the spill file.
    pub spilled_bytes: u64,
}

/// Preserved bytes in memory over all captures of the process, and bytes ever spilled: the
/// server's metrics read them at scrape time.
static MEMORY_ALL: AtomicU64 = AtomicU64::new(0);
static SPILLED_ALL: AtomicU64 = AtomicU64::new(0);

/// Bytes of preserved blocks all captures of this process hold in memory now.
pub fn capture_memory_bytes() -> u64 {
    MEMORY_ALL.load(Ordering::Relaxed)
}

/// Bytes all captures of this process ever wrote to spill files.
pub fn capture_spilled_bytes_total() -> u64 {
    SPILLED_ALL.load(Ordering::Relaxed)
}

struct CaptureState {
    /// Blocks read by the capture or preserved for it: the writer may overwrite them.
    done: Vec<bool>,
    /// Preserved blocks in memory, `memory` bytes in all (at most the capture's bound).
    saved: HashMap<u64, Vec<u8>>,
    memory: u64,
    peak_memory: u64,
    /// Created at the first block that does not fit in memory; unlinked at once.
    spill: Option<Spill>,
    /// Preserved blocks in the spill file: block → (offset, length).
    spilled: HashMap<u64, (u64, u32)>,
    spilled_bytes: u64,
    /// Why the capture can no longer produce its image (a spill failed, or it ended).
    failed: Option<String>,
}

struct Spill {
    file: File,
    /// Where the next block is appended.
    end: u64,
}

impl CaptureState {
    /// Gives up the capture: frees what it preserved (closing the spill file frees its
    /// blocks, it has no name) and remembers why. The first reason is kept.
    fn fail(&mut self, why: String) {
        self.failed.get_or_insert(why);
        self.saved = HashMap::new();
        MEMORY_ALL.fetch_sub(std::mem::take(&mut self.memory), Ordering::Relaxed);
        self.spilled = HashMap::new();
        self.spill = None;
    }
}

impl Drop for CaptureState {
    fn drop(&mut self) {
        MEMORY_ALL.fetch_sub(self.memory, Ordering::Relaxed);
    }
}

/// Creates the spill file at `path` and unlinks it at once: its blocks live exactly as long
/// as the descriptor, so neither a crash nor a forgotten capture leaves one behind.
fn open_spill(path: Option<&Path>) -> std::io::Result<File> {
    let path = path.ok_or_else(|| std::io::Error::other("no spill directory is configured"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    };
    let file = match open() {
        // Left by a crash between create and unlink: nobody else can be using it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            open()?
        }
        r => r?,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(file),
    }
}

impl Capture {
    /// Whether block `b` may differ from the parent restore point.
    pub fn is_changed(&self, b: u64) -> bool {
        self.set.is_changed(b)
    }

    /// Blocks this capture must read.
    pub fn changed_count(&self) -> u64 {
        self.set.changed_count()
    }

    fn read_block(&self, b: u64) -> std::io::Result<Vec<u8>> {
        let off = b * BLOCK;
        let mut buf = vec![0u8; (self.size - off).min(BLOCK) as usize];
        self.vol.read_at(&mut buf, off)?;
        Ok(buf)
    }

    /// What the capture holds now.
    pub fn stats(&self) -> CaptureStats {
        let st = self.state.lock().unwrap();
        CaptureStats {
            memory_bytes: st.memory,
            peak_memory_bytes: st.peak_memory,
            spilled_bytes: st.spilled_bytes,
        }
    }

    /// Why the capture failed, if it did (or `"the capture has ended"`).
    pub fn failure(&self) -> Option<String> {
        self.state.lock().unwrap().failed.clone()
    }

    /// Block `b` as it was when the capture began. Fails once the capture has failed (a
    /// spill error: some preserved block is lost) or ended.
    pub fn take(&self, b: u64) -> std::io::Result<Vec<u8>> {
        let mut st = self.state.lock().unwrap();
        if let Some(why) = &st.failed {
            return Err(std::io::Error::other(format!("capture failed: {why}")));
        }
        if let Some(d) = st.saved.remove(&b) {
            st.memory -= d.len() as u64;
            MEMORY_ALL.fetch_sub(d.len() as u64, Ordering::Relaxed);
            return Ok(d);
        }
        if let Some((off, len)) = st.spilled.remove(&b) {
            let spill = st.spill.as_ref().expect("a spilled block has a spill file");
            let mut d = vec![0u8; len as usize];
            if let Err(e) = spill.file.read_exact_at(&mut d, off) {
                let why = format!("reading block {b} back from the spill file: {e}");
                tracing::error!(error = %why, "restore point capture failed");
                st.fail(why.clone());
                return Err(std::io::Error::new(e.kind(), why));
            }
            punch_hole(&spill.file, off, len as u64);
            return Ok(d);
        }
        // Read under the lock: the writer cannot overwrite the block meanwhile.
        let d = self.read_block(b)?;
        st.done[b as usize] = true;
        Ok(d)
    }

    /// Called by the writer before it overwrites `len` bytes at `offset`. An error is the
    /// volume's (reading the old contents): a spill failure fails the capture only.
    fn preserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 || offset >= self.size {
            return Ok(());
        }
        let last = ((offset + len - 1) / BLOCK).min(blocks_for(self.size) - 1);
        let mut st = self.state.lock().unwrap();
        if st.failed.is_some() {
            return Ok(()); // nothing to keep for a capture that cannot complete
        }
        for b in offset / BLOCK..=last {
            if self.set.is_changed(b) && !st.done[b as usize] {
                let d = self.read_block(b)?;
                st.done[b as usize] = true;
                if let Err(e) = self.keep(&mut st, b, d) {
                    // Decision: a restore point is not worth stopping replication for. The
                    // block is lost to this capture only; its restore point fails at its next
                    // read and the writer goes on.
                    let why = format!("spilling preserved block {b}: {e}");
                    tracing::error!(error = %why, "restore point capture failed; replication goes on");
                    st.fail(why);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Keeps preserved block `b`: in memory while that stays within the bound, else appended
    /// to the spill file.
    fn keep(&self, st: &mut CaptureState, b: u64, d: Vec<u8>) -> std::io::Result<()> {
        let n = d.len() as u64;
        if st.memory + n <= self.memory_bound {
            st.memory += n;
            MEMORY_ALL.fetch_add(n, Ordering::Relaxed);
            st.peak_memory = st.peak_memory.max(st.memory);
            st.saved.insert(b, d);
            return Ok(());
        }
        if st.spill.is_none() {
            let file = open_spill(self.spill_path.as_deref())?;
            st.spill = Some(Spill { file, end: 0 });
        }
        let spill = st.spill.as_mut().expect("just created");
        let off = spill.end;
        spill.file.write_all_at(&d, off)?;
        spill.end += n;
        st.spilled.insert(b, (off, n as u32));
        st.spilled_bytes += n;
        SPILLED_ALL.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Frees the disk space of a spilled block once read back (best effort: the file is
/// unlinked and goes away with the capture anyway).
fn punch_hole(file: &File, off: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own; no memory is passed.
        unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, off, len);
}

/// A running applier. Submit ops in sequence order; close it to stop.
pub struct Applier {
    tx: Option<mpsc::Sender<Op>>,
    handle: ApplierHandle,
    writer: Option<JoinHandle<()>>,
    flushers: Vec<JoinHandle<()>>,
    meta_writer: Option<JoinHandle<()>>,
}

impl Applier {
    /// Starts the threads. `meta` is the disk's current metadata (its `durable_seq` is the
    /// starting point) and is rewritten at `meta_path`. What happens is published on the
    /// returned [`ApplierEvents`], which the owner polls.
    pub fn start(
        vol: Arc<dyn Volume>,
        meta: DiskMeta,
        meta_path: PathBuf,
        config: ApplierConfig,
    ) -> Result<(Self, ApplierEvents), StoreError> {
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let start = meta.durable_seq;
        let n_flushers = config.flushers.max(1);
        let changes = match &config.changes_path {
            Some(p) => {
                let m = ChangeMap::load(p, meta.size);
                // While we run, the file on disk says "untrusted": a crash means "all changed".
                m.store(p, false)?;
                m
            }
            None => ChangeMap::untrusted(meta.size),
        };
        let shared = Arc::new(Shared {
            vol,
            state: Mutex::new(State {
                written: start,
                durable: start,
                flushing_to: start,
                ..Default::default()
            }),
            cv: Condvar::new(),
            meta: Mutex::new(meta),
            meta_path,
            store_lock: Mutex::new(()),
            meta_sync: Mutex::new(MetaSync::default()),
            meta_cv: Condvar::new(),
            events: Mutex::new(Some(events_tx)),
            publishers: AtomicUsize::new(2 + n_flushers),
            config,
            changes: Mutex::new(changes),
            capture: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        let name = {
            let m = shared.meta.lock().unwrap();
            format!("{}/{}", m.source_id, m.disk_id)
        };
        let writer = std::thread::Builder::new()
            .name(format!("wr {name}"))
            .spawn(move || {
                let _p = Publisher(s.clone());
                writer_loop(s, rx)
            })
            .expect("spawning writer thread");
        let mut flushers = Vec::with_capacity(n_flushers);
        for i in 0..n_flushers {
            let s = shared.clone();
            // Each flusher its own descriptor (see `Volume::flush_handle`).
            let own = match s.vol.flush_handle() {
                Ok(h) => h,
                Err(e) => {
                    // Stop what already runs: the writer ends when the channel closes, the
                    // flushers and the metadata thread on `closing`.
                    drop(tx);
                    s.state.lock().unwrap().closing = true;
                    s.cv.notify_all();
                    s.meta_sync.lock().unwrap().closing = true;
                    s.meta_cv.notify_all();
                    return Err(StoreError::Io {
                        what: format!("opening a flush handle of {}", s.vol.describe()),
                        source: e,
                    });
                }
            };
            flushers.push(
                std::thread::Builder::new()
                    .name(format!("fl{i} {name}"))
                    .spawn(move || {
                        let _p = Publisher(s.clone());
                        flusher_loop(s, own)
                    })
                    .expect("spawning flusher thread"),
            );
        }
        let s = shared.clone();
        let meta_writer = std::thread::Builder::new()
            .name(format!("md {name}"))
            .spawn(move || {
                let _p = Publisher(s.clone());
                meta_loop(s)
            })
            .expect("spawning metadata thread");
        Ok((
            Applier {
                tx: Some(tx),
                handle: ApplierHandle { shared },
                writer: Some(writer),
                flushers,
                meta_writer: Some(meta_writer),
            },
            ApplierEvents { rx: events_rx },
        ))
    }

    pub fn handle(&self) -> ApplierHandle {
        self.handle.clone()
    }

    /// Queues an op. Never blocks; callers bound memory with the op's guard. Returns the op
    /// back if the applier has stopped.
    pub fn submit(&self, op: Op) -> Result<(), Op> {
        match &self.tx {
            Some(tx) => tx.send(op).map_err(|e| e.0),
            None => Err(op),
        }
    }

    /// Stops accepting ops, applies what is queued, flushes, writes the metadata and joins the
    /// threads. Blocking: call it off the async runtime.
    pub fn close(mut self) -> Result<DiskMeta, StoreError> {
        self.shutdown();
        let h = &self.handle.shared;
        h.meta.lock().unwrap().durable_seq = h.state.lock().unwrap().durable;
        store_meta(h)?;
        if let Some(p) = &h.config.changes_path {
            h.changes.lock().unwrap().store(p, true)?;
        }
        Ok(h.meta.lock().unwrap().clone())
    }

    fn shutdown(&mut self) {
        self.tx.take();
        // A writer held at a marker would wait for a release that may never come (the
        // connection that asked for the restore point is gone): end the hold now.
        self.handle.shared.state.lock().unwrap().abandon = true;
        self.handle.shared.cv.notify_all();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        {
            let mut st = self.handle.shared.state.lock().unwrap();
            st.closing = true;
        }
        self.handle.shared.cv.notify_all();
        for f in self.flushers.drain(..) {
            let _ = f.join();
        }
        self.handle.shared.meta_sync.lock().unwrap().closing = true;
        self.handle.shared.meta_cv.notify_all();
        if let Some(m) = self.meta_writer.take() {
            let _ = m.join();
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        // Not closed explicitly: let the threads finish on their own without blocking here.
        self.tx.take();
        let mut st = self.handle.shared.state.lock().unwrap();
        st.closing = true;
        drop(st);
        self.handle.shared.cv.notify_all();
        self.handle.shared.meta_sync.lock().unwrap().closing = true;
        self.handle.shared.meta_cv.notify_all();
    }
}

fn fail(s: &Shared, seq: u64, e: &std::io::Error) {
    let mut st = s.state.lock().unwrap();
    if st.failed {
        return;
    }
    st.failed = true;
    // Published under the state lock, as every event is: in the order the state changed.
    publish(
        s,
        ApplierEvent::Failed {
            seq,
            errno: e.raw_os_error(),
            error: e.to_string(),
        },
    );
    drop(st);
    s.cv.notify_all();
}

fn writer_loop(s: Arc<Shared>, rx: mpsc::Receiver<Op>) {
    // Set when a marker hold was abandoned at close: what follows the marker is dropped, not
    // applied. None of it is durable or acknowledged (the agent resends it), and the volume
    // stays at the marker's image for a capture that may have begun while the writer held.
    let mut discard = false;
    for op in rx {
        if discard || s.state.lock().unwrap().failed {
            continue; // drain and drop: nothing after a failure is applied
        }
        let seq = op.seq();
        let (offset, len) = match &op {
            Op::Write { offset, data, .. } => (*offset, data.len() as u64),
            Op::Zeroes { offset, len, .. } => (*offset, *len),
            Op::Marker { .. } => (0, 0),
        };
        if len > 0 {
            s.changes.lock().unwrap().mark(offset, len);
            let cap = s.capture.lock().unwrap().clone();
            if let Some(cap) = cap {
                if let Err(e) = cap.preserve(offset, len) {
                    fail(&s, seq, &e);
                    continue;
                }
            }
        }
        let (res, bytes) = match op {
            Op::Write {
                offset,
                data,
                guard,
                ..
            } => {
                let r = s.vol.write_at(&data, offset);
                drop(guard);
                (r, data.len() as u64)
            }
            Op::Zeroes {
                offset, len, guard, ..
            } => {
                let r = s.vol.write_zeroes(offset, len);
                drop(guard);
                (r, len)
            }
            Op::Marker { marker_id, .. } => {
                discard = hold_at_marker(&s, seq, marker_id) == Hold::Abandoned;
                continue;
            }
        };
        if let Err(e) = res {
            fail(&s, seq, &e);
            continue;
        }
        let mut st = s.state.lock().unwrap();
        st.written = st.written.max(seq);
        st.writes_since += 1;
        st.bytes_since += bytes;
        drop(st);
        s.cv.notify_all();
    }
}

#[derive(Debug, PartialEq)]
enum Hold {
    Released,
    /// The owner closed the applier while the writer was at the marker.
    Abandoned,
}

/// Waits until everything before the marker is durable, reports it, then holds until the
/// marker is released, the applier fails, or its owner closes it (`Abandoned`).
fn hold_at_marker(s: &Shared, seq: u64, marker_id: u64) -> Hold {
    let mut st = s.state.lock().unwrap();
    st.written = st.written.max(seq);
    s.cv.notify_all();
    while st.durable < seq && !st.failed && !st.closing && !st.abandon {
        st = s.cv.wait(st).unwrap();
    }
    if st.abandon {
        return Hold::Abandoned;
    }
    if st.failed || st.durable < seq {
        return Hold::Released;
    }
    // Under the state lock: after the Durable event that covers the marker.
    publish(s, ApplierEvent::MarkerReached { marker_id, seq });
    while !st.released.contains(&marker_id) && !st.failed && !st.closing && !st.abandon {
        st = s.cv.wait(st).unwrap();
    }
    if st.released.contains(&marker_id) {
        st.released.retain(|m| *m != marker_id);
        return Hold::Released;
    }
    if st.abandon {
        Hold::Abandoned
    } else {
        Hold::Released
    }
}

/// One of the disk's flusher threads ([`ApplierConfig::flushers`]). Each snapshots the written
/// position, flushes, and publishes that snapshot as durable — in the order the flushes
/// *started*, so durable positions (and their events) only move forward and a flush never
/// claims writes it did not cover: every write up to its snapshot had returned from `pwrite`
/// before its `fdatasync` began.
fn flusher_loop(s: Arc<Shared>, own: Option<Box<dyn crate::volume::FlushHandle>>) {
    loop {
        let mut st = s.state.lock().unwrap();
        while st.written <= st.flushing_to && !st.closing && !st.failed {
            st = s.cv.wait(st).unwrap();
        }
        if st.failed || st.written <= st.flushing_to {
            return; // closing with nothing left, or stopped by a failure
        }
        let target = st.written;
        st.flushing_to = target;
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let writes = std::mem::take(&mut st.writes_since);
        let bytes = std::mem::take(&mut st.bytes_since);
        drop(st);

        let t = Instant::now();
        // `skip-fdatasync`: a deliberately broken build for the power-cut harness
        // (tests/e2e/powercut.rs), which must catch it losing acknowledged writes.
        if writes > 0 && !crate::failpoint_active("skip-fdatasync") {
            let r = match &own {
                Some(h) => h.flush(),
                None => s.vol.flush(),
            };
            if let Err(e) = r {
                fail(&s, target, &e);
                return;
            }
        }
        let flush = t.elapsed();
        // Wait for the flushes started earlier to publish theirs.
        let mut st = s.state.lock().unwrap();
        while st.published != ticket && !st.failed {
            st = s.cv.wait(st).unwrap();
        }
        if st.failed {
            return;
        }
        {
            let mut m = s.meta.lock().unwrap();
            m.durable_seq = m.durable_seq.max(target);
            m.replicated_bytes += bytes;
        }
        st.durable = st.durable.max(target);
        st.published += 1;
        // Under the state lock: events leave in the order the state changed.
        publish(
            &s,
            ApplierEvent::Durable {
                seq: target,
                writes,
                bytes,
                flush,
            },
        );
        drop(st);
        s.cv.notify_all();
        // The metadata file is written by its own thread: its fsyncs (file and directory)
        // must not delay the next fdatasync, which every waiting ack depends on. Woken only
        // when there was nothing to write yet (it rate-limits itself).
        let mut ms = s.meta_sync.lock().unwrap();
        if !ms.dirty {
            ms.dirty = true;
            drop(ms);
            s.meta_cv.notify_all();
        }
    }
}

/// Writes the metadata after flushes, at most once per `meta_interval`, until closing
/// (`close()` writes the final copy itself).
fn meta_loop(s: Arc<Shared>) {
    let mut last: Option<Instant> = None;
    loop {
        let mut ms = s.meta_sync.lock().unwrap();
        while !ms.dirty && !ms.closing {
            ms = s.meta_cv.wait(ms).unwrap();
        }
        if ms.closing {
            return;
        }
        // Rate limit; closing interrupts the wait.
        if let Some(t) = last {
            let due = t + s.config.meta_interval;
            while !ms.closing && Instant::now() < due {
                let left = due.saturating_duration_since(Instant::now());
                ms = s.meta_cv.wait_timeout(ms, left).unwrap().0;
            }
            if ms.closing {
                return;
            }
        }
        ms.dirty = false;
        drop(ms);
        if let Err(e) = store_meta(&s) {
            // Data is durable; only the resume hint is stale. Retried after the next flush.
            tracing::warn!(path = %s.meta_path.display(), error = %e, "metadata update failed");
            s.meta_sync.lock().unwrap().dirty = true;
        }
        last = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::MemVolume;
    use std::sync::mpsc::Receiver;

    fn start(
        vol: Arc<MemVolume>,
        dir: &std::path::Path,
        durable: u64,
    ) -> (Applier, Receiver<ApplierEvent>) {
        start_with(vol, dir, durable, ApplierConfig::default())
    }

    fn start_with(
        vol: Arc<MemVolume>,
        dir: &std::path::Path,
        durable: u64,
        config: ApplierConfig,
    ) -> (Applier, Receiver<ApplierEvent>) {
        let (tx, rx) = mpsc::channel();
        let mut meta = DiskMeta::new("s", "d", vol.size(), 512);
        meta.durable_seq = durable;
        let (a, mut events) = Applier::start(
            vol,
            meta,
            dir.join("d.meta.json"),
            ApplierConfig {
                meta_interval: Duration::ZERO,
                changes_path: Some(dir.join("d.changes")),
                ..config
            },
        )
        .unwrap();
        // The owner's poll, as a thread: the tests wait on events with timeouts.
        std::thread::spawn(move || {
            while let Some(e) = events.blocking_next() {
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
        (a, rx)
    }

    fn write(seq: u64, offset: u64, byte: u8) -> Op {
        Op::Write {
            seq,
            offset,
            data: Bytes::from(vec![byte; 512]),
            guard: None,
        }
    }

    fn wait_durable(rx: &Receiver<ApplierEvent>, want: u64) -> Vec<ApplierEvent> {
        let mut seen = vec![];
        loop {
            let e = rx.recv_timeout(Duration::from_secs(10)).expect("event");
            let done = matches!(e, ApplierEvent::Durable { seq, .. } if seq >= want);
            seen.push(e);
            if done {
                return seen;
            }
        }
    }

    /// The event channel ends once the applier has stopped, closed or merely dropped, even
    /// while handles to it live on: an owner's poll never waits forever.
    #[test]
    fn events_end_when_the_applier_stops_whatever_handles_remain() {
        for close in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let vol = Arc::new(MemVolume::new(1 << 20));
            let (a, mut events) = Applier::start(
                vol,
                DiskMeta::new("s", "d", 1 << 20, 512),
                d.path().join("d.meta.json"),
                ApplierConfig::default(),
            )
            .unwrap();
            let h = a.handle();
            a.submit(write(1, 0, 1)).unwrap();
            if close {
                a.close().unwrap();
            } else {
                drop(a);
            }
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut seen = vec![];
                while let Some(e) = events.blocking_next() {
                    seen.push(e);
                }
                let _ = tx.send(seen);
            });
            let seen = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the event channel ends");
            // A closed applier flushed what it had; a dropped one may not have (it stops
            // without waiting): either way the owner learns exactly what became durable.
            let reported = seen
                .iter()
                .any(|e| matches!(e, ApplierEvent::Durable { seq: 1, .. }));
            assert_eq!(reported, h.durable_seq() == 1, "close={close}: {seen:?}");
            assert!(reported || !close, "close={close}: {seen:?}");
        }
    }

    /// The metadata thread writes the durable position after flushes without waiting for
    /// close, and the file never claims more than is durable.
    #[test]
    fn metadata_follows_flushes_without_close_and_never_leads() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(MemVolume::new(1 << 20));
        let (a, rx) = start(vol, d.path(), 0);
        let h = a.handle();
        let path = d.path().join("d.meta.json");
        for seq in 1..=50 {
            a.submit(write(seq, (seq % 64) * 512, seq as u8)).unwrap();
        }
        wait_durable(&rx, 50);
        // Bounded wait for the metadata thread (an event, not a sleep, would need a hook
        // the production code has no use for).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let on_disk = DiskMeta::load(&path).ok().flatten().map(|m| m.durable_seq);
            assert!(on_disk.unwrap_or(0) <= h.durable_seq());
            if on_disk == Some(50) {
                break;
            }
            assert!(Instant::now() < deadline, "metadata stuck at {on_disk:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Another field changed meanwhile is not lost by a later durable-position write.
        h.update_meta(|m| m.block_size = 4096).unwrap();
        a.submit(write(51, 0, 9)).unwrap();
        wait_durable(&rx, 51);
        let meta = a.close().unwrap();
        assert_eq!(meta.durable_seq, 51);
        let on_disk = DiskMeta::load(&path).unwrap().unwrap();
        assert_eq!((on_disk.durable_seq, on_disk.block_size), (51, 4096));
    }

    #[test]
    fn acks_only_after_flush_and_group_commits() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(MemVolume::new(1 << 20));
        let (a, rx) = start(vol.clone(), d.path(), 0);
        for i in 1..=200u64 {
            a.submit(write(i, (i % 100) * 512, i as u8)).unwrap();
        }
        let events = wait_durable(&rx, 200);
        let mut last = 0;
        for e in &events {
            if let ApplierEvent::Durable { seq, .. } = e {
                assert!(*seq > last, "durable positions only move forward");
                last = *seq;
            }
        }
        // Whatever was reported durable survives a power cut.
        vol.power_cut();
        let img = vol.durable();
        for i in 101..=200u64 {
            assert_eq!(img[((i % 100) * 512) as usize], i as u8);
        }
        assert!(
            vol.flushes() <= 200,
            "never more flushes than writes ({})",
            vol.flushes()
        );
        let meta = a.close().unwrap();
        assert_eq!(meta.durable_seq, 200);
        assert_eq!(meta.replicated_bytes, 200 * 512);
        let on_disk = DiskMeta::load(&d.path().join("d.meta.json"))
            .unwrap()
            .unwrap();
        assert_eq!(on_disk.durable_seq, 200);
    }

    /// A volume whose flushes wait until the test lets each one go (by start order).
    struct GatedVolume {
        mem: MemVolume,
        gate: Mutex<Gate>,
        cv: Condvar,
    }

    #[derive(Default)]
    struct Gate {
        started: usize,
        released: Vec<bool>,
    }

    impl GatedVolume {
        fn wait_started(&self, n: usize) -> bool {
            let g = self.gate.lock().unwrap();
            let (g, _) = self
                .cv
                .wait_timeout_while(g, Duration::from_secs(5), |g| g.started < n)
                .unwrap();
            g.started >= n
        }

        fn release(&self, k: usize) {
            let mut g = self.gate.lock().unwrap();
            if g.released.len() <= k {
                g.released.resize(k + 1, false);
            }
            g.released[k] = true;
            self.cv.notify_all();
        }
    }

    impl Volume for GatedVolume {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.mem.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.mem.write_zeroes(offset, len)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn flush(&self) -> std::io::Result<()> {
            let mut g = self.gate.lock().unwrap();
            let k = g.started;
            g.started += 1;
            self.cv.notify_all();
            let _g = self
                .cv
                .wait_while(g, |g| !g.released.get(k).copied().unwrap_or(false))
                .unwrap();
            // What this flush covers is what was written before it began (MemVolume keeps
            // pending writes in order; flushing them all is what a device flush does).
            self.mem.flush()
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    /// With two flushers, a write that lands while a flush runs starts the next flush at once,
    /// and a later flush that finishes first publishes only after the earlier one: durable
    /// positions only move forward.
    #[test]
    fn a_second_flush_overlaps_the_first_and_publishes_after_it() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(GatedVolume {
            mem: MemVolume::new(1 << 20),
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel();
        let (a, mut events) = Applier::start(
            vol.clone(),
            DiskMeta::new("s", "d", 1 << 20, 512),
            d.path().join("d.meta.json"),
            ApplierConfig {
                flushers: 2,
                ..ApplierConfig::default()
            },
        )
        .unwrap();
        std::thread::spawn(move || {
            while let Some(e) = events.blocking_next() {
                let _ = tx.send(e);
            }
        });
        a.submit(write(1, 0, 1)).unwrap();
        assert!(vol.wait_started(1), "the first flush starts");
        a.submit(write(2, 512, 2)).unwrap();
        assert!(
            vol.wait_started(2),
            "a second flush starts while the first is still running"
        );
        // The second finishes first: nothing may be reported before the first is done.
        vol.release(1);
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a later flush published before an earlier one"
        );
        vol.release(0);
        let mut seqs = vec![];
        while seqs.last() != Some(&2) {
            match rx
                .recv_timeout(Duration::from_secs(5))
                .expect("durable events")
            {
                ApplierEvent::Durable { seq, .. } => seqs.push(seq),
                e => panic!("{e:?}"),
            }
        }
        assert_eq!(seqs, vec![1, 2]);
        vol.release(2);
        vol.release(3);
        a.close().unwrap();
    }

    /// Crash at every point of a sequence: whatever was reported durable before the cut is in
    /// the durable image, and the metadata never claims more than the image holds; with one
    /// flusher (the default) and with two.
    #[test]
    fn power_cut_at_every_step_loses_nothing_reported() {
        let d = tempfile::tempdir().unwrap();
        for (flushers, cut_after) in [1, 2]
            .into_iter()
            .flat_map(|f| (1..40u64).map(move |c| (f, c)))
        {
            let vol = Arc::new(MemVolume::new(64 * 512));
            let (a, rx) = start_with(
                vol.clone(),
                d.path(),
                0,
                ApplierConfig {
                    flushers,
                    ..ApplierConfig::default()
                },
            );
            let mut reported = 0;
            for i in 1..=cut_after {
                a.submit(write(i, (i % 64) * 512, i as u8)).unwrap();
            }
            // Observe whatever durability events arrived so far, then cut the power.
            while let Ok(e) = rx.try_recv() {
                if let ApplierEvent::Durable { seq, .. } = e {
                    reported = seq;
                }
            }
            vol.power_cut();
            let img = vol.durable();
            for i in 1..=reported {
                // Later writes to the same block may be there too: check the newest <= reported.
                let slot = i % 64;
                let newest = (1..=reported).rev().find(|j| j % 64 == slot).unwrap();
                assert_eq!(
                    img[(slot * 512) as usize],
                    newest as u8,
                    "cut at {cut_after} with {flushers} flusher(s)"
                );
            }
            let h = a.handle();
            drop(a);
            let meta = h.meta();
            assert!(meta.durable_seq <= h.durable_seq());
        }
    }

    #[test]
    fn write_failure_stops_acks_at_the_failure() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(MemVolume::new(1 << 20));
        let (a, rx) = start(vol.clone(), d.path(), 0);
        for i in 1..=5 {
            a.submit(write(i, i * 512, 1)).unwrap();
        }
        wait_durable(&rx, 5);
        vol.fail_writes_after(2, libc::ENOSPC);
        for i in 6..=10 {
            a.submit(write(i, i * 512, 1)).unwrap();
        }
        let mut failed = None;
        let mut max_durable = 5;
        while failed.is_none() {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                ApplierEvent::Failed { seq, errno, .. } => failed = Some((seq, errno)),
                ApplierEvent::Durable { seq, .. } => max_durable = seq,
                _ => {}
            }
        }
        assert_eq!(failed, Some((8, Some(libc::ENOSPC))));
        let h = a.handle();
        let meta = a.close().unwrap();
        assert!(h.failed());
        assert!(meta.durable_seq < 8 && max_durable < 8);
    }

    #[test]
    fn flush_failure_is_never_acked() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(MemVolume::new(1 << 20));
        let (a, rx) = start(vol.clone(), d.path(), 10);
        vol.fail_flushes();
        a.submit(write(11, 0, 1)).unwrap();
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            ApplierEvent::Failed { seq: 11, .. } => {}
            e => panic!("{e:?}"),
        }
        let meta = a.close().unwrap();
        assert_eq!(meta.durable_seq, 10);
        assert_eq!(vol.durable()[0], 0);
    }

    #[test]
    fn marker_holds_writes_until_released() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(MemVolume::new(1 << 20));
        let (a, rx) = start(vol.clone(), d.path(), 0);
        a.submit(write(1, 0, 1)).unwrap();
        a.submit(Op::Marker {
            seq: 2,
            marker_id: 77,
            guard: None,
        })
        .unwrap();
        a.submit(write(3, 0, 3)).unwrap();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                ApplierEvent::MarkerReached {
                    marker_id: 77,
                    seq: 2,
                } => break,
                ApplierEvent::Durable { seq, .. } => assert!(seq <= 2),
                e => panic!("{e:?}"),
            }
        }
        // Held: the write after the marker has not touched the volume.
        assert_eq!(vol.current()[0], 1);
        assert_eq!(vol.durable()[0], 1);
        a.handle().release_marker(77);
        wait_durable(&rx, 3);
        assert_eq!(vol.durable()[0], 3);
        a.close().unwrap();
    }

    /// The connection that asked for a restore point is gone while the writer holds at its
    /// marker: close must not wait for a release that never comes. What follows the marker
    /// is dropped (never durable, so never acked; its guards are freed) and the volume stays
    /// at the marker's image.
    #[test]
    fn close_while_held_at_a_marker_ends_the_hold_and_drops_what_follows() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(MemVolume::new(1 << 20));
        let (a, rx) = start(vol.clone(), d.path(), 0);
        let token = Arc::new(());
        a.submit(write(1, 0, 1)).unwrap();
        a.submit(Op::Marker {
            seq: 2,
            marker_id: 5,
            guard: Some(Box::new(token.clone())),
        })
        .unwrap();
        a.submit(Op::Zeroes {
            seq: 3,
            offset: 0,
            len: 512,
            guard: Some(Box::new(token.clone())),
        })
        .unwrap();
        a.submit(Op::Write {
            seq: 4,
            offset: 0,
            data: Bytes::from(vec![4; 512]),
            guard: Some(Box::new(token.clone())),
        })
        .unwrap();
        loop {
            if let ApplierEvent::MarkerReached { marker_id: 5, .. } =
                rx.recv_timeout(Duration::from_secs(10)).unwrap()
            {
                break;
            }
        }
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || done_tx.send(a.close().unwrap()).unwrap());
        let meta = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("close returned while the marker was never released");
        assert_eq!(meta.durable_seq, 2, "nothing after the marker is durable");
        assert_eq!(vol.durable()[0], 1, "the volume is the marker's image");
        assert_eq!(
            Arc::strong_count(&token),
            1,
            "every queued op's guard was freed"
        );
        while let Ok(ev) = rx.try_recv() {
            if let ApplierEvent::Durable { seq, .. } = ev {
                assert!(seq <= 2, "{ev:?}");
            }
        }
    }

    #[test]
    fn guards_are_dropped_once_written() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(MemVolume::new(1 << 20));
        let (a, rx) = start(vol, d.path(), 0);
        let token = Arc::new(());
        a.submit(Op::Write {
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![1; 512]),
            guard: Some(Box::new(token.clone())),
        })
        .unwrap();
        wait_durable(&rx, 1);
        assert_eq!(Arc::strong_count(&token), 1);
        a.close().unwrap();
    }

    /// Copy-on-write capture: after the marker is released, writes to captured blocks do not
    /// change what the snapshot reads.
    #[test]
    fn capture_sees_the_marker_image_while_writes_continue() {
        let d = tempfile::tempdir().unwrap();
        let vol = Arc::new(MemVolume::new((4 * BLOCK) as usize));
        let (a, rx) = start(vol.clone(), d.path(), 0);
        let blk = |seq, b: u64, byte: u8| Op::Write {
            seq,
            offset: b * BLOCK,
            data: Bytes::from(vec![byte; 4096]),
            guard: None,
        };
        a.submit(blk(1, 0, 1)).unwrap();
        a.submit(blk(2, 2, 2)).unwrap();
        a.submit(Op::Marker {
            seq: 3,
            marker_id: 9,
            guard: None,
        })
        .unwrap();
        a.submit(blk(4, 0, 4)).unwrap(); // overwrites a captured block after the marker
        a.submit(blk(5, 3, 5)).unwrap();
        loop {
            if let ApplierEvent::MarkerReached { .. } =
                rx.recv_timeout(Duration::from_secs(10)).unwrap()
            {
                break;
            }
        }
        let h = a.handle();
        // No parent: every block is part of the capture.
        let cap = h.begin_capture(None, "rp-1");
        assert!(cap.full);
        h.release_marker(9);
        wait_durable(&rx, 5);
        assert_eq!(vol.current()[0], 4, "the writer went on");
        assert_eq!(
            cap.take(0).unwrap()[0],
            1,
            "the capture kept the marker image"
        );
        assert_eq!(cap.take(2).unwrap()[0], 2);
        assert_eq!(cap.take(3).unwrap()[0], 0);
        h.end_capture(&cap, true);

        // Relative to rp-1, only blocks 0 and 3 changed.
        a.submit(Op::Marker {
            seq: 6,
            marker_id: 10,
            guard: None,
        })
        .unwrap();
        loop {
            if let ApplierEvent::MarkerReached { .. } =
                rx.recv_timeout(Duration::from_secs(10)).unwrap()
            {
                break;
            }
        }
        let cap = h.begin_capture(Some("rp-1"), "rp-2");
        assert!(!cap.full);
        assert_eq!(
            (0..4).filter(|b| cap.is_changed(*b)).collect::<Vec<_>>(),
            vec![0, 3]
        );
        // A failed snapshot gives its changes back to the next one.
        h.end_capture(&cap, false);
        h.release_marker(10);
        let cap = h.begin_capture(Some("rp-1"), "rp-2");
        assert_eq!(cap.changed_count(), 2);
        h.end_capture(&cap, true);
        a.close().unwrap();

        // Persisted clean on close; a running applier leaves it untrusted on disk.
        let p = d.path().join("d.changes");
        let m = ChangeMap::load(&p, 4 * BLOCK);
        assert!(m.trusted && m.base.as_deref() == Some("rp-2"));
        let (a, _rx) = start(vol, d.path(), 6);
        assert!(
            !ChangeMap::load(&p, 4 * BLOCK).trusted,
            "a crash now must mean all changed"
        );
        a.close().unwrap();
    }

    /// Writes `img` (the marker image) block by block, a marker, and holds there: the caller
    /// begins a capture and releases marker 1.
    fn at_marker(a: &Applier, rx: &Receiver<ApplierEvent>, img: &[u8]) -> u64 {
        let mut seq = 0;
        for (i, chunk) in img.chunks(BLOCK as usize).enumerate() {
            seq += 1;
            a.submit(Op::Write {
                seq,
                offset: i as u64 * BLOCK,
                data: Bytes::copy_from_slice(chunk),
                guard: None,
            })
            .unwrap();
        }
        seq += 1;
        a.submit(Op::Marker {
            seq,
            marker_id: 1,
            guard: None,
        })
        .unwrap();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                ApplierEvent::MarkerReached { .. } => return seq,
                ApplierEvent::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
    }

    /// Bytes that differ in every block and within it, so a block read from the wrong place
    /// (another block, another offset of the spill file) cannot pass.
    fn pattern(len: usize, salt: u64) -> Vec<u8> {
        (0..len as u64)
            .map(|i| ((i / 4096 * 31 + i * 7 + salt * 101) % 251) as u8)
            .collect()
    }

    /// Overwrites every block after the marker with writes, partial writes across block edges
    /// and a zero range; returns the last sequence.
    fn overwrite_everything(a: &Applier, mut seq: u64, size: u64) -> u64 {
        let mut next = |op: Box<dyn FnOnce(u64) -> Op>| {
            seq += 1;
            a.submit(op(seq)).unwrap();
        };
        // A write straddling blocks 1 and 2, a zero range over blocks 3..=6, then whole blocks.
        next(Box::new(|seq| Op::Write {
            seq,
            offset: 2 * BLOCK - 4096,
            data: Bytes::from(vec![0xEE; 8192]),
            guard: None,
        }));
        next(Box::new(|seq| Op::Zeroes {
            seq,
            offset: 3 * BLOCK + 512,
            len: 4 * BLOCK - 1024,
            guard: None,
        }));
        for b in 0..blocks_for(size) {
            let len = (size - b * BLOCK).min(BLOCK) as usize;
            next(Box::new(move |seq| Op::Write {
                seq,
                offset: b * BLOCK,
                data: Bytes::from(vec![0xAB; len]),
                guard: None,
            }));
        }
        seq
    }

    /// A full capture while the writer rewrites the whole disk: preserved blocks beyond the
    /// memory bound go to the spill file, memory never holds more than the bound, and every
    /// block read back is the marker image, byte for byte (the last block is a short one).
    #[test]
    fn capture_spills_beyond_its_memory_bound_and_reads_back_the_marker_image() {
        let d = tempfile::tempdir().unwrap();
        let size = 16 * BLOCK - 3 * 4096;
        let vol = Arc::new(MemVolume::new(size as usize));
        let spill_dir = d.path().join("spill");
        let (a, rx) = start_with(
            vol.clone(),
            d.path(),
            0,
            ApplierConfig {
                capture_memory_bytes: 2 * BLOCK,
                spill_dir: Some(spill_dir.clone()),
                ..ApplierConfig::default()
            },
        );
        let img = pattern(size as usize, 1);
        let seq = at_marker(&a, &rx, &img);
        let h = a.handle();
        let cap = h.begin_capture(None, "rp-1");
        assert!(cap.full);
        h.release_marker(1);
        // The capture reads one block before the writer goes on: memory it frees is reused.
        assert_eq!(
            cap.take(5).unwrap(),
            img[5 * BLOCK as usize..6 * BLOCK as usize]
        );
        let last = overwrite_everything(&a, seq, size);
        wait_durable(&rx, last);
        assert!(
            vol.current().iter().all(|b| *b == 0xAB),
            "the writer went on"
        );

        let st = cap.stats();
        assert!(
            st.peak_memory_bytes <= 2 * BLOCK,
            "memory held {} bytes, bound {}",
            st.peak_memory_bytes,
            2 * BLOCK
        );
        assert!(st.spilled_bytes > 0, "{st:?}");
        // 16 blocks preserved but one taken before: 2 in memory, the other 13 spilled.
        assert_eq!(st.spilled_bytes, 13 * BLOCK - 3 * 4096, "{st:?}");
        assert_eq!(
            std::fs::read_dir(&spill_dir).unwrap().count(),
            0,
            "the spill file has no name"
        );
        for b in (0..blocks_for(size)).rev().filter(|b| *b != 5) {
            let at = (b * BLOCK) as usize;
            let want = &img[at..(at + BLOCK as usize).min(img.len())];
            assert!(
                cap.take(b).unwrap() == want,
                "block {b} is not the marker image"
            );
        }
        assert_eq!(cap.stats().memory_bytes, 0);
        assert!(cap.failure().is_none());
        h.end_capture(&cap, true);
        assert!(cap.take(0).is_err(), "an ended capture reads nothing");
        a.close().unwrap();
    }

    /// Decision: a spill that fails fails its capture (and so its restore point), never the
    /// writer. Here the spill directory cannot be created (its parent is a file); without a
    /// spill directory at all, the bound holds the same way.
    #[test]
    fn a_failed_spill_fails_the_capture_and_not_the_writer() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("file"), b"").unwrap();
        for spill_dir in [Some(d.path().join("file").join("spill")), None] {
            let size = 8 * BLOCK;
            let vol = Arc::new(MemVolume::new(size as usize));
            let (a, rx) = start_with(
                vol.clone(),
                d.path(),
                0,
                ApplierConfig {
                    capture_memory_bytes: 2 * BLOCK,
                    spill_dir: spill_dir.clone(),
                    ..ApplierConfig::default()
                },
            );
            let img = pattern(size as usize, 2);
            let seq = at_marker(&a, &rx, &img);
            let h = a.handle();
            let cap = h.begin_capture(None, "rp-1");
            h.release_marker(1);
            let last = overwrite_everything(&a, seq, size);
            for e in wait_durable(&rx, last) {
                assert!(!matches!(e, ApplierEvent::Failed { .. }), "{e:?}");
            }
            assert!(!h.failed(), "the writer goes on");
            assert!(vol.current().iter().all(|b| *b == 0xAB));
            let why = cap.failure().expect("the capture failed");
            assert!(why.contains("spilling preserved block 3"), "{why}");
            let e = cap.take(7).unwrap_err();
            assert!(e.to_string().contains("capture failed"), "{e}");
            assert_eq!(cap.stats().memory_bytes, 0, "what it held is freed");
            h.end_capture(&cap, false);
            // The failed capture's changes go to the next one, which works.
            a.submit(Op::Marker {
                seq: last + 1,
                marker_id: 2,
                guard: None,
            })
            .unwrap();
            loop {
                if let ApplierEvent::MarkerReached { .. } =
                    rx.recv_timeout(Duration::from_secs(10)).unwrap()
                {
                    break;
                }
            }
            let cap = h.begin_capture(None, "rp-2");
            h.release_marker(2);
            assert!(cap.take(0).unwrap().iter().all(|b| *b == 0xAB));
            h.end_capture(&cap, true);
            a.close().unwrap();
        }
    }
}
