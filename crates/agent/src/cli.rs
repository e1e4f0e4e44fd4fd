//! The `slipway-agent` command line.
//!
//! Only this layer uses `anyhow`, sets up logging and chooses exit codes; everything below it
//! returns typed errors, so the exit code is decided from what went wrong (permanent or not)
//! rather than from where.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use indicatif::MultiProgress;
use slipway_net::Congestion;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::agent_toml::{self, Layer, SettingsError};
use crate::config::{Config, LogFormat};
use crate::run::{replicate, AgentError, Outcome, Progress};

#[derive(Debug, Parser)]
#[command(
    name = "slipway-agent",
    version,
    about = "Slipway reference agent: replicates source disks to a Slipway replication server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup: the size of the replicate arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Replicate disks to a server: one full pass, or with --follow, continuously.
    Replicate(ReplicateArgs),
    /// Show what the running agent is doing (from its status file); exit code 3 if it is
    /// not running.
    Status(StatusArgs),
    /// Internal: guards a filesystem freeze from outside the agent, thawing the mount points
    /// if the agent goes away or the deadline passes (see `freeze::watchdog_main`).
    #[command(hide = true)]
    FreezeWatchdog {
        #[arg(long, value_name = "MS")]
        deadline_ms: u64,
        #[arg(value_name = "MOUNTPOINT", required = true)]
        mounts: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("trust").args(["server_ca", "server_fingerprint"])))]
struct ReplicateArgs {
    /// Read the settings from this TOML file (docs/agent.md); a flag given here overrides the
    /// file's key of the same name.
    #[arg(long, value_name = "FILE", env = "SLIPWAY_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Replication server, HOST:PORT (HOST a DNS name or an IP address).
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Trust the server certificate if it chains to a CA in this PEM file.
    #[arg(long, value_name = "FILE")]
    server_ca: Option<PathBuf>,
    /// Trust exactly the server certificate with this SHA-256 fingerprint (hex).
    #[arg(long, value_name = "SHA256HEX")]
    server_fingerprint: Option<String>,
    /// Name to check the certificate against (and send as SNI). Default: the host if it is
    /// a DNS name, else "localhost".
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Source server id this agent replicates as.
    #[arg(long, value_name = "ID")]
    source_id: Option<String>,
    /// Credential for the source id. Visible to other users in `ps` when given here: prefer
    /// --token-file or the SLIPWAY_TOKEN environment variable.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SLIPWAY_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// File holding the credential (its first line; keep it mode 0600).
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// A disk to replicate: a file or block device, optionally with its id (default: the
    /// file name). Repeat for more disks. Default: every local whole disk (/sys/block).
    #[arg(long = "disk", value_name = "PATH[:DISK_ID]")]
    disks: Vec<String>,
    /// Keep replicating: rescan the disks every --rescan-interval until SIGINT/SIGTERM.
    #[arg(long)]
    follow: bool,
    /// Time between follow-mode rescans [default: 10s].
    #[arg(long, value_name = "DURATION")]
    rescan_interval: Option<String>,
    /// Logical block size: a power of two from 512 to 65536 [default: 512].
    #[arg(long, value_name = "BYTES")]
    block_size: Option<String>,
    /// Read size and largest write (at most 4MiB) [default: 1MiB].
    #[arg(long, value_name = "SIZE")]
    chunk_size: Option<String>,
    /// Most unacknowledged data held in memory, all disks together [default: 128MiB].
    #[arg(long, value_name = "SIZE")]
    window: Option<String>,
    /// Do not offer LZ4 compression.
    #[arg(long)]
    no_compress: bool,
    /// With --follow: do not track writes in the kernel (tracefs); reread every disk each
    /// --rescan-interval instead. Tracking needs root and a block device; without them the
    /// agent rescans anyway and says why.
    #[arg(long)]
    no_track: bool,
    /// With --follow: do not freeze the filesystems mounted from the source disks while a
    /// consistency marker is placed (restore points are then crash-consistent only if the
    /// source is idle). Freezing needs root and block devices.
    #[arg(long)]
    no_freeze: bool,
    /// Longest a freeze may last; thawed after it whatever happens [default: 1s].
    #[arg(long, value_name = "DURATION")]
    max_freeze: Option<String>,
    /// Script run before each freeze (e.g. to flush a database); a failure skips the freeze.
    #[arg(long, value_name = "PATH")]
    freeze_pre_hook: Option<PathBuf>,
    /// Script run after each thaw, whatever happened.
    #[arg(long, value_name = "PATH")]
    freeze_post_hook: Option<PathBuf>,
    /// Largest UDP payload (path MTU discovery upper bound) [default: 6500].
    #[arg(long, value_name = "BYTES")]
    max_udp_payload: Option<u16>,
    /// Congestion controller. BBR keeps QUIC near the link rate on lossy long links, where
    /// Cubic collapses (docs/benchmarks.md, scenario 2) [default: bbr].
    #[arg(long, value_name = "ALGO", value_parser = parse_congestion)]
    congestion: Option<Congestion>,
    /// Most megabits per second of disk data sent, all disks together, so replication never
    /// saturates the source's uplink (0: no limit) [default: no limit].
    #[arg(long, value_name = "MBPS")]
    bandwidth_limit: Option<String>,
    /// Where to write the agent's status every few seconds, for `slipway-agent status`
    /// [default: /run/slipway-agent/status.json if that directory exists].
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// With --follow: on a clean stop (SIGTERM/SIGINT, everything acknowledged) save the run
    /// here, and on start resume a run saved here instead of resyncing every disk: only what
    /// changed while no agent ran is sent. Used once; a crash leaves nothing to resume.
    #[arg(long, value_name = "FILE")]
    state_file: Option<PathBuf>,
    /// Append "<disk_id> <seq> <offset> <len>" for every acknowledged write (for tests).
    #[arg(long, value_name = "FILE", hide = true)]
    ack_journal: Option<PathBuf>,
    /// Log line format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The status file the agent writes [default: status_file of --config or of
    /// /etc/slipway/agent.toml, else /run/slipway-agent/status.json].
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// Find the status file in this config file's `status_file`.
    #[arg(
        long,
        value_name = "FILE",
        env = "SLIPWAY_AGENT_CONFIG",
        conflicts_with = "status_file"
    )]
    config: Option<PathBuf>,
    /// Print the status as JSON (the file's content, with "running" and "liveness" added).
    #[arg(long)]
    json: bool,
}

fn parse_congestion(s: &str) -> Result<Congestion, String> {
    s.parse()
}

/// Entry point of the `slipway-agent` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::FreezeWatchdog {
            deadline_ms,
            mounts,
        } => crate::freeze::watchdog_main(Duration::from_millis(deadline_ms), &mounts),
        Command::Status(args) => status_cmd(args),
        Command::Replicate(args) => match replicate_cmd(args) {
            Ok(code) => code,
            Err(e) => {
                if let Some(a) = e.downcast_ref::<AgentError>() {
                    // Agent errors already say what caused them, in one sentence.
                    eprintln!("error: {a}");
                    ExitCode::from(a.exit_code())
                } else if let Some(s) = e.downcast_ref::<SettingsError>() {
                    // Settings: permanent, as a bad flag is (the unit does not restart on 2).
                    eprintln!("error: {s}");
                    ExitCode::from(2)
                } else {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        },
    }
}

/// The first line of a token file, trimmed. A file readable by others is refused: the
/// credential would be as public as on the command line.
fn read_token_file(p: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p)
        .map_err(|e| format!("{}: {e}", p.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: mode {:o} lets other users read the credential; chmod 600 it",
            p.display(),
            mode & 0o777
        ));
    }
    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// The command line as a settings layer (see `agent_toml`): a switch not given is "unset",
/// so the file's key applies.
fn cli_layer(args: ReplicateArgs) -> Layer {
    let set = |b: bool| b.then_some(true);
    Layer {
        server: args.server,
        server_ca: args.server_ca,
        server_fingerprint: args.server_fingerprint,
        server_name: args.server_name,
        source_id: args.source_id,
        token: args.token,
        token_file: args.token_file,
        disks: (!args.disks.is_empty()).then_some(args.disks),
        include: Vec::new(),
        exclude: Vec::new(),
        follow: set(args.follow),
        rescan_interval: args.rescan_interval,
        block_size: args.block_size,
        chunk_size: args.chunk_size,
        window: args.window,
        no_compress: set(args.no_compress),
        no_track: set(args.no_track),
        no_freeze: set(args.no_freeze),
        max_freeze: args.max_freeze,
        freeze_pre_hook: args.freeze_pre_hook,
        freeze_post_hook: args.freeze_post_hook,
        max_udp_payload: args.max_udp_payload,
        congestion: args.congestion,
        state_file: args.state_file,
        ack_journal: args.ack_journal,
        log_format: args.log_format.map(|f| match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }),
        bandwidth_limit: args.bandwidth_limit,
        status_file: args.status_file,
    }
}

/// The validated settings of `replicate`: the config file (if any) under the flags, the
/// credential read, the disks found.
fn settings(args: ReplicateArgs) -> Result<(Config, LogFormat), SettingsError> {
    let file = match &args.config {
        Some(p) => Some((Layer::load(p)?, p.display().to_string())),
        None => None,
    };
    let mut merged = agent_toml::merge(cli_layer(args), file)?;
    if merged.raw.status_file.is_none() {
        // The unit's runtime directory; a run by hand outside it writes no status.
        let p = crate::status::default_path();
        merged.raw.status_file = p.parent().is_some_and(Path::is_dir).then_some(p);
    }
    merged.finish(
        read_token_file,
        |inc, exc| crate::discover::local_disks(inc, exc).map_err(|e| e.to_string()),
        |p| p.exists(),
    )
}

fn replicate_cmd(args: ReplicateArgs) -> anyhow::Result<ExitCode> {
    let (cfg, format) = settings(args)?;
    let follow = cfg.follow;

    let terminal = std::io::stderr().is_terminal();
    let mp = terminal.then(MultiProgress::new);
    init_logging(format, terminal, mp.clone());
    let progress = match mp {
        Some(mp) => Progress::Bars(mp),
        None => Progress::Lines,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("slipway-agent")
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(replicate(cfg, progress));
    // Readers blocked on a full disk read are not worth waiting for.
    rt.shutdown_timeout(Duration::from_secs(1));
    let summary = result?;

    let mut err = std::io::stderr().lock();
    for d in &summary.disks {
        let _ = writeln!(err, "{d}");
    }
    Ok(match summary.outcome {
        Outcome::Complete => ExitCode::SUCCESS,
        Outcome::Stopped { .. } if follow => ExitCode::SUCCESS,
        Outcome::Stopped { complete: true, .. } => ExitCode::SUCCESS,
        Outcome::Stopped { .. } => {
            let _ = writeln!(err, "error: interrupted before every disk was replicated");
            ExitCode::from(1)
        }
    })
}

/// `slipway-agent status`: 0 when the agent runs, 3 when it does not (as `systemctl status`
/// for an inactive unit), 1 when the status file cannot be read.
fn status_cmd(args: StatusArgs) -> ExitCode {
    use crate::status::{self, Liveness};
    let path = match (&args.status_file, &args.config) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => match Layer::load(c) {
            Ok(l) => l.status_file.unwrap_or_else(status::default_path),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        // The agent's own config, if it names another status file.
        (None, None) => Some(Path::new(agent_toml::DEFAULT_CONFIG))
            .filter(|c| c.exists())
            .and_then(|c| Layer::load(c).ok())
            .and_then(|l| l.status_file)
            .unwrap_or_else(status::default_path),
    };
    let st = match status::read(&path) {
        Ok(st) => st,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"running": false, "liveness": "no status file", "status_file": path})
                );
            } else {
                println!(
                    "slipway-agent is not running: no status file at {} (it is written while \
                     the agent runs; see --status-file)",
                    path.display()
                );
            }
            return ExitCode::from(3);
        }
        Err(e) => {
            eprintln!("error: reading {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let now = status::now_ms();
    let live = status::liveness(&st, now, status::pid_alive(st.pid));
    let running = live == Liveness::Running;
    if args.json {
        let mut v = serde_json::to_value(&st).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("running".into(), running.into());
            o.insert(
                "liveness".into(),
                match &live {
                    Liveness::Running => "running",
                    Liveness::Gone { .. } => "pid gone",
                    Liveness::Stale { .. } => "stale",
                }
                .into(),
            );
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", status::render(&st, &live, now));
    }
    if running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

fn init_logging(format: LogFormat, terminal: bool, bars: Option<MultiProgress>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = BarAwareStderr(bars);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(terminal && format == LogFormat::Text);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Writes log lines to stderr; with progress bars on screen, it lifts them out of the way
/// for the line so logs and bars do not garble each other.
#[derive(Clone)]
struct BarAwareStderr(Option<MultiProgress>);

impl<'a> MakeWriter<'a> for BarAwareStderr {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine {
            buf: Vec::with_capacity(256),
            bars: self.0.clone(),
        }
    }
}

/// One log event, written out whole when dropped.
struct LogLine {
    buf: Vec<u8>,
    bars: Option<MultiProgress>,
}

impl std::io::Write for LogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let out = |buf: &[u8]| {
            let _ = std::io::stderr().lock().write_all(buf);
        };
        match &self.bars {
            Some(mp) => mp.suspend(|| out(&self.buf)),
            None => out(&self.buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("slipway-agent").chain(args.iter().copied()))
    }

    const BASE: &[&str] = &[
        "replicate",
        "--server",
        "127.0.0.1:7700",
        "--source-id",
        "web-01",
        "--token",
        "t",
        "--disk",
        "/dev/sda",
    ];

    fn replicate(args: &[&str]) -> ReplicateArgs {
        match parse(args).unwrap().command {
            Command::Replicate(r) => r,
            other => panic!("not replicate: {other:?}"),
        }
    }

    /// The settings of a command line with no config file and a disk that "exists".
    fn settle(r: ReplicateArgs) -> Result<Config, SettingsError> {
        agent_toml::merge(cli_layer(r), None)?
            .finish(
                read_token_file,
                |_, _| Ok(vec!["/dev/vda".into()]),
                |_| true,
            )
            .map(|(c, _)| c)
    }

    #[test]
    fn the_token_comes_from_exactly_one_place_and_a_token_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let no_token: Vec<&str> = BASE
            .iter()
            .copied()
            .filter(|a| *a != "--token" && *a != "t")
            .chain(["--server-ca", "/ca.pem"])
            .collect();
        if std::env::var_os("SLIPWAY_TOKEN").is_none() {
            let e = settle(replicate(&no_token)).unwrap_err().to_string();
            assert!(e.contains("no credential"), "{e}");
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "slw1.abc.def\n").unwrap();
        let path = p.to_str().unwrap();
        let mut both = BASE.to_vec();
        both.extend(["--server-ca", "/ca.pem", "--token-file", path]);
        assert!(parse(&both).is_err(), "--token and --token-file");
        let mut from_file = no_token.clone();
        from_file.extend(["--token-file", path]);
        let r = replicate(&from_file);
        assert_eq!(r.token, None);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(settle(r).unwrap().token, "slw1.abc.def");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = settle(replicate(&from_file)).unwrap_err().to_string();
        assert!(
            e.starts_with("--token-file") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "slw1.abc.def");
    }

    #[test]
    fn exactly_one_way_to_trust_the_server() {
        let fp = "ab".repeat(32);
        let mut a = BASE.to_vec();
        let e = settle(replicate(&a)).unwrap_err().to_string();
        assert!(
            e.contains("--server-ca") && e.contains("--server-fingerprint"),
            "{e}"
        );
        a.extend(["--server-fingerprint", &fp]);
        let r = replicate(&a);
        assert_eq!(r.server_fingerprint.as_deref(), Some(fp.as_str()));
        let c = settle(r).unwrap();
        assert_eq!(c.block_size, 512);
        assert_eq!(c.chunk_size, 1 << 20);
        assert_eq!(c.window, 128 << 20);
        assert_eq!(c.rescan_interval, Duration::from_secs(10));
        assert_eq!(c.max_freeze, Duration::from_secs(1));
        assert_eq!(c.max_udp_payload, 6500);
        assert_eq!(c.congestion, Congestion::Bbr);
        assert!(c.bandwidth.is_none());
        a.extend(["--server-ca", "/ca.pem"]);
        assert!(parse(&a).is_err(), "both given");
    }

    #[test]
    fn flags_parse() {
        let mut a = BASE.to_vec();
        a.extend([
            "--server-ca",
            "/ca.pem",
            "--disk",
            "/tmp/b.img:data",
            "--follow",
            "--congestion",
            "bbr",
            "--no-compress",
            "--log-format",
            "json",
            "--ack-journal",
            "/tmp/j",
            "--bandwidth-limit",
            "25",
            "--status-file",
            "/tmp/st.json",
        ]);
        let r = replicate(&a);
        assert_eq!(r.disks, vec!["/dev/sda", "/tmp/b.img:data"]);
        assert!(r.follow && r.no_compress);
        assert_eq!(r.congestion, Some(Congestion::Bbr));
        assert!(matches!(r.log_format, Some(LogFormatArg::Json)));
        assert_eq!(r.ack_journal, Some(PathBuf::from("/tmp/j")));
        let c = settle(r).unwrap();
        assert!((c.bandwidth.unwrap().mbps() - 25.0).abs() < 1e-9);
        assert_eq!(c.status_file, Some(PathBuf::from("/tmp/st.json")));
        let mut bad = BASE.to_vec();
        bad.extend(["--server-ca", "/ca.pem", "--congestion", "vegas"]);
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn a_config_file_fills_in_what_the_flags_leave_out() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("agent.toml");
        std::fs::write(
            &conf,
            format!(
                "server = \"replica:1500\"\nserver_fingerprint = \"{}\"\nsource_id = \"web-02\"\n\
                 disks = [\"/dev/vdb\"]\nfollow = true\nrescan_interval = \"3s\"\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        let conf = conf.to_str().unwrap();
        let r = replicate(&[
            "replicate",
            "--config",
            conf,
            "--token",
            "t",
            "--source-id",
            "cli-id",
        ]);
        let c = settings(r).unwrap().0;
        assert_eq!(c.source_id, "cli-id", "the flag wins");
        assert_eq!(c.server.host, "replica");
        assert!(c.follow);
        assert_eq!(c.rescan_interval, Duration::from_secs(3));
        assert_eq!(c.disks[0].id, "vdb");
        let r = replicate(&[
            "replicate",
            "--config",
            conf,
            "--token",
            "t",
            "--window",
            "1KiB",
        ]);
        let e = settings(r).unwrap_err().to_string();
        assert!(e.starts_with("--window"), "{e}");
        let r = replicate(&["replicate", "--config", "/nonexistent/agent.toml"]);
        let e = settings(r).unwrap_err().to_string();
        assert!(e.starts_with("config file /nonexistent/agent.toml:"), "{e}");
    }

    #[test]
    fn status_takes_its_file_from_a_flag_or_a_config() {
        let Command::Status(s) = parse(&["status", "--json", "--status-file", "/tmp/s.json"])
            .unwrap()
            .command
        else {
            panic!("not status")
        };
        assert!(s.json);
        assert_eq!(s.status_file, Some(PathBuf::from("/tmp/s.json")));
        assert!(parse(&["status", "--status-file", "/a", "--config", "/b"]).is_err());
    }

    #[test]
    fn the_command_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
