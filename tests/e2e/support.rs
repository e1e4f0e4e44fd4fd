//! Test support: run the real `slipway` and `slipway-agent` binaries, make source disks,
//! compare replicas.
//!
//! Waiting is done on events where the binaries give one (the server's `ready` line on stdout,
//! process exit) and otherwise by polling a condition with a deadline — never a bare sleep.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

pub const SLIPWAY: &str = env!("CARGO_BIN_EXE_slipway");

/// The `slipway-agent` binary: `target/<profile>/slipway-agent`, beside this test binary's
/// directory (`target/<profile>/deps/`).
///
/// `env!("CARGO_BIN_EXE_…")` names only binaries of the package the test belongs to, and the
/// agent is its own package (`crates/agent`, so building it never builds the server or the AWS
/// SDK). `make test` (`cargo test --workspace --all-targets`) builds it before any test runs:
/// cargo builds a package's binaries for its integration tests, and `crates/agent` has some.
/// A lone `cargo test -p slipway --test e2e` does not, so a missing binary — or one older than
/// the agent's sources, which would test yesterday's agent — fails here saying what to run.
pub fn agent_bin() -> &'static str {
    static AGENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        let path = workspace_bin("slipway-agent");
        let built = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}: run `cargo build -p slipway-agent` first (make test builds it)",
                    path.display()
                )
            });
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in ["crates/agent/src", "crates/proto/src", "crates/net/src"] {
            if let Some(newer) = newer_source(&repo.join(dir), built) {
                panic!(
                    "{} is older than {}: run `cargo build -p slipway-agent` first (make test \
                     builds it)",
                    path.display(),
                    newer.display()
                );
            }
        }
        path.into_os_string()
            .into_string()
            .expect("the target dir's path is UTF-8")
    })
}

/// `target/<profile>/<name>`: a binary of another workspace package, built by the same cargo
/// invocation into the directory above this test binary's.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .join(name)
}

/// A `.rs` file under `dir` modified after `than`, if any.
fn newer_source(dir: &Path, than: std::time::SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(p) = newer_source(&path, than) {
                return Some(p);
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > than)
        {
            return Some(path);
        }
    }
    None
}

/// A running `slipway serve`.
pub struct Server {
    pub child: Child,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub fingerprint: String,
    extra: Vec<String>,
}

impl Server {
    pub fn start(data_dir: &Path) -> Server {
        Self::start_with(data_dir, "127.0.0.1:0", &[])
    }

    pub fn start_with(data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
        Self::start_env(data_dir, listen, extra, &[])
    }

    /// Starts on 127.0.0.1 with a settings file of `toml`, written beside the data dir
    /// (`<data_dir>/../slipway.toml`).
    pub fn with_settings(data_dir: &Path, toml: &str) -> Server {
        let cfg = data_dir
            .parent()
            .expect("a data dir inside a test directory")
            .join("slipway.toml");
        std::fs::write(&cfg, toml).unwrap();
        Self::start_with(
            data_dir,
            "127.0.0.1:0",
            &["--config", cfg.to_str().unwrap()],
        )
    }

    /// Starts with extra environment variables (e.g. `SLIPWAY_FAILPOINT`).
    pub fn start_env(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut cmd = Command::new(SLIPWAY);
        cmd.envs(env.iter().copied());
        Self::spawn(cmd, data_dir, listen, extra)
    }

    /// Runs `cmd serve --data-dir D --listen L --metrics-listen 127.0.0.1:0 extra…` (cmd is
    /// the binary, or a wrapper such as `ip netns exec NS slipway`) and waits for its ready line.
    fn spawn(mut cmd: Command, data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
        std::fs::create_dir_all(data_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .unwrap();
        let mut child = cmd
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info,quinn=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawning slipway serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready: serde_json::Value = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                        if v["event"] == "ready" {
                            break v;
                        }
                    }
                }
                _ => {
                    let _ = child.kill();
                    let log =
                        std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
                    panic!("server exited before it was ready; log:\n{log}");
                }
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            data_dir: data_dir.to_owned(),
            listen: ready["listen"].as_str().unwrap().parse().unwrap(),
            metrics: ready["metrics_listen"].as_str().unwrap().parse().unwrap(),
            fingerprint: ready["fingerprint"].as_str().unwrap().to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM (what systemd sends when the instance shuts down): the server drains and
    /// exits. Returns its exit status; panics if it is still running after `limit`.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        sh("kill", &["-TERM", &pid]);
        self.wait_exit(limit)
    }

    /// Starts again on the same data dir and port.
    pub fn restart(&mut self) {
        self.restart_env(&[]);
    }

    /// Starts again on the same data dir and port, with extra environment variables.
    pub fn restart_env(&mut self, env: &[(&str, &str)]) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let s = Server::start_env(
            &self.data_dir.clone(),
            &self.listen.to_string(),
            &extra,
            env,
        );
        // The old child was reaped already; std knows, so its Drop will not signal a reused pid.
        drop(std::mem::replace(self, s));
    }

    /// Waits for the server process to exit by itself (e.g. at a failpoint).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `slipway <args> --data-dir D`; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(SLIPWAY)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `slipway restore-points list --json`.
    pub fn restore_points(&self) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.cli(&["restore-points", "list", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    }

    /// Takes a restore point and waits for it; returns its id.
    pub fn create_restore_point(&self, source: &str) -> String {
        let (ok, out, err) = self.cli(&["restore-points", "create", "--source", source, "--wait"]);
        assert!(ok, "restore-points create failed: {err}\n{}", self.log());
        out.trim().to_string()
    }

    /// Exports a disk of a restore point to `out`.
    pub fn export(&self, id: &str, disk: &str, out: &Path) {
        let (ok, _, err) = self.cli(&[
            "restore-points",
            "export",
            id,
            "--disk",
            disk,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "export failed: {err}");
    }

    /// Verifies a restore point; panics if it does not verify.
    pub fn verify(&self, id: &str) {
        let (ok, out, err) = self.cli(&["restore-points", "verify", id]);
        assert!(ok, "verify {id} failed: {out}{err}");
    }

    /// The state of one disk in `slipway status --json`.
    pub fn disk_state(&self, source: &str, disk: &str) -> String {
        let st = self.status();
        st["sources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["id"] == source)
            .flat_map(|s| s["disks"].as_array().unwrap().iter())
            .find(|d| d["id"] == disk)
            .map(|d| d["state"].as_str().unwrap().to_string())
            .unwrap_or_default()
    }

    pub fn token(&self, source: &str) -> String {
        let out = Command::new(SLIPWAY)
            .args(["token", "issue", "--source-id", source, "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics, path)
    }

    pub fn healthy(&self) -> bool {
        self.http_get("/healthz").0 == 200
    }

    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(SLIPWAY)
            .args(["status", "--json", "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn volume(&self, source: &str, disk: &str) -> PathBuf {
        self.data_dir
            .join("volumes")
            .join(source)
            .join(format!("{disk}.raw"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A `slipway-agent replicate` run.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(
        server: &Server,
        source: &str,
        token: &str,
        disks: &[&Path],
        extra: &[&str],
    ) -> Agent {
        Self::start_logging_in(&server.data_dir, server, source, token, disks, extra)
    }

    /// Like [`start`](Self::start), with the log in `dir` rather than the server's data dir
    /// (which a test may unmount while the agent runs).
    pub fn start_logging_in(
        dir: &Path,
        server: &Server,
        source: &str,
        token: &str,
        disks: &[&Path],
        extra: &[&str],
    ) -> Agent {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("replicate");
        Self::spawn_in(dir, cmd, server, source, token, disks, extra)
    }

    /// Runs `cmd --server … --disk … extra…` (cmd is the binary and `replicate`, or a wrapper
    /// such as `ip netns exec NS slipway-agent replicate`), logging to a file of its own.
    fn spawn(
        cmd: Command,
        server: &Server,
        source: &str,
        token: &str,
        disks: &[&Path],
        extra: &[&str],
    ) -> Agent {
        Self::spawn_in(&server.data_dir, cmd, server, source, token, disks, extra)
    }

    fn spawn_in(
        dir: &Path,
        mut cmd: Command,
        server: &Server,
        source: &str,
        token: &str,
        disks: &[&Path],
        extra: &[&str],
    ) -> Agent {
        let log = dir.join(format!("agent-{source}-{}.log", rand::random::<u32>()));
        cmd.args(["--server", &server.listen.to_string()])
            .args(["--server-fingerprint", &server.fingerprint])
            .args(["--source-id", source]);
        // An empty token: the caller gives it another way (--token-file in `extra`).
        if !token.is_empty() {
            cmd.args(["--token", token]);
        }
        for d in disks {
            cmd.arg("--disk").arg(d);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log).unwrap()));
        Agent {
            child: cmd.spawn().expect("spawning slipway-agent"),
            log,
        }
    }

    /// Waits for the agent to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "agent did not finish within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A raw protocol client of the tests themselves (hostile and model clients).

/// A QUIC connection to `server`, pinning its certificate, as an agent makes it.
pub async fn quic_connect(server: &Server) -> (quinn::Endpoint, quinn::Connection) {
    let tuning = slipway_net::Tuning::default();
    let cfg = slipway_net::tls::client_config(
        &slipway_net::tls::ServerTrust::Fingerprint(server.fingerprint.clone()),
        &tuning,
    )
    .unwrap();
    let ep = tuning.client_endpoint(server.listen).unwrap();
    let conn = ep
        .connect_with(cfg, server.listen, "localhost")
        .unwrap()
        .await
        .unwrap();
    (ep, conn)
}

/// The Hello frame of a client of `source` presenting `credential`.
pub fn hello_frame(
    source: &str,
    credential: &str,
    agent_run: u64,
    agent_version: &str,
) -> slipway_proto::Frame {
    slipway_proto::ClientHandshake::new(slipway_proto::Hello {
        version_min: 0,
        version_max: 0,
        features: 0,
        agent_run,
        source_id: source.into(),
        credential: credential.into(),
        agent_version: agent_version.into(),
    })
    .hello_frame()
}

/// Like [`wait_until`]; if it times out, the panic message adds `context()` (logs, states).
pub fn wait_until_or(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            panic!(
                "timed out after {limit:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `volume` begins with the bytes of `source` (a volume may be larger: EBS sizes are
/// whole GiB).
pub fn holds_prefix(volume: &Path, source: &Path) -> bool {
    let want = std::fs::read(source).unwrap();
    let got = std::fs::read(volume).unwrap_or_default();
    got.len() >= want.len() && got[..want.len()] == want[..]
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a source disk of `size` bytes: random data with holes — whole zero MiB regions and
/// zero 4 KiB blocks inside data regions — so zero skipping and coalescing are exercised.
pub fn make_disk(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        let kind = rng.next_u32() % 8;
        if kind == 0 {
            off += n as u64; // a hole: leave sparse zeros
            continue;
        }
        rng.fill_bytes(&mut buf[..n]);
        if kind == 1 {
            // Punch some zero 4 KiB blocks into the data.
            for _ in 0..16 {
                let b = (rng.next_u32() as usize % (n / 4096).max(1)) * 4096;
                let e = (b + 4096).min(n);
                buf[b..e].fill(0);
            }
        }
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
    f.sync_all().unwrap();
}

/// Panics with the first differing offset if the files differ in the first `len` bytes.
pub fn assert_same(a: &Path, b: &Path, len: u64) {
    let fa = File::open(a).unwrap();
    let fb = File::open(b).unwrap();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(ba.len());
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// Checks every acked range in an agent's ack journal against the source.
/// Returns how many ranges were checked.
pub fn check_journal(journal: &Path, disk_id: &str, source: &Path, volume: &Path) -> usize {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let fs = File::open(source).unwrap();
    let fv = File::open(volume).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() != 4 || parts[0] != disk_id {
            continue; // a torn last line or another disk
        }
        let (off, len): (u64, u64) = (parts[2].parse().unwrap(), parts[3].parse().unwrap());
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        fs.read_exact_at(&mut a, off).unwrap();
        fv.read_exact_at(&mut b, off).unwrap();
        assert!(
            a == b,
            "acked range {off}+{len} (seq {}) is not on the volume",
            parts[1]
        );
        n += 1;
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Fault-injection helpers (issue 6): network namespaces, a small real filesystem, memory
// figures. Every resource made here is released by a Drop guard, also when a test panics.

/// Runs a command to completion; panics with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A number no other live test process uses for its namespaces, interfaces and subnet.
fn unique_slot() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (std::process::id() % 200) * 8 + n % 8
}

/// Two network namespaces joined by a veth pair: `a` (the server side, `addr_a`) and `b`
/// (the agents, `addr_b`), a /24 of 10.0.0.0/8 of their own. Nothing in them can reach
/// the host's network. Dropping it deletes both namespaces (and with them the veths, the
/// nft tables and the qdiscs).
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub addr_a: String,
    pub addr_b: String,
    veth_a: String,
    veth_b: String,
}

impl NetPair {
    pub fn new() -> NetPair {
        let slot = unique_slot();
        let (hi, lo) = (200 + slot / 250, slot % 250 + 1);
        let p = NetPair {
            a: format!("slw{slot}a"),
            b: format!("slw{slot}b"),
            addr_a: format!("10.{hi}.{lo}.1"),
            addr_b: format!("10.{hi}.{lo}.2"),
            veth_a: format!("slwv{slot}a"),
            veth_b: format!("slwv{slot}b"),
        };
        // Leftovers of a crashed earlier run with the same numbers.
        for ns in [&p.a, &p.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        sh("ip", &["netns", "add", &p.a]);
        sh("ip", &["netns", "add", &p.b]);
        sh(
            "ip",
            &[
                "link", "add", &p.veth_a, "type", "veth", "peer", "name", &p.veth_b,
            ],
        );
        sh("ip", &["link", "set", &p.veth_a, "netns", &p.a]);
        sh("ip", &["link", "set", &p.veth_b, "netns", &p.b]);
        for (ns, dev, addr) in [(&p.a, &p.veth_a, &p.addr_a), (&p.b, &p.veth_b, &p.addr_b)] {
            sh(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            );
            sh("ip", &["-n", ns, "link", "set", dev, "up"]);
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        // Both directions pass through the server namespace's filter table.
        p.nft(&["add", "table", "inet", "slw"]);
        for (chain, hook) in [("in", "input"), ("out", "output")] {
            p.nft(&[
                "add",
                "chain",
                "inet",
                "slw",
                chain,
                &format!("{{ type filter hook {hook} priority 0; policy accept; }}"),
            ]);
        }
        p
    }

    /// `nft` in namespace `a`.
    pub fn nft(&self, args: &[&str]) -> String {
        let mut v = vec!["netns", "exec", &self.a, "nft"];
        v.extend_from_slice(args);
        sh("ip", &v)
    }

    /// Drops `percent` % of the UDP packets on the veth, each way, at random (nft numgen).
    pub fn lose(&self, percent: u32) {
        self.clear();
        let p = percent.to_string();
        for (chain, dir) in [("in", "iifname"), ("out", "oifname")] {
            self.nft(&[
                "add",
                "rule",
                "inet",
                "slw",
                chain,
                dir,
                &self.veth_a,
                "meta",
                "l4proto",
                "udp",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                &p,
                "counter",
                "drop",
            ]);
        }
    }

    /// Drops every packet on the veth, both ways.
    pub fn partition(&self) {
        self.clear();
        for (chain, dir) in [("in", "iifname"), ("out", "oifname")] {
            self.nft(&[
                "add",
                "rule",
                "inet",
                "slw",
                chain,
                dir,
                &self.veth_a,
                "counter",
                "drop",
            ]);
        }
    }

    /// Removes every drop rule.
    pub fn clear(&self) {
        self.nft(&["flush", "chain", "inet", "slw", "in"]);
        self.nft(&["flush", "chain", "inet", "slw", "out"]);
    }

    /// Packets dropped by the current rules so far.
    pub fn dropped(&self) -> u64 {
        let text = self.nft(&["list", "table", "inet", "slw"]);
        text.split("packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Limits what namespace `b` sends (the agents' data) to `mbit` Mbit/s (tbf).
    pub fn rate_limit(&self, mbit: u32) {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.b,
                "tc",
                "qdisc",
                "replace",
                "dev",
                &self.veth_b,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "256kb",
                "latency",
                "100ms",
            ],
        );
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Server {
    /// `ip netns exec NS slipway serve --listen IP:0`: the server inside a namespace. Its
    /// metrics listener is the namespace's own loopback (not reachable from the test); use the
    /// CLI (admin socket in the data dir) and [`vm_kib`] instead.
    pub fn start_in_netns(data_dir: &Path, ns: &str, ip: &str, extra: &[&str]) -> Server {
        Self::start_in_netns_on(data_dir, ns, &format!("{ip}:0"), extra)
    }

    /// Starts again inside `ns` on the same data dir, address and port.
    pub fn restart_in_netns(&mut self, ns: &str) {
        let extra: Vec<String> = self.extra.clone();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let s =
            Server::start_in_netns_on(&self.data_dir.clone(), ns, &self.listen.to_string(), &extra);
        drop(std::mem::replace(self, s));
    }

    fn start_in_netns_on(data_dir: &Path, ns: &str, listen: &str, extra: &[&str]) -> Server {
        // `ip netns exec` enters the namespace and execs: the child's pid is the server's.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, SLIPWAY]);
        Self::spawn(cmd, data_dir, listen, extra)
    }

    /// The disk's entry in `slipway status --json` (null if absent).
    pub fn disk_report(&self, source: &str, disk: &str) -> serde_json::Value {
        let st = self.status();
        st["sources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["id"] == source)
            .flat_map(|s| s["disks"].as_array().unwrap().iter())
            .find(|d| d["id"] == disk)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    /// Peak resident memory of the server process so far (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        vm_kib(self.child.id(), "VmHWM")
    }

    /// Resident memory of the server process now (VmRSS), KiB.
    pub fn rss_kib(&self) -> u64 {
        vm_kib(self.child.id(), "VmRSS")
    }
}

/// A `Vm*` field of /proc/PID/status in KiB (0 if the process is gone).
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

impl Agent {
    /// `ip netns exec NS slipway-agent replicate ...` against `server` (which must be
    /// reachable from `ns` at `server.listen`).
    pub fn start_in_netns(
        server: &Server,
        ns: &str,
        source: &str,
        token: &str,
        disks: &[&Path],
        extra: &[&str],
    ) -> Agent {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, agent_bin(), "replicate"]);
        Self::spawn(cmd, server, source, token, disks, extra)
    }
}

/// A small ext4 filesystem in an image file, loop-mounted at `mount` (no blocks reserved for
/// root, so "full" means full for the server too). Unmounted and removed on drop; anything
/// using it must be stopped first (declare the guard before the server).
pub struct SmallFs {
    pub mount: PathBuf,
    image: PathBuf,
}

impl SmallFs {
    pub fn new(dir: &Path, mib: u64) -> SmallFs {
        let image = dir.join("small-fs.img");
        let mount = dir.join("small-fs");
        std::fs::create_dir_all(&mount).unwrap();
        File::create(&image).unwrap().set_len(mib << 20).unwrap();
        sh(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", image.to_str().unwrap()],
        );
        sh(
            "mount",
            &[
                "-o",
                "loop",
                image.to_str().unwrap(),
                mount.to_str().unwrap(),
            ],
        );
        SmallFs { mount, image }
    }

    /// Bytes free for new data.
    pub fn avail(&self) -> u64 {
        let out = sh("stat", &["-f", "-c", "%a %S", self.mount.to_str().unwrap()]);
        let v: Vec<u64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
        v[0] * v[1]
    }

    /// Allocates a filler file so that about `leave` bytes stay free; returns its path.
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        let p = self.mount.join("filler");
        let n = self.avail().saturating_sub(leave);
        sh("fallocate", &["-l", &n.to_string(), p.to_str().unwrap()]);
        sh("sync", &[]);
        p
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let m = self.mount.to_str().unwrap();
        if Command::new("umount")
            .arg(m)
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            let _ = Command::new("umount").args(["-l", m]).output();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Bytes of all ranges in an ack journal (all disks).
pub fn journal_acked_bytes(journal: &Path) -> u64 {
    std::fs::read_to_string(journal)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum()
}

/// Whether two files have the same first `len` bytes (false if either is short or missing).
pub fn same_bytes(a: &Path, b: &Path, len: u64) -> bool {
    let (Ok(fa), Ok(fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(ba.len());
        if fa.read_exact_at(&mut ba[..n], off).is_err()
            || fb.read_exact_at(&mut bb[..n], off).is_err()
            || ba[..n] != bb[..n]
        {
            return false;
        }
        off += n as u64;
    }
    true
}

/// SHA-256 of a whole file, hex.
pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut f = File::open(p).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// The value of a Prometheus sample line that starts with `prefix` (0 if absent).
pub fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Whether the tests run as root (loop devices, mounts, other users).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Whether this process is root and every tool of `tools` is on PATH; says why not on stderr
/// (the tests that need loop devices and mounts skip themselves otherwise).
pub fn root_with_tools(test: &str, tools: &[&str]) -> bool {
    if !is_root() {
        eprintln!("skipping {test}: it needs root (loop devices, mount)");
        return false;
    }
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!("skipping {test}: {tool} is not installed");
            return false;
        }
    }
    true
}
