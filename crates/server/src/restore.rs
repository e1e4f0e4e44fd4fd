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
}

impl RestorePoints {
    pub fn new(store: SnapshotStore) -> Self {
        RestorePoints {
            store,
            locks: Mutex::new(HashMap::new()),
            next_marker: AtomicU64::new(now_ms()),
            summary: Mutex::new(HashMap::new()),
        }
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

/// A fresh restore point id: sortable by time, unique.
pub fn new_id() -> String {
    format!("rp-{:013}-{:04x}", now_ms(), rand::random::<u16>())
}

/// Releases markers, forgets the waiter and clears `creating-snapshot` on every exit path.
struct Cleanup {
    disks: Vec<Arc<OpenDisk>>,
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
    }
}

impl Inner {
    /// Why `source` cannot have a restore point now, if it cannot.
    pub(crate) fn rp_blocker(&self, source: &str) -> Option<String> {
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
            let state = slot
                .status
                .lock()
                .unwrap()
                .state(now, self.settings.stall_after);
            if state != ReplState::Continuous && state != ReplState::CreatingSnapshot {
                return Some(format!(
                    "disk {} is {} (restore points need every disk continuous)",
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
            Err(RpError::NotEligible { .. }) | Err(RpError::NotConnected(_)) => {}
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
        let marker_id = self.rp.next_marker.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        conn.markers.lock().unwrap().insert(marker_id, tx);
        let mut cleanup = Cleanup {
            disks: disks.clone(),
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
        while reached != want {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((disk, at))) => {
                    first = Some(first.map_or(at, |f| f.min(at)));
                    reached.insert(disk);
                }
                Ok(None) => return Err(RpError::Disconnected),
                Err(_) => return Err(RpError::Timeout(MARKER_TIMEOUT)),
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
        // The point in time is fixed: let the writers go.
        for (h, _) in &cleanup.captures {
            h.release_marker(marker_id);
        }
        let pause = first.map(|f| f.elapsed()).unwrap_or_default();

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
                duration_ms: started.elapsed().as_millis() as u64,
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

    /// Deletes a restore point (by an operator or the policy).
    pub(crate) async fn delete_restore_point(self: &Arc<Self>, id: &str) -> Result<u64, RpError> {
        let store = self.rp.store.clone();
        let idc = id.to_string();
        let m = tokio::task::spawn_blocking(move || store.get(&idc))
            .await
            .map_err(|e| RpError::Internal(e.to_string()))??
            .ok_or_else(|| RpError::NotFound(id.to_string()))?;
        let lock = self.rp.lock_for(&m.source);
        let _g = lock.lock().await;
        let store = self.rp.store.clone();
        let idc = id.to_string();
        let freed = tokio::task::spawn_blocking(move || store.delete(&idc))
            .await
            .map_err(|e| RpError::Internal(e.to_string()))??;
        self.metrics
            .restore_points
            .pruned
            .with_label_values(&[&m.source])
            .inc();
        let rp = self.clone();
        let src = m.source.clone();
        let _ = tokio::task::spawn_blocking(move || rp.rp.refresh(&src)).await;
        tracing::info!(source = %m.source, id, freed_bytes = freed, "restore point deleted");
        Ok(freed)
    }

    /// Prunes what the PIT policy no longer keeps.
    async fn prune(self: &Arc<Self>, source: &str) -> Result<(), RpError> {
        let store = self.rp.store.clone();
        let src = source.to_string();
        let list = tokio::task::spawn_blocking(move || store.list(Some(&src)))
            .await
            .map_err(|e| RpError::Internal(e.to_string()))??;
        let points: Vec<slipway_pit::RestorePoint> = list
            .iter()
            .map(|m| slipway_pit::RestorePoint {
                id: m.id.clone(),
                taken_at: m.created_unix_ms / 1000,
                scheduled: m.trigger == Trigger::Scheduled.as_str(),
            })
            .collect();
        for id in self.settings.pit.plan_prune(now_ms() / 1000, &points) {
            self.delete_restore_point(&id).await?;
        }
        Ok(())
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
                if self.rp_blocker(&source).is_some() {
                    continue;
                }
                let store = self.rp.store.clone();
                let src = source.clone();
                let Ok(Ok(list)) =
                    tokio::task::spawn_blocking(move || store.list(Some(&src))).await
                else {
                    continue;
                };
                let points: Vec<slipway_pit::RestorePoint> = list
                    .iter()
                    .map(|m| slipway_pit::RestorePoint {
                        id: m.id.clone(),
                        taken_at: m.created_unix_ms / 1000,
                        scheduled: m.trigger == Trigger::Scheduled.as_str(),
                    })
                    .collect();
                if self.settings.pit.due(now_ms() / 1000, &points) {
                    let _ = self
                        .take_restore_point(&source, new_id(), Trigger::Scheduled)
                        .await;
                }
                if let Err(e) = self.prune(&source).await {
                    tracing::warn!(source, error = %e, "pruning restore points failed");
                }
            }
        }
    }
}
