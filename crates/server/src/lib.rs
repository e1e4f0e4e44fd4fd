//! The Slipway replication server: the async shell around `slipway-proto` and `slipway-store`.
//!
//! ```text
//! quinn endpoint ─▶ session (one per agent connection)
//!                     ├─ control stream: hello, disk open, progress, heartbeats
//!                     └─ one stream per disk: validated writes ─▶ Applier (store) ─▶ durable acks
//! admin.sock (status, restore points)    /metrics, /healthz (HTTP)
//! ```
//!
//! What lives here is wiring and policy: who may open which disk (auth), how much memory a
//! connection may pin (back-pressure), how fast the server reads (throttle), and what state a
//! disk is in (status). Durability itself is the store's job; this crate only forwards the
//! store's durable positions as acks and never invents one.

pub mod admin;
pub mod auth;
pub mod backend;
mod http;
pub mod metrics;
pub mod restore;
pub mod rules;
mod session;
/// The settings are `slipway-settings`' (the replication templates render and validate them
/// without compiling the server); re-exported under their old path.
pub use slipway_settings as settings;
pub mod status;
mod throttle;
mod windows;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{watch, Semaphore};

use crate::auth::TokenKey;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::status::{DiskReport, DiskStatus, SourceReport, StatusReport};
use crate::throttle::Throttle;

pub use settings::SettingsError;

/// Why the server could not start or had to stop.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("data dir {0} is in use by another slipway server")]
    Locked(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] slipway_net::tls::TlsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Store(#[from] slipway_store::StoreError),
    #[error("volume backend: {0}")]
    Backend(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// Where the running server can be reached, reported once it is ready.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ready {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub fingerprint: String,
    pub tls_generated: bool,
    pub data_dir: PathBuf,
}

/// One source disk known to the server (connected or not).
pub(crate) struct DiskSlot {
    pub source: String,
    pub disk: String,
    /// Held by the session that has the disk open; a new session waits for the old one to
    /// finish flushing before it may open the disk.
    pub lease: Arc<tokio::sync::Mutex<()>>,
    pub status: Mutex<DiskStatus>,
}

/// The revocation list as last read, with the file's modification time and length.
#[derive(Default)]
pub(crate) struct RevokedCache {
    stamp: Option<(std::time::SystemTime, u64)>,
    pub list: auth::Revoked,
}

pub(crate) struct Inner {
    pub settings: Settings,
    pub metrics: Metrics,
    pub token_key: TokenKey,
    /// Revoked token ids, reread when `DATA_DIR/tls/revoked-tokens` changes.
    pub revoked: Mutex<RevokedCache>,
    pub fingerprint: String,
    pub started: Instant,
    pub disks: Mutex<BTreeMap<(String, String), Arc<DiskSlot>>>,
    /// Live connection per source, with a generation so a late cleanup does not evict its
    /// successor.
    pub sessions: Mutex<HashMap<String, (u64, Arc<session::Conn>)>>,
    pub next_session: AtomicU64,
    pub throttle: Option<Throttle>,
    /// Server-wide budget of received-but-not-yet-written payload bytes.
    pub memory: Arc<Semaphore>,
    /// QUIC receive windows: `quic.receive_memory` shared by the live connections.
    pub windows: Arc<windows::Windows>,
    shutting_down: AtomicBool,
    pub shutdown: watch::Receiver<bool>,
    pub rp: restore::RestorePoints,
    pub volumes: Arc<dyn backend::VolumeBackend>,
    pub snapshots: Option<Arc<dyn backend::SnapshotBackend>>,
    /// Sources whose cutover was finalized (`restore::Inner::refresh_finalized`): refused.
    pub finalized: Mutex<std::collections::BTreeSet<String>>,
}

impl Inner {
    pub fn volume_dir(&self, source: &str) -> PathBuf {
        self.settings.data_dir.join("volumes").join(source)
    }

    pub fn changes_path(&self, source: &str, disk: &str) -> PathBuf {
        self.volume_dir(source).join(format!("{disk}.changes"))
    }

    pub fn meta_path(&self, source: &str, disk: &str) -> PathBuf {
        self.volume_dir(source).join(format!("{disk}.meta.json"))
    }

    pub fn slot(&self, source: &str, disk: &str, size: u64, block_size: u32) -> Arc<DiskSlot> {
        let mut g = self.disks.lock().unwrap();
        g.entry((source.to_string(), disk.to_string()))
            .or_insert_with(|| {
                Arc::new(DiskSlot {
                    source: source.into(),
                    disk: disk.into(),
                    lease: Arc::new(tokio::sync::Mutex::new(())),
                    status: Mutex::new(DiskStatus::new(size, block_size, Instant::now())),
                })
            })
            .clone()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Refreshes the per-disk gauges from the live status, then renders the exposition.
    pub fn render_metrics(&self) -> String {
        let now = Instant::now();
        let stall = self.settings.stall_after;
        let m = &self.metrics;
        for slot in self.disks.lock().unwrap().values() {
            let st = slot.status.lock().unwrap();
            let l = [slot.source.as_str(), slot.disk.as_str()];
            let state = st.state(now, stall).as_str();
            for s in metrics::STATES {
                m.disk_state
                    .with_label_values(&[&slot.source, &slot.disk, s])
                    .set((*s == state) as i64);
            }
            let mode = st.tracking.as_ref().map_or("unknown", |t| t.0.as_str());
            for t in metrics::TRACKING {
                m.disk_tracking
                    .with_label_values(&[&slot.source, &slot.disk, t])
                    .set((*t == mode) as i64);
            }
            m.backlog_bytes
                .with_label_values(&l)
                .set(st.backlog_bytes as i64);
            m.lag_seconds.with_label_values(&l).set(st.lag(now, stall));
            m.disk_size_bytes.with_label_values(&l).set(st.size as i64);
            m.replicated_bytes
                .with_label_values(&l)
                .set(st.replicated_bytes as i64);
        }
        m.capture_memory_bytes
            .set(slipway_store::applier::capture_memory_bytes() as i64);
        let spilled = slipway_store::applier::capture_spilled_bytes_total();
        m.capture_spilled_bytes
            .inc_by(spilled.saturating_sub(m.capture_spilled_bytes.get()));
        if let Some((used, limit)) = self.volumes.attachment_slots() {
            m.attachment_slots
                .with_label_values(&["used"])
                .set(i64::from(used));
            m.attachment_slots
                .with_label_values(&["limit"])
                .set(i64::from(limit));
        }
        let now_ms = restore::now_ms();
        for (source, (count, newest, stored)) in self.rp.summary.lock().unwrap().iter() {
            let rp = &m.restore_points;
            rp.count.with_label_values(&[source]).set(*count as i64);
            rp.stored_bytes
                .with_label_values(&[source])
                .set(*stored as i64);
            if let Some(t) = newest {
                rp.newest_age_seconds
                    .with_label_values(&[source])
                    .set(now_ms.saturating_sub(*t) as f64 / 1000.0);
            }
        }
        m.render()
    }

    pub fn status_report(&self) -> StatusReport {
        let now = Instant::now();
        let stall = self.settings.stall_after;
        let mut sources: BTreeMap<String, SourceReport> = BTreeMap::new();
        for slot in self.disks.lock().unwrap().values() {
            let st = slot.status.lock().unwrap();
            let src = sources
                .entry(slot.source.clone())
                .or_insert_with(|| SourceReport {
                    id: slot.source.clone(),
                    connected: false,
                    peer: None,
                    disks: vec![],
                    restore_points_blocked: None,
                    restore_points: 0,
                    newest_restore_point_age_seconds: None,
                    bandwidth_limit_mbps: match self.settings.bandwidth_for(&slot.source) {
                        0 => None,
                        bps => Some(bps as f64 / 1e6),
                    },
                });
            src.connected |= st.connected;
            if st.connected {
                src.peer = st.peer.clone();
            }
            let state = st.state(now, stall);
            src.disks.push(DiskReport {
                id: slot.disk.clone(),
                state,
                reason: st.reason(now, stall),
                size_bytes: st.size,
                replicated_bytes: st.replicated_bytes,
                rescanned_bytes: st.rescanned_bytes,
                backlogged_bytes: st.backlogged_bytes,
                backlog_bytes: st.backlog_bytes,
                durable_seq: st.durable_seq,
                synced: st.synced,
                last_ack_unix_ms: st.last_ack.and_then(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_millis() as u64)
                }),
                lag_seconds: st.lag(now, stall),
                eta_seconds: st.eta(),
                rate_bytes_per_second: st.rate,
                tracking: st.tracking.as_ref().map(|t| t.0.clone()),
                tracking_reason: st
                    .tracking
                    .as_ref()
                    .map(|t| t.1.clone())
                    .filter(|r| !r.is_empty()),
            });
        }
        for src in sources.values_mut() {
            src.restore_points_blocked = self.rp_blocker(&src.id);
            if let Some((count, newest, _)) = self.rp.summary.lock().unwrap().get(&src.id) {
                src.restore_points = *count;
                src.newest_restore_point_age_seconds =
                    newest.map(|t| restore::now_ms().saturating_sub(t) as f64 / 1000.0);
            }
        }
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            listen: self.settings.listen.to_string(),
            fingerprint: self.fingerprint.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            agents_connected: self.metrics.agents_connected.get(),
            backend: self.volumes.name().into(),
            attachment_slots: self.volumes.attachment_slots(),
            settings_sha256: self.settings.settings_sha256.clone(),
            sources: sources.into_values().collect(),
        }
    }

    /// The limits pushed to `source`'s agent, from the settings (`[sources.NAME]`, else
    /// `replication.source_bandwidth_mbps`).
    pub(crate) fn source_limits(&self, source: &str) -> slipway_proto::SourceLimits {
        slipway_proto::SourceLimits {
            bandwidth_bps: self.settings.bandwidth_for(source),
        }
    }

    /// The revocation list, reread if its file changed since the last call (one `stat` per
    /// agent hello). An unreadable list refuses every token rather than trusting none of it.
    pub(crate) fn revocations(&self) -> Result<auth::Revoked, String> {
        let dir = &self.settings.data_dir;
        let path = auth::Revoked::path(dir);
        let stamp = match std::fs::metadata(&path) {
            Ok(m) => Some((m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let mut c = self.revoked.lock().unwrap();
        if c.stamp != stamp {
            c.list = auth::Revoked::load(dir).map_err(|e| e.to_string())?;
            c.stamp = stamp;
        }
        Ok(c.list.clone())
    }

    /// Revokes a token id: lists it durably, then closes the connections that use it.
    async fn revoke_token(self: &Arc<Self>, id: String) -> admin::Response {
        let dir = self.settings.data_dir.clone();
        let idc = id.clone();
        let newly =
            match tokio::task::spawn_blocking(move || auth::Revoked::revoke(&dir, &idc)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    return admin::Response::Error {
                        message: e.to_string(),
                    }
                }
                Err(e) => {
                    return admin::Response::Error {
                        message: e.to_string(),
                    }
                }
            };
        if let Err(message) = self.revocations() {
            return admin::Response::Error { message };
        }
        let id = id.to_ascii_lowercase();
        let conns: Vec<Arc<session::Conn>> = self
            .sessions
            .lock()
            .unwrap()
            .values()
            .filter(|(_, c)| c.token_id.as_deref() == Some(id.as_str()))
            .map(|(_, c)| c.clone())
            .collect();
        for c in &conns {
            tracing::warn!(source = %c.source, token_id = %id, "token revoked: closing its connection");
            c.close(session::CLOSE_UNAUTHORIZED, b"token revoked");
        }
        admin::Response::TokenRevoked {
            id,
            newly,
            closed: conns.len(),
        }
    }

    pub async fn admin(self: &Arc<Self>, req: admin::Request) -> admin::Response {
        match req {
            admin::Request::TokenRevoke { id } => self.revoke_token(id).await,
            admin::Request::Status => admin::Response::Status {
                status: self.status_report(),
            },
            admin::Request::RestorePointCreate { source, wait } => {
                let id = restore::new_id();
                if let Some(reason) = self.rp_blocker(&source) {
                    return admin::Response::Error {
                        message: format!(
                            "source {source} cannot have a restore point now: {reason}"
                        ),
                    };
                }
                if wait {
                    match self
                        .take_restore_point(&source, id, restore::Trigger::OnDemand)
                        .await
                    {
                        Ok(m) => admin::Response::RestorePointCreated {
                            id: m.id.clone(),
                            manifest: Some(Box::new(m)),
                        },
                        Err(e) => admin::Response::Error {
                            message: e.to_string(),
                        },
                    }
                } else {
                    let me = self.clone();
                    let idc = id.clone();
                    tokio::spawn(async move {
                        let _ = me
                            .take_restore_point(&source, idc, restore::Trigger::OnDemand)
                            .await;
                    });
                    admin::Response::RestorePointCreated { id, manifest: None }
                }
            }
            admin::Request::RestorePointList { source } => {
                match self.list_restore_points(source).await {
                    Ok(restore_points) => admin::Response::RestorePointList { restore_points },
                    Err(e) => admin::Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            admin::Request::RestorePointVerify { id } => match self.verify_restore_point(&id).await
            {
                Ok(report) => admin::Response::RestorePointVerified { report },
                Err(e) => admin::Response::Error {
                    message: e.to_string(),
                },
            },
            admin::Request::RestorePointDelete { id } => match self.delete_restore_point(&id).await
            {
                Ok(freed_bytes) => admin::Response::RestorePointDeleted { id, freed_bytes },
                Err(e) => admin::Response::Error {
                    message: e.to_string(),
                },
            },
        }
    }

    /// Loads the metadata of every volume on disk so status shows disks before their agents
    /// reconnect.
    fn load_known_disks(&self) -> Result<(), ServerError> {
        let root = self.settings.data_dir.join("volumes");
        let Ok(sources) = std::fs::read_dir(&root) else {
            return Ok(());
        };
        for src in sources.flatten() {
            let Ok(files) = std::fs::read_dir(src.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".meta.json") || name.starts_with('.') {
                    continue;
                }
                match slipway_store::DiskMeta::load(&f.path()) {
                    Ok(Some(m)) => {
                        let slot = self.slot(&m.source_id, &m.disk_id, m.size, m.block_size);
                        let mut st = slot.status.lock().unwrap();
                        st.durable_seq = m.durable_seq;
                        st.synced = m.synced;
                        st.replicated_bytes = m.replicated_bytes;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "skipping unreadable disk metadata"),
                }
            }
        }
        Ok(())
    }
}

/// Takes the data dir's exclusive lock (as the server does), for offline maintenance.
pub fn lock_data_dir(dir: &Path) -> Result<DirLock, ServerError> {
    DirLock::acquire(dir)
}

/// Holds an exclusive `flock` on `DATA_DIR/slipway.lock` until dropped.
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<Self, ServerError> {
        let path = dir.join("slipway.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        // std's lock is flock(2) with LOCK_EX on Linux (LOCK_NB for try_lock): the same lock
        // as before, so an older server still running on the dir is seen.
        match f.try_lock() {
            Ok(()) => Ok(DirLock { _file: f }),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(ServerError::Locked(dir.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                Err(io_err(format!("locking {}", path.display()))(e))
            }
        }
    }
}

/// Where volumes and restore points live.
pub struct Backends {
    pub volumes: Arc<dyn backend::VolumeBackend>,
    /// Remote snapshots (AWS); `None` keeps restore points in the local snapshot store.
    pub snapshots: Option<Arc<dyn backend::SnapshotBackend>>,
    /// The backend's own metrics (the AWS backend's requests), registered with the server's.
    pub backend_metrics: Vec<Box<dyn prometheus::core::Collector>>,
}

impl Backends {
    /// The embedded local default: volume files and snapshots under the data dir.
    pub fn local(settings: &Settings) -> Self {
        Backends {
            volumes: Arc::new(backend::LocalVolumes {
                root: settings.data_dir.join("volumes"),
            }),
            snapshots: None,
            backend_metrics: Vec::new(),
        }
    }
}

/// Runs the server until `shutdown` completes. `ready` is called once everything listens.
pub async fn run(
    settings: Settings,
    backends: Backends,
    ready: impl FnOnce(&Ready),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let dir = settings.data_dir.clone();
    slipway_store::fsutil::create_dir_all_durable(&dir)?;
    let _lock = DirLock::acquire(&dir)?;

    let (identity, generated) = match &settings.tls_cert {
        Some((c, k)) => (slipway_net::tls::ServerIdentity::load(c, k)?, false),
        None => slipway_net::tls::ServerIdentity::load_or_generate(
            &dir.join("tls"),
            &settings.tls_names,
        )?,
    };
    let fingerprint = identity.fingerprint();
    let token_key = TokenKey::load_or_create(&dir)?;
    let server_config =
        identity.server_config_with(&settings.tuning, settings.tls_client_ca.as_deref())?;

    let metrics = Metrics::new();
    let windows = windows::Windows::new(
        settings.quic_receive_memory,
        settings.tuning.clone(),
        server_config.clone(),
        metrics.quic_connection_window.clone(),
    );
    let endpoint = settings
        .tuning
        .server_endpoint_with(
            settings.listen,
            server_config,
            Some(&token_key.derive("quic-stateless-reset")),
        )
        .map_err(io_err(format!("listening on udp {}", settings.listen)))?;
    let listen = endpoint
        .local_addr()
        .map_err(io_err("reading the QUIC address"))?;
    let http = tokio::net::TcpListener::bind(settings.metrics_listen)
        .await
        .map_err(io_err(format!(
            "listening on tcp {}",
            settings.metrics_listen
        )))?;
    let metrics_listen = http
        .local_addr()
        .map_err(io_err("reading the metrics address"))?;
    let admin_sock = admin::bind(&dir).map_err(io_err(format!(
        "binding {}",
        admin::socket_path(&dir).display()
    )))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let inner = Arc::new(Inner {
        throttle: (settings.bandwidth_bytes_per_sec > 0)
            .then(|| Throttle::new(settings.bandwidth_bytes_per_sec)),
        memory: Arc::new(Semaphore::new(settings.memory_limit_bytes as usize)),
        windows,
        settings: Settings {
            listen,
            metrics_listen,
            ..settings
        },
        metrics,
        token_key,
        revoked: Mutex::new(RevokedCache::default()),
        finalized: Mutex::new(restore::load_finalized(&dir).map_err(io_err(format!(
            "reading {}",
            restore::finalized_path(&dir).display()
        )))?),
        fingerprint: fingerprint.clone(),
        started: Instant::now(),
        disks: Mutex::new(BTreeMap::new()),
        sessions: Mutex::new(HashMap::new()),
        next_session: AtomicU64::new(1),
        shutting_down: AtomicBool::new(false),
        shutdown: shutdown_rx,
        rp: restore::RestorePoints::new(if backends.snapshots.is_some() {
            slipway_store::snapshot::SnapshotStore::hash_only(dir.join("snapshots"))
        } else {
            slipway_store::snapshot::SnapshotStore::new(dir.join("snapshots"))
        }),
        volumes: backends.volumes,
        snapshots: backends.snapshots,
    });
    for m in backends.backend_metrics {
        inner.metrics.register_backend(m);
    }
    if let Some(sha) = &inner.settings.settings_sha256 {
        inner.metrics.settings_info.with_label_values(&[sha]).set(1);
    }
    // Volumes this server owns (after a restart or on a new instance) come back first.
    for v in inner
        .volumes
        .adopt()
        .await
        .map_err(|e| ServerError::Backend(e.to_string()))?
    {
        tracing::info!(source = %v.source, disk = %v.disk, volume = %v.volume_id, path = %v.path.display(), "adopted volume");
    }
    // Where operators read the fingerprint agents pin (the instance's tags on EC2). Not
    // fatal: agents already enrolled pin it anyway, and `slipway status` and /healthz show it.
    if let Err(e) = inner.volumes.publish_fingerprint(&fingerprint).await {
        tracing::warn!(error = %e, %fingerprint, "could not publish the TLS fingerprint");
    }
    inner.load_known_disks()?;
    // Blocks of restore points interrupted by a crash are unreferenced: sweep them.
    for source in inner.rp.store.sources() {
        let freed = inner.rp.store.sweep(&source)?;
        if freed > 0 {
            tracing::info!(%source, freed_bytes = freed, "removed blocks of an interrupted restore point");
        }
        inner.rp.refresh(&source)?;
    }
    let scheduler = tokio::spawn(inner.clone().schedule());
    let finalized_watch = tokio::spawn(inner.clone().watch_finalized());

    let http_task = tokio::spawn(http::serve(http, inner.clone()));
    let admin_task = tokio::spawn(admin::serve(admin_sock, inner.clone()));

    tracing::info!(
        %listen, %metrics_listen, data_dir = %dir.display(), %fingerprint,
        "slipway server ready (agents pin this SHA-256 certificate fingerprint)"
    );
    ready(&Ready {
        listen,
        metrics_listen,
        fingerprint,
        tls_generated: generated,
        data_dir: dir.clone(),
    });

    let mut sessions = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                sessions.spawn(session::run(inner.clone(), incoming));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }

    tracing::info!("shutting down: draining connections");
    inner.shutting_down.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("sessions did not finish within 20s; stopping anyway");
    }
    endpoint.close(session::CLOSE_DRAINING, b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    http_task.abort();
    admin_task.abort();
    scheduler.abort();
    finalized_watch.abort();
    let _ = std::fs::remove_file(admin::socket_path(&dir));
    Ok(())
}
