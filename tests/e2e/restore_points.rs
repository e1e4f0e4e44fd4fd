//! Restore points end to end: crash-consistent at markers, incremental, pruned by policy,
//! and intact across `kill -9` at the worst moments.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use slipway_net::{read_frame, write_frame, write_write};
use slipway_proto::{DiskOpen, Frame, Marker, Phase, Progress, StreamBind, Write, MAX_BODY_LEN};

use crate::support::*;

const BLOCK: u64 = 512 * 1024;

/// A source with two disks written by a workload whose state at every marker is known: the
/// test itself speaks the protocol, keeps a model of both disks, snapshots the model when it
/// places each marker, and keeps writing after the marker (so copy-on-write is exercised).
/// Every exported restore point must equal the model at its marker, byte for byte.
#[test]
fn restore_points_equal_the_state_at_their_marker_on_every_disk() {
    let d = tempfile::tempdir().unwrap();
    // The scheduler takes one point as soon as the disks are continuous, then none for a day:
    // the test answers that one first, so each later marker request is its own.
    let server = Server::with_settings(
        &d.path().join("var"),
        "[pit]\ntiers = [{ every = \"1d\", keep = 10 }]\n",
    );
    let token = server.token("two-disk");
    let size: u64 = 6 * BLOCK + 8192; // a partial last block
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut expected: HashMap<String, [Vec<u8>; 2]> = HashMap::new();
    rt.block_on(async {
        let (_ep, conn) = quic_connect(&server).await;
        let (mut cs, mut cr) = conn.open_bi().await.unwrap();
        let hello = hello_frame("two-disk", &token, 7, "model");
        write_frame(&mut cs, &hello).await.unwrap();
        assert!(matches!(
            read_frame(&mut cr, MAX_BODY_LEN).await.unwrap(),
            Some(Frame::Welcome(_))
        ));
        let mut handles = vec![];
        let mut streams = vec![];
        for (i, name) in ["d0", "d1"].iter().enumerate() {
            write_frame(
                &mut cs,
                &Frame::DiskOpen(DiskOpen {
                    request_id: i as u32,
                    disk_id: name.to_string(),
                    size,
                    block_size: 4096,
                }),
            )
            .await
            .unwrap();
            let h = match read_frame(&mut cr, MAX_BODY_LEN).await.unwrap() {
                Some(Frame::DiskOpened(o)) => o.handle,
                other => panic!("{other:?}"),
            };
            let (mut s, r) = conn.open_bi().await.unwrap();
            write_frame(&mut s, &Frame::StreamBind(StreamBind { handle: h }))
                .await
                .unwrap();
            handles.push(h);
            streams.push((s, r));
        }
        let mut model = [vec![0u8; size as usize], vec![0u8; size as usize]];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(99);
        let mut seq = 0u64;
        let mut last = [0u64; 2];
        // Random 4 KiB-aligned writes of up to 64 KiB, on a random disk, applied to the model.
        struct Workload<'a> {
            rng: &'a mut rand::rngs::SmallRng,
            seq: &'a mut u64,
            last: &'a mut [u64; 2],
            model: &'a mut [Vec<u8>; 2],
            handles: &'a [u32],
            size: u64,
        }
        async fn random_writes(
            n: usize,
            w: Workload<'_>,
            streams: &mut [(quinn::SendStream, quinn::RecvStream)],
        ) {
            for _ in 0..n {
                let disk = w.rng.gen_range(0..2);
                let len = w.rng.gen_range(1..=16u64) * 4096;
                let off = w.rng.gen_range(0..(w.size - len) / 4096) * 4096;
                let mut data = vec![0u8; len as usize];
                w.rng.fill_bytes(&mut data);
                w.model[disk][off as usize..(off + len) as usize].copy_from_slice(&data);
                *w.seq += 1;
                w.last[disk] = *w.seq;
                let f = Write {
                    handle: w.handles[disk],
                    seq: *w.seq,
                    offset: off,
                    data: Bytes::from(data),
                };
                write_write(&mut streams[disk].0, &f, false).await.unwrap();
            }
        }
        // The marker `marker_id` at `seq` on both disks.
        async fn place_markers(
            streams: &mut [(quinn::SendStream, quinn::RecvStream)],
            handles: &[u32],
            seq: u64,
            marker_id: u64,
        ) {
            for (disk, (send, _)) in streams.iter_mut().enumerate() {
                write_frame(
                    send,
                    &Frame::Marker(Marker {
                        handle: handles[disk],
                        seq,
                        marker_id,
                    }),
                )
                .await
                .unwrap();
            }
        }
        // Initial pass: fill both disks, then report them continuous.
        for disk in 0..2 {
            let mut off = 0;
            while off < size {
                let len = (size - off).min(1 << 20);
                let mut data = vec![0u8; len as usize];
                rng.fill_bytes(&mut data);
                model[disk][off as usize..(off + len) as usize].copy_from_slice(&data);
                seq += 1;
                last[disk] = seq;
                write_write(
                    &mut streams[disk].0,
                    &Write {
                        handle: handles[disk],
                        seq,
                        offset: off,
                        data: Bytes::from(data),
                    },
                    false,
                )
                .await
                .unwrap();
                off += len;
            }
        }
        for disk in 0..2 {
            write_frame(
                &mut cs,
                &Frame::Progress(Progress {
                    handle: handles[disk],
                    phase: Phase::Continuous,
                    backlog_bytes: 0,
                    pass_seq: last[disk],
                }),
            )
            .await
            .unwrap();
        }
        // Wait until both disks are durable up to their pass (acks on each stream).
        for disk in 0..2 {
            loop {
                match read_frame(&mut streams[disk].1, MAX_BODY_LEN)
                    .await
                    .unwrap()
                {
                    Some(Frame::Ack(a)) if a.seq >= last[disk] => break,
                    Some(Frame::Ack(_)) => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        // The scheduler's point: its marker request comes once both disks are continuous.
        let scheduled = loop {
            match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut cr, MAX_BODY_LEN))
                .await
            {
                Ok(Ok(Some(Frame::MarkerRequest(m)))) => break m.marker_id,
                Ok(Ok(Some(_))) => {}
                other => panic!("no scheduled marker request: {other:?}\n{}", server.log()),
            }
        };
        let at_scheduled = model.clone();
        seq += 1;
        place_markers(&mut streams, &handles, seq, scheduled).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let first = loop {
            let list = tokio::task::block_in_place(|| server.restore_points());
            if let Some(rp) = list.first() {
                break rp["id"].as_str().unwrap().to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the scheduled restore point never appeared\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        expected.insert(first, at_scheduled);
        let dd = server.data_dir.clone();
        for round in 0..3 {
            random_writes(
                40,
                Workload {
                    rng: &mut rng,
                    seq: &mut seq,
                    last: &mut last,
                    model: &mut model,
                    handles: &handles,
                    size,
                },
                &mut streams,
            )
            .await;
            // Ask for a restore point (the CLI blocks until it exists).
            let dd2 = dd.clone();
            let cli = std::thread::spawn(move || {
                std::process::Command::new(SLIPWAY)
                    .args([
                        "restore-points",
                        "create",
                        "--source",
                        "two-disk",
                        "--wait",
                        "--data-dir",
                    ])
                    .arg(&dd2)
                    .output()
                    .unwrap()
            });
            let marker_id = loop {
                match tokio::time::timeout(
                    Duration::from_secs(30),
                    read_frame(&mut cr, MAX_BODY_LEN),
                )
                .await
                {
                    Ok(Ok(Some(Frame::MarkerRequest(m)))) => break m.marker_id,
                    Ok(Ok(Some(Frame::Error(e)))) => {
                        panic!("round {round}: {e:?}\n{}", server.log())
                    }
                    Ok(Ok(Some(_))) => {}
                    other => panic!(
                        "round {round}: no marker request: {other:?}\n{}",
                        server.log()
                    ),
                }
            };
            let at_marker = model.clone();
            seq += 1;
            place_markers(&mut streams, &handles, seq, marker_id).await;
            // Keep writing after the marker: none of this may appear in the restore point.
            random_writes(
                40,
                Workload {
                    rng: &mut rng,
                    seq: &mut seq,
                    last: &mut last,
                    model: &mut model,
                    handles: &handles,
                    size,
                },
                &mut streams,
            )
            .await;
            let out = tokio::task::spawn_blocking(move || cli.join().unwrap())
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                server.log()
            );
            let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
            expected.insert(id, at_marker);
        }
        conn.close(0u32.into(), b"done");
    });
    assert_eq!(expected.len(), 4);
    let list = server.restore_points();
    assert_eq!(list.len(), 4);
    for rp in &list {
        for key in [
            "id",
            "source",
            "created_at",
            "disks",
            "parent",
            "size_bytes",
        ] {
            assert!(rp.get(key).is_some(), "list --json has {key}: {rp}");
        }
    }
    // Parents chain in creation order.
    assert_eq!(list[0]["parent"], serde_json::Value::Null);
    assert_eq!(list[1]["parent"], list[0]["id"]);
    for (id, images) in &expected {
        server.verify(id);
        for (i, img) in images.iter().enumerate() {
            let out = d.path().join(format!("{id}-{i}.img"));
            server.export(id, &format!("d{i}"), &out);
            let got = std::fs::read(&out).unwrap();
            assert!(
                got == *img,
                "restore point {id} disk d{i} differs from the state at its marker"
            );
        }
    }
}

/// The reference agent in --follow mode: restore points reflect every change the agent could
/// see when asked; after changing ~1% of a disk the next restore point stores about 1%.
#[test]
fn follow_mode_restore_points_are_incremental() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let token = server.token("web");
    let size: u64 = 128 << 20;
    let a = d.path().join("a.img");
    let b = d.path().join("b.img");
    make_disk(&a, size, 11);
    make_disk(&b, size / 2, 12);
    let _agent = Agent::start(
        &server,
        "web",
        &token,
        &[&a, &b],
        &["--follow", "--rescan-interval", "1s"],
    );
    wait_until("both disks continuous", Duration::from_secs(240), || {
        server.disk_state("web", "a.img") == "continuous"
            && server.disk_state("web", "b.img") == "continuous"
    });
    let rp1 = server.create_restore_point("web");
    let a1 = std::fs::read(&a).unwrap();
    let b1 = std::fs::read(&b).unwrap();
    // Change 1% of disk a (1.28 MiB at a block boundary) and nothing of b.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut chunk = vec![0u8; (size / 100) as usize];
    rng.fill_bytes(&mut chunk);
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(&chunk, 40 * BLOCK).unwrap();
    f.sync_all().unwrap();
    let rp2 = server.create_restore_point("web");

    // The scheduler (default policy) may have taken its own first restore point too: the full
    // one is whichever came first, and rp2's parent is the one right before it.
    let list = server.restore_points();
    let pos = |id: &str| list.iter().position(|r| r["id"] == id).unwrap();
    let full = list[0]["size_bytes"].as_u64().unwrap();
    let incr = list[pos(&rp2)]["size_bytes"].as_u64().unwrap();
    assert!(
        full > size,
        "the first restore point stores both disks ({full})"
    );
    assert!(
        incr > 0 && incr <= size / 50,
        "1% changed stores about 1% ({incr} of {size})"
    );
    assert_eq!(list[pos(&rp2)]["parent"], list[pos(&rp2) - 1]["id"]);
    for (id, disk, want) in [(&rp1, "a.img", &a1), (&rp1, "b.img", &b1)] {
        let out = d.path().join("x.img");
        server.export(id, disk, &out);
        assert!(std::fs::read(&out).unwrap() == *want, "{id} {disk}");
    }
    let out = d.path().join("y.img");
    server.export(&rp2, "a.img", &out);
    assert_same(&a, &out, size);
    server.verify(&rp1);
    server.verify(&rp2);
    // Metrics carry the restore-point families and pass promtool.
    let (_, metrics) = server.http_get("/metrics");
    assert!(
        metrics
            .contains("slipway_restore_points_taken_total{source=\"web\",trigger=\"on_demand\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("slipway_restore_point_newest_age_seconds{source=\"web\"}"));
    crate::promtool_check(&metrics);
}

/// The scheduler takes restore points by the PIT policy and prunes the rest; every survivor
/// verifies and exports the (unchanging) source exactly.
#[test]
fn scheduler_takes_and_prunes_by_policy() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::with_settings(
        &d.path().join("var"),
        "[pit]\ntiers = [ { every = \"1s\", keep = 2 }, { every = \"3s\", keep = 2 } ]\n",
    );
    let token = server.token("sched");
    let src = d.path().join("s.img");
    make_disk(&src, 8 << 20, 3);
    let _agent = Agent::start(
        &server,
        "sched",
        &token,
        &[&src],
        &["--follow", "--rescan-interval", "1s"],
    );
    let pruned = || -> u64 {
        let (_, m) = server.http_get("/metrics");
        m.lines()
            .find(|l| l.starts_with("slipway_restore_points_pruned_total{source=\"sched\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    wait_until("the policy to prune", Duration::from_secs(120), || {
        pruned() >= 3
    });
    let list = server.restore_points();
    assert!(
        !list.is_empty() && list.len() <= 5,
        "kept within the policy: {}",
        list.len()
    );
    for rp in &list {
        assert_eq!(rp["trigger"], "scheduled");
        let id = rp["id"].as_str().unwrap();
        server.verify(id);
        let out = d.path().join("o.img");
        server.export(id, "s.img", &out);
        assert_same(&src, &out, 8 << 20);
    }
}

/// `kill -9` (an abort at an exact point) while a restore point is being written and while
/// one is being pruned: after a restart, nothing half-made is listed and everything verifies.
#[test]
fn crash_during_snapshot_and_prune_leaves_every_listed_restore_point_whole() {
    let d = tempfile::tempdir().unwrap();
    let var = d.path().join("var");
    let mut server = Server::start_env(
        &var,
        "127.0.0.1:0",
        &[],
        &[("SLIPWAY_FAILPOINT", "snapshot-before-manifest")],
    );
    let token = server.token("crash");
    let src = d.path().join("c.img");
    make_disk(&src, 16 << 20, 8);
    let mut agent = Agent::start(
        &server,
        "crash",
        &token,
        &[&src],
        &["--follow", "--rescan-interval", "1s"],
    );
    wait_until("continuous", Duration::from_secs(120), || {
        server.disk_state("crash", "c.img") == "continuous"
    });
    let (ok, _, _) = server.cli(&["restore-points", "create", "--source", "crash", "--wait"]);
    assert!(!ok, "the server died at the failpoint");
    assert!(!server.wait_exit(Duration::from_secs(30)).success());
    server.restart();
    assert!(
        server.restore_points().is_empty(),
        "no half-made restore point is listed"
    );
    let blocks = var.join("snapshots/crash/blocks");
    let leftover: usize = std::fs::read_dir(&blocks)
        .map(|r| {
            r.flatten()
                .map(|s| std::fs::read_dir(s.path()).unwrap().count())
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(
        leftover, 0,
        "blocks of the interrupted restore point were swept"
    );

    wait_until("continuous again", Duration::from_secs(120), || {
        server.disk_state("crash", "c.img") == "continuous"
    });
    let rp1 = server.create_restore_point("crash");
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0x5a; 3 * BLOCK as usize], 4 * BLOCK)
        .unwrap();
    f.sync_all().unwrap();
    let rp2 = server.create_restore_point("crash");

    // Crash after rp1's manifest is gone and before its blocks are swept. (A crash in the
    // middle of the sweep — failpoint prune-mid-sweep — is only reachable when rp1 has blocks of
    // its own, which a scheduled restore point taken meanwhile may share; this point always is.)
    server.kill9();
    server.restart_env(&[("SLIPWAY_FAILPOINT", "prune-before-sweep")]);
    let (ok, _, _) = server.cli(&["restore-points", "delete", &rp1]);
    assert!(!ok, "the server died at the failpoint");
    server.wait_exit(Duration::from_secs(30));
    server.restart();
    let list = server.restore_points();
    let ids: Vec<&str> = list.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert!(
        !ids.contains(&rp1.as_str()) && ids.contains(&rp2.as_str()),
        "{ids:?}"
    );
    for id in &ids {
        server.verify(id);
    }
    server.verify(&rp2);
    let out = d.path().join("o.img");
    server.export(&rp2, "c.img", &out);
    assert_same(&src, &out, 16 << 20);
    let _ = agent.child.kill();
}

/// The agent reconnects while a restore point is still being read (copy-on-write capture
/// running, the failpoint holds the read for 5 s) and its new run rewrites changed blocks at
/// once. The new session must not write the volume until the capture has ended: the exported
/// restore point is the disk at the marker, byte for byte, and afterwards the replica catches
/// up with the change. (The restore point is the scheduler's first, taken as soon as the disk
/// is continuous; the source does not change before the test changes it below.)
#[test]
fn a_reconnect_during_a_capture_does_not_leak_later_writes_into_the_restore_point() {
    let d = tempfile::tempdir().unwrap();
    let var = d.path().join("var");
    let server = Server::start_env(
        &var,
        "127.0.0.1:0",
        &[],
        &[("SLIPWAY_FAILPOINT", "capture-before-read")],
    );
    let token = server.token("guard");
    let src = d.path().join("g.img");
    make_disk(&src, 8 << 20, 31);
    let at_marker = d.path().join("at-marker.img");
    std::fs::copy(&src, &at_marker).unwrap();
    let follow = ["--follow", "--rescan-interval", "1s"];
    let mut agent = Agent::start(&server, "guard", &token, &[&src], &follow);
    wait_until("a capture is being read", Duration::from_secs(120), || {
        server.log().contains("failpoint capture-before-read")
    });
    // Change the source after the marker, and reconnect: a new agent run resyncs every block.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0xc3; 2 * BLOCK as usize], 3 * BLOCK)
        .unwrap();
    f.sync_all().unwrap();
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let mut agent = Agent::start(&server, "guard", &token, &[&src], &follow);
    wait_until(
        "the restore point is listed",
        Duration::from_secs(120),
        || !server.restore_points().is_empty(),
    );
    let listed = server.restore_points();
    let rp = listed[0]["id"].as_str().unwrap().to_string();
    // An image file cannot be frozen: the point says so.
    let c = listed[0]["consistency"].as_str().unwrap();
    assert!(
        c.starts_with("crash-consistent-best-effort") && c.contains("not a block device"),
        "{c}"
    );
    let exported = d.path().join("rp.img");
    server.export(&rp, "g.img", &exported);
    assert_same(&at_marker, &exported, 8 << 20);
    server.verify(&rp);
    wait_until(
        "the replica has the change",
        Duration::from_secs(120),
        || same_bytes(&src, &server.volume("guard", "g.img"), 8 << 20),
    );
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
}
