//! The service features of a real run against a minimal loopback server (real QUIC, TLS
//! pinning, frames; every write acknowledged at once): the bandwidth limit holds the agent to
//! its rate where it sends, and the status file follows the run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slipway_agent::config::RawArgs;
use slipway_agent::status::{self, Liveness};
use slipway_agent::{replicate_until, Config, Outcome, Progress};
use slipway_net::tls::ServerIdentity;
use slipway_net::{read_frame, write_frame, Tuning};
use slipway_proto::{
    features, Ack, DiskOpened, Frame, ResumeKind, ServerHandshake, ServerParams, MAX_BODY_LEN,
};
use tokio::sync::mpsc;

const TOKEN: &str = "good-token";

/// Write payload bytes received, and when the first and last write arrived.
#[derive(Debug, Default)]
struct Received {
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

struct Server {
    addr: SocketAddr,
    fingerprint: String,
    received: Arc<Mutex<Received>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
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
        let received = Arc::new(Mutex::new(Received::default()));
        let r = received.clone();
        tokio::spawn(async move {
            while let Some(inc) = endpoint.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = inc.await {
                        let _ = serve(conn, r).await;
                    }
                });
            }
        });
        Server {
            addr,
            fingerprint: id.fingerprint(),
            received,
            _dir: dir,
        }
    }
}

async fn serve(conn: quinn::Connection, received: Arc<Mutex<Received>>) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let hello = read_frame(&mut recv, 65536).await?.unwrap();
    let mut hs = ServerHandshake::new(ServerParams {
        features: features::LZ4,
        heartbeat_ms: 1000,
        max_write: 1 << 20,
        server_version: "loopback".into(),
    });
    let Ok((welcome, _)) = hs.on_frame(hello, |_, cred| cred == TOKEN) else {
        anyhow::bail!("refused");
    };
    write_frame(&mut send, &welcome).await?;
    let c2 = conn.clone();
    tokio::spawn(async move {
        while let Ok((s, r)) = c2.accept_bi().await {
            tokio::spawn(disk_stream(s, r, received.clone()));
        }
    });
    let mut handles: HashMap<String, u32> = HashMap::new();
    while let Some(f) = read_frame(&mut recv, 65536).await? {
        if let Frame::DiskOpen(o) = f {
            let n = handles.len() as u32 + 1;
            let handle = *handles.entry(o.disk_id).or_insert(n);
            let opened = DiskOpened {
                request_id: o.request_id,
                handle,
                resume: ResumeKind::Fresh,
                durable_seq: 0,
            };
            write_frame(&mut send, &Frame::DiskOpened(opened)).await?;
        }
    }
    Ok(())
}

async fn disk_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    received: Arc<Mutex<Received>>,
) -> anyhow::Result<()> {
    let Some(Frame::StreamBind(b)) = read_frame(&mut recv, 64).await? else {
        anyhow::bail!("no StreamBind");
    };
    while let Some(f) = read_frame(&mut recv, MAX_BODY_LEN).await? {
        let seq = match f {
            Frame::Write(w) => {
                let now = Instant::now();
                let mut r = received.lock().unwrap();
                r.bytes += w.data.len() as u64;
                r.first.get_or_insert(now);
                r.last = Some(now);
                w.seq
            }
            Frame::WriteZeroes(z) => z.seq,
            Frame::Marker(m) => m.seq,
            _ => continue,
        };
        let ack = Ack {
            handle: b.handle,
            seq,
        };
        write_frame(&mut send, &Frame::Ack(ack)).await?;
    }
    Ok(())
}

/// A disk of incompressible bytes (LZ4 cannot shrink what the limit counts anyway).
fn random_disk(path: &Path, size: usize) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let v: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, v).unwrap();
}

fn config(server: &Server, disk: &Path, extra: impl FnOnce(&mut RawArgs)) -> Config {
    let mut raw = RawArgs {
        server: server.addr.to_string(),
        server_fingerprint: Some(server.fingerprint.clone()),
        source_id: "src-1".into(),
        token: TOKEN.into(),
        disks: vec![disk.display().to_string()],
        rescan_interval: "200ms".into(),
        block_size: "4096".into(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_limit_holds_the_agent_to_its_rate() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    let size = 6 << 20;
    random_disk(&disk, size);
    // 16 Mbit/s = 2 MB/s: 6 MiB take about 3 s (less the 200 kB burst).
    let cfg = config(&server, &disk, |r| r.bandwidth_limit = Some("16".into()));
    let started = Instant::now();
    let sum = replicate_until(cfg, Progress::Off, no_stop())
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(sum.outcome, Outcome::Complete);
    let r = server.received.lock().unwrap();
    assert_eq!(r.bytes, size as u64);
    let wire = (r.last.unwrap() - r.first.unwrap()).as_secs_f64();
    let expect = (size as f64 - 200_000.0) / 2e6;
    assert!(
        wire >= expect * 0.95,
        "{} bytes arrived over {wire:.2} s: faster than 16 Mbit/s (expected >= {expect:.2} s)",
        r.bytes
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_file_follows_the_run() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    let size = 2 << 20;
    random_disk(&disk, size);
    let path: PathBuf = dir.path().join("status.json");
    let cfg = config(&server, &disk, |r| {
        r.follow = true;
        r.status_file = Some(path.clone());
    });
    let (stop_tx, stop_rx) = mpsc::channel(2);
    let run = tokio::spawn(replicate_until(cfg, Progress::Off, stop_rx));

    // Within a few writes of the file the disk is up to date.
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Ok(st) = status::read(&path) {
            if st.disks[0].phase == "continuous" && st.disks[0].bytes_acked == size as u64 {
                break st;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no continuous status in {path:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st.pid, std::process::id());
    assert_eq!(st.state, "running");
    assert_eq!(st.source_id, "src-1");
    assert!(st.follow);
    let d = &st.disks[0];
    assert_eq!((d.id.as_str(), d.size), ("d.img", size as u64));
    assert!(d.bytes_sent >= d.bytes_acked);
    assert!(d.last_ack_at_ms.is_some());
    // A file is not a block device: rescans, and the reason is there.
    assert_eq!(d.tracking, "rescan");
    assert!(d.tracking_reason.is_some());
    let now = status::now_ms();
    assert_eq!(
        status::liveness(&st, now, status::pid_alive(st.pid)),
        Liveness::Running
    );
    let table = status::render(&st, &Liveness::Running, now);
    assert!(
        table.contains("d.img") && table.contains("continuous"),
        "{table}"
    );

    stop_tx.send(()).await.unwrap();
    let sum = run.await.unwrap().unwrap();
    assert!(matches!(sum.outcome, Outcome::Stopped { .. }));
    // The last status says the agent was stopping; this process is alive, so a reader
    // would see it as running until its pid is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status::read(&path).unwrap().state != "stopping" {
        assert!(Instant::now() < deadline, "no last status");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
