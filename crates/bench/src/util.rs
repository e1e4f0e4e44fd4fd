//! Process handling, /proc readings, Prometheus text, statistics and data files.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::{RngCore, SeedableRng};

pub const GIB: f64 = (1u64 << 30) as f64;
pub const MIB: u64 = 1 << 20;

/// Clock ticks per second of /proc/PID/stat times.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of a live process (all its threads), from /proc/PID/stat.
pub fn proc_cpu(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the ")" closing the command name: state is field 3, utime 14, stime 15.
    let rest = s
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("bad /proc stat"))?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f[11].parse()?;
    let stime: f64 = f[12].parse()?;
    Ok((utime + stime) / clk_tck())
}

/// A `kB` field of /proc/PID/status (e.g. "VmHWM", "VmRSS"), in bytes.
pub fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|v| v.strip_prefix(':')) {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse()?;
            return Ok(kb * 1024);
        }
    }
    bail!("no {field} in /proc/{pid}/status")
}

/// A field of /proc/PID/io (e.g. "wchar": bytes passed to write-family syscalls, all threads).
pub fn proc_io(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|v| v.strip_prefix(':')) {
            return Ok(v.trim().parse()?);
        }
    }
    bail!("no {field} in /proc/{pid}/io")
}

/// How a child ended, with its own resource usage (from wait4, so exactly this child).
#[derive(Debug, Clone, Copy)]
pub struct Exited {
    pub status: ExitStatus,
    pub cpu: f64,
}

/// A child process that is killed on drop unless it was reaped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    reaped: bool,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} ({cmd:?})"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
            reaped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child (at most `limit`), reaping it with wait4 for its rusage.
    /// On time-out the child is killed and an error returned.
    pub fn wait(&mut self, limit: Duration) -> Result<Exited> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok(e);
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("{} did not finish within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits at most `limit`; past it the child is killed and reaped. Returns how it ended and
    /// whether it was cut.
    pub fn wait_capped(&mut self, limit: Duration) -> Result<(Exited, bool)> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok((e, false));
            }
            if Instant::now() > deadline {
                self.signal(libc::SIGKILL);
                loop {
                    if let Some(e) = self.try_wait()? {
                        return Ok((e, true));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<Exited>> {
        if self.reaped {
            bail!("{} already reaped", self.name);
        }
        let mut status: libc::c_int = 0;
        // SAFETY: an all-zero rusage is a valid value to be overwritten.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pointers are to live locals; the pid is our own unreaped child.
        let r = unsafe {
            libc::wait4(
                self.child.id() as libc::pid_t,
                &mut status,
                libc::WNOHANG,
                &mut ru,
            )
        };
        if r < 0 {
            bail!("wait4 {}: {}", self.name, std::io::Error::last_os_error());
        }
        if r == 0 {
            return Ok(None);
        }
        self.reaped = true;
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(Some(Exited {
            status: ExitStatus::from_raw(status),
            cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        }))
    }

    pub fn signal(&self, sig: libc::c_int) {
        if !self.reaped {
            // SAFETY: signalling our own unreaped child.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
            let _ = self.wait(Duration::from_secs(10));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<Exited> {
        if self.reaped {
            return None;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(e)) = self.try_wait() {
                return Some(e);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion; returns stdout, or an error with stderr.
pub fn run_out(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sync(2)`: nothing dirty left from an earlier step.
pub fn sync_all() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// GET over HTTP/1.1 (the server's metrics endpoint); returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default())
}

/// One scrape of Prometheus text: `name{labels}` → value.
#[derive(Debug, Clone, Default)]
pub struct Scrape(pub BTreeMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut m = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((k, v)) = line.rsplit_once(' ') {
                if let Ok(v) = v.parse::<f64>() {
                    m.insert(k.to_string(), v);
                }
            }
        }
        Scrape(m)
    }

    /// Sum over every label set of a metric family member (exact name before `{`).
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// Cumulative buckets (le, count) of a histogram summed over label sets.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        let bucket = format!("{name}_bucket");
        for (k, v) in &self.0 {
            if k.split('{').next() != Some(bucket.as_str()) {
                continue;
            }
            let Some(le) = k.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
                continue;
            };
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(x) => x,
                    Err(_) => continue,
                }
            };
            let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
            e.1 += v;
        }
        let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }
}

/// Histogram of `after − before` (cumulative bucket counts).
pub fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let b = before
                .iter()
                .find(|x| x.0 == le)
                .map(|x| x.1)
                .unwrap_or(0.0);
            (le, n - b)
        })
        .collect()
}

/// Quantile from cumulative buckets, interpolated linearly inside the bucket (Prometheus'
/// histogram_quantile). Returns None without observations; the top finite bound if the
/// quantile lies in +Inf.
pub fn bucket_quantile(b: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in b {
        if n >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = n - prev.1;
            let frac = if width > 0.0 {
                (rank - prev.1) / width
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, n);
    }
    Some(prev.0)
}

/// Share of observations at or below `le` (a bucket bound).
pub fn bucket_share_le(b: &[(f64, f64)], le: f64) -> Option<f64> {
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    b.iter().find(|x| x.0 == le).map(|x| x.1 / total)
}

/// Median, min and max of some runs.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(xs: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// Writes `size` bytes of seeded random data (no zero runs: every block is data), fsynced.
pub fn make_random_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Whether two files hold the same first `len` bytes.
pub fn same_content(a: &Path, b: &Path, len: u64) -> Result<bool> {
    let fa = File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let fb = File::open(b).with_context(|| format!("opening {}", b.display()))?;
    if fb.metadata()?.len() < len {
        return Ok(false);
    }
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(ba.len());
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// Removes a file or directory tree if present.
pub fn remove(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// Polls `cond` every `every` until it holds (Ok(true)) or `limit` passes (Ok(false)).
pub fn poll(
    limit: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if cond()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(every);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a benchmark).
pub fn free_tcp_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Reads lines of a child's stdout in a thread until a JSON object with "event":"ready"
/// arrives; the rest of stdout is drained in the background.
pub fn read_ready_line(
    out: std::process::ChildStdout,
    limit: Duration,
) -> Result<serde_json::Value> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        let mut sent = false;
        for l in lines.by_ref() {
            let Ok(l) = l else { break };
            if !sent {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    if v["event"] == "ready" {
                        let _ = tx.send(v);
                        sent = true;
                    }
                }
            }
        }
    });
    rx.recv_timeout(limit)
        .map_err(|_| anyhow!("no ready line within {limit:?}"))
}

/// The last `n` lines of a text file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// Bytes for the report: indicatif's `HumanBytes`, the agent's and the CLI's formatter too,
/// signed (differences can be negative).
pub fn human(b: f64) -> String {
    let s = indicatif::HumanBytes(b.abs() as u64).to_string();
    if b < 0.0 {
        format!("-{s}")
    } else {
        s
    }
}
