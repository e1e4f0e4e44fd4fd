//! Scenario 8 (issue 11 item 6): a live source. An ext4 on a loop device is written at a
//! steady rate while the real agent follows the device, once with kernel write tracking (the
//! default as root) and once with `--no-track` (reread every `--rescan-interval`), same
//! workload and duration, back to back. Per mode: read amplification, replication lag
//! (durable write at the source → the bytes in the server's volume file), freeze durations of
//! the restore points taken meanwhile, and the agent's CPU per GiB written.
//!
//! Every block the workload writes carries its sequence number at its start and its end; a
//! poller reads the replica's copy of the blocks still pending and stamps the moment each
//! sequence number (or a later one: the same block rewritten) is there whole.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::{RngCore, SeedableRng};

use crate::scenarios::{record, record_agent};
use crate::slipway::{self, start_agent, AgentSpec, Server};
use crate::util::{self, human, stat, Proc, GIB, MIB};
use crate::Ctx;

/// Name of the image files, so `slipway-bench cleanup` finds loop devices a killed run left.
const IMAGE_NAME: &str = "slipway-bench-live.img";
/// One workload write: a block of the data file, written whole with O_DIRECT.
const BLK: usize = 256 * 1024;
const PAGE: usize = 4096;
const PAGES: usize = BLK / PAGE;
const MAGIC_INIT: &[u8; 8] = b"SLWS8INI";
const MAGIC_HEAD: &[u8; 8] = b"SLWS8BLK";
const MAGIC_TAIL: &[u8; 8] = b"SLWS8END";
const SOURCE: &str = "live";
/// Workload rate in bytes per second.
const RATE: f64 = 20e6;
const RESCAN: &str = "10s";
const POLL_EVERY: Duration = Duration::from_millis(20);
const RP_EVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- loop device + ext4 guard

/// A loop device over an image file with an ext4 mounted on it. Dropping it thaws (in case a
/// killed agent left it frozen), unmounts (lazily if busy) and detaches, on every exit path.
/// Declare it before the server, the agent and the workload so they go first.
struct LiveDisk {
    dev: PathBuf,
    mnt: Option<PathBuf>,
    attached: bool,
}

impl LiveDisk {
    fn create(image: &Path, size: u64, mnt: &Path) -> Result<LiveDisk> {
        util::remove(image);
        File::create(image)
            .with_context(|| format!("creating {}", image.display()))?
            .set_len(size)?;
        let dev = util::run_out(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(image),
        )?;
        let mut d = LiveDisk {
            dev: PathBuf::from(dev.trim()),
            mnt: None,
            attached: true,
        };
        util::run_out(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&d.dev),
        )?;
        std::fs::create_dir_all(mnt)?;
        util::run_out(Command::new("mount").arg(&d.dev).arg(mnt))?;
        d.mnt = Some(mnt.to_owned());
        Ok(d)
    }
}

impl Drop for LiveDisk {
    fn drop(&mut self) {
        if let Some(m) = self.mnt.take() {
            unmount(&m);
        }
        if self.attached {
            self.attached = false;
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
        }
    }
}

fn unmount(m: &Path) {
    let quiet = |c: &mut Command| {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    quiet(Command::new("fsfreeze").arg("--unfreeze").arg(m));
    if !quiet(Command::new("umount").arg(m)) {
        quiet(Command::new("umount").arg("-l").arg(m));
    }
}

/// Unmounts and detaches loop devices over this scenario's images that an interrupted run
/// left behind (`slipway-bench cleanup`, and before the scenario starts).
pub fn cleanup_loops() {
    let Ok(out) = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut w = line.split_whitespace();
        let (Some(dev), Some(back)) = (w.next(), w.next()) else {
            continue;
        };
        if !back.ends_with(IMAGE_NAME) {
            continue;
        }
        for m in mounts.lines() {
            let mut f = m.split_whitespace();
            if f.next() == Some(dev) {
                if let Some(dir) = f.next() {
                    unmount(Path::new(dir));
                }
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(dev).output();
    }
}

// ---------------------------------------------------------------- aligned buffers

/// A `len`-byte slice aligned for O_DIRECT, inside an owned Vec.
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + PAGE];
        let off = raw.as_ptr().align_offset(PAGE);
        Aligned { raw, off, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

// ---------------------------------------------------------------- data file and its layout

/// Where each block of the data file lies on the device: the byte offset of its first page
/// (header) and of its last page (trailer).
struct Layout {
    head: Vec<u64>,
    tail: Vec<u64>,
}

/// Writes the data file (`blocks` blocks, every page tagged with its block and page number),
/// makes it durable, then finds each tagged page on the device (O_DIRECT reads).
fn make_data_file(file: &Path, blocks: usize, dev: &Path, dev_size: u64) -> Result<Layout> {
    let f = File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(8);
    let mut buf = vec![0u8; BLK];
    for b in 0..blocks {
        rng.fill_bytes(&mut buf);
        for p in 0..PAGES {
            let at = p * PAGE;
            buf[at..at + 8].copy_from_slice(MAGIC_INIT);
            buf[at + 8..at + 16].copy_from_slice(&(b as u64).to_le_bytes());
            buf[at + 16..at + 24].copy_from_slice(&(p as u64).to_le_bytes());
        }
        f.write_all_at(&buf, (b * BLK) as u64)?;
    }
    f.sync_all()?;
    drop(f);
    util::sync_all();
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .with_context(|| format!("opening {} O_DIRECT", dev.display()))?;
    let mut head = vec![u64::MAX; blocks];
    let mut tail = vec![u64::MAX; blocks];
    let mut a = Aligned::new(4 << 20);
    let mut off = 0u64;
    while off < dev_size {
        let n = ((dev_size - off) as usize).min(4 << 20);
        let buf = a.buf();
        d.read_exact_at(&mut buf[..n], off)?;
        for p in (0..n).step_by(PAGE) {
            if &buf[p..p + 8] != MAGIC_INIT {
                continue;
            }
            let (b, pg) = (u64_at(buf, p + 8) as usize, u64_at(buf, p + 16) as usize);
            if b < blocks && pg == 0 {
                head[b] = off + p as u64;
            } else if b < blocks && pg == PAGES - 1 {
                tail[b] = off + p as u64;
            }
        }
        off += n as u64;
    }
    let missing = head.iter().chain(&tail).filter(|&&x| x == u64::MAX).count();
    if missing > 0 {
        bail!(
            "{missing} pages of the data file were not found on {}",
            dev.display()
        );
    }
    Ok(Layout { head, tail })
}

// ---------------------------------------------------------------- the workload

/// One durable write: block `blk` now holds sequence number `seq`, durable since `at`.
struct Durable {
    seq: u64,
    blk: usize,
    at: Instant,
}

#[derive(Default)]
struct WriterOut {
    writes: u64,
    /// Duration of each write + fdatasync, ms.
    sync_ms: Vec<f64>,
    /// From the first write to the last fdatasync's return.
    elapsed: f64,
}

/// The paced writer: 256 KiB O_DIRECT writes, each followed by fdatasync, cycling through the
/// data file's blocks. Stopped and joined on drop.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<WriterOut>>>,
}

impl Writer {
    fn start(file: &Path, blocks: usize, tx: mpsc::Sender<Durable>) -> Result<Writer> {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(file)
            .with_context(|| format!("opening {} O_DIRECT", file.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("live-writer".into())
            .spawn(move || -> Result<WriterOut> {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(88);
                let mut a = Aligned::new(BLK);
                let every = BLK as f64 / RATE;
                let t0 = Instant::now();
                let mut out = WriterOut::default();
                let mut k: u64 = 0;
                while !s.load(Ordering::Relaxed) {
                    let due = t0 + Duration::from_secs_f64(k as f64 * every);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep((due - now).min(Duration::from_millis(50)));
                        continue;
                    }
                    let seq = k + 1;
                    let blk = (k % blocks as u64) as usize;
                    let buf = a.buf();
                    rng.fill_bytes(buf);
                    buf[..8].copy_from_slice(MAGIC_HEAD);
                    buf[8..16].copy_from_slice(&seq.to_le_bytes());
                    buf[16..24].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
                    buf[24..32].copy_from_slice(&(blk as u64).to_le_bytes());
                    buf[BLK - 16..BLK - 8].copy_from_slice(&seq.to_le_bytes());
                    buf[BLK - 8..].copy_from_slice(MAGIC_TAIL);
                    let t = Instant::now();
                    f.write_all_at(buf, (blk * BLK) as u64)?;
                    f.sync_data()?;
                    let at = Instant::now();
                    out.sync_ms.push((at - t).as_secs_f64() * 1e3);
                    let _ = tx.send(Durable { seq, blk, at });
                    out.writes += 1;
                    out.elapsed = (at - t0).as_secs_f64();
                    k += 1;
                }
                Ok(out)
            })?;
        Ok(Writer {
            stop,
            handle: Some(handle),
        })
    }

    fn finish(&mut self) -> Result<WriterOut> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow!("the writer thread panicked"))?,
            None => bail!("writer already stopped"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = self.finish();
        }
    }
}

// ---------------------------------------------------------------- the replica poller

struct PollOut {
    /// (durable moment in s since the window's start, lag in ms) per write.
    lags: Vec<(f64, f64)>,
    /// Writes the replica never showed before the poller gave up.
    unobserved: usize,
}

/// Reads the replica's header and trailer of every block with writes pending, every
/// POLL_EVERY, until the writer is gone and nothing is pending (or `drain` has passed since
/// the writer went).
fn poll_replica(
    vol: PathBuf,
    layout: Layout,
    rx: mpsc::Receiver<Durable>,
    epoch: Instant,
    drain: Duration,
) -> JoinHandle<PollOut> {
    std::thread::spawn(move || {
        let blocks = layout.head.len();
        let mut pending: Vec<VecDeque<(u64, Instant)>> = vec![VecDeque::new(); blocks];
        let mut npending = 0usize;
        let mut lags = Vec::new();
        let mut gone: Option<Instant> = None;
        let mut f: Option<File> = None;
        let (mut h, mut t) = ([0u8; 16], [0u8; 16]);
        loop {
            loop {
                match rx.try_recv() {
                    Ok(d) => {
                        pending[d.blk].push_back((d.seq, d.at));
                        npending += 1;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        gone.get_or_insert_with(Instant::now);
                        break;
                    }
                }
            }
            if let Some(g) = gone {
                if npending == 0 || g.elapsed() > drain {
                    return PollOut {
                        lags,
                        unobserved: npending,
                    };
                }
            }
            if f.is_none() {
                f = File::open(&vol).ok();
            }
            if let Some(f) = &f {
                for (b, q) in pending.iter_mut().enumerate() {
                    if q.is_empty() {
                        continue;
                    }
                    if f.read_exact_at(&mut h, layout.head[b]).is_err()
                        || f.read_exact_at(&mut t, layout.tail[b] + (PAGE - 16) as u64)
                            .is_err()
                    {
                        continue;
                    }
                    let now = Instant::now();
                    if &h[..8] != MAGIC_HEAD || &t[8..] != MAGIC_TAIL {
                        continue;
                    }
                    let (sh, st) = (u64_at(&h, 8), u64_at(&t, 0));
                    if sh != st {
                        continue; // torn: the block's middle may be mid-update too
                    }
                    while let Some(&(seq, at)) = q.front() {
                        if seq > sh {
                            break;
                        }
                        q.pop_front();
                        npending -= 1;
                        lags.push((
                            at.saturating_duration_since(epoch).as_secs_f64(),
                            now.saturating_duration_since(at).as_secs_f64() * 1e3,
                        ));
                    }
                }
            }
            std::thread::sleep(POLL_EVERY);
        }
    })
}

// ---------------------------------------------------------------- restore points

struct RpRun {
    /// Start and end, s since the window's start.
    start: f64,
    end: f64,
    ok: bool,
}

/// `slipway restore-points create --wait` at 5 s into the window and every RP_EVERY after,
/// until stopped (the one running is let finish).
fn restore_point_loop(
    slipway: PathBuf,
    data: PathBuf,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    err_log: PathBuf,
) -> JoinHandle<Vec<RpRun>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut next = epoch + RP_EVERY / 2;
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() < next {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let start = epoch.elapsed().as_secs_f64();
            let err = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&err_log)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null());
            let mut cmd = Command::new(&slipway);
            cmd.args(["restore-points", "create", "--source", SOURCE, "--wait"])
                .arg("--data-dir")
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(err);
            let ok = match Proc::spawn("slipway restore-points create", &mut cmd) {
                Ok(mut p) => p
                    .wait(Duration::from_secs(120))
                    .is_ok_and(|e| e.status.success()),
                Err(_) => false,
            };
            out.push(RpRun {
                start,
                end: epoch.elapsed().as_secs_f64(),
                ok,
            });
            next += RP_EVERY;
        }
        out
    })
}

// ---------------------------------------------------------------- agent log

/// What the agent logged after byte `from` of its log.
#[derive(Default)]
struct LogFacts {
    frozen_ms: Vec<f64>,
    best_effort: usize,
    unfrozen: usize,
    tracking: Vec<String>,
    read_bytes_before: Option<u64>,
    read_bytes_last: Option<u64>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let i = line.find(&pat)? + pat.len();
    line[i..].split_whitespace().next()
}

fn agent_log_facts(log: &Path, from: usize) -> LogFacts {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let from = from.min(text.len());
    let mut f = LogFacts::default();
    for l in text[..from].lines() {
        if let Some(v) = field(l, "read_bytes").and_then(|v| v.parse().ok()) {
            f.read_bytes_before = Some(v);
        }
    }
    f.read_bytes_last = f.read_bytes_before;
    for l in text[from..].lines() {
        if let Some(v) = field(l, "read_bytes").and_then(|v| v.parse().ok()) {
            f.read_bytes_last = Some(v);
        }
        if let Some(t) = field(l, "tracking").map(|t| t.trim_matches('"')) {
            if !f.tracking.iter().any(|x| x == t) {
                f.tracking.push(t.to_string());
            }
        }
        if l.contains("consistency marker placed") {
            match field(l, "frozen_ms").and_then(|v| v.parse::<f64>().ok()) {
                Some(ms) => {
                    f.frozen_ms.push(ms);
                    if l.contains("best-effort") {
                        f.best_effort += 1;
                    }
                }
                None => f.unfrozen += 1,
            }
        }
    }
    f
}

// ---------------------------------------------------------------- one mode

struct ModeRun {
    tracking: Vec<String>,
    writes: u64,
    bytes: u64,
    window_s: f64,
    /// From the workload's stop until the replica held every write (or the poller gave up).
    settle_s: f64,
    read_bytes: u64,
    rchar: u64,
    log_read_delta: Option<u64>,
    lags: Vec<(f64, f64)>,
    unobserved: usize,
    log: LogFacts,
    rps: Vec<RpRun>,
    agent_cpu: f64,
    server_cpu: f64,
    sync_ms: Vec<f64>,
    /// Initial full sync of the device (agent start → disk continuous), s.
    first_sync_s: f64,
    device_size: u64,
}

/// Nearest-rank quantile of an unsorted sample.
fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

struct Sizes {
    image: u64,
    blocks: usize,
    window: Duration,
}

fn run_mode(ctx: &mut Ctx, name: &str, track: bool, sz: &Sizes) -> Result<ModeRun> {
    let dir = ctx.fresh_dir(&format!("s8-{name}"))?;
    let r = run_mode_in(ctx, &dir, track, sz);
    if std::env::var_os("SLIPWAY_BENCH_KEEP").is_none() {
        util::remove(&dir);
    }
    r
}

fn run_mode_in(ctx: &mut Ctx, dir: &Path, track: bool, sz: &Sizes) -> Result<ModeRun> {
    // Declared first: dropped last, after the workload, the agent and the server.
    let disk = LiveDisk::create(&dir.join(IMAGE_NAME), sz.image, &dir.join("mnt"))?;
    let mnt = disk.mnt.clone().unwrap_or_default();
    let layout = make_data_file(&mnt.join("data.bin"), sz.blocks, &disk.dev, sz.image)?;
    let data = dir.join("var");
    let cfg = dir.join("slipway.toml");
    // One scheduled point a week: the scheduler's first (full) point when the disk becomes
    // continuous, then only the points this scenario asks for.
    std::fs::write(&cfg, "[pit]\ntiers = [ { every = \"1w\", keep = 1 } ]\n")?;
    let token = slipway::token(&ctx.bins, &data, SOURCE)?;
    let mut server = Server::start(&ctx.bins, &data, "127.0.0.1:0", None, Some(&cfg))?;
    let mut extra: Vec<String> = ["--follow", "--rescan-interval", RESCAN]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !track {
        extra.push("--no-track".into());
    }
    let log = dir.join("agent.log");
    let spec = AgentSpec {
        server: &server.listen.clone(),
        fingerprint: &server.fingerprint.clone(),
        source: SOURCE,
        token: &token,
        disks: vec![format!("{}:disk0", disk.dev.display())],
        extra,
        log: log.clone(),
        netns: None,
    };
    record_agent(ctx, "8", &spec, &server);
    record(
        ctx,
        "8",
        Command::new(&ctx.bins.slipway)
            .args(["restore-points", "create", "--source", SOURCE, "--wait"])
            .arg("--data-dir")
            .arg(&data),
    );
    let t_agent = Instant::now();
    let mut agent = start_agent(&ctx.bins, &spec)?;
    let ok = util::poll(Duration::from_secs(180), Duration::from_millis(100), || {
        if let Some(e) = agent.try_wait()? {
            bail!(
                "the agent exited ({}) before the device was continuous:\n{}",
                e.status,
                util::tail(&log, 15)
            );
        }
        Ok(server.disk_states()? == ["continuous"])
    })?;
    if !ok {
        bail!(
            "the device did not become continuous within 180 s: {:?}\nagent log:\n{}",
            server.disk_states()?,
            util::tail(&log, 15)
        );
    }
    let first_sync_s = t_agent.elapsed().as_secs_f64();
    // The scheduler's first point rereads (or collects) the disk before its marker: let it
    // pass, so the window sees only the workload and the points asked for below.
    let ok = util::poll(Duration::from_secs(120), Duration::from_millis(100), || {
        Ok(!server.restore_points()?.is_empty())
    })?;
    if !ok {
        bail!("no scheduled restore point within 120 s");
    }
    std::thread::sleep(Duration::from_secs(1));
    let vol = server.volume(SOURCE, "disk0");
    let log_from = std::fs::metadata(&log)
        .map(|m| m.len() as usize)
        .unwrap_or(0);

    let pid = agent.pid();
    let (cpu0, scpu0) = (util::proc_cpu(pid)?, server.cpu()?);
    let (rb0, rc0) = (
        util::proc_io(pid, "read_bytes")?,
        util::proc_io(pid, "rchar")?,
    );
    let epoch = Instant::now();
    let (tx, rx) = mpsc::channel();
    let drain = Duration::from_secs(45);
    let poller = poll_replica(vol, layout, rx, epoch, drain);
    let mut writer = Writer::start(&mnt.join("data.bin"), sz.blocks, tx)?;
    let rp_stop = Arc::new(AtomicBool::new(false));
    let rps = restore_point_loop(
        ctx.bins.slipway.clone(),
        data.clone(),
        epoch,
        rp_stop.clone(),
        dir.join("restore-points.err"),
    );
    std::thread::sleep(sz.window);
    rp_stop.store(true, Ordering::Relaxed);
    let w = writer.finish();
    let stopped = Instant::now();
    let rps = rps
        .join()
        .map_err(|_| anyhow!("restore point thread panicked"))?;
    let polled = poller
        .join()
        .map_err(|_| anyhow!("replica poller panicked"))?;
    let settle_s = stopped.elapsed().as_secs_f64();
    let (cpu1, scpu1) = (util::proc_cpu(pid)?, server.cpu()?);
    let (rb1, rc1) = (
        util::proc_io(pid, "read_bytes")?,
        util::proc_io(pid, "rchar")?,
    );
    let w = w?;
    // One more progress line after the settle point, for the log's read_bytes.
    std::thread::sleep(Duration::from_millis(5200));
    agent.stop(Duration::from_secs(15));
    server.stop();
    let facts = agent_log_facts(&log, log_from);
    if rps.iter().any(|r| !r.ok) {
        eprintln!(
            "   restore point failures: {}",
            util::tail(&dir.join("restore-points.err"), 5)
        );
    }
    let bytes = w.writes * BLK as u64;
    drop(disk);
    Ok(ModeRun {
        tracking: facts.tracking.clone(),
        writes: w.writes,
        bytes,
        window_s: w.elapsed,
        settle_s,
        read_bytes: rb1 - rb0,
        rchar: rc1 - rc0,
        log_read_delta: match (facts.read_bytes_before, facts.read_bytes_last) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
        lags: polled.lags,
        unobserved: polled.unobserved,
        log: facts,
        rps,
        agent_cpu: cpu1 - cpu0,
        server_cpu: scpu1 - scpu0,
        sync_ms: w.sync_ms,
        first_sync_s,
        device_size: sz.image,
    })
}

// ---------------------------------------------------------------- the scenario

fn have(tool: &str) -> bool {
    util::which(tool).is_some()
}

fn ms(x: Option<f64>) -> String {
    match x {
        Some(v) if v >= 100.0 => format!("{v:.0} ms"),
        Some(v) => format!("{v:.1} ms"),
        None => "n/a".into(),
    }
}

pub fn s8_live_source(ctx: &mut Ctx) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = ["losetup", "mkfs.ext4", "mount", "umount", "fsfreeze"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    let skip = if !root {
        Some("it needs root (loop devices, mount, tracefs, FIFREEZE)".to_string())
    } else if !missing.is_empty() {
        Some(format!("missing tools: {}", missing.join(", ")))
    } else {
        None
    };
    if let Some(why) = skip {
        eprintln!("   skipping scenario 8: {why}");
        ctx.report.note("8", format!("skipped in this run: {why}"));
        ctx.report.target(
            "8",
            "live source: read amplification and replication lag with kernel tracking",
            "—".into(),
            "≤ 1.5×; p99 ≤ 1 s",
            format!("not measured: {why}"),
        );
        return Ok(());
    }
    cleanup_loops();
    let sz = if ctx.quick {
        Sizes {
            image: 512 * MIB,
            blocks: 128 * MIB as usize / BLK,
            window: Duration::from_secs(20),
        }
    } else {
        Sizes {
            image: 1 << 30,
            blocks: 256 * MIB as usize / BLK,
            window: Duration::from_secs(60),
        }
    };
    let est = 2 * (sz.window + Duration::from_secs(40));
    if !ctx.fits(est) {
        bail!(
            "not run: {:.0} s left of the time budget, it needs about {:.0} s",
            ctx.left().as_secs_f64(),
            est.as_secs_f64()
        );
    }
    let load0 = crate::loadavg();
    let t0 = Instant::now();
    eprintln!("   kernel tracking (default)");
    let k = run_mode(ctx, "kernel", true, &sz)?;
    summary("kernel", &k);
    eprintln!("   rescan (--no-track --rescan-interval {RESCAN})");
    let r = run_mode(ctx, "rescan", false, &sz)?;
    summary("rescan", &r);
    let load1 = crate::loadavg();
    let took = t0.elapsed().as_secs_f64();
    report(ctx, &sz, &k, &r, &load0, &load1, took);
    Ok(())
}

fn amp(m: &ModeRun) -> f64 {
    m.read_bytes as f64 / m.bytes.max(1) as f64
}

fn lag_ms(m: &ModeRun) -> Vec<f64> {
    m.lags.iter().map(|x| x.1).collect()
}

fn cpu_per_gib(m: &ModeRun) -> f64 {
    m.agent_cpu / (m.bytes as f64 / GIB)
}

fn summary(name: &str, m: &ModeRun) {
    let l = lag_ms(m);
    eprintln!(
        "   {name}: tracking {:?}, {} writes ({}) in {:.1} s, read {} (×{:.2}), lag p50 {} p99 {} max {}, \
         {} unobserved, freezes {:?} ms, agent CPU {:.2} s ({:.2}/GiB), settled in {:.1} s",
        m.tracking,
        m.writes,
        human(m.bytes as f64),
        m.window_s,
        human(m.read_bytes as f64),
        amp(m),
        ms(quantile(&l, 0.5)),
        ms(quantile(&l, 0.99)),
        ms(quantile(&l, 1.0)),
        m.unobserved,
        m.log.frozen_ms,
        m.agent_cpu,
        cpu_per_gib(m),
        m.settle_s
    );
}

/// The writes whose lag overlapped a restore point (durable before its end, replicated after
/// its start) and the p99 of the others.
fn lag_outside_rps(m: &ModeRun) -> (usize, Option<f64>) {
    let mut inside = 0;
    let mut out = Vec::new();
    for &(at, lag) in &m.lags {
        let end = at + lag / 1e3;
        if m.rps.iter().any(|r| at <= r.end && end >= r.start) {
            inside += 1;
        } else {
            out.push(lag);
        }
    }
    (inside, quantile(&out, 0.99))
}

/// How many of the `n` largest lags overlapped a restore point.
fn top_on_rps(m: &ModeRun, n: usize) -> usize {
    let mut v = m.lags.clone();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(n);
    v.iter()
        .filter(|&&(at, lag)| {
            let end = at + lag / 1e3;
            m.rps.iter().any(|r| at <= r.end && end >= r.start)
        })
        .count()
}

/// What the figures mean, from what this run measured (each claim only when it holds).
fn reading(k: &ModeRun, r: &ModeRun) -> String {
    let (lk, lr) = (lag_ms(k), lag_ms(r));
    let mut s = String::from("**Reading the figures.** ");
    let _ = write!(
        s,
        "With tracking a change waits for the agent's next tracked pass (one at most every \
         200 ms: `TRACKED_INTERVAL` in crates/agent/src/run.rs), then is read, sent and \
         durably acked: lag p50 {}, p99 {}. ",
        ms(quantile(&lk, 0.5)),
        ms(quantile(&lk, 0.99))
    );
    let on = top_on_rps(k, 10);
    if on > 5 {
        let _ = write!(
            s,
            "{on} of its 10 largest lags overlap a restore point: around a marker the agent \
             freezes the filesystem, waits for the tracker's barrier and a pass of its own, and \
             the server starts capturing the point. "
        );
    }
    let _ = write!(
        s,
        "The agent reads whole chunks (1 MiB by default) that the kernel marked; the workload \
         fills a chunk with about 4 sequential 256 KiB writes over ~50 ms, and a chunk a pass reads \
         while it is still being filled is read again by the next pass — so some amplification \
         above 1 is expected ({:.2}× here). Without tracking a change waits for the next \
         reread of the whole device (every {RESCAN}, and before each restore point's marker): \
         lag p50 {}, p99 {}, and the device is read {:.1} times over in the same span. ",
        amp(k),
        ms(quantile(&lr, 0.5)),
        ms(quantile(&lr, 0.99)),
        r.read_bytes as f64 / r.device_size.max(1) as f64
    );
    let fr = &r.log.frozen_ms;
    if !fr.is_empty() {
        let _ = write!(
            s,
            "That reread runs with the filesystem frozen: freezes of {} (p50) against {} with \
             tracking",
            ms(quantile(fr, 0.5)),
            ms(quantile(&k.log.frozen_ms, 0.5))
        );
        if r.log.best_effort > 0 {
            let _ = write!(
                s,
                "; in {} of {} points it outlasted the agent's `--max-freeze` (1 s by default), \
                 the filesystem was thawed before the marker and the agent logged the point \
                 crash-consistent-best-effort",
                r.log.best_effort,
                fr.len()
            );
        }
        let _ = write!(
            s,
            ". The workload feels a freeze as a stalled write: its longest write + fdatasync \
             took {} without tracking, {} with. ",
            ms(quantile(&r.sync_ms, 1.0)),
            ms(quantile(&k.sync_ms, 1.0))
        );
    }
    let (cr, ck) = (cpu_per_gib(r), cpu_per_gib(k));
    let _ = write!(
        s,
        "CPU: a loop device's reads are done by the kernel's loop worker thread, so copying the \
         bytes read is not in the agent's CPU figure (hashing and sending are): {:.1}× the bytes \
         read cost the agent {} ({:.2} against {:.2} CPU-s/GiB). On a real disk the extra \
         reads also cost device bandwidth.",
        r.read_bytes as f64 / k.read_bytes.max(1) as f64,
        if (cr / ck - 1.0).abs() <= 0.25 {
            "about the same CPU".to_string()
        } else {
            format!("{:.1}× the CPU", cr / ck)
        },
        cr,
        ck
    );
    s
}

/// The `n` largest lags with when they happened and what ran then.
fn outliers(m: &ModeRun, n: usize) -> String {
    let mut v = m.lags.clone();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(n);
    v.iter()
        .map(|&(at, lag)| {
            let end = at + lag / 1e3;
            let rp = m
                .rps
                .iter()
                .position(|r| at <= r.end && end >= r.start)
                .map(|i| {
                    format!(
                        ", overlapping restore point {} ({:.1}–{:.1} s)",
                        i + 1,
                        m.rps[i].start,
                        m.rps[i].end
                    )
                })
                .unwrap_or_default();
            format!("{} at {at:.1} s{rp}", ms(Some(lag)))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn report(
    ctx: &mut Ctx,
    sz: &Sizes,
    k: &ModeRun,
    r: &ModeRun,
    load0: &str,
    load1: &str,
    took: f64,
) {
    let (lk, lr) = (lag_ms(k), lag_ms(r));
    let (fk, fr) = (&k.log.frozen_ms, &r.log.frozen_ms);
    let amp_verdict = if amp(k) <= 1.5 {
        "**met**".to_string()
    } else {
        format!("**missed** by {:.0}%", (amp(k) / 1.5 - 1.0) * 100.0)
    };
    let p99k = quantile(&lk, 0.99);
    let lag_verdict = match p99k {
        Some(p) if p <= 1000.0 && k.unobserved == 0 => "**met**".to_string(),
        Some(p) if p <= 1000.0 => format!("**missed**: {} writes never seen", k.unobserved),
        Some(p) => format!("**missed** by {:.0}%", (p / 1000.0 - 1.0) * 100.0),
        None => "not measured".into(),
    };
    let mode_k = "kernel tracking (default)";
    let mode_r = format!("`--no-track --rescan-interval {RESCAN}`");
    let rep = &mut ctx.report;
    rep.target(
        "8",
        &format!(
            "live source (ext4 on a loop device, {:.0} MB/s of 256 KiB writes + fdatasync): \
             agent read amplification with kernel tracking",
            RATE / 1e6
        ),
        format!("{:.2}× (1 pair; {mode_r}: {:.2}×)", amp(k), amp(r)),
        "≤ 1.5×",
        amp_verdict.clone(),
    );
    rep.target(
        "8",
        "same: replication lag p50 / p99 (durable at the source → in the replica volume)",
        format!(
            "p50 {} / p99 {} (rescan: p50 {} / p99 {})",
            ms(quantile(&lk, 0.5)),
            ms(p99k),
            ms(quantile(&lr, 0.5)),
            ms(quantile(&lr, 0.99))
        ),
        "p99 ≤ 1 s",
        lag_verdict.clone(),
    );
    rep.target(
        "8",
        "same: freeze per restore point p50 / p99; agent CPU-s per GiB written",
        format!(
            "tracking: {} / {}, {:.2} CPU-s/GiB; rescan: {} / {}, {:.2} CPU-s/GiB",
            ms(quantile(fk, 0.5)),
            ms(quantile(fk, 0.99)),
            cpu_per_gib(k),
            ms(quantile(fr, 0.5)),
            ms(quantile(fr, 0.99)),
            cpu_per_gib(r)
        ),
        "reported (no target)",
        "—".into(),
    );
    for (m, label) in [(k, "kernel tracking"), (r, "rescan")] {
        rep.raw(
            "8",
            &format!("{label}: read amplification"),
            stat(&[amp(m)]),
            "×",
            2,
        );
        rep.raw(
            "8",
            &format!("{label}: lag p99"),
            stat(&[quantile(&lag_ms(m), 0.99).unwrap_or(f64::NAN)]),
            "ms",
            0,
        );
        rep.raw(
            "8",
            &format!("{label}: agent CPU per GiB written"),
            stat(&[cpu_per_gib(m)]),
            "CPU-s/GiB",
            2,
        );
    }

    // The section: self-contained, so it can be spliced into docs/benchmarks.md alone.
    let mut s = String::new();
    let row = |s: &mut String, what: &str, a: String, b: String, target: &str, v: &str| {
        let _ = writeln!(s, "| {what} | {a} | {b} | {target} | {v} |");
    };
    let commit = ctx
        .report
        .machine
        .iter()
        .find(|(k, _)| k == "slipway commit")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "?".into());
    let busy = load0
        .split_whitespace()
        .next()
        .and_then(|x| x.parse::<f64>().ok())
        .is_some_and(|x| x > 1.0);
    let _ = writeln!(
        s,
        "Run on {} UTC on {} ({} CPUs), binaries built from {commit} (release profile, root \
         package without the `aws` feature, as `make bench` builds them): {}one pair, the two \
         modes back to back, {:.1} min in all. Load average (1/5/15 min) {load0} before, \
         {load1} after.{}{}\n",
        utc_now(),
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if ctx.quick { "**--quick sizes**, " } else { "" },
        took / 60.0,
        if busy {
            " **Noise:** other work ran on the machine meanwhile (see the load average), so \
             CPU seconds and the tail of the lag are noisier than on an idle machine."
        } else {
            ""
        },
        ctx.remark
            .as_deref()
            .map(|r| format!(" {r}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "| figure | {mode_k} | peer: {mode_r} | target (tracking) | verdict |"
    );
    let _ = writeln!(s, "|---|---:|---:|---|---|");
    row(
        &mut s,
        "tracking mode in the agent's progress lines",
        k.tracking.join(", "),
        r.tracking.join(", "),
        "kernel / rescan",
        "",
    );
    row(
        &mut s,
        "read amplification: bytes the agent read from the device ÷ bytes the workload wrote",
        format!(
            "**{:.2}×** ({} ÷ {})",
            amp(k),
            human(k.read_bytes as f64),
            human(k.bytes as f64)
        ),
        format!(
            "{:.2}× ({} ÷ {})",
            amp(r),
            human(r.read_bytes as f64),
            human(r.bytes as f64)
        ),
        "≤ 1.5×",
        &amp_verdict,
    );
    row(
        &mut s,
        "replication lag p50 (durable at the source → whole in the replica volume)",
        ms(quantile(&lk, 0.5)),
        ms(quantile(&lr, 0.5)),
        "",
        "",
    );
    row(
        &mut s,
        "replication lag p99",
        format!("**{}**", ms(p99k)),
        ms(quantile(&lr, 0.99)),
        "≤ 1 s",
        &lag_verdict,
    );
    row(
        &mut s,
        "replication lag max",
        ms(quantile(&lk, 1.0)),
        ms(quantile(&lr, 1.0)),
        "",
        "",
    );
    let (ink, outk) = lag_outside_rps(k);
    let (inr, outr) = lag_outside_rps(r);
    row(
        &mut s,
        "replication lag p99 of the writes not overlapping a restore point (how many overlapped)",
        format!("{} ({ink} overlapped)", ms(outk)),
        format!("{} ({inr} overlapped)", ms(outr)),
        "",
        "",
    );
    row(
        &mut s,
        "writes never seen in the replica (poller gave up 45 s after the workload stopped)",
        k.unobserved.to_string(),
        r.unobserved.to_string(),
        "0",
        "",
    );
    let frz = |m: &ModeRun| {
        let f = &m.log.frozen_ms;
        format!(
            "{} / {} (n = {}{}{})",
            ms(quantile(f, 0.5)),
            ms(quantile(f, 0.99)),
            f.len(),
            if m.log.best_effort > 0 {
                format!(", {} best-effort", m.log.best_effort)
            } else {
                String::new()
            },
            if m.log.unfrozen > 0 {
                format!(", {} without a freeze", m.log.unfrozen)
            } else {
                String::new()
            }
        )
    };
    row(
        &mut s,
        "freeze per restore point p50 / p99 (`frozen_ms` of the agent's marker lines)",
        frz(k),
        frz(r),
        "",
        "",
    );
    let rpd = |m: &ModeRun| {
        let d: Vec<f64> = m.rps.iter().map(|x| (x.end - x.start) * 1e3).collect();
        format!(
            "{} ok of {}; p50 {}, max {}",
            m.rps.iter().filter(|x| x.ok).count(),
            m.rps.len(),
            ms(quantile(&d, 0.5)),
            ms(quantile(&d, 1.0))
        )
    };
    row(
        &mut s,
        "restore points taken in the window (`create --wait` wall)",
        rpd(k),
        rpd(r),
        "",
        "",
    );
    row(
        &mut s,
        "agent CPU-s (user+sys) per GiB written",
        format!("{:.2} ({:.2} s)", cpu_per_gib(k), k.agent_cpu),
        format!("{:.2} ({:.2} s)", cpu_per_gib(r), r.agent_cpu),
        "reported",
        "",
    );
    row(
        &mut s,
        "server CPU-s per GiB written",
        format!("{:.2}", k.server_cpu / (k.bytes as f64 / GIB)),
        format!("{:.2}", r.server_cpu / (r.bytes as f64 / GIB)),
        "reported",
        "",
    );
    let wl = |m: &ModeRun| {
        format!(
            "{} writes, {} in {:.1} s = {:.1} MB/s",
            m.writes,
            human(m.bytes as f64),
            m.window_s,
            m.bytes as f64 / m.window_s.max(1e-9) / 1e6
        )
    };
    row(&mut s, "workload achieved", wl(k), wl(r), "20 MB/s", "");
    row(
        &mut s,
        "workload write + fdatasync p50 / p99 / max",
        format!(
            "{} / {} / {}",
            ms(quantile(&k.sync_ms, 0.5)),
            ms(quantile(&k.sync_ms, 0.99)),
            ms(quantile(&k.sync_ms, 1.0))
        ),
        format!(
            "{} / {} / {}",
            ms(quantile(&r.sync_ms, 0.5)),
            ms(quantile(&r.sync_ms, 0.99)),
            ms(quantile(&r.sync_ms, 1.0))
        ),
        "",
        "",
    );
    let cross = |m: &ModeRun| {
        format!(
            "rchar {}; the log's read_bytes: {}",
            human(m.rchar as f64),
            m.log_read_delta
                .map(|b| human(b as f64))
                .unwrap_or_else(|| "n/a".into())
        )
    };
    row(
        &mut s,
        "cross-checks of the bytes read (same span; the log's from progress lines up to 5 s apart)",
        cross(k),
        cross(r),
        "",
        "",
    );
    row(
        &mut s,
        "from the workload's stop until the replica held every write",
        format!("{:.2} s", k.settle_s),
        format!("{:.2} s", r.settle_s),
        "",
        "",
    );
    row(
        &mut s,
        "initial full sync of the device (agent start → continuous)",
        format!("{:.1} s", k.first_sync_s),
        format!("{:.1} s", r.first_sync_s),
        "",
        "",
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Largest lags — tracking: {}. Rescan: {}.\n",
        outliers(k, 5),
        outliers(r, 5)
    );
    let _ = writeln!(s, "{}\n", reading(k, r));
    let _ = writeln!(
        s,
        "**Setup.** Per mode a fresh {} image file on the scratch filesystem, attached with \
         `losetup`, `mkfs.ext4 -E lazy_itable_init=0,lazy_journal_init=0` (no background \
         initialisation writes later) and mounted. A {} data file is written on it whole and \
         made durable; its blocks are then located on the device (every 4 KiB page carries its \
         block and page number; an O_DIRECT scan of the device finds them). The real `slipway \
         serve` (PIT policy one point a week: its first, full point is taken when the disk is \
         continuous and let finish before the window) and the real agent `--follow` on the \
         loop device as `disk0`. Then for {:.0} s a thread in slipway-bench writes 256 KiB \
         blocks with O_DIRECT, each followed by fdatasync, paced to {:.0} MB/s, cycling \
         through the data file's {} blocks (each block is rewritten every {:.1} s); each block \
         carries a sequence number in its first and last 16 bytes (the rest random, \
         incompressible). Meanwhile `slipway restore-points create --source {SOURCE} --wait` \
         runs at 5 s and every {} s after (the one running when the window ends is let \
         finish). Both modes use the same sizes, workload, duration and schedule.\n",
        human(sz.image as f64),
        human((sz.blocks * BLK) as f64),
        sz.window.as_secs_f64(),
        RATE / 1e6,
        sz.blocks,
        (sz.blocks * BLK) as f64 / RATE,
        RP_EVERY.as_secs()
    );
    let _ = writeln!(
        s,
        "**How measured.** *Lag*: a write's start is the moment its fdatasync returned; a \
         poller thread reads, every {} ms, the header and trailer of each block with writes \
         pending in the server's volume file (`var/volumes/{SOURCE}/disk0.raw`, page cache, \
         coherent with the server's writes), and a write counts as replicated when the block \
         holds its sequence number or a later one in both places (a later one: the block was \
         rewritten and the replica moved past it). Resolution is the poll period (+0–{} ms). \
         *Read amplification*: `read_bytes` of /proc/<agent>/io (O_DIRECT reads of the device \
         count there; reads of tracefs do not) from the workload's start until the replica held \
         every write, ÷ 256 KiB × writes made. The ext4 journal and inode updates the writes \
         cause are not in the denominator. *Freeze*: `frozen_ms` of the agent's lines \
         \"consistency marker placed with the source's filesystems frozen\" logged in the \
         window. *CPU*: utime+stime of /proc/<pid>/stat over the same span as the bytes \
         read, ÷ GiB written. One pair per invocation: p50/p99 are over the writes (or \
         points) of the one run, not over runs. Without tracking, every restore point makes \
         the agent reread the whole device before its marker (to cover every change made \
         before the request), with the filesystem frozen meanwhile (bounded by the agent's \
         `--max-freeze`, default 1 s); with tracking only the chunks the kernel reported are \
         read.\n",
        POLL_EVERY.as_millis(),
        POLL_EVERY.as_millis()
    );
    let cmds: Vec<String> = ctx
        .report
        .commands
        .iter()
        .filter(|(id, _)| id == "8")
        .map(|(_, c)| c.clone())
        .collect();
    let _ = writeln!(
        s,
        "Commands (paths of the run's scratch directory; `$TOKEN`/`$FP` the run's token and \
         certificate fingerprint; `/dev/loopN` is whichever free loop device `losetup --find` \
         gave):\n"
    );
    let _ = writeln!(
        s,
        "    cargo build --release -p slipway -p slipway-agent -p slipway-bench"
    );
    let _ = writeln!(s, "    {}", bench_cmdline());
    for c in cmds {
        let _ = writeln!(s, "    {c}");
    }
    ctx.report.sections.push((SECTION_TITLE.to_string(), s));
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|x| x.1.trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// The heading of this scenario's section in docs/benchmarks.md.
pub const SECTION_TITLE: &str =
    "Scenario 8: a live source (ext4 on a loop device, written at 20 MB/s)";

/// This invocation as a shell command line (arguments quoted where the shell needs it).
fn bench_cmdline() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    format!("./target/release/slipway-bench {}", args.join(" "))
}

/// "2026-12-07 02:30" from the system clock.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Writes `sections` into the markdown file `path`: each replaces a section of the same
/// heading (up to the next `## ` heading) or is appended at the end. Nothing else changes.
pub fn splice_sections(path: &Path, sections: &[(String, String)]) -> Result<()> {
    let mut doc =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for (title, body) in sections {
        let heading = format!("## {title}\n");
        let block = format!("{heading}\n{}", body.trim_end());
        match doc.find(&heading) {
            Some(i) => {
                let after = i + heading.len();
                let end = doc[after..]
                    .find("\n## ")
                    .map(|j| after + j + 1)
                    .unwrap_or(doc.len());
                let tail = if end < doc.len() { "\n\n" } else { "\n" };
                doc.replace_range(i..end, &format!("{block}{tail}"));
            }
            None => {
                let sep = if doc.ends_with("\n\n") {
                    ""
                } else if doc.ends_with('\n') {
                    "\n"
                } else {
                    "\n\n"
                };
                doc.push_str(&format!("{sep}{block}\n"));
            }
        }
    }
    std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
