//! Progress for the operator: bars on a terminal, a log line per disk every 5 s otherwise.
//!
//! Progress is measured in disk bytes *covered durably* (scanned and acknowledged), not bytes
//! sent, so a sparse disk moves fast where it is empty and the bar never runs ahead of what
//! the server has on stable storage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};
use slipway_proto::Phase;
use tokio::sync::watch;
use tracing::info;

use crate::run::Shared;
use crate::session::shutdown_requested;
use crate::state::DiskSnapshot;

/// How progress is shown.
#[derive(Debug, Clone)]
pub enum ProgressMode {
    /// Bars, drawn on these (stderr is a terminal).
    Bars(MultiProgress),
    /// A log line per disk every 5 s.
    Lines,
    /// Nothing.
    Off,
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    mode: ProgressMode,
    mut shutdown: watch::Receiver<bool>,
) {
    match mode {
        ProgressMode::Off => {}
        ProgressMode::Lines => lines(&shared, &mut shutdown).await,
        ProgressMode::Bars(mp) => bars(&shared, mp, &mut shutdown).await,
    }
}

fn snapshots(shared: &Shared) -> Vec<DiskSnapshot> {
    let s = shared.lock();
    (0..s.disk_count()).map(|d| s.snapshot(d)).collect()
}

fn phase_name(s: &DiskSnapshot) -> &'static str {
    match s.report.map(|r| r.phase) {
        None => "waiting",
        Some(Phase::InitialSync) => "initial-sync",
        Some(Phase::Rescan) => "rescan",
        Some(Phase::Backlog) => "backlog",
        Some(Phase::Continuous) => "continuous",
        Some(Phase::Paused) => "paused",
    }
}

/// One progress line: phase, how far, how fast, how long still.
pub(crate) fn describe(s: &DiskSnapshot, bytes_per_sec: f64) -> String {
    let covered = s.covered();
    let mut line = format!(
        "disk {}: {}, {} of {} covered ({:.0}%), {:.1} MB/s",
        s.id,
        phase_name(s),
        HumanBytes(covered),
        HumanBytes(s.size),
        covered as f64 * 100.0 / s.size.max(1) as f64,
        bytes_per_sec / 1e6,
    );
    if covered < s.size && bytes_per_sec > 0.0 {
        let eta = Duration::from_secs(((s.size - covered) as f64 / bytes_per_sec).ceil() as u64);
        line.push_str(&format!(", ETA {}", humantime::format_duration(eta)));
    }
    line.push_str(&format!(
        "; sent {}, acked {}",
        HumanBytes(s.stats.payload_sent),
        HumanBytes(s.stats.payload_acked)
    ));
    line
}

async fn lines(shared: &Shared, shutdown: &mut watch::Receiver<bool>) {
    const EVERY: Duration = Duration::from_secs(5);
    let mut last: Vec<(Instant, u64)> = snapshots(shared)
        .iter()
        .map(|s| (Instant::now(), s.covered()))
        .collect();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown_requested(shutdown) => return,
        }
        for (d, (s, (t, c))) in snapshots(shared).iter().zip(last.iter_mut()).enumerate() {
            let now = Instant::now();
            let covered = s.covered();
            let rate = covered.saturating_sub(*c) as f64 / (now - *t).as_secs_f64().max(1e-3);
            *t = now;
            *c = covered;
            if shared.cfg.follow {
                let tr = &shared.tracking[d];
                info!(
                    tracking = tr.mode(),
                    why = tr.reason().unwrap_or("-"),
                    read_bytes = shared.bytes_read.load(std::sync::atomic::Ordering::Relaxed),
                    "{}",
                    describe(s, rate)
                );
            } else {
                info!("{}", describe(s, rate));
            }
        }
    }
}

async fn bars(shared: &Shared, mp: MultiProgress, shutdown: &mut watch::Receiver<bool>) {
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bars: Vec<ProgressBar> = snapshots(shared)
        .iter()
        .map(|s| {
            let b = mp.add(ProgressBar::new(s.size));
            b.set_style(style.clone());
            b.set_prefix(s.id.clone());
            b
        })
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown_requested(shutdown) => true,
        };
        for (s, b) in snapshots(shared).iter().zip(&bars) {
            b.set_position(s.covered());
            b.set_message(format!(
                "{} (sent {}, acked {})",
                phase_name(s),
                HumanBytes(s.stats.payload_sent),
                HumanBytes(s.stats.payload_acked)
            ));
        }
        if stop {
            for b in &bars {
                b.abandon();
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DiskStats, PassKind, Report};

    #[test]
    fn a_line_says_phase_progress_rate_and_eta() {
        let s = DiskSnapshot {
            id: "sda".into(),
            size: 1000 << 20,
            pass: Some(PassKind::Fresh),
            scanning: true,
            scanned: 300 << 20,
            unacked: 50 << 20,
            report: Some(Report {
                phase: Phase::InitialSync,
                backlog_bytes: 0,
                pass_seq: 0,
            }),
            stats: DiskStats {
                payload_sent: 300 << 20,
                payload_acked: 250 << 20,
                zeroes_acked: 0,
            },
        };
        let l = describe(&s, 75e6);
        assert!(l.starts_with("disk sda: initial-sync, 250.00 MiB of 1000.00 MiB covered (25%), 75.0 MB/s, ETA 11s"), "{l}");
        assert!(l.ends_with("sent 300.00 MiB, acked 250.00 MiB"), "{l}");
    }
}
