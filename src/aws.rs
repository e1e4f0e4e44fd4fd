//! The AWS side of the `slipway` binary (feature `aws`): the EBS backend for `serve`,
//! replication templates and launches. Wiring only, like main.rs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use slipway_server::settings::Settings;

use crate::{LaunchListCmd, TemplateCmd};

/// The AWS backend: `[aws]` settings validated here (the server crate does not know them),
/// instance identity from IMDSv2, the default credential chain, EBS devices by id.
pub(crate) async fn backends(settings: &Settings) -> Result<slipway_server::Backends> {
    use std::sync::Arc;
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
    let backend = Arc::new(
        slipway_aws::AwsBackend::new(aws, identity, resolver, sdk)
            .await
            .context("starting the AWS backend")?,
    );
    Ok(slipway_server::Backends {
        volumes: backend.clone(),
        snapshots: Some(backend),
    })
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
) -> Result<()> {
    if let Some(LaunchListCmd::List { template, region }) = list {
        let t = match &template {
            Some(p) => Some(slipway_fleet::validate(p).await?),
            None => None,
        };
        let region = t
            .as_ref()
            .map(|t| t.region.clone())
            .or(region)
            .context("give --template or --region (or set AWS_REGION)")?;
        let l = slipway_fleet::launch_list(&region, t.as_ref().map(|t| t.name.as_str())).await?;
        println!("{l}");
        return Ok(());
    }
    let (Some(file), Some(source), Some(mode)) = (template, source, mode) else {
        bail!("slipway launch needs --template FILE --source ID --mode test|cutover");
    };
    let t = slipway_fleet::validate(&file).await?;
    let mode = match mode.as_str() {
        "cutover" => slipway_fleet::LaunchMode::Cutover,
        _ => slipway_fleet::LaunchMode::Test,
    };
    let report = slipway_fleet::launch(
        &t,
        &slipway_fleet::LaunchRequest {
            source,
            mode,
            restore_point,
        },
    )
    .await?;
    println!("{report}");
    Ok(())
}
