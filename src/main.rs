//! `slipway`: the replication server and its operator commands. Wiring only: every piece of
//! behaviour lives in a library crate.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::HumanBytes;
use slipway_server::admin::{self, Request, Response};
use slipway_server::settings::{BackendKind, LogFormat, Overrides, Settings};

// The AWS backend, templates and launches need the AWS SDK, a long build that the embedded
// local default never calls: they are compiled with the `aws` feature (the AMI, CI and `make
// test` turn it on); without it those commands say how to get them.
#[cfg(feature = "aws")]
#[path = "aws.rs"]
mod aws;
#[cfg(not(feature = "aws"))]
#[path = "no_aws.rs"]
mod aws;

#[derive(Parser)]
#[command(
    name = "slipway",
    version,
    about = "Staging-area block replication server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the launch variant's flags costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Replication templates: launch and reconcile replication servers on AWS.
    Template {
        #[command(subcommand)]
        cmd: TemplateCmd,
    },
    /// Test and cutover instances from restore points (AWS), or a local test launch in QEMU
    /// (`--local`, docs/launch.md).
    Launch {
        #[command(subcommand)]
        list: Option<LaunchListCmd>,
        #[command(flatten)]
        local: LocalLaunchArgs,
        /// The replication template (its region and launch section).
        #[arg(long)]
        template: Option<PathBuf>,
        /// The source server to launch.
        #[arg(long)]
        source: Option<String>,
        /// test or cutover (a cutover terminates the source's test instances first).
        #[arg(long, value_parser = ["test", "cutover"])]
        mode: Option<String>,
        /// Restore point to launch from (default: the newest completed one).
        #[arg(long)]
        restore_point: Option<String>,
    },
    /// The end of a migration on AWS: `cutover finalize` (docs/launch.md).
    Cutover {
        #[command(subcommand)]
        cmd: CutoverCmd,
    },
    /// The server's identity volume on EC2: its data dir on an EBS volume of its own, which
    /// follows the server when `template apply` replaces it (docs/aws.md).
    #[command(name = "identity-volume")]
    IdentityVolume {
        #[command(subcommand)]
        cmd: IdentityVolumeCmd,
    },
    /// Restore points: crash-consistent snapshots of all disks of a source.
    #[command(name = "restore-points")]
    RestorePoints {
        #[command(subcommand)]
        cmd: RpCmd,
    },
}

#[derive(Subcommand)]
pub(crate) enum TemplateCmd {
    /// Check a replication template (no AWS call).
    Validate { file: PathBuf },
    /// Launch or reconcile the template's replication servers.
    Apply {
        file: PathBuf,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum IdentityVolumeCmd {
    /// Find this server's identity volume by its tags, attach it here, make its filesystem if
    /// it is new and empty (never over data), and mount it on the data dir. Run as root before
    /// the server starts (the AMI's slipway-identity.service); a server not launched by a
    /// replication template keeps its data dir on the root disk.
    Mount {
        #[command(flatten)]
        dir: DirArgs,
    },
}

/// The local test launch (`slipway launch --mode test --local`): docs/launch.md.
#[derive(clap::Args)]
struct LocalLaunchArgs {
    /// Boot the restore point here, in a throw-away QEMU VM with NVMe-attached disks, instead
    /// of on AWS; the server's data dir holds the restore point.
    #[arg(long)]
    local: bool,
    #[command(flatten)]
    dir: DirArgs,
    /// Launch the restore point's disks as they are, without the launch conversion (local:
    /// boot the copies unchanged; AWS: register the image from the restore point's snapshots,
    /// for a source that already runs on EC2).
    #[arg(long)]
    no_convert: bool,
    /// AWS: the instance the conversion attaches its volumes to, which must be the one this
    /// command runs on (default: read from the instance metadata, IMDSv2).
    #[arg(long, value_name = "INSTANCE-ID", conflicts_with_all = ["local", "no_convert"])]
    convert_on: Option<String>,
    /// A shell command run in the guest once it is up; the launch passes only if it exits 0.
    #[arg(long, value_name = "COMMAND", requires = "local")]
    check: Option<String>,
    /// Give up if the guest has not reached its login prompt (and run the check) by then.
    #[arg(long, default_value = "10m", requires = "local")]
    timeout: humantime::Duration,
    /// CPU virtualisation: auto tries KVM and falls back to TCG if KVM does not run the guest.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"], requires = "local")]
    accel: String,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024, requires = "local")]
    memory: u32,
    /// Where to keep the serial console log (default: DATA_DIR/launches/RP.console.log).
    #[arg(long, requires = "local")]
    console_log: Option<PathBuf>,
    /// Where the disk copies are made (default: DATA_DIR/launches; deleted afterwards).
    #[arg(long, requires = "local")]
    work_dir: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The options of `slipway launch` that also apply on AWS (docs/launch.md). Without the `aws`
/// feature the launch is refused before they are read.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
pub(crate) struct AwsLaunchOptions {
    pub(crate) no_convert: bool,
    pub(crate) convert_on: Option<String>,
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum LaunchListCmd {
    /// Launches recorded on instance tags.
    List {
        /// Only this template's launches (and its region).
        #[arg(long)]
        template: Option<PathBuf>,
        /// Region to look in when no template is given.
        #[arg(long, env = "AWS_REGION")]
        region: Option<String>,
    },
    /// Each source's place in the launch lifecycle (not-ready, ready-for-testing,
    /// test-in-progress, ready-for-cutover, cutover-in-progress, cutover-complete), its newest
    /// completed restore point and its live launches.
    Status {
        /// The replication template (its sources and region).
        #[arg(long)]
        template: PathBuf,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End a source's test launches: terminate its live test instances, deregister their
    /// images (unless a live instance still boots from one) and delete the images' converted
    /// snapshots, then record the source ready for cutover.
    Terminate {
        /// The replication template (its region).
        #[arg(long)]
        template: PathBuf,
        /// The source server.
        #[arg(long)]
        source: String,
        /// Only this instance (a launch of the source).
        #[arg(long, value_name = "INSTANCE-ID")]
        instance: Option<String>,
        /// Roll the cutover back too: terminate the cutover instance (a cutover is otherwise
        /// ended by `slipway cutover finalize`).
        #[arg(long)]
        cutover: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum CutoverCmd {
    /// Finalize a source's cutover (only while its cutover instance is live): keep the
    /// restore point the cutover was launched from (and those given with --keep) for good,
    /// which stops the source's replication, and deregister the cutover's image. The cutover
    /// instance is left as it is. Run again, it says the source is finalized and does nothing.
    Finalize {
        /// The replication template (its region).
        #[arg(long)]
        template: PathBuf,
        /// The source server.
        #[arg(long)]
        source: String,
        /// Another restore point to keep (repeatable).
        #[arg(long, value_name = "RESTORE-POINT")]
        keep: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RpCmd {
    /// Take a restore point of a source now (through the running server); prints its id.
    Create {
        #[command(flatten)]
        dir: DirArgs,
        /// The source server.
        #[arg(long)]
        source: String,
        /// Return only once the restore point exists.
        #[arg(long)]
        wait: bool,
    },
    /// List restore points, oldest first.
    List {
        #[command(flatten)]
        dir: DirArgs,
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write one disk of a restore point as a raw image.
    Export {
        #[command(flatten)]
        dir: DirArgs,
        id: String,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Re-read every block of a restore point and check its SHA-256.
    Verify {
        #[command(flatten)]
        dir: DirArgs,
        id: String,
    },
    /// Delete a restore point (blocks younger ones still need are kept).
    Delete {
        #[command(flatten)]
        dir: DirArgs,
        id: String,
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
        /// Refuse the token after this long (e.g. 90d, 1y); default: it never expires.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<humantime::Duration>,
    },
    /// Refuse a token from now on (its id, or the token itself) and close its connections.
    Revoke {
        #[command(flatten)]
        dir: DirArgs,
        /// The token's id (printed by `token issue`), or the whole token.
        token: String,
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
        Cmd::RestorePoints { cmd } => restore_points(cmd),
        Cmd::IdentityVolume {
            cmd: IdentityVolumeCmd::Mount { dir },
        } => {
            let s = dir.settings()?;
            init_logging(s.log_format);
            block_on(aws::mount_identity_volume(&s))
        }
        Cmd::Template { cmd } => {
            // apply and launch wait through EC2 state changes for minutes: their log lines
            // (stderr) are the progress; the report goes to stdout.
            init_logging(LogFormat::Text);
            block_on(aws::template(cmd))
        }
        Cmd::Launch {
            local,
            source,
            mode,
            restore_point,
            ..
        } if local.local => local_launch(local, source, mode, restore_point),
        Cmd::Launch {
            list,
            template,
            source,
            mode,
            restore_point,
            local,
        } => {
            init_logging(LogFormat::Text);
            block_on(aws::launch(
                list,
                template,
                source,
                mode,
                restore_point,
                AwsLaunchOptions {
                    no_convert: local.no_convert,
                    convert_on: local.convert_on,
                    json: local.json,
                },
            ))
        }
        Cmd::Cutover { cmd } => {
            init_logging(LogFormat::Text);
            block_on(aws::cutover(cmd))
        }
        Cmd::Token {
            cmd:
                TokenCmd::Issue {
                    dir,
                    source_id,
                    expires_in,
                },
        } => {
            let s = dir.settings()?;
            let key = slipway_server::auth::TokenKey::load_or_create(&s.data_dir)?;
            let expires = expires_in.map(|d| {
                std::time::SystemTime::now()
                    .checked_add(*d)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(u64::MAX, |t| t.as_secs())
            });
            let token = key.issue_until(&source_id, expires)?;
            println!("{token}");
            let id = slipway_server::auth::token_id(&token).unwrap_or_default();
            match expires {
                Some(e) => eprintln!("token id {id} for {source_id}, expires at Unix time {e}"),
                None => eprintln!("token id {id} for {source_id}, never expires"),
            }
            Ok(())
        }
        Cmd::Token {
            cmd: TokenCmd::Revoke { dir, token },
        } => {
            let s = dir.settings()?;
            let id = slipway_server::auth::token_id(&token).unwrap_or(token);
            if !slipway_server::auth::valid_token_id(&id) {
                bail!("{id:?} is neither a token nor a token id (32 hex digits)");
            }
            let req = Request::TokenRevoke { id: id.clone() };
            match admin::request(&s.data_dir, &req, Duration::from_secs(30)) {
                Ok(Response::TokenRevoked { newly, closed, .. }) => {
                    let was = if newly { "revoked" } else { "already revoked" };
                    println!("token {id} {was}; {closed} connection(s) closed");
                    Ok(())
                }
                Ok(_) => bail!("unexpected answer from the server"),
                Err(admin::AdminError::NotRunning { .. }) => {
                    // No server: list it in place; a server started later reads the list.
                    let newly = slipway_server::auth::Revoked::revoke(&s.data_dir, &id)?;
                    let was = if newly { "revoked" } else { "already revoked" };
                    println!("token {id} {was} (no server running)");
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
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
    let backends = match settings.backend {
        BackendKind::Local => slipway_server::Backends::local(&settings),
        BackendKind::Aws => aws::backends(&settings).await?,
    };
    slipway_server::run(
        settings,
        backends,
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
            sd_notify("READY=1");
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

/// Tells systemd (Type=notify) the server is ready; a no-op outside systemd.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = %path, "could not notify systemd");
    }
}

fn print_status(s: &slipway_server::status::StatusReport) {
    println!(
        "slipway {} on {}  agents connected: {}  uptime: {}s",
        s.version, s.listen, s.agents_connected, s.uptime_seconds
    );
    println!("certificate SHA-256: {}", s.fingerprint);
    if let Some(sha) = &s.settings_sha256 {
        println!("settings file fingerprint: {sha}");
    }
    match s.attachment_slots {
        Some((used, limit)) => println!(
            "backend: {}  EBS attachment slots: {used} of {limit} in use",
            s.backend
        ),
        None => println!("backend: {}", s.backend),
    }
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
                HumanBytes(d.size_bytes),
                HumanBytes(d.replicated_bytes),
                HumanBytes(d.backlog_bytes),
                d.lag_seconds,
                d.eta_seconds
                    .map(|e| format!("{e:.0}"))
                    .unwrap_or_else(|| "-".into()),
                last
            );
            match (d.tracking.as_deref(), &d.tracking_reason) {
                (Some(t), Some(why)) => {
                    println!("{:<20} {:<16}   tracking: {t} ({why})", "", "")
                }
                (Some(t), None) => println!("{:<20} {:<16}   tracking: {t}", "", ""),
                _ => {}
            }
            if let Some(r) = &d.reason {
                println!("{:<20} {:<16}   reason: {r}", "", "");
            }
        }
        if let Some(b) = &src.restore_points_blocked {
            println!("{:<20} no restore point yet: {b}", "");
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

fn store_of(s: &Settings) -> slipway_store::snapshot::SnapshotStore {
    slipway_store::snapshot::SnapshotStore::new(s.data_dir.join("snapshots"))
}

fn find(s: &Settings, id: &str) -> Result<slipway_store::snapshot::Manifest> {
    store_of(s)
        .get(id)?
        .with_context(|| format!("no restore point {id} in {}", s.data_dir.display()))
}

/// `slipway launch --mode test --local`: boots a restore point in QEMU (crates/drill).
fn local_launch(
    a: LocalLaunchArgs,
    source: Option<String>,
    mode: Option<String>,
    restore_point: Option<String>,
) -> Result<()> {
    if mode.as_deref() == Some("cutover") {
        bail!("--local launches are test launches: --mode cutover needs AWS");
    }
    let s = a.dir.settings()?;
    let m = match (&restore_point, &source) {
        (Some(id), _) => find(&s, id)?,
        (None, Some(src)) => store_of(&s)
            .newest(src)?
            .with_context(|| format!("no restore point of source {src}"))?,
        (None, None) => bail!("name the restore point (--restore-point) or the source (--source)"),
    };
    let launches = s.data_dir.join("launches");
    let opts = slipway_drill::DrillOptions {
        work_dir: a.work_dir.unwrap_or_else(|| launches.clone()),
        convert: !a.no_convert,
        check: a.check,
        timeout: *a.timeout,
        accel: match a.accel.as_str() {
            "kvm" => slipway_drill::AccelChoice::Kvm,
            "tcg" => slipway_drill::AccelChoice::Tcg,
            _ => slipway_drill::AccelChoice::Auto,
        },
        memory_mib: a.memory,
        console_log: a
            .console_log
            .unwrap_or_else(|| launches.join(format!("{}.console.log", m.id))),
        qemu: "qemu-system-x86_64".into(),
    };
    if let Some(p) = opts.console_log.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    slipway_drill::install_interrupt_handler();
    let started = std::time::Instant::now();
    let r = slipway_drill::run(&store_of(&s), &m, &opts, &mut |line| {
        eprintln!("[{:>4} s] {line}", started.elapsed().as_secs())
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_drill(&r);
    }
    if !r.ok {
        bail!(
            "restore point {} did not pass the test launch: {} (console log: {})",
            r.restore_point,
            serde_json::to_value(r.outcome)?.as_str().unwrap_or("?"),
            r.console_log.display()
        );
    }
    Ok(())
}

fn print_drill(r: &slipway_drill::DrillReport) {
    println!(
        "restore point {} of {}: {}",
        r.restore_point,
        r.source,
        if r.ok { "boots" } else { "does NOT boot" }
    );
    println!(
        "outcome: {:?}; login prompt: {}; {} boot, {} firmware, {}",
        r.outcome,
        if r.reached_login { "yes" } else { "no" },
        serde_json::to_value(r.boot_mode).unwrap_or_default(),
        r.firmware,
        r.accel.as_str()
    );
    if let Some(c) = &r.check {
        match c.exit_code {
            Some(code) => println!("check {:?}: exit {code}", c.command),
            None => println!("check {:?}: did not finish", c.command),
        }
        for l in c.output.lines() {
            println!("  | {l}");
        }
    }
    match &r.conversion {
        Some(c) if r.converted => {
            if let Some(d) = &c.distro {
                println!(
                    "converted {} ({}), root on disk {} partition {} ({}):",
                    d.pretty_name.as_deref().unwrap_or(&d.id),
                    c.initramfs_tool.unwrap_or("?"),
                    c.root.disk,
                    c.root.partition,
                    c.root.fs
                );
            }
            for ch in &c.changes {
                println!("  changed {}: {}", ch.path, ch.detail);
            }
            for n in &c.notes {
                println!("  note: {n}");
            }
        }
        _ => println!("not converted (--no-convert)"),
    }
    println!(
        "export {:.1} s, conversion {:.1} s, boot {:.1} s; console log: {}",
        r.seconds.export,
        r.seconds.convert,
        r.seconds.boot,
        r.console_log.display()
    );
    if !r.ok {
        for l in &r.console_tail {
            println!("  console| {l}");
        }
    }
}

fn restore_points(cmd: RpCmd) -> Result<()> {
    match cmd {
        RpCmd::Create { dir, source, wait } => {
            let s = dir.settings()?;
            let timeout = if wait {
                Duration::from_secs(600)
            } else {
                Duration::from_secs(10)
            };
            match admin::request(
                &s.data_dir,
                &Request::RestorePointCreate { source, wait },
                timeout,
            )? {
                Response::RestorePointCreated { id, manifest } => {
                    println!("{id}");
                    if let Some(m) = manifest {
                        eprintln!(
                            "stored {} in {} ms (appliers paused {} ms)",
                            HumanBytes(m.size_bytes),
                            m.duration_ms,
                            m.pause_ms
                        );
                    }
                    Ok(())
                }
                _ => bail!("unexpected answer from the server"),
            }
        }
        RpCmd::List { dir, source, json } => {
            let s = dir.settings()?;
            // The running server knows remote snapshot states; without one, read the store.
            let list = match admin::request(
                &s.data_dir,
                &Request::RestorePointList {
                    source: source.clone(),
                },
                Duration::from_secs(120),
            ) {
                Ok(Response::RestorePointList { restore_points }) => restore_points,
                Ok(_) => bail!("unexpected answer from the server"),
                Err(admin::AdminError::NotRunning { .. }) => store_of(&s)
                    .list(source.as_deref())?
                    .iter()
                    .map(slipway_server::restore::manifest_json)
                    .collect(),
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no restore points");
            } else {
                println!(
                    "{:<26} {:<16} {:<25} {:<10} {:>10} {:<12} DISKS",
                    "ID", "SOURCE", "CREATED", "TRIGGER", "STORED", "POINT"
                );
                for m in &list {
                    let disks: Vec<&str> = m["disks"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|d| d["id"].as_str()).collect())
                        .unwrap_or_default();
                    let point = match m["consistency"].as_str() {
                        Some("one-instant") => "one-instant",
                        _ => "best-effort",
                    };
                    println!(
                        "{:<26} {:<16} {:<25} {:<10} {:>10} {:<12} {}",
                        m["id"].as_str().unwrap_or("?"),
                        m["source"].as_str().unwrap_or("?"),
                        m["created_at"].as_str().unwrap_or("?"),
                        m["trigger"].as_str().unwrap_or("?"),
                        m["size_bytes"]
                            .as_u64()
                            .map(|b| HumanBytes(b).to_string())
                            .unwrap_or_else(|| "-".into()),
                        point,
                        disks.join(",")
                    );
                }
            }
            Ok(())
        }
        RpCmd::Export { dir, id, disk, out } => {
            let s = dir.settings()?;
            let m = find(&s, &id)?;
            let n = store_of(&s).export(&m, &disk, &out)?;
            eprintln!(
                "wrote {} ({}) of {id} to {}",
                disk,
                HumanBytes(n),
                out.display()
            );
            Ok(())
        }
        RpCmd::Verify { dir, id } => {
            let s = dir.settings()?;
            let r = match admin::request(
                &s.data_dir,
                &Request::RestorePointVerify { id: id.clone() },
                Duration::from_secs(3600),
            ) {
                Ok(Response::RestorePointVerified { report }) => report,
                Ok(_) => bail!("unexpected answer from the server"),
                Err(admin::AdminError::NotRunning { .. }) => {
                    let m = find(&s, &id)?;
                    store_of(&s).verify(&m)
                }
                Err(e) => return Err(e.into()),
            };
            for p in &r.problems {
                println!("BAD {p}");
            }
            if !r.problems.is_empty() {
                bail!(
                    "{} of restore point {id} failed verification",
                    r.problems.len()
                );
            }
            println!(
                "{id}: ok ({} blocks, {} checked)",
                r.blocks_checked,
                HumanBytes(r.bytes_checked)
            );
            Ok(())
        }
        RpCmd::Delete { dir, id } => {
            let s = dir.settings()?;
            let req = Request::RestorePointDelete { id: id.clone() };
            match admin::request(&s.data_dir, &req, Duration::from_secs(600)) {
                Ok(Response::RestorePointDeleted { freed_bytes, .. }) => {
                    println!("deleted {id} (freed {})", HumanBytes(freed_bytes));
                    Ok(())
                }
                Ok(_) => bail!("unexpected answer from the server"),
                Err(admin::AdminError::NotRunning { .. }) => {
                    // No server: delete in place (the data-dir lock keeps a server from starting
                    // meanwhile).
                    let _lock = slipway_server::lock_data_dir(&s.data_dir)?;
                    let freed = store_of(&s).delete(&id)?;
                    println!("deleted {id} (freed {})", HumanBytes(freed));
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}
