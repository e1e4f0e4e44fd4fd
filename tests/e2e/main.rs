//! End-to-end tests: the real `slipway` and `slipway-agent` binaries over loopback QUIC.
//! One test binary (ripgrep style) so the binaries are built and linked once.

#[cfg(feature = "aws")]
mod aws_backend;
mod boot;
mod capture_memory;
mod crate_graph;
mod data_path;
#[cfg(feature = "aws")]
mod fleet_switch;
mod freeze;
mod live_restore_points;
mod live_source;
mod network;
mod pit_sim;
mod powercut;
mod quic_windows;
mod refusals;
mod reliability;
mod restore_points;
mod soak;
mod support;

/// Runs `promtool check metrics` on an exposition; panics with its complaints.
pub fn promtool_check(metrics: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
