//! The AWS API budget's I/O-free core: a clock seam and the refresh policy of the shared
//! snapshot cache.
//!
//! EC2 meters describe calls per account and region (a bucket of the order of 100 tokens,
//! refilling at about 20 a second) and the customer's own tooling draws from the same bucket.
//! A replication server must therefore cost a bounded number of describes whatever its number
//! of sources: one DescribeSnapshots, filtered by the server's tag, serves every source, and is
//! repeated at most every `describe_interval`; after a failure the interval doubles (up to
//! 16×) so a throttled account is not hammered further. [`Refresh`] decides when; it reads no
//! clock, the backend passes [`Clock::now_ms`], and tests drive a [`ManualClock`] through a
//! simulated hour in no time.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Milliseconds on a monotonic clock.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now_ms(&self) -> u64;
}

/// The real monotonic clock.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            start: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// A clock that moves only when told (simulated time in tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicU64,
}

impl ManualClock {
    pub fn advance(&self, d: Duration) {
        self.ms.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

/// Largest factor the interval grows to after consecutive failures.
pub const MAX_BACKOFF_FACTOR: u32 = 16;

/// When the shared describe may run again.
#[derive(Debug, Clone)]
pub struct Refresh {
    interval_ms: u64,
    next_ms: Option<u64>,
    failures: u32,
}

impl Refresh {
    pub fn new(interval: Duration) -> Self {
        Refresh {
            interval_ms: interval.as_millis().max(1) as u64,
            next_ms: None,
            failures: 0,
        }
    }

    /// Whether a describe may run at `now_ms` (always before the first success).
    pub fn due(&self, now_ms: u64) -> bool {
        self.next_ms.is_none_or(|n| now_ms >= n)
    }

    /// A describe succeeded at `now_ms`: the next one after one interval.
    pub fn succeeded(&mut self, now_ms: u64) {
        self.failures = 0;
        self.next_ms = Some(now_ms + self.interval_ms);
    }

    /// A describe failed at `now_ms`: the next one after 2, 4, … 16 intervals.
    pub fn failed(&mut self, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        let factor = 2u64
            .saturating_pow(self.failures)
            .min(MAX_BACKOFF_FACTOR as u64);
        self.next_ms = Some(now_ms + self.interval_ms * factor);
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_first_then_once_per_interval() {
        let mut r = Refresh::new(Duration::from_secs(30));
        assert!(r.due(0));
        r.succeeded(0);
        assert!(!r.due(29_999));
        assert!(r.due(30_000));
    }

    #[test]
    fn failures_back_off_doubling_up_to_sixteen_intervals() {
        let mut r = Refresh::new(Duration::from_secs(10));
        r.succeeded(0);
        let mut now = 10_000;
        let mut waits = vec![];
        for _ in 0..6 {
            assert!(r.due(now));
            r.failed(now);
            let mut wait = 0;
            while !r.due(now + wait) {
                wait += 1_000;
            }
            waits.push(wait / 1_000);
            now += wait;
        }
        assert_eq!(waits, [20, 40, 80, 160, 160, 160]);
        r.succeeded(now);
        assert_eq!(r.failures(), 0);
        assert!(!r.due(now + 9_999) && r.due(now + 10_000));
    }
}
