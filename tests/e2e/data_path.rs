//! The data path end to end: real binaries over loopback QUIC, byte-for-byte comparisons.

use std::time::Duration;

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
