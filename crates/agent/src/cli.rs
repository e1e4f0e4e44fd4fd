//! The `slipway-agent` command line.
//!
//! Only this layer uses `anyhow`, sets up logging and chooses exit codes; everything below it
//! returns typed errors, so the exit code is decided from what went wrong (permanent or not)
//! rather than from where.

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use indicatif::MultiProgress;
use slipway_net::Congestion;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat, RawArgs};
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
#[command(group(ArgGroup::new("trust").required(true).args(["server_ca", "server_fingerprint"])))]
struct ReplicateArgs {
    /// Replication server, HOST:PORT (HOST a DNS name or an IP address).
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
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
    source_id: String,
    /// Credential for the source id. Visible to other users in `ps` when given here: prefer
    /// --token-file or the SLIPWAY_TOKEN environment variable.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SLIPWAY_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    token: Option<String>,
    /// File holding the credential (its first line; keep it mode 0600).
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// A disk to replicate: a file or block device, optionally with its id (default: the
    /// file name). Repeat for more disks.
    #[arg(long = "disk", value_name = "PATH[:DISK_ID]", required = true)]
    disks: Vec<String>,
    /// Keep replicating: rescan the disks every --rescan-interval until SIGINT/SIGTERM.
    #[arg(long)]
    follow: bool,
    /// Time between follow-mode rescans.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    rescan_interval: String,
    /// Logical block size: a power of two from 512 to 65536.
    #[arg(long, value_name = "BYTES", default_value = "512")]
    block_size: String,
    /// Read size and largest write (at most 4MiB).
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    chunk_size: String,
    /// Most unacknowledged data held in memory, all disks together.
    #[arg(long, value_name = "SIZE", default_value = "128MiB")]
    window: String,
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
    /// Longest a freeze may last; thawed after it whatever happens.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    max_freeze: String,
    /// Script run before each freeze (e.g. to flush a database); a failure skips the freeze.
    #[arg(long, value_name = "PATH")]
    freeze_pre_hook: Option<PathBuf>,
    /// Script run after each thaw, whatever happened.
    #[arg(long, value_name = "PATH")]
    freeze_post_hook: Option<PathBuf>,
    /// Largest UDP payload (path MTU discovery upper bound).
    #[arg(long, value_name = "BYTES", default_value_t = 6500)]
    max_udp_payload: u16,
    /// Congestion controller. BBR keeps QUIC near the link rate on lossy long links, where
    /// Cubic collapses (docs/benchmarks.md, scenario 2).
    #[arg(long, value_name = "ALGO", default_value = "bbr", value_parser = parse_congestion)]
    congestion: Congestion,
    /// With --follow: on a clean stop (SIGTERM/SIGINT, everything acknowledged) save the run
    /// here, and on start resume a run saved here instead of resyncing every disk: only what
    /// changed while no agent ran is sent. Used once; a crash leaves nothing to resume.
    #[arg(long, value_name = "FILE")]
    state_file: Option<PathBuf>,
    /// Append "<disk_id> <seq> <offset> <len>" for every acknowledged write (for tests).
    #[arg(long, value_name = "FILE", hide = true)]
    ack_journal: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormatArg,
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
        Command::Replicate(args) => match replicate_cmd(args) {
            Ok(code) => code,
            Err(e) => match e.downcast_ref::<AgentError>() {
                // Agent errors already say what caused them, in one sentence.
                Some(a) => {
                    eprintln!("error: {a}");
                    ExitCode::from(a.exit_code())
                }
                None => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            },
        },
    }
}

/// The first line of a token file, trimmed. A file readable by others is refused: the
/// credential would be as public as on the command line.
fn read_token_file(p: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p)
        .with_context(|| format!("--token-file {}", p.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "--token-file {}: mode {:o} lets other users read the credential; chmod 600 it",
            p.display(),
            mode & 0o777
        );
    }
    let text =
        std::fs::read_to_string(p).with_context(|| format!("--token-file {}", p.display()))?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

fn replicate_cmd(args: ReplicateArgs) -> anyhow::Result<ExitCode> {
    let format = match args.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    let raw = RawArgs {
        server: args.server,
        server_ca: args.server_ca,
        server_fingerprint: args.server_fingerprint,
        server_name: args.server_name,
        source_id: args.source_id,
        token: match (args.token, &args.token_file) {
            (Some(t), _) => t,
            (None, Some(p)) => read_token_file(p)?,
            (None, None) => unreachable!("clap requires --token or --token-file"),
        },
        disks: args.disks,
        follow: args.follow,
        rescan_interval: args.rescan_interval,
        block_size: args.block_size,
        chunk_size: args.chunk_size,
        window: args.window,
        no_compress: args.no_compress,
        no_track: args.no_track,
        no_freeze: args.no_freeze,
        max_freeze: Some(args.max_freeze),
        freeze_pre_hook: args.freeze_pre_hook,
        freeze_post_hook: args.freeze_post_hook,
        max_udp_payload: args.max_udp_payload,
        congestion: Some(args.congestion),
        ack_journal: args.ack_journal,
        state_file: args.state_file,
    };
    let cfg = Config::from_raw(raw, |p| p.exists()).map_err(AgentError::from)?;
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

    #[test]
    fn the_token_comes_from_exactly_one_place_and_a_token_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let no_token: Vec<&str> = BASE
            .iter()
            .copied()
            .filter(|a| *a != "--token" && *a != "t")
            .chain(["--server-ca", "/ca.pem"])
            .collect();
        assert!(parse(&no_token).is_err(), "no credential given");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "slw1.abc.def\n").unwrap();
        let path = p.to_str().unwrap();
        let mut both = BASE.to_vec();
        both.extend(["--server-ca", "/ca.pem", "--token-file", path]);
        assert!(parse(&both).is_err(), "--token and --token-file");
        let mut from_file = no_token.clone();
        from_file.extend(["--token-file", path]);
        let Command::Replicate(r) = parse(&from_file).unwrap().command else {
            panic!("not replicate")
        };
        assert_eq!(r.token, None);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "slw1.abc.def");
    }

    #[test]
    fn exactly_one_way_to_trust_the_server() {
        let fp = "ab".repeat(32);
        let mut a = BASE.to_vec();
        assert!(parse(&a).is_err(), "no trust given");
        a.extend(["--server-fingerprint", &fp]);
        let Command::Replicate(r) = parse(&a).unwrap().command else {
            panic!("not replicate")
        };
        assert_eq!(r.server_fingerprint.as_deref(), Some(fp.as_str()));
        assert_eq!(r.block_size, "512");
        assert_eq!(r.chunk_size, "1MiB");
        assert_eq!(r.window, "128MiB");
        assert_eq!(r.rescan_interval, "10s");
        assert_eq!(r.max_udp_payload, 6500);
        assert_eq!(r.congestion, Congestion::Bbr);
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
        ]);
        let Command::Replicate(r) = parse(&a).unwrap().command else {
            panic!("not replicate")
        };
        assert_eq!(r.disks, vec!["/dev/sda", "/tmp/b.img:data"]);
        assert!(r.follow && r.no_compress);
        assert_eq!(r.congestion, Congestion::Bbr);
        assert!(matches!(r.log_format, LogFormatArg::Json));
        assert_eq!(r.ack_journal, Some(PathBuf::from("/tmp/j")));
        let mut bad = BASE.to_vec();
        bad.extend(["--server-ca", "/ca.pem", "--congestion", "vegas"]);
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn the_command_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
