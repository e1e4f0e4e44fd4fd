//! Errors of slipway-fleet: a template that cannot be used, or an AWS call that failed.

use std::error::Error as StdError;
use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use thiserror::Error;

/// Something a fleet operation could not do.
#[derive(Debug, Error)]
pub enum FleetError {
    /// The template (or its sources file) could not be read.
    #[error("template {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// A template key is missing, unknown, of the wrong type, or has an unusable value.
    #[error("template {file}: key `{key}`: {reason}")]
    Template {
        file: String,
        key: String,
        reason: String,
    },
    /// An AWS call failed (after the SDK's own retries).
    #[error("{op}: {message}")]
    Aws { op: String, message: String },
    /// Waiting for an instance or volume state took longer than the bound.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    /// AWS holds something this operation will not touch, or that contradicts the request.
    #[error("{0}")]
    Conflict(String),
    /// What the request names does not exist (a restore point, a source, a launch section).
    #[error("{0}")]
    NotFound(String),
    /// A lifecycle command that the source's lifecycle state does not allow (a conflict with
    /// what AWS holds); `hint` says what the state means or what to do instead.
    #[error("source {source_id} is {state}: {hint}")]
    WrongState {
        source_id: String,
        state: crate::LifecycleState,
        hint: String,
    },
    /// `slipway launch terminate` named a cutover instance without `--cutover`: a cutover is
    /// ended by `slipway cutover finalize`, or rolled back on purpose.
    #[error(
        "instance {instance} is the cutover instance of source {source_id}: a cutover is ended by \
         `slipway cutover finalize`; to roll it back (terminate it and deregister its image), \
         add --cutover"
    )]
    CutoverInstance { source_id: String, instance: String },
    /// The launch conversion refused the restore point's disks (unknown distribution,
    /// encrypted or LVM root, …) or failed converting them; no image was registered.
    #[error("launch conversion of restore point {restore_point}: {source}")]
    Conversion {
        restore_point: String,
        #[source]
        source: slipway_convert::ConvertError,
    },
    /// The launch was interrupted (SIGINT/SIGTERM); the conversion's volumes were deleted.
    #[error("interrupted: the launch stopped and deleted the volumes its conversion had made")]
    Interrupted,
    /// The instance that should run the launch conversion cannot (unknown, not running, not
    /// this instance).
    #[error("{0}")]
    ConversionHost(String),
}

impl FleetError {
    pub(crate) fn sdk<E, R>(op: &str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        FleetError::Aws {
            op: op.to_string(),
            message: DisplayErrorContext(&err).to_string(),
        }
    }
}

/// The error code of an SDK error, if AWS sent one.
pub(crate) fn sdk_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<&str> {
    match err {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    }
}
