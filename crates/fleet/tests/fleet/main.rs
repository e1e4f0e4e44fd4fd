//! slipway-fleet end to end: `apply` and launches against moto's server mode through the real
//! SDK; the AMI's provisioning script installed into a scratch root; the deploy/ files through
//! their validators. One test binary.

mod support;

mod ami;
mod apply;
mod convert;
mod deploy;
mod launch;
mod lifecycle;
