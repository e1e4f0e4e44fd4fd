//! Server-wide bandwidth throttle.
//!
//! A token bucket that may go into debt: a receiver takes the bytes it just read and, if the
//! bucket is negative, sleeps until the debt is repaid. Reading slower makes QUIC flow control
//! slow the agents down, so the limit holds for the whole server however many agents there are.
//! Charging after the read keeps the long-run rate exact (within one frame) without splitting
//! frames; the burst allowance is kept small (50 ms of the rate) so short windows stay honest.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    /// `rate` in bytes per second; must be > 0.
    pub fn new(rate: u64) -> Self {
        let rate = rate as f64;
        Throttle {
            rate,
            burst: rate * 0.05,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Charges `n` bytes at `now`; returns how long the caller must wait.
    pub fn charge(&self, n: u64, now: Instant) -> Duration {
        let mut g = self.state.lock().unwrap();
        let (ref mut avail, ref mut last) = *g;
        let dt = now.saturating_duration_since(*last).as_secs_f64();
        *last = now.max(*last);
        *avail = (*avail + dt * self.rate).min(self.burst);
        *avail -= n as f64;
        if *avail >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*avail / self.rate)
        }
    }

    /// Charges `n` bytes and waits as long as needed. Returns the time waited.
    pub async fn take(&self, n: u64) -> Duration {
        let wait = self.charge(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Driven with a fake clock: a receiver that always waits as told moves exactly `rate`.
    #[test]
    fn long_run_rate_is_exact() {
        let t = Throttle::new(10_000_000);
        let mut now = Instant::now();
        let start = now;
        let mut moved = 0u64;
        for _ in 0..1000 {
            let wait = t.charge(1 << 20, now);
            now += wait;
            moved += 1 << 20;
        }
        let rate = moved as f64 / now.duration_since(start).as_secs_f64();
        assert!((rate / 10_000_000.0 - 1.0).abs() < 0.01, "{rate}");
    }

    #[test]
    fn idle_time_buys_only_a_small_burst() {
        let t = Throttle::new(1_000_000);
        let now = Instant::now() + Duration::from_secs(100);
        assert_eq!(t.charge(50_000, now), Duration::ZERO);
        assert!(t.charge(100_000, now) > Duration::from_millis(90));
    }
}
