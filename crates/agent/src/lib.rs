//! The Slipway reference agent: reads source disks and streams them to a replication server.
//!
//! The agent is split the way the protocol crate is: the decisions (what to send for a chunk,
//! which ops are still owed to the server, what a resume answer means, which phase to report)
//! are plain structs in [`plan`], [`retained`], [`changes`] and [`state`], unit-tested without
//! sockets; [`run`] and [`session`] are the async shell that reads disks, drives QUIC streams
//! and reconnects; [`cli`] is the command line on top.
//!
//! Architecture invariant: an op leaves memory only when the server has said it is durable,
//! so any connection loss is repaired by resending, never by guessing.

pub mod agent_toml;
pub mod changes;
pub mod cli;
pub mod config;
pub mod discover;
pub mod disk;
pub mod freeze;
pub mod journal;
pub mod persist;
pub mod plan;
mod report;
pub mod resync;
pub mod retained;
pub mod run;
mod session;
pub mod state;
pub mod status;
pub mod throttle;
pub mod track;

pub use config::{Config, ConfigError};
pub use run::{replicate, replicate_until, AgentError, Outcome, Progress, RunSummary};
