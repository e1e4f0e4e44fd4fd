//! Volumes and durability.
//!
//! Everything that decides whether a byte is on stable storage lives here, with no async and no
//! networking, so it can be driven by plain threads in tests (including a volume that loses
//! unflushed writes on a simulated power cut).
//!
//! * [`volume`] — the [`Volume`] contract (positioned writes, explicit flush) and its file /
//!   block-device implementation.
//! * [`applier`] — the per-disk writer + group-commit flusher: only a completed flush moves the
//!   durable sequence, and only the durable sequence is ever reported for acks.
//! * [`meta`] — per-disk metadata written atomically (temp file, fsync, rename, fsync dir).
//! * [`changes`] — which 512 KiB blocks changed since the last restore point.
//! * [`snapshot`] — the local snapshot store: content-addressed blocks, atomic manifests.
//! * [`fsutil`] — the crash-safe file helpers the rest uses.
//!
//! Architecture invariant: no function here reports a sequence as durable before the
//! `fdatasync` covering it returned success.

pub mod applier;
pub mod changes;
pub mod fsutil;
pub mod meta;
pub mod snapshot;
pub mod volume;

pub use applier::{Applier, ApplierEvent, ApplierEvents, ApplierHandle, Op};
pub use meta::DiskMeta;
pub use volume::{FileVolume, FlushHandle, Volume};

/// Crash-test hook: when the environment variable `SLIPWAY_FAILPOINT` equals `name`, the
/// process aborts right here — a `kill -9` at an exact, otherwise unreachable moment. Costs one
/// cached environment lookup when unset.
pub fn failpoint(name: &str) {
    if armed() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Crash-test hook: when `SLIPWAY_FAILPOINT` equals `name`, the calling thread sleeps for
/// `PAUSE` here — it widens a window that is otherwise a few microseconds, so a test can cut
/// (`kill -9`) inside it every time.
pub fn failpoint_pause(name: &str) {
    const PAUSE: std::time::Duration = std::time::Duration::from_secs(5);
    if armed() == Some(name) {
        eprintln!("failpoint {name}: pausing {PAUSE:?}");
        std::thread::sleep(PAUSE);
        eprintln!("failpoint {name}: resuming");
    }
}

/// Crash-test hook: whether `SLIPWAY_FAILPOINT` equals `name`, for async code that pauses
/// itself (with the runtime's timer) where [`failpoint_pause`] would block a worker thread.
pub fn failpoint_armed(name: &str) -> bool {
    armed() == Some(name)
}

/// Crash-test hook: whether `SLIPWAY_FAILPOINT` equals `name` (for a failpoint that changes
/// behaviour instead of aborting or pausing, e.g. `skip-fdatasync`).
pub fn failpoint_active(name: &str) -> bool {
    // Only in debug builds (the tests'): a release binary cannot be told by its environment
    // to break its own durability.
    cfg!(debug_assertions) && armed() == Some(name)
}

fn armed() -> Option<&'static str> {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("SLIPWAY_FAILPOINT").ok())
        .as_deref()
}

/// Errors at the store's boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O call failed; `what` reads as a sentence fragment ("opening volume /x").
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A metadata file exists but cannot be understood.
    #[error("metadata {path} is corrupt: {reason}")]
    CorruptMeta { path: String, reason: String },
    /// No such restore point (or disk in it).
    #[error("{0} not found")]
    NotFound(String),
    /// An existing volume does not match what was asked for.
    #[error("volume {path} is {actual} bytes, expected at least {expected}")]
    TooSmall {
        path: String,
        actual: u64,
        expected: u64,
    },
}

impl StoreError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let what = what.into();
        move |source| StoreError::Io { what, source }
    }
}
