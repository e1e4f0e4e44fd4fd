//! Reliability and hostile input against the real binaries (issue 6): a filesystem that fills
//! up under a replicating disk, and clients that try to exhaust or fool the server while a
//! well-behaved agent replicates beside them. See docs/reliability.md for what each proves.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use slipway_net::{read_frame, write_frame};
use slipway_proto::{DiskOpen, ErrorCode, Frame, StreamBind, Write, MAX_BODY_LEN};

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Disk faults: a real filesystem that fills up.

/// The data dir lives on a 128 MiB ext4 filesystem with ~40 MiB left free; a 96 MiB source
/// disk cannot fit. Its disk must go to `error` with the reason, nothing acked may be missing
/// from the volume, a second source on the same server keeps replicating, and once space is
/// freed the first agent recovers by itself and its replica ends identical.
#[test]
fn enospc_errors_the_disk_acks_nothing_past_it_others_carry_on_and_it_recovers() {
    let d = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(d.path(), 128);
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let big = src.join("big.img");
    let small = src.join("small.img");
    const BIG: u64 = 96 << 20;
    const SMALL: u64 = 8 << 20;
    make_disk(&big, BIG, 61);
    make_disk(&small, SMALL, 62);
    let mut server = Server::start(&fs.mount.join("var"));

    // The small source first, in follow mode: it must fit and keep going.
    let small_token = server.token("steady");
    let _steady = Agent::start(
        &server,
        "steady",
        &small_token,
        &[&small],
        &["--follow", "--rescan-interval", "1s"],
    );
    wait_until(
        "the small disk continuous",
        Duration::from_secs(120),
        || server.disk_state("steady", "small.img") == "continuous",
    );
    assert_same(&small, &server.volume("steady", "small.img"), SMALL);

    // Leave ~40 MiB: far less than the big disk needs.
    let filler = fs.fill_leaving(40 << 20);
    let journal = d.path().join("big.journal");
    let big_token = server.token("filling");
    let mut filling = Agent::start(
        &server,
        "filling",
        &big_token,
        &[&big],
        &["--ack-journal", journal.to_str().unwrap()],
    );
    let mut reason = String::new();
    wait_until(
        "the big disk in the error state",
        Duration::from_secs(120),
        || {
            let r = server.disk_report("filling", "big.img");
            if r["state"] == "error" {
                reason = r["reason"].as_str().unwrap_or_default().to_string();
                true
            } else {
                false
            }
        },
    );
    eprintln!("error state reason: {reason}");
    assert!(
        reason.contains("No space left") || reason.contains("os error 28"),
        "the reason names the fault: {reason}"
    );
    let vol = server.volume("filling", "big.img");
    // Nothing acked past the failure: every range the agent saw acked is on the volume.
    let before = check_journal(&journal, "big.img", &big, &vol);
    let acked = journal_acked_bytes(&journal);
    assert!(
        acked < BIG,
        "not everything can have been acked ({acked} bytes)"
    );
    assert!(
        filling.child.try_wait().unwrap().is_none(),
        "a disk error is retryable: the agent keeps trying\n{}",
        filling.log_text()
    );
    let (_, m) = server.http_get("/metrics");
    assert!(
        metric(
            &m,
            "slipway_disk_errors_total{disk=\"big.img\",source=\"filling\"}"
        ) >= 1.0,
        "disk errors are counted"
    );

    // The other source carries on: a change in place on its disk is replicated while the
    // big disk is failing (overwriting allocated blocks needs no free space).
    let off = (0..SMALL / 65536)
        .map(|i| i * 65536)
        .find(|&o| {
            let mut b = vec![0u8; 65536];
            std::fs::File::open(&small)
                .unwrap()
                .read_exact_at(&mut b, o)
                .unwrap();
            b.iter().all(|x| *x != 0) || b.iter().filter(|x| **x == 0).count() < 1024
        })
        .expect("a data region");
    let mut new = vec![0u8; 65536];
    rand::rngs::SmallRng::seed_from_u64(63).fill_bytes(&mut new);
    new.iter_mut().for_each(|b| *b |= 1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&small)
        .unwrap();
    f.write_all_at(&new, off).unwrap();
    f.sync_all().unwrap();
    let steady_vol = server.volume("steady", "small.img");
    wait_until(
        "the change on the other source replicated",
        Duration::from_secs(60),
        || same_bytes(&small, &steady_vol, SMALL),
    );
    assert_ne!(server.disk_state("steady", "small.img"), "error");
    assert_eq!(
        server.disk_report("filling", "big.img")["state"],
        "error",
        "still failing while the filesystem is full"
    );
    let again = check_journal(&journal, "big.img", &big, &vol);
    assert!(again >= before);

    // Free the space: the agent recovers by itself (reconnect, resume) and finishes.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    let st = filling.wait(Duration::from_secs(240));
    assert!(st.success(), "agent failed: {st}\n{}", filling.log_text());
    eprintln!(
        "recovered {:.1} s after the space was freed",
        t.elapsed().as_secs_f64()
    );
    assert_same(&big, &vol, BIG);
    let n = check_journal(&journal, "big.img", &big, &vol);
    eprintln!(
        "ENOSPC: {n} acked ranges checked against the volume, {acked} bytes acked before recovery"
    );
    let r = server.disk_report("filling", "big.img");
    assert_eq!(r["synced"], true, "{r}");
    assert_ne!(r["state"], "error", "{r}");
    assert!(server.healthy());
    server.kill9(); // before the filesystem is unmounted
}

// ---------------------------------------------------------------------------------------------
// Hostile input.

fn hello(source: &str, credential: &str) -> Frame {
    hello_frame(source, credential, rand::random(), "hostile-test")
}

/// Connects and says hello; returns the connection, control stream and the server's answer.
async fn hello_with(
    server: &Server,
    source: &str,
    credential: &str,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    Option<Frame>,
) {
    let (ep, conn) = quic_connect(server).await;
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    write_frame(&mut s, &hello(source, credential))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), read_frame(&mut r, MAX_BODY_LEN))
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten();
    (ep, conn, s, r, answer)
}

/// The application close code of a connection the server closed (waits at most `limit`).
async fn closed_code(conn: &quinn::Connection, limit: Duration) -> Option<u64> {
    match tokio::time::timeout(limit, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
        _ => None,
    }
}

async fn open_disk(
    s: &mut quinn::SendStream,
    r: &mut quinn::RecvStream,
    disk: &str,
    size: u64,
) -> u32 {
    write_frame(
        s,
        &Frame::DiskOpen(DiskOpen {
            request_id: 1,
            disk_id: disk.into(),
            size,
            block_size: 4096,
        }),
    )
    .await
    .unwrap();
    match read_frame(r, MAX_BODY_LEN).await.unwrap() {
        Some(Frame::DiskOpened(o)) => o.handle,
        other => panic!("{other:?}"),
    }
}

/// A source the test keeps changing in the background, replicated by a real agent in
/// `--follow` mode: the well-behaved neighbour of every hostile client.
struct Neighbour {
    path: std::path::PathBuf,
    size: u64,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    writer: Option<std::thread::JoinHandle<()>>,
    agent: Agent,
}

impl Neighbour {
    fn start(server: &Server, dir: &Path, size: u64) -> Neighbour {
        let path = dir.join("good.img");
        make_disk(&path, size, 77);
        let token = server.token("good");
        let agent = Agent::start(
            server,
            "good",
            &token,
            &[&path],
            &["--follow", "--rescan-interval", "1s"],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (p, st, w) = (path.clone(), stop.clone(), writes.clone());
        let writer = std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            let mut rng = rand::rngs::SmallRng::seed_from_u64(78);
            let mut buf = vec![0u8; 64 << 10];
            while !st.load(Ordering::Relaxed) {
                rng.fill_bytes(&mut buf);
                let off = rng.gen_range(0..size / buf.len() as u64) * buf.len() as u64;
                f.write_all_at(&buf, off).unwrap();
                w.fetch_add(1, Ordering::Relaxed);
                // Pacing of the workload, not synchronisation.
                std::thread::sleep(Duration::from_millis(50));
            }
            f.sync_all().unwrap();
        });
        Neighbour {
            path,
            size,
            stop,
            writes,
            writer: Some(writer),
            agent,
        }
    }

    /// Stops changing the source and waits until the replica equals it.
    fn converge(&mut self, server: &Server) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.take().unwrap().join().unwrap();
        let vol = server.volume("good", "good.img");
        wait_until(
            "the well-behaved agent's replica to equal its source",
            Duration::from_secs(180),
            || same_bytes(&self.path, &vol, self.size),
        );
        assert!(
            self.agent.child.try_wait().unwrap().is_none(),
            "the agent is still running\n{}",
            self.agent.log_text()
        );
        self.writes.load(Ordering::Relaxed)
    }
}

/// Tracks the server's resident memory while an attack runs.
struct RssWatch {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(vm_kib(pid, "VmRSS"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssWatch {
            stop,
            max,
            t: Some(t),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.t.take().unwrap().join().unwrap();
        self.max.load(Ordering::Relaxed)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Clients that never authenticate, or authenticate with forged, replayed, foreign or
/// mangled tokens, or open with a 4 GiB frame header: each gets its typed refusal and close
/// code (or the 10 s handshake close), none can create a volume, the server's memory stays
/// bounded, and an agent replicating a changing disk at the same time ends byte-identical.
#[test]
fn unauthenticated_and_forged_clients_are_refused_and_others_are_unaffected() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let mut good = Neighbour::start(&server, d.path(), 64 << 20);
    let rss = RssWatch::start(server.child.id());
    let valid = server.token("victim");
    // A token minted by another server's secret, for the same source name.
    let other = Server::start(&d.path().join("other-var"));
    let foreign_key = other.token("victim");
    drop(other);
    let rt = runtime();
    let t0 = Instant::now();
    let silent_closes = rt.block_on(async {
        // 1. 200 clients that complete QUIC+TLS and then never open a stream, and 50 that open
        //    the control stream with 3 bytes of a header and stop: all closed with code 1 by
        //    the 10 s handshake timeout.
        let mut silent = vec![];
        for i in 0..250 {
            let (ep, conn) = quic_connect(&server).await;
            let stream = if i >= 200 {
                let (mut s, r) = conn.open_bi().await.unwrap();
                s.write_all(&[0x01, 0x00, 0x00]).await.unwrap();
                Some((s, r))
            } else {
                None
            };
            silent.push((ep, conn, stream));
        }

        // 2. Forged, replayed and mangled credentials: Unauthorized, close code 2.
        let mut flipped = valid.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        // slw2.<nonce>.<expiry>.<tag>
        let parts: Vec<&str> = valid.split('.').collect();
        assert_eq!((parts[0], parts.len()), ("slw2", 4), "{valid}");
        let nonce_swapped = format!("slw2.{}.{}.{}", "00".repeat(16), parts[2], parts[3]);
        let expiry_moved = format!("slw2.{}.{}.{}", parts[1], 4_000_000_000u64, parts[3]);
        let as_v1 = format!("slw1.{}.{}", parts[1], parts[3]);
        let other_source = server.token("someone-else");
        let forged: Vec<(&str, String)> = vec![
            ("one hex digit of the tag changed", flipped),
            ("another nonce with the same tag", nonce_swapped),
            ("an expiry the tag does not cover", expiry_moved),
            ("the v2 tag presented as a v1 token", as_v1),
            ("the token of another source", other_source),
            ("minted with another server's secret", foreign_key),
            (
                "random tag",
                format!("slw1.{}.{}", "ab".repeat(16), "cd".repeat(32)),
            ),
            ("no prefix", valid.trim_start_matches("slw2.").to_string()),
            ("empty", String::new()),
            ("1024 bytes of noise", "x".repeat(1024)),
            (
                "not hex",
                format!("slw1.{}.{}", "zz".repeat(16), "zz".repeat(32)),
            ),
            ("truncated", valid[..valid.len() - 2].to_string()),
        ];
        for (what, cred) in &forged {
            let (_ep, conn, _s, _r, answer) = hello_with(&server, "victim", cred).await;
            match answer {
                Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthorized, "{what}"),
                other => panic!("{what}: {other:?}"),
            }
            assert_eq!(
                closed_code(&conn, Duration::from_secs(5)).await,
                Some(2),
                "{what}: close code"
            );
        }
        // Replaying a captured Hello of one source under another source's id.
        let (_ep, conn, _s, _r, answer) = hello_with(&server, "good", &valid).await;
        assert!(
            matches!(answer, Some(Frame::Error(ref e)) if e.code == ErrorCode::Unauthorized),
            "{answer:?}"
        );
        assert_eq!(closed_code(&conn, Duration::from_secs(5)).await, Some(2));

        // 3. A 4 GiB frame header as the very first frame, then a flood: TooLarge, close 1,
        //    and the flood is not buffered.
        for ty in [0x01u8, 0x06] {
            let (_ep, conn) = quic_connect(&server).await;
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            s.write_all(&[ty, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
                .await
                .unwrap();
            let flood = tokio::spawn(async move {
                let junk = vec![0x5au8; 1 << 20];
                for _ in 0..64 {
                    if s.write_all(&junk).await.is_err() {
                        break;
                    }
                }
            });
            match read_frame(&mut r, MAX_BODY_LEN).await {
                Ok(Some(Frame::Error(e))) => assert_eq!(e.code, ErrorCode::TooLarge),
                other => panic!("{other:?}"),
            }
            assert_eq!(closed_code(&conn, Duration::from_secs(5)).await, Some(1));
            flood.abort();
        }
        // The same after a valid handshake, on the control stream: TooLarge, close 1.
        let (_ep, conn, mut s, mut r, answer) = hello_with(&server, "victim", &valid).await;
        assert!(matches!(answer, Some(Frame::Welcome(_))), "{answer:?}");
        s.write_all(&[0x03, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        match read_frame(&mut r, MAX_BODY_LEN).await {
            Ok(Some(Frame::Error(e))) => assert_eq!(e.code, ErrorCode::TooLarge),
            other => panic!("{other:?}"),
        }
        assert_eq!(closed_code(&conn, Duration::from_secs(5)).await, Some(1));

        // The silent ones: closed by the server, code 1, about 10 s after they connected.
        let mut closes = 0;
        for (_ep, conn, _stream) in &silent {
            let code = closed_code(conn, Duration::from_secs(30)).await;
            assert_eq!(code, Some(1), "a client that never says hello is closed");
            closes += 1;
        }
        closes
    });
    let attack = t0.elapsed();
    assert!(
        attack < Duration::from_secs(60),
        "the handshake timeout bounds silent clients ({attack:?})"
    );
    let changes = good.converge(&server);
    let peak = rss.finish();
    eprintln!(
        "hostile (auth): {silent_closes} silent clients closed, 11 forged/replayed credentials and 3 \
         4 GiB headers refused in {:.1} s; server RSS peak {} MiB; neighbour made {changes} changes and ended identical",
        attack.as_secs_f64(),
        peak / 1024
    );
    assert!(peak < 512 * 1024, "server RSS stayed bounded: {peak} KiB");
    // Nothing was created for the refused clients.
    let volumes: Vec<String> = std::fs::read_dir(server.data_dir.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        volumes,
        vec!["good".to_string()],
        "only the good source has volumes"
    );
    let (_, m) = server.http_get("/metrics");
    assert!(metric(&m, "slipway_rejected_total{reason=\"unauthorized\"}") >= 11.0);
    assert!(metric(&m, "slipway_rejected_total{reason=\"too_large\"}") >= 3.0);
    assert!(server.healthy());
    let log = server.log();
    assert!(!log.contains(&valid), "tokens are never logged");
}

/// An authenticated client that opens 10,000 streams, holds the most it may unbound, sends
/// a 4 GiB write header with a flood behind it, and trickles a frame one byte at a time: the
/// stream limit caps it, unbound streams are dropped after 10 s, each stream gets its typed
/// refusal, memory stays bounded, nothing reaches a volume, and a neighbour agent replicating
/// a changing disk at the same time ends byte-identical.
#[test]
fn stream_floods_huge_frames_and_a_slowloris_do_not_hurt_a_neighbour() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let mut good = Neighbour::start(&server, d.path(), 64 << 20);
    let rss = RssWatch::start(server.child.id());
    let token = server.token("hostile");
    let slow_token = server.token("slowpoke");
    let rt = runtime();
    let t0 = Instant::now();
    let (refused, trickled) = rt.block_on(async {
        // Slowloris (its own source: a second connection of one source supersedes the
        // first): a Write header and a few body bytes, then one byte every 2 s.
        let (_ep1, slow_conn, mut cs, mut cr, answer) =
            hello_with(&server, "slowpoke", &slow_token).await;
        assert!(matches!(answer, Some(Frame::Welcome(_))));
        let h = open_disk(&mut cs, &mut cr, "slow", 1 << 20).await;
        let (mut ss, mut sr) = slow_conn.open_bi().await.unwrap();
        write_frame(&mut ss, &Frame::StreamBind(StreamBind { handle: h }))
            .await
            .unwrap();
        let w = Write {
            handle: h,
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![0xabu8; 65536]),
        };
        let [head, payload] = w.encode_chunks(false);
        let mut frame = head.to_vec();
        frame.extend_from_slice(&payload);
        ss.write_all(&frame[..16]).await.unwrap();
        let slow_started = Instant::now();
        let trickle = tokio::spawn(async move {
            let mut sent = 16;
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                if sent + 1 >= frame.len() || ss.write_all(&frame[sent..sent + 1]).await.is_err() {
                    return sent;
                }
                sent += 1;
            }
        });

        // The stream cap: the server allows max_disks_per_connection + 1 = 65 concurrent
        // streams; with the control stream open, 64 more. Hold 64 unbound (one byte each).
        let (_ep2, conn, _cs2, _cr2, answer) = hello_with(&server, "hostile", &token).await;
        assert!(matches!(answer, Some(Frame::Welcome(_))));
        let held_at = Instant::now();
        let mut held = vec![];
        for _ in 0..64 {
            let (mut s, r) = conn.open_bi().await.unwrap();
            s.write_all(&[0x05]).await.unwrap();
            held.push((s, r));
        }
        let extra = tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await;
        assert!(extra.is_err(), "a 66th concurrent stream is not granted");
        // Unbound streams are refused after 10 s (Malformed), which frees the slots.
        for (_, r) in held.iter_mut() {
            match tokio::time::timeout(Duration::from_secs(30), read_frame(r, MAX_BODY_LEN)).await {
                Ok(Ok(Some(Frame::Error(e)))) => assert_eq!(e.code, ErrorCode::Malformed),
                other => panic!("an unbound stream: {other:?}"),
            }
        }
        let dropped_after = held_at.elapsed();
        assert!(
            dropped_after >= Duration::from_secs(9) && dropped_after < Duration::from_secs(30),
            "unbound streams dropped after the 10 s bind timeout ({dropped_after:?})"
        );
        drop(held);

        // 10,000 streams, 32 at a time, each bound to a handle this connection never opened:
        // each gets UnknownDisk and ends.
        let refused = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = vec![];
        for _ in 0..32 {
            let (conn, refused, next) = (conn.clone(), refused.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < 10_000 {
                    let (mut s, mut r) = conn.open_bi().await.unwrap();
                    write_frame(&mut s, &Frame::StreamBind(StreamBind { handle: 999_999 }))
                        .await
                        .unwrap();
                    let _ = s.finish();
                    match read_frame(&mut r, MAX_BODY_LEN).await {
                        Ok(Some(Frame::Error(e))) if e.code == ErrorCode::UnknownDisk => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("stream refusal: {other:?}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }

        // A 4 GiB write header on a bound disk stream, with 64 MiB behind it.
        {
            let (_ep3, c3, mut s3, mut r3, answer) =
                hello_with(&server, "hostile2", &server.token("hostile2")).await;
            assert!(matches!(answer, Some(Frame::Welcome(_))));
            let h2 = open_disk(&mut s3, &mut r3, "huge", 1 << 20).await;
            let (mut ds, mut dr) = c3.open_bi().await.unwrap();
            write_frame(&mut ds, &Frame::StreamBind(StreamBind { handle: h2 }))
                .await
                .unwrap();
            ds.write_all(&[0x06, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
                .await
                .unwrap();
            let flood = tokio::spawn(async move {
                let junk = vec![0xa5u8; 1 << 20];
                for _ in 0..64 {
                    if ds.write_all(&junk).await.is_err() {
                        break;
                    }
                }
            });
            match read_frame(&mut dr, MAX_BODY_LEN).await {
                Ok(Some(Frame::Error(e))) => assert_eq!(e.code, ErrorCode::TooLarge),
                other => panic!("{other:?}"),
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
        }

        // The slowloris is still being waited for (its 120 s are not over), its stream
        // untouched: no ack, no error yet.
        let pending = tokio::time::timeout(
            Duration::from_millis(200),
            read_frame(&mut sr, MAX_BODY_LEN),
        )
        .await;
        assert!(
            pending.is_err(),
            "the slow stream is still open: {pending:?}"
        );
        trickle.abort();
        let _ = trickle.await;
        (refused.load(Ordering::Relaxed), slow_started.elapsed())
    });
    let attack = t0.elapsed();
    let changes = good.converge(&server);
    let peak = rss.finish();
    eprintln!(
        "hostile (streams): {refused} of 10000 streams refused with UnknownDisk, 64 unbound \
         streams dropped after 10 s, a 4 GiB header with a 64 MiB flood refused, a slowloris \
         trickling for {:.0} s isolated; {:.1} s; server RSS peak {} MiB; neighbour made {changes} changes and ended identical",
        trickled.as_secs_f64(),
        attack.as_secs_f64(),
        peak / 1024
    );
    assert_eq!(refused, 10_000);
    assert!(peak < 512 * 1024, "server RSS stayed bounded: {peak} KiB");
    for (src, disk) in [("slowpoke", "slow"), ("hostile2", "huge")] {
        let v = std::fs::read(server.volume(src, disk)).unwrap();
        assert!(
            v.iter().all(|b| *b == 0),
            "nothing refused reached {src}/{disk}"
        );
    }
    let (_, m) = server.http_get("/metrics");
    assert!(metric(&m, "slipway_rejected_total{reason=\"unknown_disk\"}") >= 10_000.0);
    assert!(server.healthy());
}

/// `replication.frame_timeout` for the slowloris tests: short, so they run in `make test`
/// (the default, 120 s, is the same code path).
const FRAME_TIMEOUT: Duration = Duration::from_secs(3);

/// A server whose frames must complete within [`FRAME_TIMEOUT`] of their first byte.
fn server_with_frame_timeout(dir: &Path) -> Server {
    let cfg = dir.join("slipway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[replication]\nframe_timeout = \"{}s\"\n",
            FRAME_TIMEOUT.as_secs()
        ),
    )
    .unwrap();
    Server::start_with(
        &dir.join("var"),
        "127.0.0.1:0",
        &["--config", cfg.to_str().unwrap()],
    )
}

/// Proves the mid-frame timeout itself: a frame begun and then trickled one byte a second is
/// refused (`Malformed`, "stalled") once `replication.frame_timeout` has passed since its
/// first byte, and nothing of it is written.
#[test]
fn slowloris_stream_is_cut_off_by_the_mid_frame_timeout() {
    let d = tempfile::tempdir().unwrap();
    let server = server_with_frame_timeout(d.path());
    let mut good = Neighbour::start(&server, d.path(), 32 << 20);
    let token = server.token("slow");
    let rt = runtime();
    let (waited, sent) = rt.block_on(async {
        let (_ep, conn, mut cs, mut cr, answer) = hello_with(&server, "slow", &token).await;
        assert!(matches!(answer, Some(Frame::Welcome(_))));
        let h = open_disk(&mut cs, &mut cr, "slow", 1 << 20).await;
        let (mut ss, mut sr) = conn.open_bi().await.unwrap();
        write_frame(&mut ss, &Frame::StreamBind(StreamBind { handle: h }))
            .await
            .unwrap();
        let w = Write {
            handle: h,
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![0xabu8; 65536]),
        };
        let [head, payload] = w.encode_chunks(false);
        let mut frame = head.to_vec();
        frame.extend_from_slice(&payload);
        let started = Instant::now();
        ss.write_all(&frame[..1]).await.unwrap();
        let sent = Arc::new(AtomicU64::new(1));
        let counter = sent.clone();
        let trickle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let n = counter.load(Ordering::Relaxed) as usize;
                if n + 1 >= frame.len() || ss.write_all(&frame[n..n + 1]).await.is_err() {
                    return;
                }
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let answer =
            tokio::time::timeout(Duration::from_secs(60), read_frame(&mut sr, MAX_BODY_LEN)).await;
        let waited = started.elapsed();
        match answer {
            Ok(Ok(Some(Frame::Error(e)))) => {
                assert_eq!(e.code, ErrorCode::Malformed);
                assert!(e.message.contains("stalled"), "{}", e.message);
            }
            other => panic!("the slowloris was not cut off: {other:?}"),
        }
        trickle.abort();
        let _ = trickle.await;
        (waited, sent.load(Ordering::Relaxed))
    });
    eprintln!(
        "slowloris cut off after {:.1} s (limit {FRAME_TIMEOUT:?}), {sent} bytes trickled",
        waited.as_secs_f64(),
    );
    assert!(waited >= FRAME_TIMEOUT);
    assert!(sent < 65536, "the frame never completed");
    let v = std::fs::read(server.volume("slow", "slow")).unwrap();
    assert!(
        v.iter().all(|b| *b == 0),
        "nothing of the stalled frame was written"
    );
    good.converge(&server);
    assert!(server.healthy());
}

/// The same slowloris on the control stream after a valid handshake: protocol.md §10 closes
/// the connection with CLOSE_PROTOCOL (1) after an Error frame for a control frame that
/// cannot be read; a stalled one is refused the same way.
#[test]
fn slowloris_on_the_control_stream_is_refused_with_an_error_and_close_code_1() {
    let d = tempfile::tempdir().unwrap();
    let server = server_with_frame_timeout(d.path());
    let token = server.token("slowctl");
    let rt = runtime();
    let (waited, answer, code) = rt.block_on(async {
        let (_ep, conn, mut cs, mut cr, answer) = hello_with(&server, "slowctl", &token).await;
        assert!(matches!(answer, Some(Frame::Welcome(_))));
        // A DiskOpen (~120-byte body) begun and trickled one byte a second: it cannot be
        // complete before the timeout, and the stream stays open (never finished).
        let frame = Frame::DiskOpen(DiskOpen {
            request_id: 1,
            disk_id: "d".repeat(100),
            size: 1 << 20,
            block_size: 4096,
        })
        .to_bytes()
        .to_vec();
        let started = Instant::now();
        cs.write_all(&frame[..1]).await.unwrap();
        let trickle = tokio::spawn(async move {
            let mut n = 1;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if n + 1 < frame.len() && cs.write_all(&frame[n..n + 1]).await.is_ok() {
                    n += 1;
                }
            }
        });
        let answer =
            tokio::time::timeout(Duration::from_secs(60), read_frame(&mut cr, MAX_BODY_LEN)).await;
        let code = closed_code(&conn, Duration::from_secs(10)).await;
        trickle.abort();
        (started.elapsed(), format!("{answer:?}"), code)
    });
    eprintln!("control slowloris: after {waited:?}: answer {answer}, close code {code:?}");
    assert!(waited >= FRAME_TIMEOUT);
    assert!(
        answer.contains("Malformed"),
        "a typed refusal on the control stream: {answer}"
    );
    assert_eq!(code, Some(1), "closed with CLOSE_PROTOCOL");
}
