//! Slipway on EC2: the AWS implementation of the server's volume and snapshot backends.
//!
//! - [`instance_identity`] reads this instance's id, region, zone, type and private IP from
//!   IMDSv2; [`sdk_config`] loads the default credential chain (the instance profile in
//!   production) with an HTTPS client on rustls + ring and the standard retry strategy.
//! - [`AwsBackend`] implements [`VolumeBackend`](slipway_backend::VolumeBackend) with
//!   one EBS volume per source disk (created in this instance's zone, tagged, attached here,
//!   found again by its tags after a restart) and
//!   [`SnapshotBackend`](slipway_backend::SnapshotBackend) with EBS snapshots as
//!   restore points and the EBS direct APIs for verification and changed bytes.
//! - [`api`]: every EC2/EBS request is counted and timed by one interceptor on the clients;
//!   [`budget`]: the describe budget's clock seam and refresh policy (one DescribeSnapshots
//!   serves every source, spaced by `describe_interval`, backing off on failure).
//! - [`identity_volume`]: the server's data dir on an EBS volume of its own that follows the
//!   server to its replacement (found by tags, attached, formatted only when empty, mounted).
//! - [`DeviceResolver`] finds the block device of an attached volume: [`ById`] in production
//!   (`/dev/disk/by-id`), [`FileMap`] in tests (a sparse file per volume id).
//!
//! Settings, tags, IAM and limits are described in `docs/aws.md`.
//!
//! **Architecture Invariant:** nothing outside this crate (and the binary's wiring) names an
//! AWS SDK type; the server sees only its own traits and `BackendError`.

pub mod api;
mod backend;
pub mod budget;
mod device;
mod direct;
mod error;
mod identity;
pub mod identity_volume;
pub mod metrics;
mod settings;
mod snapshots;
pub mod tags;
mod volumes;

pub use backend::{attachment_limit, AwsBackend};
pub use budget::{Clock, ManualClock, SystemClock};
pub use device::{ById, DeviceResolver, FileMap};
pub use error::AwsError;
pub use identity::{
    https_client, instance_identity, instance_identity_from, sdk_config, InstanceIdentity,
};
pub use settings::{AwsSettings, RawAwsSettings, SUPPORTED_VOLUME_TYPES};
pub use volumes::{
    device_key, device_names, pending_snapshot_limit, volume_size_gib, EBS_BLOCK_SIZE,
};
