//! The agent against a small in-process server that follows the session rules of
//! docs/protocol.md: real QUIC, real TLS pinning, real frames, volumes in memory.
//!
//! The fake server checks what a real one checks (handles, per-disk increasing seq above the
//! resume point, alignment, bounds) and can drop connections on purpose, so resume and resend
//! are exercised without the real server's disk I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slipway_agent::config::RawArgs;
use slipway_agent::{replicate_until, Config, Outcome, Progress};
use slipway_net::tls::ServerIdentity;
use slipway_net::{read_frame, write_frame, Tuning};
use slipway_proto::{
    features, Ack, DiskOpened, Frame, MarkerRequest, Phase, ResumeKind, ServerHandshake,
    ServerParams, MAX_BODY_LEN,
};
use tokio::sync::mpsc;

#[derive(Debug, Default)]
struct Vol {
    data: Vec<u8>,
    block: u32,
    agent_run: u64,
    /// Acked (durable) position.
    durable: u64,
}

#[derive(Debug, Default)]
struct State {
    volumes: HashMap<String, Vol>,
    /// Close the connection after this many applied ops, this many times.
    faults: u32,
    ops_per_fault: u64,
    connections: u32,
    /// (disk, seq, marker_id) in arrival order.
    markers: Vec<(String, u64, u64)>,
    /// (disk, seq) of every op, in arrival order.
    ops: Vec<(String, u64)>,
    /// Last progress per disk id.
    progress: HashMap<String, (Phase, u64)>,
    /// Send a MarkerRequest with this id once every disk of a connection is open.
    marker_request: Option<u64>,
    /// Protocol violations seen (the test fails if any).
    violations: Vec<String>,
    /// Do not keep write payloads (throughput runs).
    discard: bool,
}

struct FakeServer {
    addr: SocketAddr,
    fingerprint: String,
    state: Arc<Mutex<State>>,
    _dir: tempfile::TempDir,
}

const TOKEN: &str = "good-token";

impl FakeServer {
    async fn start(disks_per_conn: usize) -> FakeServer {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = ServerIdentity::load_or_generate(dir.path(), &["localhost".into()]).unwrap();
        let tuning = Tuning::default();
        let endpoint = tuning
            .server_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                id.server_config(&tuning).unwrap(),
            )
            .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        tokio::spawn(async move {
            while let Some(inc) = endpoint.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = inc.await {
                        let _ = serve(conn, st, disks_per_conn).await;
                    }
                });
            }
        });
        FakeServer {
            addr,
            fingerprint: id.fingerprint(),
            state,
            _dir: dir,
        }
    }

    fn volume(&self, disk: &str) -> Vec<u8> {
        self.state.lock().unwrap().volumes[disk].data.clone()
    }
}

fn violation(st: &Arc<Mutex<State>>, v: String) {
    st.lock().unwrap().violations.push(v);
}

async fn serve(
    conn: quinn::Connection,
    st: Arc<Mutex<State>>,
    disks_per_conn: usize,
) -> anyhow::Result<()> {
    st.lock().unwrap().connections += 1;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let hello = read_frame(&mut recv, 65536).await?.unwrap();
    let mut hs = ServerHandshake::new(ServerParams {
        features: features::LZ4,
        heartbeat_ms: 1000,
        max_write: 1 << 20,
        server_version: "fake".into(),
    });
    let neg = match hs.on_frame(hello, |_, cred| cred == TOKEN) {
        Ok((welcome, n)) => {
            write_frame(&mut send, &welcome).await?;
            n
        }
        Err((_, err)) => {
            write_frame(&mut send, &err).await?;
            let _ = send.finish();
            tokio::time::sleep(Duration::from_millis(300)).await;
            conn.close(2u32.into(), b"credential refused");
            return Ok(());
        }
    };
    // handle -> disk id
    let handles: Arc<Mutex<HashMap<u32, String>>> = Arc::default();
    let conn2 = conn.clone();
    let (st2, h2) = (st.clone(), handles.clone());
    let applied = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((s, r)) = conn2.accept_bi().await {
            tokio::spawn(disk_stream(
                conn2.clone(),
                s,
                r,
                st2.clone(),
                h2.clone(),
                applied.clone(),
            ));
        }
    });
    let mut next_handle = 1;
    loop {
        let Some(f) = read_frame(&mut recv, 65536).await? else {
            return Ok(());
        };
        match f {
            Frame::DiskOpen(o) => {
                let (resume, durable) = {
                    let mut s = st.lock().unwrap();
                    match s.volumes.get_mut(&o.disk_id) {
                        Some(v) if v.agent_run == neg.agent_run => (ResumeKind::Resume, v.durable),
                        Some(v) => {
                            v.agent_run = neg.agent_run;
                            v.durable = 0;
                            (ResumeKind::Resync, 0)
                        }
                        None => {
                            s.volumes.insert(
                                o.disk_id.clone(),
                                Vol {
                                    data: vec![0; o.size as usize],
                                    block: o.block_size,
                                    agent_run: neg.agent_run,
                                    durable: 0,
                                },
                            );
                            (ResumeKind::Fresh, 0)
                        }
                    }
                };
                handles
                    .lock()
                    .unwrap()
                    .insert(next_handle, o.disk_id.clone());
                write_frame(
                    &mut send,
                    &Frame::DiskOpened(DiskOpened {
                        request_id: o.request_id,
                        handle: next_handle,
                        resume,
                        durable_seq: durable,
                    }),
                )
                .await?;
                next_handle += 1;
                if handles.lock().unwrap().len() == disks_per_conn {
                    let req = st.lock().unwrap().marker_request.take();
                    if let Some(marker_id) = req {
                        write_frame(
                            &mut send,
                            &Frame::MarkerRequest(MarkerRequest { marker_id }),
                        )
                        .await?;
                    }
                }
            }
            Frame::Progress(p) => {
                let id = handles.lock().unwrap().get(&p.handle).cloned();
                match id {
                    Some(id) => {
                        st.lock()
                            .unwrap()
                            .progress
                            .insert(id, (p.phase, p.pass_seq));
                    }
                    None => violation(&st, format!("progress for unknown handle {}", p.handle)),
                }
            }
            Frame::Heartbeat(_) => {}
            other => violation(
                &st,
                format!("{:?} on the control stream", other.frame_type()),
            ),
        }
    }
}

async fn disk_stream(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    st: Arc<Mutex<State>>,
    handles: Arc<Mutex<HashMap<u32, String>>>,
    applied: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<()> {
    let Some(Frame::StreamBind(b)) = read_frame(&mut recv, 64).await? else {
        violation(&st, "disk stream without StreamBind".into());
        return Ok(());
    };
    let Some(id) = handles.lock().unwrap().get(&b.handle).cloned() else {
        violation(&st, format!("StreamBind for unknown handle {}", b.handle));
        return Ok(());
    };
    let mut last = st.lock().unwrap().volumes[&id].durable;
    let mut unacked = 0;
    // A reader feeding an applier: the applier acks every 4 ops and whenever the queue
    // drains, like a group commit.
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let reader = tokio::spawn(async move {
        while let Ok(Some(f)) = read_frame(&mut recv, MAX_BODY_LEN).await {
            if tx.send(f).await.is_err() {
                break;
            }
        }
    });
    while let Some(f) = rx.recv().await {
        let (handle, seq) = {
            let mut s = st.lock().unwrap();
            let s = &mut *s;
            let v = s.volumes.get_mut(&id).unwrap();
            let bs = u64::from(v.block);
            let (handle, seq) = match &f {
                Frame::Write(w) => {
                    let (o, l) = (w.offset, w.data.len() as u64);
                    if o % bs != 0 || l % bs != 0 || l == 0 || o + l > v.data.len() as u64 {
                        s.violations.push(format!("{id}: bad write {o}+{l}"));
                    } else if !s.discard {
                        v.data[o as usize..(o + l) as usize].copy_from_slice(&w.data);
                    }
                    if l > 1 << 20 {
                        s.violations.push(format!("{id}: write of {l} > max_write"));
                    }
                    (w.handle, w.seq)
                }
                Frame::WriteZeroes(z) => {
                    let (o, l) = (z.offset, z.len);
                    if o % bs != 0 || l % bs != 0 || l == 0 || o + l > v.data.len() as u64 {
                        s.violations.push(format!("{id}: bad zeroes {o}+{l}"));
                    } else {
                        v.data[o as usize..(o + l) as usize].fill(0);
                    }
                    (z.handle, z.seq)
                }
                Frame::Marker(m) => {
                    s.markers.push((id.clone(), m.seq, m.marker_id));
                    (m.handle, m.seq)
                }
                other => {
                    s.violations
                        .push(format!("{:?} on a disk stream", other.frame_type()));
                    continue;
                }
            };
            if handle != b.handle {
                s.violations
                    .push(format!("{id}: handle {handle} on stream of {}", b.handle));
            }
            if seq <= last {
                s.violations.push(format!("{id}: seq {seq} after {last}"));
            }
            s.ops.push((id.clone(), seq));
            (handle, seq)
        };
        last = seq;
        unacked += 1;
        let n = applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let fault = {
            let mut s = st.lock().unwrap();
            if s.faults > 0 && n >= s.ops_per_fault {
                s.faults -= 1;
                true
            } else {
                false
            }
        };
        if fault {
            // Applied but not acked: the agent must resend these.
            conn.close(0u32.into(), b"fault injected");
            reader.abort();
            return Ok(());
        }
        if unacked == 4 || rx.is_empty() {
            unacked = 0;
            st.lock().unwrap().volumes.get_mut(&id).unwrap().durable = seq;
            write_frame(&mut send, &Frame::Ack(Ack { handle, seq })).await?;
        }
    }
    Ok(())
}

/// A disk with random data, zero chunks and zero blocks inside data.
fn make_disk(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = vec![0u8; size];
    for (i, c) in v.chunks_mut(64 << 10).enumerate() {
        match (next() % 4, i % 5) {
            (0, _) => {} // zero chunk
            (_, 3) => {
                // data with zero 4 KiB holes
                for b in c.iter_mut() {
                    *b = next() as u8;
                }
                for h in (0..c.len()).step_by(8192) {
                    let e = (h + 4096).min(c.len());
                    c[h..e].fill(0);
                }
            }
            _ => {
                for b in c.iter_mut() {
                    *b = (next() % 7) as u8; // compressible
                }
            }
        }
    }
    std::fs::write(path, &v).unwrap();
    v
}

fn config(
    server: &FakeServer,
    disks: &[PathBuf],
    token: &str,
    extra: impl FnOnce(&mut RawArgs),
) -> Config {
    let mut raw = RawArgs {
        server: server.addr.to_string(),
        server_fingerprint: Some(server.fingerprint.clone()),
        source_id: "src-1".into(),
        token: token.into(),
        disks: disks.iter().map(|p| p.display().to_string()).collect(),
        rescan_interval: "200ms".into(),
        block_size: "512".into(),
        chunk_size: "256KiB".into(),
        window: "4MiB".into(),
        max_udp_payload: 6500,
        ..RawArgs::default()
    };
    extra(&mut raw);
    Config::from_raw(raw, |p| p.exists()).unwrap()
}

fn no_stop() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    std::mem::forget(tx);
    rx
}

fn assert_clean(server: &FakeServer) {
    let v = &server.state.lock().unwrap().violations;
    assert!(v.is_empty(), "protocol violations: {v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_replicate_byte_identically_and_end_continuous() {
    let server = FakeServer::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let da = make_disk(&a, 3 << 20, 1);
    let db = make_disk(&b, (1 << 20) + 4096, 2);
    let journal = dir.path().join("acks");
    let cfg = config(&server, &[a, b], TOKEN, |r| {
        r.ack_journal = Some(journal.clone());
    });
    let sum = replicate_until(cfg, Progress::Off, no_stop())
        .await
        .unwrap();
    assert_eq!(sum.outcome, Outcome::Complete);
    assert_clean(&server);
    assert!(server.volume("a.img") == da, "a.img differs");
    assert!(server.volume("b.img") == db, "b.img differs");
    let s = server.state.lock().unwrap();
    for d in ["a.img", "b.img"] {
        let (phase, pass_seq) = s.progress[d];
        assert_eq!(phase, Phase::Continuous, "{d}");
        let last = s
            .ops
            .iter()
            .filter(|(x, _)| x == d)
            .map(|(_, q)| *q)
            .max()
            .unwrap();
        assert_eq!(pass_seq, last, "{d}: pass_seq is the last op of the pass");
        assert!(s.volumes[d].durable >= pass_seq);
    }
    // One global order: no seq used twice across the disks.
    let mut seqs: Vec<u64> = s.ops.iter().map(|x| x.1).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), s.ops.len());
    // Every journaled range is the source's data.
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(text.lines().count() > 10);
    for l in text.lines() {
        let p: Vec<&str> = l.split(' ').collect();
        let (off, len): (usize, usize) = (p[2].parse().unwrap(), p[3].parse().unwrap());
        let src = if p[0] == "a.img" { &da } else { &db };
        assert_eq!(&s.volumes[p[0]].data[off..off + len], &src[off..off + len]);
    }
    let a = &sum.disks[0];
    assert_eq!(a.id, "a.img");
    assert!(a.payload_acked > 0 && a.payload_sent >= a.payload_acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_resume_and_nothing_is_lost() {
    let server = FakeServer::start(1).await;
    {
        let mut s = server.state.lock().unwrap();
        s.faults = 3;
        s.ops_per_fault = 12;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("disk");
    let da = make_disk(&a, 4 << 20, 3);
    let cfg = config(&server, &[a], TOKEN, |r| r.chunk_size = "64KiB".into());
    let sum = tokio::time::timeout(
        Duration::from_secs(60),
        replicate_until(cfg, Progress::Off, no_stop()),
    )
    .await
    .expect("finishes despite the faults")
    .unwrap();
    assert_eq!(sum.outcome, Outcome::Complete);
    assert_clean(&server);
    assert!(server.volume("disk") == da, "replica differs");
    let s = server.state.lock().unwrap();
    assert_eq!(s.faults, 0, "every fault was injected");
    assert_eq!(s.connections, 4, "three faults, four connections");
    // Resent ops reuse their seq: some seqs arrived more than once.
    let mut seqs: Vec<u64> = s.ops.iter().map(|x| x.1).collect();
    let n = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert!(seqs.len() < n, "some ops were resent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_of_another_run_is_resynced_zeroes_included() {
    let server = FakeServer::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("disk");
    let da = make_disk(&a, 2 << 20, 4);
    // The server holds garbage from an older run.
    server.state.lock().unwrap().volumes.insert(
        "disk".into(),
        Vol {
            data: vec![0xEE; 2 << 20],
            block: 512,
            agent_run: 1,
            durable: 77,
        },
    );
    let cfg = config(&server, &[a], TOKEN, |_| {});
    let sum = replicate_until(cfg, Progress::Off, no_stop())
        .await
        .unwrap();
    assert_eq!(sum.outcome, Outcome::Complete);
    assert_clean(&server);
    assert!(
        server.volume("disk") == da,
        "zero ranges were overwritten too"
    );
    assert!(sum.disks[0].zeroes_acked > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_takes_one_seq_on_every_disk() {
    let server = FakeServer::start(2).await;
    server.state.lock().unwrap().marker_request = Some(42);
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    make_disk(&a, 2 << 20, 5);
    make_disk(&b, 2 << 20, 6);
    let cfg = config(&server, &[a, b], TOKEN, |_| {});
    replicate_until(cfg, Progress::Off, no_stop())
        .await
        .unwrap();
    assert_clean(&server);
    let s = server.state.lock().unwrap();
    let m: Vec<_> = s.markers.iter().filter(|x| x.2 == 42).collect();
    let disks: std::collections::HashSet<_> = m.iter().map(|x| x.0.clone()).collect();
    assert_eq!(disks.len(), 2, "{m:?}");
    assert!(
        m.iter().all(|x| x.1 == m[0].1),
        "same seq everywhere: {m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_sends_what_changed() {
    let server = FakeServer::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("disk");
    let mut da = make_disk(&a, 2 << 20, 7);
    let cfg = config(&server, std::slice::from_ref(&a), TOKEN, |r| {
        r.follow = true
    });
    let (stop_tx, stop_rx) = mpsc::channel(2);
    let run = tokio::spawn(replicate_until(cfg, Progress::Off, stop_rx));

    let wait_for = |want: Vec<u8>| {
        let st = server.state.clone();
        async move {
            for _ in 0..500 {
                if st
                    .lock()
                    .unwrap()
                    .volumes
                    .get("disk")
                    .is_some_and(|v| v.data == want)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the replica did not catch up");
        }
    };
    wait_for(da.clone()).await;
    let ops_before = server.state.lock().unwrap().ops.len();
    // Change a few blocks, and turn a data chunk into zeroes.
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(&[0xAB; 1024], 4096).unwrap();
    da[4096..5120].fill(0xAB);
    let z = 1 << 20;
    f.write_all_at(&vec![0u8; 256 << 10], z as u64).unwrap();
    da[z..z + (256 << 10)].fill(0);
    wait_for(da.clone()).await;
    let sent = server.state.lock().unwrap().ops.len() - ops_before;
    // One op per changed chunk (a third if a rescan caught the 1 KiB write half done).
    assert!(
        (2..=3).contains(&sent),
        "only the changed chunks went out ({sent} ops)"
    );

    stop_tx.send(()).await.unwrap();
    let sum = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            sum.outcome,
            Outcome::Stopped {
                all_acked: true,
                ..
            }
        ),
        "{:?}",
        sum.outcome
    );
    assert_clean(&server);
    let s = server.state.lock().unwrap();
    assert_eq!(s.progress["disk"].0, Phase::Continuous);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_is_permanent() {
    let server = FakeServer::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("disk");
    make_disk(&a, 1 << 20, 8);
    let cfg = config(&server, &[a], "wrong", |_| {});
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        replicate_until(cfg, Progress::Off, no_stop()),
    )
    .await
    .expect("gives up at once")
    .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("server refused"), "{e}");
    assert!(e.to_string().contains("unauthorized"), "{e}");
    assert_eq!(server.state.lock().unwrap().connections, 1, "no retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fingerprint_is_permanent() {
    let server = FakeServer::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("disk");
    make_disk(&a, 1 << 20, 9);
    let cfg = config(&server, &[a], TOKEN, |r| {
        r.server_fingerprint = Some("00".repeat(32))
    });
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        replicate_until(cfg, Progress::Off, no_stop()),
    )
    .await
    .expect("gives up at once")
    .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
}

/// Throughput of the agent over loopback against a server that only decodes and acks.
/// `cargo test --release -p slipway-agent --test fake_server -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let size = 512usize << 20;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("disk");
    {
        // Incompressible data, no holes.
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut v = vec![0u8; size];
        for w in v.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        std::fs::write(&a, &v).unwrap();
    }
    for compress in [false, true] {
        let server = FakeServer::start(1).await;
        server.state.lock().unwrap().discard = true;
        let cfg = config(&server, std::slice::from_ref(&a), TOKEN, |r| {
            r.chunk_size = "1MiB".into();
            r.window = "128MiB".into();
            r.block_size = "4096".into();
            r.no_compress = !compress;
        });
        let t = std::time::Instant::now();
        let sum = replicate_until(cfg, Progress::Off, no_stop())
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(sum.disks[0].payload_acked, size as u64);
        println!(
            "lz4 offered: {compress}: {} MiB in {secs:.2} s = {:.0} MB/s",
            size >> 20,
            size as f64 / secs / 1e6
        );
    }
}

/// CPU cost of follow-mode rescans of an idle disk (the bench's scenario 4 shape: 16 MiB,
/// 4 KiB chunks, every 100 ms).
/// `cargo test --release -p slipway-agent --test fake_server -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rescan_cost() {
    fn cpu_secs() -> f64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }
    let server = FakeServer::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("disk");
    let da = make_disk(&a, 16 << 20, 11);
    let cfg = config(&server, std::slice::from_ref(&a), TOKEN, |r| {
        r.follow = true;
        r.rescan_interval = "100ms".into();
        r.chunk_size = "4KiB".into();
    });
    let (stop_tx, stop_rx) = mpsc::channel(2);
    let run = tokio::spawn(replicate_until(cfg, Progress::Off, stop_rx));
    for _ in 0..500 {
        if server
            .state
            .lock()
            .unwrap()
            .volumes
            .get("disk")
            .is_some_and(|v| v.data == da)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (c0, t0) = (cpu_secs(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu = (cpu_secs() - c0) / t0.elapsed().as_secs_f64();
    println!(
        "idle 16 MiB disk, 4 KiB chunks, rescans every 100 ms: {:.1}% of one core",
        cpu * 100.0
    );
    stop_tx.send(()).await.unwrap();
    run.await.unwrap().unwrap();
}
