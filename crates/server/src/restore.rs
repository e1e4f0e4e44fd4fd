//! Restore points of the embedded default: crash-consistent across all disks of a source.
//!
//! ```text
//! request ─▶ eligible? (every disk continuous) ─▶ MarkerRequest to the agent
//!        ─▶ every disk's applier durably reaches the marker and holds
//!        ─▶ begin_capture on every disk (the point in time is fixed here) ─▶ release
//!        ─▶ read captured blocks (copy-on-write keeps them exact) ─▶ store ─▶ manifest
//! ```
//!
//! The appliers are held only between the last disk reaching the marker and the captures being
//! set up — no data is read during the pause. Everything else (hashing, storing) runs while the
//! agent keeps replicating. One restore point or prune at a time per source (a per-source lock),
//! so a sweep can never remove blocks of a restore point still being written.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slipway_proto::{Frame, MarkerRequest};
use slipway_store::applier::Capture;
use slipway_store::snapshot::{DiskShape, Manifest, SnapshotStore};
use slipway_store::StoreError;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::session::OpenDisk;
use crate::status::ReplState;
use crate::Inner;

/// How long to wait for every disk to reach a marker (the agent may finish a rescan first).
const MARKER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a prune refused because an image uses the snapshots waits before trying again.
const PRUNE_IN_USE_RETRY: Duration = Duration::from_secs(600);

#[derive(Debug, Error)]
pub enum RpError {
    /// no agent is connected for the source
    #[error("no agent is connected for source {0}")]
    NotConnected(String),
    /// the source's disks are not all continuous
    #[error("source {src} cannot have a restore point now: {reason}")]
    NotEligible { src: String, reason: String },
    /// the marker did not come back in time
    #[error("timed out after {0:?} waiting for every disk to reach the consistency marker")]
    Timeout(Duration),
    /// the agent went away mid-way
    #[error("the agent disconnected while the restore point was being taken")]
    Disconnected,
    #[error("no restore point {0}")]
    NotFound(String),
    /// The backend cannot take one now (pending snapshot limits): try a later tick.
    #[error("not now: {0}")]
    Busy(String),
    /// The snapshot requests were not accepted within `replication.max_snapshot_hold`: the
    /// writes were let go and the point fails (the scheduler tries again later).
    #[error("the snapshot requests were not accepted within {0:?} while the source's writes were held (AWS throttling?); released the writes, will retry")]
    HoldExceeded(Duration),
    /// The restore point is kept whatever the policy says (`slipway:keep`, e.g. by a
    /// finalized cutover): deleting it is refused.
    #[error("restore point {id} is kept ({keep}): remove its snapshots' slipway:keep tag first to delete it")]
    Kept { id: String, keep: String },
    /// The source's cutover was finalized: no more restore points of it.
    #[error("source {0} was finalized (cutover complete): it takes no more restore points")]
    Finalized(String),
    #[error("snapshot backend: {0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a restore point was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Scheduled,
    OnDemand,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Scheduled => "scheduled",
            Trigger::OnDemand => "on_demand",
        }
    }
}

/// (count, newest created Unix ms, stored bytes) of one source's restore points.
pub(crate) type Summary = (usize, Option<u64>, u64);

/// Restore-point state of the server.
pub(crate) struct RestorePoints {
    pub store: SnapshotStore,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    next_marker: AtomicU64,
    /// Per source, for metrics and status.
    pub summary: Mutex<HashMap<String, Summary>>,
    /// What agents said of their markers' consistency, by marker id, until a restore point
    /// takes it (only markers a restore point is waiting for are kept).
    notes: Mutex<HashMap<u64, slipway_proto::MarkerNote>>,
    notes_wake: tokio::sync::Notify,
    /// Per source: consecutive scheduled points that exceeded the hold bound, and when the
    /// scheduler may try again (5 s, 10 s, … up to 5 min), so a throttled account does not
    /// hold the source's writes at every tick.
    hold_backoff: Mutex<HashMap<String, (u32, Instant)>>,
    /// Restore points the policy prunes but whose snapshots an image uses, and when to try
    /// again: not every tick, each try costs AWS calls.
    prune_deferred: Mutex<HashMap<String, Instant>>,
}

impl RestorePoints {
    pub fn new(store: SnapshotStore) -> Self {
        RestorePoints {
            store,
            locks: Mutex::new(HashMap::new()),
            next_marker: AtomicU64::new(now_ms()),
            summary: Mutex::new(HashMap::new()),
            notes: Mutex::new(HashMap::new()),
            notes_wake: tokio::sync::Notify::new(),
            hold_backoff: Mutex::new(HashMap::new()),
            prune_deferred: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the scheduler waits before trying `source` again after points that exceeded
    /// the hold bound.
    fn backing_off(&self, source: &str, now: Instant) -> bool {
        self.hold_backoff
            .lock()
            .unwrap()
            .get(source)
            .is_some_and(|(_, until)| now < *until)
    }

    /// Notes the outcome of a scheduled point for the hold backoff.
    fn note_hold(&self, source: &str, exceeded: bool, now: Instant) {
        let mut b = self.hold_backoff.lock().unwrap();
        if !exceeded {
            b.remove(source);
            return;
        }
        let e = b.entry(source.to_string()).or_insert((0, now));
        e.0 = e.0.saturating_add(1);
        let wait = Duration::from_secs(5)
            .saturating_mul(1 << e.0.saturating_sub(1).min(6))
            .min(Duration::from_secs(300));
        e.1 = now + wait;
    }

    pub fn lock_for(&self, source: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(source.to_string())
            .or_default()
            .clone()
    }

    /// Recomputes the summary of one source from the store (blocking).
    pub fn refresh(&self, source: &str) -> Result<(), StoreError> {
        let list = self.store.list(Some(source))?;
        let stored = self.store.stored_bytes(source);
        self.summary.lock().unwrap().insert(
            source.to_string(),
            (list.len(), list.last().map(|m| m.created_unix_ms), stored),
        );
        Ok(())
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RestorePoints {
    /// Keeps an agent's note on marker `n.marker_id`, if a restore point of this connection
    /// waits for that marker (`pending`); anything else is dropped, so a peer cannot grow it.
    pub(crate) fn note(&self, n: slipway_proto::MarkerNote, pending: bool) {
        if pending {
            let mut notes = self.notes.lock().unwrap();
            // Notes of restore points that failed after their note came are never taken:
            // keep the map small (a handful of points are ever in flight).
            if notes.len() >= 256 {
                notes.clear();
            }
            notes.insert(n.marker_id, n);
            drop(notes);
            self.notes_wake.notify_waiters();
        }
    }

    /// The note on `marker_id`, waiting up to `limit` for it.
    async fn take_note(
        &self,
        marker_id: u64,
        limit: Duration,
    ) -> Option<slipway_proto::MarkerNote> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let wake = self.notes_wake.notified();
            if let Some(n) = self.notes.lock().unwrap().remove(&marker_id) {
                return Some(n);
            }
            if tokio::time::timeout_at(deadline, wake).await.is_err() {
                return None;
            }
        }
    }
}

/// The manifest's record of how consistent a point is.
fn consistency_label(n: &slipway_proto::MarkerNote) -> String {
    if n.one_instant {
        "one-instant".into()
    } else {
        format!("crash-consistent-best-effort: {}", n.reason)
    }
}

/// A fresh restore point id: sortable by time, unique.
pub fn new_id() -> String {
    format!("rp-{:013}-{:04x}", now_ms(), rand::random::<u16>())
}

/// Releases markers, forgets the waiter and clears `creating-snapshot` on every exit path;
/// lets go of the disks' leases last, once the captures have ended.
struct Cleanup {
    disks: Vec<Arc<OpenDisk>>,
    /// A share of each disk's lease for the whole of the restore point: if the agent
    /// reconnects meanwhile, its new session cannot open the disk for writing (and change the
    /// volume under a capture that still reads it) until this restore point is done.
    leases: Vec<Arc<tokio::sync::OwnedMutexGuard<()>>>,
    conn_markers: crate::session::MarkerRouter,
    marker_id: u64,
    captures: Vec<(slipway_store::ApplierHandle, Arc<Capture>)>,
    ok: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.conn_markers.lock().unwrap().remove(&self.marker_id);
        for (h, cap) in &self.captures {
            h.end_capture(cap, self.ok);
        }
        for d in &self.disks {
            if let Some(h) = d.handle_cell.lock().unwrap().clone() {
                h.release_marker(self.marker_id);
            }
            d.slot.status.lock().unwrap().creating_snapshot = false;
        }
        // The captures have ended above: now a new session may open the disks.
        self.leases.clear();
    }
}

impl Inner {
    /// Why `source` cannot have a restore point now, if it cannot.
    pub(crate) fn rp_blocker(&self, source: &str) -> Option<String> {
        if self.is_finalized(source) {
            return Some(
                "it was finalized (cutover complete): it takes no more restore points".into(),
            );
        }
        let conn = self
            .sessions
            .lock()
            .unwrap()
            .get(source)
            .map(|(_, c)| c.clone());
        let Some(conn) = conn else {
            return Some("no agent is connected".into());
        };
        let open: HashSet<String> = conn
            .disks
            .lock()
            .unwrap()
            .values()
            .map(|d| d.slot.disk.clone())
            .collect();
        if open.is_empty() {
            return Some("the agent has not opened any disk".into());
        }
        let now = Instant::now();
        for slot in self.disks.lock().unwrap().values() {
            if slot.source != source {
                continue;
            }
            if !open.contains(&slot.disk) {
                return Some(format!("disk {} is not open", slot.disk));
            }
            let (state, synced) = {
                let st = slot.status.lock().unwrap();
                (st.state(now, self.settings.stall_after), st.synced)
            };
            // A disk in backlog has a whole copy (synced) and its agent is in follow mode,
            // sending changes: the marker path reads every change made before the marker
            // first, so a source that never stops writing still gets restore points.
            let ok = matches!(state, ReplState::Continuous | ReplState::CreatingSnapshot)
                || (state == ReplState::Backlog && synced);
            if !ok {
                return Some(format!(
                    "disk {} is {} (restore points need every disk continuous, or in backlog after a whole copy)",
                    slot.disk,
                    state.as_str()
                ));
            }
        }
        None
    }

    /// Takes a restore point of `source` with the given id.
    pub(crate) async fn take_restore_point(
        self: &Arc<Self>,
        source: &str,
        id: String,
        trigger: Trigger,
    ) -> Result<Manifest, RpError> {
        if self.is_finalized(source) {
            return Err(RpError::Finalized(source.to_string()));
        }
        let lock = self.rp.lock_for(source);
        let _guard = lock.lock().await;
        let started = Instant::now();
        let result = self.take_locked(source, id, trigger, started).await;
        let m = &self.metrics.restore_points;
        match &result {
            Ok(man) => {
                m.taken.with_label_values(&[source, trigger.as_str()]).inc();
                m.snapshot_seconds
                    .with_label_values(&[source])
                    .observe(started.elapsed().as_secs_f64());
                m.pause_seconds.observe(man.pause_ms as f64 / 1000.0);
                tracing::info!(
                    source, id = %man.id, trigger = trigger.as_str(), size_bytes = man.size_bytes,
                    pause_ms = man.pause_ms, duration_ms = man.duration_ms, "restore point taken"
                );
            }
            Err(RpError::NotEligible { .. })
            | Err(RpError::NotConnected(_))
            | Err(RpError::Finalized(_))
            | Err(RpError::Busy(_)) => {}
            Err(e) => {
                m.failed.with_label_values(&[source]).inc();
                tracing::warn!(source, error = %e, "restore point failed");
            }
        }
        let rp = self.clone();
        let src = source.to_string();
        let _ = tokio::task::spawn_blocking(move || rp.rp.refresh(&src)).await;
        result
    }

    async fn take_locked(
        self: &Arc<Self>,
        source: &str,
        id: String,
        trigger: Trigger,
        started: Instant,
    ) -> Result<Manifest, RpError> {
        if let Some(reason) = self.rp_blocker(source) {
            return Err(RpError::NotEligible {
                src: source.into(),
                reason,
            });
        }
        let conn = self
            .sessions
            .lock()
            .unwrap()
            .get(source)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| RpError::NotConnected(source.into()))?;
        let disks: Vec<Arc<OpenDisk>> = conn.disks.lock().unwrap().values().cloned().collect();
        let volumes: Vec<(String, String)> = disks
            .iter()
            .map(|d| (d.slot.disk.clone(), d.volume_id.clone()))
            .collect();
        if let Some(sb) = &self.snapshots {
            let ids: Vec<String> = volumes.iter().map(|v| v.1.clone()).collect();
            match sb.can_snapshot(&ids).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(RpError::Busy(
                        "a volume has too many pending snapshots".into(),
                    ))
                }
                Err(crate::backend::BackendError::SnapshotsPending {
                    volume_id,
                    pending,
                    limit,
                }) => {
                    return Err(RpError::Busy(format!(
                        "volume {volume_id} has {pending} pending snapshots (limit {limit})"
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let leases = disks
            .iter()
            .map(|d| d.lease.lock().unwrap().clone())
            .collect::<Option<Vec<_>>>()
            .ok_or(RpError::Disconnected)?;
        let marker_id = self.rp.next_marker.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        conn.markers.lock().unwrap().insert(marker_id, tx);
        let mut cleanup = Cleanup {
            disks: disks.clone(),
            leases,
            conn_markers: conn.markers.clone(),
            marker_id,
            captures: vec![],
            ok: false,
        };
        for d in &disks {
            d.slot.status.lock().unwrap().creating_snapshot = true;
        }
        conn.ctl_tx
            .send(Frame::MarkerRequest(MarkerRequest { marker_id }))
            .map_err(|_| RpError::Disconnected)?;

        // Wait until every disk durably reached the marker; each writer now holds.
        let want: HashSet<String> = disks.iter().map(|d| d.slot.disk.clone()).collect();
        let mut reached = HashSet::new();
        let mut first: Option<Instant> = None;
        let deadline = tokio::time::Instant::now() + MARKER_TIMEOUT;
        // A connection that goes away ends the wait at once: its markers will never arrive,
        // and the shares of the leases held here would keep its successor out until the
        // timeout.
        while !want.is_subset(&reached) {
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.recv()) => match r {
                    Ok(Some((disk, at))) => {
                        first = Some(first.map_or(at, |f| f.min(at)));
                        reached.insert(disk);
                    }
                    Ok(None) => return Err(RpError::Disconnected),
                    Err(_) => return Err(RpError::Timeout(MARKER_TIMEOUT)),
                },
                _ = conn.closed() => return Err(RpError::Disconnected),
            }
        }
        let created_unix_ms = now_ms();

        let store = self.rp.store.clone();
        let src = source.to_string();
        let parent = tokio::task::spawn_blocking(move || store.newest(&src))
            .await
            .map_err(|e| RpError::Internal(e.to_string()))??;
        let parent_id = parent.as_ref().map(|p| p.id.clone());
        for d in &disks {
            let h = d
                .handle_cell
                .lock()
                .unwrap()
                .clone()
                .ok_or(RpError::Disconnected)?;
            let cap = h.begin_capture(parent_id.as_deref(), &id);
            cleanup.captures.push((h, cap));
        }
        // Remote snapshots are fixed while the writers hold (EBS: when the create calls are
        // accepted). The requests (and the SDK's retries of them) may take at most
        // `max_snapshot_hold`; past it the writes are let go and the point fails: whatever
        // the abandoned requests created is deleted once the writers run again.
        let remote: Vec<slipway_store::snapshot::RemoteRef> = match &self.snapshots {
            Some(sb) => {
                let req = crate::backend::SnapshotRequest {
                    rp_id: id.clone(),
                    source: source.to_string(),
                    marker_id,
                    created_unix_ms,
                    trigger: trigger.as_str().to_string(),
                    volumes: volumes.clone(),
                };
                let hold = self.settings.max_snapshot_hold;
                match tokio::time::timeout(hold, sb.create(&req)).await {
                    Ok(made) => made?
                        .into_iter()
                        .map(|r| slipway_store::snapshot::RemoteRef {
                            disk: r.disk,
                            snapshot_id: r.snapshot_id,
                            volume_id: r.volume_id,
                        })
                        .collect(),
                    Err(_) => {
                        // Twice: a request already on its way may still be accepted, at the
                        // latest when its attempt times out (60 s), after the first pass.
                        let (sb, rp) = (sb.clone(), id.clone());
                        tokio::spawn(async move {
                            for pass in 0..2 {
                                if pass > 0 {
                                    tokio::time::sleep(Duration::from_secs(65)).await;
                                }
                                if let Err(e) = sb.delete(&rp).await {
                                    tracing::warn!(rp, error = %e, "cannot delete the snapshots of an abandoned restore point; the PIT prune will");
                                }
                            }
                        });
                        return Err(RpError::HoldExceeded(hold));
                    }
                }
            }
            None => vec![],
        };
        // The point in time is fixed: let the writers go.
        for (h, _) in &cleanup.captures {
            h.release_marker(marker_id);
        }
        let pause = first.map(|f| f.elapsed()).unwrap_or_default();
        // Replication goes on while the capture is read: the disks are continuous again.
        for d in &disks {
            d.slot.status.lock().unwrap().creating_snapshot = false;
        }

        // The agent says how consistent the point is (it froze the source, or could not), on
        // the control stream, ahead of the marker; an agent that does not is best-effort.
        let consistency = if conn.marker_notes {
            self.rp
                .take_note(marker_id, Duration::from_secs(2))
                .await
                .map(|n| consistency_label(&n))
        } else {
            None
        };
        self.rp.notes.lock().unwrap().remove(&marker_id);
        let jobs: Vec<(String, u64, u32, Arc<Capture>)> = disks
            .iter()
            .zip(&cleanup.captures)
            .map(|(d, (_, cap))| {
                let st = d.slot.status.lock().unwrap();
                (d.slot.disk.clone(), st.size, st.block_size, cap.clone())
            })
            .collect();
        let store = self.rp.store.clone();
        let src = source.to_string();
        let trig = trigger.as_str().to_string();
        let man = tokio::task::spawn_blocking(move || -> Result<Manifest, StoreError> {
            slipway_store::failpoint_pause("capture-before-read");
            let mut out = vec![];
            for (disk, size, block_size, cap) in jobs {
                let pd = parent.as_ref().and_then(|p| p.disk(&disk));
                let dm = store.build_disk(
                    &src,
                    DiskShape {
                        id: &disk,
                        size,
                        block_size,
                    },
                    if cap.full { None } else { pd },
                    |b| cap.is_changed(b),
                    |b| cap.take(b),
                )?;
                out.push(dm);
            }
            let m = Manifest {
                format: 1,
                id,
                source: src,
                created_unix_ms,
                marker_id,
                trigger: trig,
                parent: parent.as_ref().map(|p| p.id.clone()),
                size_bytes: out.iter().map(|d| d.stored_bytes).sum(),
                disks: out,
                pause_ms: pause.as_millis() as u64,
                remote,
                duration_ms: started.elapsed().as_millis() as u64,
                consistency,
            };
            slipway_store::failpoint("snapshot-before-manifest");
            store.commit(&m)?;
            Ok(m)
        })
        .await
        .map_err(|e| RpError::Internal(e.to_string()))??;
        cleanup.ok = true;
        Ok(man)
    }

    /// Deletes a restore point (by an operator or the policy): its remote snapshots first, then
    /// the manifest, then blocks no other restore point needs.
    pub(crate) async fn delete_restore_point(self: &Arc<Self>, id: &str) -> Result<u64, RpError> {
        let store = self.rp.store.clone();
        let idc = id.to_string();
        let local = tokio::task::spawn_blocking(move || store.get(&idc))
            .await
            .map_err(|e| RpError::Internal(e.to_string()))??;
        let remote = match &self.snapshots {
            Some(sb) => sb.list(None).await?.into_iter().find(|r| r.rp_id == id),
            None => None,
        };
        if let Some(keep) = remote.as_ref().and_then(|r| r.keep.clone()) {
            return Err(RpError::Kept {
                id: id.to_string(),
                keep,
            });
        }
        let source = match (&local, &remote) {
            (Some(m), _) => m.source.clone(),
            (None, Some(r)) => r.source.clone(),
            (None, None) => return Err(RpError::NotFound(id.to_string())),
        };
        let lock = self.rp.lock_for(&source);
        let _g = lock.lock().await;
        if let (Some(sb), Some(_)) = (&self.snapshots, &remote) {
            sb.delete(id).await?;
        }
        let mut freed = 0;
        if local.is_some() {
            let store = self.rp.store.clone();
            let idc = id.to_string();
            freed = tokio::task::spawn_blocking(move || store.delete(&idc))
                .await
                .map_err(|e| RpError::Internal(e.to_string()))??;
        }
        self.metrics
            .restore_points
            .pruned
            .with_label_values(&[&source])
            .inc();
        let rp = self.clone();
        let src = source.clone();
        let _ = tokio::task::spawn_blocking(move || rp.rp.refresh(&src)).await;
        tracing::info!(%source, id, freed_bytes = freed, "restore point deleted");
        Ok(freed)
    }

    /// Restore points of a source for the policy: local manifests, plus (with remote
    /// snapshots) restore points only the backend still knows. A kept one (`slipway:keep`)
    /// is outside the policy: it neither fills a slot nor is ever pruned.
    async fn policy_points(
        self: &Arc<Self>,
        source: &str,
    ) -> Result<Vec<slipway_pit::RestorePoint>, RpError> {
        let remote = match &self.snapshots {
            Some(sb) => sb.list(Some(source)).await?,
            None => Vec::new(),
        };
        let store = self.rp.store.clone();
        let src = source.to_string();
        let list = tokio::task::spawn_blocking(move || store.list(Some(&src)))
            .await
            .map_err(|e| RpError::Internal(e.to_string()))??;
        let local: Vec<(String, u64, String)> = list
            .into_iter()
            .map(|m| (m.id, m.created_unix_ms, m.trigger))
            .collect();
        let points = policy_view(&local, &remote);
        Ok(points)
    }

    /// `restore-points list --json` entries, with remote snapshot states and the changed bytes
    /// between consecutive restore points where the backend can tell.
    pub(crate) async fn list_restore_points(
        self: &Arc<Self>,
        source: Option<String>,
    ) -> Result<Vec<serde_json::Value>, RpError> {
        let store = self.rp.store.clone();
        let src = source.clone();
        let list = tokio::task::spawn_blocking(move || store.list(src.as_deref()))
            .await
            .map_err(|e| RpError::Internal(e.to_string()))??;
        let mut out: Vec<serde_json::Value> = list.iter().map(manifest_json).collect();
        if let Some(sb) = &self.snapshots {
            let remote = sb.list(source.as_deref()).await?;
            for v in out.iter_mut() {
                let id = v["id"].as_str().unwrap_or_default().to_string();
                let r = remote.iter().find(|r| r.rp_id == id);
                v["snapshots"] = serde_json::json!(r.map(|r| r
                    .snapshots
                    .iter()
                    .map(|s| serde_json::json!({"disk": s.disk, "snapshot_id": s.snapshot_id, "state": s.state}))
                    .collect::<Vec<_>>()));
                v["keep"] = serde_json::json!(r.and_then(|r| r.keep.clone()));
            }
            // Changed bytes between consecutive restore points of the same disk.
            for pair in list.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                if a.source != b.source {
                    continue;
                }
                let mut total = 0;
                for rb in &b.remote {
                    if let Some(ra) = a.remote.iter().find(|x| x.disk == rb.disk) {
                        if let Ok(n) = sb.changed_bytes(&ra.snapshot_id, &rb.snapshot_id).await {
                            total += n;
                        }
                    }
                }
                if let Some(v) = out.iter_mut().find(|v| v["id"] == b.id) {
                    v["changed_bytes"] = serde_json::json!(total);
                }
            }
            for r in remote
                .iter()
                .filter(|r| !list.iter().any(|m| m.id == r.rp_id))
            {
                out.push(serde_json::json!({
                    "id": r.rp_id,
                    "source": r.source,
                    "created_at": rfc3339(r.created_unix_ms),
                    "created_unix_ms": r.created_unix_ms,
                    "trigger": r.trigger,
                    "parent": null,
                    "marker_id": r.marker_id,
                    "size_bytes": null,
                    "disks": r.snapshots.iter().map(|s| serde_json::json!({"id": s.disk})).collect::<Vec<_>>(),
                    "snapshots": r.snapshots.iter().map(|s| serde_json::json!({"disk": s.disk, "snapshot_id": s.snapshot_id, "state": s.state})).collect::<Vec<_>>(),
                    "manifest": false,
                    "keep": r.keep,
                }));
            }
        }
        Ok(out)
    }

    /// Checks every block of a restore point against its manifest: the local blocks, or the
    /// remote snapshots' blocks through the backend.
    pub(crate) async fn verify_restore_point(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<slipway_store::snapshot::VerifyReport, RpError> {
        let store = self.rp.store.clone();
        let idc = id.to_string();
        let m = tokio::task::spawn_blocking(move || store.get(&idc))
            .await
            .map_err(|e| RpError::Internal(e.to_string()))??
            .ok_or_else(|| RpError::NotFound(id.to_string()))?;
        let Some(sb) = &self.snapshots else {
            let store = self.rp.store.clone();
            return tokio::task::spawn_blocking(move || store.verify(&m))
                .await
                .map_err(|e| RpError::Internal(e.to_string()));
        };
        let mut r = slipway_store::snapshot::VerifyReport::default();
        for d in &m.disks {
            let Some(rr) = m.remote.iter().find(|x| x.disk == d.id) else {
                r.problems
                    .push(format!("disk {}: no remote snapshot recorded", d.id));
                continue;
            };
            let remote: HashMap<u64, String> = sb
                .block_hashes(&rr.snapshot_id)
                .await?
                .into_iter()
                .collect();
            for (b, want) in d.blocks.iter().enumerate() {
                let got = remote.get(&(b as u64));
                let ok = match (want.as_str(), got) {
                    (slipway_store::snapshot::ZERO, None) => true,
                    (slipway_store::snapshot::ZERO, Some(h)) => {
                        h == &zero_block_hash(d.size, b as u64)
                    }
                    (w, Some(h)) => w == h,
                    (_, None) => false,
                };
                if ok {
                    r.blocks_checked += 1;
                } else {
                    r.problems.push(format!(
                        "disk {} block {b}: snapshot {} has {}, manifest says {want}",
                        d.id,
                        rr.snapshot_id,
                        got.map(String::as_str).unwrap_or("no block")
                    ));
                }
            }
        }
        Ok(r)
    }

    /// Prunes what the PIT policy no longer keeps.
    /// A restore point whose snapshots are in use (an image registered from them by a
    /// launch) is skipped, counted, and tried again 10 minutes later; one that fails otherwise
    /// does not stop the others.
    async fn prune(self: &Arc<Self>, source: &str) -> Result<(), RpError> {
        let points = self.policy_points(source).await?;
        let now = Instant::now();
        for id in self.settings.pit.plan_prune(now_ms() / 1000, &points) {
            if self
                .rp
                .prune_deferred
                .lock()
                .unwrap()
                .get(&id)
                .is_some_and(|until| now < *until)
            {
                continue;
            }
            match self.delete_restore_point(&id).await {
                Ok(_) => {
                    self.rp.prune_deferred.lock().unwrap().remove(&id);
                }
                Err(RpError::Backend(
                    crate::backend::BackendError::InUse(why)
                    | crate::backend::BackendError::Kept(why),
                )) => {
                    self.metrics
                        .restore_points
                        .prune_deferred
                        .with_label_values(&[source])
                        .inc();
                    tracing::info!(source, id, reason = %why, "restore point in use; pruning it later");
                    self.rp
                        .prune_deferred
                        .lock()
                        .unwrap()
                        .insert(id, now + PRUNE_IN_USE_RETRY);
                }
                Err(e) => {
                    tracing::warn!(source, id, error = %e, "pruning a restore point failed");
                }
            }
        }
        Ok(())
    }

    /// Whether the source's cutover was finalized (as of the scheduler's last look).
    pub(crate) fn is_finalized(&self, source: &str) -> bool {
        self.finalized.lock().unwrap().contains(source)
    }

    /// Learns which sources a finalized cutover ended (a restore point of theirs kept as
    /// [`slipway_backend::KEEP_FINALIZED`]; `slipway cutover finalize` tags it) from the
    /// backend's restore-point list, which the AWS backend answers from its one batched,
    /// cached describe: no extra API call. A newly finalized source's connection is closed
    /// with the reason, as a refusal the agent does not retry; its hellos are refused from
    /// then on (`session.rs`), and the scheduler takes no more restore points of it.
    async fn refresh_finalized(self: &Arc<Self>) {
        let Some(sb) = &self.snapshots else {
            return;
        };
        let list = match sb.list(None).await {
            Ok(l) => l,
            // Keep the last answer (the AWS backend already retries with backoff).
            Err(_) => return,
        };
        let now: std::collections::BTreeSet<String> = list
            .iter()
            .filter(|r| r.finalizes())
            .map(|r| r.source.clone())
            .collect();
        let (all, changed) = {
            let mut f = self.finalized.lock().unwrap();
            for source in now.difference(&f) {
                tracing::warn!(%source, "source finalized (cutover complete): replication of it ends here");
            }
            // The tags are the record: an operator who removes the keep tag (a finalize
            // by mistake) lets the source's agent back in.
            let changed = *f != now;
            *f = now;
            self.metrics.sources_finalized.set(f.len() as i64);
            (f.clone(), changed)
        };
        if changed {
            // Kept in the data dir as well, so that a restarted server refuses a finalized
            // source from its first hello, before (or without) a successful listing.
            let path = finalized_path(&self.settings.data_dir);
            let text: String = all.iter().map(|s| format!("{s}\n")).collect();
            let r = tokio::task::spawn_blocking(move || {
                slipway_store::fsutil::write_atomic(&path, text.as_bytes(), 0o600)
            })
            .await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::warn!(result = ?r, "saving the finalized sources failed; they are refused until the server restarts, and again once it lists the restore points");
            }
        }
        // Every tick, not only when a source is newly seen: a hello checked just before the
        // set grew may register its session after this look.
        let conns: Vec<Arc<crate::session::Conn>> = self
            .sessions
            .lock()
            .unwrap()
            .iter()
            .filter(|(source, _)| all.contains(*source))
            .map(|(_, (_, c))| c.clone())
            .collect();
        for c in conns {
            tracing::warn!(source = %c.source, "closing the connection of a finalized source");
            c.close(
                crate::session::CLOSE_UNAUTHORIZED,
                finalized_refusal(&c.source).as_bytes(),
            );
        }
    }

    /// Looks for finalized sources once a second ([`Self::refresh_finalized`]), on its own
    /// task: a scheduler pass slowed by AWS (a throttled snapshot, a long prune) does not
    /// delay it.
    pub(crate) async fn watch_finalized(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.refresh_finalized().await;
        }
    }

    /// The snapshot scheduler: takes scheduled restore points when the policy says so and
    /// prunes what it no longer keeps. Ticks once a second; decisions come from `slipway-pit`.
    pub(crate) async fn schedule(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let sources: Vec<String> = self.sessions.lock().unwrap().keys().cloned().collect();
            for source in sources {
                if self.is_finalized(&source) || self.rp_blocker(&source).is_some() {
                    continue;
                }
                let Ok(points) = self.policy_points(&source).await else {
                    continue;
                };
                if self.settings.pit.due(now_ms() / 1000, &points)
                    && !self.rp.backing_off(&source, Instant::now())
                {
                    let r = self
                        .take_restore_point(&source, new_id(), Trigger::Scheduled)
                        .await;
                    self.rp.note_hold(
                        &source,
                        matches!(r, Err(RpError::HoldExceeded(_))),
                        Instant::now(),
                    );
                }
                if let Err(e) = self.prune(&source).await {
                    tracing::warn!(source, error = %e, "pruning restore points failed");
                }
            }
        }
    }
}

/// What the PIT policy sees of a source's restore points: the local manifests (id, created
/// ms, trigger), plus restore points only the backend still lists, minus every kept one
/// (`slipway:keep`): a kept point fills no slot of the policy and is never planned for
/// pruning. Pure.
pub(crate) fn policy_view(
    local: &[(String, u64, String)],
    remote: &[crate::backend::RemoteRestorePoint],
) -> Vec<slipway_pit::RestorePoint> {
    let kept: HashSet<&str> = remote
        .iter()
        .filter(|r| r.keep.is_some())
        .map(|r| r.rp_id.as_str())
        .collect();
    let mut points: Vec<slipway_pit::RestorePoint> = local
        .iter()
        .filter(|(id, _, _)| !kept.contains(id.as_str()))
        .map(|(id, ms, trigger)| slipway_pit::RestorePoint {
            id: id.clone(),
            taken_at: ms / 1000,
            scheduled: trigger == Trigger::Scheduled.as_str(),
        })
        .collect();
    for r in remote {
        if r.keep.is_none() && !points.iter().any(|p| p.id == r.rp_id) {
            points.push(slipway_pit::RestorePoint {
                id: r.rp_id.clone(),
                taken_at: r.created_unix_ms / 1000,
                scheduled: r.trigger == Trigger::Scheduled.as_str(),
            });
        }
    }
    points
}

/// `DATA_DIR/finalized-sources`: the finalized sources as last listed, one id per line.
pub(crate) fn finalized_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("finalized-sources")
}

/// The finalized sources saved by the last run (none if the file does not exist).
pub(crate) fn load_finalized(
    data_dir: &std::path::Path,
) -> std::io::Result<std::collections::BTreeSet<String>> {
    match std::fs::read_to_string(finalized_path(data_dir)) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e),
    }
}

/// What an agent of a finalized source is told (on the refusal of its hello, and as the reason
/// its connection is closed): the agent stops instead of reconnecting.
pub(crate) fn finalized_refusal(source: &str) -> String {
    format!(
        "source {source} was finalized (cutover complete): replication of it has ended; stop and remove its agent"
    )
}

/// SHA-256 of an all-zero block of the length block `b` has on a disk of `size` bytes.
fn zero_block_hash(size: u64, b: u64) -> String {
    use sha2::Digest;
    let len = (size - b * slipway_store::changes::BLOCK).min(slipway_store::changes::BLOCK);
    hex::encode(sha2::Sha256::digest(vec![0u8; len as usize]))
}

pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A restore point as `restore-points list --json` shows it.
pub fn manifest_json(m: &Manifest) -> serde_json::Value {
    serde_json::json!({
        "id": m.id,
        "source": m.source,
        "created_at": rfc3339(m.created_unix_ms),
        "created_unix_ms": m.created_unix_ms,
        "trigger": m.trigger,
        "parent": m.parent,
        "marker_id": m.marker_id,
        "size_bytes": m.size_bytes,
        "pause_ms": m.pause_ms,
        "duration_ms": m.duration_ms,
        "consistency": m.consistency.as_deref().unwrap_or("crash-consistent-best-effort: the agent did not say"),
        "disks": m.disks.iter().map(|d| serde_json::json!({
            "id": d.id,
            "size_bytes": d.size,
            "stored_bytes": d.stored_bytes,
            "scanned_blocks": d.scanned_blocks,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod hold_tests {
    use super::*;

    #[test]
    fn points_over_the_hold_bound_back_off_doubling_to_five_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let rp = RestorePoints::new(SnapshotStore::new(dir.path().join("s")));
        let t0 = Instant::now();
        assert!(!rp.backing_off("web", t0));
        let mut waits = vec![];
        for _ in 0..8 {
            rp.note_hold("web", true, t0);
            let until = rp.hold_backoff.lock().unwrap()["web"].1;
            waits.push((until - t0).as_secs());
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert!(rp.backing_off("web", t0 + Duration::from_secs(299)));
        assert!(!rp.backing_off("db", t0));
        rp.note_hold("web", false, t0);
        assert!(!rp.backing_off("web", t0));
    }

    fn remote(id: &str, ms: u64, keep: Option<&str>) -> crate::backend::RemoteRestorePoint {
        crate::backend::RemoteRestorePoint {
            rp_id: id.into(),
            source: "web".into(),
            created_unix_ms: ms,
            marker_id: 1,
            trigger: "scheduled".into(),
            snapshots: vec![],
            keep: keep.map(str::to_string),
        }
    }

    #[test]
    fn kept_restore_points_are_outside_the_policy() {
        let local = vec![
            ("rp-a".to_string(), 1_000, "scheduled".to_string()),
            ("rp-b".to_string(), 2_000, "on_demand".to_string()),
            ("rp-c".to_string(), 3_000, "scheduled".to_string()),
        ];
        let remote = vec![
            remote("rp-a", 1_000, Some(slipway_backend::KEEP_FINALIZED)),
            remote("rp-b", 2_000, None),
            remote("rp-c", 3_000, None),
            // Listed by the backend only (its manifest is gone), one of them kept.
            remote("rp-d", 4_000, None),
            remote("rp-e", 5_000, Some("audit")),
        ];
        let ids: Vec<(String, u64, bool)> = policy_view(&local, &remote)
            .into_iter()
            .map(|p| (p.id, p.taken_at, p.scheduled))
            .collect();
        assert_eq!(
            ids,
            [
                ("rp-b".to_string(), 2, false),
                ("rp-c".to_string(), 3, true),
                ("rp-d".to_string(), 4, true),
            ]
        );
        // Nothing kept, nothing left out.
        assert_eq!(policy_view(&local, &[]).len(), 3);
    }
}
