//! QUIC receive windows shared out of one budget, so that what the server's QUIC buffers may
//! hold does not grow with the number of agents.
//!
//! Why: a connection's receive window is credit the server gives an agent to send ahead of
//! what the server has read. When the disks are slower than the network, the server stops
//! reading (its `memory_limit` budget is spent) and every connection's unread bytes sit in
//! quinn's buffers, up to its window. With a fixed 32 MiB window that is 32 MiB per agent:
//! 3.2 GiB at 100 agents, measured as 1.6–1.9 MiB of RSS per connection even with the disks
//! keeping up (docs/benchmarks.md). Here each live connection gets an equal share of
//! `quic.receive_memory`: new connections are accepted with their share as the initial
//! window (credit given in the handshake cannot be taken back), and live ones are resized
//! (`set_receive_window`) when the count changes: down at once, up only when their share has
//! doubled ([`resize`] says why). Shrinking takes effect as the agent uses the credit it
//! already has, so the sum settles at the budget; between, it is at most the budget times the
//! harmonic number of the arrivals.
//!
//! [`share`] is the rule, a plain function; [`Windows`] counts connections and publishes the
//! share on a watch channel that each connection's [`follow`] task applies.

use std::sync::{Arc, Mutex};

use quinn::VarInt;
use slipway_net::Tuning;
use tokio::sync::watch;

/// No connection's window goes below this, whatever the count: one disk stream's throughput
/// is at most window / RTT (1 MiB at 10 ms in a staging subnet ≈ 100 MB/s).
pub const MIN_CONNECTION_WINDOW: u64 = 1 << 20;

/// The receive window of each of `live` connections: an equal share of `budget`, at most
/// `max` (the configured `quic.connection_window`), at least [`MIN_CONNECTION_WINDOW`] (or
/// `max` when that is smaller).
pub fn share(budget: u64, live: usize, max: u64) -> u64 {
    let live = live.max(1) as u64;
    (budget / live).clamp(MIN_CONNECTION_WINDOW.min(max), max)
}

/// The live-connection count and the share that follows from it.
pub(crate) struct Windows {
    budget: u64,
    tuning: Tuning,
    base: quinn::ServerConfig,
    live: Mutex<usize>,
    tx: watch::Sender<u64>,
    gauge: prometheus::IntGauge,
}

/// One accepted connection's place in the count; dropping it gives the place back.
pub(crate) struct Lease {
    windows: Arc<Windows>,
}

impl Windows {
    pub fn new(
        budget: u64,
        tuning: Tuning,
        base: quinn::ServerConfig,
        gauge: prometheus::IntGauge,
    ) -> Arc<Windows> {
        let first = share(budget, 1, tuning.connection_window);
        gauge.set(first as i64);
        Arc::new(Windows {
            budget,
            tuning,
            base,
            live: Mutex::new(0),
            tx: watch::Sender::new(first),
            gauge,
        })
    }

    fn publish(&self, live: usize) -> u64 {
        let w = share(self.budget, live, self.tuning.connection_window);
        self.tx.send_replace(w);
        self.gauge.set(w as i64);
        w
    }

    /// Counts one more connection and returns the server config to accept it with (its
    /// initial receive window is the new share) and the watch its window follows.
    pub fn join(self: &Arc<Self>) -> (Lease, Arc<quinn::ServerConfig>, watch::Receiver<u64>, u64) {
        let w = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            *live += 1;
            self.publish(*live)
        };
        let mut cfg = self.base.clone();
        let tuning = Tuning {
            connection_window: w,
            ..self.tuning.clone()
        };
        cfg.transport_config(Arc::new(tuning.transport()));
        let rx = self.tx.subscribe();
        (
            Lease {
                windows: self.clone(),
            },
            Arc::new(cfg),
            rx,
            w,
        )
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut live = self.windows.live.lock().unwrap_or_else(|e| e.into_inner());
        *live = live.saturating_sub(1);
        self.windows.publish(*live);
    }
}

/// Whether a connection whose window is `applied` should be resized to the new `share`:
/// always down, up only once the share has at least doubled.
///
/// Why the hysteresis: quinn cannot take back credit it granted, so a shrink is kept as a debt
/// that only the server's reads pay off, while a grow adds its whole increase at once. If
/// every agent reconnect (the new connection joins before the old one leaves) shrank and then
/// grew every connection by the same small step, a connection whose disk is stalled (no
/// reads) would gain that step of credit each time, and its buffers would creep back towards
/// `connection_window` through churn alone. Growing only on a doubling makes a churn cycle
/// cost nothing, and a real drop in the number of agents still gives the rest their share.
pub fn resize(applied: u64, share: u64) -> bool {
    share < applied || share >= applied.saturating_mul(2)
}

/// Applies the published share to `conn` (see [`resize`]) until it closes. `initial` is the
/// window the connection was accepted with.
pub(crate) async fn follow(conn: quinn::Connection, mut rx: watch::Receiver<u64>, initial: u64) {
    let mut applied = initial;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let w = *rx.borrow_and_update();
                if resize(applied, w) {
                    conn.set_receive_window(VarInt::from_u64(w).unwrap_or(VarInt::MAX));
                    applied = w;
                }
            }
            _ = conn.closed() => return,
        }
    }
}

/// Aborts the [`follow`] task when the session ends, whichever way: the task holds a handle
/// of the connection, and quinn closes a connection only when its last handle is dropped.
pub(crate) struct FollowGuard(pub tokio::task::JoinHandle<()>);

impl Drop for FollowGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_budget_is_shared_equally_within_the_bounds() {
        // One connection: the configured window, not the whole budget.
        assert_eq!(share(256 * MIB, 1, 32 * MIB), 32 * MIB);
        assert_eq!(share(256 * MIB, 8, 32 * MIB), 32 * MIB);
        assert_eq!(share(256 * MIB, 16, 32 * MIB), 16 * MIB);
        assert_eq!(share(256 * MIB, 100, 32 * MIB), 256 * MIB / 100);
        // Never below the floor: past 256 connections the total grows by 1 MiB each.
        assert_eq!(share(256 * MIB, 1000, 32 * MIB), MIB);
        // A configured window below the floor is kept.
        assert_eq!(share(256 * MIB, 1000, 256 << 10), 256 << 10);
        // No connections (the last one left): what the next one would get.
        assert_eq!(share(8 * MIB, 0, 32 * MIB), 8 * MIB);
    }

    #[test]
    fn windows_shrink_at_once_and_grow_only_on_a_doubling() {
        assert!(resize(4 * MIB, 3 * MIB));
        assert!(!resize(4 * MIB, 4 * MIB));
        assert!(!resize(4 * MIB, 7 * MIB));
        assert!(resize(4 * MIB, 8 * MIB));
        // A churn cycle (one more connection, then one less) changes nothing after the shrink:
        // no credit is granted twice.
        let (n, budget, max) = (100usize, 256 * MIB, 32 * MIB);
        let mut applied = share(budget, n, max);
        let mut grows = 0;
        for _ in 0..50 {
            for live in [n + 1, n] {
                let w = share(budget, live, max);
                if resize(applied, w) {
                    grows += u32::from(w > applied);
                    applied = w;
                }
            }
        }
        assert_eq!(grows, 0);
        // Most agents gone: the rest grow.
        assert!(resize(applied, share(budget, n / 4, max)));
    }

    #[test]
    fn the_sum_of_the_shares_stays_within_the_budget_above_the_floor() {
        for budget in [8 * MIB, 64 * MIB, 256 * MIB] {
            for live in 1..=300usize {
                let w = share(budget, live, 32 * MIB);
                let total = w * live as u64;
                assert!(
                    total <= budget.max(MIN_CONNECTION_WINDOW * live as u64),
                    "{live} × {w} > {budget}"
                );
            }
        }
    }
}
