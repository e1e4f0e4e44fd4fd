//! `slipway-agent status`: the running agent writes a small JSON file every few seconds
//! (default `/run/slipway-agent/status.json`, the unit's runtime directory), atomically
//! (a temporary file renamed over it), and `status` reads it back.
//!
//! The file says per disk the phase, how follow mode finds changes (kernel tracking or
//! rescans, and why), bytes sent and acknowledged and when the last acknowledgement came, and
//! the agent's pid. Whether the agent still runs is decided by the reader from the pid and
//! the file's age ([`liveness`]): a killed agent leaves its last file behind.
//!
//! Everything but the writer task and [`pid_alive`] is I/O-free and unit-tested.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::HumanBytes;
use serde::{Deserialize, Serialize};
use slipway_proto::Phase;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::run::Shared;
use crate::session::shutdown_requested;

/// The status file when none is configured: in the runtime directory systemd made for the
/// unit (`$RUNTIME_DIRECTORY`), else `/run/slipway-agent`.
pub fn default_path() -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("/run/slipway-agent"));
    dir.join("status.json")
}

/// How often the running agent rewrites the file.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// A file not rewritten for this long belongs to an agent that is stuck or gone.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// The status file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub agent_version: String,
    /// `running`, or `stopping` once a stop was asked for.
    pub state: String,
    pub source_id: String,
    pub server: String,
    pub follow: bool,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    /// Megabits per second, `None`: no limit.
    pub bandwidth_limit_mbps: Option<f64>,
    /// The limit the server's settings push for the source, Mbit/s (the stricter of the two
    /// applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_bandwidth_limit_mbps: Option<f64>,
    /// Why restore points are taken without freezing the source's filesystems (`None`: they
    /// are frozen).
    pub freeze_off: Option<String>,
    pub disks: Vec<DiskStatus>,
}

/// One disk in the status file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
    /// `waiting` (not open yet), `initial-sync`, `rescan`, `backlog`, `continuous`, `paused`.
    pub phase: String,
    /// `kernel` (tracefs tells which chunks were written), `rescan` (every pass rereads) or
    /// `none` (one pass, not following).
    pub tracking: String,
    pub tracking_reason: Option<String>,
    /// Write payload handed to the transport (resends included).
    pub bytes_sent: u64,
    /// Write payload the server acknowledged durable.
    pub bytes_acked: u64,
    /// Zeroed bytes acknowledged.
    pub zeroes_acked: u64,
    /// Changed bytes not yet acknowledged.
    pub backlog_bytes: u64,
    /// When an acknowledgement last arrived (to within [`INTERVAL`]), Unix ms.
    pub last_ack_at_ms: Option<u64>,
}

/// The name of a reported phase.
pub fn phase_name(p: Option<Phase>) -> &'static str {
    match p {
        None => "waiting",
        Some(Phase::InitialSync) => "initial-sync",
        Some(Phase::Rescan) => "rescan",
        Some(Phase::Backlog) => "backlog",
        Some(Phase::Continuous) => "continuous",
        Some(Phase::Paused) => "paused",
    }
}

/// Whether the agent that wrote a status file still runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Running,
    /// Its process is gone.
    Gone {
        pid: u32,
    },
    /// Its process exists but has not written the file for this long (stuck, or its pid was
    /// reused by another process).
    Stale {
        age: Duration,
    },
}

/// Decides [`Liveness`] from the file, the time and whether its pid is a live process.
pub fn liveness(st: &Status, now_ms: u64, pid_alive: bool) -> Liveness {
    if !pid_alive {
        return Liveness::Gone { pid: st.pid };
    }
    let age = Duration::from_millis(now_ms.saturating_sub(st.updated_at_ms));
    if age > STALE_AFTER {
        Liveness::Stale { age }
    } else {
        Liveness::Running
    }
}

/// Whether process `pid` exists (signal 0 probes without signalling).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
    let r = unsafe { libc::kill(pid, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A killed agent not yet reaped by its parent is a zombie: gone all the same.
    exists && !zombie(pid)
}

/// Whether `/proc/<pid>/stat` says the process has exited (state Z or X).
fn zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
        })
        .unwrap_or(false)
}

/// Now as Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    let s = now_ms.saturating_sub(at_ms) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

/// The headline `status` prints first.
pub fn headline(st: &Status, live: &Liveness, now_ms: u64) -> String {
    match live {
        Liveness::Running => format!(
            "slipway-agent is {} (pid {}): source {} to {}, updated {}",
            st.state,
            st.pid,
            st.source_id,
            st.server,
            ago(now_ms, st.updated_at_ms)
        ),
        Liveness::Gone { pid } => format!(
            "slipway-agent is not running: pid {pid} is gone; its last status, from {}, follows",
            ago(now_ms, st.updated_at_ms)
        ),
        Liveness::Stale { age } => format!(
            "slipway-agent is not running or stuck: pid {} exists but has not updated its status \
             for {} s (the agent rewrites it every {} s)",
            st.pid,
            age.as_secs(),
            INTERVAL.as_secs()
        ),
    }
}

/// The status as a table, for people.
pub fn render(st: &Status, live: &Liveness, now_ms: u64) -> String {
    use std::fmt::Write as _;
    let mut out = headline(st, live, now_ms);
    out.push('\n');
    let limit = match (st.bandwidth_limit_mbps, st.server_bandwidth_limit_mbps) {
        (Some(m), None) => format!("{m} Mbit/s"),
        (None, Some(s)) => format!("{s} Mbit/s (set by the server)"),
        (Some(m), Some(s)) if s < m => {
            format!("{s} Mbit/s (set by the server; this agent's own: {m} Mbit/s)")
        }
        (Some(m), Some(s)) => format!("{m} Mbit/s (the server's: {s} Mbit/s)"),
        (None, None) => "none".into(),
    };
    let _ = writeln!(out, "bandwidth limit: {limit}");
    if st.follow {
        let freeze = match &st.freeze_off {
            None => "filesystems frozen around each marker".to_string(),
            Some(why) => format!("not frozen ({why}): crash-consistent-best-effort"),
        };
        let _ = writeln!(out, "restore points: {freeze}");
    }
    let rows: Vec<[String; 7]> = st
        .disks
        .iter()
        .map(|d| {
            [
                d.id.clone(),
                d.phase.clone(),
                d.tracking.clone(),
                HumanBytes(d.bytes_sent).to_string(),
                HumanBytes(d.bytes_acked).to_string(),
                HumanBytes(d.backlog_bytes).to_string(),
                d.last_ack_at_ms
                    .map_or_else(|| "never".into(), |t| ago(now_ms, t)),
            ]
        })
        .collect();
    let head = [
        "DISK", "PHASE", "TRACKING", "SENT", "ACKED", "BACKLOG", "LAST ACK",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        l
    };
    let _ = writeln!(out, "{}", line(&head));
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    for d in &st.disks {
        if let (true, Some(why)) = (st.follow, &d.tracking_reason) {
            let _ = writeln!(out, "{}: rescanning: {why}", d.id);
        }
    }
    out
}

/// Writes `st` to `path` atomically: a temporary file beside it, renamed over it.
pub fn write(path: &Path, st: &Status) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "status".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut text = serde_json::to_vec_pretty(st).map_err(std::io::Error::other)?;
    text.push(b'\n');
    std::fs::write(&tmp, &text)?;
    // Readable by anyone whatever the umask (the unit's is 0077): it holds no secret, and
    // `slipway-agent status` or a monitoring check need not run as root.
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Reads a status file.
pub fn read(path: &Path) -> std::io::Result<Status> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Follows the acknowledged byte counts of each disk to tell when acks last arrived.
#[derive(Debug, Default)]
pub struct AckClock {
    seen: Vec<(u64, Option<u64>)>,
}

impl AckClock {
    /// Disk `disk` has `acked` bytes acknowledged at `now_ms`: returns when an ack last came.
    pub fn observe(&mut self, disk: usize, acked: u64, now_ms: u64) -> Option<u64> {
        if self.seen.len() <= disk {
            self.seen.resize(disk + 1, (0, None));
        }
        let (before, at) = &mut self.seen[disk];
        if acked > *before {
            *before = acked;
            *at = Some(now_ms);
        }
        *at
    }
}

fn collect(shared: &Shared, acks: &mut AckClock, started_at_ms: u64, state: &str) -> Status {
    let now = now_ms();
    let cfg = &shared.cfg;
    let snaps: Vec<_> = {
        let s = shared.lock();
        (0..shared.disks.len()).map(|d| s.snapshot(d)).collect()
    };
    let disks = snaps
        .into_iter()
        .enumerate()
        .map(|(d, snap)| {
            // As the server is told: kernel tracking that stopped reads as rescan.
            let (mode, why) = shared.tracking_note(d);
            let acked = snap.stats.payload_acked + snap.stats.zeroes_acked;
            DiskStatus {
                path: shared.disks[d].path.clone(),
                size: snap.size,
                phase: phase_name(snap.report.map(|r| r.phase)).into(),
                tracking: mode.as_str().into(),
                tracking_reason: (!why.is_empty()).then_some(why),
                bytes_sent: snap.stats.payload_sent,
                bytes_acked: snap.stats.payload_acked,
                zeroes_acked: snap.stats.zeroes_acked,
                backlog_bytes: snap.report.map_or(0, |r| r.backlog_bytes),
                last_ack_at_ms: acks.observe(d, acked, now),
                id: snap.id,
            }
        })
        .collect();
    Status {
        pid: std::process::id(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        state: state.into(),
        source_id: cfg.source_id.clone(),
        server: cfg.server.to_string(),
        follow: cfg.follow,
        started_at_ms,
        updated_at_ms: now,
        bandwidth_limit_mbps: cfg.bandwidth.as_ref().map(|t| t.mbps()),
        server_bandwidth_limit_mbps: shared.throttle.pushed_mbps(),
        freeze_off: shared.freeze_off.clone(),
        disks,
    }
}

/// Starts the status writer of a run, if the run has a status file.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let path = shared.cfg.status_file.clone()?;
    Some(tokio::spawn(writer(shared, path, shutdown)))
}

async fn writer(shared: Arc<Shared>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let started = now_ms();
    let mut acks = AckClock::default();
    let mut failing = false;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown_requested(&mut shutdown) => true,
        };
        let st = collect(
            &shared,
            &mut acks,
            started,
            if stopping { "stopping" } else { "running" },
        );
        match write(&path, &st) {
            Ok(()) if failing => {
                failing = false;
                debug!(path = %path.display(), "status file written again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                warn!(path = %path.display(), "cannot write the status file (`slipway-agent status` will not see this agent): {e}");
            }
            Err(_) => {}
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            pid: 4242,
            agent_version: "0.1.0".into(),
            state: "running".into(),
            source_id: "web-01".into(),
            server: "replica.internal:1500".into(),
            follow: true,
            started_at_ms: 1_000_000,
            updated_at_ms: 2_000_000,
            bandwidth_limit_mbps: Some(50.0),
            server_bandwidth_limit_mbps: None,
            freeze_off: None,
            disks: vec![
                DiskStatus {
                    id: "nvme0n1".into(),
                    path: "/dev/nvme0n1".into(),
                    size: 8 << 30,
                    phase: "continuous".into(),
                    tracking: "kernel".into(),
                    tracking_reason: None,
                    bytes_sent: 3 << 30,
                    bytes_acked: 3 << 30,
                    zeroes_acked: 5 << 30,
                    backlog_bytes: 0,
                    last_ack_at_ms: Some(1_999_000),
                },
                DiskStatus {
                    id: "data".into(),
                    path: "/dev/vdb".into(),
                    size: 1 << 30,
                    phase: "initial-sync".into(),
                    tracking: "rescan".into(),
                    tracking_reason: Some("not a request-based device".into()),
                    bytes_sent: 1 << 20,
                    bytes_acked: 0,
                    zeroes_acked: 0,
                    backlog_bytes: 1 << 29,
                    last_ack_at_ms: None,
                },
            ],
        }
    }

    #[test]
    fn liveness_from_pid_and_age() {
        let st = status();
        assert_eq!(liveness(&st, 2_005_000, true), Liveness::Running);
        assert_eq!(
            liveness(&st, 2_005_000, false),
            Liveness::Gone { pid: 4242 }
        );
        assert_eq!(
            liveness(&st, 2_000_000 + 31_000, true),
            Liveness::Stale {
                age: Duration::from_secs(31)
            }
        );
        // A clock that went backwards is not staleness.
        assert_eq!(liveness(&st, 1_000, true), Liveness::Running);
    }

    #[test]
    fn the_table_says_what_matters() {
        let st = status();
        let t = render(&st, &Liveness::Running, 2_003_000);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "slipway-agent is running (pid 4242): source web-01 to replica.internal:1500, updated 3 s ago"
        );
        assert!(t.contains("bandwidth limit: 50 Mbit/s"), "{t}");
        assert!(t.contains("restore points: filesystems frozen"), "{t}");
        let head = lines.iter().position(|l| l.starts_with("DISK")).unwrap();
        let row: Vec<&str> = lines[head + 1].split_whitespace().collect();
        assert_eq!(row[..3], ["nvme0n1", "continuous", "kernel"]);
        assert!(lines[head + 1].ends_with("4 s ago"), "{}", lines[head + 1]);
        assert!(lines[head + 2].starts_with("data "));
        assert!(lines[head + 2].ends_with("never"));
        assert!(
            t.contains("data: rescanning: not a request-based device"),
            "{t}"
        );
        // Columns line up.
        let col = lines[head].find("PHASE").unwrap();
        assert_eq!(&lines[head + 1][col..col + 10], "continuous");
        assert_eq!(&lines[head + 2][col..col + 12], "initial-sync");

        let gone = render(&st, &Liveness::Gone { pid: 4242 }, 2_600_000);
        assert!(
            gone.starts_with("slipway-agent is not running: pid 4242 is gone"),
            "{gone}"
        );
        assert!(gone.contains("10 min ago"), "{gone}");
        let stale = headline(
            &st,
            &Liveness::Stale {
                age: Duration::from_secs(45),
            },
            2_045_000,
        );
        assert!(
            stale.contains("not running or stuck") && stale.contains("45 s"),
            "{stale}"
        );
    }

    #[test]
    fn written_atomically_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("status.json");
        let mut st = status();
        write(&p, &st).unwrap();
        assert_eq!(read(&p).unwrap(), st);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "readable without root");
        st.disks[0].bytes_acked += 1;
        write(&p, &st).unwrap();
        assert_eq!(read(&p).unwrap(), st);
        // Only the file itself is left: the temporary was renamed.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["status.json"]);
        assert!(write(&d.path().join("missing/status.json"), &st).is_err());
        assert!(read(&d.path().join("nope.json")).is_err());
    }

    #[test]
    fn ack_times_move_only_with_acks() {
        let mut c = AckClock::default();
        assert_eq!(c.observe(1, 0, 10), None);
        assert_eq!(c.observe(1, 512, 20), Some(20));
        assert_eq!(c.observe(1, 512, 30), Some(20));
        assert_eq!(c.observe(1, 1024, 40), Some(40));
        assert_eq!(c.observe(0, 0, 50), None);
    }

    #[test]
    fn our_own_pid_is_alive_and_a_free_one_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
        // A child that was killed and is not reaped yet (a zombie), then reaped.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(pid_alive(pid));
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "a zombie counts as alive"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!pid_alive(pid));
    }
}
