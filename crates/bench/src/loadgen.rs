//! `slipway-bench loadgen`: many agent connections from one process, replaying pre-encoded
//! Write frames (issue 13 item 4).
//!
//! On a 2-core machine 100 agent processes eat the CPU the server would need, so scenario 3's
//! real-agent run cannot tell the server's own cost per connection. The generator is cheap on
//! purpose: one QUIC endpoint, one tokio runtime, one incompressible 1 MiB payload shared by
//! every frame (never copied; per frame only its header and CRC are made). It is not
//! an agent: it reads no disk and keeps nothing for resend. Each connection does what an agent
//! does on the wire — handshake with its own token, open one fresh disk, bind a stream, send
//! `size` bytes of writes in order, wait until the last one is acked — so the server does all
//! of its real work (TLS, frame checks, CRC, queueing, pwrite, fdatasync, acks).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use slipway_proto::{ClientHandshake, DiskOpen, Frame, Hello, StreamBind, Write};

/// Payload of every write.
const WRITE: usize = 1 << 20;
/// Bytes a connection may have sent and not yet seen acked (an agent's window is similar).
const WINDOW: usize = 64 << 20;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The server's QUIC address.
    #[arg(long)]
    server: SocketAddr,
    /// The server certificate's SHA-256 fingerprint.
    #[arg(long)]
    fingerprint: String,
    /// A file of "SOURCE TOKEN" lines: one connection per line.
    #[arg(long)]
    tokens: PathBuf,
    /// Bytes each connection writes (a multiple of 1 MiB).
    #[arg(long)]
    size: u64,
}

/// Runs the connections; prints one JSON line: connections, bytes, wall seconds.
pub fn run(a: LoadArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.tokens)
        .with_context(|| format!("reading {}", a.tokens.display()))?;
    let creds: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next()) {
                (Some(s), Some(t)) => Ok((s.to_string(), t.to_string())),
                _ => Err(anyhow!("bad token line {l:?}")),
            }
        })
        .collect::<Result<_>>()?;
    if a.size == 0 || !a.size.is_multiple_of(WRITE as u64) {
        bail!("--size must be a positive multiple of {WRITE}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (wall, bytes) = rt.block_on(async move {
        let tuning = slipway_net::Tuning::default();
        let cfg = slipway_net::tls::client_config(
            &slipway_net::tls::ServerTrust::Fingerprint(a.fingerprint.clone()),
            &tuning,
        )
        .map_err(|e| anyhow!("TLS: {e}"))?;
        let ep = tuning.client_endpoint(a.server)?;
        let payload = Bytes::from(
            (0..WRITE)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
                .collect::<Vec<u8>>(),
        );
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (source, token) in creds {
            let (ep, cfg, payload) = (ep.clone(), cfg.clone(), payload.clone());
            let (server, size) = (a.server, a.size);
            tasks.spawn(async move {
                one(ep, cfg, server, &source, &token, size, payload)
                    .await
                    .with_context(|| format!("connection of {source}"))
            });
        }
        let mut bytes = 0;
        while let Some(r) = tasks.join_next().await {
            bytes += r??;
        }
        Ok::<_, anyhow::Error>((started.elapsed().as_secs_f64(), bytes))
    })?;
    println!(
        "{}",
        serde_json::json!({ "bytes": bytes, "wall_s": wall, "connections": text.lines().filter(|l| !l.trim().is_empty()).count() })
    );
    Ok(())
}

async fn one(
    ep: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    server: SocketAddr,
    source: &str,
    token: &str,
    size: u64,
    payload: Bytes,
) -> Result<u64> {
    let conn = ep.connect_with(cfg, server, "localhost")?.await?;
    let (mut ctl, mut ctl_recv) = conn.open_bi().await?;
    let mut hs = ClientHandshake::new(Hello {
        version_min: 0,
        version_max: 0,
        features: 0,
        agent_run: rand::random(),
        source_id: source.into(),
        credential: token.into(),
        agent_version: "slipway-bench loadgen".into(),
    });
    slipway_net::write_frame(&mut ctl, &hs.hello_frame()).await?;
    let welcome = slipway_net::read_frame(&mut ctl_recv, 64 << 10)
        .await?
        .ok_or_else(|| anyhow!("no welcome"))?;
    hs.on_frame(welcome)
        .map_err(|e| anyhow!("handshake: {e}"))?;
    slipway_net::write_frame(
        &mut ctl,
        &Frame::DiskOpen(DiskOpen {
            request_id: 1,
            disk_id: "disk0".into(),
            size,
            block_size: 4096,
        }),
    )
    .await?;
    let handle = match slipway_net::read_frame(&mut ctl_recv, 64 << 10).await? {
        Some(Frame::DiskOpened(o)) => o.handle,
        other => bail!("expected DiskOpened, got {other:?}"),
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    slipway_net::write_frame(&mut send, &Frame::StreamBind(StreamBind { handle })).await?;
    let writes = size / WRITE as u64;
    // Acks free window space; the sender waits for it.
    let window = Arc::new(tokio::sync::Semaphore::new(WINDOW / WRITE));
    let acker = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut acked = 0u64;
            while acked < writes {
                match slipway_net::read_frame(&mut recv, 64 << 10).await? {
                    Some(Frame::Ack(a)) => {
                        window.add_permits((a.seq - acked) as usize);
                        acked = a.seq;
                    }
                    other => bail!("expected Ack, got {other:?}"),
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    for i in 0..writes {
        window.acquire().await?.forget();
        let seq = i + 1;
        let w = Write {
            handle,
            seq,
            offset: i * WRITE as u64,
            data: payload.clone(),
        };
        let mut chunks = w.encode_chunks(false);
        send.write_all_chunks(&mut chunks).await?;
    }
    acker.await??;
    let _ = send.finish();
    conn.close(0u32.into(), b"done");
    Ok(size)
}
