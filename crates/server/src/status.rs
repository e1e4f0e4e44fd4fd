//! Replication state per disk, as users of AWS MGN/DRS know it.
//!
//! The state shown is derived, not stored: from what the agent last reported (its phase and
//! backlog), what the applier made durable, whether a connection exists, and the clock. Keeping
//! the inputs and computing the state on demand means status, metrics and restore-point
//! eligibility can never disagree.

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use slipway_proto::Phase;

/// The replication states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplState {
    Initiating,
    InitialSync,
    Backlog,
    Continuous,
    CreatingSnapshot,
    Rescan,
    Paused,
    Stalled,
    Disconnected,
    Error,
}

impl ReplState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplState::Initiating => "initiating",
            ReplState::InitialSync => "initial-sync",
            ReplState::Backlog => "backlog",
            ReplState::Continuous => "continuous",
            ReplState::CreatingSnapshot => "creating-snapshot",
            ReplState::Rescan => "rescan",
            ReplState::Paused => "paused",
            ReplState::Stalled => "stalled",
            ReplState::Disconnected => "disconnected",
            ReplState::Error => "error",
        }
    }
}

/// Inputs of one disk's state, updated by the session, the applier events and the scheduler.
#[derive(Debug, Clone)]
pub struct DiskStatus {
    pub size: u64,
    pub block_size: u32,
    pub connected: bool,
    pub peer: Option<String>,
    /// Last phase the agent reported, if any in this connection.
    pub phase: Option<Phase>,
    /// Last non-continuous phase: what the disk is doing until a pass is durable.
    pub syncing: ReplState,
    pub error: Option<String>,
    pub creating_snapshot: bool,
    pub durable_seq: u64,
    pub pass_seq: u64,
    /// A pass completed and is durable: the volume is a whole copy.
    pub synced: bool,
    pub replicated_bytes: u64,
    pub rescanned_bytes: u64,
    pub backlogged_bytes: u64,
    pub backlog_bytes: u64,
    pub last_ack: Option<SystemTime>,
    /// Last time durable data or a progress report arrived.
    pub last_activity: Instant,
    pub last_continuous: Option<Instant>,
    pub since: Instant,
    /// Recent durable throughput, bytes per second (exponentially weighted).
    pub rate: f64,
    rate_at: Option<Instant>,
    /// How the connected agent finds this disk's changes (`kernel`, `rescan`, `none`) and why
    /// not in the kernel, as it said (`None`: it did not say, or no agent is connected).
    pub tracking: Option<(String, String)>,
}

impl DiskStatus {
    pub fn new(size: u64, block_size: u32, now: Instant) -> Self {
        DiskStatus {
            size,
            block_size,
            connected: false,
            peer: None,
            phase: None,
            tracking: None,
            syncing: ReplState::InitialSync,
            error: None,
            creating_snapshot: false,
            durable_seq: 0,
            pass_seq: 0,
            synced: false,
            replicated_bytes: 0,
            rescanned_bytes: 0,
            backlogged_bytes: 0,
            backlog_bytes: 0,
            last_ack: None,
            last_activity: now,
            last_continuous: None,
            since: now,
            rate: 0.0,
            rate_at: None,
        }
    }

    /// The agent reported its phase.
    pub fn on_progress(&mut self, phase: Phase, backlog: u64, pass_seq: u64, now: Instant) {
        self.phase = Some(phase);
        self.backlog_bytes = backlog;
        self.last_activity = now;
        match phase {
            Phase::InitialSync => self.syncing = ReplState::InitialSync,
            Phase::Rescan => self.syncing = ReplState::Rescan,
            Phase::Backlog => self.syncing = ReplState::Backlog,
            Phase::Continuous => {
                self.pass_seq = pass_seq;
                if self.durable_seq >= pass_seq {
                    self.synced = true;
                }
            }
            Phase::Paused => {}
        }
        if self.state(now, Duration::MAX) == ReplState::Continuous {
            self.last_continuous = Some(now);
        }
    }

    /// The applier made `bytes` durable up to `seq`. Returns true when this completed a pass.
    pub fn on_durable(&mut self, seq: u64, bytes: u64, now: Instant) -> bool {
        self.durable_seq = seq;
        self.replicated_bytes += bytes;
        match self.phase {
            Some(Phase::Rescan) => self.rescanned_bytes += bytes,
            Some(Phase::Backlog) => self.backlogged_bytes += bytes,
            _ => {}
        }
        self.backlog_bytes = self.backlog_bytes.saturating_sub(bytes);
        self.last_ack = Some(SystemTime::now());
        if bytes > 0 {
            self.last_activity = now;
        }
        if let Some(t) = self.rate_at {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 {
                let inst = bytes as f64 / dt;
                let w = (dt / 5.0).min(1.0); // ~5 s time constant
                self.rate = self.rate * (1.0 - w) + inst * w;
            }
        }
        self.rate_at = Some(now);
        let completed = !self.synced
            && self.phase == Some(Phase::Continuous)
            && self.pass_seq > 0
            && seq >= self.pass_seq;
        if completed {
            self.synced = true;
        }
        if self.state(now, Duration::MAX) == ReplState::Continuous {
            self.last_continuous = Some(now);
        }
        completed
    }

    /// The state as shown to users.
    pub fn state(&self, now: Instant, stall_after: Duration) -> ReplState {
        if self.error.is_some() {
            return ReplState::Error;
        }
        if !self.connected {
            return ReplState::Disconnected;
        }
        if self.creating_snapshot {
            return ReplState::CreatingSnapshot;
        }
        let s = match self.phase {
            None => return ReplState::Initiating,
            Some(Phase::Paused) => return ReplState::Paused,
            Some(Phase::Continuous) if self.synced => ReplState::Continuous,
            Some(Phase::Continuous) => self.syncing,
            Some(Phase::InitialSync) => ReplState::InitialSync,
            Some(Phase::Rescan) => ReplState::Rescan,
            Some(Phase::Backlog) => ReplState::Backlog,
        };
        if s != ReplState::Continuous
            && now.saturating_duration_since(self.last_activity) > stall_after
        {
            return ReplState::Stalled;
        }
        s
    }

    /// Why the state is what it is, when that is not obvious.
    pub fn reason(&self, now: Instant, stall_after: Duration) -> Option<String> {
        match self.state(now, stall_after) {
            ReplState::Error => self.error.clone(),
            ReplState::Stalled => Some(format!(
                "no data made durable for {}s",
                now.saturating_duration_since(self.last_activity).as_secs()
            )),
            ReplState::Disconnected => Some("no agent connected for this disk".into()),
            _ => None,
        }
    }

    /// Seconds since the disk was last continuous (0 while it is).
    pub fn lag(&self, now: Instant, stall_after: Duration) -> f64 {
        if self.state(now, stall_after) == ReplState::Continuous {
            return 0.0;
        }
        now.saturating_duration_since(self.last_continuous.unwrap_or(self.since))
            .as_secs_f64()
    }

    /// Estimated seconds until the backlog is durable, if there is a rate to go by.
    pub fn eta(&self) -> Option<f64> {
        if self.backlog_bytes == 0 {
            return Some(0.0);
        }
        (self.rate > 1.0).then(|| self.backlog_bytes as f64 / self.rate)
    }
}

/// One disk in `slipway status --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskReport {
    pub id: String,
    pub state: ReplState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub size_bytes: u64,
    pub replicated_bytes: u64,
    pub rescanned_bytes: u64,
    pub backlogged_bytes: u64,
    pub backlog_bytes: u64,
    pub durable_seq: u64,
    pub synced: bool,
    pub last_ack_unix_ms: Option<u64>,
    pub lag_seconds: f64,
    pub eta_seconds: Option<f64>,
    pub rate_bytes_per_second: f64,
    /// How the agent finds changes: `kernel` (write tracking), `rescan`, `none` (one pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<String>,
    /// Why not `kernel`, as the agent said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_reason: Option<String>,
}

/// One source in `slipway status --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceReport {
    pub id: String,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub disks: Vec<DiskReport>,
    /// Why no restore point can be taken now, if none can.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_points_blocked: Option<String>,
    /// Restore points kept for the source.
    #[serde(default)]
    pub restore_points: usize,
    /// Age of the newest restore point (the recovery point objective).
    #[serde(default)]
    pub newest_restore_point_age_seconds: Option<f64>,
    /// The bandwidth limit the settings push to the source's agent, Mbit/s (none: unlimited
    /// by the server; the agent may have its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit_mbps: Option<f64>,
}

/// The whole server in `slipway status --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub listen: String,
    pub fingerprint: String,
    pub uptime_seconds: u64,
    pub agents_connected: i64,
    /// `local` or `aws`.
    #[serde(default)]
    pub backend: String,
    /// EBS attachment slots (used, limit), on a backend with such a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment_slots: Option<(u32, u32)>,
    /// Fingerprint of the settings file the server runs with (`settings_sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings_sha256: Option<String>,
    pub sources: Vec<SourceReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(60);

    #[test]
    fn initial_sync_then_continuous_once_the_pass_is_durable() {
        let t0 = Instant::now();
        let mut s = DiskStatus::new(1 << 20, 512, t0);
        assert_eq!(s.state(t0, STALL), ReplState::Disconnected);
        s.connected = true;
        assert_eq!(s.state(t0, STALL), ReplState::Initiating);
        s.on_progress(Phase::InitialSync, 1 << 20, 0, t0);
        assert_eq!(s.state(t0, STALL), ReplState::InitialSync);
        assert!(!s.on_durable(5, 4096, t0 + Duration::from_secs(1)));
        // The agent sent its last write (seq 9): not continuous until that is durable.
        s.on_progress(Phase::Continuous, 0, 9, t0 + Duration::from_secs(2));
        assert_eq!(
            s.state(t0 + Duration::from_secs(2), STALL),
            ReplState::InitialSync
        );
        assert!(s.on_durable(9, 4096, t0 + Duration::from_secs(3)));
        assert_eq!(
            s.state(t0 + Duration::from_secs(3), STALL),
            ReplState::Continuous
        );
        assert_eq!(s.lag(t0 + Duration::from_secs(3), STALL), 0.0);
        assert_eq!(s.replicated_bytes, 8192);
    }

    #[test]
    fn stalled_error_disconnected_lag() {
        let t0 = Instant::now();
        let mut s = DiskStatus::new(1 << 20, 512, t0);
        s.connected = true;
        s.on_progress(Phase::Rescan, 100, 0, t0);
        let later = t0 + Duration::from_secs(61);
        assert_eq!(s.state(later, STALL), ReplState::Stalled);
        assert!(s.reason(later, STALL).unwrap().contains("61s"));
        assert!((s.lag(later, STALL) - 61.0).abs() < 0.01);
        s.error = Some("EIO".into());
        assert_eq!(s.state(later, STALL), ReplState::Error);
        s.error = None;
        s.connected = false;
        assert_eq!(s.state(later, STALL), ReplState::Disconnected);
    }

    #[test]
    fn rescanned_and_backlogged_counters_and_eta() {
        let t0 = Instant::now();
        let mut s = DiskStatus::new(1 << 30, 512, t0);
        s.connected = true;
        s.on_progress(Phase::Rescan, 1000, 0, t0);
        s.on_durable(1, 100, t0);
        s.on_progress(Phase::Backlog, 900, 0, t0);
        s.on_durable(2, 300, t0 + Duration::from_secs(1));
        assert_eq!(s.rescanned_bytes, 100);
        assert_eq!(s.backlogged_bytes, 300);
        assert_eq!(s.backlog_bytes, 600);
        assert!(s.eta().unwrap() > 0.0);
        assert_eq!(ReplState::CreatingSnapshot.as_str(), "creating-snapshot");
        assert_eq!(
            serde_json::to_string(&ReplState::InitialSync).unwrap(),
            "\"initial-sync\""
        );
    }
}
