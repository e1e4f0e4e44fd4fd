//! `slipway-bench`: the scenarios of issue 7, Slipway side by side with its peers (the disk's
//! own limit through `dd`/`fio`, and `nbdcopy` → `qemu-nbd` over TCP), in one run, written to
//! docs/benchmarks.md. `make bench` builds the release binaries and runs it.
//!
//! Subcommands used internally: `linkemu` (the userspace WAN emulator of scenario 2) and
//! `cleanup` (removes network namespaces a killed run left behind).

mod linkemu;
mod live;
mod loadgen;
mod pagereport;
mod report;
mod scenarios;
mod slipway;
mod util;
mod workload;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::report::Report;
use crate::slipway::Bins;

#[derive(Debug, Parser)]
#[command(
    name = "slipway-bench",
    about = "Slipway benchmarks side by side with dd and nbdcopy→qemu-nbd (issue 7)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    /// One run per figure and smaller sizes: to try it out (writes target/bench/benchmarks.md).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (repeatable): 1 2 3 4 5 6 7 8 profile loadgen (scenario 3's
    /// load-generator curve alone). 7 is derived from 1;
    /// 8 (a live source: loop device + ext4) needs root and is one pair whatever --runs says.
    #[arg(long = "scenario", value_name = "N")]
    scenarios: Vec<String>,
    /// Runs per figure (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Directory holding the `slipway` and `slipway-agent` binaries under test.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Scratch directory (source disks, volumes, peers' outputs); emptied at the end.
    #[arg(long, default_value = "target/bench-work")]
    work_dir: PathBuf,
    /// Where to write the report. Default: docs/benchmarks.md for a full run, else
    /// target/bench/benchmarks.md.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Time budget of the whole run in seconds; runs are cut (and the report says so) to
    /// stay inside it.
    #[arg(long, default_value_t = 19 * 60)]
    budget: u64,
    /// Also write the run's own sections (scenario 8's) into this markdown file (e.g.
    /// docs/benchmarks.md): each replaces the section of the same heading or is appended,
    /// the rest of the file is left as it is.
    #[arg(long, value_name = "FILE")]
    splice_into: Option<PathBuf>,
    /// A sentence about the conditions of this run (e.g. what else ran on the machine),
    /// printed at the top of the run's own sections.
    #[arg(long, value_name = "TEXT")]
    remark: Option<String>,
    /// Leave the virtual machine's free page reporting on (by default the run turns it off
    /// and restores it at the end: see crates/bench/src/pagereport.rs).
    #[arg(long)]
    keep_page_reporting: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// The userspace link emulator (two TUN devices in two namespaces).
    Linkemu(linkemu::LinkArgs),
    /// Delete network namespaces, mounts and loop devices left by an interrupted run.
    Cleanup,
    /// Many agent connections from one process, replaying pre-encoded writes (scenario 3).
    Loadgen(loadgen::LoadArgs),
}

/// Which peers and tools exist here.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    pub dd: Option<PathBuf>,
    pub fio: Option<PathBuf>,
    pub nbdcopy: Option<PathBuf>,
    pub qemu_nbd: Option<PathBuf>,
    pub perf: Option<PathBuf>,
    pub ip: Option<PathBuf>,
}

/// Everything a scenario needs.
pub struct Ctx {
    pub bins: Bins,
    pub work: PathBuf,
    pub quick: bool,
    pub runs: usize,
    pub started: Instant,
    pub deadline: Instant,
    pub tools: Tools,
    pub report: Report,
    pub self_exe: PathBuf,
    /// Median slipway rate of scenario 1 per run (bytes/s), for scenario 3's ratios.
    pub s1_rates: Vec<f64>,
    /// --remark: conditions of this run, for the sections of their own.
    pub remark: Option<String>,
}

impl Ctx {
    /// A fresh empty directory under the scratch dir.
    pub fn fresh_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.work.join(name);
        util::remove(&d);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Whether another step estimated at `est` still fits in the budget.
    pub fn fits(&self, est: Duration) -> bool {
        self.left() > est
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Sub::Loadgen(a)) => match loadgen::run(a) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadgen: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Some(Sub::Linkemu(a)) => match linkemu::run(a) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("linkemu: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Some(Sub::Cleanup) => {
            scenarios::cleanup_namespaces();
            live::cleanup_loops();
            std::process::ExitCode::SUCCESS
        }
        None => match bench(cli) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("slipway-bench: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

fn bench(cli: Cli) -> Result<()> {
    let bins = Bins {
        slipway: std::fs::canonicalize(cli.bin_dir.join("slipway"))
            .with_context(|| format!("no slipway binary in {}", cli.bin_dir.display()))?,
        agent: std::fs::canonicalize(cli.bin_dir.join("slipway-agent"))
            .with_context(|| format!("no slipway-agent binary in {}", cli.bin_dir.display()))?,
    };
    let all = ["1", "profile", "6", "3", "loadgen", "4", "5", "8", "2"];
    let mut want: Vec<String> = if cli.scenarios.is_empty() {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        cli.scenarios.clone()
    };
    for w in &mut want {
        if w == "7" {
            *w = "1".into();
        }
        if !all.contains(&w.as_str()) {
            bail!("unknown scenario {w}: expected one of 1 2 3 4 5 6 7 8 profile loadgen");
        }
    }
    let full = cli.scenarios.is_empty() && !cli.quick && cli.runs.unwrap_or(3) >= 3;
    let out = cli.out.clone().unwrap_or_else(|| {
        if full {
            PathBuf::from("docs/benchmarks.md")
        } else {
            PathBuf::from("target/bench/benchmarks.md")
        }
    });
    std::fs::create_dir_all(&cli.work_dir)?;
    let work = std::fs::canonicalize(&cli.work_dir)?;
    let started = Instant::now();
    let tools = Tools {
        dd: util::which("dd"),
        fio: util::which("fio"),
        nbdcopy: util::which("nbdcopy"),
        qemu_nbd: util::which("qemu-nbd"),
        perf: util::which("perf"),
        ip: util::which("ip"),
    };
    let mut ctx = Ctx {
        bins,
        work: work.clone(),
        quick: cli.quick,
        runs: cli.runs.unwrap_or(if cli.quick { 1 } else { 3 }).max(1),
        started,
        deadline: started + Duration::from_secs(cli.budget),
        tools,
        report: Report::default(),
        self_exe: std::env::current_exe()?,
        s1_rates: Vec::new(),
        remark: cli.remark.clone(),
    };
    scenarios::cleanup_namespaces();
    machine_info(&mut ctx);
    let (reporting, what) = pagereport::turn_off(cli.keep_page_reporting);
    eprintln!("slipway-bench: free page reporting {what}");
    ctx.report
        .machine
        .push(("free page reporting (virtio-balloon)".into(), what));
    ctx.report
        .machine
        .push(("load average at the start (1/5/15 min)".into(), loadavg()));
    eprintln!(
        "slipway-bench: scenarios {:?}, {} run(s) each{}, budget {} s, scratch {}",
        want,
        ctx.runs,
        if ctx.quick { ", quick sizes" } else { "" },
        cli.budget,
        work.display()
    );
    for s in all {
        if !want.iter().any(|w| w == s) {
            continue;
        }
        eprintln!(
            "== scenario {s} ({:.0} s elapsed, {:.0} s left)",
            ctx.started.elapsed().as_secs_f64(),
            ctx.left().as_secs_f64()
        );
        let r = match s {
            "1" => scenarios::s1_initial_sync(&mut ctx),
            "profile" => scenarios::profile(&mut ctx),
            "6" => scenarios::s6_resume(&mut ctx),
            "3" => scenarios::s3_many_agents(&mut ctx),
            "loadgen" => scenarios::loadgen_curve(&mut ctx),
            "4" => scenarios::s4_continuous(&mut ctx),
            "5" => scenarios::s5_restore_points(&mut ctx),
            "8" => live::s8_live_source(&mut ctx),
            "2" => scenarios::s2_lossy_wan(&mut ctx),
            _ => unreachable!(),
        };
        if let Err(e) = r {
            eprintln!("scenario {s} failed: {e:#}");
            ctx.report.note(
                &format!("scenario {s}"),
                format!("FAILED in this run: {}", one_paragraph(&format!("{e:#}"))),
            );
            let label = if s == "profile" {
                "profile".to_string()
            } else {
                s.to_string()
            };
            ctx.report.target(
                &label,
                "(scenario failed)",
                "—".into(),
                "—",
                format!("not measured: {}", first_line(&format!("{e:#}"))),
            );
        }
        scenarios::cleanup_namespaces();
    }
    let total = started.elapsed();
    if let Some(kib) = reporting.as_ref().and_then(|g| g.reported_since()) {
        ctx.report.machine.push((
            "memory reported to the host during the run".into(),
            format!("{kib} KiB"),
        ));
    }
    drop(reporting);
    ctx.report
        .machine
        .push(("load average at the end (1/5/15 min)".into(), loadavg()));
    ctx.report.header.push(format!(
        "This run: scenarios {}, {} run(s) per figure{}, {:.1} min in all (`make bench` must stay \
         under 20 min), {}.",
        want.join(", "),
        ctx.runs,
        if ctx.quick { ", **--quick sizes**" } else { "" },
        total.as_secs_f64() / 60.0,
        ctx.report
            .machine
            .iter()
            .find(|(k, _)| k == "slipway commit")
            .map(|(_, v)| format!("binaries built from {v}"))
            .unwrap_or_default()
    ));
    ctx.report.targets.sort_by_key(|r| order_key(&r.id));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut markdown = ctx.report.markdown();
    // Sections measured by tests rather than by this program ("## From the tests: …", e.g.
    // the AWS API budget of crates/aws/tests/aws/budget.rs) survive a rewrite.
    if let Ok(old) = std::fs::read_to_string(&out) {
        for kept in old
            .split("\n## ")
            .skip(1)
            .filter(|s| s.starts_with("From the tests: "))
        {
            markdown = format!("{}\n\n## {}\n", markdown.trim_end(), kept.trim_end());
        }
    }
    std::fs::write(&out, markdown)?;
    if let Some(doc) = &cli.splice_into {
        if ctx.report.sections.is_empty() {
            eprintln!(
                "slipway-bench: no section to write into {} (nothing measured)",
                doc.display()
            );
        } else {
            live::splice_sections(doc, &ctx.report.sections)?;
            eprintln!(
                "slipway-bench: wrote this run's sections into {}",
                doc.display()
            );
        }
    }
    if std::env::var_os("SLIPWAY_BENCH_KEEP").is_none() {
        util::remove(&work);
    }
    eprintln!(
        "slipway-bench: wrote {} in {:.1} min",
        out.display(),
        total.as_secs_f64() / 60.0
    );
    Ok(())
}

fn order_key(id: &str) -> (u32, String) {
    (
        id.chars().next().and_then(|c| c.to_digit(10)).unwrap_or(99),
        id.to_string(),
    )
}

/// An error as one markdown-safe paragraph of at most 600 characters.
fn one_paragraph(s: &str) -> String {
    let t: String = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ⏎ ")
        .replace('|', "\\|");
    if t.chars().count() > 600 {
        format!("{}…", t.chars().take(600).collect::<String>())
    } else {
        t
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(160).collect()
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn machine_info(ctx: &mut Ctx) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|x| x.1.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| format!("{:.1} GiB", k / 1024.0 / 1024.0))
        .unwrap_or_default();
    let fs = sh(
        "findmnt",
        &[
            "-n",
            "-o",
            "FSTYPE,SOURCE,OPTIONS",
            "-T",
            ctx.work.to_str().unwrap_or("."),
        ],
    );
    let commit = {
        let h = sh("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            format!("{h} (+ uncommitted changes in the work tree)")
        } else {
            h
        }
    };
    let m = &mut ctx.report.machine;
    m.push(("nproc".into(), sh("nproc", &[])));
    m.push((
        "CPU (/proc/cpuinfo)".into(),
        format!(
            "{model}; AES-NI {}, PCLMULQDQ {}, AVX2 {}",
            yes(has("aes")),
            yes(has("pclmulqdq")),
            yes(has("avx2"))
        ),
    ));
    m.push(("memory".into(), mem));
    m.push(("kernel".into(), sh("uname", &["-r"])));
    m.push((
        "filesystem of the scratch dir (volumes, peers' outputs)".into(),
        fs,
    ));
    m.push((
        "TCP congestion control (host default)".into(),
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .unwrap_or_default()
            .trim()
            .to_string(),
    ));
    m.push((
        "net.core.rmem_max / wmem_max".into(),
        format!(
            "{} / {}",
            std::fs::read_to_string("/proc/sys/net/core/rmem_max")
                .unwrap_or_default()
                .trim(),
            std::fs::read_to_string("/proc/sys/net/core/wmem_max")
                .unwrap_or_default()
                .trim()
        ),
    ));
    m.push((
        "running as".into(),
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            "root (SO_RCVBUFFORCE works; namespaces and TUN allowed)".into()
        } else {
            "not root".into()
        },
    ));
    let ver = |p: &Option<PathBuf>, arg: &str| -> String {
        match p {
            Some(p) => sh(p.to_str().unwrap_or(""), &[arg])
                .lines()
                .next()
                .unwrap_or("?")
                .to_string(),
            None => "missing".into(),
        }
    };
    m.push(("nbdcopy".into(), ver(&ctx.tools.nbdcopy, "--version")));
    m.push(("qemu-nbd".into(), ver(&ctx.tools.qemu_nbd, "--version")));
    m.push(("fio".into(), ver(&ctx.tools.fio, "--version")));
    m.push(("perf".into(), ver(&ctx.tools.perf, "--version")));
    m.push(("rustc".into(), sh("rustc", &["--version"])));
    m.push(("slipway commit".into(), commit));
    m.push((
        "binaries".into(),
        format!(
            "{} and {} (release profile)",
            rel(&ctx.bins.slipway),
            rel(&ctx.bins.agent)
        ),
    ));
}

/// /proc/loadavg's three averages: anything else running on the machine shows here.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ")
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn rel(p: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    p.strip_prefix(&cwd).unwrap_or(p).display().to_string()
}
