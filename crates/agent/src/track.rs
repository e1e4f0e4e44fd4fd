//! The kernel write tracker: every write that reaches a source block device marks its chunks
//! dirty, as it happens, so follow mode can read only what changed instead of rereading disks.
//!
//! Why this shape:
//! - **No kernel module.** Building one against the running kernel's headers is what breaks
//!   other agents (Secure Boot, unsupported kernels). The block layer's tracepoints already
//!   report every request with its device, sector and length.
//! - **tracefs, not BPF.** A BPF program needs clang and libbpf (or a nightly Rust and
//!   bpf-linker) at build time and BTF or matching headers on the source server; a tracefs
//!   instance needs neither, only `mkdir` and text files. Both work under
//!   `lockdown=integrity` (blktrace does not). The cost is that the kernel formats each event
//!   as text and we parse it back. Measured on the 2-core development VM (release build):
//!   [`Sink::apply`] parses and applies 8.6–10 million lines a second (0.66 million in a debug
//!   build), and the whole path, the kernel formatting `trace_pipe` included, drained a full
//!   buffer at 0.46–0.95 million events a second (`parse_rate` and `drain_rate` below). A
//!   write costs two events (submission and completion), so that is several hundred thousand
//!   writes a second against the ~10^4–10^5 a source server's disk takes. The kernel filters
//!   events by device before they are recorded (`dev == N`), so other disks cost nothing.
//! - **A private instance** (`instances/slipway-<pid>-<n>`): its own ring buffer, filters and
//!   enables, so it never disturbs another tracer or another agent, and `rmdir` removes it.
//!   Instances left by a dead agent (its pid no longer alive) are removed at start.
//! - **Two tracepoints.** `block:block_rq_complete` fires once the request's data reached the
//!   device, so a chunk re-marked on completion is never read (and cleared) before its write
//!   landed; `block:block_bio_queue` fires at submission, an early mark that costs at most one
//!   extra read and is the only event a bio-based device (device mapper, md) produces. Both
//!   carry the whole disk's device number and the absolute sector even when the write went
//!   through a partition. Measured on this kernel (6.18) for a loop device: both fire for
//!   `W`, `D` (discard) and `N` (write zeroes); `block_bio_complete` does not fire for loop.
//!   A disk without `mq` in sysfs ([`TrackedDisk::request_based`] is false: device mapper,
//!   md) gets only the submission mark, so a chunk taken while a write to it is in flight can
//!   be read before that write lands and not be marked again: do not trust tracking alone for
//!   such a disk (keep rescanning it, or track the request-based disks under it).
//! - **Never miss silently.** The instance's `per_cpu/cpu*/stats` count events overwritten
//!   (`overrun`) or dropped; any growth, a `[LOST n EVENTS]` line, a line we cannot parse, a
//!   barrier that times out or a reader that stops marks every disk [`DirtyChunks::lost`]:
//!   the caller must fall back to a full rescan.
//!
//! The core (line parser, `rwbs` rule, partition mapping, [`DirtyChunks`], [`Sink`]) does no
//! I/O and is unit-tested without root; [`Tracker`] is the thin shell over tracefs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Tracepoint sectors (and sysfs `start`/`size`) are always 512 bytes.
pub const SECTOR: u64 = 512;

/// The tracepoints the tracker enables, in the `block` group.
pub const EVENTS: [&str; 2] = ["block_rq_complete", "block_bio_queue"];

/// Where tracefs may be mounted, in order of preference.
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Why write tracking is unavailable (the caller falls back to rescans and reports this), or
/// why a barrier could not vouch for the dirty set.
#[derive(Debug, Error)]
pub enum TrackError {
    #[error("{path} is not a block device")]
    NotBlockDevice { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Resolve {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("write tracking needs root (CAP_SYS_ADMIN over tracefs): {what}: {source}")]
    NotPermitted {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no tracefs: {0}")]
    NoTracefs(String),
    #[error("the kernel has no tracepoint block:{0}")]
    TracepointMissing(&'static str),
    #[error("no disks to track")]
    NoDisks,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the trace reader did not see the barrier's marker within {0:?}")]
    BarrierTimeout(Duration),
    #[error("the trace reader stopped: {0}")]
    Stopped(String),
}

/// An I/O error from tracefs, as [`TrackError::NotPermitted`] when it is one.
fn tracefs_err(what: impl Into<String>, source: io::Error) -> TrackError {
    let what = what.into();
    match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => TrackError::NotPermitted { what, source },
        _ => TrackError::Io { what, source },
    }
}

/// A device number as major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    /// From a userspace `dev_t` (`st_rdev`), glibc's encoding.
    pub fn from_rdev(rdev: u64) -> DevId {
        DevId {
            major: (((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff)) as u32,
            minor: ((rdev & 0xff) | ((rdev >> 12) & !0xff)) as u32,
        }
    }

    /// The kernel's internal `dev_t` (`major << 20 | minor`), which the tracepoints' `dev`
    /// field holds and their filters compare against.
    pub fn kernel(self) -> u32 {
        (self.major << 20) | (self.minor & 0xf_ffff)
    }

    /// Parses sysfs's `dev` file (`"7:0\n"`).
    fn parse_sysfs(text: &str) -> Option<DevId> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(DevId {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

/// A disk to track: a whole block device, or a partition (a range of its whole disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedDisk {
    pub path: PathBuf,
    /// The whole disk, whose number the tracepoints carry even for writes to a partition.
    pub disk: DevId,
    /// Where this disk starts on the whole disk, in 512-byte sectors (0 for a whole disk).
    pub start_sector: u64,
    /// Its length in 512-byte sectors.
    pub sectors: u64,
    /// Whether the whole disk is request-based (blk-mq, `mq` in sysfs), so that
    /// `block_rq_complete` re-marks a chunk once a write landed. False: submission marks only.
    pub request_based: bool,
}

impl TrackedDisk {
    /// Resolves `/dev/loop0`, `/dev/loop0p1`, `/dev/sda2`, or a symlink to one, through its
    /// `st_rdev` and `/sys/dev/block/MAJ:MIN`: a partition has a `partition` file there and
    /// its parent directory is the whole disk.
    pub fn resolve(path: &Path) -> Result<TrackedDisk, TrackError> {
        let err = |what: &str, source: io::Error| TrackError::Resolve {
            path: path.to_owned(),
            what: what.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(|e| err("stat", e))?;
        if !meta.file_type().is_block_device() {
            return Err(TrackError::NotBlockDevice {
                path: path.to_owned(),
            });
        }
        let dev = DevId::from_rdev(meta.rdev());
        let link = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.major, dev.minor));
        let sys = fs::canonicalize(&link).map_err(|e| err(&format!("{}", link.display()), e))?;
        let read = |p: &Path| -> Result<String, TrackError> {
            fs::read_to_string(p).map_err(|e| err(&format!("{}", p.display()), e))
        };
        let number = |p: &Path| -> Result<u64, TrackError> {
            let text = read(p)?;
            text.trim().parse().map_err(|_| {
                err(
                    &format!("{}", p.display()),
                    io::Error::other(format!("not a number: {text:?}")),
                )
            })
        };
        let sectors = number(&sys.join("size"))?;
        let (disk_dir, disk, start_sector) = if sys.join("partition").exists() {
            let parent = sys.parent().unwrap_or(&sys).to_owned();
            let text = read(&parent.join("dev"))?;
            let disk = DevId::parse_sysfs(&text).ok_or_else(|| {
                err(
                    &format!("{}/dev", parent.display()),
                    io::Error::other(format!("not a device number: {text:?}")),
                )
            })?;
            let start = number(&sys.join("start"))?;
            (parent, disk, start)
        } else {
            (sys, dev, 0)
        };
        Ok(TrackedDisk {
            path: path.to_owned(),
            disk,
            start_sector,
            sectors,
            request_based: disk_dir.join("mq").exists(),
        })
    }

    /// Length in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.sectors.saturating_mul(SECTOR)
    }

    /// The chunks of this disk that a write of `nr_sector` sectors at absolute `sector` of the
    /// whole disk touches: `None` when it lies outside this disk, clipped at its edges.
    pub fn chunks_of(&self, sector: u64, nr_sector: u64, chunk_size: u64) -> Option<Range<u64>> {
        let end = self.start_sector.saturating_add(self.sectors);
        let lo = sector.max(self.start_sector);
        let hi = sector.saturating_add(nr_sector).min(end);
        if lo >= hi || chunk_size == 0 {
            return None;
        }
        let lo = (lo - self.start_sector).saturating_mul(SECTOR);
        let hi = (hi - self.start_sector).saturating_mul(SECTOR);
        Some(lo / chunk_size..hi.div_ceil(chunk_size))
    }
}

/// Which tracepoint a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    RqComplete,
    BioQueue,
}

/// One block event from `trace_pipe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEvent<'a> {
    pub kind: EventKind,
    /// The whole disk.
    pub disk: DevId,
    pub rwbs: &'a [u8],
    /// Absolute sector of the whole disk.
    pub sector: u64,
    pub nr_sector: u64,
}

impl BlockEvent<'_> {
    /// Whether this event changes the disk's contents: see [`rwbs_is_change`].
    pub fn is_change(&self) -> bool {
        rwbs_is_change(self.rwbs, self.nr_sector)
    }
}

/// Whether an event with these `rwbs` letters and length changes data: every event with
/// `nr_sector > 0` that is not a read or a bare flush. The kernel writes an optional `F`
/// (preflush), then the operation (`R` read, `W` write, `D` discard, `DE` secure erase, `F`
/// flush, `N` anything else: write zeroes, zone ops), then flags (`F` FUA, `A`, `S`, `M`, …).
/// An operation letter we do not know counts as a change: a spurious mark costs one read, a
/// missed one a corrupt replica.
pub fn rwbs_is_change(rwbs: &[u8], nr_sector: u64) -> bool {
    if nr_sector == 0 {
        return false;
    }
    let op = match rwbs {
        [b'F', op @ (b'R' | b'W' | b'D' | b'F' | b'N'), ..] => *op,
        [op, ..] => *op,
        [] => return true,
    };
    !matches!(op, b'R' | b'F')
}

/// One line of `trace_pipe`, as the tracker understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    Block(BlockEvent<'a>),
    /// A `trace_marker` write: its text.
    Marker(&'a [u8]),
    /// `CPU:n [LOST m EVENTS]`: `m` if the kernel knew it.
    Lost(Option<u64>),
}

/// A line the parser did not understand (kept for the loss reason).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unrecognized trace line: {0:?}")]
pub struct ParseError(pub String);

/// Parses one line of `trace_pipe` (without its newline). Formats on this kernel:
///
/// ```text
///       dd-6955    [001] .....   223.906711: block_bio_queue: 7,0 WS 800 + 8 [dd]
///  ksoftirqd/0-14  [000] ..s..   223.908029: block_rq_complete: 7,0 WS () 800 + 8 be,0,4 [0]
///     bash-6936    [001] ...1.   223.930301: tracing_mark_write: some text
/// CPU:1 [LOST 12 EVENTS]
/// ```
///
/// Older kernels print `block_rq_complete` without the `be,0,4` priority; both parse. The
/// event name is found after the first `": "` that precedes a known name: a task name is at
/// most 15 bytes, shorter than any of the searched `": name: "` strings, so it cannot fake one.
pub fn parse_line(line: &[u8]) -> Result<Line<'_>, ParseError> {
    let bad = || ParseError(String::from_utf8_lossy(line).into_owned());
    if let Some(rest) = line.strip_prefix(b"CPU:") {
        if let Some(at) = find(rest, b"[LOST") {
            let count = rest[at + 5..]
                .strip_prefix(b" ")
                .and_then(|r| number_prefix(r).map(|(n, _)| n));
            return Ok(Line::Lost(count));
        }
        return Err(bad());
    }
    let mut from = 0;
    while let Some(at) = find(&line[from..], b": ") {
        let rest = &line[from + at + 2..];
        if let Some(args) = rest.strip_prefix(b"block_rq_complete: ") {
            return parse_block(EventKind::RqComplete, args)
                .map(Line::Block)
                .ok_or_else(bad);
        }
        if let Some(args) = rest.strip_prefix(b"block_bio_queue: ") {
            return parse_block(EventKind::BioQueue, args)
                .map(Line::Block)
                .ok_or_else(bad);
        }
        if let Some(text) = rest.strip_prefix(b"tracing_mark_write: ") {
            return Ok(Line::Marker(text));
        }
        from += at + 2;
    }
    Err(bad())
}

/// `7,0 WS () 800 + 8 be,0,4 [0]` (rq_complete) or `7,0 WS 800 + 8 [dd]` (bio_queue).
fn parse_block(kind: EventKind, args: &[u8]) -> Option<BlockEvent<'_>> {
    let (major, rest) = number_prefix(args)?;
    let rest = rest.strip_prefix(b",")?;
    let (minor, rest) = number_prefix(rest)?;
    let rest = rest.strip_prefix(b" ")?;
    let rwbs_len = rest.iter().position(|&b| b == b' ')?;
    let (rwbs, rest) = rest.split_at(rwbs_len);
    let mut rest = &rest[1..];
    if kind == EventKind::RqComplete {
        // `(cmd)`: empty but for passthrough requests, whose hex bytes hold no `)`.
        let close = rest.strip_prefix(b"(")?.iter().position(|&b| b == b')')?;
        rest = rest[close + 2..].strip_prefix(b" ")?;
    }
    let (sector, rest) = number_prefix(rest)?;
    let rest = rest.strip_prefix(b" + ")?;
    let (nr_sector, _) = number_prefix(rest)?;
    Some(BlockEvent {
        kind,
        disk: DevId {
            major: u32::try_from(major).ok()?,
            minor: u32::try_from(minor).ok()?,
        },
        rwbs,
        sector,
        nr_sector,
    })
}

/// A decimal number at the start of `s` and what follows it.
fn number_prefix(s: &[u8]) -> Option<(u64, &[u8])> {
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in &s[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((n, &s[digits..]))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while let Some(i) = hay[from..].iter().position(|&b| b == first) {
        let at = from + i;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The dirty chunks of one disk: one bit per chunk, set by the tracker, cleared by the reader
/// that is about to read the chunk. A write that lands after [`take`](Self::take) sets the bit
/// again, so the chunk is read again.
#[derive(Debug)]
pub struct DirtyChunks {
    chunk_size: u64,
    chunks: u64,
    words: Box<[AtomicU64]>,
    lost: AtomicBool,
}

impl DirtyChunks {
    /// All clean, for a disk of `size_bytes` cut into chunks of `chunk_size` bytes (the last
    /// one may be short).
    pub fn new(size_bytes: u64, chunk_size: u64) -> DirtyChunks {
        assert!(chunk_size > 0, "chunk size must be positive");
        let chunks = size_bytes.div_ceil(chunk_size);
        let words = (0..chunks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyChunks {
            chunk_size,
            chunks,
            words,
            lost: AtomicBool::new(false),
        }
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The number of chunks.
    pub fn len(&self) -> u64 {
        self.chunks
    }

    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// Marks chunks dirty; the part of `chunks` past the end is ignored.
    pub fn mark(&self, chunks: Range<u64>) {
        let end = chunks.end.min(self.chunks);
        let mut c = chunks.start;
        while c < end {
            let word = c / 64;
            let bit = c % 64;
            let n = (end - c).min(64 - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[word as usize].fetch_or(mask, Ordering::AcqRel);
            c += n;
        }
    }

    /// Whether `chunk` is dirty, without clearing it.
    pub fn is_dirty(&self, chunk: u64) -> bool {
        chunk < self.chunks
            && self.words[(chunk / 64) as usize].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    /// Clears `chunk` and says whether it was dirty. Call it before reading the chunk.
    pub fn take(&self, chunk: u64) -> bool {
        if chunk >= self.chunks {
            return false;
        }
        let mask = 1u64 << (chunk % 64);
        self.words[(chunk / 64) as usize].fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Clears every chunk and returns those that were dirty, in order.
    pub fn take_all(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, word) in self.words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// The number of dirty chunks right now.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Records that events were lost: the dirty set can no longer be trusted.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Whether events were lost since the last [`take_lost`](Self::take_lost).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Clears the lost flag and says whether it was set. Clear it before starting the full
    /// rescan it calls for: what is written after that is marked again.
    pub fn take_lost(&self) -> bool {
        self.lost.swap(false, Ordering::AcqRel)
    }
}

/// What applying a line asks of the reader beyond marking chunks.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied<'a> {
    Nothing,
    Marker(&'a [u8]),
    /// Events were (or may have been) lost, with why; every disk is already marked lost.
    Lost(String),
}

/// Applies parsed trace lines to the disks' dirty sets: the reader thread's whole logic.
#[derive(Debug)]
pub struct Sink {
    disks: Vec<(TrackedDisk, Arc<DirtyChunks>)>,
}

impl Sink {
    pub fn new(disks: Vec<(TrackedDisk, Arc<DirtyChunks>)>) -> Sink {
        Sink { disks }
    }

    /// Applies one line of `trace_pipe` (without its newline).
    pub fn apply<'l>(&self, line: &'l [u8]) -> Applied<'l> {
        match parse_line(line) {
            Ok(Line::Block(ev)) => {
                if ev.is_change() {
                    for (disk, dirty) in &self.disks {
                        if disk.disk == ev.disk {
                            if let Some(chunks) =
                                disk.chunks_of(ev.sector, ev.nr_sector, dirty.chunk_size())
                            {
                                dirty.mark(chunks);
                            }
                        }
                    }
                }
                Applied::Nothing
            }
            Ok(Line::Marker(text)) => Applied::Marker(text),
            Ok(Line::Lost(n)) => self.lost(match n {
                Some(n) => format!("the trace buffer lost {n} events"),
                None => "the trace buffer lost events".to_owned(),
            }),
            Err(e) => self.lost(e.to_string()),
        }
    }

    fn lost(&self, reason: String) -> Applied<'static> {
        self.mark_lost();
        Applied::Lost(reason)
    }

    pub fn mark_lost(&self) {
        for (_, dirty) in &self.disks {
            dirty.mark_lost();
        }
    }
}

/// Lost-event counters summed over a trace buffer's CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossCounters {
    pub overrun: u64,
    pub commit_overrun: u64,
    pub dropped: u64,
}

impl LossCounters {
    /// Adds one `per_cpu/cpuN/stats` file's counters.
    pub fn add_stats(&mut self, text: &str) {
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<u64>() else {
                continue;
            };
            match key.trim() {
                "overrun" => self.overrun += value,
                "commit overrun" => self.commit_overrun += value,
                "dropped events" => self.dropped += value,
                _ => {}
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.overrun + self.commit_overrun + self.dropped
    }
}

/// Tuning for [`Tracker::start_with`].
#[derive(Debug, Clone)]
pub struct TrackerOptions {
    /// Per-CPU ring buffer of the instance.
    pub buffer_size_kb: u32,
    /// How long [`Tracker::barrier`] waits for the reader to see its marker.
    pub barrier_timeout: Duration,
    /// How often the reader checks the loss counters when nothing else happens.
    pub check_interval: Duration,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            buffer_size_kb: 4096,
            barrier_timeout: Duration::from_secs(10),
            check_interval: Duration::from_secs(1),
        }
    }
}

/// State shared by the tracker and its reader thread.
#[derive(Debug)]
struct Shared {
    sink: Sink,
    instance: PathBuf,
    /// Prefix of this tracker's barrier markers; the sequence number follows.
    marker_prefix: String,
    stop: AtomicBool,
    seen: Mutex<Seen>,
    seen_cv: Condvar,
    /// Loss counters as last accounted for.
    losses: Mutex<u64>,
    reason: Mutex<Option<String>>,
    /// Held by the reader while it reads and applies a batch (tests hold it to stall it).
    gate: Mutex<()>,
}

#[derive(Debug, Default)]
struct Seen {
    marker: u64,
    failed: Option<String>,
}

impl Shared {
    fn lost(&self, reason: String) {
        self.sink.mark_lost();
        tracing::warn!(instance = %self.instance.display(), "write tracking lost events: {reason}");
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
    }

    fn fail(&self, reason: String) {
        self.lost(reason.clone());
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed = Some(reason);
        self.seen_cv.notify_all();
    }

    /// Compares the instance's loss counters with those already accounted for.
    fn check_losses(&self) {
        let mut seen = self.losses.lock().unwrap_or_else(PoisonError::into_inner);
        match read_losses(&self.instance) {
            Ok(now) if now.total() > *seen => {
                let grew = now.total() - *seen;
                *seen = now.total();
                self.lost(format!(
                    "the trace buffer overran or dropped {grew} events ({now:?} since start)"
                ));
            }
            Ok(_) => {}
            Err(e) => self.lost(format!("reading the trace buffer's loss counters: {e}")),
        }
    }
}

/// Sums `per_cpu/cpu*/stats` of an instance.
fn read_losses(instance: &Path) -> io::Result<LossCounters> {
    let mut counters = LossCounters::default();
    for entry in fs::read_dir(instance.join("per_cpu"))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("cpu") {
            counters.add_stats(&fs::read_to_string(entry.path().join("stats"))?);
        }
    }
    Ok(counters)
}

/// Instance names are unique within the process too.
static INSTANCES: AtomicU64 = AtomicU64::new(0);

/// A running write tracker: a private tracefs instance, its reader thread and one
/// [`DirtyChunks`] per tracked disk. Dropping it disables the events and removes the instance.
#[derive(Debug)]
pub struct Tracker {
    disks: Vec<TrackedDisk>,
    dirty: Vec<Arc<DirtyChunks>>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    /// `trace_marker`, open until drop (the instance cannot be removed while it is).
    marker: Option<File>,
    /// Serializes barriers; holds the last marker's sequence number.
    barrier: Mutex<u64>,
    barrier_timeout: Duration,
}

impl Tracker {
    /// Starts tracking writes to `disks`, each cut into chunks of `chunk_size` bytes, with the
    /// default options. Writes completed before this returns may or may not be marked.
    pub fn start(disks: &[TrackedDisk], chunk_size: u64) -> Result<Tracker, TrackError> {
        Tracker::start_with(disks, chunk_size, &TrackerOptions::default())
    }

    pub fn start_with(
        disks: &[TrackedDisk],
        chunk_size: u64,
        options: &TrackerOptions,
    ) -> Result<Tracker, TrackError> {
        if disks.is_empty() {
            return Err(TrackError::NoDisks);
        }
        let root = tracefs_root()?;
        for event in EVENTS {
            if !root.join("events/block").join(event).is_dir() {
                return Err(TrackError::TracepointMissing(event));
            }
        }
        remove_stale_instances(&root.join("instances"));
        let name = format!(
            "slipway-{}-{}",
            std::process::id(),
            INSTANCES.fetch_add(1, Ordering::Relaxed)
        );
        let instance = root.join("instances").join(&name);
        fs::create_dir(&instance)
            .map_err(|e| tracefs_err(format!("mkdir {}", instance.display()), e))?;
        // From here on the instance exists: remove it on any error.
        let mut guard = InstanceGuard(Some(instance.clone()));

        let write = |file: &str, value: &str| -> Result<(), TrackError> {
            let path = instance.join(file);
            fs::write(&path, value)
                .map_err(|e| tracefs_err(format!("writing {value:?} to {}", path.display()), e))
        };
        write("buffer_size_kb", &options.buffer_size_kb.to_string())?;
        // Barriers rely on trace_pipe merging the CPUs' buffers in one time order.
        write("trace_clock", "global")?;
        let mut devs: Vec<u32> = disks.iter().map(|d| d.disk.kernel()).collect();
        devs.sort_unstable();
        devs.dedup();
        let filter = devs
            .iter()
            .map(|d| format!("dev == {d}"))
            .collect::<Vec<_>>()
            .join(" || ");
        for event in EVENTS {
            write(&format!("events/block/{event}/filter"), &filter)?;
        }
        let dirty: Vec<Arc<DirtyChunks>> = disks
            .iter()
            .map(|d| Arc::new(DirtyChunks::new(d.size_bytes(), chunk_size)))
            .collect();
        let losses = read_losses(&instance)
            .map_err(|e| tracefs_err(format!("reading {}/per_cpu", instance.display()), e))?;
        let pipe_path = instance.join("trace_pipe");
        let pipe = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe_path)
            .map_err(|e| tracefs_err(format!("opening {}", pipe_path.display()), e))?;
        let marker_path = instance.join("trace_marker");
        let marker = OpenOptions::new()
            .write(true)
            .open(&marker_path)
            .map_err(|e| tracefs_err(format!("opening {}", marker_path.display()), e))?;
        for event in EVENTS {
            write(&format!("events/block/{event}/enable"), "1")?;
        }

        let shared = Arc::new(Shared {
            sink: Sink::new(disks.iter().cloned().zip(dirty.iter().cloned()).collect()),
            marker_prefix: format!("slipway-barrier-{name}-"),
            instance: instance.clone(),
            stop: AtomicBool::new(false),
            seen: Mutex::new(Seen::default()),
            seen_cv: Condvar::new(),
            losses: Mutex::new(losses.total()),
            reason: Mutex::new(None),
            gate: Mutex::new(()),
        });
        let reader = {
            let shared = Arc::clone(&shared);
            let interval = options.check_interval;
            std::thread::Builder::new()
                .name("slipway-track".into())
                .spawn(move || read_loop(&shared, pipe, interval))
                .map_err(|e| TrackError::Io {
                    what: "spawning the trace reader".into(),
                    source: e,
                })?
        };
        guard.0 = None;
        let tracker = Tracker {
            disks: disks.to_vec(),
            dirty,
            shared,
            reader: Some(reader),
            marker: Some(marker),
            barrier: Mutex::new(0),
            barrier_timeout: options.barrier_timeout,
        };
        // Proves the whole path (marker → ring buffer → trace_pipe → reader) before anyone
        // relies on it.
        tracker.barrier()?;
        Ok(tracker)
    }

    /// The tracked disks, in the order given to [`start`](Self::start).
    pub fn disks(&self) -> &[TrackedDisk] {
        &self.disks
    }

    /// The dirty chunks of the `i`th disk.
    pub fn dirty(&self, i: usize) -> &Arc<DirtyChunks> {
        &self.dirty[i]
    }

    /// The tracefs instance directory.
    pub fn instance(&self) -> &Path {
        &self.shared.instance
    }

    /// Waits until every event committed before the call has been applied to the dirty
    /// sets, and the loss counters checked after it: when this returns `Ok`, a write that
    /// completed before the call is marked, or its disk is [`lost`](DirtyChunks::lost).
    pub fn barrier(&self) -> Result<(), TrackError> {
        let mut seq = self.barrier.lock().unwrap_or_else(PoisonError::into_inner);
        *seq += 1;
        let text = format!("{}{}", self.shared.marker_prefix, *seq);
        let marker = self.marker.as_ref().expect("open until drop");
        (&*marker)
            .write_all(text.as_bytes())
            .map_err(|e| TrackError::Io {
                what: "writing the barrier marker".into(),
                source: e,
            })?;
        let deadline = Instant::now() + self.barrier_timeout;
        let mut seen = self
            .shared
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(reason) = &seen.failed {
                return Err(TrackError::Stopped(reason.clone()));
            }
            if seen.marker >= *seq {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(seen);
                self.shared.lost(format!(
                    "a barrier's marker did not come through within {:?}",
                    self.barrier_timeout
                ));
                return Err(TrackError::BarrierTimeout(self.barrier_timeout));
            }
            seen = self
                .shared
                .seen_cv
                .wait_timeout(seen, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(seen);
        self.shared.check_losses();
        Ok(())
    }

    /// Whether any disk lost events (see [`DirtyChunks::take_lost`]) or the reader stopped.
    pub fn lost(&self) -> bool {
        self.dirty.iter().any(|d| d.lost()) || self.stopped().is_some()
    }

    /// Why events were last lost, if they were.
    pub fn reason(&self) -> Option<String> {
        self.shared
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why the reader stopped, if it did: tracking is over, every disk needs rescans.
    pub fn stopped(&self) -> Option<String> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed
            .clone()
    }

    /// Stalls the reader while the guard lives.
    #[cfg(test)]
    fn pause_reader(&self) -> std::sync::MutexGuard<'_, ()> {
        self.shared.gate.lock().unwrap()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wakes the reader out of poll at once.
        if let Some(marker) = self.marker.take() {
            let _ = (&marker).write_all(b"slipway-stop");
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        for event in EVENTS {
            let _ = fs::write(
                self.shared
                    .instance
                    .join(format!("events/block/{event}/enable")),
                "0",
            );
        }
        remove_instance(&self.shared.instance);
    }
}

/// Removes an instance if `start` fails half way.
struct InstanceGuard(Option<PathBuf>);

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        if let Some(instance) = self.0.take() {
            remove_instance(&instance);
        }
    }
}

/// `rmdir` of an instance; it fails with `EBUSY` while a file in it is still open.
fn remove_instance(instance: &Path) {
    for _ in 0..50 {
        match fs::remove_dir(instance) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("removing trace instance {}: {e}", instance.display());
                return;
            }
        }
    }
    tracing::warn!("removing trace instance {}: still busy", instance.display());
}

/// Removes `slipway-<pid>-<n>` instances whose process is gone.
fn remove_stale_instances(instances: &Path) {
    let Ok(entries) = fs::read_dir(instances) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("slipway-"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing the trace instance {name:?} of a dead agent");
            remove_instance(&entry.path());
        }
    }
}

/// Finds tracefs, mounting it at /sys/kernel/tracing if it is nowhere (needs root).
fn tracefs_root() -> Result<PathBuf, TrackError> {
    for root in TRACEFS_ROOTS {
        let root = Path::new(root);
        match fs::metadata(root.join("instances")) {
            Ok(_) => return Ok(root.to_owned()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                return Err(tracefs_err(format!("{}", root.display()), e));
            }
            Err(_) => {}
        }
    }
    let root = Path::new(TRACEFS_ROOTS[0]);
    mount_tracefs(root).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => TrackError::NotPermitted {
            what: format!("mounting tracefs at {}", root.display()),
            source: e,
        },
        _ => TrackError::NoTracefs(format!(
            "not mounted at {} and mounting it failed: {e}",
            TRACEFS_ROOTS.join(" or ")
        )),
    })?;
    if root.join("instances").is_dir() {
        Ok(root.to_owned())
    } else {
        Err(TrackError::NoTracefs(format!(
            "mounted at {} but it has no instances directory",
            root.display()
        )))
    }
}

fn mount_tracefs(target: &Path) -> io::Result<()> {
    let target =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call (two literals
    // and `target`); tracefs takes no mount data, so the data pointer may be null.
    let r = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The reader thread: reads `trace_pipe` until told to stop, applies every line, signals
/// barrier markers and checks the loss counters now and then.
fn read_loop(shared: &Shared, mut pipe: File, check_interval: Duration) {
    let mut buf = vec![0u8; 256 << 10];
    let mut pending: Vec<u8> = Vec::new();
    let mut last_check = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let mut fds = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fds` is one live, writable pollfd and we pass a count of 1; the descriptor
        // stays open for the call since `pipe` is owned by this frame.
        let r = unsafe { libc::poll(&mut fds, 1, 200) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                shared.fail(format!("polling trace_pipe: {e}"));
                return;
            }
        }
        let _gate = shared.gate.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    let complete = match pending.iter().rposition(|&b| b == b'\n') {
                        Some(i) => i + 1,
                        None => continue,
                    };
                    for line in pending[..complete].split(|&b| b == b'\n') {
                        if !line.is_empty() {
                            apply_line(shared, line);
                        }
                    }
                    pending.drain(..complete);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    shared.fail(format!("reading trace_pipe: {e}"));
                    return;
                }
            }
        }
        if last_check.elapsed() >= check_interval {
            shared.check_losses();
            last_check = Instant::now();
        }
    }
}

fn apply_line(shared: &Shared, line: &[u8]) {
    match shared.sink.apply(line) {
        Applied::Nothing => {}
        Applied::Marker(text) => {
            let seq = text
                .strip_prefix(shared.marker_prefix.as_bytes())
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.trim().parse::<u64>().ok());
            if let Some(seq) = seq {
                let mut seen = shared.seen.lock().unwrap_or_else(PoisonError::into_inner);
                seen.marker = seen.marker.max(seq);
                shared.seen_cv.notify_all();
            }
        }
        Applied::Lost(reason) => shared.lost(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RQ: &[u8] =
        b"     ksoftirqd/0-14      [000] ..s..   223.908029: block_rq_complete: 7,0 WS () 800 + 8 be,0,4 [0]";
    const BIO: &[u8] =
        b"              dd-6955    [001] .....   223.906711: block_bio_queue: 7,0 WS 800 + 8 [dd]";

    fn ev(line: &[u8]) -> BlockEvent<'_> {
        match parse_line(line).unwrap() {
            Line::Block(ev) => ev,
            other => panic!("not a block event: {other:?}"),
        }
    }

    fn loop0() -> DevId {
        DevId { major: 7, minor: 0 }
    }

    fn whole(sectors: u64) -> TrackedDisk {
        TrackedDisk {
            path: "/dev/loop0".into(),
            disk: loop0(),
            start_sector: 0,
            sectors,
            request_based: true,
        }
    }

    fn part(start_sector: u64, sectors: u64) -> TrackedDisk {
        TrackedDisk {
            path: "/dev/loop0p1".into(),
            start_sector,
            sectors,
            ..whole(0)
        }
    }

    #[test]
    fn parses_the_events_of_this_kernel() {
        let e = ev(RQ);
        assert_eq!(e.kind, EventKind::RqComplete);
        assert_eq!(e.disk, loop0());
        assert_eq!(e.rwbs, b"WS");
        assert_eq!((e.sector, e.nr_sector), (800, 8));

        let e = ev(BIO);
        assert_eq!(e.kind, EventKind::BioQueue);
        assert_eq!(
            (e.disk, e.rwbs, e.sector, e.nr_sector),
            (loop0(), &b"WS"[..], 800, 8)
        );

        // Older kernels: no priority after the length.
        let e =
            ev(b"  kworker/1:1H-46 [001] d.h1. 5.1: block_rq_complete: 259,3 W () 123456 + 8 [0]");
        assert_eq!(
            e.disk,
            DevId {
                major: 259,
                minor: 3
            }
        );
        assert_eq!((e.sector, e.nr_sector), (123456, 8));

        // A passthrough request's command bytes, an unknown task, a huge sector.
        let e = ev(b"<...>-46 [001] ..... 1.0: block_rq_complete: 8,16 N (12 00 00 00 24 00) 0 + 0 none,0,0 [0]");
        assert_eq!(
            (e.disk.major, e.disk.minor, e.rwbs, e.nr_sector),
            (8, 16, &b"N"[..], 0)
        );
        let e = ev(b"x-1 [000] ..... 1.0: block_bio_queue: 7,0 W 18446744073709551615 + 8 [x]");
        assert_eq!(e.sector, u64::MAX);
    }

    #[test]
    fn a_task_name_cannot_fake_an_event() {
        // A task named "a: b: block_rq_c" (15 bytes at most) before a real bio_queue event.
        let e = ev(b"a: b: block_rq_c-77 [001] ..... 1.5: block_bio_queue: 7,1 W 64 + 8 [a: b: block_rq_c]");
        assert_eq!(
            (e.kind, e.disk.minor, e.sector),
            (EventKind::BioQueue, 1, 64)
        );
    }

    #[test]
    fn parses_markers_and_lost_lines() {
        assert_eq!(
            parse_line(b"  bash-6936 [001] ...1. 223.930301: tracing_mark_write: hello: there")
                .unwrap(),
            Line::Marker(b"hello: there")
        );
        assert_eq!(
            parse_line(b"CPU:1 [LOST 12 EVENTS]").unwrap(),
            Line::Lost(Some(12))
        );
        assert_eq!(
            parse_line(b"CPU:0 [LOST EVENTS]").unwrap(),
            Line::Lost(None)
        );
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        for line in [
            &b"garbage"[..],
            b"x-1 [000] ..... 1.0: block_rq_complete: 7,0 WS 800 + 8 [0]",
            b"x-1 [000] ..... 1.0: block_bio_queue: 7,0 WS 800 - 8 [x]",
            b"x-1 [000] ..... 1.0: block_bio_queue: 7 WS 800 + 8 [x]",
            b"x-1 [000] ..... 1.0: block_bio_queue: 7,0 W 99999999999999999999 + 8 [x]",
            b"x-1 [000] ..... 1.0: sched_switch: prev=a",
            b"CPU:1 something",
        ] {
            assert!(
                parse_line(line).is_err(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn writes_discards_and_zeroes_change_reads_and_flushes_do_not() {
        for rwbs in [
            "W", "WS", "WFS", "FWS", "FWFSM", "D", "DS", "DE", "N", "NS", "FN", "WSM", "X", "",
        ] {
            assert!(rwbs_is_change(rwbs.as_bytes(), 8), "{rwbs}");
            assert!(
                !rwbs_is_change(rwbs.as_bytes(), 0),
                "{rwbs} with no sectors"
            );
        }
        for rwbs in ["R", "RA", "RS", "RM", "FR", "F", "FS", "FF", "FFS"] {
            assert!(!rwbs_is_change(rwbs.as_bytes(), 8), "{rwbs}");
        }
    }

    #[test]
    fn maps_whole_disk_sectors_to_chunks() {
        let chunk = 1 << 20;
        let d = whole(64 << 11); // 64 MiB
        assert_eq!(d.chunks_of(0, 8, chunk), Some(0..1));
        assert_eq!(d.chunks_of(2040, 8, chunk), Some(0..1));
        assert_eq!(d.chunks_of(2040, 16, chunk), Some(0..2)); // straddles chunks 0 and 1
        assert_eq!(d.chunks_of(2048, 2048, chunk), Some(1..2));
        assert_eq!(d.chunks_of(2048, 2049, chunk), Some(1..3));
        assert_eq!(d.chunks_of(0, 0, chunk), None);
        assert_eq!(d.chunks_of(64 << 11, 8, chunk), None); // past the end
        assert_eq!(d.chunks_of((64 << 11) - 8, 16, chunk), Some(63..64)); // clipped
        assert_eq!(d.chunks_of(u64::MAX - 4, 8, chunk), None);
    }

    #[test]
    fn maps_partition_writes_relative_to_its_start_and_clips_them() {
        let chunk = 1 << 20;
        // Starts 1 MiB + 64 KiB into the disk, 16 MiB long.
        let p = part(2048 + 128, 16 << 11);
        assert_eq!(p.chunks_of(0, 2048, chunk), None); // before it
        assert_eq!(p.chunks_of(2048 + 128, 8, chunk), Some(0..1)); // its first sector
        assert_eq!(p.chunks_of(2048, 256, chunk), Some(0..1)); // straddles its start
        assert_eq!(p.chunks_of(2048 + 128 + 2040, 8, chunk), Some(0..1));
        assert_eq!(p.chunks_of(2048 + 128 + 2048, 8, chunk), Some(1..2));
        let end = 2048 + 128 + (16 << 11);
        assert_eq!(p.chunks_of(end - 8, 16, chunk), Some(15..16)); // straddles its end
        assert_eq!(p.chunks_of(end, 8, chunk), None); // after it
        assert_eq!(p.chunks_of(0, u64::MAX, chunk), Some(0..16)); // covers it all
    }

    #[test]
    fn dirty_chunks_mark_take_and_take_all() {
        let d = DirtyChunks::new(200 << 20, 1 << 20);
        assert_eq!(d.len(), 200);
        assert_eq!(DirtyChunks::new((200 << 20) + 1, 1 << 20).len(), 201);
        d.mark(3..4);
        d.mark(60..130); // spans three words
        d.mark(199..1000); // clipped at the end
        assert_eq!(d.count(), 1 + 70 + 1);
        assert!(d.is_dirty(3) && !d.is_dirty(4) && d.is_dirty(64) && d.is_dirty(199));
        assert!(!d.is_dirty(200));
        assert!(d.take(3));
        assert!(!d.take(3), "taken once");
        assert!(!d.take(500));
        d.mark(3..4); // a write landing after the take marks it again
        assert!(d.take(3));
        let all = d.take_all();
        assert_eq!(all, (60..130).chain([199]).collect::<Vec<_>>());
        assert_eq!(d.count(), 0);
        assert!(d.take_all().is_empty());
        d.mark(0..64);
        d.mark(128..192);
        assert_eq!(d.take_all().len(), 128);
    }

    #[test]
    fn dirty_chunks_lost_flag() {
        let d = DirtyChunks::new(1 << 20, 4096);
        assert!(!d.lost());
        d.mark_lost();
        assert!(d.lost() && d.lost());
        assert!(d.take_lost());
        assert!(!d.lost() && !d.take_lost());
    }

    #[test]
    fn sink_marks_whole_disks_and_partitions_and_ignores_others() {
        let chunk = 1 << 20;
        let w = Arc::new(DirtyChunks::new(64 << 20, chunk));
        let p = Arc::new(DirtyChunks::new(16 << 20, chunk));
        let other = TrackedDisk {
            disk: DevId { major: 7, minor: 1 },
            ..whole(64 << 11)
        };
        let o = Arc::new(DirtyChunks::new(64 << 20, chunk));
        let sink = Sink::new(vec![
            (whole(64 << 11), w.clone()),
            (part(2048 + 128, 16 << 11), p.clone()),
            (other, o.clone()),
        ]);
        let line = |rwbs: &str, sector: u64, nr: u64| {
            format!(
                "x-1 [000] ..... 1.0: block_rq_complete: 7,0 {rwbs} () {sector} + {nr} be,0,4 [0]"
            )
        };
        // Through the partition's first sector: whole-disk chunk 1, partition chunk 0.
        assert_eq!(
            sink.apply(line("WS", 2048 + 128, 8).as_bytes()),
            Applied::Nothing
        );
        // Outside the partition.
        sink.apply(line("W", 100, 8).as_bytes());
        // A discard and a write-zeroes, a read and a flush.
        sink.apply(line("DS", 40 << 11, 2048).as_bytes());
        sink.apply(line("NS", 50 << 11, 8).as_bytes());
        sink.apply(line("RA", 60 << 11, 8).as_bytes());
        sink.apply(line("FF", 61 << 11, 0).as_bytes());
        assert_eq!(w.take_all(), vec![0, 1, 40, 50]);
        assert_eq!(p.take_all(), vec![0]);
        assert!(
            o.take_all().is_empty(),
            "another disk's events are not ours"
        );
        assert!(!w.lost() && !p.lost());

        assert_eq!(
            sink.apply(b"x-1 [000] ..... 1.0: tracing_mark_write: m 1"),
            Applied::Marker(b"m 1")
        );
        assert!(matches!(
            sink.apply(b"CPU:0 [LOST 3 EVENTS]"),
            Applied::Lost(_)
        ));
        assert!(w.take_lost() && p.take_lost() && o.take_lost());
        assert!(matches!(sink.apply(b"half a li"), Applied::Lost(_)));
        assert!(w.lost() && p.lost() && o.lost());
    }

    #[test]
    fn loss_counters_sum_overrun_and_dropped() {
        let stats = "entries: 5\noverrun: 3\ncommit overrun: 1\nbytes: 400\noldest event ts:     1.5\nnow ts:   220.074579\ndropped events: 2\nread events: 9\n";
        let mut c = LossCounters::default();
        c.add_stats(stats);
        c.add_stats("overrun: 10\n");
        assert_eq!(
            c,
            LossCounters {
                overrun: 13,
                commit_overrun: 1,
                dropped: 2
            }
        );
        assert_eq!(c.total(), 16);
    }

    #[test]
    fn dev_numbers() {
        assert_eq!(DevId::from_rdev(0x0700), loop0());
        // glibc's makedev(major, minor), with bits above the old 8/12-bit fields.
        let (major, minor): (u64, u64) = (0x1234, 0x12345);
        let rdev = (minor & 0xff)
            | ((major & 0xfff) << 8)
            | ((minor & !0xff) << 12)
            | ((major & !0xfff) << 32);
        assert_eq!(
            DevId::from_rdev(rdev),
            DevId {
                major: 0x1234,
                minor: 0x12345
            }
        );
        assert_eq!(loop0().kernel(), 7 << 20);
        assert_eq!(
            DevId::parse_sysfs("259:3\n"),
            Some(DevId {
                major: 259,
                minor: 3
            })
        );
        assert_eq!(DevId::parse_sysfs("259"), None);
    }

    /// How many trace lines a second the reader can parse and apply. Run with
    /// `cargo test -p slipway-agent --release --lib track::tests::parse_rate -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn parse_rate() {
        let chunk = 1 << 20;
        let w = Arc::new(DirtyChunks::new(1 << 40, chunk));
        let sink = Sink::new(vec![(whole(1 << 31), w.clone())]);
        let lines: Vec<String> = (0..1000u64)
            .map(|i| {
                let sector = i.wrapping_mul(2_654_435_761) % (1 << 31);
                if i % 2 == 0 {
                    format!("     ksoftirqd/0-14      [000] ..s..   223.908029: block_rq_complete: 7,0 WS () {sector} + 8 be,0,4 [0]")
                } else {
                    format!("        postgres-6955    [001] .....   223.906711: block_bio_queue: 7,0 WS {sector} + 8 [postgres]")
                }
            })
            .collect();
        let rounds = 2000;
        let start = Instant::now();
        for _ in 0..rounds {
            for line in &lines {
                std::hint::black_box(sink.apply(line.as_bytes()));
            }
        }
        let rate = (rounds * lines.len()) as f64 / start.elapsed().as_secs_f64();
        eprintln!("parsed and applied {rate:.0} lines/s");
        assert!(w.count() > 0);
    }

    /// How many events a second the whole path (the kernel formatting `trace_pipe`, the
    /// reader, the parser) drains from a full buffer. Root only. Run with
    /// `cargo test -p slipway-agent --release --lib track::tests::drain_rate -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn drain_rate() {
        if !is_root() {
            eprintln!("skipped: write tracking needs root");
            return;
        }
        let image =
            std::env::temp_dir().join(format!("slipway-track-drain-{}.img", std::process::id()));
        File::create(&image).unwrap().set_len(256 << 20).unwrap();
        let Some(lo) = Loop::attach(image) else {
            eprintln!("skipped: no loop device support");
            return;
        };
        let disk = TrackedDisk::resolve(&lo.dev).unwrap();
        let tracker = Tracker::start(&[disk], 1 << 20).unwrap();
        let writes = 20_000;
        let events = {
            let _paused = tracker.pause_reader();
            let t = Instant::now();
            dd(&lo.dev, 0, writes);
            eprintln!("{writes} O_DIRECT 4 KiB writes took {:?}", t.elapsed());
            2 * writes
        };
        let t = Instant::now();
        tracker.barrier().unwrap();
        let took = t.elapsed();
        assert!(!tracker.lost(), "{:?}", tracker.reason());
        eprintln!(
            "drained {events} events in {took:?}: {:.0} events/s",
            events as f64 / took.as_secs_f64()
        );
        assert_eq!(tracker.dirty(0).count(), (writes * 4096).div_ceil(1 << 20));
    }

    // ---- root only: a real loop device, a real tracefs instance ----

    /// A loop device that is detached (and its image removed) on drop.
    struct Loop {
        dev: PathBuf,
        image: PathBuf,
    }

    impl Loop {
        fn attach(image: PathBuf) -> Option<Loop> {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show", "--partscan"])
                .arg(&image)
                .output()
                .ok()?;
            if !out.status.success() {
                eprintln!("losetup: {}", String::from_utf8_lossy(&out.stderr));
                let _ = fs::remove_file(&image);
                return None;
            }
            let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            Some(Loop { dev, image })
        }

        fn part1(&self) -> PathBuf {
            PathBuf::from(format!("{}p1", self.dev.display()))
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("partx")
                .arg("-d")
                .arg(&self.dev)
                .output();
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .status();
            let _ = fs::remove_file(&self.image);
        }
    }

    /// Writes `blocks` 4 KiB blocks of random bytes at byte `offset` of `dev`, O_DIRECT.
    fn dd(dev: &Path, offset: u64, blocks: u64) {
        assert_eq!(offset % 4096, 0);
        let status = std::process::Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", dev.display()))
            .args(["bs=4096", "oflag=direct", "conv=notrunc", "status=none"])
            .arg(format!("seek={}", offset / 4096))
            .arg(format!("count={blocks}"))
            .status()
            .unwrap();
        assert!(status.success(), "dd to {}", dev.display());
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// An MBR with one partition starting at `start` sectors, `sectors` long.
    fn mbr(start: u32, sectors: u32) -> [u8; 512] {
        let mut m = [0u8; 512];
        m[446 + 4] = 0x83;
        m[446 + 8..446 + 12].copy_from_slice(&start.to_le_bytes());
        m[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xaa;
        m
    }

    /// Waits for `/dev/loopNp1`, asking `partx` to add it when the kernel itself has no MBR
    /// parser (as on the development VM).
    fn partition(lo: &Loop) -> Option<PathBuf> {
        let p = lo.part1();
        for attempt in 0..50 {
            if p.exists() {
                return Some(p);
            }
            if attempt == 5 {
                match std::process::Command::new("partx")
                    .arg("-a")
                    .arg(&lo.dev)
                    .output()
                {
                    Ok(out) if out.status.success() => {}
                    Ok(out) => eprintln!("partx -a: {}", String::from_utf8_lossy(&out.stderr)),
                    Err(e) => {
                        eprintln!("partx: {e}");
                        return None;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    #[test]
    fn tracks_writes_to_a_loop_device_and_its_partition() {
        if !is_root() {
            eprintln!("skipped: write tracking needs root");
            return;
        }
        const MIB: u64 = 1 << 20;
        let image = std::env::temp_dir().join(format!("slipway-track-{}.img", std::process::id()));
        {
            let f = File::create(&image).unwrap();
            f.set_len(64 * MIB).unwrap();
            // Partition 1: from 1 MiB + 64 KiB, 16 MiB long, so its chunks are not the disk's.
            (&f).write_all(&mbr(2048 + 128, 16 << 11)).unwrap();
        }
        let Some(lo) = Loop::attach(image) else {
            eprintln!("skipped: no loop device support");
            return;
        };
        let whole = TrackedDisk::resolve(&lo.dev).unwrap();
        assert_eq!((whole.start_sector, whole.sectors), (0, 64 << 11));
        assert!(whole.request_based, "loop is blk-mq");
        let part = partition(&lo).map(|p| TrackedDisk::resolve(&p).unwrap());
        match &part {
            Some(p) => {
                assert_eq!(p.disk, whole.disk);
                assert_eq!((p.start_sector, p.sectors), (2048 + 128, 16 << 11));
            }
            None => eprintln!("partition part skipped: no partition device appeared"),
        }
        let disks: Vec<TrackedDisk> = [Some(whole.clone()), part.clone()]
            .into_iter()
            .flatten()
            .collect();
        let chunk = MIB;
        // An instance left by a dead agent (pids never reach 99999999) is removed at start.
        let stale = tracefs_root()
            .ok()
            .map(|root| root.join("instances/slipway-99999999-0"))
            .filter(|stale| fs::create_dir(stale).is_ok());
        let tracker = match Tracker::start(&disks, chunk) {
            Ok(t) => t,
            Err(
                e @ (TrackError::NotPermitted { .. }
                | TrackError::NoTracefs(_)
                | TrackError::TracepointMissing(_)),
            ) => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let instance = tracker.instance().to_owned();
        assert!(instance.is_dir());
        if let Some(stale) = stale {
            assert!(!stale.exists(), "start removes {}", stale.display());
        }
        let t = Instant::now();
        tracker.barrier().unwrap();
        eprintln!("an idle barrier took {:?}", t.elapsed());
        let w = tracker.dirty(0);
        tracker.barrier().unwrap();
        w.take_all();

        // The whole device: 8 KiB in chunk 0, 4 KiB inside chunk 5, 8 KiB straddling chunks
        // 10 and 11.
        dd(&lo.dev, 4096, 2);
        dd(&lo.dev, 5 * MIB + 8192, 1);
        dd(&lo.dev, 11 * MIB - 4096, 2);
        // A discard of chunk 20 and a zero-out of chunk 25 (`DS` and `NS` events).
        let blkdiscard = |args: &[&str], offset: u64| {
            std::process::Command::new("blkdiscard")
                .args(["-f", "-o", &offset.to_string(), "-l", "65536"])
                .args(args)
                .arg(&lo.dev)
                .status()
                .is_ok_and(|s| s.success())
        };
        let discarded = blkdiscard(&[], 20 * MIB);
        let zeroed = blkdiscard(&["-z"], 25 * MIB);
        if !(discarded && zeroed) {
            eprintln!("blkdiscard failed or is missing: discard {discarded}, zero-out {zeroed}");
        }
        tracker.barrier().unwrap();
        let mut expected = vec![0, 5, 10, 11];
        expected.extend(discarded.then_some(20));
        expected.extend(zeroed.then_some(25));
        assert_eq!(w.take_all(), expected);
        assert!(!tracker.lost(), "{:?}", tracker.reason());

        if let Some(p) = &part {
            let pd = tracker.dirty(1);
            pd.take_all();
            // Through the partition: its offsets 0 and 3 MiB + 4 KiB are whole-disk bytes
            // 1 MiB + 64 KiB (chunk 1) and 4 MiB + 68 KiB (chunk 4).
            dd(&p.path, 0, 1);
            dd(&p.path, 3 * MIB + 4096, 1);
            // Through the whole disk, straddling the partition's end (17 MiB + 64 KiB): the
            // partition sees its last chunk only.
            dd(&lo.dev, 17 * MIB + 65536 - 4096, 2);
            // Through the whole disk, outside the partition.
            dd(&lo.dev, 30 * MIB, 1);
            tracker.barrier().unwrap();
            assert_eq!(pd.take_all(), vec![0, 3, 15]);
            assert_eq!(w.take_all(), vec![1, 4, 17, 30]);
        }

        // A take before a write: the write marks the chunk again.
        dd(&lo.dev, 7 * MIB, 1);
        tracker.barrier().unwrap();
        assert!(w.take(7));
        dd(&lo.dev, 7 * MIB, 1);
        tracker.barrier().unwrap();
        assert!(w.take(7), "a write after the take marks again");
        assert!(!tracker.lost(), "{:?}", tracker.reason());

        drop(tracker);
        assert!(!instance.exists(), "drop removes {}", instance.display());
    }

    #[test]
    fn an_overrun_trace_buffer_is_reported_lost() {
        if !is_root() {
            eprintln!("skipped: write tracking needs root");
            return;
        }
        let image =
            std::env::temp_dir().join(format!("slipway-track-overrun-{}.img", std::process::id()));
        File::create(&image).unwrap().set_len(16 << 20).unwrap();
        let Some(lo) = Loop::attach(image) else {
            eprintln!("skipped: no loop device support");
            return;
        };
        let disk = TrackedDisk::resolve(&lo.dev).unwrap();
        let options = TrackerOptions {
            buffer_size_kb: 8,
            ..TrackerOptions::default()
        };
        let tracker = match Tracker::start_with(&[disk], 1 << 20, &options) {
            Ok(t) => t,
            Err(
                e @ (TrackError::NotPermitted { .. }
                | TrackError::NoTracefs(_)
                | TrackError::TracepointMissing(_)),
            ) => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(!tracker.lost());
        {
            let _paused = tracker.pause_reader();
            // ~2000 events into an 8 KiB buffer that nobody reads.
            dd(&lo.dev, 0, 1000);
            // The kernel's counters alone report it, before trace_pipe's `[LOST n EVENTS]`
            // line (which counts fewer) is read.
            tracker.shared.check_losses();
            assert!(tracker.lost(), "the overrun counters did not grow");
            assert!(tracker.reason().unwrap().contains("overran"));
            assert!(tracker.dirty(0).take_lost());
        }
        tracker.barrier().unwrap();
        assert!(tracker.lost(), "the `[LOST n EVENTS]` line is reported too");
        assert!(tracker.dirty(0).take_lost());
        eprintln!("reason: {:?}", tracker.reason());
    }
}
