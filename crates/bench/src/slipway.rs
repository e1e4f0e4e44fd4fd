//! Driving the real `slipway` and `slipway-agent` binaries (as tests/e2e/support.rs does).

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::util::{self, Proc, Scrape};

/// Where the binaries under test are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub slipway: PathBuf,
    pub agent: PathBuf,
}

/// `ip netns exec NS` prefix (exec's the program: the pid stays that of the program).
pub fn command_in(netns: Option<&str>, prog: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(prog);
            c
        }
        None => Command::new(prog),
    }
}

pub struct Server {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub listen: String,
    pub metrics: Option<SocketAddr>,
    pub fingerprint: String,
    bins: Bins,
}

impl Server {
    /// Starts `slipway serve` and waits for its ready line.
    pub fn start(
        bins: &Bins,
        data_dir: &Path,
        listen: &str,
        netns: Option<&str>,
        config: Option<&Path>,
    ) -> Result<Server> {
        std::fs::create_dir_all(data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))?;
        let mut cmd = command_in(netns, &bins.slipway);
        cmd.arg("serve").arg("--data-dir").arg(data_dir).args([
            "--listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
        ]);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.env("RUST_LOG", "info,quinn=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut proc = Proc::spawn("slipway serve", &mut cmd)?;
        let out = proc.child.stdout.take().unwrap();
        let ready = match util::read_ready_line(out, Duration::from_secs(30)) {
            Ok(r) => r,
            Err(e) => {
                proc.kill();
                bail!(
                    "{e}: server log:\n{}",
                    util::tail(&data_dir.join("server.log"), 20)
                );
            }
        };
        let s = |k: &str| {
            ready[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("ready line lacks {k}: {ready}"))
        };
        Ok(Server {
            proc,
            data_dir: data_dir.to_owned(),
            listen: s("listen")?,
            metrics: if netns.is_none() {
                Some(s("metrics_listen")?.parse()?)
            } else {
                None
            },
            fingerprint: s("fingerprint")?,
            bins: bins.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn cpu(&self) -> Result<f64> {
        util::proc_cpu(self.pid())
    }

    pub fn scrape(&self) -> Result<Scrape> {
        let addr = self
            .metrics
            .ok_or_else(|| anyhow!("metrics are not reachable (server in a namespace)"))?;
        Ok(Scrape::parse(&util::http_get(addr, "/metrics")?))
    }

    /// `slipway <args> --data-dir D` → stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        util::run_out(
            Command::new(&self.bins.slipway)
                .args(args)
                .arg("--data-dir")
                .arg(&self.data_dir),
        )
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli(&["status", "--json"])?)?)
    }

    /// States of every disk known to the server.
    pub fn disk_states(&self) -> Result<Vec<String>> {
        let st = self.status()?;
        Ok(st["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["disks"].as_array().into_iter().flatten())
            .map(|d| d["state"].as_str().unwrap_or("").to_string())
            .collect())
    }

    pub fn restore_points(&self) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(&self.cli(&[
            "restore-points",
            "list",
            "--json",
        ])?)?)
    }

    pub fn volume(&self, source: &str, disk: &str) -> PathBuf {
        self.data_dir
            .join("volumes")
            .join(source)
            .join(format!("{disk}.raw"))
    }

    /// Clean shutdown (SIGTERM), then kill.
    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(10));
    }
}

/// Issues a token for `source` (the server need not run).
pub fn token(bins: &Bins, data_dir: &Path, source: &str) -> Result<String> {
    std::fs::create_dir_all(data_dir)?;
    Ok(util::run_out(
        Command::new(&bins.slipway)
            .args(["token", "issue", "--source-id", source, "--data-dir"])
            .arg(data_dir),
    )?
    .trim()
    .to_string())
}

pub struct AgentSpec<'a> {
    pub server: &'a str,
    pub fingerprint: &'a str,
    pub source: &'a str,
    pub token: &'a str,
    pub disks: Vec<String>,
    pub extra: Vec<String>,
    pub log: PathBuf,
    pub netns: Option<&'a str>,
}

pub fn start_agent(bins: &Bins, a: &AgentSpec) -> Result<Proc> {
    let mut cmd = command_in(a.netns, &bins.agent);
    cmd.arg("replicate")
        .args(["--server", a.server])
        .args(["--server-fingerprint", a.fingerprint])
        .args(["--source-id", a.source, "--token", a.token]);
    for d in &a.disks {
        cmd.arg("--disk").arg(d);
    }
    cmd.args(&a.extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            File::create(&a.log).with_context(|| format!("creating {}", a.log.display()))?,
        ));
    Proc::spawn("slipway-agent", &mut cmd)
}

/// "disk ID: sent N bytes, acked M bytes ..." summary lines of an agent log → (sent, acked).
pub fn agent_sent_acked(log: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.split(": sent ").nth(1) else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let sent: u64 = w.next()?.parse().ok()?;
        let acked: u64 = rest
            .split("acked ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let (s, a) = found.unwrap_or((0, 0));
        found = Some((s + sent, a + acked));
    }
    found
}
