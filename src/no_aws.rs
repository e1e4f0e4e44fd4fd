//! Stand-ins for the AWS commands in a `slipway` built without the `aws` feature (as `make
//! run` builds it, to start in minutes instead of compiling the AWS SDK). Each one refuses
//! with what to do instead; nothing else changes.

use std::path::PathBuf;

use anyhow::{bail, Result};
use slipway_server::settings::Settings;

use crate::{AwsLaunchOptions, CutoverCmd, LaunchListCmd, TemplateCmd};

const REBUILD: &str = "this slipway was built without AWS support; build it with \
    `cargo build --release --features aws` (the AMI's binary has it)";

pub(crate) async fn backends(settings: &Settings) -> Result<slipway_server::Backends> {
    let _ = settings;
    bail!("backend = \"aws\" in the settings: {REBUILD}")
}

pub(crate) async fn mount_identity_volume(settings: &Settings) -> Result<()> {
    let _ = settings;
    bail!("slipway identity-volume: {REBUILD}")
}

pub(crate) async fn template(cmd: TemplateCmd) -> Result<()> {
    let _ = cmd;
    bail!("slipway template: {REBUILD}")
}

pub(crate) async fn launch(
    list: Option<LaunchListCmd>,
    template: Option<PathBuf>,
    source: Option<String>,
    mode: Option<String>,
    restore_point: Option<String>,
    opts: AwsLaunchOptions,
) -> Result<()> {
    let _ = (list, template, source, mode, restore_point, opts);
    bail!("slipway launch: {REBUILD}")
}

pub(crate) async fn cutover(cmd: CutoverCmd) -> Result<()> {
    let _ = cmd;
    bail!("slipway cutover: {REBUILD}")
}
