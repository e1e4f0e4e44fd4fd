//! `slipway`: the replication server and its operator commands. Wiring only: every piece of
//! behaviour lives in a library crate.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use slipway_server::admin::{self, Request, Response};
use slipway_server::settings::{LogFormat, Overrides, Settings};

#[derive(Parser)]
#[command(name = "slipway", version, about = "Staging-area block replication server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the replication server (local default: QUIC on 127.0.0.1:1500, data in ./var).
    Serve {
        /// Settings file (TOML); see docs/configuration.md.
        #[arg(long, env = "SLIPWAY_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory (volumes, metadata, TLS, admin socket).
        #[arg(long, env = "SLIPWAY_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// QUIC listen address.
        #[arg(long, env = "SLIPWAY_LISTEN")]
        listen: Option<String>,
        /// HTTP address for /metrics and /healthz.
        #[arg(long, env = "SLIPWAY_METRICS_LISTEN")]
        metrics_listen: Option<String>,
    },
    /// Show each source and disk of the running server.
    Status {
        #[command(flatten)]
        dir: DirArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Agent credentials.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(clap::Args)]
struct DirArgs {
    /// Settings file, to find the data dir.
    #[arg(long, env = "SLIPWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory of the server.
    #[arg(long, env = "SLIPWAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl DirArgs {
    fn settings(&self) -> Result<Settings> {
        Ok(Settings::load(
            self.config.as_deref(),
            &Overrides {
                data_dir: self.data_dir.clone(),
                ..Default::default()
            },
        )?)
    }
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a new credential bound to one source server.
    Issue {
        #[command(flatten)]
        dir: DirArgs,
        /// The source server the token is for.
        #[arg(long)]
        source_id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve {
            config,
            data_dir,
            listen,
            metrics_listen,
        } => {
            let settings = Settings::load(
                config.as_deref(),
                &Overrides {
                    data_dir,
                    listen,
                    metrics_listen,
                },
            )?;
            init_logging(settings.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(serve(settings))
        }
        Cmd::Status { dir, json } => {
            let s = dir.settings()?;
            let Response::Status { status } =
                admin::request(&s.data_dir, &Request::Status, Duration::from_secs(10))?
            else {
                bail!("unexpected answer from the server");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Cmd::Token {
            cmd: TokenCmd::Issue { dir, source_id },
        } => {
            let s = dir.settings()?;
            let key = slipway_server::auth::TokenKey::load_or_create(&s.data_dir)?;
            println!("{}", key.issue(&source_id)?);
            Ok(())
        }
    }
}

async fn serve(settings: Settings) -> Result<()> {
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    slipway_server::run(
        settings,
        |ready| {
            // One machine-readable line on stdout: scripts and tests wait for it.
            let line = serde_json::json!({
                "event": "ready",
                "listen": ready.listen.to_string(),
                "metrics_listen": ready.metrics_listen.to_string(),
                "fingerprint": ready.fingerprint,
                "data_dir": ready.data_dir,
            });
            println!("{line}");
            if ready.tls_generated {
                eprintln!(
                    "generated a self-signed certificate in {}/tls; agents pin it with --server-fingerprint {}",
                    ready.data_dir.display(),
                    ready.fingerprint
                );
            }
        },
        shutdown,
    )
    .await?;
    Ok(())
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn print_status(s: &slipway_server::status::StatusReport) {
    println!(
        "slipway {} on {}  agents connected: {}  uptime: {}s",
        s.version, s.listen, s.agents_connected, s.uptime_seconds
    );
    println!("certificate SHA-256: {}", s.fingerprint);
    if s.sources.is_empty() {
        println!("no sources yet");
        return;
    }
    println!(
        "{:<20} {:<16} {:<18} {:>10} {:>11} {:>10} {:>8} {:>8}  LAST ACK",
        "SOURCE", "DISK", "STATE", "SIZE", "REPLICATED", "BACKLOG", "LAG s", "ETA s"
    );
    for src in &s.sources {
        for d in &src.disks {
            let last = d
                .last_ack_unix_ms
                .map(|ms| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(ms);
                    format!("{:.1}s ago", now.saturating_sub(ms) as f64 / 1000.0)
                })
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<20} {:<16} {:<18} {:>10} {:>11} {:>10} {:>8.0} {:>8}  {}",
                src.id,
                d.id,
                d.state.as_str(),
                human(d.size_bytes),
                human(d.replicated_bytes),
                human(d.backlog_bytes),
                d.lag_seconds,
                d.eta_seconds
                    .map(|e| format!("{e:.0}"))
                    .unwrap_or_else(|| "-".into()),
                last
            );
            if let Some(r) = &d.reason {
                println!("{:<20} {:<16}   reason: {r}", "", "");
            }
        }
        if let Some(b) = &src.restore_points_blocked {
            println!("{:<20} no restore point yet: {b}", "");
        }
    }
}
