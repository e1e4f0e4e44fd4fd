//! slipway-aws against moto's server mode (end-to-end through the real SDK), an IMDSv2
//! stand-in, a throttling proxy, and aws-smithy-mocks for what the emulator cannot model.
//! One test binary; tests that use the emulator take turns on one shared instance of it.

mod support;

mod budget;
mod ebs_direct;
mod iam;
mod identity;
mod identity_volume;
mod mocks;
mod retries;
mod snapshots;
mod volumes;
