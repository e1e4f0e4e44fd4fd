//! One agent connection: handshake, control stream, one stream per disk, cleanup.
//!
//! Every frame from the peer is checked before it can touch a volume: the handshake authorises
//! a source, a disk open names a disk of *that* source only (volumes live under the source's own
//! directory, so there is no id to forge), and each write is checked against its disk's bounds,
//! alignment, sequence and CRC. A refusal is answered with a typed error frame on the stream it
//! concerns; nothing refused is written, and one bad stream never takes down the server or
//! another agent.
//!
//! Tasks per connection: a control-frame reader (so no partially read frame is ever lost to a
//! `select!`), the control loop, per disk stream a reader and an ack writer, and per open disk
//! a task polling its applier's events. Acks come only from those durable events through a
//! `watch`, which also coalesces them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slipway_net::{read_frame, read_frame_with, write_frame, FrameIoError};
use slipway_proto::handshake::ServerParams;
use slipway_proto::{
    features, DiskOpen, DiskOpened, ErrorCode, ErrorFrame, Frame, ResumeKind, ServerHandshake,
    NO_HANDLE,
};
use slipway_store::applier::ApplierConfig;
use slipway_store::{Applier, ApplierEvent, ApplierHandle, DiskMeta, FileVolume, Op, Volume};

use crate::backend::{BackendError, VolumeRequest};
use tokio::sync::{mpsc, oneshot, watch, OwnedMutexGuard, OwnedSemaphorePermit};

use crate::rules::{self, Accepted, AckRules, StreamRules};
use crate::{windows, DiskSlot, Inner};

/// Application close codes.
pub const CLOSE_NORMAL: quinn::VarInt = quinn::VarInt::from_u32(0);
pub const CLOSE_PROTOCOL: quinn::VarInt = quinn::VarInt::from_u32(1);
pub const CLOSE_UNAUTHORIZED: quinn::VarInt = quinn::VarInt::from_u32(2);
pub const CLOSE_SUPERSEDED: quinn::VarInt = quinn::VarInt::from_u32(3);
pub const CLOSE_DRAINING: quinn::VarInt = quinn::VarInt::from_u32(4);

/// Stream stop code sent when the server refuses a stream's frames.
const STOP_REFUSED: quinn::VarInt = quinn::VarInt::from_u32(1);

const CONTROL_MAX_BODY: u32 = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const LEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Durable position and failure of a disk, as the ack writer sees it.
#[derive(Debug, Clone, Default)]
struct AckState {
    durable: u64,
    failed: Option<String>,
}

/// Routes `MarkerReached` events of a connection's disks to whoever waits for that marker.
pub(crate) type MarkerRouter = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<(String, Instant)>>>>;

/// A disk opened by this connection.
pub(crate) struct OpenDisk {
    handle: u32,
    pub slot: Arc<DiskSlot>,
    size: u64,
    block_size: u32,
    /// Sequence durable when the disk was opened: writes must be above it.
    start_seq: u64,
    /// Backend volume id (the file path on the local default, `vol-…` on AWS).
    pub volume_id: String,
    applier: Mutex<Option<Applier>>,
    /// The running applier's handle, for restore points and checksum resyncs; cleared at
    /// cleanup (the disk is closed).
    pub handle_cell: Arc<Mutex<Option<ApplierHandle>>>,
    acks: watch::Receiver<AckState>,
    queue: Arc<tokio::sync::Semaphore>,
    latency: Arc<Mutex<VecDeque<(u64, Instant)>>>,
    bound: AtomicBool,
    /// The disk's lease, shared with any restore point that is capturing the disk: the disk
    /// can be opened for writing again only when the session *and* every capture have let go
    /// of it, so no new writer touches a volume a capture still reads.
    pub lease: Mutex<Option<Arc<OwnedMutexGuard<()>>>>,
    /// The task polling the applier's events; it ends once the applier is closed and its
    /// last event handled, and `cleanup` waits for it before the lease goes.
    events_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// A hash request (checksum resync) is being answered.
    hashing: AtomicBool,
    received_bytes: prometheus::IntCounter,
    received_writes: prometheus::IntCounter,
}

pub(crate) struct Conn {
    inner: Arc<Inner>,
    conn: quinn::Connection,
    pub source: String,
    /// Id of the token the agent presented (to close it on revocation).
    pub token_id: Option<String>,
    /// The agent sends MarkerNote frames (feature MARKER_NOTES).
    pub marker_notes: bool,
    agent_run: u64,
    /// LZ4 write payloads were negotiated.
    lz4: bool,
    peer: SocketAddr,
    pub disks: Mutex<HashMap<u32, Arc<OpenDisk>>>,
    next_handle: AtomicU32,
    /// Frames for the control loop to send (marker requests).
    pub ctl_tx: mpsc::UnboundedSender<Frame>,
    pub markers: MarkerRouter,
}

impl Conn {
    /// Closes the connection (used when a newer one of the same source arrives).
    pub fn close(&self, code: quinn::VarInt, reason: &[u8]) {
        self.conn.close(code, reason);
    }

    /// Completes when the connection is gone (closed by either side, lost, or superseded).
    pub async fn closed(&self) {
        self.conn.closed().await;
    }
}

/// Runs one connection to its end.
pub(crate) async fn run(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    if inner.is_shutting_down() {
        incoming.refuse();
        return;
    }
    // This connection's share of the QUIC receive memory, from its first packet on; the
    // lease gives the share back when the session ends.
    let (_window_lease, config, window, initial) = inner.windows.join();
    let mut _window_follow = None;
    let conn = match async { incoming.accept_with(config)?.await }.await {
        Ok(c) => {
            _window_follow = Some(windows::FollowGuard(tokio::spawn(windows::follow(
                c.clone(),
                window,
                initial,
            ))));
            c
        }
        Err(e) => {
            inner
                .metrics
                .connections
                .with_label_values(&["failed"])
                .inc();
            tracing::debug!(%peer, error = %e, "QUIC handshake failed");
            return;
        }
    };
    let (mut ctl_send, mut ctl_recv) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            _ => {
                inner
                    .metrics
                    .connections
                    .with_label_values(&["failed"])
                    .inc();
                conn.close(CLOSE_PROTOCOL, b"no control stream");
                return;
            }
        };
    let hello = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_frame(&mut ctl_recv, CONTROL_MAX_BODY),
    )
    .await
    {
        Ok(Ok(Some(f))) => f,
        Ok(Err(FrameIoError::Decode(e))) => {
            inner.metrics.reject(ErrorCode::from(&e).as_str());
            inner
                .metrics
                .connections
                .with_label_values(&["refused"])
                .inc();
            close_with_error(
                &conn,
                &mut ctl_send,
                ErrorFrame::new(ErrorCode::from(&e), e.to_string()),
                CLOSE_PROTOCOL,
            )
            .await;
            return;
        }
        _ => {
            inner
                .metrics
                .connections
                .with_label_values(&["failed"])
                .inc();
            conn.close(CLOSE_PROTOCOL, b"no hello");
            return;
        }
    };
    let mut hs = ServerHandshake::new(ServerParams {
        features: features::HASHES
            | features::MARKER_NOTES
            | features::TRACKING_NOTES
            | features::SOURCE_LIMITS
            | if inner.settings.compression {
                features::LZ4
            } else {
                0
            },
        heartbeat_ms: inner.settings.heartbeat.as_millis() as u32,
        max_write: inner.settings.max_write,
        server_version: format!("slipway {}", env!("CARGO_PKG_VERSION")),
    });
    let key = inner.token_key.clone();
    let revoked = inner.revocations();
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let token_id = match &hello {
        Frame::Hello(h) => crate::auth::token_id(&h.credential),
        _ => None,
    };
    let mut refusal: Option<String> = None;
    let finalized = inner.finalized.lock().unwrap().clone();
    let authorize = |src: &str, cred: &str| {
        let r = match &revoked {
            Ok(list) => key
                .check(src, cred, now_unix, list)
                .map_err(|e| e.to_string())
                // Only to an agent with a valid token: whether a source was finalized is the
                // business of its owner alone.
                .and_then(|()| {
                    if finalized.contains(src) {
                        Err(crate::restore::finalized_refusal(src))
                    } else {
                        Ok(())
                    }
                }),
            Err(e) => Err(format!(
                "the server cannot read its token revocation list: {e}"
            )),
        };
        match r {
            Ok(()) => true,
            Err(why) => {
                refusal = Some(why);
                false
            }
        }
    };
    let negotiated = match hs.on_frame(hello, authorize) {
        Ok((welcome, n)) => {
            if write_frame(&mut ctl_send, &welcome).await.is_err() {
                conn.close(CLOSE_PROTOCOL, b"control stream write failed");
                return;
            }
            n
        }
        Err((e, frame)) => {
            let code = match &frame {
                Frame::Error(f) => f.code,
                _ => ErrorCode::Malformed,
            };
            inner.metrics.reject(match code {
                ErrorCode::Unauthorized => "unauthorized",
                ErrorCode::InvalidArgument => "invalid_argument",
                _ => "malformed",
            });
            inner
                .metrics
                .connections
                .with_label_values(&["refused"])
                .inc();
            // Never log the credential; the source id is validated or quoted by the error.
            tracing::warn!(%peer, error = %e, reason = refusal.as_deref().unwrap_or("-"), "refused agent");
            let close = if code == ErrorCode::Unauthorized {
                CLOSE_UNAUTHORIZED
            } else {
                CLOSE_PROTOCOL
            };
            if let Frame::Error(mut f) = frame {
                // Say why (expired, revoked) so the operator knows what to do.
                if let Some(why) = refusal.take() {
                    f.message = format!("{}: {why}", f.message);
                }
                close_with_error(&conn, &mut ctl_send, f, close).await;
            }
            return;
        }
    };
    inner
        .metrics
        .connections
        .with_label_values(&["accepted"])
        .inc();
    inner.metrics.agents_connected.inc();
    let span = tracing::info_span!("session", source = %negotiated.source_id, %peer);
    let _e = span.enter();
    tracing::info!(agent = %negotiated.peer_version, lz4 = negotiated.lz4(), "agent connected");
    drop(_e);

    if slipway_store::failpoint_armed("handshake-before-register") {
        tracing::warn!("failpoint handshake-before-register: pausing 5s");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let c = Arc::new(Conn {
        inner: inner.clone(),
        conn: conn.clone(),
        source: negotiated.source_id.clone(),
        token_id,
        marker_notes: negotiated.features & features::MARKER_NOTES != 0,
        agent_run: negotiated.agent_run,
        lz4: negotiated.lz4(),
        peer,
        disks: Mutex::new(HashMap::new()),
        next_handle: AtomicU32::new(1),
        ctl_tx,
        markers: Arc::new(Mutex::new(HashMap::new())),
    });
    let generation = inner.next_session.fetch_add(1, Ordering::Relaxed);
    let previous = inner
        .sessions
        .lock()
        .unwrap()
        .insert(negotiated.source_id.clone(), (generation, c.clone()));
    if let Some((_, old)) = previous {
        tracing::info!(source = %negotiated.source_id, "new connection supersedes the previous one");
        old.close(
            CLOSE_SUPERSEDED,
            b"superseded by a newer connection of this source",
        );
    }
    // A revocation between the check of the hello and the registration above found no
    // session to close: look again now that this one is visible to every later revocation.
    if let Some(id) = &c.token_id {
        let revoked_now = inner
            .revocations()
            .map(|list| list.contains(id))
            .unwrap_or(true);
        if revoked_now {
            tracing::warn!(source = %c.source, token_id = %id, "token revoked during the handshake: closing");
            c.close(CLOSE_UNAUTHORIZED, b"token revoked");
        }
    }
    // The limits the server's settings set for this source go first on the control stream.
    if negotiated.features & features::SOURCE_LIMITS != 0 {
        let _ = c
            .ctl_tx
            .send(Frame::SourceLimits(inner.source_limits(&c.source)));
    }
    let reason = control_loop(&c, ctl_send, ctl_recv, ctl_rx).await;
    tracing::info!(source = %c.source, %peer, reason = %reason, "agent disconnected");
    cleanup(&c).await;
    inner.metrics.agents_connected.dec();
    let mut s = inner.sessions.lock().unwrap();
    if s.get(&c.source).map(|(g, _)| *g) == Some(generation) {
        s.remove(&c.source);
    }
}

/// Sends an error frame on the control stream, gives the peer a moment to read it, closes.
async fn close_with_error(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    e: ErrorFrame,
    code: quinn::VarInt,
) {
    let reason = e.message.clone();
    let _ = write_frame(send, &Frame::Error(e)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(code, reason.as_bytes());
}

async fn control_loop(
    c: &Arc<Conn>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut outgoing: mpsc::UnboundedReceiver<Frame>,
) -> String {
    // A dedicated reader: read_frame is not cancel-safe, a channel receive is.
    let (ftx, mut frx) = mpsc::channel::<Result<Frame, FrameIoError>>(16);
    let frame_timeout = c.inner.settings.frame_timeout;
    let reader = tokio::spawn(async move {
        loop {
            let r = read_frame_with(&mut recv, CONTROL_MAX_BODY, true, frame_timeout).await;
            let stop = !matches!(r, Ok(Some(_)));
            let item = match r {
                Ok(Some(f)) => Ok(f),
                Ok(None) => Err(FrameIoError::UnexpectedEnd),
                Err(e) => Err(e),
            };
            if ftx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let mut shutdown = c.inner.shutdown.clone();
    let mut streams = tokio::task::JoinSet::new();
    let reason = loop {
        tokio::select! {
            f = frx.recv() => {
                let frame = match f {
                    Some(Ok(f)) => f,
                    Some(Err(FrameIoError::Decode(e))) => {
                        c.inner.metrics.reject(ErrorCode::from(&e).as_str());
                        let f = ErrorFrame::new(ErrorCode::from(&e), e.to_string());
                        close_with_error(&c.conn, &mut send, f, CLOSE_PROTOCOL).await;
                        break format!("malformed control frame: {e}");
                    }
                    Some(Err(e @ FrameIoError::Stalled(_))) => {
                        c.inner.metrics.reject("malformed");
                        let f = ErrorFrame::new(ErrorCode::Malformed, e.to_string());
                        close_with_error(&c.conn, &mut send, f, CLOSE_PROTOCOL).await;
                        break format!("control frame stalled: {e}");
                    }
                    Some(Err(e)) => break format!("control stream ended: {e}"),
                    None => break "control stream ended".to_string(),
                };
                match on_control(c, frame).await {
                    Ok(Some(reply)) => {
                        if write_frame(&mut send, &reply).await.is_err() {
                            break "control stream write failed".into();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let msg = e.message.clone();
                        close_with_error(&c.conn, &mut send, e, CLOSE_PROTOCOL).await;
                        break msg;
                    }
                }
            }
            Some(f) = outgoing.recv() => {
                if write_frame(&mut send, &f).await.is_err() {
                    break "control stream write failed".into();
                }
            }
            s = c.conn.accept_bi() => match s {
                Ok((s, r)) => { streams.spawn(disk_stream(c.clone(), s, r)); }
                Err(e) => break format!("{e}"),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            _ = shutdown.changed() => {
                let _ = write_frame(&mut send, &Frame::Error(ErrorFrame::new(ErrorCode::Draining, "server shutting down; reconnect later"))).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
                c.conn.close(CLOSE_DRAINING, b"server shutting down");
                break "server shutting down".into();
            }
        }
    };
    reader.abort();
    c.conn.close(CLOSE_NORMAL, b"");
    while streams.join_next().await.is_some() {}
    reason
}

/// Checksum resync: hashes the disk's volume chunk by chunk, in order, on a blocking thread
/// and sends the hashes on the control stream as they are made. The agent decides about a
/// chunk only once it has its hash, so every write of this run to a chunk comes after the
/// chunk was hashed: the hashes are of what the volume held before the run wrote anything.
fn hash_request(c: &Arc<Conn>, h: slipway_proto::HashRequest) -> Option<Frame> {
    let disk = c.disks.lock().unwrap().get(&h.handle).cloned();
    let Some(d) = disk else {
        c.inner.metrics.reject("unknown_disk");
        return Some(Frame::Error(ErrorFrame::for_disk(
            ErrorCode::UnknownDisk,
            h.handle,
            format!(
                "hash request for handle {} which this connection did not open",
                h.handle
            ),
        )));
    };
    let chunk = u64::from(h.chunk_size);
    if let Err(e) = rules::check_hash_chunk(h.handle, chunk, d.block_size) {
        c.inner.metrics.reject("invalid_argument");
        return Some(Frame::Error(e));
    }
    let Some(vol) = d.handle_cell.lock().unwrap().as_ref().map(|a| a.volume()) else {
        return None; // closing: the agent will reopen and ask again
    };
    if d.hashing.swap(true, Ordering::AcqRel) {
        c.inner.metrics.reject("limit");
        return Some(Frame::Error(ErrorFrame::for_disk(
            ErrorCode::Limit,
            h.handle,
            "a hash request for this disk is already being answered",
        )));
    }
    let od = d.clone();
    let (tx, size, handle) = (c.ctl_tx.clone(), d.size, h.handle);
    let (src, disk_id) = (c.source.clone(), d.slot.disk.clone());
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut buf = vec![0u8; chunk as usize];
        let mut batch = Vec::with_capacity(slipway_proto::MAX_HASHES_PER_FRAME);
        let mut first = 0u64;
        let mut offset = 0u64;
        while offset < size {
            let len = chunk.min(size - offset) as usize;
            if let Err(e) = vol.read_at(&mut buf[..len], offset) {
                // The agent stops waiting and sends the rest of the disk.
                tracing::warn!(source = %src, disk = %disk_id, offset, error = %e, "hashing the volume failed");
                return;
            }
            batch.push(xxhash_rust::xxh3::xxh3_64(&buf[..len]));
            offset += len as u64;
            if batch.len() == slipway_proto::MAX_HASHES_PER_FRAME || offset >= size {
                let n = batch.len() as u64;
                let f = Frame::ChunkHashes(slipway_proto::ChunkHashes {
                    handle,
                    first,
                    hashes: std::mem::take(&mut batch),
                });
                if tx.send(f).is_err() {
                    return; // the connection is gone
                }
                first += n;
            }
        }
        tracing::info!(source = %src, disk = %disk_id, chunks = first, secs = started.elapsed().as_secs_f64(), "volume hashed for a checksum resync");
        od.hashing.store(false, Ordering::Release);
    });
    None
}

/// Handles one control frame. `Ok(Some)` is the reply; `Err` closes the connection.
async fn on_control(c: &Arc<Conn>, frame: Frame) -> Result<Option<Frame>, ErrorFrame> {
    match frame {
        Frame::DiskOpen(d) => Ok(Some(match open_disk(c, d).await {
            Ok(o) => Frame::DiskOpened(o),
            Err(e) => {
                c.inner.metrics.reject(reject_label(e.code));
                Frame::Error(e)
            }
        })),
        Frame::Progress(p) => {
            let disk = c.disks.lock().unwrap().get(&p.handle).cloned();
            match disk {
                Some(d) => {
                    let completed_meta = {
                        let mut st = d.slot.status.lock().unwrap();
                        let was = st.synced;
                        st.on_progress(p.phase, p.backlog_bytes, p.pass_seq, Instant::now());
                        (!was && st.synced).then_some(st.pass_seq)
                    };
                    if let Some(pass_seq) = completed_meta {
                        persist_synced(&d, pass_seq).await;
                    }
                    Ok(None)
                }
                None => {
                    c.inner.metrics.reject("unknown_disk");
                    Ok(Some(Frame::Error(ErrorFrame::for_disk(
                        ErrorCode::UnknownDisk,
                        p.handle,
                        format!(
                            "progress for handle {} which this connection did not open",
                            p.handle
                        ),
                    ))))
                }
            }
        }
        Frame::HashRequest(h) => Ok(hash_request(c, h)),
        Frame::TrackingNote(n) => {
            let disk = c.disks.lock().unwrap().get(&n.handle).cloned();
            if let Some(d) = disk {
                if n.tracking != slipway_proto::Tracking::Kernel {
                    tracing::info!(source = %c.source, disk = %d.slot.disk, tracking = n.tracking.as_str(), reason = %n.reason, "the agent does not track this disk's writes in the kernel");
                }
                d.slot.status.lock().unwrap().tracking =
                    Some((n.tracking.as_str().to_string(), n.reason));
            }
            Ok(None)
        }
        Frame::MarkerNote(n) => {
            let pending = c.markers.lock().unwrap().contains_key(&n.marker_id);
            if pending && n.freeze_us > 0 {
                c.inner
                    .metrics
                    .restore_points
                    .freeze_seconds
                    .with_label_values(&[&c.source])
                    .observe(n.freeze_us as f64 / 1e6);
            }
            c.inner.rp.note(n, pending);
            Ok(None)
        }
        Frame::Heartbeat(_) => Ok(None),
        other => {
            c.inner.metrics.reject("malformed");
            Err(rules::check_control(&other)
                .expect_err("every frame check_control allows is handled above"))
        }
    }
}

fn reject_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::DiskMismatch => "disk_mismatch",
        ErrorCode::Limit => "limit",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::BadChecksum => "bad_checksum",
        ErrorCode::OutOfBounds => "out_of_bounds",
        ErrorCode::Misaligned => "misaligned",
        ErrorCode::UnknownDisk => "unknown_disk",
        ErrorCode::BadSequence => "bad_sequence",
        ErrorCode::InvalidArgument => "invalid_argument",
        _ => "malformed",
    }
}

async fn persist_synced(d: &Arc<OpenDisk>, pass_seq: u64) {
    let h = d.handle_cell.lock().unwrap().clone();
    if let Some(h) = h {
        let _ = tokio::task::spawn_blocking(move || {
            h.update_meta(|m| {
                m.synced = true;
                m.pass_seq = pass_seq;
            })
        })
        .await;
    }
}

async fn open_disk(c: &Arc<Conn>, d: DiskOpen) -> Result<DiskOpened, ErrorFrame> {
    let inner = &c.inner;
    {
        let disks = c.disks.lock().unwrap();
        let open: Vec<&str> = disks.values().map(|o| o.slot.disk.as_str()).collect();
        rules::check_open(&d, &open, inner.settings.max_disks_per_connection)?;
    }
    let slot = inner.slot(&c.source, &d.disk_id, d.size, d.block_size);
    let lease = tokio::time::timeout(LEASE_TIMEOUT, slot.lease.clone().lock_owned())
        .await
        .map_err(|_| {
            ErrorFrame::new(
                ErrorCode::Limit,
                format!(
                    "disk {} is still held by a previous connection or a restore point being captured",
                    d.disk_id
                ),
            )
        })?;

    let meta_path = inner.meta_path(&c.source, &d.disk_id);
    let (source, run) = (c.source.clone(), c.agent_run);
    let disk_err = |what: &str, e: &dyn std::fmt::Display| {
        ErrorFrame::new(
            ErrorCode::DiskError,
            format!("{what} disk {}: {e}", d.disk_id),
        )
    };
    let mp = meta_path.clone();
    let existing = tokio::task::spawn_blocking(move || DiskMeta::load(&mp))
        .await
        .map_err(|e| disk_err("opening", &e))?
        .map_err(|e| disk_err("reading the metadata of", &e))?;
    let known = existing.as_ref().map(|m| rules::Known {
        size: m.size,
        block_size: m.block_size,
        agent_run: m.agent_run,
    });
    rules::check_shape(known.as_ref(), &d)?;
    let vh = inner
        .volumes
        .ensure(&VolumeRequest {
            source: c.source.clone(),
            disk: d.disk_id.clone(),
            size: d.size,
        })
        .await
        .map_err(|e| match e {
            // Retryable: the agent backs off and opens again.
            BackendError::Unavailable(_) | BackendError::NoAttachmentSlot { .. } => {
                ErrorFrame::new(
                    ErrorCode::Limit,
                    format!("no volume for disk {} yet: {e}", d.disk_id),
                )
            }
            e => disk_err("provisioning a volume for", &e),
        })?;
    let dd = d.clone();
    let mp = meta_path.clone();
    let vpath = vh.path.clone();
    let created = vh.created;
    let changes_path = inner.changes_path(&c.source, &d.disk_id);
    let opened = tokio::task::spawn_blocking(move || -> Result<_, ErrorFrame> {
        let internal = |e: slipway_store::StoreError| {
            ErrorFrame::new(
                ErrorCode::DiskError,
                format!("opening disk {}: {e}", dd.disk_id),
            )
        };
        // Metadata lives beside local volumes, but an EBS-backed disk has no directory yet.
        if let Some(dir) = mp.parent() {
            slipway_store::fsutil::create_dir_all_durable(dir).map_err(internal)?;
        }
        let vol = FileVolume::open(&vpath).map_err(internal)?;
        // What an earlier server process wrote may still be only in the page cache (it was
        // killed, the host was not): make it durable before anything is built on it (a
        // checksum resync hashes what the volume holds).
        vol.flush().map_err(|e| {
            internal(slipway_store::StoreError::Io {
                what: format!("flushing volume {}", vpath.display()),
                source: e,
            })
        })?;
        if vol.size() < dd.size {
            return Err(internal(slipway_store::StoreError::TooSmall {
                path: vpath.display().to_string(),
                actual: vol.size(),
                expected: dd.size,
            }));
        }
        // Is this the volume the metadata describes? A swapped volume, or one restored from
        // an older copy, must not be trusted to hold what the metadata says: resynchronise.
        let distrust = match existing.as_ref().and_then(|m| m.volume_stamp.as_ref()) {
            Some(want) if !created => want.mismatch(vol.read_stamp().map_err(internal)?.as_ref()),
            _ => None,
        };
        if let Some(why) = &distrust {
            tracing::warn!(source = %source, disk = %dd.disk_id, volume = %vpath.display(), %why,
                "the volume does not match its metadata: resynchronising the disk");
            // Nor can its change map be trusted: the next restore point reads every block.
            match std::fs::remove_file(&changes_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(internal(slipway_store::StoreError::Io {
                        what: format!("removing {}", changes_path.display()),
                        source: e,
                    }))
                }
            }
        }
        let resume = rules::resume_kind(known.as_ref(), created, distrust.is_some(), run);
        let mut meta = match existing {
            Some(m) if resume != ResumeKind::Fresh => m,
            _ => DiskMeta::new(&source, &dd.disk_id, dd.size, dd.block_size),
        };
        if resume != ResumeKind::Resume {
            // A new agent run: its sequence numbers start over, and until its first pass is
            // durable the volume is not a whole copy.
            meta.agent_run = run;
            meta.durable_seq = 0;
            meta.pass_seq = 0;
            meta.synced = false;
            meta.replicated_bytes = 0;
            meta.state = "initiating".into();
        }
        // Stamp the volume (durably) before the metadata that expects the stamp.
        let stamp = match (&meta.volume_stamp, &distrust) {
            (Some(s), None) => s.next(),
            _ => slipway_store::meta::VolumeStamp::fresh(),
        };
        meta.volume_stamp = vol.write_stamp(&stamp).map_err(internal)?.then_some(stamp);
        meta.store(&mp).map_err(internal)?;
        Ok((vol, meta, resume))
    })
    .await
    .map_err(|e| ErrorFrame::new(ErrorCode::Internal, format!("opening disk: {e}")))??;
    let (vol, meta, resume) = opened;
    let durable = meta.durable_seq;

    let handle = c.next_handle.fetch_add(1, Ordering::Relaxed);
    let labels = [c.source.as_str(), d.disk_id.as_str()];
    let m = &inner.metrics;
    let (ack_tx, ack_rx) = watch::channel(AckState {
        durable,
        failed: None,
    });
    let handle_cell: Arc<Mutex<Option<ApplierHandle>>> = Arc::new(Mutex::new(None));
    let latency = Arc::new(Mutex::new(VecDeque::new()));
    let vol: Arc<dyn Volume> = Arc::new(vol);
    let config = ApplierConfig {
        changes_path: Some(inner.changes_path(&c.source, &d.disk_id)),
        capture_memory_bytes: inner.settings.capture_memory_bytes,
        spill_dir: Some(inner.settings.spill_dir.clone()),
        ..ApplierConfig::default()
    };
    let meta2 = meta.clone();
    let (applier, events) =
        tokio::task::spawn_blocking(move || Applier::start(vol, meta2, meta_path, config))
            .await
            .map_err(|e| {
                ErrorFrame::new(ErrorCode::Internal, format!("starting the applier: {e}"))
            })?
            .map_err(|e| {
                ErrorFrame::new(ErrorCode::DiskError, format!("starting the applier: {e}"))
            })?;
    *handle_cell.lock().unwrap() = Some(applier.handle());
    let events_task = tokio::spawn(disk_events(
        DiskEvents {
            slot: slot.clone(),
            cell: handle_cell.clone(),
            latency: latency.clone(),
            ack_tx,
            router: c.markers.clone(),
            fdatasyncs: m.fdatasyncs.clone(),
            flush_seconds: m.flush_seconds.clone(),
            ack_latency: m.ack_latency.clone(),
            durable_bytes: m.durable_bytes.with_label_values(&labels),
            disk_errors: m.disk_errors.with_label_values(&labels),
            source: c.source.clone(),
            disk: d.disk_id.clone(),
        },
        events,
    ));
    {
        let mut st = slot.status.lock().unwrap();
        let now = Instant::now();
        st.size = d.size;
        st.block_size = d.block_size;
        st.connected = true;
        st.peer = Some(c.peer.to_string());
        st.phase = None;
        st.error = None;
        st.creating_snapshot = false;
        st.durable_seq = durable;
        st.synced = meta.synced;
        st.pass_seq = meta.pass_seq;
        st.replicated_bytes = meta.replicated_bytes;
        st.last_activity = now;
        st.since = now;
        if resume != ResumeKind::Resume {
            st.rescanned_bytes = 0;
            st.backlogged_bytes = 0;
        }
    }
    let od = Arc::new(OpenDisk {
        handle,
        slot,
        size: d.size,
        block_size: d.block_size,
        start_seq: durable,
        volume_id: vh.volume_id.clone(),
        applier: Mutex::new(Some(applier)),
        handle_cell,
        acks: ack_rx,
        queue: Arc::new(tokio::sync::Semaphore::new(
            inner.settings.disk_queue_bytes as usize,
        )),
        latency,
        bound: AtomicBool::new(false),
        lease: Mutex::new(Some(Arc::new(lease))),
        events_task: Mutex::new(Some(events_task)),
        hashing: AtomicBool::new(false),
        received_bytes: m.received_bytes.with_label_values(&labels),
        received_writes: m.received_writes.with_label_values(&labels),
    });
    c.disks.lock().unwrap().insert(handle, od);
    tracing::info!(source = %c.source, disk = %d.disk_id, handle, ?resume, durable_seq = durable, "disk opened");
    Ok(DiskOpened {
        request_id: d.request_id,
        handle,
        resume,
        durable_seq: durable,
    })
}

/// What the task that polls a disk's applier events works with.
struct DiskEvents {
    slot: Arc<DiskSlot>,
    cell: Arc<Mutex<Option<ApplierHandle>>>,
    latency: Arc<Mutex<VecDeque<(u64, Instant)>>>,
    ack_tx: watch::Sender<AckState>,
    router: MarkerRouter,
    fdatasyncs: prometheus::IntCounter,
    flush_seconds: prometheus::Histogram,
    ack_latency: prometheus::Histogram,
    durable_bytes: prometheus::IntCounter,
    disk_errors: prometheus::IntCounter,
    source: String,
    disk: String,
}

/// Polls a disk's applier events until the applier stops: metrics, the record of a completed
/// pass, acks (through the ack writer's `watch`), markers reached (to the restore point that
/// waits for them). The store only publishes; all of this runs here, off its threads, so a
/// metadata write never delays a flush.
async fn disk_events(e: DiskEvents, mut events: slipway_store::ApplierEvents) {
    while let Some(batch) = events.next_batch().await {
        for ev in batch {
            match ev {
                ApplierEvent::Durable {
                    seq,
                    writes,
                    bytes,
                    flush,
                } => {
                    if writes > 0 {
                        e.fdatasyncs.inc();
                        e.flush_seconds.observe(flush.as_secs_f64());
                    }
                    e.durable_bytes.inc_by(bytes);
                    let now = Instant::now();
                    let completed = e.slot.status.lock().unwrap().on_durable(seq, bytes, now);
                    // A completed pass is recorded before the ack that ends it: `synced`
                    // promises that the server durably knows the volume is a whole copy, and
                    // an agent that saw its last ack (and exited) must never leave a server
                    // that forgets it. One metadata write per pass, not per flush.
                    if completed {
                        let handle = e.cell.lock().unwrap().clone();
                        if let Some(h) = handle {
                            let (src, disk) = (e.source.clone(), e.disk.clone());
                            let _ = tokio::task::spawn_blocking(move || {
                                slipway_store::failpoint_pause("pass-completed-before-record");
                                if let Err(err) = h.update_meta(|m| {
                                    m.synced = true;
                                    m.pass_seq = seq;
                                }) {
                                    tracing::warn!(source = %src, %disk, error = %err, "recording the completed pass failed");
                                }
                            })
                            .await;
                        }
                    }
                    e.ack_tx.send_modify(|a| a.durable = a.durable.max(seq));
                    let mut q = e.latency.lock().unwrap();
                    while let Some(&(s, t)) = q.front() {
                        if s > seq {
                            break;
                        }
                        e.ack_latency.observe(now.duration_since(t).as_secs_f64());
                        q.pop_front();
                    }
                }
                ApplierEvent::MarkerReached { marker_id, .. } => {
                    let waiter = e.router.lock().unwrap().get(&marker_id).cloned();
                    let delivered =
                        waiter.is_some_and(|tx| tx.send((e.disk.clone(), Instant::now())).is_ok());
                    if !delivered {
                        // Nobody takes a restore point at this marker (a resent or abandoned
                        // one): let the writer continue at once.
                        if let Some(h) = e.cell.lock().unwrap().clone() {
                            h.release_marker(marker_id);
                        }
                    }
                }
                ApplierEvent::Failed { seq, error, .. } => {
                    e.disk_errors.inc();
                    tracing::error!(source = %e.source, disk = %e.disk, seq, %error, "volume failed; disk is in the error state");
                    e.slot.status.lock().unwrap().error =
                        Some(format!("volume failed at seq {seq}: {error}"));
                    e.ack_tx.send_modify(|a| a.failed = Some(error.clone()));
                }
            }
        }
    }
}

/// What a queued op without payload (WriteZeroes, Marker) is charged against the queue
/// budgets: about what it costs in memory with its queue entry, rounded up, so a stream of
/// them is bounded like writes are (`disk_queue` / 1 KiB ops per disk at most).
const OP_COST: u32 = 1024;

/// Takes `n` bytes of the disk's and the server's queue budgets for one op (waiting while
/// they are spent: the reader stops, QUIC flow control stops the agent).
async fn op_guard(inner: &Inner, disk: &OpenDisk, n: u32) -> Box<dyn Send> {
    let gd = disk
        .queue
        .clone()
        .acquire_many_owned(n)
        .await
        .expect("never closed");
    let gg = inner
        .memory
        .clone()
        .acquire_many_owned(n)
        .await
        .expect("never closed");
    inner.metrics.queued_bytes.add(n as i64);
    Box::new(QueueGuard {
        _disk: gd,
        _global: gg,
        gauge: inner.metrics.queued_bytes.clone(),
        bytes: n as i64,
    })
}

/// Back-pressure permits for one queued op; released when it reaches the volume.
struct QueueGuard {
    _disk: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
    bytes: i64,
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes);
    }
}

async fn disk_stream(c: Arc<Conn>, send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut recv, 64)).await;
    let handle = match first {
        Ok(Ok(Some(Frame::StreamBind(b)))) => b.handle,
        Ok(Ok(None)) | Ok(Err(FrameIoError::Read(_))) => return,
        _ => {
            c.inner.metrics.reject("malformed");
            stream_refuse(
                send,
                recv,
                ErrorFrame::new(
                    ErrorCode::Malformed,
                    "a disk stream must start with StreamBind",
                ),
            )
            .await;
            return;
        }
    };
    let disk = c.disks.lock().unwrap().get(&handle).cloned();
    let Some(disk) = disk else {
        c.inner.metrics.reject("unknown_disk");
        stream_refuse(
            send,
            recv,
            ErrorFrame::for_disk(
                ErrorCode::UnknownDisk,
                handle,
                format!("handle {handle} was not opened by this connection"),
            ),
        )
        .await;
        return;
    };
    if disk.bound.swap(true, Ordering::SeqCst) {
        c.inner.metrics.reject("malformed");
        stream_refuse(
            send,
            recv,
            ErrorFrame::for_disk(
                ErrorCode::Malformed,
                handle,
                "this disk already has a stream",
            ),
        )
        .await;
        return;
    }
    let (err_tx, err_rx) = oneshot::channel();
    let writer = tokio::spawn(ack_writer(
        send,
        disk.acks.clone(),
        err_rx,
        handle,
        c.conn.clone(),
    ));
    let result = receive_writes(&c, &disk, &mut recv).await;
    if let Err(e) = &result {
        if e.code != ErrorCode::DiskError {
            c.inner.metrics.reject(reject_label(e.code));
        }
        tracing::warn!(source = %c.source, disk = %disk.slot.disk, code = e.code.as_str(), error = %e.message, "refusing disk stream");
        let _ = recv.stop(STOP_REFUSED);
    }
    let _ = err_tx.send(result);
    let _ = writer.await;
}

async fn stream_refuse(mut send: quinn::SendStream, mut recv: quinn::RecvStream, e: ErrorFrame) {
    let _ = recv.stop(STOP_REFUSED);
    let _ = write_frame(&mut send, &Frame::Error(e)).await;
    let _ = send.finish();
}

/// Reads, validates and queues frames until the stream ends (`Ok`) or a frame is refused.
async fn receive_writes(
    c: &Arc<Conn>,
    disk: &Arc<OpenDisk>,
    recv: &mut quinn::RecvStream,
) -> Result<u64, ErrorFrame> {
    let inner = &c.inner;
    let h = disk.handle;
    let mut rules = StreamRules {
        handle: h,
        size: disk.size,
        block_size: disk.block_size,
        max_write: inner.settings.max_write,
        last_seq: disk.start_seq,
    };
    let max_body = slipway_proto::MAX_BODY_LEN;
    loop {
        let frame = match read_frame_with(recv, max_body, c.lz4, inner.settings.frame_timeout).await
        {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(rules.last_seq),
            Err(FrameIoError::Decode(e)) => {
                return Err(ErrorFrame::for_disk(ErrorCode::from(&e), h, e.to_string()))
            }
            Err(e @ FrameIoError::Stalled(_)) => {
                return Err(ErrorFrame::for_disk(ErrorCode::Malformed, h, e.to_string()))
            }
            Err(_) => return Ok(rules.last_seq), // connection or stream gone: nothing to answer
        };
        if let Some(err) = &disk.acks.borrow().failed {
            return Err(ErrorFrame::for_disk(
                ErrorCode::DiskError,
                h,
                format!("disk is in the error state: {err}"),
            ));
        }
        let accepted = rules.on_frame(&frame)?;
        let (seq, len) = match accepted {
            Accepted::Write { seq, len, .. } | Accepted::Zeroes { seq, len, .. } => (seq, len),
            Accepted::Marker { seq, .. } => (seq, 0),
        };
        if let Some(t) = &inner.throttle {
            let wire = len.min(slipway_proto::MAX_BODY_LEN as u64) + 36;
            let waited = t
                .take(if matches!(frame, Frame::Write(_)) {
                    wire
                } else {
                    36
                })
                .await;
            inner
                .metrics
                .throttle_wait_seconds
                .inc_by(waited.as_secs_f64());
        }
        let op = match frame {
            Frame::Write(w) => {
                let n = w.data.len() as u32;
                let guard = op_guard(inner, disk, n).await;
                disk.received_bytes.inc_by(n as u64);
                disk.received_writes.inc();
                disk.latency
                    .lock()
                    .unwrap()
                    .push_back((seq, Instant::now()));
                Op::Write {
                    seq,
                    offset: w.offset,
                    data: w.data,
                    guard: Some(guard),
                }
            }
            Frame::WriteZeroes(z) => {
                let guard = op_guard(inner, disk, OP_COST).await;
                disk.received_writes.inc();
                disk.latency
                    .lock()
                    .unwrap()
                    .push_back((seq, Instant::now()));
                Op::Zeroes {
                    seq,
                    offset: z.offset,
                    len: z.len,
                    guard: Some(guard),
                }
            }
            Frame::Marker(m) => Op::Marker {
                seq,
                marker_id: m.marker_id,
                guard: Some(op_guard(inner, disk, OP_COST).await),
            },
            _ => unreachable!("filtered above"),
        };
        let submitted = match disk.applier.lock().unwrap().as_ref() {
            Some(a) => a.submit(op).is_ok(),
            None => false,
        };
        if !submitted {
            return Err(ErrorFrame::for_disk(
                ErrorCode::DiskError,
                h,
                "disk is closing",
            ));
        }
    }
}

/// Sends cumulative acks as the durable position moves; sends the refusal if the reader hit one.
/// After a clean end of the stream it keeps acking until everything queued is durable, then
/// finishes; it never outlives the connection.
async fn ack_writer(
    mut send: quinn::SendStream,
    mut acks: watch::Receiver<AckState>,
    mut reader: oneshot::Receiver<Result<u64, ErrorFrame>>,
    handle: u32,
    conn: quinn::Connection,
) {
    let mut rules = AckRules::new(handle, acks.borrow().durable);
    let mut reader_open = true;
    loop {
        if rules.done() {
            break;
        }
        tokio::select! {
            r = acks.changed() => {
                if r.is_err() {
                    break;
                }
                let st = acks.borrow_and_update().clone();
                if let Some(ack) = rules.on_durable(st.durable) {
                    if write_frame(&mut send, &Frame::Ack(ack)).await.is_err() {
                        return;
                    }
                }
                if let Some(err) = st.failed {
                    let _ = write_frame(&mut send, &Frame::Error(ErrorFrame::for_disk(ErrorCode::DiskError, handle, format!("volume failed: {err}")))).await;
                    break;
                }
            }
            r = &mut reader, if reader_open => {
                reader_open = false;
                match r {
                    Ok(Ok(last)) => rules.on_reader_end(last),
                    Ok(Err(e)) => {
                        let _ = write_frame(&mut send, &Frame::Error(e)).await;
                        break;
                    }
                    Err(_) => break,
                }
            }
            _ = conn.closed() => return,
        }
    }
    let _ = send.finish();
}

/// Closes every disk of the connection: final flush and metadata, then releases the leases.
async fn cleanup(c: &Arc<Conn>) {
    let disks: Vec<_> = c.disks.lock().unwrap().drain().map(|(_, d)| d).collect();
    for d in disks {
        let applier = d.applier.lock().unwrap().take();
        if let Some(a) = applier {
            let r = tokio::task::spawn_blocking(move || a.close()).await;
            match r {
                Ok(Ok(meta)) => {
                    tracing::debug!(disk = %d.slot.disk, durable_seq = meta.durable_seq, "disk closed")
                }
                Ok(Err(e)) => tracing::warn!(disk = %d.slot.disk, error = %e, "closing disk"),
                Err(e) => tracing::warn!(disk = %d.slot.disk, error = %e, "closing disk"),
            }
        }
        // The applier's threads are joined, so its event channel is closing: let the poller
        // handle the last events (a pass record, a failure) before anything of a successor
        // session can exist — it must not write this disk's metadata or status after the
        // lease goes.
        let task = d.events_task.lock().unwrap().take();
        if let Some(t) = task {
            let _ = t.await;
        }
        d.handle_cell.lock().unwrap().take();
        {
            let mut st = d.slot.status.lock().unwrap();
            st.connected = false;
            st.creating_snapshot = false;
            st.phase = None;
            st.tracking = None;
        }
        d.lease.lock().unwrap().take();
    }
    let _ = NO_HANDLE;
}
