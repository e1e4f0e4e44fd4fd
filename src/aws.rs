//! The AWS side of the `slipway` binary (feature `aws`): the EBS backend for `serve`,
//! replication templates and launches. Wiring only, like main.rs.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use slipway_server::settings::Settings;

use crate::{AwsLaunchOptions, CutoverCmd, LaunchListCmd, TemplateCmd};

/// The AWS backend: `[aws]` settings validated here (the server crate does not know them),
/// instance identity from IMDSv2, the default credential chain, EBS devices by id.
pub(crate) async fn backends(settings: &Settings) -> Result<slipway_server::Backends> {
    let backend = Arc::new(aws_backend(settings).await?);
    Ok(slipway_server::Backends {
        backend_metrics: backend.api_metrics().collectors(),
        volumes: backend.clone(),
        snapshots: Some(backend),
    })
}

/// `slipway identity-volume mount`: this server's identity volume found, attached and mounted
/// on the data dir (formatted only when new and empty), before the server starts.
pub(crate) async fn mount_identity_volume(settings: &Settings) -> Result<()> {
    use slipway_aws::identity_volume::{mount_identity, Mounted};
    if settings.backend != slipway_server::settings::BackendKind::Aws {
        // The AMI run with the embedded local default: no EC2 to ask, nothing to mount.
        println!(
            "backend is not aws: the data dir {} stays where it is",
            settings.data_dir.display()
        );
        return Ok(());
    }
    let backend = aws_backend(settings).await?;
    let Some(vol) = backend
        .identity_volume()
        .await
        .context("finding this server's identity volume")?
    else {
        println!(
            "this instance is not a replication template's server (no slipway:template and slipway:server-index tags): the data dir {} stays on the root disk",
            settings.data_dir.display()
        );
        return Ok(());
    };
    let (path, dir) = (vol.path.clone(), settings.data_dir.clone());
    let done = tokio::task::spawn_blocking(move || mount_identity(&path, &dir))
        .await
        .context("the mount task")?
        .with_context(|| format!("mounting identity volume {}", vol.volume_id))?;
    let what = match done {
        Mounted::Existing => "mounted",
        Mounted::Formatted => "formatted (it was new and empty) and mounted",
        Mounted::Already => "already mounted",
    };
    println!(
        "identity volume {} ({}) {what} on {}",
        vol.volume_id,
        vol.path.display(),
        settings.data_dir.display()
    );
    Ok(())
}

async fn aws_backend(settings: &Settings) -> Result<slipway_aws::AwsBackend> {
    let (table, file) = settings
        .aws
        .clone()
        .unwrap_or_else(|| (Default::default(), "<defaults>".into()));
    let raw: slipway_aws::RawAwsSettings =
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                anyhow::anyhow!("settings file {file}: key `aws`: {}", e.message().trim())
            })?;
    let aws = slipway_aws::AwsSettings::validate(raw).map_err(|e| match e {
        slipway_aws::AwsError::Settings { key, reason } => {
            anyhow::anyhow!("settings file {file}: key `aws.{key}`: {reason}")
        }
        e => anyhow::anyhow!("settings file {file}: key `aws`: {e}"),
    })?;
    let identity = slipway_aws::instance_identity()
        .await
        .context("reading this instance's identity from the instance metadata service (IMDSv2)")?;
    tracing::info!(instance = %identity.instance_id, az = %identity.availability_zone, "running on EC2");
    let sdk = slipway_aws::sdk_config(aws.region.clone()).await;
    // Emulated attachments have no block devices: tests map volume ids to files.
    let resolver: Arc<dyn slipway_aws::DeviceResolver> =
        match std::env::var_os("SLIPWAY_AWS_DEVICE_MAP_DIR") {
            Some(dir) => Arc::new(slipway_aws::FileMap { dir: dir.into() }),
            None => Arc::new(slipway_aws::ById {
                dir: aws.device_dir.clone(),
            }),
        };
    slipway_aws::AwsBackend::new(aws, identity, resolver, sdk)
        .await
        .context("starting the AWS backend")
}

pub(crate) async fn template(cmd: TemplateCmd) -> Result<()> {
    match cmd {
        TemplateCmd::Validate { file } => {
            let t = slipway_fleet::validate(&file).await?;
            println!("{}: ok — {}", file.display(), t.summary());
        }
        TemplateCmd::Apply { file, dry_run } => {
            let t = slipway_fleet::validate(&file).await?;
            let report = slipway_fleet::apply(&t, &slipway_fleet::ApplyOptions { dry_run }).await?;
            println!("{report}");
        }
    }
    Ok(())
}

pub(crate) async fn launch(
    list: Option<LaunchListCmd>,
    template: Option<PathBuf>,
    source: Option<String>,
    mode: Option<String>,
    restore_point: Option<String>,
    opts: AwsLaunchOptions,
) -> Result<()> {
    match list {
        Some(LaunchListCmd::List { template, region }) => {
            let t = match &template {
                Some(p) => Some(slipway_fleet::validate(p).await?),
                None => None,
            };
            let region = t
                .as_ref()
                .map(|t| t.region.clone())
                .or(region)
                .context("give --template or --region (or set AWS_REGION)")?;
            let l =
                slipway_fleet::launch_list(&region, t.as_ref().map(|t| t.name.as_str())).await?;
            println!("{l}");
            return Ok(());
        }
        Some(LaunchListCmd::Status {
            template,
            source,
            json,
        }) => {
            let t = slipway_fleet::validate(&template).await?;
            let s = slipway_fleet::launch_status(&t, source.as_deref()).await?;
            return print(&s, json);
        }
        Some(LaunchListCmd::Terminate {
            template,
            source,
            instance,
            cutover,
            json,
        }) => {
            let t = slipway_fleet::validate(&template).await?;
            let req = slipway_fleet::TerminateRequest {
                source,
                instance,
                cutover,
            };
            let r = slipway_fleet::terminate(&t, &req).await?;
            return print(&r, json);
        }
        None => {}
    }
    let (Some(file), Some(source), Some(mode)) = (template, source, mode) else {
        bail!("slipway launch needs --template FILE --source ID --mode test|cutover");
    };
    let t = slipway_fleet::validate(&file).await?;
    let mode = match mode.as_str() {
        "cutover" => slipway_fleet::LaunchMode::Cutover,
        _ => slipway_fleet::LaunchMode::Test,
    };
    // The conversion attaches volumes here; emulated attachments (tests) are files.
    let (interrupt, interrupted) = tokio::sync::watch::channel(false);
    let conversion = if opts.no_convert {
        slipway_fleet::Conversion::Skip
    } else {
        let devices: std::sync::Arc<dyn slipway_aws::DeviceResolver> =
            match std::env::var_os("SLIPWAY_AWS_DEVICE_MAP_DIR") {
                Some(dir) => std::sync::Arc::new(slipway_aws::FileMap { dir: dir.into() }),
                None => std::sync::Arc::new(slipway_aws::ById {
                    dir: slipway_aws::AwsSettings::default().device_dir,
                }),
            };
        slipway_fleet::Conversion::On(slipway_fleet::ConvertOn {
            instance_id: opts.convert_on,
            devices,
            interrupt: Some(interrupted),
        })
    };
    let converting = matches!(conversion, slipway_fleet::Conversion::On(_));
    let req = slipway_fleet::LaunchRequest {
        source,
        mode,
        restore_point,
        conversion,
    };
    let launch = slipway_fleet::launch(&t, &req);
    tokio::pin!(launch);
    // Ctrl-C, SIGTERM or SIGHUP (the SSM or terminal session closed: its foreground job gets a
    // hangup, whose default would kill the process outright) during a conversion: the launch
    // stops at its next step and deletes the volumes it attached to this server before the
    // process exits. Without a conversion there is nothing to undo: the process ends as before.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let report = tokio::select! {
        r = &mut launch => r,
        _ = async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
                _ = hup.recv() => {},
            }
        } => {
            if !converting {
                bail!("interrupted");
            }
            eprintln!("interrupted: stopping the launch and deleting the conversion's volumes");
            let _ = interrupt.send(true);
            launch.await
        }
    }?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

pub(crate) async fn cutover(cmd: CutoverCmd) -> Result<()> {
    let CutoverCmd::Finalize {
        template,
        source,
        keep,
        json,
    } = cmd;
    let t = slipway_fleet::validate(&template).await?;
    let r = slipway_fleet::finalize(&t, &slipway_fleet::FinalizeRequest { source, keep }).await?;
    print(&r, json)
}

/// A report on stdout: JSON, or its `Display`.
fn print(report: &(impl ReportOut + std::fmt::Display), json: bool) -> Result<()> {
    if json {
        println!("{}", report.json()?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// The fleet's lifecycle reports as JSON (the binary does not depend on serde itself).
trait ReportOut {
    fn json(&self) -> serde_json::Result<String>;
}

macro_rules! report_out {
    ($($t:ty),*) => {$(
        impl ReportOut for $t {
            fn json(&self) -> serde_json::Result<String> {
                serde_json::to_string_pretty(self)
            }
        }
    )*};
}
report_out!(
    slipway_fleet::LifecycleStatus,
    slipway_fleet::TerminateReport,
    slipway_fleet::FinalizeReport
);
