//! Slipway's fleet: replication templates and the replication servers and launches made from
//! them.
//!
//! - [`validate`] reads a replication template (TOML, `docs/replication-template.md`) in two
//!   phases, raw then validated, every error naming the file, the key and the reason.
//! - [`planner::plan`] assigns sources to replication servers: a pure function, deterministic,
//!   bounded by `max_disks_per_server`, stable.
//!
//! **Architecture Invariant:** the planner and template validation do no I/O beyond reading
//! the template files; everything that talks to AWS goes through [`Fleet`].

mod error;
pub mod limits;
pub mod planner;
pub mod template;

pub use error::FleetError;
pub use template::{LaunchSettings, Source, Template};

use std::path::Path;

/// Reads and validates a replication template (and its sources file, if it names one).
pub async fn validate(path: &Path) -> Result<Template, FleetError> {
    template::load(path)
}
