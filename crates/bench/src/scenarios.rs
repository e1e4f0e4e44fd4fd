//! The scenarios of issue 7. Each measures Slipway and, where there is one, its peer back to
//! back inside the same run, and adds rows to the report.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::{Rng, RngCore, SeedableRng};

use crate::report::fmt_stat;
use crate::slipway::{self, agent_sent_acked, start_agent, AgentSpec, Server};
use crate::util::{self, human, stat, Proc, Stat, GIB, MIB};
use crate::workload::Workload;
use crate::Ctx;

/// A command line as text, for the report (paths made relative to the scratch dir's parent).
fn cmdline(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() {
            "''".to_string()
        } else if a.contains(' ') {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

pub(crate) fn record(ctx: &mut Ctx, id: &str, cmd: &Command) {
    let mut line = cmdline(cmd);
    let work = ctx.work.display().to_string();
    line = line.replace(&work, "$WORK");
    let cwd = std::env::current_dir()
        .unwrap_or_default()
        .display()
        .to_string();
    line = line.replace(&format!("{cwd}/"), "");
    ctx.report.command(id, line);
}

/// Removes a scratch directory unless SLIPWAY_BENCH_KEEP is set (to look at logs).
fn keep_or_remove(dir: &Path) {
    if std::env::var_os("SLIPWAY_BENCH_KEEP").is_none() {
        util::remove(dir);
    }
}

/// A source disk of `size` random bytes, generated once per run of the benchmark.
fn source(ctx: &Ctx, name: &str, size: u64, seed: u64) -> Result<PathBuf> {
    let p = ctx.work.join(name);
    if std::fs::metadata(&p)
        .map(|m| m.len() == size)
        .unwrap_or(false)
    {
        return Ok(p);
    }
    let t = Instant::now();
    util::make_random_file(&p, size, seed)?;
    eprintln!(
        "   generated {} ({}) in {:.1} s",
        name,
        human(size as f64),
        t.elapsed().as_secs_f64()
    );
    Ok(p)
}

fn verdict_le(v: Option<Stat>, target: f64, what: &str) -> String {
    match v {
        None => "not measured".into(),
        Some(s) if s.median <= target => "**met**".into(),
        Some(s) => format!(
            "**missed** by {:.0}% ({what})",
            (s.median / target - 1.0) * 100.0
        ),
    }
}

fn verdict_ge(v: Option<Stat>, target: f64, what: &str) -> String {
    match v {
        None => "not measured".into(),
        Some(s) if s.median >= target => "**met**".into(),
        Some(s) => format!(
            "**missed**: {:.0}% short ({what})",
            (1.0 - s.median / target) * 100.0
        ),
    }
}

// ---------------------------------------------------------------- peers: dd, fio, nbdcopy

pub struct PeerRun {
    pub wall: f64,
    pub cpu: f64,
}

fn dd_run(ctx: &mut Ctx, id: &str, src: &Path, dst: &Path) -> Result<PeerRun> {
    let dd = ctx
        .tools
        .dd
        .clone()
        .ok_or_else(|| anyhow!("dd is missing"))?;
    util::remove(dst);
    util::sync_all();
    let mut cmd = Command::new(dd);
    cmd.arg(format!("if={}", src.display()))
        .arg(format!("of={}", dst.display()))
        .args(["bs=4M", "conv=fdatasync", "status=none"])
        .stdin(Stdio::null());
    record(ctx, id, &cmd);
    let t = Instant::now();
    let mut p = Proc::spawn("dd", &mut cmd)?;
    let e = p.wait(Duration::from_secs(300))?;
    let wall = t.elapsed().as_secs_f64();
    if !e.status.success() {
        bail!("dd failed: {}", e.status);
    }
    util::remove(dst);
    util::sync_all();
    Ok(PeerRun { wall, cpu: e.cpu })
}

fn fio_run(ctx: &mut Ctx, id: &str, size: u64, dst: &Path) -> Result<Option<PeerRun>> {
    let Some(fio) = ctx.tools.fio.clone() else {
        return Ok(None);
    };
    util::remove(dst);
    util::sync_all();
    let mut cmd = Command::new(fio);
    cmd.args([
        "--name=disklimit",
        "--rw=write",
        "--bs=4M",
        "--ioengine=psync",
    ])
    .arg(format!("--filename={}", dst.display()))
    .arg(format!("--size={size}"))
    .args(["--end_fsync=1", "--output-format=terse"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    record(ctx, id, &cmd);
    let t = Instant::now();
    let mut p = Proc::spawn("fio", &mut cmd)?;
    let e = p.wait(Duration::from_secs(300))?;
    let wall = t.elapsed().as_secs_f64();
    util::remove(dst);
    util::sync_all();
    if !e.status.success() {
        bail!("fio failed: {}", e.status);
    }
    Ok(Some(PeerRun { wall, cpu: e.cpu }))
}

pub struct NbdRun {
    pub wall: f64,
    pub client_cpu: f64,
    pub server_cpu: f64,
    /// Bytes copied (all of them unless the run was cut).
    pub bytes: f64,
    pub cut: bool,
}

/// `nbdcopy --flush SRC nbd://BIND:PORT` into `qemu-nbd` serving a fresh sparse raw file.
///
/// qemu-nbd runs with `--cache=writeback` (its default: page cache, and NBD_CMD_FLUSH becomes
/// an fdatasync of the file), so `nbdcopy --flush` returns only after the data is on stable
/// storage — the same promise Slipway's durable ack makes. (`--cache=unsafe` would ignore
/// the flush; `--cache=none` adds O_DIRECT, which changes the write path, not durability.)
#[allow(clippy::too_many_arguments)]
fn nbd_run(
    ctx: &mut Ctx,
    id: &str,
    src: &Path,
    size: u64,
    dst: &Path,
    client_ns: Option<&str>,
    server_ns: Option<&str>,
    bind: &str,
    cap: Duration,
) -> Result<NbdRun> {
    let nbdcopy = ctx
        .tools
        .nbdcopy
        .clone()
        .ok_or_else(|| anyhow!("nbdcopy is missing (Debian: libnbd-bin)"))?;
    let qemu = ctx
        .tools
        .qemu_nbd
        .clone()
        .ok_or_else(|| anyhow!("qemu-nbd is missing (Debian: qemu-utils)"))?;
    util::remove(dst);
    File::create(dst)?.set_len(size)?;
    util::sync_all();
    let port = util::free_tcp_port()?.to_string();
    let pidfile = dst.with_extension("pid");
    util::remove(&pidfile);
    let mut q = slipway::command_in(server_ns, &qemu);
    q.args(["-f", "raw", "-x", "", "-b", bind, "-p", &port])
        .args([
            "-e",
            "8",
            "-t",
            "--cache=writeback",
            "--aio=threads",
            "--fork",
        ])
        .arg(format!("--pid-file={}", pidfile.display()))
        .arg(dst);
    record(ctx, id, &q);
    util::run_out(&mut q)?;
    let qpid: u32 = std::fs::read_to_string(&pidfile)
        .context("reading qemu-nbd's pid file")?
        .trim()
        .parse()?;
    let kill_qemu = || {
        // SAFETY: signalling the qemu-nbd daemon this run started (pid from its pid file).
        unsafe { libc::kill(qpid as libc::pid_t, libc::SIGTERM) };
        let gone = util::poll(Duration::from_secs(5), Duration::from_millis(10), || {
            Ok(!Path::new(&format!("/proc/{qpid}")).exists())
        })
        .unwrap_or(false);
        if !gone {
            // SAFETY: as above.
            unsafe { libc::kill(qpid as libc::pid_t, libc::SIGKILL) };
        }
    };
    let result = (|| -> Result<NbdRun> {
        let cpu0 = util::proc_cpu(qpid)?;
        let wchar0 = util::proc_io(qpid, "wchar").unwrap_or(0);
        let progress = dst.with_extension("progress");
        let mut c = slipway::command_in(client_ns, &nbdcopy);
        c.args(["--flush", "--progress=2"])
            .arg(src)
            .arg(format!("nbd://{bind}:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&progress)?));
        record(ctx, id, &c);
        let t = Instant::now();
        let mut p = Proc::spawn("nbdcopy", &mut c)?;
        let (e, cut) = p.wait_capped(cap)?;
        let wall = t.elapsed().as_secs_f64();
        let cpu1 = util::proc_cpu(qpid)?;
        let wchar = util::proc_io(qpid, "wchar")
            .unwrap_or(0)
            .saturating_sub(wchar0);
        if !cut && !e.status.success() {
            bail!(
                "nbdcopy failed ({}): {}",
                e.status,
                util::tail(&progress, 5)
            );
        }
        let bytes = if cut {
            // Progress lines are "N/100".
            let pct = std::fs::read_to_string(&progress)
                .unwrap_or_default()
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_suffix("/100")?.parse::<f64>().ok())
                .unwrap_or(0.0);
            // nbdcopy's progress moves in coarse steps; what qemu-nbd has written (allocated
            // blocks of the sparse output file) is finer. Take the larger.
            use std::os::unix::fs::MetadataExt;
            let written = std::fs::metadata(dst)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            // qemu-nbd's own count of bytes it wrote (pwrite) is exact; nbdcopy's progress
            // runs ahead of what was written (it counts requests issued), so it is only the
            // fallback.
            if wchar > 0 {
                wchar.min(size) as f64
            } else {
                (size as f64 * pct / 100.0).max(written.min(size) as f64)
            }
        } else {
            size as f64
        };
        Ok(NbdRun {
            wall,
            client_cpu: e.cpu,
            server_cpu: cpu1 - cpu0,
            bytes,
            cut,
        })
    })();
    kill_qemu();
    util::remove(dst);
    util::remove(&pidfile);
    util::remove(&dst.with_extension("progress"));
    util::sync_all();
    result
}

// ---------------------------------------------------------------- slipway: one sync

#[derive(Debug, Clone, Default)]
pub struct SlipRun {
    pub wall: f64,
    pub server_cpu: f64,
    pub agent_cpu: f64,
    pub server_hwm: u64,
    pub fdatasyncs: f64,
    pub flush_seconds: f64,
    pub identical: Option<bool>,
    /// (server, agent) perf.data files when profiled.
    pub perf: Option<(PathBuf, PathBuf)>,
}

pub struct SyncOpts<'a> {
    pub id: &'a str,
    pub label: &'a str,
    pub agent_extra: &'a [&'a str],
    pub check: bool,
    pub profile: bool,
    /// Parent of the server's data dir (the scratch dir unless given, e.g. tmpfs).
    pub data_parent: Option<&'a Path>,
}

/// One initial sync of `src` by a fresh server and agent over 127.0.0.1; the time is the
/// agent's whole life (connect, handshake, every byte durably acked, exit).
fn slipway_sync(ctx: &mut Ctx, src: &Path, size: u64, o: &SyncOpts) -> Result<SlipRun> {
    let dir = match o.data_parent {
        Some(p) => {
            let d = p.join(format!("slipway-bench-{}", o.label));
            util::remove(&d);
            std::fs::create_dir_all(&d)?;
            d
        }
        None => ctx.fresh_dir(o.label)?,
    };
    let result = (|| -> Result<SlipRun> {
        let data = dir.join("var");
        let token = slipway::token(&ctx.bins, &data, "bench")?;
        let mut server = Server::start(&ctx.bins, &data, "127.0.0.1:0", None, None)?;
        let log = dir.join("agent.log");
        let spec = AgentSpec {
            server: &server.listen,
            fingerprint: &server.fingerprint,
            source: "bench",
            token: &token,
            disks: vec![format!("{}:disk0", src.display())],
            extra: o.agent_extra.iter().map(|s| s.to_string()).collect(),
            log: log.clone(),
            netns: None,
        };
        record_agent(ctx, o.id, &spec, &server);
        util::sync_all();
        let cpu0 = server.cpu()?;
        let perf_server = if o.profile {
            Some(start_perf(
                ctx,
                server.pid(),
                &dir.join("perf-server.data"),
            )?)
        } else {
            None
        };
        let t = Instant::now();
        let mut agent = start_agent(&ctx.bins, &spec)?;
        let perf_agent = if o.profile {
            Some(start_perf(ctx, agent.pid(), &dir.join("perf-agent.data"))?)
        } else {
            None
        };
        let e = agent.wait(Duration::from_secs(600))?;
        let wall = t.elapsed().as_secs_f64();
        let cpu1 = server.cpu()?;
        for p in [perf_server, perf_agent].into_iter().flatten() {
            let mut p = p;
            p.signal(libc::SIGINT);
            let _ = p.wait(Duration::from_secs(60));
        }
        if !e.status.success() {
            bail!(
                "agent exited {}: {}\nserver log: {}",
                e.status,
                util::tail(&log, 10),
                util::tail(&data.join("server.log"), 10)
            );
        }
        let m = server.scrape()?;
        let hwm = util::proc_status_kb(server.pid(), "VmHWM")?;
        let identical = if o.check {
            Some(util::same_content(
                src,
                &server.volume("bench", "disk0"),
                size,
            )?)
        } else {
            None
        };
        server.stop();
        Ok(SlipRun {
            wall,
            server_cpu: cpu1 - cpu0,
            agent_cpu: e.cpu,
            server_hwm: hwm,
            fdatasyncs: m.sum("slipway_store_fdatasyncs_total"),
            flush_seconds: m.sum("slipway_store_flush_seconds_sum"),
            identical,
            perf: o
                .profile
                .then(|| (dir.join("perf-server.data"), dir.join("perf-agent.data"))),
        })
    })();
    if !o.profile {
        keep_or_remove(&dir);
    } else {
        // Keep the perf files; drop the volume.
        util::remove(&dir.join("var"));
    }
    util::sync_all();
    result
}

pub(crate) fn record_agent(ctx: &mut Ctx, id: &str, a: &AgentSpec, server: &Server) {
    let mut cmd = slipway::command_in(a.netns, &ctx.bins.agent);
    cmd.arg("replicate")
        .args(["--server", a.server])
        .args(["--server-fingerprint", "$FP"])
        .args(["--source-id", a.source, "--token", "$TOKEN"]);
    for d in &a.disks {
        cmd.arg("--disk").arg(d);
    }
    cmd.args(&a.extra);
    let mut s = slipway::command_in(None, &ctx.bins.slipway);
    s.arg("serve")
        .arg("--data-dir")
        .arg(&server.data_dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]);
    record(ctx, id, &s);
    record(ctx, id, &cmd);
}

fn start_perf(ctx: &Ctx, pid: u32, out: &Path) -> Result<Proc> {
    let perf = ctx
        .tools
        .perf
        .clone()
        .ok_or_else(|| anyhow!("perf is missing (Debian: linux-perf)"))?;
    let mut c = Command::new(perf);
    c.args(["record", "-F", "997", "-q", "-o"])
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let p = Proc::spawn("perf record", &mut c)?;
    // perf needs a moment to attach.
    std::thread::sleep(Duration::from_millis(300));
    Ok(p)
}

// ---------------------------------------------------------------- scenario 1 and 7

pub fn s1_initial_sync(ctx: &mut Ctx) -> Result<()> {
    let size: u64 = if ctx.quick { 512 * MIB } else { 2 << 30 };
    let gib = size as f64 / GIB;
    let src = source(ctx, "src-2g.img", size, 1)?;
    let dst = ctx.work.join("peer-out.raw");
    let (mut dd_w, mut dd_cpu, mut fio_w) = (vec![], vec![], vec![]);
    let (mut nbd_w, mut nbd_ccpu, mut nbd_scpu) = (vec![], vec![], vec![]);
    let (mut sw_w, mut sw_scpu, mut sw_acpu, mut sw_hwm, mut sw_flush, mut sw_syncs) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut nc_w, mut nc_scpu, mut nc_acpu) = (vec![], vec![], vec![]);
    let (mut bb_w, mut bb_scpu, mut bb_acpu) = (vec![], vec![], vec![]);
    let (mut r_nbd, mut r_dd, mut r_nc_nbd, mut r_scpu, mut r_acpu) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut identical = true;
    let est = Duration::from_secs_f64(5.0 * 8.0 * gib + 20.0);
    for i in 0..ctx.runs {
        if i > 0 && !ctx.fits(est + Duration::from_secs(600)) {
            ctx.report.note(
                "1",
                format!("stopped after {i} run(s) to stay inside the time budget"),
            );
            break;
        }
        eprintln!("   run {}/{}", i + 1, ctx.runs);
        // The order rotates from run to run, so no contender always runs first (on this VM
        // memory that was freed a while ago is slower to touch again).
        let (mut dd, mut fio, mut nbd, mut sw, mut nc, mut bb) =
            (None, None, None, None, None, None);
        for k in 0..6 {
            match (k + i) % 6 {
                0 => dd = Some(dd_run(ctx, "1 (disk limit)", &src, &dst)?),
                1 => fio = Some(fio_run(ctx, "1 (disk limit)", size, &dst)?),
                2 => {
                    nbd = Some(nbd_run(
                        ctx,
                        "1 (nbdcopy → qemu-nbd)",
                        &src,
                        size,
                        &dst,
                        None,
                        None,
                        "127.0.0.1",
                        Duration::from_secs(300),
                    )?)
                }
                3 => {
                    sw = Some(slipway_sync(
                        ctx,
                        &src,
                        size,
                        &SyncOpts {
                            id: "1 (Slipway)",
                            label: "s1",
                            agent_extra: &[],
                            check: i == 0,
                            profile: false,
                            data_parent: None,
                        },
                    )?)
                }
                5 => {
                    bb = Some(slipway_sync(
                        ctx,
                        &src,
                        size,
                        &SyncOpts {
                            id: "1 (Slipway)",
                            label: "s1bbr",
                            agent_extra: &["--congestion", "bbr"],
                            check: false,
                            profile: false,
                            data_parent: None,
                        },
                    )?)
                }
                _ => {
                    nc = Some(slipway_sync(
                        ctx,
                        &src,
                        size,
                        &SyncOpts {
                            id: "1 (Slipway)",
                            label: "s1nc",
                            agent_extra: &["--no-compress"],
                            check: false,
                            profile: false,
                            data_parent: None,
                        },
                    )?)
                }
            }
        }
        let (dd, fio, nbd, sw, nc, bb) = (
            dd.unwrap(),
            fio.unwrap(),
            nbd.unwrap(),
            sw.unwrap(),
            nc.unwrap(),
            bb.unwrap(),
        );
        bb_w.push(bb.wall);
        bb_scpu.push(bb.server_cpu / gib);
        bb_acpu.push(bb.agent_cpu / gib);
        eprintln!(
            "   dd {:.2} s, nbdcopy {:.2} s, slipway {:.2} s (--no-compress {:.2} s); server {:.2} CPU-s, qemu-nbd {:.2} CPU-s",
            dd.wall, nbd.wall, sw.wall, nc.wall, sw.server_cpu, nbd.server_cpu
        );
        if sw.identical == Some(false) {
            identical = false;
        }
        dd_w.push(dd.wall);
        dd_cpu.push(dd.cpu / gib);
        if let Some(f) = fio {
            fio_w.push(f.wall);
        }
        nbd_w.push(nbd.wall);
        nbd_ccpu.push(nbd.client_cpu / gib);
        nbd_scpu.push(nbd.server_cpu / gib);
        sw_w.push(sw.wall);
        sw_scpu.push(sw.server_cpu / gib);
        sw_acpu.push(sw.agent_cpu / gib);
        sw_hwm.push(sw.server_hwm as f64 / MIB as f64);
        sw_flush.push(sw.flush_seconds);
        sw_syncs.push(sw.fdatasyncs);
        nc_w.push(nc.wall);
        nc_scpu.push(nc.server_cpu / gib);
        nc_acpu.push(nc.agent_cpu / gib);
        r_nbd.push(sw.wall / nbd.wall);
        r_dd.push(dd.wall / sw.wall);
        r_nc_nbd.push(nc.wall / nbd.wall);
        r_scpu.push((sw.server_cpu / gib) / (nbd.server_cpu / gib));
        r_acpu.push((sw.agent_cpu / gib) / (nbd.client_cpu / gib));
        ctx.s1_rates.push(size as f64 / sw.wall);
    }
    let rep = &mut ctx.report;
    let size_s = human(size as f64);
    rep.target(
        "1",
        &format!("initial sync, {size_s} random, loopback, durable: Slipway wall time ÷ nbdcopy→qemu-nbd's"),
        format!("{}×", fmt_stat(stat(&r_nbd), 2)),
        "≤ 1.0×",
        verdict_le(stat(&r_nbd), 1.0, "see where the time goes"),
    );
    rep.target(
        "1",
        "same: Slipway's rate as a share of the disk limit (dd time ÷ Slipway time)",
        format!(
            "{}%",
            fmt_stat(stat(&r_dd.iter().map(|x| x * 100.0).collect::<Vec<_>>()), 0)
        ),
        "≥ 80%",
        verdict_ge(stat(&r_dd), 0.8, "see where the time goes"),
    );
    rep.target(
        "7",
        "server CPU-s (user+sys) per GiB received in scenario 1",
        format!(
            "{} (qemu-nbd: {}; ratio {})",
            fmt_stat(stat(&sw_scpu), 2),
            fmt_stat(stat(&nbd_scpu), 2),
            fmt_stat(stat(&r_scpu), 2)
        ),
        "≤ 1.5",
        verdict_le(stat(&sw_scpu), 1.5, "see the profile"),
    );
    rep.target(
        "7",
        "agent CPU-s per GiB sent in scenario 1 (beside nbdcopy's)",
        format!(
            "{} (nbdcopy: {}; ratio {})",
            fmt_stat(stat(&sw_acpu), 2),
            fmt_stat(stat(&nbd_ccpu), 2),
            fmt_stat(stat(&r_acpu), 2)
        ),
        "reported (no target)",
        "—".into(),
    );
    let rate = |w: &[f64]| -> Vec<f64> { w.iter().map(|t| size as f64 / t / 1e6).collect() };
    rep.raw("1", "dd bs=4M conv=fdatasync: wall", stat(&dd_w), "s", 2);
    rep.raw("1", "dd: rate", stat(&rate(&dd_w)), "MB/s", 0);
    rep.raw("1", "dd: CPU per GiB", stat(&dd_cpu), "CPU-s/GiB", 2);
    if !fio_w.is_empty() {
        rep.raw(
            "1",
            "fio seq write 4M + end_fsync: wall",
            stat(&fio_w),
            "s",
            2,
        );
        rep.raw("1", "fio: rate", stat(&rate(&fio_w)), "MB/s", 0);
    }
    rep.raw(
        "1",
        "nbdcopy --flush → qemu-nbd: wall",
        stat(&nbd_w),
        "s",
        2,
    );
    rep.raw(
        "1",
        "nbdcopy → qemu-nbd: rate",
        stat(&rate(&nbd_w)),
        "MB/s",
        0,
    );
    rep.raw(
        "1",
        "Slipway (agent defaults: LZ4 on, cubic): wall",
        stat(&sw_w),
        "s",
        2,
    );
    rep.raw("1", "Slipway: rate", stat(&rate(&sw_w)), "MB/s", 0);
    rep.raw("1", "Slipway --no-compress: wall", stat(&nc_w), "s", 2);
    rep.raw(
        "1",
        "Slipway --no-compress: wall ÷ nbdcopy's",
        stat(&r_nc_nbd),
        "×",
        2,
    );
    rep.raw(
        "1",
        "Slipway, agent --congestion bbr: wall",
        stat(&bb_w),
        "s",
        2,
    );
    rep.raw(
        "7",
        "server CPU per GiB, agent --congestion bbr",
        stat(&bb_scpu),
        "CPU-s/GiB",
        2,
    );
    rep.raw(
        "7",
        "agent CPU per GiB, --congestion bbr",
        stat(&bb_acpu),
        "CPU-s/GiB",
        2,
    );
    rep.raw(
        "1",
        "Slipway: fdatasyncs in the sync",
        stat(&sw_syncs),
        "calls",
        0,
    );
    rep.raw(
        "1",
        "Slipway: time inside fdatasync (slipway_store_flush_seconds_sum)",
        stat(&sw_flush),
        "s",
        2,
    );
    rep.raw(
        "1",
        "Slipway: server peak RSS (VmHWM)",
        stat(&sw_hwm),
        "MiB",
        0,
    );
    rep.raw(
        "7",
        "server (slipway serve) CPU per GiB",
        stat(&sw_scpu),
        "CPU-s/GiB",
        2,
    );
    rep.raw(
        "7",
        "server CPU per GiB, agent --no-compress",
        stat(&nc_scpu),
        "CPU-s/GiB",
        2,
    );
    rep.raw("7", "qemu-nbd CPU per GiB", stat(&nbd_scpu), "CPU-s/GiB", 2);
    rep.raw(
        "7",
        "agent (slipway-agent) CPU per GiB",
        stat(&sw_acpu),
        "CPU-s/GiB",
        2,
    );
    rep.raw(
        "7",
        "agent CPU per GiB, --no-compress",
        stat(&nc_acpu),
        "CPU-s/GiB",
        2,
    );
    rep.raw("7", "nbdcopy CPU per GiB", stat(&nbd_ccpu), "CPU-s/GiB", 2);
    rep.note(
        "1",
        format!(
            "source: one {size_s} file of seeded random bytes (no zero blocks, incompressible), \
             in the page cache for every contender. Each run: dd, {}nbdcopy→qemu-nbd, Slipway, \
             Slipway --no-compress, Slipway --congestion bbr, back to back (the order rotates from run to run), each writing a fresh file on the same \
             filesystem and followed by sync(2). Slipway's time is the agent's whole life \
             (connect, TLS, every write durably acked, exit); nbdcopy's likewise (connect, copy, \
             NBD flush = fdatasync, exit); server start-up is outside both. The replica of the \
             first run was compared byte for byte with the source: {}.",
            if fio_w.is_empty() { "" } else { "fio, " },
            if identical { "identical" } else { "**DIFFERENT**" }
        ),
    );
    rep.note(
        "7",
        "CPU = user + system seconds: the server's and qemu-nbd's from /proc/PID/stat \
         (all threads) sampled just before the client starts and just after it exits; the \
         agent's, nbdcopy's and dd's from wait4()'s rusage of that child. Per GiB of disk \
         data (the payload, not wire bytes).",
    );
    Ok(())
}

// ---------------------------------------------------------------- profile

fn perf_top(ctx: &Ctx, data: &Path) -> Result<Vec<(f64, String, String)>> {
    let perf = ctx
        .tools
        .perf
        .clone()
        .ok_or_else(|| anyhow!("perf missing"))?;
    let out = util::run_out(
        Command::new(perf)
            .args([
                "report",
                "--stdio",
                "--no-children",
                "-q",
                "--sort",
                "dso,sym",
                "-i",
            ])
            .arg(data)
            .stderr(Stdio::null()),
    )?;
    let mut v = vec![];
    for l in out.lines() {
        let l = l.trim();
        let Some((pct, rest)) = l.split_once('%') else {
            continue;
        };
        let Ok(pct) = pct.trim().parse::<f64>() else {
            continue;
        };
        let rest = rest.trim();
        let (dso, sym) = match rest.split_once(' ') {
            Some((d, s)) => (d.trim(), s.trim()),
            None => (rest, ""),
        };
        let sym = sym
            .trim_start_matches("[.]")
            .trim_start_matches("[k]")
            .trim()
            .to_string();
        v.push((pct, dso.to_string(), sym));
    }
    Ok(v)
}

fn category(dso: &str, sym: &str) -> &'static str {
    let s = sym.to_ascii_lowercase();
    let kernel = dso.contains("kernel") || dso.starts_with('[');
    let any = |pats: &[&str]| pats.iter().any(|p| s.contains(p));
    if any(&[
        "aes",
        "gcm",
        "ghash",
        "gfmul",
        "chacha",
        "poly1305",
        "ring_core",
        "ring::",
    ]) {
        "crypto (AES-GCM, header protection)"
    } else if any(&["crc32"]) {
        "CRC-32"
    } else if any(&["lz4"]) {
        "LZ4"
    } else if any(&["xxh3", "xxh64", "xxhash"]) {
        "xxh3 (agent change hashes)"
    } else if kernel {
        if any(&["copy_folio_from_iter", "copy_page_from_iter"]) {
            "kernel: copying written data into page-cache pages"
        } else if any(&[
            "page_fault",
            "do_anonymous_page",
            "handle_mm_fault",
            "clear_page",
            "__do_fault",
            "mem_cgroup",
            "do_user_addr_fault",
            "alloc_pages",
            "rmqueue",
            "free_pages",
            "unmap",
            "zap_",
            "tlb",
        ]) {
            "kernel: page faults, page allocation and freeing"
        } else if any(&[
            "copy_user",
            "rep_mov",
            "copy_to_user",
            "copy_from_user",
            "memcpy",
            "copyin",
            "copyout",
        ]) {
            "kernel: copies user↔kernel"
        } else if any(&[
            "ext4",
            "filemap",
            "iomap",
            "folio",
            "page_cache",
            "pagecache",
            "jbd2",
            "blk",
            "bio_",
            "writeback",
            "fdatasync",
            "iov_iter",
            "virtio",
            "mpage",
            "__block",
            "lru",
        ]) {
            "kernel: page cache, ext4, block I/O"
        } else if any(&[
            "udp", "ip_", "ipv4", "skb", "sock", "net_", "netif", "__dev", "napi", "gro", "gso",
            "csum", "recvmsg", "sendmsg", "loopback", "nf_", "__ip", "inet", "tcp",
        ]) {
            "kernel: network stack (UDP/IP, loopback)"
        } else if any(&[
            "schedule",
            "futex",
            "epoll",
            "switch",
            "pick_next",
            "wake",
            "enqueue",
            "dequeue",
            "idle",
            "hrtimer",
            "tick",
        ]) {
            "kernel: scheduling, futex, epoll, timers"
        } else if any(&["syscall", "entry_", "exit_to_user", "do_syscall"]) {
            "kernel: syscall entry/exit"
        } else {
            "kernel: other"
        }
    } else if any(&["memmove", "memcpy", "memset", "memcmp"]) {
        "memcpy/memmove/memset (user)"
    } else if any(&[
        "malloc", "free", "realloc", "_int_", "calloc", "cfree", "arena",
    ]) {
        "allocator (glibc malloc)"
    } else if any(&["quinn"]) {
        "quinn (QUIC state machine, packetisation)"
    } else if any(&["tokio"]) {
        "tokio runtime"
    } else if any(&["slipway"]) {
        "Slipway code"
    } else {
        "other user code"
    }
}

fn perf_section(ctx: &Ctx, who: &str, data: &Path, lines: &mut Vec<String>) -> Result<()> {
    let top = perf_top(ctx, data)?;
    if top.is_empty() {
        bail!("perf report of {who} is empty");
    }
    let mut cats: Vec<(&'static str, f64)> = vec![];
    for (p, d, s) in &top {
        let c = category(d, s);
        match cats.iter_mut().find(|x| x.0 == c) {
            Some(x) => x.1 += p,
            None => cats.push((c, *p)),
        }
    }
    cats.sort_by(|a, b| b.1.total_cmp(&a.1));
    lines.push(format!(
        "\n**{who}**, on-CPU samples by category (perf record -F 997, self time):\n"
    ));
    lines.push("| category | share of samples |".into());
    lines.push("|---|---:|".into());
    for (c, p) in cats.iter().filter(|x| x.1 >= 0.5) {
        lines.push(format!("| {c} | {p:.1}% |"));
    }
    lines.push(format!("\nTop symbols of {who}:\n"));
    lines.push("| share | dso | symbol |".into());
    lines.push("|---:|---|---|".into());
    for (p, d, s) in top.iter().take(12) {
        let mut s = s.replace('|', "\\|");
        if s.len() > 90 {
            s = format!(
                "{}…",
                &s[..s.char_indices().nth(90).map(|x| x.0).unwrap_or(s.len())]
            );
        }
        lines.push(format!("| {p:.1}% | {d} | `{s}` |"));
    }
    Ok(())
}

/// Profiles one scenario-1 sync (server and agent under perf), and separates the disk from
/// the rest by running Slipway and nbdcopy into tmpfs too.
pub fn profile(ctx: &mut Ctx) -> Result<()> {
    let size: u64 = if ctx.quick { 512 * MIB } else { 2 << 30 };
    let gib = size as f64 / GIB;
    let src = source(ctx, "src-2g.img", size, 1)?;
    let mut lines: Vec<String> = vec![];
    let shm = Path::new("/dev/shm");
    let (mut tmpfs_sw, mut tmpfs_nbd, mut tmpfs_scpu, mut tmpfs_acpu) =
        (vec![], vec![], vec![], vec![]);
    let (mut tmpfs_qcpu, mut tmpfs_ccpu) = (vec![], vec![]);
    let est = Duration::from_secs_f64(4.0 * gib + 10.0);
    for i in 0..ctx.runs {
        if shm.is_dir() && ctx.fits(est + Duration::from_secs(540)) {
            let sw = slipway_sync(
                ctx,
                &src,
                size,
                &SyncOpts {
                    id: "profile (into tmpfs)",
                    label: "tmpfs",
                    agent_extra: &[],
                    check: false,
                    profile: false,
                    data_parent: Some(shm),
                },
            )?;
            let dst = shm.join("slipway-bench-nbd.raw");
            let nbd = nbd_run(
                ctx,
                "profile (into tmpfs)",
                &src,
                size,
                &dst,
                None,
                None,
                "127.0.0.1",
                Duration::from_secs(300),
            )?;
            eprintln!(
                "   into tmpfs: slipway {:.2} s, nbdcopy {:.2} s",
                sw.wall, nbd.wall
            );
            tmpfs_sw.push(sw.wall);
            tmpfs_nbd.push(nbd.wall);
            tmpfs_scpu.push(sw.server_cpu / gib);
            tmpfs_acpu.push(sw.agent_cpu / gib);
            tmpfs_qcpu.push(nbd.server_cpu / gib);
            tmpfs_ccpu.push(nbd.client_cpu / gib);
        } else if i == 0 {
            ctx.report.note(
                "profile",
                "/dev/shm is missing or no time was left: no tmpfs runs",
            );
        }
    }
    let rate = |w: &[f64]| -> Vec<f64> { w.iter().map(|t| size as f64 / t / 1e6).collect() };
    {
        let rep = &mut ctx.report;
        rep.raw(
            "profile",
            "Slipway into tmpfs (no disk): wall",
            stat(&tmpfs_sw),
            "s",
            2,
        );
        rep.raw(
            "profile",
            "Slipway into tmpfs: rate",
            stat(&rate(&tmpfs_sw)),
            "MB/s",
            0,
        );
        rep.raw(
            "profile",
            "Slipway into tmpfs: server CPU per GiB",
            stat(&tmpfs_scpu),
            "CPU-s/GiB",
            2,
        );
        rep.raw(
            "profile",
            "Slipway into tmpfs: agent CPU per GiB",
            stat(&tmpfs_acpu),
            "CPU-s/GiB",
            2,
        );
        rep.raw(
            "profile",
            "nbdcopy → qemu-nbd into tmpfs: wall",
            stat(&tmpfs_nbd),
            "s",
            2,
        );
        rep.raw(
            "profile",
            "nbdcopy → qemu-nbd into tmpfs: rate",
            stat(&rate(&tmpfs_nbd)),
            "MB/s",
            0,
        );
        rep.raw(
            "profile",
            "qemu-nbd into tmpfs: CPU per GiB",
            stat(&tmpfs_qcpu),
            "CPU-s/GiB",
            2,
        );
        rep.raw(
            "profile",
            "nbdcopy into tmpfs: CPU per GiB",
            stat(&tmpfs_ccpu),
            "CPU-s/GiB",
            2,
        );
    }
    // The profiled run (on the real disk, like scenario 1).
    if ctx.tools.perf.is_none() {
        ctx.report
            .profile
            .push("perf is not installed (Debian: linux-perf), so no profile was taken.".into());
        return Ok(());
    }
    let sw = slipway_sync(
        ctx,
        &src,
        size,
        &SyncOpts {
            id: "profile",
            label: "profiled",
            agent_extra: &[],
            check: false,
            profile: true,
            data_parent: None,
        },
    )?;
    let (ps, pa) = sw.perf.clone().unwrap();
    let perf_cmd = "perf record -F 997 -p <pid> (server and agent, attached for the agent's \
                    lifetime); perf report --stdio --no-children --sort dso,sym"
        .to_string();
    ctx.report.command("profile", perf_cmd);
    let s1 = ctx
        .report
        .raw
        .iter()
        .find(|r| r.what.starts_with("dd bs=4M"))
        .and_then(|r| r.stat)
        .map(|s| s.median);
    let nbd_wall = ctx
        .report
        .raw
        .iter()
        .find(|r| r.what == "nbdcopy --flush → qemu-nbd: wall")
        .and_then(|r| r.stat)
        .map(|s| s.median);
    lines.push(format!(
        "One more {} sync on the disk with `perf record` attached to both processes took \
         {:.2} s (perf itself costs a little). In it the server was on a CPU for {:.2} s \
         ({:.0}% of one core of the wall time) and the agent for {:.2} s ({:.0}%); {:.0} \
         fdatasyncs took {:.2} s in all (they overlap the writes: a flusher thread per disk).",
        human(size as f64),
        sw.wall,
        sw.server_cpu,
        sw.server_cpu / sw.wall * 100.0,
        sw.agent_cpu,
        sw.agent_cpu / sw.wall * 100.0,
        sw.fdatasyncs,
        sw.flush_seconds
    ));
    let ts = stat(&tmpfs_sw).map(|s| s.median);
    let tn = stat(&tmpfs_nbd).map(|s| s.median);
    if let (Some(ts), Some(tn)) = (ts, tn) {
        lines.push(format!(
            "\nWithout a disk (volume on tmpfs, same {}) Slipway took {:.2} s ({:.0} MB/s) and \
             nbdcopy→qemu-nbd {:.2} s ({:.0} MB/s){}{}. {}",
            human(size as f64),
            ts,
            size as f64 / ts / 1e6,
            tn,
            size as f64 / tn / 1e6,
            s1.map(|d| format!("; the disk alone (dd) needs {d:.2} s"))
                .unwrap_or_default(),
            nbd_wall
                .map(|n| format!(", nbdcopy onto it {n:.2} s"))
                .unwrap_or_default(),
            if ts > s1.unwrap_or(f64::MAX) * 0.8 {
                "Slipway's transport alone is slower than the disk: on this machine the \
                 QUIC/TLS path (CPU), not the disk, bounds the initial sync."
            } else {
                "The transport alone is faster than the disk: the disk and how writes reach \
                 it bound the initial sync."
            }
        ));
    }
    perf_section(ctx, "slipway serve", &ps, &mut lines)?;
    perf_section(ctx, "slipway-agent", &pa, &mut lines)?;
    if lines
        .iter()
        .any(|l| l.contains("`copy_folio_from_iter_atomic`"))
    {
        lines.push(
            "\n`copy_folio_from_iter_atomic` is the kernel copying a pwrite's bytes into \
             page-cache pages. On this machine (a Firecracker VM whose balloon reports free \
             pages to the host, see /sys/bus/virtio/drivers/virtio_balloon) the first touch of \
             a page that was free for a while faults on the host, so writing *new* data into \
             the page cache costs far more system time than the copy itself — for every \
             contender alike (dd, qemu-nbd and the Slipway server all show it), and it varies \
             with what ran before: this is most of the run-to-run spread of scenario 1. It is \
             also why dd's first run is slow in some runs."
                .into(),
        );
    }
    ctx.report.profile.extend(lines);
    util::remove(&ctx.work.join("profiled"));
    Ok(())
}

// ---------------------------------------------------------------- scenario 6: resume

pub fn s6_resume(ctx: &mut Ctx) -> Result<()> {
    let size: u64 = if ctx.quick { 512 * MIB } else { 2 << 30 };
    let window: u64 = 128 * MIB; // the agent's --window default
    let src = source(ctx, "src-2g.img", size, 1)?;
    let (mut resent, mut ratio, mut walls, mut at_kill) = (vec![], vec![], vec![], vec![]);
    let (mut detect, mut resyncs, mut server_again) = (vec![], 0, vec![]);
    let mut all_identical = true;
    let est = Duration::from_secs_f64(10.0 * size as f64 / GIB + 20.0);
    for i in 0..ctx.runs {
        if i > 0 && !ctx.fits(est + Duration::from_secs(480)) {
            ctx.report
                .note("6", format!("stopped after {i} run(s) (time budget)"));
            break;
        }
        let dir = ctx.fresh_dir("s6")?;
        let data = dir.join("var");
        let token = slipway::token(&ctx.bins, &data, "bench")?;
        let mut server = Server::start(&ctx.bins, &data, "127.0.0.1:0", None, None)?;
        let log = dir.join("agent.log");
        let listen = server.listen.clone();
        let fp = server.fingerprint.clone();
        let spec = AgentSpec {
            server: &listen,
            fingerprint: &fp,
            source: "bench",
            token: &token,
            disks: vec![format!("{}:disk0", src.display())],
            extra: vec![],
            log: log.clone(),
            netns: None,
        };
        record_agent(ctx, "6", &spec, &server);
        let t = Instant::now();
        let mut agent = start_agent(&ctx.bins, &spec)?;
        let half = size as f64 / 2.0;
        let mut durable = 0.0;
        let mut received1 = 0.0;
        let reached = util::poll(Duration::from_secs(300), Duration::from_millis(20), || {
            let m = server.scrape()?;
            durable = m.sum("slipway_disk_durable_bytes_total");
            received1 = m.sum("slipway_disk_received_bytes_total");
            Ok(durable >= half)
        })?;
        if !reached {
            bail!("the sync did not reach half way within 300 s");
        }
        server.proc.kill(); // kill -9
        let killed_at = std::time::SystemTime::now();
        at_kill.push(durable / size as f64 * 100.0);
        let mut server = Server::start(&ctx.bins, &data, &listen, None, None)
            .context("restarting the server on the same port")?;
        let e = agent.wait(Duration::from_secs(600))?;
        let wall = t.elapsed().as_secs_f64();
        if !e.status.success() {
            bail!(
                "agent exited {} after the restart: {}",
                e.status,
                util::tail(&log, 10)
            );
        }
        let (sent, _acked) =
            agent_sent_acked(&log).ok_or_else(|| anyhow!("no summary line in the agent log"))?;
        let again = sent as f64 - size as f64;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(t) = text
            .lines()
            .find(|l| l.contains("connection failed"))
            .and_then(|l| log_time(l.split_whitespace().next()?))
        {
            let k = killed_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            detect.push(t - k);
        }
        if text.contains("resyncing instead") {
            resyncs += 1;
        }
        let received2 = server.scrape()?.sum("slipway_disk_received_bytes_total");
        let again_server = received1 + received2 - size as f64;
        server_again.push(again_server / MIB as f64);
        let same = util::same_content(&src, &server.volume("bench", "disk0"), size)?;
        all_identical &= same;
        server.stop();
        eprintln!(
            "   killed at {:.0}% durable; sent {} in all, {} again; {:.1} s",
            durable / size as f64 * 100.0,
            human(sent as f64),
            human(again),
            wall
        );
        resent.push(again / MIB as f64);
        ratio.push(again.max(again_server) / window as f64);
        walls.push(wall);
        keep_or_remove(&dir);
        util::sync_all();
    }
    let rep = &mut ctx.report;
    rep.target(
        "6",
        "resume after kill -9 of the server mid-sync: bytes sent again ÷ the agent's unacked window (128 MiB)",
        format!(
            "{} (agent: {} MiB, server: {} MiB)",
            fmt_stat(stat(&ratio), 2),
            fmt_stat(stat(&resent), 0),
            fmt_stat(stat(&server_again), 0)
        ),
        "≤ 1.0",
        verdict_le(stat(&ratio), 1.0, "see notes"),
    );
    rep.raw(
        "6",
        "bytes sent again, by the agent's `sent` total",
        stat(&resent),
        "MiB",
        1,
    );
    rep.raw(
        "6",
        "bytes received again, by the server's counters (both lives; first read ≤ 20 ms before the kill)",
        stat(&server_again),
        "MiB",
        1,
    );
    rep.raw("6", "durable share when killed", stat(&at_kill), "%", 0);
    rep.raw(
        "6",
        "time from the kill until the agent noticed (its `connection failed` log line)",
        stat(&detect),
        "s",
        1,
    );
    rep.note(
        "6",
        format!(
            "in {resyncs} of {} run(s) the agent logged \"the server offered a resume, resyncing \
             instead: the server's durable point is behind what it acknowledged before\" and \
             sent the whole disk again from offset 0.",
            walls.len()
        ),
    );
    rep.raw(
        "6",
        "whole sync with the kill and restart: wall",
        stat(&walls),
        "s",
        2,
    );
    rep.note(
        "6",
        format!(
            "{} random disk, default agent (window 128 MiB). The server is killed with \
             SIGKILL once slipway_disk_durable_bytes_total passes half the disk, and started \
             again at once on the same data dir and port; the same agent process reconnects \
             and resumes. Bytes sent again = the agent's own `sent` total (its summary line) minus the disk's non-zero bytes (all of it: random data), and from the server slipway_disk_received_bytes_total of its first life (last scrape before the kill: a lower bound) plus its second, minus the disk; the ratio takes the larger. Replica identical to \
             the source after every run: {}.",
            human(size as f64),
            if all_identical { "yes" } else { "**NO**" }
        ),
    );
    Ok(())
}

/// Seconds since the epoch of a log timestamp like `2026-11-23T02:54:45.470612Z`.
fn log_time(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86400.0 + h * 3600.0 + mi * 60.0 + sec)
}

// ---------------------------------------------------------------- scenario 3: many agents

struct ManyRun {
    wall: f64,
    server_hwm: u64,
    server_cpu: f64,
    agents_cpu: f64,
}

fn many_agents(ctx: &mut Ctx, n: usize, src: &Path, size: u64) -> Result<ManyRun> {
    let dir = ctx.fresh_dir(&format!("s3-{n}"))?;
    let result = (|| -> Result<ManyRun> {
        let data = dir.join("var");
        let tokens: Vec<String> = (0..n)
            .map(|i| slipway::token(&ctx.bins, &data, &format!("src{i:03}")))
            .collect::<Result<_>>()?;
        let mut server = Server::start(&ctx.bins, &data, "127.0.0.1:0", None, None)?;
        let listen = server.listen.clone();
        let fp = server.fingerprint.clone();
        let cpu0 = server.cpu()?;
        let t = Instant::now();
        let mut agents = Vec::with_capacity(n);
        for (i, tok) in tokens.iter().enumerate() {
            let source = format!("src{i:03}");
            let spec = AgentSpec {
                server: &listen,
                fingerprint: &fp,
                source: &source,
                token: tok,
                disks: vec![format!("{}:disk0", src.display())],
                extra: vec![],
                log: dir.join(format!("agent-{i:03}.log")),
                netns: None,
            };
            if i == 0 {
                record_agent(ctx, "3", &spec, &server);
            }
            agents.push(start_agent(&ctx.bins, &spec)?);
        }
        let mut agents_cpu = 0.0;
        let mut failed = vec![];
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut left: Vec<(usize, Proc)> = agents.into_iter().enumerate().collect();
        while !left.is_empty() {
            let mut still = vec![];
            for (i, mut p) in left {
                match p.try_wait()? {
                    Some(e) => {
                        agents_cpu += e.cpu;
                        if !e.status.success() {
                            failed.push(i);
                        }
                    }
                    None => still.push((i, p)),
                }
            }
            left = still;
            if Instant::now() > deadline {
                bail!("{} of {n} agents did not finish within 600 s", left.len());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let wall = t.elapsed().as_secs_f64();
        if let Some(&i) = failed.first() {
            bail!(
                "{} agents failed; agent {i}: {}",
                failed.len(),
                util::tail(&dir.join(format!("agent-{i:03}.log")), 5)
            );
        }
        let cpu1 = server.cpu()?;
        let hwm = util::proc_status_kb(server.pid(), "VmHWM")?;
        for i in [0, n - 1] {
            if !util::same_content(src, &server.volume(&format!("src{i:03}"), "disk0"), size)? {
                bail!("replica of src{i:03} differs from the source");
            }
        }
        server.stop();
        Ok(ManyRun {
            wall,
            server_hwm: hwm,
            server_cpu: cpu1 - cpu0,
            agents_cpu,
        })
    })();
    keep_or_remove(&dir);
    util::sync_all();
    result
}

pub fn s3_many_agents(ctx: &mut Ctx) -> Result<()> {
    let n = if ctx.quick { 20 } else { 100 };
    let small = 10;
    let size: u64 = if ctx.quick { 32 * MIB } else { 64 * MIB };
    let src = source(ctx, "src-64m.img", size, 3)?;
    let big: u64 = if ctx.quick { 512 * MIB } else { 2 << 30 };
    let src1 = source(ctx, "src-2g.img", big, 1)?;
    let (mut bound, mut of_bound): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    let (mut agg10, mut scpu10): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    let (mut agg, mut ratio, mut hwm, mut hwm10, mut per_agent, mut scpu, mut acpu) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let total = (n as u64 * size) as f64;
    for i in 0..ctx.runs {
        if i > 0 && !ctx.fits(Duration::from_secs(60 + 420)) {
            ctx.report
                .note("3", format!("stopped after {i} run(s) (time budget)"));
            break;
        }
        // The single-agent reference of this pair.
        let one = match slipway_sync(
            ctx,
            &src1,
            big,
            &SyncOpts {
                id: "3 (reference: scenario 1's single agent)",
                label: "s3ref",
                agent_extra: &[],
                check: false,
                profile: false,
                data_parent: None,
            },
        ) {
            Ok(x) => x,
            Err(e) => {
                let e = format!("{e:#}");
                let e = e.lines().take(3).collect::<Vec<_>>().join(" ");
                eprintln!("   run {} failed: {e}", i + 1);
                ctx.report.note(
                    "3",
                    format!(
                        "run {} failed and is left out: {}",
                        i + 1,
                        crate::one_paragraph(&e)
                    ),
                );
                continue;
            }
        };
        let r1 = big as f64 / one.wall;
        let (m, m10) = match many_agents(ctx, n, &src, size)
            .and_then(|m| Ok((m, many_agents(ctx, small, &src, size)?)))
        {
            Ok(x) => x,
            Err(e) => {
                eprintln!("   run {} failed: {e:#}", i + 1);
                ctx.report.note(
                    "3",
                    format!(
                        "run {} failed and is left out: {}",
                        i + 1,
                        crate::one_paragraph(&format!("{e:#}"))
                    ),
                );
                continue;
            }
        };
        let rate = total / m.wall;
        eprintln!(
            "   {n} agents: {:.2} s ({:.0} MB/s vs {:.0} single), server HWM {} ({} with {small})",
            m.wall,
            rate / 1e6,
            r1 / 1e6,
            human(m.server_hwm as f64),
            human(m10.server_hwm as f64)
        );
        agg.push(rate / 1e6);
        ratio.push(rate / r1 * 100.0);
        hwm.push(m.server_hwm as f64 / MIB as f64);
        hwm10.push(m10.server_hwm as f64 / MIB as f64);
        let total10 = (small as u64 * size) as f64;
        agg10.push(total10 / m10.wall / 1e6);
        scpu10.push(m10.server_cpu / (total10 / GIB));
        per_agent
            .push((m.server_hwm as f64 - m10.server_hwm as f64) / (n - small) as f64 / MIB as f64);
        scpu.push(m.server_cpu / (total / GIB));
        acpu.push(m.agents_cpu / (total / GIB));
        // The rate the machine's cores allow at the CPU per GiB both sides spent (they share
        // the cores): what the agents and the server cost together bounds the aggregate rate.
        let cores = std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(1) as f64;
        let cpu_bound = cores * GIB / ((m.server_cpu + m.agents_cpu) / (total / GIB));
        bound.push(cpu_bound / 1e6);
        of_bound.push(rate / cpu_bound * 100.0);
    }
    let rep = &mut ctx.report;
    rep.target(
        "3",
        &format!("{n} agents × 1 disk of {} at once: aggregate rate ÷ one agent's (scenario 1, same run)", human(size as f64)),
        format!("{}%", fmt_stat(stat(&ratio), 0)),
        "≥ 90%",
        verdict_ge(stat(&ratio.iter().map(|x| x / 100.0).collect::<Vec<_>>()), 0.9, "see notes"),
    );
    rep.target(
        "3",
        &format!("same: server peak RSS (VmHWM) with {n} agents"),
        format!(
            "{} MiB ({small} agents: {} MiB; {} MiB per extra agent)",
            fmt_stat(stat(&hwm), 0),
            fmt_stat(stat(&hwm10), 0),
            fmt_stat(stat(&per_agent), 2)
        ),
        "≤ 512 MiB, flat per agent",
        verdict_le(stat(&hwm), 512.0, "memory"),
    );
    rep.target(
        "3",
        &format!("same: the {n} agents' rate ÷ the rate the cores allow at the CPU per GiB both sides spent (cores ÷ (server + agents CPU-s/GiB))"),
        format!(
            "{}% (bound {} MB/s)",
            fmt_stat(stat(&of_bound), 0),
            fmt_stat(stat(&bound), 0)
        ),
        "reported (why the ratio above is what it is)",
        "—".into(),
    );
    rep.raw(
        "3",
        &format!("{n} agents: aggregate rate"),
        stat(&agg),
        "MB/s",
        0,
    );
    rep.raw(
        "3",
        &format!("{n} agents: server peak RSS"),
        stat(&hwm),
        "MiB",
        0,
    );
    rep.raw(
        "3",
        &format!("{small} agents: server peak RSS"),
        stat(&hwm10),
        "MiB",
        0,
    );
    rep.raw(
        "3",
        &format!("{n} agents: server CPU per GiB"),
        stat(&scpu),
        "CPU-s/GiB",
        2,
    );
    rep.raw(
        "3",
        &format!("{n} agents: all agents' CPU per GiB"),
        stat(&acpu),
        "CPU-s/GiB",
        2,
    );
    rep.raw(
        "3",
        &format!("{small} agents: aggregate rate"),
        stat(&agg10),
        "MB/s",
        0,
    );
    rep.raw(
        "3",
        &format!("{small} agents: server CPU per GiB"),
        stat(&scpu10),
        "CPU-s/GiB",
        2,
    );
    // The curve's last point: 200 real agents, once (each agent process holds its disk's
    // window, ~64 MiB here, so 200 of them need about 13 GiB of memory).
    let most = 2 * n;
    if !ctx.quick && ctx.fits(Duration::from_secs(240)) {
        match many_agents(ctx, most, &src, size) {
            Ok(m) => {
                let t = (most as u64 * size) as f64;
                eprintln!(
                    "   {most} agents: {:.2} s ({:.0} MB/s), server HWM {}",
                    m.wall,
                    t / m.wall / 1e6,
                    human(m.server_hwm as f64)
                );
                let rep = &mut ctx.report;
                rep.raw(
                    "3",
                    &format!("{most} agents (one run): aggregate rate"),
                    stat(&[t / m.wall / 1e6]),
                    "MB/s",
                    0,
                );
                rep.raw(
                    "3",
                    &format!("{most} agents: server CPU per GiB"),
                    stat(&[m.server_cpu / (t / GIB)]),
                    "CPU-s/GiB",
                    2,
                );
                rep.raw(
                    "3",
                    &format!("{most} agents: all agents' CPU per GiB"),
                    stat(&[m.agents_cpu / (t / GIB)]),
                    "CPU-s/GiB",
                    2,
                );
                rep.raw(
                    "3",
                    &format!("{most} agents: server peak RSS"),
                    stat(&[m.server_hwm as f64 / MIB as f64]),
                    "MiB",
                    0,
                );
            }
            Err(e) => ctx.report.note(
                "3",
                format!(
                    "the {most}-agent run failed: {}",
                    crate::one_paragraph(&format!("{e:#}"))
                ),
            ),
        }
    }
    let rep = &mut ctx.report;
    rep.note(
        "3",
        format!(
            "{n} agent processes, each its own source id and token, started together, each \
             replicating the same {} random file (so their reads share the page cache; the \
             server still writes {n} separate volumes, {} in all). Wall = from the first spawn \
             to the last exit. Each run pairs it with a fresh single-agent sync of scenario 1's \
             {} disk; the ratio is computed within the pair. Peak RSS is the server's VmHWM; \
             a {small}-agent run in the same pair gives the per-agent slope. One run of {} \
             agents after the pairs completes the curve (1, {small}, {n}, {}). Agents and server \
             share the machine's {} cores.",
            human(size as f64),
            human(total),
            human(big as f64),
            2 * n,
            2 * n,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        ),
    );
    Ok(())
}

/// One load-generator run: `n` connections of `per` bytes each against a fresh server.
struct LoadPoint {
    rate: f64,
    cpu_per_gib: f64,
    hwm_mib: f64,
}

fn load_point(ctx: &mut Ctx, n: usize, per: u64) -> Result<LoadPoint> {
    let dir = ctx.fresh_dir(&format!("s3-loadgen-{n}"))?;
    let result = (|| -> Result<LoadPoint> {
        let data = dir.join("var");
        let mut lines = String::new();
        for i in 0..n {
            let source = format!("lg{i:03}");
            let tok = slipway::token(&ctx.bins, &data, &source)?;
            lines.push_str(&format!("{source} {tok}\n"));
        }
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, lines)?;
        let mut server = Server::start(&ctx.bins, &data, "127.0.0.1:0", None, None)?;
        let cpu0 = server.cpu()?;
        let out = util::run_out(
            Command::new(&ctx.self_exe)
                .arg("loadgen")
                .args(["--server", &server.listen])
                .args(["--fingerprint", &server.fingerprint])
                .arg("--tokens")
                .arg(&tokens)
                .args(["--size", &per.to_string()]),
        )?;
        let cpu = server.cpu()? - cpu0;
        let hwm = util::proc_status_kb(server.pid(), "VmHWM")? as f64 / MIB as f64;
        server.stop();
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or(""))
            .with_context(|| format!("loadgen said {out:?}"))?;
        let bytes = v["bytes"].as_f64().unwrap_or(0.0);
        let wall = v["wall_s"].as_f64().unwrap_or(f64::NAN);
        if bytes != (n as u64 * per) as f64 {
            bail!("loadgen wrote {bytes} bytes, not {}", n as u64 * per);
        }
        Ok(LoadPoint {
            rate: bytes / wall,
            cpu_per_gib: cpu / (bytes / GIB),
            hwm_mib: hwm,
        })
    })();
    util::remove(&dir);
    result
}

/// The server's own cost per connection, measured with the load generator (`slipway-bench
/// loadgen`: many connections in one cheap process) at 1, 10, 100 and 200 connections: the
/// curve of rate, CPU per GiB and peak RSS, and the two ratios issue 13 sets targets for.
pub fn loadgen_curve(ctx: &mut Ctx) -> Result<()> {
    let per: u64 = if ctx.quick { 8 * MIB } else { 32 * MIB };
    let points: &[usize] = if ctx.quick {
        &[1, 10, 50]
    } else {
        &[1, 10, 100, 200]
    };
    let big = if ctx.quick { 50 } else { 100 };
    // The one connection writes as much as the `big` connections together: the ratio then
    // compares the same bytes through the same page cache, not 1 GiB with 3200 MiB.
    let one_size = big as u64 * per;
    // Per point, one LoadPoint per run; the ratios are taken within a run (1, 10, then
    // `big`: one fresh server each, in the same minute), then their median.
    let mut rows: Vec<(usize, u64, Vec<LoadPoint>)> = points
        .iter()
        .map(|&n| (n, if n == 1 { one_size } else { per }, vec![]))
        .collect();
    let mut ratios: Vec<(f64, f64)> = vec![];
    'runs: for run in 0..ctx.runs {
        let mut this_run: Vec<(usize, f64, f64)> = vec![];
        for (n, size, got) in rows.iter_mut() {
            let n = *n;
            if !ctx.fits(Duration::from_secs(60)) {
                ctx.report.note(
                    "3",
                    format!(
                        "load generator: run {} stopped before {n} connections (time budget)",
                        run + 1
                    ),
                );
                break 'runs;
            }
            match load_point(ctx, n, *size) {
                Ok(p) => {
                    eprintln!(
                        "   loadgen {n:>3} connections × {}: {:.0} MB/s, server {:.2} CPU-s/GiB, HWM {:.0} MiB",
                        human(*size as f64),
                        p.rate / 1e6,
                        p.cpu_per_gib,
                        p.hwm_mib
                    );
                    this_run.push((n, p.rate, p.cpu_per_gib));
                    got.push(p);
                }
                Err(e) => {
                    eprintln!("   loadgen {n} failed: {e:#}");
                    ctx.report.note(
                        "3",
                        format!(
                            "load generator at {n} connections failed: {}",
                            crate::one_paragraph(&format!("{e:#}"))
                        ),
                    );
                }
            }
        }
        let at = |n: usize| this_run.iter().find(|r| r.0 == n);
        if let (Some(one), Some(many)) = (at(1), at(big)) {
            ratios.push((many.1 / one.1, many.2 / one.2));
        }
    }
    let rep = &mut ctx.report;
    for (n, size, got) in &rows {
        if got.is_empty() {
            continue;
        }
        let col = |f: fn(&LoadPoint) -> f64| got.iter().map(f).collect::<Vec<_>>();
        rep.raw(
            "3",
            &format!(
                "loadgen {n} connections × {}: aggregate rate",
                human(*size as f64)
            ),
            stat(&col(|p| p.rate / 1e6)),
            "MB/s",
            0,
        );
        rep.raw(
            "3",
            &format!("loadgen {n} connections: server CPU per GiB"),
            stat(&col(|p| p.cpu_per_gib)),
            "CPU-s/GiB",
            2,
        );
        rep.raw(
            "3",
            &format!("loadgen {n} connections: server peak RSS"),
            stat(&col(|p| p.hwm_mib)),
            "MiB",
            0,
        );
    }
    if !ratios.is_empty() {
        let rate = stat(&ratios.iter().map(|r| r.0).collect::<Vec<_>>());
        let cpu = stat(&ratios.iter().map(|r| r.1).collect::<Vec<_>>());
        let cpu_of = |n: usize| {
            rows.iter()
                .find(|r| r.0 == n)
                .map(|r| {
                    fmt_stat(
                        stat(&r.2.iter().map(|p| p.cpu_per_gib).collect::<Vec<_>>()),
                        2,
                    )
                })
                .unwrap_or_default()
        };
        rep.target(
            "3",
            &format!(
                "load generator: {big} connections' aggregate rate ÷ one connection's (same bytes, same run)"
            ),
            format!(
                "{}%",
                fmt_stat(
                    stat(&ratios.iter().map(|r| r.0 * 100.0).collect::<Vec<_>>()),
                    0
                )
            ),
            "≥ 90%",
            verdict_ge(rate, 0.9, "see notes"),
        );
        rep.target(
            "3",
            &format!("load generator: server CPU-s per GiB at {big} connections ÷ at one"),
            format!(
                "{}× (CPU-s/GiB: {big} connections {}, one {})",
                fmt_stat(cpu, 2),
                cpu_of(big),
                cpu_of(1)
            ),
            "≤ 1.3×",
            verdict_le(cpu, 1.3, "see notes"),
        );
    }
    rep.note(
        "3",
        format!(
            "Load generator: `slipway-bench loadgen` opens every connection from one process \
             (one QUIC endpoint, 2 runtime threads), each with its own source id and token, \
             opens one fresh disk and sends {} (one connection: {}, as much as {big} together) \
             of 1 MiB writes of one shared incompressible payload, at most 64 MiB unacked, and \
             waits for the last ack; its own CPU is a small fraction of the server's. Wall = \
             first connection to last ack; server CPU = utime+stime over the same span; a fresh \
             server per point; the points run in order 1, 10, {big}, … in each of {} run(s), \
             and each ratio is taken within a run.",
            human(per as f64),
            human(one_size as f64),
            ctx.runs
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------- scenario 4: continuous

pub fn s4_continuous(ctx: &mut Ctx) -> Result<()> {
    let agents = 10;
    let rate = 20_000.0;
    let size: u64 = 16 * MIB;
    let rescan = "100ms";
    let window_s = if ctx.quick { 5.0 } else { 10.0 };
    let dir = ctx.fresh_dir("s4")?;
    let result = (|| -> Result<()> {
        let data = dir.join("var");
        let files: Vec<PathBuf> = (0..agents)
            .map(|i| {
                let p = dir.join(format!("disk{i}.img"));
                util::make_random_file(&p, size, 40 + i as u64).map(|_| p)
            })
            .collect::<Result<_>>()?;
        let tokens: Vec<String> = (0..agents)
            .map(|i| slipway::token(&ctx.bins, &data, &format!("c{i}")))
            .collect::<Result<_>>()?;
        let mut server = Server::start(&ctx.bins, &data, "127.0.0.1:0", None, None)?;
        let listen = server.listen.clone();
        let fp = server.fingerprint.clone();
        let mut procs = vec![];
        for i in 0..agents {
            let source = format!("c{i}");
            let spec = AgentSpec {
                server: &listen,
                fingerprint: &fp,
                source: &source,
                token: &tokens[i],
                disks: vec![format!("{}:disk0", files[i].display())],
                extra: [
                    "--follow",
                    "--rescan-interval",
                    rescan,
                    "--chunk-size",
                    "4KiB",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
                log: dir.join(format!("agent-{i}.log")),
                netns: None,
            };
            if i == 0 {
                record_agent(ctx, "4", &spec, &server);
            }
            procs.push(start_agent(&ctx.bins, &spec)?);
        }
        let ok = util::poll(Duration::from_secs(180), Duration::from_millis(200), || {
            let st = server.disk_states()?;
            Ok(st.len() == agents && st.iter().all(|s| s == "continuous"))
        })?;
        if !ok {
            bail!(
                "the {agents} disks did not all become continuous: {:?}",
                server.disk_states()?
            );
        }
        let wl = Workload::start(files.clone(), size, rate, 99)?;
        let wl_started = Instant::now();
        std::thread::sleep(Duration::from_secs(2)); // warm-up
        let (mut p50, mut p99, mut le5, mut per_write, mut per_wl_write, mut wrate, mut recv_rate) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut scpu, mut acpu, mut f50, mut f99) = (vec![], vec![], vec![], vec![]);
        let wl_at = |t: Instant| (t.duration_since(wl_started).as_secs_f64() * rate).min(f64::MAX);
        for w in 0..ctx.runs {
            let a = server.scrape()?;
            let cpu_a = server.cpu()?;
            let acpu_a: f64 = procs
                .iter()
                .filter_map(|p| util::proc_cpu(p.pid()).ok())
                .sum();
            let ta = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(window_s));
            let b = server.scrape()?;
            let tb = Instant::now();
            let secs = tb.duration_since(ta).as_secs_f64();
            scpu.push((server.cpu()? - cpu_a) / secs * 100.0);
            acpu.push(
                (procs
                    .iter()
                    .filter_map(|p| util::proc_cpu(p.pid()).ok())
                    .sum::<f64>()
                    - acpu_a)
                    / secs
                    * 100.0,
            );
            let fh = util::bucket_delta(
                &a.buckets("slipway_store_flush_seconds"),
                &b.buckets("slipway_store_flush_seconds"),
            );
            f50.extend(util::bucket_quantile(&fh, 0.5).map(|x| x * 1000.0));
            f99.extend(util::bucket_quantile(&fh, 0.99).map(|x| x * 1000.0));
            let h = util::bucket_delta(
                &a.buckets("slipway_ack_latency_seconds"),
                &b.buckets("slipway_ack_latency_seconds"),
            );
            let writes = b.sum("slipway_disk_received_writes_total")
                - a.sum("slipway_disk_received_writes_total");
            let syncs =
                b.sum("slipway_store_fdatasyncs_total") - a.sum("slipway_store_fdatasyncs_total");
            let wl_writes = wl_at(tb) - wl_at(ta);
            let q50 = util::bucket_quantile(&h, 0.5).map(|x| x * 1000.0);
            let q99 = util::bucket_quantile(&h, 0.99).map(|x| x * 1000.0);
            eprintln!(
                "   window {}: {:.0} writes/s received, p50 {:?} ms, p99 {:?} ms, {:.4} fdatasyncs/write",
                w + 1,
                writes / secs,
                q50,
                q99,
                syncs / writes.max(1.0)
            );
            p50.extend(q50);
            p99.extend(q99);
            le5.extend(util::bucket_share_le(&h, 0.005).map(|x| x * 100.0));
            per_write.push(syncs / writes.max(1.0));
            per_wl_write.push(syncs / wl_writes.max(1.0));
            wrate.push(wl_writes / secs);
            recv_rate.push(writes / secs);
        }
        let made = wl.stop()?;
        // The disk's own floor: fio, 10 jobs of 4 KiB random writes each followed by an
        // fdatasync (no group commit at all), on the same filesystem.
        let fio_lat = fio_sync_latency(ctx, &dir, agents, 1)?;
        // And at the group size Slipway's flushes had in this run (writes per fdatasync):
        // each of its fdatasyncs covers that many scattered 4 KiB writes of one file, so
        // this is the floor one of its flushes can reach on this disk.
        let group = stat(&per_write)
            .filter(|s| s.median > 0.0)
            .map(|s| (1.0 / s.median).round().max(1.0) as usize)
            .unwrap_or(1);
        // A failure here costs this row only, not the windows measured above.
        let fio_group = if group > 1 {
            fio_sync_latency(ctx, &dir, agents, group).unwrap_or_else(|e| {
                ctx.report.note(
                    "4",
                    format!(
                        "fio at Slipway's group size failed: {}",
                        crate::one_paragraph(&format!("{e:#}"))
                    ),
                );
                None
            })
        } else {
            None
        };
        let achieved = made as f64 / wl_started.elapsed().as_secs_f64();
        for p in &mut procs {
            p.stop(Duration::from_secs(10));
        }
        server.stop();
        let rep = &mut ctx.report;
        rep.target(
            "4",
            &format!("continuous: {agents} agents, 4 KiB random writes at {rate:.0}/s: durable-ack latency p50 / p99"),
            format!(
                "p50 {} ms, p99 {} ms ({}% ≤ 5 ms)",
                fmt_stat(stat(&p50), 2),
                fmt_stat(stat(&p99), 2),
                fmt_stat(stat(&le5), 1)
            ),
            "p99 ≤ 5 ms",
            verdict_le(stat(&p99), 5.0, "see notes"),
        );
        // Against the disk's own floor, measured in the same run (issue 13): an fdatasync
        // per write with no group commit.
        if let (Some((_, fio_p99, _)), Some(sp)) = (fio_lat, stat(&p99)) {
            let ratio = sp.median / fio_p99;
            rep.target(
                "4",
                "same: durable-ack p99 ÷ fio's fdatasync p99 (10 jobs × 4 KiB randwrite + fdatasync, same filesystem, same run)",
                format!("{ratio:.2}× ({:.2} ms ÷ {fio_p99:.2} ms)", sp.median),
                "≤ 2×",
                verdict_le(stat(&[ratio]), 2.0, "see notes"),
            );
        }
        if let (Some((_, g99, _)), Some(sp)) = (fio_group, stat(&p99)) {
            rep.target(
                "4",
                &format!(
                    "same: durable-ack p99 ÷ fio's fdatasync p99 at Slipway's group size (10 jobs × {group} × 4 KiB randwrite per fdatasync, same run)"
                ),
                format!("{:.2}× ({:.2} ms ÷ {g99:.2} ms)", sp.median / g99, sp.median),
                "reported (the floor of one group commit)",
                "—".into(),
            );
        }
        rep.target(
            "4",
            "same: fdatasyncs per write received (group commit)",
            format!(
                "{} (per workload write: {})",
                fmt_stat(stat(&per_write), 4),
                fmt_stat(stat(&per_wl_write), 4)
            ),
            "≤ 0.05",
            verdict_le(stat(&per_write), 0.05, "see notes"),
        );
        rep.raw(
            "4",
            "workload writes made (4 KiB, all files)",
            stat(&wrate),
            "writes/s",
            0,
        );
        rep.raw(
            "4",
            "write frames received by the server",
            stat(&recv_rate),
            "writes/s",
            0,
        );
        rep.raw("4", "durable-ack latency p50", stat(&p50), "ms", 2);
        rep.raw("4", "durable-ack latency p99", stat(&p99), "ms", 2);
        rep.raw("4", "acks within 5 ms", stat(&le5), "%", 1);
        rep.raw(
            "4",
            "fdatasyncs per received write",
            stat(&per_write),
            "",
            4,
        );
        if let Some((p50, p99, iops)) = fio_lat {
            rep.raw(
                "4",
                "disk floor, fio 10 jobs × (4 KiB randwrite + fdatasync): fdatasync p50",
                stat(&[p50]),
                "ms",
                2,
            );
            rep.raw("4", "disk floor, fio: fdatasync p99", stat(&[p99]), "ms", 2);
            rep.raw(
                "4",
                "disk floor, fio: writes (each fdatasync'd)",
                stat(&[iops]),
                "writes/s",
                0,
            );
        }
        if let Some((p50, p99, iops)) = fio_group {
            rep.raw(
                "4",
                &format!("disk floor at Slipway's group size, fio 10 jobs × ({group} × 4 KiB randwrite + fdatasync): fdatasync p50"),
                stat(&[p50]),
                "ms",
                2,
            );
            rep.raw("4", "same: fdatasync p99", stat(&[p99]), "ms", 2);
            rep.raw("4", "same: writes", stat(&[iops]), "writes/s", 0);
        }
        rep.raw(
            "4",
            "fdatasync duration p50 (slipway_store_flush_seconds)",
            stat(&f50),
            "ms",
            2,
        );
        rep.raw("4", "fdatasync duration p99", stat(&f99), "ms", 2);
        rep.raw(
            "4",
            "server CPU during the windows",
            stat(&scpu),
            "% of one core",
            0,
        );
        rep.raw(
            "4",
            "the 10 agents' CPU during the windows (rescans)",
            stat(&acpu),
            "% of one core",
            0,
        );
        rep.note(
            "4",
            format!(
                "{agents} agents with `--follow --rescan-interval {rescan} --chunk-size 4KiB`, \
                 one {} disk each. A generator thread in slipway-bench writes 4 KiB blocks of \
                 random bytes at random aligned offsets of the {agents} source files (pwrite, \
                 page cache, no sync) paced to {rate:.0} writes/s (achieved {achieved:.0}/s over \
                 the whole test). After 2 s of warm-up, {} windows of {window_s:.0} s each are \
                 measured as deltas of the server's /metrics: quantiles by linear interpolation \
                 inside the slipway_ack_latency_seconds buckets (1, 2.5, 5, 10 ms …), so they \
                 are approximate. **What the latency measures:** the reference agent has no \
                 write hook; it finds changes by rereading every {rescan} and then sends them \
                 in a burst, so this is the server-side time from receiving a write frame to \
                 the durable ack covering it (the server's part of the RPO). A change waits up \
                 to {rescan} plus a rescan before it even leaves the agent, which is not \
                 counted. The same block written twice between two rescans is sent once, so \
                 the server receives fewer writes than the workload makes.",
                human(size as f64),
                ctx.runs
            ),
        );
        Ok(())
    })();
    keep_or_remove(&dir);
    util::sync_all();
    result
}

/// fio: `jobs` jobs of 4 KiB random writes, an fdatasync after every `per_sync` of them, for
/// a few seconds. Returns (fdatasync p50 ms, p99 ms, writes/s).
fn fio_sync_latency(
    ctx: &mut Ctx,
    dir: &Path,
    jobs: usize,
    per_sync: usize,
) -> Result<Option<(f64, f64, f64)>> {
    let Some(fio) = ctx.tools.fio.clone() else {
        return Ok(None);
    };
    let mut c = Command::new(fio);
    c.args([
        "--name=synclat",
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=psync",
    ])
    .arg(format!("--fdatasync={}", per_sync.max(1)))
    .arg(format!("--directory={}", dir.display()))
    .args([
        "--size=16M",
        &format!("--numjobs={jobs}"),
        "--runtime=4",
        "--time_based",
    ])
    .args(["--group_reporting", "--output-format=json"])
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    let label = if per_sync <= 1 {
        "4 (disk floor)".to_string()
    } else {
        format!("4 (disk floor at Slipway's group size, {per_sync} writes per fdatasync)")
    };
    record(ctx, &label, &c);
    let out = util::run_out(&mut c)?;
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..])?;
    let job = &v["jobs"][0];
    let pct = |p: &str| {
        job["sync"]["lat_ns"]["percentile"][p]
            .as_f64()
            .map(|x| x / 1e6)
    };
    let iops = job["write"]["iops"].as_f64().unwrap_or(f64::NAN);
    Ok(match (pct("50.000000"), pct("99.000000")) {
        (Some(a), Some(b)) => Some((a, b, iops)),
        _ => None,
    })
}

// ---------------------------------------------------------------- scenario 5: restore points

pub fn s5_restore_points(ctx: &mut Ctx) -> Result<()> {
    let size: u64 = if ctx.quick { 512 * MIB } else { 4 << 30 };
    let src = source(ctx, "src-4g.img", size, 5)?;
    let block: u64 = 512 * 1024;
    let (mut full_ms, mut inc_ms, mut full_sz, mut inc_sz, mut full_pause, mut inc_pause) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut t_ratio, mut s_ratio, mut inc_cli) = (vec![], vec![], vec![]);
    let est = Duration::from_secs_f64(20.0 * size as f64 / GIB + 20.0);
    for i in 0..ctx.runs {
        if i > 0 && !ctx.fits(est + Duration::from_secs(180)) {
            ctx.report
                .note("5", format!("stopped after {i} run(s) (time budget)"));
            break;
        }
        let dir = ctx.fresh_dir("s5")?;
        let r = (|| -> Result<()> {
            let data = dir.join("var");
            let cfg = dir.join("slipway.toml");
            // One scheduled point a week: the scheduler takes the first (full) one as soon as
            // the disk is continuous and no more during the run.
            std::fs::write(&cfg, "[pit]\ntiers = [ { every = \"1w\", keep = 1 } ]\n")?;
            let token = slipway::token(&ctx.bins, &data, "bench")?;
            let mut server = Server::start(&ctx.bins, &data, "127.0.0.1:0", None, Some(&cfg))?;
            let spec = AgentSpec {
                server: &server.listen.clone(),
                fingerprint: &server.fingerprint.clone(),
                source: "bench",
                token: &token,
                disks: vec![format!("{}:disk0", src.display())],
                extra: ["--follow", "--rescan-interval", "1h"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                log: dir.join("agent.log"),
                netns: None,
            };
            record_agent(ctx, "5", &spec, &server);
            let mut agent = start_agent(&ctx.bins, &spec)?;
            let ok = util::poll(Duration::from_secs(300), Duration::from_millis(200), || {
                Ok(server.disk_states()? == ["continuous"])
            })?;
            if !ok {
                bail!(
                    "disk not continuous after 300 s: {:?}",
                    server.disk_states()?
                );
            }
            let create = |server: &Server| -> Result<(String, f64)> {
                let t = Instant::now();
                let id =
                    server.cli(&["restore-points", "create", "--source", "bench", "--wait"])?;
                Ok((id.trim().to_string(), t.elapsed().as_secs_f64()))
            };
            let (_id1, _) = create(&server)?;
            // The scheduler's first point may be queued behind ours (one restore point at a
            // time per source): let it land before changing the disk, so the next point is
            // the only one that sees the change.
            util::poll(Duration::from_secs(10), Duration::from_millis(100), || {
                Ok(server
                    .restore_points()?
                    .iter()
                    .any(|r| r["trigger"] == "scheduled"))
            })?;
            let list = server.restore_points()?;
            let full = list
                .iter()
                .find(|r| r["parent"].is_null())
                .ok_or_else(|| anyhow!("no full restore point"))?
                .clone();
            // Change 1% of the disk: 1% of its 512 KiB blocks, rewritten whole.
            let blocks = size / block;
            let n = (blocks / 100).max(1);
            let mut rng = rand::rngs::SmallRng::seed_from_u64(500 + i as u64);
            let f = std::fs::OpenOptions::new().write(true).open(&src)?;
            let mut buf = vec![0u8; block as usize];
            let mut chosen = std::collections::BTreeSet::new();
            while (chosen.len() as u64) < n {
                chosen.insert(rng.gen_range(0..blocks));
            }
            for b in &chosen {
                rng.fill_bytes(&mut buf);
                f.write_all_at(&buf, b * block)?;
            }
            drop(f);
            let (id2, cli2) = create(&server)?;
            let list = server.restore_points()?;
            let inc = list
                .iter()
                .find(|r| r["id"] == id2.as_str())
                .ok_or_else(|| anyhow!("restore point {id2} not listed"))?
                .clone();
            let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            eprintln!(
                "   full: {:.0} ms, {}, pause {} ms; incremental: {:.0} ms ({:.2} s by the CLI), {}, pause {} ms",
                num(&full, "duration_ms"),
                human(num(&full, "size_bytes")),
                num(&full, "pause_ms"),
                num(&inc, "duration_ms"),
                cli2,
                human(num(&inc, "size_bytes")),
                num(&inc, "pause_ms")
            );
            full_ms.push(num(&full, "duration_ms"));
            inc_ms.push(num(&inc, "duration_ms"));
            full_sz.push(num(&full, "size_bytes") / MIB as f64);
            inc_sz.push(num(&inc, "size_bytes") / MIB as f64);
            full_pause.push(num(&full, "pause_ms"));
            inc_pause.push(num(&inc, "pause_ms"));
            t_ratio.push(num(&inc, "duration_ms") / num(&full, "duration_ms") * 100.0);
            s_ratio.push(num(&inc, "size_bytes") / num(&full, "size_bytes") * 100.0);
            inc_cli.push(cli2);
            record(
                ctx,
                "5",
                Command::new(&ctx.bins.slipway)
                    .args([
                        "restore-points",
                        "create",
                        "--source",
                        "bench",
                        "--wait",
                        "--data-dir",
                    ])
                    .arg(&data),
            );
            record(
                ctx,
                "5",
                Command::new(&ctx.bins.slipway)
                    .args(["restore-points", "list", "--json", "--data-dir"])
                    .arg(&data),
            );
            agent.stop(Duration::from_secs(10));
            server.stop();
            Ok(())
        })();
        keep_or_remove(&dir);
        util::sync_all();
        r?;
    }
    let pause_all: Vec<f64> = full_pause.iter().chain(&inc_pause).copied().collect();
    let rep = &mut ctx.report;
    rep.target(
        "5",
        &format!(
            "restore point after 1% of a {} disk changed: time and bytes ÷ the first (full) one's",
            human(size as f64)
        ),
        format!(
            "time {}%, bytes {}%",
            fmt_stat(stat(&t_ratio), 1),
            fmt_stat(stat(&s_ratio), 2)
        ),
        "≤ 3%",
        {
            let t = verdict_le(stat(&t_ratio), 3.0, "time");
            let s = verdict_le(stat(&s_ratio), 3.0, "bytes");
            format!("time: {t}; bytes: {s}")
        },
    );
    rep.target(
        "5",
        "same: applier pause (pause_ms), full and incremental",
        format!(
            "full {} ms, incremental {} ms",
            fmt_stat(stat(&full_pause), 0),
            fmt_stat(stat(&inc_pause), 0)
        ),
        "≤ 50 ms",
        verdict_le(stat(&pause_all), 50.0, "pause"),
    );
    rep.raw(
        "5",
        "full restore point: duration_ms",
        stat(&full_ms),
        "ms",
        0,
    );
    rep.raw(
        "5",
        "full restore point: size_bytes",
        stat(&full_sz),
        "MiB",
        1,
    );
    rep.raw(
        "5",
        "incremental (1% changed): duration_ms",
        stat(&inc_ms),
        "ms",
        0,
    );
    rep.raw(
        "5",
        "incremental: `restore-points create --wait` wall",
        stat(&inc_cli),
        "s",
        2,
    );
    rep.raw("5", "incremental: size_bytes", stat(&inc_sz), "MiB", 2);
    rep.raw("5", "full: pause_ms", stat(&full_pause), "ms", 0);
    rep.raw("5", "incremental: pause_ms", stat(&inc_pause), "ms", 0);
    rep.note(
        "5",
        format!(
            "a {} random disk, agent `--follow --rescan-interval 1h` (no periodic rescans: \
             a restore point's marker makes the agent rescan first). PIT policy one point a \
             week, so the scheduler takes the first, full point as soon as the disk is \
             continuous (or `restore-points create` does, whichever is first) and nothing \
             else runs. Then 1% of the disk's 512 KiB blocks (chosen at random) are rewritten \
             whole in the source file and `restore-points create --wait` takes the next. \
             Times are the manifests' duration_ms (request to stored manifest, which includes \
             the agent's rescan of the whole disk before it can place the marker); sizes are \
             size_bytes; pauses pause_ms, from `restore-points list --json`.",
            human(size as f64)
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------- scenario 2: lossy WAN

const NS_PREFIX: &str = "slipway-bench-";

/// Deletes namespaces left by an earlier, interrupted run (their TUN devices go with them,
/// and the link emulator exits when its devices are gone).
pub fn cleanup_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(NS_PREFIX) {
            // Kill what still runs inside it (servers, qemu-nbd) before deleting it.
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: the pids of processes inside the namespace this tool made.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

struct Link {
    ns_a: String,
    ns_b: String,
    dev_a: String,
    dev_b: String,
    emu: Proc,
    stats: PathBuf,
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.ns_a, &self.ns_b] {
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: processes inside a namespace this run created.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        self.emu.stop(Duration::from_secs(3));
    }
}

const ADDR_A: &str = "10.254.77.1";
const ADDR_B: &str = "10.254.77.2";

fn link_up(ctx: &mut Ctx) -> Result<Link> {
    if !Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing: no TUN devices on this machine");
    }
    if ctx.tools.ip.is_none() {
        bail!("the `ip` tool is missing (Debian: iproute2)");
    }
    let pid = std::process::id();
    let ns_a = format!("{NS_PREFIX}a{pid}");
    let ns_b = format!("{NS_PREFIX}b{pid}");
    for ns in [&ns_a, &ns_b] {
        util::run_out(Command::new("ip").args(["netns", "add", ns]))
            .context("creating a network namespace (needs root)")?;
    }
    let stats = ctx.work.join("linkemu.stats");
    let mut c = Command::new(&ctx.self_exe);
    c.args(["linkemu", "--ns-a", &ns_a, "--ns-b", &ns_b])
        .args(["--addr-a", ADDR_A, "--addr-b", ADDR_B])
        .args([
            "--delay-ms",
            "20",
            "--loss",
            "0.005",
            "--rate-mbit",
            "1000",
            "--mtu",
            "1500",
        ])
        .args(["--max-seconds", "1200"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(File::create(&stats)?));
    record(ctx, "2 (link)", &c);
    let mut emu = Proc::spawn("linkemu", &mut c)?;
    let out = emu.child.stdout.take().unwrap();
    let mut link = Link {
        ns_a,
        ns_b,
        dev_a: String::new(),
        dev_b: String::new(),
        emu,
        stats,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if let Some(devs) = l.strip_prefix("ready ") {
                let _ = tx.send(devs.to_string());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(devs) => {
            let mut d = devs.split_whitespace();
            link.dev_a = d.next().unwrap_or_default().to_string();
            link.dev_b = d.next().unwrap_or_default().to_string();
        }
        Err(_) => bail!("link emulator not ready: {}", util::tail(&link.stats, 5)),
    }
    // The path works: one ping across it.
    util::run_out(Command::new("ip").args([
        "netns", "exec", &link.ns_a, "ping", "-c", "1", "-W", "2", ADDR_B,
    ]))
    .or_else(|_| {
        util::run_out(Command::new("ip").args([
            "netns", "exec", &link.ns_a, "ping", "-c", "1", "-W", "2", ADDR_B,
        ]))
    })
    .map_err(|e| anyhow!("no path across the emulated link: {e}"))
    .or_else(|e| {
        if util::which("ping").is_none() {
            Ok(String::new())
        } else {
            Err(e)
        }
    })?;
    Ok(link)
}

/// TCP congestion control for the link's route in one namespace (`ip route ... congctl`:
/// setting the namespace's sysctl is refused in this sandbox, a route attribute is not).
fn set_tcp_cc(ns: &str, dev: &str, addr: &str, cc: &str) -> Result<()> {
    util::run_out(Command::new("ip").args([
        "-n",
        ns,
        "route",
        "replace",
        "10.254.77.0/24",
        "dev",
        dev,
        "proto",
        "kernel",
        "scope",
        "link",
        "src",
        addr,
        "congctl",
        cc,
    ]))
    .map(|_| ())
}

/// Slipway across the link: server in namespace B, agent in A. Returns (bytes/s, cut).
fn wan_slipway(
    ctx: &mut Ctx,
    link: &Link,
    src: &Path,
    size: u64,
    cc: &str,
    cap: Duration,
) -> Result<(f64, bool, f64)> {
    let dir = ctx.fresh_dir("s2")?;
    let r = (|| -> Result<(f64, bool, f64)> {
        let data = dir.join("var");
        let token = slipway::token(&ctx.bins, &data, "wan")?;
        let mut server = Server::start(
            &ctx.bins,
            &data,
            &format!("{ADDR_B}:1500"),
            Some(&link.ns_b),
            None,
        )?;
        let log = dir.join("agent.log");
        let listen = server.listen.clone();
        let fp = server.fingerprint.clone();
        let spec = AgentSpec {
            server: &listen,
            fingerprint: &fp,
            source: "wan",
            token: &token,
            disks: vec![format!("{}:disk0", src.display())],
            extra: vec!["--congestion".into(), cc.into()],
            log: log.clone(),
            netns: Some(&link.ns_a),
        };
        record_agent(ctx, "2 (Slipway over QUIC)", &spec, &server);
        let t = Instant::now();
        let mut agent = start_agent(&ctx.bins, &spec)?;
        let (e, cut) = agent.wait_capped(cap)?;
        let wall = t.elapsed().as_secs_f64();
        let bytes = if cut {
            let st = server.status()?;
            st["sources"][0]["disks"][0]["replicated_bytes"]
                .as_f64()
                .unwrap_or(0.0)
        } else {
            if !e.status.success() {
                bail!("agent exited {}: {}", e.status, util::tail(&log, 10));
            }
            size as f64
        };
        server.stop();
        Ok((bytes / wall, cut, e.cpu))
    })();
    keep_or_remove(&dir);
    r
}

pub fn s2_lossy_wan(ctx: &mut Ctx) -> Result<()> {
    let size: u64 = if ctx.quick { 32 * MIB } else { 256 * MIB };
    let cap = Duration::from_secs(if ctx.quick { 15 } else { 20 });
    let src = source(ctx, "src-wan.img", size, 2)?;
    let link = match link_up(ctx) {
        Ok(l) => l,
        Err(e) => {
            ctx.report.target(
                "2",
                "lossy WAN (20 ms each way, 0.5% loss, 1 Gbit/s): Slipway over QUIC ÷ nbdcopy over TCP",
                "not measured".into(),
                "≥ 3×",
                format!("**cannot run here**: {e:#}"),
            );
            return Ok(());
        }
    };
    let host_cc = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .unwrap_or_default()
        .trim()
        .to_string();
    let tcp_ccs: Vec<String> = {
        let avail = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
            .unwrap_or_default();
        let mut v = vec!["cubic".to_string()];
        if avail.split_whitespace().any(|c| c == "bbr") {
            v.push("bbr".into());
        }
        v
    };
    let quic_ccs = ["cubic", "bbr"];
    let mut tcp: Vec<Vec<f64>> = vec![vec![]; tcp_ccs.len()];
    let mut quic: Vec<Vec<f64>> = vec![vec![]; quic_ccs.len()];
    let mut cuts: Vec<String> = vec![];
    let dst = ctx.work.join("wan-out.raw");
    // Ratios: best Slipway controller vs each TCP controller, per run.
    let mut ratio_vs: Vec<Vec<f64>> = vec![vec![]; tcp_ccs.len()];
    // Slipway's best of cubic/bbr per run, Mbit/s: against the link's 1000 (issue 13).
    let mut best_mbit: Vec<f64> = Vec::new();
    let mut sw_cpu = vec![];
    let per_run = cap.as_secs_f64() * (tcp_ccs.len() + quic_ccs.len()) as f64 + 20.0;
    for i in 0..ctx.runs {
        if !ctx.fits(Duration::from_secs_f64(per_run)) {
            ctx.report
                .note("2", format!("stopped after {i} run(s) (time budget)"));
            break;
        }
        let mut tcp_run = vec![];
        for (k, cc) in tcp_ccs.iter().enumerate() {
            set_tcp_cc(&link.ns_a, &link.dev_a, ADDR_A, cc)?;
            set_tcp_cc(&link.ns_b, &link.dev_b, ADDR_B, cc)?;
            let r = nbd_run(
                ctx,
                "2 (nbdcopy over TCP)",
                &src,
                size,
                &dst,
                Some(&link.ns_a),
                Some(&link.ns_b),
                ADDR_B,
                cap,
            )?;
            let bps = r.bytes / r.wall;
            if r.cut {
                cuts.push(format!(
                    "nbdcopy/TCP-{cc} run {} cut at {:.0} s",
                    i + 1,
                    cap.as_secs_f64()
                ));
            }
            eprintln!(
                "   nbdcopy TCP-{cc}: {:.1} Mbit/s{}",
                bps * 8.0 / 1e6,
                if r.cut { " (cut)" } else { "" }
            );
            tcp[k].push(bps * 8.0 / 1e6);
            tcp_run.push(bps);
        }
        let mut best: f64 = 0.0;
        for (k, cc) in quic_ccs.iter().enumerate() {
            let (bps, cut, cpu) = wan_slipway(ctx, &link, &src, size, cc, cap)?;
            if cut {
                cuts.push(format!(
                    "Slipway/{cc} run {} cut at {:.0} s",
                    i + 1,
                    cap.as_secs_f64()
                ));
            }
            eprintln!(
                "   slipway QUIC-{cc}: {:.1} Mbit/s{}",
                bps * 8.0 / 1e6,
                if cut { " (cut)" } else { "" }
            );
            quic[k].push(bps * 8.0 / 1e6);
            if *cc == "bbr" {
                sw_cpu.push(cpu / (size as f64 / GIB));
            }
            best = best.max(bps);
        }
        best_mbit.push(best * 8.0 / 1e6);
        for (k, t) in tcp_run.iter().enumerate() {
            ratio_vs[k].push(best / t);
        }
    }
    let stats_tail = util::tail(&link.stats, 2);
    drop(link);
    let rep = &mut ctx.report;
    // The target is the link (issue 13): 90% of 1 Gbit/s. Beside TCP the ratio is reported:
    // against BBR a 3× target is beyond what the link can carry.
    rep.target(
        "2",
        "lossy WAN (20 ms each way, 0.5% loss, 1 Gbit/s): Slipway over QUIC, best of cubic/bbr per run",
        format!("{} Mbit/s", fmt_stat(stat(&best_mbit), 0)),
        "≥ 900 Mbit/s (90% of the link)",
        verdict_ge(stat(&best_mbit), 900.0, "see notes"),
    );
    for (k, cc) in tcp_ccs.iter().enumerate() {
        rep.target(
            "2",
            &format!(
                "same: Slipway ÷ nbdcopy over TCP-{cc}{}",
                if *cc == host_cc {
                    " (this host's default)"
                } else {
                    ""
                }
            ),
            format!("{}×", fmt_stat(stat(&ratio_vs[k]), 2)),
            "reported (no target)",
            "—".to_string(),
        );
        rep.raw(
            "2",
            &format!("nbdcopy over TCP-{cc}: throughput"),
            stat(&tcp[k]),
            "Mbit/s",
            1,
        );
    }
    for (k, cc) in quic_ccs.iter().enumerate() {
        rep.raw(
            "2",
            &format!("Slipway over QUIC, agent --congestion {cc}: throughput"),
            stat(&quic[k]),
            "Mbit/s",
            1,
        );
    }
    rep.raw(
        "2",
        "agent CPU per GiB (bbr) across the link",
        stat(&sw_cpu),
        "CPU-s/GiB",
        2,
    );
    rep.note(
        "2",
        format!(
            "two network namespaces joined by `slipway-bench linkemu` (crates/bench/src/linkemu.rs): \
             a TUN device in each, this process forwarding between them with, per direction, \
             Bernoulli loss 0.5%, a token bucket at 1000 Mbit/s (16 KiB deep, 5 MB FIFO, tail \
             drop) and 20 ms delay (RTT 40 ms), MTU 1500. The same {} random file is copied \
             by nbdcopy --flush (namespace A) to qemu-nbd (namespace B) over TCP with the \
             kernel's cubic and bbr (set on the link's route with `ip route … congctl`), and by slipway-agent (A) \
             to slipway serve (B) with --congestion cubic and bbr. Each transfer is capped at \
             {:.0} s; a cut transfer counts the bytes it completed (for nbdcopy the bytes qemu-nbd wrote: wchar of its /proc/PID/io; for Slipway replicated_bytes) over the cap. {}Last emulator counters: `{}`.",
            human(size as f64),
            cap.as_secs_f64(),
            if cuts.is_empty() {
                String::new()
            } else {
                format!("Cut: {}. ", cuts.join("; "))
            },
            stats_tail.replace('\n', " ")
        ),
    );
    Ok(())
}
