//! One connection to the server, from hello to close.
//!
//! A connection is disposable: everything worth keeping (sequence counter, unacked ops,
//! passes) lives in [`crate::state::Source`], so any failure here simply ends the connection
//! and the manager opens a new one. Each connection gets an epoch number; the state only
//! listens to the streams of the current epoch, so tasks of a dead connection that have not
//! noticed yet cannot move a send cursor or release an op.
//!
//! Tasks per connection: the control loop (handshake, disk opens, heartbeats, progress,
//! marker requests), a control-stream reader, and per disk a sender walking the retained
//! queue and an ack reader.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use slipway_net::{read_frame, write_frame, write_write, FrameIoError};
use slipway_proto::{
    features, ClientHandshake, DiskOpen, ErrorCode, ErrorFrame, Frame, HandshakeError, Hello,
    Progress, StreamBind, MAX_BODY_LEN, NO_HANDLE,
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::journal::JournalError;
use crate::retained::Op;
use crate::run::Shared;
use crate::state::{AckError, OpenOutcome, Report};

/// Why a connection ended.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("creating a UDP endpoint: {0}")]
    Endpoint(#[source] std::io::Error),
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("sending: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("receiving: {0}")]
    Read(#[from] FrameIoError),
    #[error("handshake: {0}")]
    Handshake(HandshakeError),
    #[error("server refused: {0}")]
    Refused(ErrorFrame),
    #[error("server refused disk {disk}: {error}")]
    DiskRefused { disk: String, error: ErrorFrame },
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    #[error("the server closed the {0} stream")]
    Closed(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl SessionError {
    /// Whether reconnecting cannot help: the server refused for a reason that needs a human,
    /// the server's certificate is not the one we trust, or it does not speak our protocol.
    pub fn is_permanent(&self) -> bool {
        match self {
            SessionError::Refused(e) | SessionError::DiskRefused { error: e, .. } => {
                e.code.is_permanent()
            }
            SessionError::Handshake(HandshakeError::BadWelcome(_)) => true,
            SessionError::Connect(quinn::ConnectError::InvalidServerName(_)) => true,
            SessionError::Connection(e) => is_tls_failure(e),
            _ => false,
        }
    }

    /// Whether the run must end although the server is fine (our own side broke).
    pub fn is_fatal(&self) -> bool {
        matches!(self, SessionError::Journal(_))
    }
}

/// A TLS handshake failure (certificate not trusted, no common ALPN): QUIC carries TLS
/// alerts as transport error codes 0x100..=0x1ff.
fn is_tls_failure(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => t.code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return false,
    };
    (0x100..0x200).contains(&u64::from(code))
}

/// The server's application close code for a refused credential (docs/protocol.md §10).
const CLOSE_UNAUTHORIZED: u32 = 2;

/// The connection error underneath a stream or connection failure, if that is what it was.
fn connection_error(e: &SessionError) -> Option<&quinn::ConnectionError> {
    match e {
        SessionError::Connection(c)
        | SessionError::Write(quinn::WriteError::ConnectionLost(c))
        | SessionError::Read(FrameIoError::Read(quinn::ReadError::ConnectionLost(c))) => Some(c),
        _ => None,
    }
}

/// The server closes with CLOSE_UNAUTHORIZED right after its Unauthorized error frame; when
/// the close wins the race the refusal must still read, and count, as one.
fn refine(e: SessionError) -> SessionError {
    if let Some(quinn::ConnectionError::ApplicationClosed(c)) = connection_error(&e) {
        if c.error_code == quinn::VarInt::from_u32(CLOSE_UNAUTHORIZED) {
            let why = String::from_utf8_lossy(&c.reason).into_owned();
            return SessionError::Refused(ErrorFrame::new(ErrorCode::Unauthorized, why));
        }
    }
    e
}

/// What every connection of a run needs.
pub(crate) struct Link {
    shared: Arc<Shared>,
    client_cfg: quinn::ClientConfig,
    hello: Hello,
    markers: mpsc::Sender<u64>,
}

impl Link {
    pub fn new(
        shared: Arc<Shared>,
        client_cfg: quinn::ClientConfig,
        markers: mpsc::Sender<u64>,
        agent_run: u64,
    ) -> Self {
        let cfg = &shared.cfg;
        let hello = Hello {
            version_min: 0,
            version_max: 0,
            features: features::HASHES
                | features::MARKER_NOTES
                | features::TRACKING_NOTES
                | features::SOURCE_LIMITS
                | if cfg.compress { features::LZ4 } else { 0 },
            // Random per run: the server resumes only within one run (a run saved at a clean
            // stop goes on in the next process, see `persist`).
            agent_run,
            source_id: cfg.source_id.clone(),
            credential: cfg.token.clone(),
            agent_version: format!("slipway-agent {}", env!("CARGO_PKG_VERSION")),
        };
        Link {
            shared,
            client_cfg,
            hello,
            markers,
        }
    }

    pub fn server(&self) -> String {
        self.shared.cfg.server.to_string()
    }
}

/// Runs one connection. `Ok` only when `shutdown` asked for the end (the connection is then
/// closed politely); `established` is set once every disk is open.
pub(crate) async fn run(
    link: &Link,
    epoch: u64,
    shutdown: &mut watch::Receiver<bool>,
    established: &mut bool,
) -> Result<(), SessionError> {
    let cfg = &link.shared.cfg;
    let connect = async {
        let addr = resolve(&cfg.server.lookup_string()).await?;
        let endpoint = cfg
            .tuning()
            .client_endpoint(addr)
            .map_err(SessionError::Endpoint)?;
        debug!(%addr, server_name = %cfg.server_name, "connecting");
        let conn = endpoint
            .connect_with(link.client_cfg.clone(), addr, &cfg.server_name)?
            .await?;
        Ok::<_, SessionError>((endpoint, conn))
    };
    let (endpoint, conn) = tokio::select! {
        r = connect => r?,
        _ = shutdown_requested(shutdown) => return Ok(()),
    };
    let r = drive(link, &conn, epoch, shutdown, established)
        .await
        .map_err(refine);
    let (code, reason): (u32, &[u8]) = if r.is_ok() {
        (0, b"done")
    } else {
        (1, b"error")
    };
    conn.close(code.into(), reason);
    // Let the close reach the server (and the server's last acks reach us) briefly.
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    r
}

/// Resolves when the run asks connections to end (or the run is gone).
pub(crate) async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn resolve(host_port: &str) -> Result<SocketAddr, SessionError> {
    let mut addrs =
        tokio::net::lookup_host(host_port)
            .await
            .map_err(|source| SessionError::Resolve {
                host: host_port.to_owned(),
                source,
            })?;
    addrs
        .next()
        .ok_or_else(|| SessionError::NoAddress(host_port.to_owned()))
}

async fn drive(
    link: &Link,
    conn: &quinn::Connection,
    epoch: u64,
    shutdown: &mut watch::Receiver<bool>,
    established: &mut bool,
) -> Result<(), SessionError> {
    let shared = &link.shared;
    let (mut ctl, mut ctl_recv) = conn.open_bi().await?;
    // Heartbeats and progress must not queue behind megabytes of disk data.
    let _ = ctl.set_priority(1);
    let mut hs = ClientHandshake::new(link.hello.clone());
    write_frame(&mut ctl, &hs.hello_frame()).await?;
    let first = read_frame(&mut ctl_recv, MAX_BODY_LEN)
        .await?
        .ok_or_else(|| SessionError::Closed("control".into()))?;
    let neg = hs.on_frame(first).map_err(|e| match e {
        HandshakeError::Refused(f) => SessionError::Refused(f),
        e => SessionError::Handshake(e),
    })?;
    info!(
        server = %link.server(),
        server_version = %neg.peer_version,
        lz4 = neg.lz4(),
        max_write = neg.max_write,
        epoch,
        "connected"
    );
    shared
        .max_write
        .store(neg.max_write, std::sync::atomic::Ordering::Relaxed);
    let lz4 = neg.lz4();

    let mut tasks: JoinSet<Result<(), SessionError>> = JoinSet::new();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Frame>(64);
    tasks.spawn(async move {
        loop {
            match read_frame(&mut ctl_recv, MAX_BODY_LEN).await? {
                Some(f) => {
                    if ctl_tx.send(f).await.is_err() {
                        return Ok(());
                    }
                }
                None => return Err(SessionError::Closed("control".into())),
            }
        }
    });

    let n = shared.disks.len();
    let mut handles: Vec<Option<u32>> = vec![None; n];
    let mut reported: Vec<Option<Report>> = vec![None; n];
    // Disks are opened one at a time: (disk, request id) of the open in flight.
    let mut next_request = 1u32;
    send_open(&mut ctl, shared, 0, next_request).await?;
    let mut opening: Option<(usize, u32)> = Some((0, next_request));

    let hb_period = Duration::from_millis(u64::from(neg.heartbeat_ms));
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + hb_period, hb_period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;

    loop {
        tokio::select! {
            _ = shared.notes_wake.notified() => {
                // How consistent each new marker's point is, for the restore point's record.
                let notes: Vec<_> = shared.notes.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
                if neg.features & features::MARKER_NOTES != 0 {
                    for n in notes {
                        write_frame(&mut ctl, &Frame::MarkerNote(n)).await?;
                    }
                }
                if shared.tracking_changed.swap(false, std::sync::atomic::Ordering::AcqRel)
                    && neg.features & features::TRACKING_NOTES != 0
                {
                    for (disk, h) in handles.iter().enumerate() {
                        if let Some(h) = h {
                            send_tracking_note(&mut ctl, shared, disk, *h).await?;
                        }
                    }
                }
            }
            _ = shutdown_requested(shutdown) => {
                // Tell the server where each disk stands before leaving.
                send_progress(&mut ctl, shared, &handles, &mut reported, true).await?;
                // Closing the connection may drop data the server has not read yet; the
                // server closes by itself once it has read the finished control stream.
                let _ = ctl.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), ctl.stopped()).await;
                return Ok(());
            }
            r = tasks.join_next() => return Err(match r {
                Some(Ok(Err(e))) => e,
                Some(Ok(Ok(()))) | None => SessionError::Closed("disk".into()),
                Some(Err(e)) => SessionError::Protocol(format!("stream task failed: {e}")),
            }),
            // When the reader ends, its error comes out of `tasks`.
            Some(f) = ctl_rx.recv() => {
                match f {
                    Frame::Heartbeat(_) => {}
                    Frame::ChunkHashes(h) => {
                        if let Some(disk) = handles.iter().position(|x| *x == Some(h.handle)) {
                            shared.peer_hashes[disk].add(h.first, &h.hashes);
                        }
                    }
                    Frame::SourceLimits(l) => {
                        let before = shared.throttle.pushed_mbps();
                        shared.throttle.set_pushed_bps(l.bandwidth_bps);
                        let now = shared.throttle.pushed_mbps();
                        if now != before {
                            info!(
                                server_limit_mbps = ?now,
                                in_force_mbps = ?shared.throttle.effective_mbps(),
                                "bandwidth limit set by the server"
                            );
                        }
                    }
                    Frame::MarkerRequest(m) => {
                        debug!(marker_id = m.marker_id, "marker requested");
                        if link.markers.try_send(m.marker_id).is_err() {
                            warn!(marker_id = m.marker_id, "too many marker requests queued; dropping one");
                        }
                    }
                    Frame::DiskOpened(o) => {
                        let Some((disk, req)) = opening.take().filter(|(_, r)| *r == o.request_id) else {
                            return Err(SessionError::Protocol(format!(
                                "DiskOpened for request {} which is not the open in flight",
                                o.request_id
                            )));
                        };
                        if o.handle == NO_HANDLE {
                            return Err(SessionError::Protocol("DiskOpened with no handle".into()));
                        }
                        debug!(request = req, "disk opened");
                        // Checksum resync: the volume holds something; ask what, before the
                        // pass starts reading, and send only the chunks that differ.
                        let peer = &shared.peer_hashes[disk];
                        // (The server hashes chunks of 256 KiB or more.)
                        let ask = o.resume == slipway_proto::ResumeKind::Resync
                            && neg.features & slipway_proto::features::HASHES != 0
                            && shared.cfg.chunk_size >= 256 << 10;
                        if ask {
                            peer.begin(u64::from(shared.cfg.chunk_size));
                        } else {
                            // Hashes asked on an earlier connection will not all come.
                            peer.give_up();
                        }
                        apply_open(shared, disk, epoch, &o, neg.max_write)?;
                        if neg.features & features::TRACKING_NOTES != 0 {
                            send_tracking_note(&mut ctl, shared, disk, o.handle).await?;
                        }
                        if ask {
                            let f = Frame::HashRequest(slipway_proto::HashRequest {
                                handle: o.handle,
                                chunk_size: shared.cfg.chunk_size,
                            });
                            write_frame(&mut ctl, &f).await?;
                        }
                        handles[disk] = Some(o.handle);
                        reported[disk] = None;
                        let (send, recv) = conn.open_bi().await?;
                        tasks.spawn(disk_sender(shared.clone(), disk, epoch, o.handle, send, lz4));
                        tasks.spawn(disk_acker(shared.clone(), disk, epoch, o.handle, recv));
                        send_progress(&mut ctl, shared, &handles, &mut reported, true).await?;
                        if disk + 1 < n {
                            next_request = next_request.wrapping_add(1);
                            send_open(&mut ctl, shared, disk + 1, next_request).await?;
                            opening = Some((disk + 1, next_request));
                        } else {
                            *established = true;
                            info!(disks = n, "all disks open");
                        }
                    }
                    Frame::Error(e) => {
                        return Err(match opening {
                            // The answer to the open in flight.
                            Some((disk, _)) if e.handle == NO_HANDLE => SessionError::DiskRefused {
                                disk: shared.disks[disk].id.clone(),
                                error: e,
                            },
                            _ => SessionError::Refused(e),
                        });
                    }
                    other => {
                        return Err(SessionError::Protocol(format!(
                            "unexpected {:?} frame on the control stream",
                            other.frame_type()
                        )));
                    }
                }
            }
            _ = heartbeat.tick() => {
                nonce = nonce.wrapping_add(1);
                write_frame(&mut ctl, &Frame::Heartbeat(nonce)).await?;
            }
            _ = progress.tick() => {
                send_progress(&mut ctl, shared, &handles, &mut reported, false).await?;
            }
            _ = shared.progress_now.notified() => {
                send_progress(&mut ctl, shared, &handles, &mut reported, true).await?;
            }
        }
    }
}

/// Tells the server how the disk's changes are found (kernel tracking or rescans, and why).
async fn send_tracking_note(
    ctl: &mut quinn::SendStream,
    shared: &Shared,
    disk: usize,
    handle: u32,
) -> Result<(), SessionError> {
    let (tracking, mut reason) = shared.tracking_note(disk);
    reason.truncate(1024);
    let f = Frame::TrackingNote(slipway_proto::TrackingNote {
        handle,
        tracking,
        reason,
    });
    write_frame(ctl, &f).await?;
    Ok(())
}

async fn send_open(
    ctl: &mut quinn::SendStream,
    shared: &Shared,
    disk: usize,
    request_id: u32,
) -> Result<(), SessionError> {
    let d = &shared.disks[disk];
    let f = Frame::DiskOpen(DiskOpen {
        request_id,
        disk_id: d.id.clone(),
        size: d.size,
        block_size: shared.cfg.block_size,
    });
    write_frame(ctl, &f).await?;
    Ok(())
}

/// Applies a `DiskOpened` to the state; journals and frees what a resume point released.
fn apply_open(
    shared: &Shared,
    disk: usize,
    epoch: u64,
    o: &slipway_proto::DiskOpened,
    max_write: u32,
) -> Result<(), SessionError> {
    let id = &shared.disks[disk].id;
    let outcome = shared.lock().open(
        disk,
        epoch,
        o.handle,
        o.resume,
        o.durable_seq,
        u64::from(max_write),
    );
    match outcome {
        OpenOutcome::Resumed { released, resend } => {
            shared.release_window(released.charge);
            if let Some(j) = &shared.journal {
                j.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(id, &released.ops)?;
            }
            info!(disk = %id, durable_seq = o.durable_seq, resend, "resuming");
        }
        OpenOutcome::Restarted {
            kind,
            freed,
            overruled,
        } => {
            shared.release_window(freed);
            if let Some(why) = overruled {
                warn!(disk = %id, durable_seq = o.durable_seq, "the server offered a resume, resyncing instead: {why}");
            }
            info!(disk = %id, resume = ?o.resume, pass = kind.as_str(), "pass starts from offset 0");
            shared.pass_wake[disk].notify_one();
        }
    }
    shared.changed.notify_one();
    shared.send_wake[disk].notify_one();
    Ok(())
}

/// Sends a `Progress` for each open disk whose report changed. With `phase_only`, a change of
/// backlog alone does not count (those go out with the once-a-second tick).
async fn send_progress(
    ctl: &mut quinn::SendStream,
    shared: &Shared,
    handles: &[Option<u32>],
    reported: &mut [Option<Report>],
    phase_only: bool,
) -> Result<(), SessionError> {
    let mut frames = Vec::new();
    {
        let s = shared.lock();
        for (disk, h) in handles.iter().enumerate() {
            let (Some(handle), Some(r)) = (*h, s.report(disk)) else {
                continue;
            };
            let changed = match reported[disk] {
                None => true,
                Some(old) if phase_only => (old.phase, old.pass_seq) != (r.phase, r.pass_seq),
                Some(old) => old != r,
            };
            if changed {
                reported[disk] = Some(r);
                frames.push(Frame::Progress(Progress {
                    handle,
                    phase: r.phase,
                    backlog_bytes: r.backlog_bytes,
                    pass_seq: r.pass_seq,
                }));
            }
        }
    }
    for f in &frames {
        write_frame(ctl, f).await?;
    }
    Ok(())
}

/// Ops handed to the transport per lock.
const SEND_BATCH: usize = 32;

/// Walks the disk's retained queue and writes every op not yet sent on this connection.
async fn disk_sender(
    shared: Arc<Shared>,
    disk: usize,
    epoch: u64,
    handle: u32,
    mut send: quinn::SendStream,
    lz4: bool,
) -> Result<(), SessionError> {
    write_frame(&mut send, &Frame::StreamBind(StreamBind { handle })).await?;
    let Ok(mut after) = shared.lock().send_from(disk, epoch) else {
        return Ok(());
    };
    let mut batch: Vec<Op> = Vec::with_capacity(SEND_BATCH);
    loop {
        let wake = shared.send_wake[disk].notified();
        if shared
            .lock()
            .unsent(disk, epoch, after, SEND_BATCH, &mut batch)
            .is_err()
        {
            return Ok(());
        }
        if batch.is_empty() {
            wake.await;
            continue;
        }
        let mut payload = 0;
        for op in batch.drain(..) {
            match op.frame(handle) {
                Frame::Write(w) => {
                    payload += w.data.len() as u64;
                    // The source's bandwidth limit (see `throttle`), shared by all disks.
                    shared.throttle.take(w.data.len() as u64).await;
                    write_write(&mut send, &w, lz4).await?;
                }
                f => write_frame(&mut send, &f).await?,
            }
            after = op.seq;
        }
        match shared.lock().mark_sent(disk, epoch, after, payload) {
            Ok(true) => shared.progress_now.notify_one(),
            Ok(false) => {}
            Err(_) => return Ok(()),
        }
    }
}

/// Reads the disk stream: acks release ops (and go to the journal); an error ends the stream.
async fn disk_acker(
    shared: Arc<Shared>,
    disk: usize,
    epoch: u64,
    handle: u32,
    mut recv: quinn::RecvStream,
) -> Result<(), SessionError> {
    let id = shared.disks[disk].id.clone();
    loop {
        let f = read_frame(&mut recv, MAX_BODY_LEN)
            .await?
            .ok_or_else(|| SessionError::Closed(format!("disk {id}")))?;
        match f {
            Frame::Ack(a) if a.handle == handle => {
                let released = match shared.lock().ack(disk, epoch, a.seq) {
                    Ok(r) => r,
                    Err(AckError::Stale(_)) => return Ok(()),
                    Err(e) => return Err(SessionError::Protocol(format!("disk {id}: {e}"))),
                };
                shared.release_window(released.charge);
                if let Some(j) = &shared.journal {
                    j.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&id, &released.ops)?;
                }
                shared.changed.notify_one();
            }
            Frame::Ack(a) => {
                return Err(SessionError::Protocol(format!(
                    "ack for handle {} on the stream of handle {handle}",
                    a.handle
                )))
            }
            Frame::Error(error) => return Err(SessionError::DiskRefused { disk: id, error }),
            Frame::Heartbeat(_) => {}
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {:?} frame on the stream of disk {id}",
                    other.frame_type()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanence_follows_the_error_code() {
        let refused = |code| SessionError::Refused(ErrorFrame::new(code, "x"));
        assert!(refused(ErrorCode::Unauthorized).is_permanent());
        assert!(refused(ErrorCode::BadVersion).is_permanent());
        assert!(!refused(ErrorCode::Draining).is_permanent());
        assert!(!refused(ErrorCode::Superseded).is_permanent());
        let disk = SessionError::DiskRefused {
            disk: "sda".into(),
            error: ErrorFrame::for_disk(ErrorCode::DiskMismatch, 1, "size differs"),
        };
        assert!(disk.is_permanent());
        assert!(!SessionError::Closed("control".into()).is_permanent());
        assert!(SessionError::Handshake(HandshakeError::BadWelcome("x")).is_permanent());
        assert!(!SessionError::Protocol("x".into()).is_permanent());
    }

    #[test]
    fn an_unauthorized_close_is_a_refusal() {
        let close = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(2),
            reason: bytes::Bytes::from_static(b"credential refused for source \"x\""),
        });
        let e = refine(SessionError::Read(FrameIoError::Read(
            quinn::ReadError::ConnectionLost(close.clone()),
        )));
        assert!(e.is_permanent());
        assert_eq!(
            e.to_string(),
            "server refused: credential refused for source \"x\" (unauthorized)"
        );
        // Other closes (superseded, draining) are retried.
        let other = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(3),
            reason: bytes::Bytes::new(),
        });
        assert!(!refine(SessionError::Connection(other)).is_permanent());
    }

    #[test]
    fn refusal_messages_read_as_a_sentence() {
        let e = SessionError::Refused(ErrorFrame::new(
            ErrorCode::Unauthorized,
            "credential refused for source \"web-01\"",
        ));
        assert_eq!(
            e.to_string(),
            "server refused: credential refused for source \"web-01\" (unauthorized)"
        );
    }
}
