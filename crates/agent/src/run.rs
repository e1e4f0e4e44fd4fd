//! One `replicate` run: the tasks around the state machine and how they end.
//!
//! Reading is decoupled from the network on purpose: a reader per disk (a blocking thread
//! running one pass at a time) appends to the retained queues and waits only for the memory
//! window, while connections come and go. A lost connection therefore costs a resend of the
//! unacked suffix, never a reread, and a slow disk never stalls another's stream. The
//! connection manager owns reconnecting; the marker task owns the one rule that spans disks.
//!
//! Exit policy: a permanent refusal or an unusable disk ends the run with exit code 2;
//! anything a reconnect can fix is retried forever.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use slipway_net::tls::TlsError;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::changes::ChunkHashes;
use crate::config::{Config, ConfigError};
use crate::disk::{DiskError, SourceDisk};
use crate::journal::{AckJournal, JournalError};
use crate::persist;
use crate::plan::{PlannedOp, Planner};
use crate::report::{self, ProgressMode};
use crate::session::{self, Link, SessionError};
use crate::state::{PassKind, Source};
use crate::track::{DirtyChunks, TrackedDisk, Tracker};

/// Time between follow-mode passes over a disk whose writes the kernel reports: such a pass
/// reads only the chunks marked dirty, and an empty one costs a scan of the bitmap.
const TRACKED_INTERVAL: Duration = Duration::from_millis(200);

/// How long a checksum-resync pass waits for the server's next chunk hash before it sends
/// the rest of the disk instead (the server hashes at about the speed the agent reads).
const PEER_HASH_PATIENCE: Duration = Duration::from_secs(30);

/// How follow mode finds a disk's changes.
#[derive(Debug)]
pub(crate) enum Tracking {
    /// The kernel marks the chunks written (see [`crate::track`]).
    Kernel(Arc<DirtyChunks>),
    /// Every pass rereads the disk and compares chunk hashes; why.
    Rescan(String),
}

impl Tracking {
    pub fn mode(&self) -> &'static str {
        match self {
            Tracking::Kernel(_) => "kernel",
            Tracking::Rescan(_) => "rescan",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Tracking::Kernel(_) => None,
            Tracking::Rescan(r) => Some(r),
        }
    }
}

/// Starts kernel write tracking for the disks that can have it; says per disk which mode it
/// is in and why. A restored run (`--state-file`) did not see the writes made while no agent
/// ran: its tracked disks start with "lost" set, so their first pass rereads everything.
fn start_tracking(
    cfg: &Config,
    disks: &[Arc<SourceDisk>],
    restored: bool,
) -> (Option<Tracker>, Vec<Tracking>) {
    let all = |why: &str| disks.iter().map(|_| Tracking::Rescan(why.into())).collect();
    if !cfg.follow {
        return (None, all("not following"));
    }
    if !cfg.track {
        return (None, all("--no-track"));
    }
    let mut out: Vec<Tracking> = Vec::with_capacity(disks.len());
    let mut resolved = Vec::new();
    let mut index = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        match TrackedDisk::resolve(&d.path) {
            Ok(t) if !t.request_based => out.push(Tracking::Rescan(
                "not a request-based device (device mapper, md): the kernel reports its \
                 writes only at submission"
                    .into(),
            )),
            Ok(t) => {
                index.push(i);
                resolved.push(t);
                out.push(Tracking::Rescan(String::new()));
            }
            Err(e) => out.push(Tracking::Rescan(e.to_string())),
        }
    }
    if resolved.is_empty() {
        return (None, out);
    }
    match Tracker::start(&resolved, u64::from(cfg.chunk_size)) {
        Ok(t) => {
            for (j, &i) in index.iter().enumerate() {
                let dirty = t.dirty(j).clone();
                if restored {
                    dirty.mark_lost();
                }
                out[i] = Tracking::Kernel(dirty);
            }
            (Some(t), out)
        }
        Err(e) => {
            for &i in &index {
                out[i] = Tracking::Rescan(format!("kernel write tracking unavailable: {e}"));
            }
            (None, out)
        }
    }
}

pub use crate::report::ProgressMode as Progress;

/// Why a run ended badly.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("server trust: {0}")]
    Tls(#[from] TlsError),
    #[error("opening the {0}")]
    JournalOpen(#[source] JournalError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// Whether only a human can fix this (bad arguments, unusable disk, permanent refusal).
    pub fn is_permanent(&self) -> bool {
        match self {
            AgentError::Config(_)
            | AgentError::Disk(_)
            | AgentError::Tls(_)
            | AgentError::JournalOpen(_) => true,
            AgentError::Session(e) => e.is_permanent(),
            AgentError::Internal(_) => false,
        }
    }

    /// Process exit code: 2 for permanent errors, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        if self.is_permanent() {
            2
        } else {
            1
        }
    }
}

/// How a run that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every disk's full pass is durably acknowledged (without `--follow`).
    Complete,
    /// Stopped by a signal. `all_acked`: nothing sent was left unacknowledged; `complete`:
    /// every disk had finished a full pass, all of it acknowledged.
    Stopped { all_acked: bool, complete: bool },
}

/// Per-disk totals of a run.
#[derive(Debug, Clone)]
pub struct DiskSummary {
    pub id: String,
    pub payload_sent: u64,
    pub payload_acked: u64,
    pub zeroes_acked: u64,
    /// From the start of the run until the disk's pass was acknowledged (or the run ended).
    pub seconds: f64,
}

impl std::fmt::Display for DiskSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mbps = self.payload_acked as f64 / self.seconds.max(1e-6) / 1e6;
        write!(
            f,
            "disk {}: sent {} bytes, acked {} bytes (and {} bytes zeroed) in {:.2} s, {:.1} MB/s",
            self.id, self.payload_sent, self.payload_acked, self.zeroes_acked, self.seconds, mbps
        )
    }
}

/// What [`replicate`] returns when it did not fail.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub outcome: Outcome,
    pub disks: Vec<DiskSummary>,
}

/// State shared by the tasks of a run. The lock is never held across an await.
pub(crate) struct Shared {
    source: Mutex<Source>,
    pub cfg: Config,
    pub disks: Vec<Arc<SourceDisk>>,
    /// Unacked window bytes still available to readers.
    pub window: Semaphore,
    /// Per disk: new ops to send.
    pub send_wake: Vec<Notify>,
    /// Per disk: a full pass was requested.
    pub pass_wake: Vec<Notify>,
    /// A disk's phase may have changed: report it now.
    pub progress_now: Notify,
    /// Something completed (an ack, a pass): re-check whether the run is done.
    pub changed: Notify,
    /// Largest write the current connection accepts.
    pub max_write: AtomicU32,
    stop: AtomicBool,
    stop_notify: Notify,
    pub journal: Option<Mutex<AckJournal>>,
    /// Per disk, follow mode's chunk hash table (`None` without --follow, or while a pass
    /// has it).
    pub hashes: Vec<Mutex<Option<ChunkHashes>>>,
    /// The run was restored from a clean stop: rescan at once for changes made meanwhile.
    pub restored: bool,
    /// Per disk, how follow mode finds changes.
    pub tracking: Vec<Tracking>,
    /// Keeps the tracefs instance alive; says when its reader stopped.
    pub tracker: Option<Tracker>,
    /// The tracker's reader stopped: every tracked disk is rescanned from then on.
    tracker_down: AtomicBool,
    /// Bytes read from the source disks (read amplification: this over what the source wrote).
    pub bytes_read: AtomicU64,
    /// Why markers are placed without freezing the source's filesystems (`None`: they are
    /// frozen).
    pub freeze_off: Option<String>,
    /// How long each freeze lasted, in order.
    pub freezes: Mutex<Vec<Duration>>,
    /// Per disk, the server's chunk hashes during a checksum resync.
    pub peer_hashes: Vec<crate::resync::PeerHashes>,
    /// Marker notes for the server (how consistent each point is), sent by the session.
    pub notes: Mutex<std::collections::VecDeque<slipway_proto::MarkerNote>>,
    pub notes_wake: Notify,
    /// A disk's tracking mode changed: send TrackingNotes again.
    pub tracking_changed: AtomicBool,
    /// The source's filesystems are frozen: log nothing (a log file may be on one of them);
    /// lines wait in `deferred_logs` until the thaw.
    pub frozen_now: AtomicBool,
    pub deferred_logs: Mutex<Vec<String>>,
    /// The source's bandwidth limit: the agent's own (`cfg.bandwidth`) and the one the server
    /// pushes, shared by every disk's sender.
    pub throttle: Arc<crate::throttle::Throttle>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Source> {
        // A panic elsewhere cannot leave Source half-updated in a way that matters more than
        // stopping would; keep going with what is there.
        self.source.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Stops the readers: no new ops are produced; what is queued still goes out.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.window.close();
        self.stop_notify.notify_waiters();
    }

    async fn wait_stopped(&self) {
        let n = self.stop_notify.notified();
        if self.stopped() {
            return;
        }
        n.await;
    }

    /// The dirty set of a disk whose writes the kernel tracks, if it can be trusted for the
    /// next follow pass. `None`: reread the whole disk (events were lost, the tracker stopped,
    /// or the disk is not tracked); the dirty bits are cleared first, since that pass reads
    /// everything and what is written during it is marked again.
    fn trusted_dirty(&self, disk: usize) -> Option<Arc<DirtyChunks>> {
        let Tracking::Kernel(d) = &self.tracking[disk] else {
            return None;
        };
        if let Some(why) = self.tracker.as_ref().and_then(Tracker::stopped) {
            if !self.tracker_down.swap(true, Ordering::AcqRel) {
                warn!(%why, "kernel write tracking stopped: rescanning every disk from now on");
                // Tell the server (its status shows each disk's tracking mode).
                self.tracking_changed.store(true, Ordering::Release);
                self.notes_wake.notify_one();
            }
            return None;
        }
        if d.take_lost() {
            let line = format!(
                "disk {}: write events were lost (or the run was restored): rereading the whole disk once ({})",
                self.disks[disk].id,
                self.tracker.as_ref().and_then(Tracker::reason).unwrap_or_default()
            );
            if self.frozen_now.load(Ordering::Acquire) {
                self.deferred_logs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line);
            } else {
                warn!("{line}");
            }
            d.take_all();
            return None;
        }
        Some(d.clone())
    }

    /// How `disk`'s changes are found now, and why not in the kernel (for the server's
    /// status and metrics).
    pub fn tracking_note(&self, disk: usize) -> (slipway_proto::Tracking, String) {
        use slipway_proto::Tracking as T;
        if !self.cfg.follow {
            return (T::None, "one pass, not following".into());
        }
        match &self.tracking[disk] {
            Tracking::Kernel(_) if !self.tracker_down.load(Ordering::Acquire) => {
                (T::Kernel, String::new())
            }
            Tracking::Kernel(_) => (
                T::Rescan,
                format!(
                    "kernel write tracking stopped: {}",
                    self.tracker
                        .as_ref()
                        .and_then(Tracker::stopped)
                        .unwrap_or_default()
                ),
            ),
            Tracking::Rescan(why) => (T::Rescan, why.clone()),
        }
    }

    /// Whether the next follow pass of `disk` will read only what the kernel marked.
    fn kernel_tracked(&self, disk: usize) -> bool {
        matches!(self.tracking[disk], Tracking::Kernel(_))
            && !self.tracker_down.load(Ordering::Acquire)
    }

    /// Gives window bytes back to the readers.
    pub fn release_window(&self, bytes: u64) {
        if bytes > 0 {
            self.window.add_permits(bytes as usize);
        }
    }
}

/// Replicates the disks of `cfg` until done (or, with `--follow`, until SIGINT/SIGTERM).
pub async fn replicate(cfg: Config, progress: ProgressMode) -> Result<RunSummary, AgentError> {
    use tokio::signal::unix::{signal, SignalKind};
    let io = |e: std::io::Error| AgentError::Internal(format!("installing signal handlers: {e}"));
    let mut sigint = signal(SignalKind::interrupt()).map_err(io)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(io)?;
    let (tx, rx) = mpsc::channel(4);
    let forward = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    let r = replicate_until(cfg, progress, rx).await;
    forward.abort();
    r
}

/// [`replicate`] with the stop requests coming from `stop` instead of signals: the first
/// stops reading and waits up to 10 s for outstanding acks, a second stops at once.
pub async fn replicate_until(
    cfg: Config,
    progress: ProgressMode,
    stop: mpsc::Receiver<()>,
) -> Result<RunSummary, AgentError> {
    let disks = cfg
        .disks
        .iter()
        .map(|s| SourceDisk::open(s, cfg.block_size).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let journal = cfg
        .ack_journal
        .as_deref()
        .map(AckJournal::open)
        .transpose()
        .map_err(AgentError::JournalOpen)?;
    let client_cfg = slipway_net::tls::client_config(&cfg.trust, &cfg.tuning())?;
    for d in &disks {
        info!(disk = %d.id, path = %d.path.display(), size = d.size, "source disk");
    }

    let n = disks.len();
    let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
    let saved = persist::load(&cfg, &sizes);
    let agent_run = saved.as_ref().map_or_else(rand::random, |s| s.agent_run);
    let source = match &saved {
        Some(s) => Source::restored(
            s.disks
                .iter()
                .map(|d| (d.id.clone(), d.size, d.acked, d.complete_seq)),
            s.next_seq,
        ),
        None => Source::new(disks.iter().map(|d| (d.id.clone(), d.size))),
    };
    let hashes = (0..n)
        .map(|i| {
            Mutex::new(cfg.follow.then(|| {
                saved
                    .as_ref()
                    .and_then(|s| s.disks[i].table(cfg.chunk_size))
                    .unwrap_or_else(|| ChunkHashes::new(sizes[i], cfg.chunk_size))
            }))
        })
        .collect();
    let (tracker, tracking) = start_tracking(&cfg, &disks, saved.is_some());
    let freeze_off = if !cfg.follow {
        Some("not following".to_string())
    } else if !cfg.freeze {
        Some("--no-freeze".to_string())
    } else {
        disks
            .iter()
            .find(|d| !d.is_block_device())
            .map(|d| format!("{} is not a block device", d.path.display()))
    };
    if cfg.follow {
        match &freeze_off {
            None => {
                info!(max_freeze = ?cfg.max_freeze, "restore points: the source's filesystems are frozen around each marker")
            }
            Some(why) => {
                info!(%why, "restore points: no freeze (crash-consistent only if the source is idle)")
            }
        }
    }
    for (d, t) in disks.iter().zip(&tracking) {
        match t.reason() {
            None => info!(disk = %d.id, "follow mode: writes tracked in the kernel (tracefs)"),
            Some(why) if cfg.follow => {
                info!(disk = %d.id, %why, "follow mode: rescanning every --rescan-interval")
            }
            Some(_) => {}
        }
    }
    let shared = Arc::new(Shared {
        source: Mutex::new(source),
        hashes,
        restored: saved.is_some(),
        tracking,
        tracker,
        tracker_down: AtomicBool::new(false),
        bytes_read: AtomicU64::new(0),
        freeze_off,
        freezes: Mutex::new(Vec::new()),
        peer_hashes: (0..n).map(|_| Default::default()).collect(),
        notes: Mutex::new(std::collections::VecDeque::new()),
        notes_wake: Notify::new(),
        tracking_changed: AtomicBool::new(false),
        frozen_now: AtomicBool::new(false),
        deferred_logs: Mutex::new(Vec::new()),
        throttle: cfg
            .bandwidth
            .clone()
            .unwrap_or_else(|| Arc::new(crate::throttle::Throttle::unlimited())),
        window: Semaphore::new(cfg.window as usize),
        send_wake: (0..n).map(|_| Notify::new()).collect(),
        pass_wake: (0..n).map(|_| Notify::new()).collect(),
        progress_now: Notify::new(),
        changed: Notify::new(),
        max_write: AtomicU32::new(cfg.chunk_size),
        stop: AtomicBool::new(false),
        stop_notify: Notify::new(),
        journal: journal.map(Mutex::new),
        disks,
        cfg,
    });
    let started = Instant::now();

    let (marker_tx, marker_rx) = mpsc::channel(64);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut producers = JoinSet::new();
    let mut rescan_txs = Vec::with_capacity(n);
    for disk in 0..n {
        let (tx, rx) = mpsc::channel(16);
        rescan_txs.push(tx);
        producers.spawn(producer(shared.clone(), disk, rx));
    }
    let markers = tokio::spawn(marker_loop(shared.clone(), marker_rx, rescan_txs));
    let link = Link::new(shared.clone(), client_cfg, marker_tx, agent_run);
    let mut conn = tokio::spawn(connection_manager(link, shutdown_rx.clone()));
    let reporter = tokio::spawn(report::run(shared.clone(), progress, shutdown_rx));
    // `slipway-agent status` reads this; it writes a last one when shutdown is asked for.
    let _status = crate::status::spawn(shared.clone(), shutdown_tx.subscribe());

    let mut done_at: Vec<Option<Instant>> = vec![None; n];
    let result = supervise(&shared, &mut conn, &mut producers, &mut done_at, stop).await;

    // Wind down: stop reading, close the connection politely, stop the helpers.
    shared.stop();
    let _ = shutdown_tx.send(true);
    if !conn.is_finished()
        && tokio::time::timeout(Duration::from_secs(3), &mut conn)
            .await
            .is_err()
    {
        conn.abort();
    }
    markers.abort();
    // Readers stop at the next chunk: let them hand their hash tables back.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while producers.join_next().await.is_some() {}
    })
    .await;
    producers.abort_all();
    let _ = reporter.await;

    let outcome = result?;
    if let (
        Outcome::Stopped {
            all_acked: true, ..
        },
        Some(path),
    ) = (&outcome, shared.cfg.state_file.as_deref())
    {
        save_run(&shared, agent_run, path);
    }
    let follow = shared.cfg.follow;
    let s = shared.lock();
    let end = started.elapsed().as_secs_f64();
    let disks = (0..n)
        .map(|d| {
            let snap = s.snapshot(d);
            DiskSummary {
                id: snap.id,
                payload_sent: snap.stats.payload_sent,
                payload_acked: snap.stats.payload_acked,
                zeroes_acked: snap.stats.zeroes_acked,
                // With --follow the run is the measure; without, the time to a whole copy.
                seconds: match done_at[d] {
                    Some(t) if !follow => (t - started).as_secs_f64(),
                    _ => end,
                },
            }
        })
        .collect();
    Ok(RunSummary { outcome, disks })
}

/// Saves what the next run needs to resume, if every disk is between passes with nothing
/// unacknowledged and a whole hash table (see `persist`); says why not otherwise.
fn save_run(shared: &Shared, agent_run: u64, path: &std::path::Path) {
    let s = shared.lock();
    let mut disks = Vec::with_capacity(s.disk_count());
    for (d, src) in shared.disks.iter().enumerate() {
        let table = shared.hashes[d]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(ChunkHashes::complete);
        let (Some(table), true) = (table, s.can_save(d)) else {
            warn!(disk = %src.id, "not saving the run: this disk has no complete pass yet, or writes still unacknowledged; the next run resyncs every disk");
            return;
        };
        let (acked, complete_seq) = s.positions(d);
        disks.push(persist::SavedDisk {
            id: src.id.clone(),
            path: src.path.clone(),
            size: src.size,
            acked,
            complete_seq,
            hashes: persist::encode_table(&table),
        });
    }
    let run = persist::SavedRun::new(&shared.cfg, agent_run, s.next_seq(), disks);
    drop(s);
    match persist::save(path, &run) {
        Ok(()) => info!(path = %path.display(), "saved the run: the next start resumes it"),
        Err(e) => warn!(path = %path.display(), "not saving the run: {e}"),
    }
}

/// Waits for the run to end: done, stopped by a signal, or failed.
async fn supervise(
    shared: &Arc<Shared>,
    conn: &mut tokio::task::JoinHandle<Result<(), AgentError>>,
    producers: &mut JoinSet<Result<(), AgentError>>,
    done_at: &mut [Option<Instant>],
    mut stop: mpsc::Receiver<()>,
) -> Result<Outcome, AgentError> {
    let mut stop_open = true;
    let follow = shared.cfg.follow;
    let started = Instant::now();
    loop {
        let changed = shared.changed.notified();
        {
            let s = shared.lock();
            for (d, t) in done_at.iter_mut().enumerate() {
                if t.is_none() && s.disk_done(d) {
                    *t = Some(Instant::now());
                    debug!(
                        disk = s.disk_id(d),
                        secs = started.elapsed().as_secs_f64(),
                        "pass acknowledged"
                    );
                }
            }
            if !follow && s.all_done() {
                return Ok(Outcome::Complete);
            }
        }
        tokio::select! {
            _ = changed => {}
            r = &mut *conn => return Err(conn_ended(r)),
            Some(r) = producers.join_next() => match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(AgentError::Internal(format!("disk reader: {e}"))),
            },
            r = stop.recv(), if stop_open => match r {
                Some(()) => break,
                None => stop_open = false,
            },
        }
    }

    // A signal: stop reading, give outstanding acks a bounded chance to arrive.
    shared.stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    if !shared.lock().all_acked() {
        info!("stopping: waiting up to 10 s for outstanding acknowledgements");
    }
    loop {
        let changed = shared.changed.notified();
        if shared.lock().all_acked() {
            break;
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(deadline) => {
                warn!("stopping with operations still unacknowledged");
                break;
            }
            r = &mut *conn => return Err(conn_ended(r)),
            Some(()) = stop.recv(), if stop_open => {
                warn!("stopping at once");
                break;
            }
        }
    }
    let s = shared.lock();
    Ok(Outcome::Stopped {
        all_acked: s.all_acked(),
        complete: s.all_done(),
    })
}

fn conn_ended(r: Result<Result<(), AgentError>, tokio::task::JoinError>) -> AgentError {
    match r {
        Ok(Err(e)) => e,
        Ok(Ok(())) => AgentError::Internal("the connection manager stopped on its own".into()),
        Err(e) => AgentError::Internal(format!("connection manager: {e}")),
    }
}

/// Exponential backoff with jitter: `base`, doubling up to `max`, each delay scaled by a
/// random factor in [0.5, 1].
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay; `jitter` in [0, 1) picks where in [0.5, 1] × the exponential step.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// A connection got established: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Connects, and reconnects after every retryable failure, until shut down.
async fn connection_manager(
    link: Link,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut epoch = 0u64;
    loop {
        epoch += 1;
        let mut established = false;
        match session::run(&link, epoch, &mut shutdown, &mut established).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_permanent() || e.is_fatal() => return Err(e.into()),
            Err(e) => {
                if established {
                    backoff.reset();
                }
                let delay = backoff.next_delay(rand::random::<f64>());
                warn!(
                    server = %link.server(),
                    attempt = backoff.attempts(),
                    "connection failed: {e}; reconnecting in {}",
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = session::shutdown_requested(&mut shutdown) => return Ok(()),
                }
            }
        }
    }
}

/// Places requested consistency markers, one at a time.
async fn marker_loop(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<u64>,
    rescans: Vec<mpsc::Sender<oneshot::Sender<()>>>,
) {
    while let Some(marker_id) = requests.recv().await {
        let mut frozen = None;
        if shared.cfg.follow {
            // One instant across the source's filesystems: freeze them (their dirty data and
            // journals reach the disks first), let the tracker see every write up to now,
            // read what changed, place the marker, thaw.
            frozen = freeze_sources(&shared).await;
            shared.frozen_now.store(frozen.is_some(), Ordering::Release);
            // Frozen or not, every write completed before now must be counted before the
            // passes below look for changes: its completion event may still be in the ring.
            if shared.tracker.is_some() {
                {
                    let sh = shared.clone();
                    let barrier = tokio::task::spawn_blocking(move || {
                        sh.tracker.as_ref().map(Tracker::barrier)
                    })
                    .await;
                    if !matches!(barrier, Ok(Some(Ok(())))) {
                        // Events up to the freeze may not all be counted: reread everything.
                        for tr in &shared.tracking {
                            if let Tracking::Kernel(d) = tr {
                                d.mark_lost();
                            }
                        }
                    }
                }
            }
            // The marker must cover every change already made when it was asked for.
            let mut waits = Vec::with_capacity(rescans.len());
            for tx in &rescans {
                let (done, wait) = oneshot::channel();
                if tx.send(done).await.is_ok() {
                    waits.push(wait);
                }
            }
            for w in waits {
                let _ = w.await;
            }
        }
        let seq = shared.lock().place_marker(marker_id);
        for n in &shared.send_wake {
            n.notify_one();
        }
        // Thawed before anything is logged: a log file may live on a frozen filesystem.
        let thawed = match frozen {
            Some(f) => tokio::task::spawn_blocking(move || f.thaw()).await.ok(),
            None => None,
        };
        shared.frozen_now.store(false, Ordering::Release);
        for line in std::mem::take(
            &mut *shared
                .deferred_logs
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        ) {
            warn!("{line}");
        }
        // Known only now: whether the freeze held until the marker was placed (no timer, no
        // one else thawed it). The server waits a little for this note; the Marker frames
        // may reach it first.
        let note = marker_note(&shared, marker_id, thawed.as_ref());
        {
            let mut q = shared.notes.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= 64 {
                q.pop_front();
            }
            q.push_back(note);
        }
        shared.notes_wake.notify_one();
        match thawed {
            Some(r) => {
                let frozen_ms = r.frozen_for.as_secs_f64() * 1e3;
                shared
                    .freezes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(r.frozen_for);
                match r.consistency() {
                    crate::freeze::Consistency::Consistent => info!(
                        marker_id, seq, frozen_ms, filesystems = r.freeze.frozen.len(),
                        "consistency marker placed with the source's filesystems frozen: one instant"
                    ),
                    crate::freeze::Consistency::BestEffort(why) => warn!(
                        marker_id, seq, frozen_ms, why = %why.join("; "),
                        "consistency marker placed: crash-consistent-best-effort"
                    ),
                }
            }
            None if shared.cfg.follow => warn!(
                marker_id,
                seq,
                why = %shared.freeze_off.as_deref().unwrap_or("the freeze failed"),
                "consistency marker placed without a freeze: crash-consistent-best-effort"
            ),
            None => info!(marker_id, seq, "consistency marker placed"),
        }
    }
}

/// How consistent the point of `marker_id` is, as the agent knows it when it places the
/// marker: one instant if every writable filesystem on the source disks stayed frozen while
/// the marker's data was read.
fn marker_note(
    shared: &Shared,
    marker_id: u64,
    thawed: Option<&crate::freeze::ThawReport>,
) -> slipway_proto::MarkerNote {
    let (one_instant, freeze_us, reason) = match thawed {
        Some(r) => {
            let us = r.frozen_for.as_micros() as u64;
            match r.consistency() {
                crate::freeze::Consistency::Consistent => (true, us, String::new()),
                crate::freeze::Consistency::BestEffort(why) => (false, us, why.join("; ")),
            }
        }
        None => (
            false,
            0,
            shared
                .freeze_off
                .clone()
                .unwrap_or_else(|| "the source's filesystems could not be frozen".into()),
        ),
    };
    let mut reason = reason;
    reason.truncate(1024);
    slipway_proto::MarkerNote {
        marker_id,
        one_instant,
        freeze_us,
        reason,
    }
}

/// Freezes the filesystems mounted from the source disks, if this run may (see
/// [`Shared::freeze_off`]); `None` when it did not freeze (the reason is logged).
async fn freeze_sources(shared: &Arc<Shared>) -> Option<crate::freeze::Frozen> {
    if shared.freeze_off.is_some() {
        return None;
    }
    let sh = shared.clone();
    let r = tokio::task::spawn_blocking(move || {
        let paths: Vec<&std::path::Path> = sh.disks.iter().map(|d| d.path.as_path()).collect();
        let plan = crate::freeze::Plan::for_disks(&paths)?;
        let opts = crate::freeze::FreezeOptions {
            max_freeze: sh.cfg.max_freeze,
            pre_hook: sh.cfg.freeze_pre_hook.clone(),
            post_hook: sh.cfg.freeze_post_hook.clone(),
            ..crate::freeze::FreezeOptions::default()
        };
        crate::freeze::freeze(&plan, &opts)
    })
    .await;
    match r {
        Ok(Ok(f)) => Some(f),
        Ok(Err(e)) => {
            warn!(error = %e, "could not freeze the source's filesystems");
            None
        }
        Err(e) => {
            warn!(error = %e, "could not freeze the source's filesystems");
            None
        }
    }
}

/// How a pass ended.
#[derive(Debug)]
enum PassEnd {
    Done,
    /// A newer pass replaced this one.
    Stale,
    /// The run is stopping.
    Stopped,
}

/// Runs the passes of one disk: full passes when the server asks for them, rescans in follow
/// mode every `--rescan-interval` and when a marker needs one.
async fn producer(
    shared: Arc<Shared>,
    disk: usize,
    mut rescans: mpsc::Receiver<oneshot::Sender<()>>,
) -> Result<(), AgentError> {
    let cfg = &shared.cfg;
    let id = shared.disks[disk].id.clone();
    let mut next_rescan: Option<tokio::time::Instant> =
        shared.restored.then(tokio::time::Instant::now);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut rescans_open = true;
    loop {
        if shared.stopped() {
            return Ok(());
        }
        let due = next_rescan.is_some_and(|t| t <= tokio::time::Instant::now());
        if due {
            // Rearmed when the next pass completes.
            next_rescan = None;
        }
        let (job, can_rescan) = {
            let mut s = shared.lock();
            match s.take_request(disk) {
                Some(j) => (Some(j), false),
                None if cfg.follow && (due || !waiters.is_empty()) => {
                    (s.start_rescan(disk).map(|g| (PassKind::Follow, g)), false)
                }
                None => (None, s.can_rescan(disk)),
            }
        };
        let Some((kind, gen)) = job else {
            if !can_rescan {
                // A full pass is running or due: a marker does not wait for it (the disk is
                // not continuous, so the marker cannot make a restore point anyway).
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            tokio::select! {
                _ = shared.pass_wake[disk].notified() => {}
                w = rescans.recv(), if rescans_open => match w {
                    Some(w) => waiters.push(w),
                    None => rescans_open = false,
                },
                _ = sleep_until(next_rescan) => {}
                _ = shared.wait_stopped() => return Ok(()),
            }
            continue;
        };

        let mut job_waiters = Vec::new();
        if kind == PassKind::Follow {
            job_waiters = std::mem::take(&mut waiters);
        } else {
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
            info!(disk = %id, pass = kind.as_str(), "full pass starting");
        }
        let sh = shared.clone();
        let h = shared.hashes[disk]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let rt = tokio::runtime::Handle::current();
        let mut task = tokio::task::spawn_blocking(move || run_pass(&sh, &rt, disk, kind, gen, h));
        let (end, h) = loop {
            tokio::select! {
                r = &mut task => break r.map_err(|e| AgentError::Internal(format!("disk reader: {e}")))?,
                w = rescans.recv(), if rescans_open => match w {
                    // This pass began before the request and may already be past a change
                    // made before it: the request waits for the next pass.
                    Some(w) if kind == PassKind::Follow => waiters.push(w),
                    Some(w) => { let _ = w.send(()); }
                    None => rescans_open = false,
                },
            }
        };
        *shared.hashes[disk]
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = h;
        for w in job_waiters {
            let _ = w.send(());
        }
        match end? {
            PassEnd::Done => {
                if kind.is_full() {
                    info!(disk = %id, pass = kind.as_str(), "full pass read to the end");
                }
                if cfg.follow {
                    let every = if shared.kernel_tracked(disk) {
                        TRACKED_INTERVAL.min(cfg.rescan_interval)
                    } else {
                        cfg.rescan_interval
                    };
                    next_rescan = Some(tokio::time::Instant::now() + every);
                }
                shared.progress_now.notify_one();
                shared.changed.notify_one();
            }
            PassEnd::Stale => debug!(disk = %id, "pass superseded"),
            PassEnd::Stopped => return Ok(()),
        }
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One pass over a disk, on a blocking thread: read each chunk (waiting for window space
/// first), plan it, append the ops under the lock. Returns the hash table back.
fn run_pass(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    disk: usize,
    kind: PassKind,
    gen: u64,
    mut hashes: Option<ChunkHashes>,
) -> (Result<PassEnd, DiskError>, Option<ChunkHashes>) {
    let r = pass_loop(shared, rt, disk, kind, gen, hashes.as_mut());
    (r, hashes)
}

fn pass_loop(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    disk: usize,
    kind: PassKind,
    gen: u64,
    hashes: Option<&mut ChunkHashes>,
) -> Result<PassEnd, DiskError> {
    let src = &shared.disks[disk];
    let chunk = u64::from(shared.cfg.chunk_size);
    let unit = read_unit(chunk, shared.cfg.window);
    let mut planner = Planner::new(shared.cfg.block_size, kind.zero_policy());
    let mut ops: Vec<PlannedOp> = Vec::new();
    let end = if kind == PassKind::Follow {
        let Some(t) = hashes else {
            return Ok(PassEnd::Done);
        };
        match shared.trusted_dirty(disk) {
            Some(dirty) => {
                tracked_rescan(shared, rt, disk, gen, &mut planner, &mut ops, t, &dirty)?
            }
            None => rescan(shared, rt, disk, gen, unit, &mut planner, &mut ops, t)?,
        }
    } else {
        // A full pass reads everything: marks made before it are moot.
        if let Tracking::Kernel(d) = &shared.tracking[disk] {
            d.take_all();
        }
        let peer = &shared.peer_hashes[disk];
        let peer = (kind == PassKind::Resync && peer.active()).then_some(peer);
        let r = full_pass(
            shared,
            rt,
            disk,
            gen,
            unit,
            &mut planner,
            &mut ops,
            hashes,
            peer,
        );
        if let Some(p) = peer {
            let skipped = p.skipped_bytes.load(Ordering::Relaxed);
            info!(disk = %src.id, skipped_bytes = skipped, "checksum resync: chunks the server already held were not sent");
            p.stop();
        }
        r?
    };
    if let Some(e) = end {
        if matches!(e, PassEnd::Stopped) && kind == PassKind::Follow {
            // A rescan recorded the hash of a zeroed chunk when it read it, but the planner
            // still holds that zero run (it waits to extend it). Queue it: a saved run must
            // never claim zeros the server does not have (an unacknowledged op prevents the
            // save; zero runs take no window).
            planner.finish(&mut ops);
            if !ops.is_empty() && shared.lock().enqueue(disk, gen, &mut ops, 0, 0).is_ok() {
                shared.send_wake[disk].notify_one();
            }
        }
        return Ok(e);
    }
    planner.finish(&mut ops);
    let mut s = shared.lock();
    if s.enqueue(disk, gen, &mut ops, 0, src.size).is_err() || s.finish_pass(disk, gen).is_err() {
        return Ok(PassEnd::Stale);
    }
    drop(s);
    shared.send_wake[disk].notify_one();
    Ok(PassEnd::Done)
}

/// Bytes read per `pread`: whole chunks, about 1 MiB (small chunks would otherwise cost a
/// system call each), never more than the window.
fn read_unit(chunk: u64, window: u64) -> u64 {
    let unit = (1u64 << 20).max(chunk) / chunk * chunk;
    unit.min(window / chunk * chunk).max(chunk)
}

/// The largest write of the current connection, within the chunk size.
fn max_write(shared: &Shared) -> usize {
    shared
        .max_write
        .load(Ordering::Relaxed)
        .min(shared.cfg.chunk_size) as usize
}

/// Waits for `len` bytes of window; `None` when the run is stopping.
fn take_window(shared: &Shared, rt: &tokio::runtime::Handle, len: u64) -> Option<()> {
    rt.block_on(shared.window.acquire_many(len as u32))
        .ok()
        .map(|p| p.forget())
}

/// Every chunk of the disk, planned unit by unit. `Some(end)` when the pass ends early.
#[allow(clippy::too_many_arguments)]
fn full_pass(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    disk: usize,
    gen: u64,
    unit: u64,
    planner: &mut Planner,
    ops: &mut Vec<PlannedOp>,
    mut hashes: Option<&mut ChunkHashes>,
    peer: Option<&crate::resync::PeerHashes>,
) -> Result<Option<PassEnd>, DiskError> {
    let src = &shared.disks[disk];
    let chunk = u64::from(shared.cfg.chunk_size);
    let mut offset = 0u64;
    while offset < src.size {
        if shared.stopped() {
            return Ok(Some(PassEnd::Stopped));
        }
        let len = unit.min(src.size - offset);
        // Wait for room in the window before reading: memory stays bounded by --window.
        if take_window(shared, rt, len).is_none() {
            return Ok(Some(PassEnd::Stopped));
        }
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = src.read_at(&mut buf, offset) {
            shared.release_window(len);
            return Err(e);
        }
        shared.bytes_read.fetch_add(len, Ordering::Relaxed);
        let data = Bytes::from(buf);
        let chunk_hashes: Vec<u64> = data.chunks(chunk as usize).map(ChunkHashes::hash).collect();
        if let Some(t) = hashes.as_deref_mut() {
            for (i, h) in chunk_hashes.iter().enumerate() {
                t.record(offset + i as u64 * chunk, *h);
            }
        }
        let mut extra = 0;
        let shares = match peer {
            // Checksum resync: only the chunks whose hash differs from the server's.
            Some(p) if p.chunk() == chunk => {
                let mut shares = false;
                for (i, h) in chunk_hashes.iter().enumerate() {
                    let start = i * chunk as usize;
                    let end = (start + chunk as usize).min(data.len());
                    let coff = offset + start as u64;
                    if p.wait(coff / chunk, PEER_HASH_PATIENCE) == Some(*h) {
                        p.skipped((end - start) as u64);
                        continue;
                    }
                    shares |= planner.chunk(coff, &data.slice(start..end), max_write(shared), ops);
                }
                shares
            }
            _ => planner.chunk(offset, &data, max_write(shared), ops),
        };
        if shares {
            let sent: u64 = ops.iter().map(PlannedOp::data_len).sum();
            extra = len.saturating_sub(sent);
        }
        let had_ops = !ops.is_empty();
        let r = shared.lock().enqueue(disk, gen, ops, extra, offset + len);
        match r {
            Ok(charged) => shared.release_window(len.saturating_sub(charged)),
            Err(_) => {
                shared.release_window(len);
                return Ok(Some(PassEnd::Stale));
            }
        }
        if had_ops {
            shared.send_wake[disk].notify_one();
        }
        offset += len;
    }
    Ok(None)
}

/// Follow mode: rereads the disk into one scratch buffer and sends the chunks whose hash
/// moved. Only a changed chunk takes window space and a copy, and it is queued at once, so
/// no window is held while waiting for more.
#[allow(clippy::too_many_arguments)]
fn rescan(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    disk: usize,
    gen: u64,
    unit: u64,
    planner: &mut Planner,
    ops: &mut Vec<PlannedOp>,
    hashes: &mut ChunkHashes,
) -> Result<Option<PassEnd>, DiskError> {
    let src = &shared.disks[disk];
    let chunk = u64::from(shared.cfg.chunk_size);
    let mut scratch = vec![0u8; unit as usize];
    let mut offset = 0u64;
    while offset < src.size {
        if shared.stopped() {
            return Ok(Some(PassEnd::Stopped));
        }
        if !shared.lock().is_current(disk, gen) {
            return Ok(Some(PassEnd::Stale));
        }
        let len = unit.min(src.size - offset);
        let buf = &mut scratch[..len as usize];
        src.read_at(buf, offset)?;
        shared.bytes_read.fetch_add(len, Ordering::Relaxed);
        for (i, c) in buf.chunks(chunk as usize).enumerate() {
            let coff = offset + i as u64 * chunk;
            let h = ChunkHashes::hash(c);
            if !hashes.changed(coff, h) {
                continue;
            }
            if let Some(end) = queue_changed_chunk(shared, rt, disk, gen, planner, ops, coff, c) {
                return Ok(Some(end));
            }
            hashes.record(coff, h);
        }
        offset += len;
    }
    Ok(None)
}

/// Follow mode on a tracked disk: reads only the chunks the kernel marked written since the
/// last pass, and sends those whose hash moved. Each chunk's mark is cleared before it is read
/// (a write landing after the read marks it again); chunks taken but not read because the
/// pass ended early are marked again, so nothing taken is ever forgotten.
#[allow(clippy::too_many_arguments)]
fn tracked_rescan(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    disk: usize,
    gen: u64,
    planner: &mut Planner,
    ops: &mut Vec<PlannedOp>,
    hashes: &mut ChunkHashes,
    dirty: &DirtyChunks,
) -> Result<Option<PassEnd>, DiskError> {
    let src = &shared.disks[disk];
    let chunk = u64::from(shared.cfg.chunk_size);
    let taken = dirty.take_all();
    let mut scratch = vec![0u8; chunk as usize];
    let remark = |from: usize| {
        for &c in &taken[from..] {
            dirty.mark(c..c + 1);
        }
    };
    for (i, &c) in taken.iter().enumerate() {
        let coff = c * chunk;
        if coff >= src.size {
            continue;
        }
        if shared.stopped() {
            remark(i);
            return Ok(Some(PassEnd::Stopped));
        }
        if !shared.lock().is_current(disk, gen) {
            remark(i);
            return Ok(Some(PassEnd::Stale));
        }
        let clen = chunk.min(src.size - coff);
        let buf = &mut scratch[..clen as usize];
        if let Err(e) = src.read_at(buf, coff) {
            remark(i);
            return Err(e);
        }
        shared.bytes_read.fetch_add(clen, Ordering::Relaxed);
        let h = ChunkHashes::hash(buf);
        if !hashes.changed(coff, h) {
            continue;
        }
        if let Some(end) = queue_changed_chunk(shared, rt, disk, gen, planner, ops, coff, buf) {
            remark(i);
            return Ok(Some(end));
        }
        hashes.record(coff, h);
    }
    Ok(None)
}

/// Queues one changed chunk read by a follow pass: takes its window space, plans it, enqueues
/// the ops and wakes the sender. `Some(end)` when the pass must end instead (stopping, or a
/// newer pass replaced it); then nothing of the chunk was queued.
#[allow(clippy::too_many_arguments)]
fn queue_changed_chunk(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    disk: usize,
    gen: u64,
    planner: &mut Planner,
    ops: &mut Vec<PlannedOp>,
    coff: u64,
    chunk: &[u8],
) -> Option<PassEnd> {
    let clen = chunk.len() as u64;
    if take_window(shared, rt, clen).is_none() {
        return Some(PassEnd::Stopped);
    }
    let data = Bytes::copy_from_slice(chunk);
    let mut extra = 0;
    if planner.chunk(coff, &data, max_write(shared), ops) {
        let sent: u64 = ops.iter().map(PlannedOp::data_len).sum();
        extra = clen.saturating_sub(sent);
    }
    let r = shared.lock().enqueue(disk, gen, ops, extra, coff + clen);
    match r {
        Ok(charged) => shared.release_window(clen.saturating_sub(charged)),
        Err(_) => {
            shared.release_window(clen);
            return Some(PassEnd::Stale);
        }
    }
    shared.send_wake[disk].notify_one();
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let full: Vec<_> = (0..8).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(
            full.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
            vec![200, 400, 800, 1600, 3200, 6400, 10000, 10000]
        );
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(100));
        let d = b.next_delay(0.5);
        assert_eq!(d, Duration::from_millis(300));
        // Far along, no overflow.
        for _ in 0..100 {
            assert!(b.next_delay(0.99) <= Duration::from_secs(10));
        }
    }

    #[test]
    fn reads_are_whole_chunks_of_about_a_mebibyte_within_the_window() {
        assert_eq!(read_unit(4096, 128 << 20), 1 << 20);
        assert_eq!(read_unit(3 << 20, 128 << 20), 3 << 20);
        assert_eq!(read_unit(768 << 10, 128 << 20), 768 << 10);
        assert_eq!(read_unit(4096, 64 << 10), 64 << 10);
        assert_eq!(read_unit(1 << 20, 1 << 20), 1 << 20);
    }

    #[test]
    fn exit_codes() {
        let e = AgentError::Config(ConfigError::NoDisks);
        assert_eq!(e.exit_code(), 2);
        assert_eq!(AgentError::Internal("x".into()).exit_code(), 1);
    }
}
