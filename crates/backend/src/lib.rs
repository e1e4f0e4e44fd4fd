//! Where volumes and restore points live: the traits the server consumes and a backend
//! implements.
//!
//! The embedded local default keeps each source disk in a sparse file and restore points in the
//! server's local snapshot store (`slipway_server::backend::LocalVolumes`). On EC2
//! (`backend = "aws"`), `crates/aws` implements the same traits with one EBS volume per source
//! disk and EBS snapshots. The traits live in this small crate of their own, with no I/O and no
//! dependency but `async-trait` and `thiserror`, so that an implementation compiles against
//! them alone: `slipway-aws` never compiles the server, the server never compiles the AWS SDK,
//! and the binary wires the chosen implementation in.
//!
//! Contract shared by every implementation: a call either does what it says or returns an
//! error that leaves earlier state alone (no half-attached volume reported as usable, no
//! restore point listed before its snapshots exist).
//!
//! Architecture invariant: this crate does no I/O and depends on no other slipway crate.

use std::path::PathBuf;

use async_trait::async_trait;
use thiserror::Error;

/// Buckets of every latency histogram, backends' included: durations from 1 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Errors of a backend, as the server needs to tell them apart.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// A transient failure that survived the backend's own retries (throttling, 5xx, timeouts):
    /// try again later.
    #[error("{0}")]
    Unavailable(String),
    /// The instance has no free EBS attachment slot.
    #[error("no EBS attachment slot left on this instance ({used} of {limit} in use)")]
    NoAttachmentSlot { used: u32, limit: u32 },
    /// Too many snapshots of a volume are still pending: skip this tick.
    #[error("volume {volume_id} has {pending} pending snapshots (limit {limit})")]
    SnapshotsPending {
        volume_id: String,
        pending: u32,
        limit: u32,
    },
    /// Anything that will not get better by retrying (permissions, bad settings, missing ids).
    #[error("{0}")]
    Permanent(String),
    /// A restore point's snapshots are in use (an image registered from them, e.g. by a
    /// launch) and cannot be deleted until that is gone: keep it, try again later.
    #[error("{0}")]
    InUse(String),
    /// The restore point is kept (`slipway:keep`) and is not deleted: as the backend saw on a
    /// fresher look than the list the caller decided on.
    #[error("{0}")]
    Kept(String),
}

/// A source disk that needs a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub source: String,
    pub disk: String,
    /// Size of the source disk in bytes (a backend may round up, never down).
    pub size: u64,
}

/// A volume ready to be opened at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHandle {
    pub source: String,
    pub disk: String,
    /// Backend id (`vol-…` on AWS; the file path on the local default).
    pub volume_id: String,
    /// File or block device to open for reading and writing.
    pub path: PathBuf,
    /// Created by this call (a new, all-zero volume), as opposed to found or adopted.
    pub created: bool,
}

/// Provides one volume per source disk.
#[async_trait]
pub trait VolumeBackend: Send + Sync + 'static {
    /// `local` or `aws`, for logs and status.
    fn name(&self) -> &'static str;

    /// Called once at start, before any agent connects: finds the volumes that belong to this
    /// server (attaching them here if needed) so their disks show in status and resume.
    async fn adopt(&self) -> Result<Vec<VolumeHandle>, BackendError>;

    /// Finds, or creates and attaches, the volume of a source disk. Returns only once `path`
    /// can be opened.
    async fn ensure(&self, req: &VolumeRequest) -> Result<VolumeHandle, BackendError>;

    /// (attachment slots in use, limit), where the backend has such a limit.
    fn attachment_slots(&self) -> Option<(u32, u32)> {
        None
    }

    /// Publishes the server's TLS certificate fingerprint where operators look for the
    /// server (on EC2: the instance's `slipway:tls-fingerprint` tag), called once at start.
    /// Nothing to do for a backend without such a place.
    async fn publish_fingerprint(&self, fingerprint: &str) -> Result<(), BackendError> {
        let _ = fingerprint;
        Ok(())
    }
}

/// A restore point to fix, while every applier of the source is held at its marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub rp_id: String,
    pub source: String,
    pub marker_id: u64,
    pub created_unix_ms: u64,
    /// `scheduled` or `on_demand`.
    pub trigger: String,
    /// (disk id, volume id) of every disk of the source.
    pub volumes: Vec<(String, String)>,
}

/// A snapshot of one disk, as the backend knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSnapshot {
    pub disk: String,
    pub snapshot_id: String,
    pub volume_id: String,
    /// `pending`, `completed` or `error`.
    pub state: String,
}

/// A restore point as the backend lists it (from snapshot tags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRestorePoint {
    pub rp_id: String,
    pub source: String,
    pub created_unix_ms: u64,
    pub marker_id: u64,
    pub trigger: String,
    pub snapshots: Vec<RemoteSnapshot>,
    /// Kept whatever the PIT policy says (the `slipway:keep` tag on AWS): the server never
    /// prunes it. [`KEEP_FINALIZED`] when a finalized cutover kept it.
    pub keep: Option<String>,
}

/// [`RemoteRestorePoint::keep`] of the restore points `slipway cutover finalize` kept. A
/// source with such a restore point is finalized: replication of it has ended for good, so
/// the server refuses its agent and takes no more restore points of it.
pub const KEEP_FINALIZED: &str = "cutover-finalized";

impl RemoteRestorePoint {
    /// Kept by a finalized cutover: its source is finalized.
    pub fn finalizes(&self) -> bool {
        self.keep.as_deref() == Some(KEEP_FINALIZED)
    }
}

/// Remote snapshots (EBS). The local default needs none: its restore points are the local
/// snapshot store's.
#[async_trait]
pub trait SnapshotBackend: Send + Sync + 'static {
    /// Whether every volume can take one more snapshot now (EBS allows few pending snapshots
    /// per volume). A scheduler skips a tick on `false` rather than fail.
    async fn can_snapshot(&self, volume_ids: &[String]) -> Result<bool, BackendError>;

    /// Fixes the point in time of every volume of the request and tags the snapshots. Called
    /// while the source's appliers are held; returns once the point in time is fixed (the
    /// create calls returned), not when the snapshots complete.
    async fn create(&self, req: &SnapshotRequest) -> Result<Vec<RemoteSnapshot>, BackendError>;

    /// Restore points known to the backend, oldest first.
    async fn list(&self, source: Option<&str>) -> Result<Vec<RemoteRestorePoint>, BackendError>;

    /// Deletes every snapshot of a restore point.
    async fn delete(&self, rp_id: &str) -> Result<(), BackendError>;

    /// SHA-256 (hex) of every non-zero 512 KiB block of a snapshot, by block index (EBS direct
    /// APIs). Blocks not listed are zero.
    async fn block_hashes(&self, snapshot_id: &str) -> Result<Vec<(u64, String)>, BackendError>;

    /// Bytes that differ between two snapshots of the same volume (EBS direct APIs).
    async fn changed_bytes(&self, first: &str, second: &str) -> Result<u64, BackendError>;
}
