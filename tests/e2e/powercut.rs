//! Real power cuts of the real binary (issue 12 item 4).
//!
//! `kill -9` leaves the page cache alive, so a server that acknowledged writes right after
//! `pwrite` would pass every kill test. Here the server's data dir lives on
//! `slipway-powercut` (crates/powercut): a FUSE passthrough that keeps every file's written
//! data in memory until that file is fsync'd, and throws the unsynced part away on a cut. A
//! power cut is `kill -9` of the server *and* a cut of the filesystem; the filesystem is then
//! mounted again on the surviving backing dir and the server restarted on it.
//!
//! The agent follows a source that a writer thread keeps changing and journals every ack
//! (`--ack-journal`). After each cut (sometimes two in a row, the second while the agent
//! resends) the writer pauses, the server is restarted, the agent resumes, and once the
//! replica has had time to converge every acknowledged range is compared with the source
//! ([`check_journal`]): an acked write that was lost is never sent again (the agent released
//! it and its follow-mode hashes say the chunk went), so it stays visibly missing. Metadata
//! ahead of the volume shows the same way (the agent resumes past data that is not there).
//! Restore points are taken between cuts; at the end every listed one verifies and exports to
//! the source state recorded when it was taken.
//!
//! `powercut_catches_a_server_that_acks_before_fdatasync` runs the same harness against a
//! deliberately broken server (`SLIPWAY_FAILPOINT=skip-fdatasync`: it reports writes durable
//! without calling fdatasync) and requires the harness to find lost acknowledged writes.
//!
//! Root only (FUSE mount), and skipped without /dev/fuse. `slipway-powercut` must be built
//! (`make test` builds the workspace; `make soak` builds it first).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use crate::support::*;

/// The `slipway-powercut` binary beside the test binary's directory (target/<profile>/).
fn powercut_bin() -> PathBuf {
    let p = workspace_bin("slipway-powercut");
    assert!(
        p.exists(),
        "{} is missing: cargo build -p slipway-powercut (make test and make soak build it)",
        p.display()
    );
    p
}

/// Whether this machine can run the harness; says why not.
fn can_run() -> bool {
    if !is_root() {
        eprintln!("skipped: power-cut tests mount FUSE and need root");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: no /dev/fuse");
        return false;
    }
    true
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want))
}

/// A mounted `slipway-powercut` filesystem.
struct PowerFs {
    child: Option<Child>,
    backing: PathBuf,
    mnt: PathBuf,
    ctl: PathBuf,
    log: PathBuf,
}

impl PowerFs {
    fn mount(backing: &Path, mnt: &Path, ctl: &Path, log: &Path) -> PowerFs {
        std::fs::create_dir_all(backing).unwrap();
        std::fs::create_dir_all(mnt).unwrap();
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(powercut_bin())
            .arg("mount")
            .arg(backing)
            .arg(mnt)
            .arg("--control")
            .arg(ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawning slipway-powercut");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("\"ready\""),
            "slipway-powercut did not mount: {line}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(is_mounted(&std::fs::canonicalize(mnt).unwrap()));
        PowerFs {
            child: Some(child),
            backing: backing.to_owned(),
            mnt: mnt.to_owned(),
            ctl: ctl.to_owned(),
            log: log.to_owned(),
        }
    }

    fn command(&self, cmd: &str) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&self.ctl).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        writeln!(s, "{cmd}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.starts_with("ok"), "powercut {cmd}: {line}");
        line.trim().to_string()
    }

    /// Bytes written to the filesystem and not synced yet.
    fn pending_bytes(&self) -> u64 {
        let s = self.command("status");
        s.split_whitespace()
            .nth(2)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    }

    /// The power cut: every unsynced byte is dropped and the filesystem unmounted.
    fn cut(&mut self) -> String {
        let answer = self.command("cut");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("slipway-powercut did not exit after a cut");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.success(), "slipway-powercut exited {st}");
        let mnt = std::fs::canonicalize(&self.mnt).unwrap_or(self.mnt.clone());
        wait_until(
            "the cut filesystem unmounted",
            Duration::from_secs(10),
            || !is_mounted(&mnt),
        );
        answer
    }

    /// Mounts again on the same backing dir: the machine is back.
    fn remount(&mut self) {
        assert!(self.child.is_none(), "remount after a cut only");
        let mut new = PowerFs::mount(&self.backing, &self.mnt, &self.ctl, &self.log);
        // `new` gives its process up and drops as an empty shell (no unmount).
        self.child = new.child.take();
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        // Only a live mount of ours: SIGTERM is a cut and an unmount.
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .output();
            let _ = c.wait();
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
    }
}

/// Ranges of the journal for `disk_id` whose content on the volume differs from the source:
/// (ranges checked, ranges lost, bytes lost). The source must not change meanwhile.
fn lost_acked(journal: &Path, disk_id: &str, source: &Path, volume: &Path) -> (usize, usize, u64) {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let fs = std::fs::File::open(source).unwrap();
    let fv = std::fs::File::open(volume).unwrap();
    let (mut n, mut lost, mut bytes) = (0, 0, 0);
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() != 4 || parts[0] != disk_id {
            continue;
        }
        let (off, len): (u64, u64) = (parts[2].parse().unwrap(), parts[3].parse().unwrap());
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        fs.read_exact_at(&mut a, off).unwrap();
        if fv.read_exact_at(&mut b, off).is_err() || a != b {
            lost += 1;
            bytes += len;
        }
        n += 1;
    }
    (n, lost, bytes)
}

/// The harness's directory: a temporary one, or one kept for a post-mortem.
enum Workdir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl From<PathBuf> for Workdir {
    fn from(p: PathBuf) -> Self {
        Workdir::Kept(p)
    }
}

impl Workdir {
    fn path(&self) -> &Path {
        match self {
            Workdir::Temp(t) => t.path(),
            Workdir::Kept(p) => p,
        }
    }
}

/// One run of the harness.
struct Plan {
    /// Stop after this many power cuts…
    cuts: u32,
    /// …or once this long has passed.
    limit: Duration,
    /// The server's environment (the broken build's failpoint).
    env: Vec<(&'static str, &'static str)>,
    /// How long the replica may take to converge after a restart before the acked ranges
    /// are compared anyway.
    converge: Duration,
    /// Take restore points between cuts and check them at the end.
    restore_points: bool,
    /// The broken build: stop at the first cut that lost acked writes instead of failing.
    expect_loss: bool,
}

#[derive(Debug, Default)]
struct Outcome {
    cuts: u32,
    /// Cuts after which the acked ranges were checked.
    checks: u32,
    writes: u64,
    acked_ranges: usize,
    acked_bytes: u64,
    lost_ranges: usize,
    lost_bytes: u64,
    /// The cut after which a loss was first seen.
    first_loss_at: Option<u32>,
    dropped_bytes: u64,
    /// Cuts that dropped at least [`HOT`] unsynced bytes (replicated data in flight).
    hot_cuts: u32,
    restore_points: usize,
    exported: usize,
}

const SOURCE: &str = "cut";
/// Unsynced bytes that mean a write burst is in flight (log lines alone are far fewer).
const HOT: u64 = 64 << 10;
const DISKS: [(&str, u64); 2] = [("c0.img", 8 << 20), ("c1.img", 3 << 20)];

fn start_agent(
    server: &Server,
    token: &str,
    disks: &[PathBuf],
    journal: &Path,
    log: &Path,
) -> Agent {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("replicate")
        .args(["--server", &server.listen.to_string()])
        .args(["--server-fingerprint", &server.fingerprint])
        .args(["--source-id", SOURCE, "--token", token]);
    for d in disks {
        cmd.arg("--disk").arg(d);
    }
    // The agent logs outside the powercut filesystem: its log must survive the cuts.
    cmd.args(["--follow", "--rescan-interval", "1s", "--ack-journal"])
        .arg(journal)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
    Agent {
        child: cmd.spawn().expect("spawning slipway-agent"),
        log: log.to_owned(),
    }
}

fn harness(plan: Plan) -> Outcome {
    let seed: u64 = std::env::var("POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "powercut: up to {} cuts / {:?}, seed {seed} (POWERCUT_SEED to replay the schedule)",
        plan.cuts, plan.limit
    );
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    // POWERCUT_DIR keeps everything (logs, backing dir, journal) for a post-mortem.
    let d = match std::env::var_os("POWERCUT_DIR") {
        Some(p) => {
            let p = PathBuf::from(p);
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            tempfile::Builder::new()
                .tempdir_in(p)
                .unwrap()
                .keep()
                .into()
        }
        None => Workdir::Temp(tempfile::tempdir().unwrap()),
    };
    let (backing, mnt) = (d.path().join("backing"), d.path().join("mnt"));
    let mut fs = PowerFs::mount(
        &backing,
        &mnt,
        &d.path().join("ctl.sock"),
        &d.path().join("powercut.log"),
    );
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let disks: Vec<(PathBuf, u64)> = DISKS
        .iter()
        .enumerate()
        .map(|(i, (name, size))| {
            let p = src.join(name);
            make_disk(&p, *size, seed ^ i as u64);
            (p, *size)
        })
        .collect();
    // The server's syncfs (its snapshot store's) never reaches a FUSE daemon: the preloaded
    // interposer (crates/powercut/src/preload.rs) tells the filesystem about each one.
    let preload = d.path().join("libsyncfs.so");
    let st = Command::new(powercut_bin())
        .arg("preload")
        .arg(&preload)
        .status()
        .unwrap();
    assert!(st.success(), "building the syncfs interposer");
    let owned: Vec<(String, String)> = vec![
        ("LD_PRELOAD".into(), preload.display().to_string()),
        (
            "SLIPWAY_POWERCUT_CONTROL".into(),
            d.path().join("ctl.sock").display().to_string(),
        ),
        ("SLIPWAY_POWERCUT_MOUNT".into(), mnt.display().to_string()),
    ];
    let mut env: Vec<(&str, &str)> = plan.env.clone();
    env.extend(owned.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut server = Server::start_env(&mnt.join("var"), "127.0.0.1:0", &[], &env);
    let token = server.token(SOURCE);
    let journal = d.path().join("acks.journal");
    let paths: Vec<PathBuf> = disks.iter().map(|x| x.0.clone()).collect();
    let mut agent = start_agent(
        &server,
        &token,
        &paths,
        &journal,
        &d.path().join("agent.log"),
    );
    // Everything the server logged, saved before each cut (its log lives on the cut fs).
    let history = d.path().join("server-history.log");
    let save_log = |server: &Server| {
        let mut h = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&history)
            .unwrap();
        let _ = h.write_all(server.log().as_bytes());
    };

    // The workload: random 4 KiB..256 KiB writes (some of zeros) under the gate.
    let gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (g, st, wn) = (gate.clone(), stop.clone(), writes.clone());
        let files: Vec<(std::fs::File, u64)> = disks
            .iter()
            .map(|(p, s)| (std::fs::OpenOptions::new().write(true).open(p).unwrap(), *s))
            .collect();
        let wseed = rng.next_u64();
        std::thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(wseed);
            let mut buf = vec![0u8; 256 << 10];
            while !st.load(Ordering::Relaxed) {
                {
                    let _held = g.lock().unwrap_or_else(|e| e.into_inner());
                    let (f, size) = &files[rng.gen_range(0..files.len())];
                    let len = rng.gen_range(1..=64usize) * 4096;
                    let off = rng.gen_range(0..(size - len as u64) / 4096) * 4096;
                    if rng.gen_ratio(1, 8) {
                        buf[..len].fill(0);
                    } else {
                        rng.fill_bytes(&mut buf[..len]);
                    }
                    f.write_all_at(&buf[..len], off).unwrap();
                    wn.fetch_add(1, Ordering::Relaxed);
                }
                // Pacing of the workload, not synchronisation.
                std::thread::sleep(Duration::from_millis(rng.gen_range(2..25)));
            }
        })
    };

    let mut out = Outcome::default();
    // Restore point id → the SHA-256 of each source disk when it was taken.
    let mut expected: Vec<(String, Vec<String>)> = vec![];
    let started = Instant::now();
    let context = |server: &Server, agent: &Agent| {
        format!(
            "agent log (tail):\n{}\nserver log:\n{}",
            tail(&agent.log_text(), 40),
            tail(&server.log(), 40)
        )
    };
    while out.cuts < plan.cuts && started.elapsed() < plan.limit {
        // Run a random while (initial sync, rescans, resends), then lose power.
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..2000)));
        let mut held = None;
        let mut cuts_now = 0;
        loop {
            // Half the cuts wait for unsynced data in the filesystem (a write burst between
            // pwrite and fdatasync) and cut the filesystem first, then the server, as a power
            // loss stops the disk and the CPU together; the others kill the server at a random
            // moment first.
            let answer = if rng.gen_ratio(1, 2) {
                save_log(&server);
                let until = Instant::now() + Duration::from_secs(3);
                while fs.pending_bytes() < HOT && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let a = fs.cut();
                server.kill9();
                a
            } else {
                server.kill9();
                save_log(&server);
                fs.cut()
            };
            held.get_or_insert_with(|| gate.lock().unwrap());
            let dropped = answer
                .split_whitespace()
                .nth(2)
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
            out.dropped_bytes += dropped;
            out.hot_cuts += u32::from(dropped >= HOT);
            out.cuts += 1;
            cuts_now += 1;
            fs.remount();
            server.restart_env(&env);
            // Sometimes the power goes again while the agent resends.
            if cuts_now < 3 && out.cuts < plan.cuts && rng.gen_ratio(1, 3) {
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
                continue;
            }
            break;
        }
        // The source is still now: give the replica time to converge, then every acked range
        // must be on the volume.
        let vols: Vec<PathBuf> = DISKS
            .iter()
            .map(|(name, _)| server.volume(SOURCE, name))
            .collect();
        let deadline = Instant::now() + plan.converge;
        let converged = loop {
            if disks
                .iter()
                .zip(&vols)
                .all(|((p, size), v)| same_bytes(p, v, *size))
            {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        out.checks += 1;
        let (mut lost, mut lost_bytes) = (0, 0);
        for ((name, _), ((p, _), v)) in DISKS.iter().zip(disks.iter().zip(&vols)) {
            let (_, l, b) = lost_acked(&journal, name, p, v);
            lost += l;
            lost_bytes += b;
        }
        if lost > 0 {
            out.lost_ranges += lost;
            out.lost_bytes += lost_bytes;
            out.first_loss_at.get_or_insert(out.cuts);
            let states: Vec<String> = DISKS
                .iter()
                .map(|(n, _)| format!("{n}: {}", server.disk_state(SOURCE, n)))
                .collect();
            eprintln!(
                "powercut: after cut {}: {lost} acknowledged ranges ({lost_bytes} bytes) are not \
                 on the volume; replica converged: {converged}; disk states: {states:?}",
                out.cuts
            );
            if plan.expect_loss {
                break;
            }
            for ((name, _), ((p, _), v)) in DISKS.iter().zip(disks.iter().zip(&vols)) {
                check_journal(&journal, name, p, v); // panics naming the first lost range
            }
        }
        assert!(
            converged || plan.expect_loss,
            "the replica did not converge within {:?} after cut {} (no acked range lost)\n{}",
            plan.converge,
            out.cuts,
            context(&server, &agent)
        );
        // Now and then a restore point of the still source, taken on request.
        if plan.restore_points && rng.gen_ratio(1, 4) {
            let hashes: Vec<String> = disks.iter().map(|(p, _)| sha256_file(p)).collect();
            // The replica may equal the source before the agent is back: wait for it.
            wait_until_or(
                "both disks continuous",
                Duration::from_secs(60),
                || {
                    DISKS
                        .iter()
                        .all(|(n, _)| server.disk_state(SOURCE, n) == "continuous")
                },
                || context(&server, &agent),
            );
            let (ok, id, err) =
                server.cli(&["restore-points", "create", "--source", SOURCE, "--wait"]);
            assert!(ok, "restore point: {err}\n{}", context(&server, &agent));
            expected.push((id.trim().to_string(), hashes));
        }
        drop(held);
    }
    out.writes = writes.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    if plan.expect_loss {
        return out;
    }

    // Quiesce: the replica equals the source, and the journal agrees.
    for ((name, _), (p, size)) in DISKS.iter().zip(&disks) {
        let v = server.volume(SOURCE, name);
        wait_until_or(
            &format!("{name} to equal its source"),
            Duration::from_secs(120),
            || same_bytes(p, &v, *size),
            || context(&server, &agent),
        );
        out.acked_ranges += check_journal(&journal, name, p, &v);
    }
    out.acked_bytes = journal_acked_bytes(&journal);
    // Every listed restore point verifies; those taken here export to the recorded state.
    let listed = server.restore_points();
    for rp in &listed {
        let id = rp["id"].as_str().unwrap();
        server.verify(id);
        out.restore_points += 1;
    }
    for (id, hashes) in &expected {
        assert!(
            listed.iter().any(|r| r["id"] == id.as_str()),
            "restore point {id} was taken but is not listed after the cuts"
        );
        for ((name, _), hash) in DISKS.iter().zip(hashes) {
            let img = d.path().join("export.img");
            server.export(id, name, &img);
            assert_eq!(
                &sha256_file(&img),
                hash,
                "restore point {id} disk {name} differs from the source when it was taken"
            );
            std::fs::remove_file(&img).unwrap();
            out.exported += 1;
        }
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent ran throughout: {}",
        agent.log_text()
    );
    drop(server);
    out
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn report(what: &str, o: &Outcome, secs: f64) {
    eprintln!(
        "POWERCUT RESULT ({what}): {} power cuts in {secs:.0} s ({} checks), {} workload writes, \
         {} unsynced bytes dropped by the cuts ({} cuts dropped replicated data in flight); {} acked ranges ({} MiB) checked at the end; \
         lost: {} ranges ({} bytes){}; restore points: {} verified, {} disk images exported equal",
        o.cuts,
        o.checks,
        o.writes,
        o.dropped_bytes,
        o.hot_cuts,
        o.acked_ranges,
        o.acked_bytes >> 20,
        o.lost_ranges,
        o.lost_bytes,
        o.first_loss_at
            .map(|c| format!(", first after cut {c}"))
            .unwrap_or_default(),
        o.restore_points,
        o.exported,
    );
}

/// A few dozen power cuts of the correct server: nothing acknowledged is lost.
#[test]
fn power_cuts_lose_no_acknowledged_write() {
    if !can_run() {
        return;
    }
    let t = Instant::now();
    let o = harness(Plan {
        cuts: 24,
        limit: Duration::from_secs(100),
        env: vec![],
        converge: Duration::from_secs(60),
        restore_points: true,
        expect_loss: false,
    });
    report("correct build", &o, t.elapsed().as_secs_f64());
    assert_eq!(o.lost_ranges, 0);
    assert!(o.cuts >= 10, "only {} cuts", o.cuts);
    assert!(o.dropped_bytes > 0, "the cuts dropped unsynced data");
}

/// The harness must catch a server that acks before its data is durable: with
/// `SLIPWAY_FAILPOINT=skip-fdatasync` the flusher reports writes durable (so they are acked)
/// without calling fdatasync.
#[test]
fn powercut_catches_a_server_that_acks_before_fdatasync() {
    if !can_run() {
        return;
    }
    let t = Instant::now();
    let o = harness(Plan {
        cuts: 12,
        limit: Duration::from_secs(90),
        env: vec![("SLIPWAY_FAILPOINT", "skip-fdatasync")],
        converge: Duration::from_secs(10),
        restore_points: false,
        expect_loss: true,
    });
    report(
        "broken build: skip-fdatasync",
        &o,
        t.elapsed().as_secs_f64(),
    );
    assert!(
        o.lost_ranges > 0,
        "the harness did not catch a server that acks before fdatasync ({} cuts)",
        o.cuts
    );
}

/// `make soak`: many more cuts, bounded by POWERCUT_CUTS (default 1000) and POWERCUT_SECONDS
/// (default 3600: a cut round takes about 2.4 s on an idle 2-core machine, about 9 s on a
/// loaded one).
#[test]
#[ignore = "soak: bounded by POWERCUT_CUTS (default 1000) and POWERCUT_SECONDS (default 3600); run by make soak"]
fn powercut_soak() {
    if !can_run() {
        return;
    }
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let t = Instant::now();
    let o = harness(Plan {
        cuts: env_num("POWERCUT_CUTS", 1000) as u32,
        limit: Duration::from_secs(env_num("POWERCUT_SECONDS", 3600)),
        env: vec![],
        converge: Duration::from_secs(60),
        restore_points: true,
        expect_loss: false,
    });
    report("soak", &o, t.elapsed().as_secs_f64());
    assert_eq!(o.lost_ranges, 0);
}
