//! The data path end to end: real binaries over loopback QUIC, byte-for-byte comparisons.

use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn several_agents_and_disks_replicate_byte_identically() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Three sources; one with two disks of different sizes and block sizes.
    let disks = [
        ("alpha", "a0.img", 48u64 << 20, 1u64),
        ("alpha", "a1.img", (16 << 20) + 4096 * 3, 2),
        ("beta", "b0.img", 40 << 20, 3),
        ("gamma", "g0.img", 24 << 20, 4),
    ];
    for (_, name, size, seed) in &disks {
        make_disk(&src.join(name), *size, *seed);
    }
    let mut agents = vec![];
    for source in ["alpha", "beta", "gamma"] {
        let token = server.token(source);
        let paths: Vec<_> = disks
            .iter()
            .filter(|x| x.0 == source)
            .map(|x| src.join(x.1))
            .collect();
        let refs: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
        agents.push(Agent::start(
            &server,
            source,
            &token,
            &refs,
            &["--block-size", "4096"],
        ));
    }
    for a in &mut agents {
        let st = a.wait(Duration::from_secs(300));
        assert!(st.success(), "agent failed: {st}\n{}", a.log_text());
    }
    for (source, name, size, _) in &disks {
        let vol = server.volume(source, name);
        assert_eq!(std::fs::metadata(&vol).unwrap().len(), *size);
        assert_same(&src.join(name), &vol, *size);
    }
    // The server knows every disk as a whole copy and exposes valid metrics.
    let status = server.status();
    let sources = status["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 3);
    for s in sources {
        for disk in s["disks"].as_array().unwrap() {
            assert_eq!(disk["synced"], true, "{disk}");
        }
    }
    let (code, metrics) = server.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("slipway_disk_durable_bytes_total{disk=\"a0.img\",source=\"alpha\"}"));
    crate::promtool_check(&metrics);
    assert!(server.healthy());
}

/// `kill -9` the server several times during a 1 GiB initial sync. After each kill, every range
/// the agent saw acked must already be on the volume; at the end the replica is identical.
#[test]
fn kill9_during_sync_loses_nothing_acked_and_resumes() {
    const SIZE: u64 = 1 << 30;
    let d = tempfile::tempdir().unwrap();
    let mut server = Server::start(&d.path().join("var"));
    let src = d.path().join("disk.img");
    make_disk(&src, SIZE, 42);
    let journal = d.path().join("acks.journal");
    let token = server.token("kill-src");
    let mut agent = Agent::start(
        &server,
        "kill-src",
        &token,
        &[&src],
        &["--ack-journal", journal.to_str().unwrap()],
    );
    let vol = server.volume("kill-src", "disk.img");
    let mut checked = 0;
    for (i, frac) in [0.15, 0.4, 0.7].iter().enumerate() {
        // Wait until the agent has seen about `frac` of the disk acked.
        let want = (SIZE as f64 * frac) as u64;
        wait_until("acks to progress", Duration::from_secs(240), || {
            acked_bytes(&journal) >= want
        });
        server.kill9();
        let n = check_journal(&journal, "disk.img", &src, &vol);
        assert!(n > checked, "kill {i}: the journal grew ({n} ranges)");
        checked = n;
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the agent keeps retrying while the server is down"
        );
        server.restart();
    }
    let st = agent.wait(Duration::from_secs(600));
    assert!(st.success(), "agent failed: {st}\n{}", agent.log_text());
    assert_same(&src, &vol, SIZE);
    check_journal(&journal, "disk.img", &src, &vol);
    let log = agent.log_text();
    assert!(
        log.contains("reconnect") || log.contains("Reconnect") || log.contains("retry"),
        "agent log mentions reconnecting:\n{log}"
    );
}

fn acked_bytes(journal: &std::path::Path) -> u64 {
    std::fs::read_to_string(journal)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn agent_exits_2_with_a_clear_message_on_a_bad_token() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let src = d.path().join("disk.img");
    make_disk(&src, 1 << 20, 1);
    let other = server.token("someone-else");
    let mut agent = Agent::start(&server, "mine", &other, &[&src], &[]);
    let st = agent.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(2), "{}", agent.log_text());
    let log = agent.log_text().to_lowercase();
    assert!(
        log.contains("unauthorized") || log.contains("credential"),
        "{log}"
    );
    assert!(
        !server.volume("mine", "disk.img").exists(),
        "nothing was created"
    );
    assert!(server.healthy());
}

/// An agent that finishes and exits releases its disks at once; a new agent process for the
/// same source (a new run: a full resync over the existing volume) then replicates changes.
#[test]
fn a_second_agent_run_resyncs_over_the_existing_volume() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let src = d.path().join("disk.img");
    make_disk(&src, 32 << 20, 21);
    let token = server.token("again");
    let mut a = Agent::start(&server, "again", &token, &[&src], &[]);
    assert!(
        a.wait(Duration::from_secs(120)).success(),
        "{}",
        a.log_text()
    );
    wait_until("the session to end", Duration::from_secs(20), || {
        server.status()["agents_connected"] == 0
    });
    // Change the source, including zeroing a range the replica has data in.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0u8; 3 << 20], 5 << 20).unwrap();
    f.write_all_at(&vec![0x77u8; 1 << 20], 20 << 20).unwrap();
    f.sync_all().unwrap();
    let mut b = Agent::start(&server, "again", &token, &[&src], &[]);
    assert!(
        b.wait(Duration::from_secs(120)).success(),
        "{}",
        b.log_text()
    );
    assert_same(&src, &server.volume("again", "disk.img"), 32 << 20);
}

/// `--state-file`: a cleanly stopped agent (SIGTERM, everything acknowledged) saves its run;
/// the next agent resumes it (the server answers Resume) and sends only what changed while no
/// agent ran, including a range zeroed meanwhile. The file is used once: after a `kill -9` of
/// that agent there is nothing to resume, and the next run resyncs. Every replica ends
/// byte-identical.
#[test]
fn a_cleanly_restarted_agent_resumes_and_sends_only_what_changed() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let src = d.path().join("disk.img");
    let size: u64 = 48 << 20;
    make_disk(&src, size, 23);
    let token = server.token("web");
    let state = d.path().join("agent.state");
    let state_s = state.to_str().unwrap();
    let args = [
        "--follow",
        "--rescan-interval",
        "1s",
        "--state-file",
        state_s,
    ];
    let vol = server.volume("web", "disk.img");
    let received = || {
        metric(
            &server.http_get("/metrics").1,
            "slipway_disk_received_bytes_total{disk=\"disk.img\",source=\"web\"}",
        )
    };
    let identical =
        || server.disk_state("web", "disk.img") == "continuous" && holds_prefix(&vol, &src);

    let mut a = Agent::start(&server, "web", &token, &[&src], &args);
    wait_until_or(
        "the first sync",
        Duration::from_secs(120),
        identical,
        || a.log_text(),
    );
    let first = received();
    sh("kill", &["-TERM", &a.child.id().to_string()]);
    assert!(
        a.wait(Duration::from_secs(30)).success(),
        "{}",
        a.log_text()
    );
    assert!(a.log_text().contains("saved the run"), "{}", a.log_text());
    assert!(state.exists());

    // Changed while no agent runs: 2 MiB of new data and 1 MiB zeroed.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0x5au8; 2 << 20], 10 << 20).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 30 << 20).unwrap();
    f.sync_all().unwrap();

    let mut b = Agent::start(&server, "web", &token, &[&src], &args);
    wait_until_or(
        "the resumed run to send the changes",
        Duration::from_secs(60),
        identical,
        || format!("{}\n{}", b.log_text(), server.log()),
    );
    let blog = b.log_text();
    assert!(blog.contains("resuming the run saved"), "{blog}");
    assert!(
        !blog.contains("pass starts from offset 0"),
        "no full pass:\n{blog}"
    );
    assert!(!state.exists(), "the saved run is used once");
    let resent = received() - first;
    assert!(
        resent <= (4 << 20) as f64,
        "only the changed chunks are sent: {resent} bytes of a {first}-byte first sync"
    );
    assert!(first >= (size / 2) as f64, "{first}");

    // A crash saves nothing: the next run resyncs, and the replica still ends identical.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    assert!(!state.exists());
    f.write_all_at(&vec![0x33u8; 1 << 20], 40 << 20).unwrap();
    f.sync_all().unwrap();
    let c = Agent::start(&server, "web", &token, &[&src], &args);
    wait_until_or("the resync", Duration::from_secs(120), identical, || {
        c.log_text()
    });
    assert!(c.log_text().contains("resume=Resync"), "{}", c.log_text());
}

/// Clean stops in the middle of a changing workload: each SIGTERM lands while the source is
/// being written and a rescan may be half done. Whatever each stop saved, the chunk table must
/// describe what the volume holds, or a later resumed run would skip a changed chunk: at the end
/// the replica equals the source.
#[test]
fn clean_stops_during_writes_resume_without_losing_a_change() {
    use rand::{Rng, SeedableRng};
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let src = d.path().join("busy.img");
    let size: u64 = 16 << 20;
    make_disk(&src, size, 29);
    let token = server.token("busy");
    let state = d.path().join("busy.state");
    let args = [
        "--follow",
        "--rescan-interval",
        "200ms",
        "--chunk-size",
        "64KiB",
        "--state-file",
        state.to_str().unwrap(),
    ];
    let vol = server.volume("busy", "busy.img");
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    let (mut saved, mut resumed) = (0, 0);
    for round in 0..5 {
        let mut a = Agent::start(&server, "busy", &token, &[&src], &args);
        // Write for about a second, stop the agent while still writing (after 150 writes or
        // 0.8 s, whichever comes first: a loaded machine makes fewer writes), write some more.
        let begun = std::time::Instant::now();
        let deadline = begun + Duration::from_millis(1200);
        let mut n = 0;
        let mut stopped = false;
        while std::time::Instant::now() < deadline || n < 50 || !stopped {
            let len = rng.gen_range(1..=16) * 4096;
            let off = rng.gen_range(0..(size - len) / 4096) * 4096;
            let fill = if rng.gen_ratio(1, 8) { 0 } else { rng.gen() };
            f.write_all_at(&vec![fill; len as usize], off).unwrap();
            n += 1;
            if !stopped && (n >= 150 || begun.elapsed() >= Duration::from_millis(800)) {
                sh("kill", &["-TERM", &a.child.id().to_string()]);
                stopped = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            a.wait(Duration::from_secs(30)).success(),
            "{}",
            a.log_text()
        );
        let log = a.log_text();
        saved += log.contains("saved the run") as u32;
        resumed += (round > 0 && log.contains("resuming the run saved")) as u32;
    }
    f.sync_all().unwrap();
    let last = Agent::start(&server, "busy", &token, &[&src], &args);
    wait_until_or(
        "the replica to equal the source",
        Duration::from_secs(120),
        || server.disk_state("busy", "busy.img") == "continuous" && holds_prefix(&vol, &src),
        || last.log_text(),
    );
    eprintln!("clean stops: {saved} of 5 saved the run, {resumed} runs resumed one");
    assert!(resumed >= 1, "the test must exercise resumed runs");
}

/// Under systemd (Type=notify) the server reports readiness on NOTIFY_SOCKET.
#[test]
fn tells_systemd_when_ready() {
    let d = tempfile::tempdir().unwrap();
    let sock_path = d.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let server = Server::start_env(
        &d.path().join("var"),
        "127.0.0.1:0",
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    assert!(server.healthy());
}

/// `synced` (the server durably knows the volume is a whole copy) is recorded before the ack
/// that ends the pass: an agent that saw its last ack and exited leaves a server that, killed
/// at once and restarted, still reports the disk synced. The failpoint holds the server for 5 s
/// between the pass's last flush and recording it; with the ack sent first (the bug of
/// c3cf13f) the agent exits inside that window and the restarted server forgets the copy.
#[test]
fn a_completed_pass_is_recorded_before_its_last_ack() {
    let d = tempfile::tempdir().unwrap();
    let var = d.path().join("var");
    let mut server = Server::start_env(
        &var,
        "127.0.0.1:0",
        &[],
        &[("SLIPWAY_FAILPOINT", "pass-completed-before-record")],
    );
    let token = server.token("rec");
    let src = d.path().join("r.img");
    make_disk(&src, 4 << 20, 21);
    let mut agent = Agent::start(&server, "rec", &token, &[&src], &[]);
    let st = agent.wait(Duration::from_secs(120));
    assert!(st.success(), "agent failed: {st}\n{}", agent.log_text());
    server.kill9();
    server.restart();
    let st = server.status();
    let disk = &st["sources"][0]["disks"][0];
    assert_eq!(
        disk["synced"], true,
        "the completed pass was forgotten: {disk}"
    );
    assert_same(&src, &server.volume("rec", "r.img"), 4 << 20);
}

/// A connection that goes away while its disk's event poller is still recording a completed
/// pass (held 5 s by the failpoint) keeps the disk's lease until the record is written: the
/// next agent's open (which writes a new volume stamp and new metadata) comes after it, never
/// before. Were the lease released first, the old session's record would land over the new
/// session's metadata (an older stamp, an older run), and a restarted server would distrust a
/// good volume.
#[test]
fn a_late_pass_record_never_overwrites_the_next_sessions_metadata() {
    let d = tempfile::tempdir().unwrap();
    let var = d.path().join("var");
    let server = Server::start_env(
        &var,
        "127.0.0.1:0",
        &[],
        &[("SLIPWAY_FAILPOINT", "pass-completed-before-record")],
    );
    let token = server.token("late");
    let src = d.path().join("l.img");
    make_disk(&src, 4 << 20, 23);
    let mut first = Agent::start(&server, "late", &token, &[&src], &["--follow"]);
    // A bound, not a timing: 5 s alone, but starved beside the 100-agent storm test on a
    // loaded 2-core machine it once took more than 60 s.
    wait_until_or(
        "the pass record to be held",
        Duration::from_secs(240),
        || {
            server
                .log()
                .contains("failpoint pass-completed-before-record: pausing")
        },
        || {
            format!(
                "server log:\n{}\nagent log:\n{}",
                server.log(),
                first.log_text()
            )
        },
    );
    // The agent goes away while the record is held; a new run connects at once.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let mut second = Agent::start(&server, "late", &token, &[&src], &[]);
    let st = second.wait(Duration::from_secs(120));
    assert!(st.success(), "{}", second.log_text());
    let log = server.log();
    let resumed = log
        .find("failpoint pass-completed-before-record: resuming")
        .unwrap_or(usize::MAX);
    let opens: Vec<usize> = log.match_indices("disk opened").map(|(i, _)| i).collect();
    assert!(opens.len() >= 2, "{log}");
    assert!(
        resumed < opens[1],
        "the next session opened the disk before the old one's record was written:\n{log}"
    );
    assert_same(&src, &server.volume("late", "l.img"), 4 << 20);
}

/// The volume under a disk's metadata is replaced by an older copy while nothing runs (a
/// restore from a backup, a swapped file). A resumed agent run would otherwise be trusted to
/// be where the metadata says and send only what changed since its save: the server must see
/// that the volume is not the one its metadata describes and resynchronise the disk.
#[test]
fn a_volume_older_than_its_metadata_is_resynchronised_not_trusted() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let var = d.path().join("var");
    let mut server = Server::start(&var);
    let src = d.path().join("disk.img");
    let size: u64 = 8 << 20;
    make_disk(&src, size, 41);
    let token = server.token("stamp");
    let state = d.path().join("agent.state");
    let args = [
        "--follow",
        "--rescan-interval",
        "1s",
        "--state-file",
        state.to_str().unwrap(),
    ];
    let vol = server.volume("stamp", "disk.img");
    let mut a = Agent::start(&server, "stamp", &token, &[&src], &args);
    wait_until_or(
        "the first sync",
        Duration::from_secs(120),
        || server.disk_state("stamp", "disk.img") == "continuous" && holds_prefix(&vol, &src),
        || a.log_text(),
    );
    // An older copy of the volume (no stamp: a plain copy of its bytes).
    let older = d.path().join("older.raw");
    std::fs::copy(&vol, &older).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0x6bu8; 1 << 20], 2 << 20).unwrap();
    f.sync_all().unwrap();
    wait_until_or(
        "the change",
        Duration::from_secs(60),
        || holds_prefix(&vol, &src),
        || a.log_text(),
    );
    sh("kill", &["-TERM", &a.child.id().to_string()]);
    assert!(
        a.wait(Duration::from_secs(30)).success(),
        "{}",
        a.log_text()
    );
    assert!(a.log_text().contains("saved the run"), "{}", a.log_text());
    server.terminate(Duration::from_secs(30));
    std::fs::rename(&older, &vol).unwrap();
    server.restart();

    let b = Agent::start(&server, "stamp", &token, &[&src], &args);
    wait_until_or(
        "the replica to equal the source again",
        Duration::from_secs(60),
        || holds_prefix(&vol, &src),
        || format!("{}\n{}", b.log_text(), server.log()),
    );
    assert!(
        server.log().contains("does not match its metadata"),
        "{}",
        server.log()
    );
}

/// Checksum resync: a new agent process (its predecessor crashed) over a volume that already
/// holds the disk sends only the chunks that differ — the server hashes what it holds, the
/// agent compares — not the whole disk; the replica ends identical.
#[test]
fn a_new_agent_run_sends_only_the_chunks_that_differ() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let src = d.path().join("disk.img");
    let size: u64 = 64 << 20;
    make_disk(&src, size, 57);
    let token = server.token("crc");
    let vol = server.volume("crc", "disk.img");
    let follow = ["--follow", "--rescan-interval", "1s"];
    let received = || {
        metric(
            &server.http_get("/metrics").1,
            "slipway_disk_received_bytes_total{disk=\"disk.img\",source=\"crc\"}",
        ) as u64
    };
    let identical =
        || server.disk_state("crc", "disk.img") == "continuous" && holds_prefix(&vol, &src);
    let mut a = Agent::start(&server, "crc", &token, &[&src], &follow);
    wait_until_or(
        "the first sync",
        Duration::from_secs(120),
        identical,
        || a.log_text(),
    );
    // An image file: the agent rereads it and says why (the server shows it).
    let disk = server.disk_report("crc", "disk.img");
    assert_eq!(disk["tracking"], "rescan", "{disk}");
    assert!(
        disk["tracking_reason"]
            .as_str()
            .is_some_and(|r| r.contains("block device")),
        "{disk}"
    );
    // The agent crashes; the source changes meanwhile: 3 whole chunks (1 MiB each).
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    for (i, at) in [5u64, 20, 41].iter().enumerate() {
        f.write_all_at(&vec![0x90 + i as u8; 1 << 20], at << 20)
            .unwrap();
    }
    f.sync_all().unwrap();
    let before = received();
    let b = Agent::start(&server, "crc", &token, &[&src], &follow);
    wait_until_or("the resync", Duration::from_secs(120), identical, || {
        b.log_text()
    });
    let sent = received() - before;
    let differ = 3u64 << 20;
    assert!(
        b.log_text().contains("resume=Resync"),
        "a new run resyncs: {}",
        b.log_text()
    );
    assert!(
        sent <= differ + size / 100,
        "checksum resync sent {sent} bytes for {differ} that differ on a {size}-byte disk"
    );
    assert!(sent >= differ, "the changed chunks were sent: {sent}");
}

#[test]
fn the_servers_bandwidth_limit_for_a_source_reaches_its_agent() {
    // The server's settings cap source "web" at 8 Mbit/s (1 MB/s); the agent has no limit of
    // its own. The 6 MiB of data an 8 MiB test disk holds then take at least 6 s (the
    // bucket's 100 kB burst aside); unthrottled they take well under one on loopback.
    let d = tempfile::tempdir().unwrap();
    let server = Server::with_settings(
        &d.path().join("var"),
        "[sources.web]\nbandwidth_mbps = 8\n[sources.other]\nbandwidth_mbps = 1000\n",
    );
    let src = d.path().join("disk.img");
    let size: u64 = 8 << 20;
    make_disk(&src, size, 73);
    let status_file = d.path().join("agent-status.json");
    let token = server.token("web");
    let started = Instant::now();
    let mut a = Agent::start(
        &server,
        "web",
        &token,
        &[&src],
        &["--status-file", status_file.to_str().unwrap()],
    );
    assert!(
        a.wait(Duration::from_secs(120)).success(),
        "{}",
        a.log_text()
    );
    let took = started.elapsed();
    assert_same(&src, &server.volume("web", "disk.img"), size);
    let log = a.log_text();
    assert!(
        log.contains("bandwidth limit set by the server") && log.contains("Some(8.0)"),
        "{log}"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap();
    assert_eq!(status["server_bandwidth_limit_mbps"], 8.0, "{status}");
    let sent = metric(
        &server.http_get("/metrics").1,
        "slipway_disk_received_bytes_total{disk=\"disk.img\",source=\"web\"}",
    );
    assert!(sent >= (6 << 20) as f64, "{sent}");
    assert!(
        took.as_secs_f64() >= sent / 1e6 - 0.2,
        "{sent} bytes under a pushed 8 Mbit/s limit went in {took:?}"
    );
    // The server says what it pushes.
    let report = server.status();
    let web = report["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "web")
        .unwrap();
    assert_eq!(web["bandwidth_limit_mbps"], 8.0, "{report}");
}
