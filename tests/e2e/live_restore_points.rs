//! Restore points of a live filesystem (issue 11 item 4): the real agent follows loop devices
//! carrying mounted ext4 filesystems while a workload writes them durably, the test takes
//! restore points in the middle of it, and every exported restore point must be what a power
//! cut at one instant leaves behind: the journal replays, `e2fsck -fn` finds nothing, an SQLite
//! database in WAL mode passes `PRAGMA integrity_check` and holds every transaction committed
//! before the restore point was requested, a file replaced with fsync + rename is one whole
//! version, and a write made durable on one disk before another is never missing while the
//! later one is there.
//!
//! Root only (loop devices, mount); each test skips itself, saying why, without root or
//! without one of its tools (losetup, mkfs.ext4, mount, umount, e2fsck, python3 with sqlite3).
//! Run: `sudo -E cargo test -p slipway --test e2e -- live_restore_points::`. With
//! `SLIPWAY_LIVE_RP_AGENT_ARGS=--no-freeze` the agent places its markers without freezing the
//! filesystems, and these checks are seen to fail (a torn file in some restore points).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// How long a workload may run at most, whatever happens to the test (it also stops when its
/// stop file appears).
const WORKLOAD_LIMIT_S: u32 = 120;

/// Whether this process can make loop devices, filesystems and SQLite databases; says why not
/// on stderr.
fn can_run(test: &str) -> bool {
    if !root_with_tools(
        test,
        &[
            "losetup",
            "mkfs.ext4",
            "mount",
            "umount",
            "e2fsck",
            "python3",
        ],
    ) {
        return false;
    }
    let sqlite = Command::new("python3")
        .args(["-c", "import sqlite3, hashlib, json"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !sqlite {
        eprintln!("skipping {test}: python3 has no sqlite3 module");
        return false;
    }
    true
}

/// A loop device over an image file, optionally with a filesystem mounted on it. Dropping it
/// unmounts (lazily if it must) and detaches, also when a test panics; declare it before the
/// server, the agent and the workload so they are stopped first.
struct LoopDevice {
    dev: PathBuf,
    mount: Option<PathBuf>,
    attached: bool,
    /// An image to delete once detached (an exported restore point).
    remove: Option<PathBuf>,
}

impl LoopDevice {
    /// Creates a zeroed image of `size` bytes (or keeps an existing one) and attaches it.
    fn attach(image: &Path, size: u64) -> LoopDevice {
        if !image.exists() {
            File::create(image).unwrap().set_len(size).unwrap();
        }
        let dev =
            PathBuf::from(sh("losetup", &["--find", "--show", image.to_str().unwrap()]).trim());
        LoopDevice {
            dev,
            mount: None,
            attached: true,
            remove: None,
        }
    }

    /// The disk id the agent gives the device: its file name (`loop3`).
    fn disk_id(&self) -> String {
        self.dev.file_name().unwrap().to_str().unwrap().to_owned()
    }

    /// Makes an ext4 (initialised in full now, so no background thread writes the device
    /// later) and mounts it on `dir`.
    fn mkfs_and_mount(&mut self, dir: &Path) {
        sh(
            "mkfs.ext4",
            &[
                "-q",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                self.dev.to_str().unwrap(),
            ],
        );
        self.mount(dir).unwrap();
    }

    /// Mounts the filesystem on the device read-write on `dir` (an ext4 that needs recovery
    /// replays its journal); the error has mount's output and the kernel's last messages.
    fn mount(&mut self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "ext4"])
            .arg(&self.dev)
            .arg(dir)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "mount {} failed: {}{}\nkernel messages (dmesg | tail):\n{}",
                self.dev.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).trim(),
                dmesg_tail(20)
            ));
        }
        self.mount = Some(dir.to_owned());
        Ok(())
    }

    fn umount(&mut self) {
        if let Some(m) = self.mount.take() {
            sh("umount", &[m.to_str().unwrap()]);
        }
    }

    /// `e2fsck -fn` of the (unmounted) device: Ok if it exits 0, else its output.
    fn fsck(&self) -> Result<(), String> {
        assert!(self.mount.is_none());
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(&self.dev)
            .output()
            .unwrap();
        if out.status.success() {
            return Ok(());
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let head: Vec<&str> = text.lines().take(40).collect();
        Err(format!(
            "e2fsck -fn {} exited {:?}:\n{}",
            self.dev.display(),
            out.status.code(),
            head.join("\n")
        ))
    }

    fn detach(&mut self) {
        self.umount();
        if self.attached {
            self.attached = false;
            sh("losetup", &["-d", self.dev.to_str().unwrap()]);
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let mut ok = false;
            for _ in 0..5 {
                ok = Command::new("umount")
                    .arg(&m)
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&m).output();
            }
        }
        if self.attached {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
        }
        if let Some(image) = self.remove.take() {
            let _ = std::fs::remove_file(image);
        }
    }
}

/// The kernel's last `n` messages.
fn dmesg_tail(n: usize) -> String {
    let out = Command::new("dmesg").output().map(|o| o.stdout);
    let text = String::from_utf8_lossy(&out.unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A workload process (python3 script); killed on drop if it still runs.
struct Workload {
    child: Child,
    stop: PathBuf,
    stderr: PathBuf,
}

impl Workload {
    /// Runs `python3 script args…`; it stops by itself when `stop` appears.
    fn start(dir: &Path, name: &str, script: &str, args: &[&OsStr]) -> Workload {
        let path = dir.join(format!("{name}.py"));
        std::fs::write(&path, script).unwrap();
        let stop = dir.join(format!("{name}.stop"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new("python3")
            .arg(&path)
            .arg(&stop)
            .arg(WORKLOAD_LIMIT_S.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&stderr).unwrap()))
            .spawn()
            .expect("spawning python3");
        Workload {
            child,
            stop,
            stderr,
        }
    }

    /// Panics (with its stderr) if the workload has exited already.
    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "the workload exited early ({st}):\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
    }

    /// Creates the stop file and waits for a clean exit.
    fn stop(&mut self) {
        File::create(&self.stop).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the workload did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            st.success(),
            "the workload failed ({st}):\n{}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The highest number logged with `tag` in a workload's progress log (lines `TAG N`; a torn
/// last line is ignored), 0 if none.
fn logged(log: &Path, tag: &str) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (t, n) = l.split_once(' ')?;
            (t == tag).then(|| n.parse::<u64>().ok()).flatten()
        })
        .max()
        .unwrap_or(0)
}

/// Waits until the log shows `tag` beyond `at_least`.
fn wait_logged(log: &Path, tag: &str, at_least: u64, w: &mut Workload) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = logged(log, tag);
        if n >= at_least {
            return n;
        }
        w.assert_running();
        assert!(
            Instant::now() < deadline,
            "the workload logged `{tag}` only up to {n} in 30 s, waiting for {at_least}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the server and a `--follow` agent on `devs` as source `source`, and waits for every
/// disk to be continuous.
fn serve_and_follow(dir: &Path, source: &str, devs: &[&LoopDevice]) -> (Server, Agent) {
    let server = Server::start(&dir.join("var"));
    let token = server.token(source);
    let paths: Vec<&Path> = devs.iter().map(|d| d.dev.as_path()).collect();
    // More agent arguments, e.g. `--no-freeze` to see these checks fail.
    let more = std::env::var("SLIPWAY_LIVE_RP_AGENT_ARGS").unwrap_or_default();
    let mut args = vec!["--follow", "--rescan-interval", "1s"];
    args.extend(more.split_whitespace());
    let agent = Agent::start(&server, source, &token, &paths, &args);
    wait_until_or(
        "the first pass over the devices",
        Duration::from_secs(120),
        || {
            devs.iter()
                .all(|d| server.disk_state(source, &d.disk_id()) == "continuous")
        },
        || format!("{}\n{}", agent.log_text(), server.log()),
    );
    (server, agent)
}

/// Requests a restore point of `source` the moment the server will take one: a disk that is
/// not continuous (the agent rescanning) makes the server refuse, so wait for every disk to be
/// continuous and ask again. `bounds()` is read right before each request. Returns the id, the
/// bounds read before the accepted request, and the refusals met on the way.
fn request_point<B>(
    server: &Server,
    agent: &Agent,
    source: &str,
    disks: &[String],
    mut bounds: impl FnMut() -> B,
) -> (String, B, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut refusals = vec![];
    loop {
        let t = Instant::now();
        wait_until_or(
            "every disk continuous (or in backlog)",
            deadline.saturating_duration_since(Instant::now()),
            || {
                disks.iter().all(|d| {
                    matches!(
                        server.disk_state(source, d).as_str(),
                        "continuous" | "backlog"
                    )
                })
            },
            || format!("refusals: {refusals:?}\nagent log:\n{}", agent.log_text()),
        );
        if t.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "waited {:.1?} for every disk of {source} to be continuous",
                t.elapsed()
            );
        }
        let b = bounds();
        let (ok, out, err) =
            server.cli(&["restore-points", "create", "--source", source, "--wait"]);
        if ok {
            return (out.trim().to_string(), b, refusals);
        }
        assert!(
            err.contains("cannot have a restore point now") && Instant::now() < deadline,
            "restore-points create failed: {err}\nrefusals before: {refusals:?}\nagent log:\n{}\nserver log:\n{}",
            agent.log_text(),
            server.log()
        );
        refusals.push(err.trim().to_string());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Exports `disk` of restore point `id`, attaches the image, mounts it (the journal replays),
/// unmounts, checks it with `e2fsck -fn`, and mounts it again on `mnt` for the caller to read.
fn open_export(
    server: &Server,
    dir: &Path,
    id: &str,
    disk: &str,
    mnt: &Path,
) -> Result<LoopDevice, String> {
    let image = dir.join(format!("export-{id}-{disk}.img"));
    server.export(id, disk, &image);
    let mut lo = LoopDevice::attach(&image, 0);
    lo.remove = Some(image);
    if let Err(e) = lo.mount(mnt) {
        // What e2fsck makes of the image as it was exported (no journal replay with -n).
        let fsck = lo
            .fsck()
            .err()
            .unwrap_or_else(|| "e2fsck -fn: clean".into());
        return Err(format!("{e}\n{fsck}"));
    }
    lo.umount();
    lo.fsck()
        .map_err(|e| format!("after the journal replayed: {e}"))?;
    lo.mount(mnt)
        .map_err(|e| format!("second mount (after e2fsck): {e}"))?;
    Ok(lo)
}

// ---------------------------------------------------------------------------------------------
// Test A: SQLite in WAL mode and a file replaced with fsync + rename.

/// argv: stop-file, seconds, db, progress-log, small-file. Commits transactions until stopped;
/// logs `c ID` after each commit returned and `f V` after each replacement of the small file
/// (written to a temp file, fsynced, renamed over, directory fsynced). A thread keeps writing
/// bulk files meanwhile (buffered, never synced, never checked): load.
const SQLITE_WORKLOAD: &str = r#"
import hashlib, os, sqlite3, sys, threading, time
stop, limit, db, log_path, small = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
log = open(log_path, "a")

def small_version(v):
    n = 1024 + (v * 7919) % (60 * 1024)
    unit = hashlib.sha256(str(v).encode()).digest()
    payload = (unit * (n // 32 + 1))[:n]
    head = "v=%d len=%d sha=%s\n" % (v, n, hashlib.sha256(payload).hexdigest())
    return head.encode() + payload

def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]

def replace_small(v):
    tmp = small + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    write_all(fd, small_version(v))
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, small)
    d = os.open(os.path.dirname(small), os.O_RDONLY)
    os.fsync(d)
    os.close(d)
    log.write("f %d\n" % v)
    log.flush()

def bulk():
    # Background load, never checked: files of 2 MiB written in 256 KiB pieces without fsync,
    # deleted and made again, so writeback, allocation and the journal are busy at the points.
    chunk = os.urandom(256 << 10)
    k = 0
    while not os.path.exists(stop):
        k += 1
        p = os.path.join(os.path.dirname(db), "bulk-%d" % (k % 4))
        if os.path.exists(p):
            os.unlink(p)
        with open(p, "wb") as f:
            for _ in range(8):
                f.write(chunk)
        time.sleep(0.25)

threading.Thread(target=bulk, daemon=True).start()
conn = sqlite3.connect(db, isolation_level=None)
assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
conn.execute("PRAGMA synchronous=FULL")
conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL, sha TEXT NOT NULL)")
conn.execute("CREATE INDEX IF NOT EXISTS t_sha ON t (sha)")
conn.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
conn.execute("INSERT OR IGNORE INTO meta VALUES ('last', 0)")
v = 1
replace_small(v)
i = 0
start = time.monotonic()
while time.monotonic() - start < limit and not os.path.exists(stop):
    i += 1
    payload = os.urandom(200 + (i * 997) % 6000)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", (i, payload, hashlib.sha256(payload).hexdigest()))
    conn.execute("UPDATE meta SET v = ? WHERE k = 'last'", (i,))
    conn.execute("COMMIT")
    log.write("c %d\n" % i)
    log.flush()
    if i % 2 == 0:
        v += 1
        replace_small(v)
conn.close()
"#;

/// argv: db, small-file, committed-bound. Prints one JSON object.
const SQLITE_CHECK: &str = r#"
import hashlib, json, os, sqlite3, sys
db, small, bound = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = {}
data = b""
try:
    if not os.path.exists(db):
        raise Exception("the database file is missing")
    conn = sqlite3.connect(db, isolation_level=None)
    r["integrity"] = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    r["count_le_bound"] = conn.execute("SELECT count(*) FROM t WHERE id <= ?", (bound,)).fetchone()[0]
    r["max_id"] = conn.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
    r["rows"] = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    r["meta_last"] = conn.execute("SELECT v FROM meta WHERE k = 'last'").fetchone()[0]
    r["bad_rows"] = sum(1 for p, s in conn.execute("SELECT payload, sha FROM t") if hashlib.sha256(p).hexdigest() != s)
    conn.close()
except Exception as e:
    r["error"] = "%s: %s" % (type(e).__name__, e)
try:
    data = open(small, "rb").read()
    head, _, payload = data.partition(b"\n")
    try:
        f = dict(kv.split("=", 1) for kv in head.decode().split())
        v, n, sha = int(f["v"]), int(f["len"]), f["sha"]
    except Exception:
        raise Exception("no header line: the file begins %r" % data[:24])
    r["small_version"] = v
    whole = n == len(payload) and hashlib.sha256(payload).hexdigest() == sha
    r["small_whole"] = whole
    if not whole:
        r["small_why"] = "header %r, %d payload bytes" % (head[:200], len(payload))
except Exception as e:
    r["small_whole"] = False
    r["small_why"] = "%s (%d bytes)" % (e, len(data))
print(json.dumps(r))
"#;

/// What must hold of an SQLite database and the replaced file in one exported restore point,
/// given what the workload had logged before the restore point was requested.
fn check_sqlite_export(
    dir: &Path,
    mnt: &Path,
    commits: u64,
    version: u64,
) -> Result<String, String> {
    let script = dir.join("check_sqlite.py");
    std::fs::write(&script, SQLITE_CHECK).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(mnt.join("db.sqlite"))
        .arg(mnt.join("small"))
        .arg(commits.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let r: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        format!(
            "the check script failed ({e}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let mut bad = vec![];
    if let Some(e) = r.get("error") {
        bad.push(format!("opening or reading the database: {e}"));
    } else {
        if r["integrity"] != "ok" {
            bad.push(format!("PRAGMA integrity_check: {}", r["integrity"]));
        }
        if r["count_le_bound"].as_u64() != Some(commits) {
            bad.push(format!(
                "{} committed transactions were logged before the request, the database holds {} of them (max id {}, {} rows)",
                commits, r["count_le_bound"], r["max_id"], r["rows"]
            ));
        }
        if r["meta_last"] != r["max_id"] {
            bad.push(format!(
                "half a transaction: meta.last = {} but max(id) = {}",
                r["meta_last"], r["max_id"]
            ));
        }
        if r["bad_rows"] != 0 {
            bad.push(format!(
                "{} rows whose payload fails its checksum",
                r["bad_rows"]
            ));
        }
    }
    if r["small_whole"] != true {
        bad.push(format!("the fsync+rename file is torn: {}", r["small_why"]));
    } else if r["small_version"].as_u64().unwrap_or(0) < version {
        bad.push(format!(
            "the fsync+rename file is version {}, older than version {version} made durable before the request",
            r["small_version"]
        ));
    }
    if bad.is_empty() {
        Ok(format!(
            "{} rows (>= {commits} logged before), file version {} (>= {version})",
            r["rows"], r["small_version"]
        ))
    } else {
        Err(bad.join("; "))
    }
}

#[test]
fn restore_points_of_a_live_ext4_with_sqlite_mount_and_pass_integrity() {
    let name = "restore_points_of_a_live_ext4_with_sqlite_mount_and_pass_integrity";
    if !can_run(name) {
        return;
    }
    const SIZE: u64 = 128 << 20;
    const POINTS: usize = 10;
    let t0 = Instant::now();
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("mnt");
    let mut lo = LoopDevice::attach(&d.path().join("live.img"), SIZE);
    lo.mkfs_and_mount(&mnt);
    sh("sync", &[]);
    let disk = lo.disk_id();
    let (server, agent) = serve_and_follow(d.path(), "sql", &[&lo]);
    let t_pass = t0.elapsed();

    let log = d.path().join("sqlite.log");
    let mut w = Workload::start(
        d.path(),
        "sqlite",
        SQLITE_WORKLOAD,
        &[
            mnt.join("db.sqlite").as_os_str(),
            log.as_os_str(),
            mnt.join("small").as_os_str(),
        ],
    );
    let mut c = wait_logged(&log, "c", 20, &mut w);
    // (restore point id, commits logged before it was requested, file version likewise)
    let mut points = vec![];
    let mut took = vec![];
    let mut refused = vec![];
    for _ in 0..POINTS {
        c = wait_logged(&log, "c", c + 20, &mut w);
        let t = Instant::now();
        let (id, (commits, version), r) =
            request_point(&server, &agent, "sql", std::slice::from_ref(&disk), || {
                (logged(&log, "c"), logged(&log, "f"))
            });
        took.push(t.elapsed());
        refused.extend(r);
        w.assert_running();
        points.push((id, commits, version));
    }
    let written = logged(&log, "c");
    w.stop();
    let agent_log = agent.log_text();
    drop(agent);
    let t_points = t0.elapsed();

    let mut failures = vec![];
    for (i, (id, commits, version)) in points.iter().enumerate() {
        let what = format!("restore point {} ({id})", i + 1);
        let m = d.path().join(format!("rp{}", i + 1));
        let r = open_export(&server, d.path(), id, &disk, &m)
            .and_then(|_lo| check_sqlite_export(d.path(), &m, *commits, *version));
        match r {
            Ok(s) => eprintln!("{what}: ok: {s}"),
            Err(e) => {
                eprintln!("{what}: FAILED: {e}");
                failures.push(format!("{what}: {e}"));
            }
        }
    }
    lo.detach();
    eprintln!(
        "{name}: first pass {:.1?}, {POINTS} restore points taken in {took:.1?} while {written} transactions committed, all done in {:.1?} (checks {:.1?})",
        t_pass,
        t0.elapsed(),
        t0.elapsed() - t_points
    );
    if !refused.is_empty() {
        eprintln!(
            "{name}: {} requests refused first: {refused:?}",
            refused.len()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {POINTS} restore points of a live ext4 are not consistent:\n{}\nagent log:\n{agent_log}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Test B: ordered writes across two disks of one source.

/// The size of a record of the sequence files: n (u64 LE), 472 bytes of pattern, the SHA-256
/// of the first 480 bytes.
const RECORD: usize = 512;

/// argv: stop-file, seconds, file-a, file-b, progress-log, max-records. Appends record n to A
/// and fsyncs, then appends record n to B and fsyncs; logs `a N` and `b N` after each fsync.
const ORDERED_WORKLOAD: &str = r#"
import hashlib, os, struct, sys, time
stop, limit, fa, fb, log_path, max_n = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
log = open(log_path, "a")

def record(n):
    body = struct.pack("<Q", n) + bytes((n * 31 + i) % 251 for i in range(472))
    return body + hashlib.sha256(body).digest()

def append(fd, data):
    assert os.write(fd, data) == len(data)
    os.fsync(fd)

a = os.open(fa, os.O_WRONLY | os.O_APPEND)
b = os.open(fb, os.O_WRONLY | os.O_APPEND)
n = 0
start = time.monotonic()
while time.monotonic() - start < limit and not os.path.exists(stop) and n < max_n:
    n += 1
    r = record(n)
    append(a, r)
    log.write("a %d\n" % n)
    log.flush()
    append(b, r)
    log.write("b %d\n" % n)
    log.flush()
"#;

/// The records of a sequence file: Ok(highest n) if the file is whole records 1, 2, … n in
/// order, each with a good checksum; else what is wrong.
fn sequence(path: &Path) -> Result<u64, String> {
    use sha2::Digest;
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if data.len() % RECORD != 0 {
        return Err(format!(
            "{} is {} bytes, not whole {RECORD}-byte records",
            path.display(),
            data.len()
        ));
    }
    for (i, r) in data.chunks_exact(RECORD).enumerate() {
        let n = u64::from_le_bytes(r[..8].try_into().unwrap());
        let sum = sha2::Sha256::digest(&r[..480]);
        if sum[..] != r[480..] || n != i as u64 + 1 {
            return Err(format!(
                "{}: record {} is torn or out of place (it says n = {n}, checksum {})",
                path.display(),
                i + 1,
                if sum[..] == r[480..] { "good" } else { "bad" }
            ));
        }
    }
    Ok((data.len() / RECORD) as u64)
}

#[test]
fn two_disks_ordered_writes_never_b_without_a() {
    let name = "two_disks_ordered_writes_never_b_without_a";
    if !can_run(name) {
        return;
    }
    const SIZE: u64 = 64 << 20;
    const POINTS: usize = 10;
    let t0 = Instant::now();
    let d = tempfile::tempdir().unwrap();
    let (ma, mb) = (d.path().join("mnt-a"), d.path().join("mnt-b"));
    let mut a = LoopDevice::attach(&d.path().join("a.img"), SIZE);
    let mut b = LoopDevice::attach(&d.path().join("b.img"), SIZE);
    a.mkfs_and_mount(&ma);
    b.mkfs_and_mount(&mb);
    for m in [&ma, &mb] {
        File::create(m.join("seq")).unwrap().flush().unwrap();
    }
    sh("sync", &[]);
    let (da, db) = (a.disk_id(), b.disk_id());
    let (server, agent) = serve_and_follow(d.path(), "pair", &[&a, &b]);
    let t_pass = t0.elapsed();

    let log = d.path().join("ordered.log");
    // 48 MiB of records at most: 24 MiB on each 64 MiB filesystem.
    let max = (48 << 20) / RECORD / 2;
    let mut w = Workload::start(
        d.path(),
        "ordered",
        ORDERED_WORKLOAD,
        &[
            ma.join("seq").as_os_str(),
            mb.join("seq").as_os_str(),
            log.as_os_str(),
            OsStr::new(&max.to_string()),
        ],
    );
    let mut n = wait_logged(&log, "b", 20, &mut w);
    // (restore point id, records durable on A and on B before it was requested)
    let mut points = vec![];
    let mut took = vec![];
    let mut refused = vec![];
    for _ in 0..POINTS {
        n = wait_logged(&log, "b", n + 50, &mut w);
        let t = Instant::now();
        let (id, (on_a, on_b), r) =
            request_point(&server, &agent, "pair", &[da.clone(), db.clone()], || {
                (logged(&log, "a"), logged(&log, "b"))
            });
        took.push(t.elapsed());
        refused.extend(r);
        w.assert_running();
        points.push((id, on_a, on_b));
    }
    let written = logged(&log, "b");
    w.stop();
    let agent_log = agent.log_text();
    drop(agent);
    let t_points = t0.elapsed();

    let mut failures = vec![];
    for (i, (id, on_a, on_b)) in points.iter().enumerate() {
        let what = format!("restore point {} ({id})", i + 1);
        let check = || -> Result<String, String> {
            let mut maxes = vec![];
            for (disk, letter, logged_n) in [(&da, "A", on_a), (&db, "B", on_b)] {
                let m = d.path().join(format!("rp{}-{letter}", i + 1));
                let _lo = open_export(&server, d.path(), id, disk, &m)
                    .map_err(|e| format!("disk {letter} ({disk}): {e}"))?;
                let got = sequence(&m.join("seq")).map_err(|e| format!("disk {letter}: {e}"))?;
                if got < *logged_n {
                    return Err(format!(
                        "disk {letter} holds {got} records, but {logged_n} were durable on it before the request"
                    ));
                }
                maxes.push(got);
            }
            if maxes[1] > maxes[0] {
                return Err(format!(
                    "disk B holds record {} but disk A only {}: B was written after A was made durable",
                    maxes[1], maxes[0]
                ));
            }
            Ok(format!(
                "A {} records (>= {on_a} logged), B {} (>= {on_b})",
                maxes[0], maxes[1]
            ))
        };
        match check() {
            Ok(s) => eprintln!("{what}: ok: {s}"),
            Err(e) => {
                eprintln!("{what}: FAILED: {e}");
                failures.push(format!("{what}: {e}"));
            }
        }
    }
    a.detach();
    b.detach();
    eprintln!(
        "{name}: first pass {:.1?}, {POINTS} restore points taken in {took:.1?} while {written} record pairs were written, all done in {:.1?} (checks {:.1?})",
        t_pass,
        t0.elapsed(),
        t0.elapsed() - t_points
    );
    if !refused.is_empty() {
        eprintln!(
            "{name}: {} requests refused first: {refused:?}",
            refused.len()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {POINTS} restore points of two live disks are not consistent:\n{}\nagent log:\n{agent_log}",
        failures.len(),
        failures.join("\n")
    );
}
