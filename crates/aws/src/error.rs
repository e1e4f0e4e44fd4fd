//! Errors of the AWS backend and how they map onto the server's [`BackendError`].

use std::error::Error as StdError;
use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use slipway_backend::BackendError;
use thiserror::Error;

/// Error codes that mean "slow down": the SDK retries them itself, so seeing one here means the
/// retries ran out.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "InternalError",
    "InternalFailure",
    "InternalServerException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "Unavailable",
];

/// Codes AWS answers when a volume already has as many pending snapshots as it may.
const PENDING_SNAPSHOT_CODES: &[&str] = &[
    "PendingSnapshotLimitExceeded",
    "SnapshotCreationPerVolumeRateExceeded",
];

/// Something the AWS backend could not do.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AwsError {
    /// An AWS call failed after the SDK's own retries (throttling, 5xx, network).
    #[error("{op}: {message} (retries exhausted; try again later)")]
    Unavailable { op: String, message: String },
    /// An AWS call was refused for a reason retrying will not fix (permissions, validation,
    /// missing resources).
    #[error("{op}: {message}")]
    Permanent { op: String, message: String },
    /// Waiting for a state change took longer than the configured bound.
    #[error("timed out after {:?} waiting for {what}", after)]
    Timeout { what: String, after: Duration },
    /// This instance has no free EBS attachment slot.
    #[error("no EBS attachment slot left on this instance ({used} of {limit} in use)")]
    NoAttachmentSlot { used: u32, limit: u32 },
    /// A volume has as many pending snapshots as EBS allows.
    #[error("volume {volume_id} has {pending} pending snapshots (limit {limit})")]
    SnapshotsPending {
        volume_id: String,
        pending: u32,
        limit: u32,
    },
    /// The instance metadata service (IMDSv2) could not be read.
    #[error("instance metadata {path}: {message}")]
    Imds { path: String, message: String },
    /// The block device of an attached volume could not be found or prepared.
    #[error("block device of {volume_id}: {message}")]
    Device { volume_id: String, message: String },
    /// A settings key has a value that cannot be used.
    #[error("settings key `aws.{key}`: {reason}")]
    Settings { key: String, reason: String },
    /// Snapshots EC2 refused to delete because an image uses them (`InvalidSnapshot.InUse`).
    #[error("snapshots {} are in use by an image (a launch registers one from a restore point); the restore point is kept until the image is deregistered", snapshot_ids.join(", "))]
    SnapshotInUse { snapshot_ids: Vec<String> },
    /// A restore point whose snapshots carry `slipway:keep`: never deleted by the server.
    #[error("restore point {rp_id} is kept (slipway:keep = {keep}); remove the tag from its snapshots to delete it")]
    Kept { rp_id: String, keep: String },
    /// AWS answered something this backend cannot make sense of, or resources are in a state
    /// it will not touch (for example a replica attached to another running instance).
    #[error("{0}")]
    Conflict(String),
}

impl AwsError {
    /// A permanent error of operation `op`.
    pub(crate) fn permanent(op: &str, message: impl Into<String>) -> Self {
        AwsError::Permanent {
            op: op.to_string(),
            message: message.into(),
        }
    }

    /// Classifies an SDK error of operation `op`.
    pub(crate) fn from_sdk<E, R>(op: &str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let message = DisplayErrorContext(&err).to_string();
        let op = op.to_string();
        match &err {
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
                AwsError::Unavailable { op, message }
            }
            SdkError::ResponseError(e) => {
                if e.raw().status_code() >= 500 {
                    AwsError::Unavailable { op, message }
                } else {
                    AwsError::Permanent { op, message }
                }
            }
            SdkError::ServiceError(e) => {
                let code = e.err().code().unwrap_or_default();
                let status = e.raw().status_code();
                if THROTTLING_CODES.contains(&code) || status >= 500 || status == 429 {
                    AwsError::Unavailable { op, message }
                } else {
                    AwsError::Permanent { op, message }
                }
            }
            _ => AwsError::Permanent { op, message },
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

/// Whether an SDK error says a volume has too many pending snapshots.
pub(crate) fn is_pending_snapshot_limit<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    sdk_code(err).is_some_and(|c| PENDING_SNAPSHOT_CODES.contains(&c))
}

/// The HTTP status of a raw response (the SDK's response type, or anything in tests).
pub(crate) trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl From<AwsError> for BackendError {
    fn from(e: AwsError) -> Self {
        match e {
            AwsError::Unavailable { .. } | AwsError::Timeout { .. } | AwsError::Imds { .. } => {
                BackendError::Unavailable(e.to_string())
            }
            AwsError::NoAttachmentSlot { used, limit } => {
                BackendError::NoAttachmentSlot { used, limit }
            }
            AwsError::SnapshotsPending {
                volume_id,
                pending,
                limit,
            } => BackendError::SnapshotsPending {
                volume_id,
                pending,
                limit,
            },
            AwsError::Permanent { .. }
            | AwsError::Device { .. }
            | AwsError::Settings { .. }
            | AwsError::Conflict(_) => BackendError::Permanent(e.to_string()),
            AwsError::Kept { .. } => BackendError::Kept(e.to_string()),
            AwsError::SnapshotInUse { .. } => BackendError::InUse(e.to_string()),
        }
    }
}
