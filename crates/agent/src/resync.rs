//! Checksum resync: what the server's volume holds, chunk by chunk, so a full pass over a
//! volume that already has data sends only the chunks that differ.
//!
//! After an agent crash, a new agent process, or a replacement server that kept the volumes,
//! the server answers `Resync`: its volume holds *something*, but nobody can prove what. The
//! agent then asks for the xxh3-64 hash of every chunk of the volume ([`HashRequest`]); the
//! server streams them in order while the full pass reads the source, and the pass sends a
//! chunk only when its hash differs from the server's (or when no hash came in time). The
//! server hashes a chunk before this run can write it (the pass decides about chunk `k` only
//! once it has hash `k`), so a hash is of what the volume held before the run. A 64-bit hash
//! per MiB makes a false "equal" as likely as a random 64-bit collision.
//!
//! [`HashRequest`]: slipway_proto::HashRequest

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The server's chunk hashes for one disk, as they arrive.
#[derive(Debug, Default)]
pub struct PeerHashes {
    state: Mutex<State>,
    cv: Condvar,
    /// Bytes a pass did not send because the server's hash matched.
    pub skipped_bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    active: bool,
    failed: bool,
    chunk: u64,
    hashes: Vec<u64>,
    last_progress: Option<Instant>,
}

impl PeerHashes {
    /// Expects hashes of `chunk`-byte chunks from the first on (a new request).
    pub fn begin(&self, chunk: u64) {
        let mut s = self.lock();
        *s = State {
            active: true,
            chunk,
            last_progress: Some(Instant::now()),
            ..State::default()
        };
        drop(s);
        self.cv.notify_all();
    }

    /// No hashes to expect (and forget those kept).
    pub fn stop(&self) {
        *self.lock() = State::default();
        self.cv.notify_all();
    }

    /// The hashes that did not arrive never will (the connection they were asked on ended,
    /// or the server could not read its volume): every chunk without one is sent.
    pub fn give_up(&self) {
        self.lock().failed = true;
        self.cv.notify_all();
    }

    /// Whether a pass should compare with the server's hashes.
    pub fn active(&self) -> bool {
        let s = self.lock();
        s.active && !s.failed
    }

    /// The hashes of chunks `first..`. Out of order (not the next expected) means something
    /// is wrong: stop trusting the stream.
    pub fn add(&self, first: u64, hashes: &[u64]) {
        let mut s = self.lock();
        if !s.active || s.failed {
            return;
        }
        if first != s.hashes.len() as u64 {
            s.failed = true;
        } else {
            s.hashes.extend_from_slice(hashes);
            s.last_progress = Some(Instant::now());
        }
        drop(s);
        self.cv.notify_all();
    }

    /// The server's hash of chunk `index`, waiting for it while hashes keep arriving (at most
    /// `patience` without any). `None`: send the chunk.
    pub fn wait(&self, index: u64, patience: Duration) -> Option<u64> {
        let mut s = self.lock();
        loop {
            if !s.active || s.failed {
                return None;
            }
            if let Some(h) = s.hashes.get(index as usize) {
                return Some(*h);
            }
            let since = s.last_progress.map_or(Duration::ZERO, |t| t.elapsed());
            if since >= patience {
                s.failed = true;
                return None;
            }
            s = self
                .cv
                .wait_timeout(s, patience - since)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Chunk size of the hashes expected.
    pub fn chunk(&self) -> u64 {
        self.lock().chunk
    }

    pub fn skipped(&self, bytes: u64) {
        self.skipped_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn hashes_arrive_in_order_and_a_gap_or_silence_means_send() {
        let p = PeerHashes::default();
        assert!(!p.active());
        assert_eq!(p.wait(0, Duration::from_millis(10)), None, "nothing asked");
        p.begin(1 << 20);
        p.add(0, &[10, 11]);
        assert_eq!(p.wait(1, Duration::from_secs(1)), Some(11));
        // Out of order: the stream is not trusted any more.
        p.add(5, &[15]);
        assert!(!p.active());
        assert_eq!(p.wait(0, Duration::from_secs(1)), None);

        p.begin(1 << 20);
        p.add(0, &[1]);
        let t = Instant::now();
        assert_eq!(p.wait(1, Duration::from_millis(50)), None, "no more came");
        assert!(t.elapsed() >= Duration::from_millis(40));
        assert!(!p.active(), "silence gives up for the rest of the pass");
    }

    #[test]
    fn a_waiting_pass_wakes_when_its_hash_arrives() {
        let p = Arc::new(PeerHashes::default());
        p.begin(4096);
        let q = p.clone();
        let t = std::thread::spawn(move || q.wait(2, Duration::from_secs(10)));
        // (The hashes may come before or after the thread waits: both must end in Some.)
        p.add(0, &[7, 8]);
        p.add(2, &[9]);
        assert_eq!(t.join().unwrap(), Some(9));
        p.give_up();
        assert_eq!(p.wait(0, Duration::from_secs(1)), None);
    }
}
