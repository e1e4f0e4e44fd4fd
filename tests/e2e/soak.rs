//! The kill soak (`make soak`, issue 6): agents in `--follow` replicate sources that a
//! workload keeps changing, while the server is `kill -9`ed at random moments — in initial
//! syncs, in rescans, in the middle of restore points — and restarted. At the end every replica
//! equals its source and every listed restore point verifies and exports to exactly the state
//! recorded when it was requested. Some rounds restart an agent instead: a clean stop
//! (SIGTERM, which saves its run with `--state-file` for the next agent to resume) or a crash
//! (`kill -9`, which saves nothing: the next agent resyncs).
//!
//! Bounded by `SOAK_SECONDS` (default 600) plus the final convergence and checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use crate::support::*;

struct Source {
    id: String,
    disks: Vec<(String, PathBuf, u64)>,
    /// Held by the writer for each write; the test holds it to pause the workload.
    gate: Arc<Mutex<()>>,
    agent: Agent,
    token: String,
    state: PathBuf,
}

/// A follow-mode agent of source `id` that saves its run at a clean stop.
fn start_agent(
    server: &Server,
    id: &str,
    token: &str,
    disks: &[(String, PathBuf, u64)],
    state: &std::path::Path,
) -> Agent {
    let paths: Vec<&std::path::Path> = disks.iter().map(|x| x.1.as_path()).collect();
    let state = state.to_str().unwrap();
    Agent::start(
        server,
        id,
        token,
        &paths,
        &["--follow", "--rescan-interval", "1s", "--state-file", state],
    )
}

/// Expected image hashes of one restore point: disk id → SHA-256.
type Expected = BTreeMap<String, String>;

#[test]
#[ignore = "soak: bounded by SOAK_SECONDS (default 600 s); run by make soak"]
fn kill9_soak_follow_agents_changing_workload_restore_points() {
    let secs: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("soak: {secs} s, seed {seed} (SOAK_SEED to replay the schedule)");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let d = tempfile::tempdir().unwrap();
    let mut server = Server::start(&d.path().join("var"));
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();

    let layout: [(&str, &[(&str, u64)]); 3] = [
        ("soak-a", &[("a0", 48 << 20), ("a1", 16 << 20)]),
        ("soak-b", &[("b0", 32 << 20)]),
        ("soak-c", &[("c0", 24 << 20)]),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let mut sources = vec![];
    let mut writers = vec![];
    for (i, (id, disks)) in layout.iter().enumerate() {
        let disks: Vec<(String, PathBuf, u64)> = disks
            .iter()
            .enumerate()
            .map(|(j, (name, size))| {
                let p = src.join(name);
                make_disk(&p, *size, seed ^ (i * 10 + j) as u64);
                (name.to_string(), p, *size)
            })
            .collect();
        let token = server.token(id);
        let gate = Arc::new(Mutex::new(()));
        // The workload: random 4 KiB..256 KiB writes at 4 KiB-aligned offsets, about 30 a
        // second per source, each under the gate.
        let (g, st, wb, wn) = (gate.clone(), stop.clone(), written.clone(), writes.clone());
        let files: Vec<(std::fs::File, u64)> = disks
            .iter()
            .map(|(_, p, s)| (std::fs::OpenOptions::new().write(true).open(p).unwrap(), *s))
            .collect();
        let wseed = rng.next_u64();
        writers.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(wseed);
            let mut buf = vec![0u8; 256 << 10];
            while !st.load(Ordering::Relaxed) {
                {
                    let _held = g.lock().unwrap();
                    let (f, size) = &files[rng.gen_range(0..files.len())];
                    let len = rng.gen_range(1..=64usize) * 4096;
                    let off = rng.gen_range(0..(size - len as u64) / 4096) * 4096;
                    if rng.gen_ratio(1, 8) {
                        buf[..len].fill(0); // zeroed ranges too
                    } else {
                        rng.fill_bytes(&mut buf[..len]);
                    }
                    f.write_all_at(&buf[..len], off).unwrap();
                    wb.fetch_add(len as u64, Ordering::Relaxed);
                    wn.fetch_add(1, Ordering::Relaxed);
                }
                // Pacing of the workload, not synchronisation.
                std::thread::sleep(Duration::from_millis(rng.gen_range(5..60)));
            }
        }));
        let state = d.path().join(format!("{id}.agent-state"));
        let agent = start_agent(&server, id, &token, &disks, &state);
        sources.push(Source {
            id: id.to_string(),
            disks,
            gate,
            agent,
            token,
            state,
        });
    }
    let (mut agent_stops, mut agent_kills, mut runs_saved, mut runs_resumed) = (0u32, 0, 0, 0);

    let mut expected: HashMap<String, (String, Expected)> = HashMap::new();
    let mut kills = 0u32;
    let mut kills_in_rp = 0u32;
    let mut rp_requested = 0u32;
    let mut rp_failed = 0u32;
    let mut peak_rss = 0u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut round = 0u32;
    while Instant::now() < deadline {
        round += 1;
        // Let the system run a random while, then kill it.
        let pause = Duration::from_millis(rng.gen_range(500..10_000));
        std::thread::sleep(pause);
        if round % 4 == 2 {
            // An agent restart: clean (its run saved for the next agent) or a crash.
            let i = rng.gen_range(0..sources.len());
            let s = &mut sources[i];
            if rng.gen_ratio(2, 3) {
                sh("kill", &["-TERM", &s.agent.child.id().to_string()]);
                let st = s.agent.wait(Duration::from_secs(60));
                assert!(st.success(), "{}", s.agent.log_text());
                agent_stops += 1;
                runs_saved += s.agent.log_text().contains("saved the run") as u32;
            } else {
                s.agent.child.kill().unwrap();
                s.agent.child.wait().unwrap();
                agent_kills += 1;
            }
            runs_resumed += s.agent.log_text().contains("resuming the run saved") as u32;
            s.agent = start_agent(&server, &s.id, &s.token, &s.disks, &s.state);
            continue;
        }
        if round.is_multiple_of(3) {
            // A restore point of a random source, possibly killed in the middle.
            let s = &sources[rng.gen_range(0..sources.len())];
            let ready = wait_continuous(&server, s, Duration::from_secs(240));
            if !ready {
                eprintln!("round {round}: {} not continuous in time; skipping", s.id);
            } else {
                let kill_in = rng.gen_ratio(1, 3).then(|| rng.gen_range(0..1500u64));
                let before: HashSet<String> = listed_ids(&server, &s.id);
                let held = s.gate.lock().unwrap();
                let state: Expected = s
                    .disks
                    .iter()
                    .map(|(name, p, _)| (name.clone(), sha256_file(p)))
                    .collect();
                rp_requested += 1;
                let dd = server.data_dir.clone();
                let id = s.id.clone();
                let create = std::thread::spawn(move || {
                    std::process::Command::new(SLIPWAY)
                        .args(["restore-points", "create", "--source", &id, "--wait"])
                        .arg("--data-dir")
                        .arg(&dd)
                        .output()
                        .unwrap()
                });
                if let Some(ms) = kill_in {
                    std::thread::sleep(Duration::from_millis(ms));
                    peak_rss = peak_rss.max(server.peak_rss_kib());
                    server.kill9();
                    kills += 1;
                    kills_in_rp += 1;
                    let _ = create.join();
                    server.restart();
                } else {
                    let out = create.join().unwrap();
                    if !out.status.success() {
                        rp_failed += 1;
                        eprintln!(
                            "round {round}: restore point of {} failed: {}",
                            s.id,
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                }
                // Whatever is listed now that was not before is this request's restore
                // point (an interrupted one must not be listed at all, or be whole).
                for new in listed_ids(&server, &s.id).difference(&before) {
                    expected.insert(new.clone(), (s.id.clone(), state.clone()));
                }
                drop(held);
                continue;
            }
        }
        peak_rss = peak_rss.max(server.peak_rss_kib());
        server.kill9();
        kills += 1;
        server.restart();
    }
    let soak_time = started.elapsed();

    // Quiesce: stop the workload, wait until every replica equals its source.
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    for s in &sources {
        assert!(
            wait_continuous(&server, s, Duration::from_secs(300)),
            "{} did not converge\n{}",
            s.id,
            s.agent.log_text()
        );
        for (name, p, size) in &s.disks {
            let vol = server.volume(&s.id, name);
            wait_until(
                &format!("{}/{name} to equal its source", s.id),
                Duration::from_secs(120),
                || same_bytes(p, &vol, *size),
            );
        }
    }
    peak_rss = peak_rss.max(server.peak_rss_kib());

    // Every listed restore point verifies; those taken on request export to the state
    // recorded when they were requested.
    let list = server.restore_points();
    let mut verified = 0;
    let mut exported = 0;
    let mut matched = 0;
    let mut scheduled = 0;
    for rp in &list {
        let id = rp["id"].as_str().unwrap().to_string();
        server.verify(&id);
        verified += 1;
        match expected.get(&id) {
            Some((source, state)) => {
                assert_eq!(rp["source"], source.as_str());
                matched += 1;
                for (disk, hash) in state {
                    let out = d.path().join("export.img");
                    server.export(&id, disk, &out);
                    assert_eq!(
                        &sha256_file(&out),
                        hash,
                        "restore point {id} disk {disk} differs from the state when it was taken"
                    );
                    std::fs::remove_file(&out).unwrap();
                    exported += 1;
                }
            }
            None => {
                assert_eq!(
                    rp["trigger"], "scheduled",
                    "an unexpected on-demand restore point {rp}"
                );
                scheduled += 1;
            }
        }
    }
    let total: u64 = sources
        .iter()
        .flat_map(|s| s.disks.iter().map(|x| x.2))
        .sum();
    eprintln!(
        "SOAK RESULT: {:.0} s, {kills} kill -9 ({kills_in_rp} during a restore point), \
         {} workload writes ({} MiB) over {} disks ({} MiB), every replica identical; \
         restore points: {rp_requested} requested, {rp_failed} failed cleanly, {} listed, \
         {verified} verified, {matched} on request whose {exported} disk images equal the recorded state, \
         {scheduled} scheduled; agents: {agent_stops} clean stops ({runs_saved} saved their run, \
         {} resumed one), {agent_kills} kill -9; server peak RSS {} MiB",
        soak_time.as_secs_f64(),
        writes.load(Ordering::Relaxed),
        written.load(Ordering::Relaxed) >> 20,
        sources.iter().map(|s| s.disks.len()).sum::<usize>(),
        total >> 20,
        list.len(),
        runs_resumed
            + sources
                .iter()
                .map(|s| s.agent.log_text().contains("resuming the run saved") as u32)
                .sum::<u32>(),
        peak_rss / 1024
    );
    assert!(kills > 0, "the soak killed the server at least once");
    for s in &mut sources {
        assert!(
            s.agent.child.try_wait().unwrap().is_none(),
            "agent {} is still running",
            s.id
        );
    }
}

/// Ids of the listed restore points of one source.
fn listed_ids(server: &Server, source: &str) -> HashSet<String> {
    server
        .restore_points()
        .iter()
        .filter(|r| r["source"] == source)
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until every disk of the source is `continuous`; false on timeout.
fn wait_continuous(server: &Server, s: &Source, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if s.disks
            .iter()
            .all(|(name, _, _)| server.disk_state(&s.id, name) == "continuous")
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
