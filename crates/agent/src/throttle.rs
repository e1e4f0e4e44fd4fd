//! The bandwidth limit of a source (`--bandwidth-limit`, Mbit/s): a token bucket shared by
//! every disk's sender, so the source's production uplink is never saturated by replication.
//!
//! The bucket fills at the limit up to a small burst. A sender takes the bytes of each write
//! payload before handing it to QUIC; when the bucket cannot cover them it goes into debt and
//! the sender sleeps, once, until the debt is repaid. Debt (rather than waiting for enough
//! tokens to be there) lets a write larger than the burst through and makes concurrent
//! senders queue in order: each one that arrives later finds more debt and sleeps longer. No
//! lock is held across the sleep and nothing polls.
//!
//! Payload bytes are counted before compression, so with LZ4 the wire carries at most the
//! limit (less when the data compresses).
//!
//! Two limits meet here: the agent's own (config or flag, fixed for the run) and the one the
//! server's settings push for the source ([`slipway_proto::SourceLimits`], changed at any time
//! by the session). The stricter applies: a source owner and a staging-area operator can each
//! cap replication, and neither can lift the other's cap.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long the bucket may fill for while idle: a burst after a pause is at most this much
/// of the limit (and at least [`MIN_BURST`]).
const BURST_TIME: Duration = Duration::from_millis(100);
/// Smallest burst, in bytes.
const MIN_BURST: f64 = 64.0 * 1024.0;

/// A token bucket of bytes, refilled at the stricter of two rates.
#[derive(Debug)]
pub struct Throttle {
    /// The agent's own limit, bytes per second (infinite: none).
    local: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may go now; negative: owed by senders that are sleeping.
    tokens: f64,
    /// When `tokens` was last brought up to date (`None`: never used, the bucket is full).
    at: Option<Instant>,
    /// The server's limit for the source, bytes per second (infinite: none).
    pushed: f64,
}

fn burst(rate: f64) -> f64 {
    (rate * BURST_TIME.as_secs_f64()).max(MIN_BURST)
}

impl Throttle {
    /// A bucket for `mbps` megabits (10^6 bits) per second. `mbps` must be positive and
    /// finite (the config checks).
    pub fn from_mbps(mbps: f64) -> Self {
        Self::new(mbps * 1e6 / 8.0)
    }

    /// A bucket for `bytes_per_sec` bytes per second.
    pub fn new(bytes_per_sec: f64) -> Self {
        Throttle {
            local: bytes_per_sec,
            state: Mutex::new(Bucket {
                tokens: burst(bytes_per_sec),
                at: None,
                pushed: f64::INFINITY,
            }),
        }
    }

    /// No limit of the agent's own (the server may still push one).
    pub fn unlimited() -> Self {
        Self::new(f64::INFINITY)
    }

    /// The agent's own limit in megabits per second (infinite: none).
    pub fn mbps(&self) -> f64 {
        self.local * 8.0 / 1e6
    }

    /// Sets the limit the server pushed, in bits per second (0: none).
    pub fn set_pushed_bps(&self, bps: u64) {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.pushed = if bps == 0 {
            f64::INFINITY
        } else {
            bps as f64 / 8.0
        };
        // A bucket filled under a looser limit holds at most one burst of the new one.
        let rate = self.local.min(b.pushed);
        if rate.is_finite() {
            b.tokens = b.tokens.min(burst(rate));
        }
    }

    /// The limit in force, megabits per second (`None`: unlimited).
    pub fn effective_mbps(&self) -> Option<f64> {
        let b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rate = self.local.min(b.pushed);
        rate.is_finite().then(|| rate * 8.0 / 1e6)
    }

    /// The server's limit, megabits per second (`None`: none pushed).
    pub fn pushed_mbps(&self) -> Option<f64> {
        let b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.pushed.is_finite().then(|| b.pushed * 8.0 / 1e6)
    }

    /// Waits until `bytes` may be sent under the limit.
    pub async fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes `bytes` from the bucket at `now`; returns how long the caller must wait before
    /// sending them.
    fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rate = self.local.min(b.pushed);
        if !rate.is_finite() {
            // No limit: the bucket stays full for when one is pushed.
            b.at = None;
            b.tokens = f64::INFINITY;
            return Duration::ZERO;
        }
        let cap = burst(rate);
        if let Some(at) = b.at {
            let earned = now.saturating_duration_since(at).as_secs_f64() * rate;
            b.tokens = (b.tokens + earned).min(cap);
        }
        b.at = Some(now);
        b.tokens -= bytes as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn secs(since: Instant) -> f64 {
        since.elapsed().as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_transfer_goes_at_the_limit() {
        // 80 Mbit/s = 10 MB/s; a burst of 1 MB.
        let t = Throttle::from_mbps(80.0);
        assert!((t.mbps() - 80.0).abs() < 1e-9);
        let start = Instant::now();
        for _ in 0..100 {
            t.take(MIB).await;
        }
        // 100 MiB at 10 MB/s, less the burst the bucket started with.
        let expect = (100.0 * MIB as f64 - 1e6) / 1e7;
        let took = secs(start);
        assert!(
            (took - expect).abs() < 0.01,
            "took {took} s, expected {expect} s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn small_writes_within_the_burst_do_not_wait() {
        let t = Throttle::from_mbps(80.0);
        let start = Instant::now();
        for _ in 0..15 {
            t.take(64 * 1024).await;
        }
        assert_eq!(secs(start), 0.0);
        // The next one goes into debt.
        t.take(64 * 1024).await;
        assert!(secs(start) > 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_earns_at_most_one_burst() {
        let t = Throttle::from_mbps(8.0); // 1 MB/s, burst 100 kB
        t.take(MIB).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        t.take(2_000_000).await;
        let took = secs(start);
        assert!((took - 1.9).abs() < 0.01, "took {took} s, expected 1.9 s");
    }

    #[tokio::test(start_paused = true)]
    async fn senders_share_the_limit() {
        let t = Arc::new(Throttle::from_mbps(8.0)); // 1 MB/s
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let t = t.clone();
            tasks.spawn(async move {
                for _ in 0..10 {
                    t.take(100_000).await;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        // 4 MB together at 1 MB/s, less the first 100 kB burst.
        let took = secs(start);
        assert!((took - 3.9).abs() < 0.01, "took {took} s, expected 3.9 s");
    }

    #[tokio::test(start_paused = true)]
    async fn the_stricter_of_the_agent_and_server_limits_applies() {
        // No limit of its own: the server's 8 Mbit/s (1 MB/s) governs.
        let t = Throttle::unlimited();
        assert_eq!(t.effective_mbps(), None);
        let start = Instant::now();
        t.take(10_000_000).await;
        assert_eq!(secs(start), 0.0, "unlimited until a limit is pushed");
        t.set_pushed_bps(8_000_000);
        assert_eq!(t.effective_mbps(), Some(8.0));
        let start = Instant::now();
        for _ in 0..10 {
            t.take(100_000).await;
        }
        // 1 MB at 1 MB/s, less the 100 kB burst.
        let took = secs(start);
        assert!((took - 0.9).abs() < 0.01, "took {took} s, expected 0.9 s");

        // Its own 80 Mbit/s is looser than the pushed 8: the pushed one still governs.
        let t = Throttle::from_mbps(80.0);
        t.set_pushed_bps(8_000_000);
        assert_eq!(t.effective_mbps(), Some(8.0));
        assert_eq!(t.pushed_mbps(), Some(8.0));
        let start = Instant::now();
        for _ in 0..10 {
            t.take(100_000).await;
        }
        let took = secs(start);
        assert!((took - 0.9).abs() < 0.01, "took {took} s, expected 0.9 s");
        // A pushed limit looser than its own cannot lift it; 0 clears the pushed one.
        t.set_pushed_bps(1_000_000_000);
        assert_eq!(t.effective_mbps(), Some(80.0));
        t.set_pushed_bps(0);
        assert_eq!(t.pushed_mbps(), None);
        assert_eq!(t.effective_mbps(), Some(80.0));
    }

    #[test]
    fn a_write_larger_than_the_burst_waits_for_its_own_bytes() {
        let t = Throttle::new(1000.0); // burst: MIN_BURST
        let now = Instant::now();
        assert_eq!(t.reserve(MIN_BURST as u64, now), Duration::ZERO);
        assert_eq!(t.reserve(500, now), Duration::from_millis(500));
        // Half a second later the debt is paid: the next 1000 bytes wait exactly one second.
        let later = now + Duration::from_millis(500);
        assert_eq!(t.reserve(1000, later), Duration::from_secs(1));
    }
}
