//! Slipway's fleet: replication templates and the replication servers and launches made from
//! them. Clap-free: the `slipway` binary parses flags and calls the functions below, which
//! return printable reports (`Display`).
//!
//! - [`validate`] reads a replication template (TOML, `docs/replication-template.md`) in two
//!   phases, raw then validated, every error naming the file, the key and the reason.
//! - [`planner::plan`] assigns sources to replication servers: a pure function, deterministic,
//!   bounded by `max_disks_per_server`, stable (existing assignments never move unless they
//!   stop fitting).
//! - [`apply`] reconciles EC2 with the template: launches, instance-type switches (stop,
//!   modify, start), replacements (changed AMI or subnet: the replica volumes move), moves,
//!   retirements; `dry_run` only plans. Idempotent.
//! - [`launch`] creates a test or cutover instance from a restore point's snapshots, converted
//!   for Nitro first unless the request says not to (`convert.rs`: volumes from the
//!   snapshots, attached to this instance, converted by slipway-convert, snapshotted);
//!   [`launch_list`] reads the launches back from their tags.
//! - The launch lifecycle, as AWS MGN's: [`lifecycle::derive`] (pure) says where a source is
//!   (`not-ready` … `cutover-complete`); [`launch_status`], [`terminate`] (ends test
//!   launches and deregisters their images) and [`finalize`] (keeps the chosen restore points,
//!   which stops the source's replication) are its commands (`cutover.rs`).
//!
//! **Architecture Invariant:** the planner and template validation do no I/O beyond reading
//! the template files; everything that talks to AWS goes through [`Fleet`], and EC2 tags are
//! the only state (no local state file).

mod convert;
mod cutover;
mod error;
mod fleet;
mod launch;
pub mod lifecycle;
pub mod limits;
pub mod planner;
pub mod probe;
pub mod template;

pub use convert::{
    boot_mode, Conversion, ConversionRecord, ConvertOn, ConvertedDisk, CONVERTED_FROM,
    ROLE_CONVERSION, ROLE_CONVERTED,
};
pub use cutover::{
    FinalizeReport, FinalizeRequest, ImageCleanup, KeptImage, LifecycleStatus, LiveLaunch,
    SourceStatus, TerminateReport, TerminateRequest,
};
pub use error::FleetError;
pub use fleet::{
    decode_sources, drift, encode_sources, Action, ApplyOptions, ApplyReport, Drift, Fleet,
    ServerReport, ServerState, ROLE_SERVER, SERVER_INDEX, SETTINGS_SHA, SOURCES_PREFIX, TEMPLATE,
};
pub use launch::{
    LaunchDevice, LaunchList, LaunchMode, LaunchRecord, LaunchReport, LaunchRequest, RestorePoint,
    RpDisk, LAUNCHED_MS, LAUNCH_MODE, ROLE_LAUNCH,
};
pub use lifecycle::LifecycleState;
pub use probe::{MetricsProbe, SettingsProbe};
pub use template::{LaunchOverride, LaunchSettings, LaunchTarget, Source, Template};

use std::path::Path;

/// `slipway template validate FILE`: reads and validates a replication template (and its
/// sources file, if it names one). No AWS call.
pub async fn validate(path: &Path) -> Result<Template, FleetError> {
    template::load(path)
}

/// `slipway template apply FILE [--dry-run]`: reconciles the template's replication servers
/// in its region (default credential chain; `AWS_ENDPOINT_URL` honoured).
pub async fn apply(template: &Template, opts: &ApplyOptions) -> Result<ApplyReport, FleetError> {
    Fleet::connect(&template.region)
        .await
        .apply(template, opts)
        .await
}

/// `slipway launch --template FILE --source ID --mode test|cutover [--restore-point RP]`.
pub async fn launch(template: &Template, req: &LaunchRequest) -> Result<LaunchReport, FleetError> {
    Fleet::connect(&template.region)
        .await
        .launch(template, req)
        .await
}

/// `slipway launch list [--template FILE | --region R]`: launches in `region`, of `template`
/// only if given.
pub async fn launch_list(region: &str, template: Option<&str>) -> Result<LaunchList, FleetError> {
    Fleet::connect(region).await.launches(template).await
}

/// `slipway launch status --template FILE [--source ID]`: each source's lifecycle state.
pub async fn launch_status(
    template: &Template,
    source: Option<&str>,
) -> Result<LifecycleStatus, FleetError> {
    Fleet::connect(&template.region)
        .await
        .lifecycle(template, source)
        .await
}

/// `slipway launch terminate --template FILE --source ID [--instance I] [--cutover]`.
pub async fn terminate(
    template: &Template,
    req: &TerminateRequest,
) -> Result<TerminateReport, FleetError> {
    Fleet::connect(&template.region)
        .await
        .terminate_launches(template, req)
        .await
}

/// `slipway cutover finalize --template FILE --source ID [--keep RP]...`.
pub async fn finalize(
    template: &Template,
    req: &FinalizeRequest,
) -> Result<FinalizeReport, FleetError> {
    Fleet::connect(&template.region)
        .await
        .finalize(template, req)
        .await
}
