//! Slipway on EC2: the AWS implementation of the server's volume and snapshot backends.
//!
//! - [`instance_identity`] reads this instance's id, region, zone, type and private IP from
//!   IMDSv2; [`sdk_config`] loads the default credential chain (the instance profile in
//!   production) with an HTTPS client on rustls + ring and the standard retry strategy.
//! - [`AwsBackend`] implements [`VolumeBackend`](slipway_server::backend::VolumeBackend) with
//!   one EBS volume per source disk (created in this instance's zone, tagged, attached here,
//!   found again by its tags after a restart) and
//!   [`SnapshotBackend`](slipway_server::backend::SnapshotBackend) with EBS snapshots as
//!   restore points and the EBS direct APIs for verification and changed bytes.
//! - [`DeviceResolver`] finds the block device of an attached volume: [`ById`] in production
//!   (`/dev/disk/by-id`), [`FileMap`] in tests (a sparse file per volume id).
//!
//! Settings, tags, IAM and limits are described in `docs/aws.md`.
//!
//! **Architecture Invariant:** nothing outside this crate (and the binary's wiring) names an
//! AWS SDK type; the server sees only its own traits and `BackendError`.

mod backend;
mod device;
mod direct;
mod error;
mod identity;
mod settings;
mod snapshots;
pub mod tags;
mod volumes;

pub use backend::AwsBackend;
pub use device::{ById, DeviceResolver, FileMap};
pub use error::AwsError;
pub use identity::{
    https_client, instance_identity, instance_identity_from, sdk_config, InstanceIdentity,
};
pub use settings::{AwsSettings, RawAwsSettings, SUPPORTED_VOLUME_TYPES};
pub use volumes::{device_names, pending_snapshot_limit, volume_size_gib, EBS_BLOCK_SIZE};
