//! A restore point's copy-on-write blocks stay within `replication.capture_memory`: the rest
//! spills to a file, so server memory does not grow with the disk during a full capture.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use rand::{RngCore, SeedableRng};

use crate::support::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A server whose restore points' reads pause 5 s, with `capture_memory = "4MiB"`.
fn start_server(dir: &Path, var: &Path) -> Server {
    let config = dir.join("slipway.toml");
    // Small queues and windows: what the server buffers in flight is bounded by them, and
    // here it must not hide what the capture holds.
    std::fs::write(
        &config,
        "[replication]\ncapture_memory = \"4MiB\"\ndisk_queue = \"4MiB\"\n\
         [quic]\nstream_window = \"2MiB\"\nconnection_window = \"4MiB\"\n",
    )
    .unwrap();
    Server::start_env(
        var,
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
        &[("SLIPWAY_FAILPOINT", "capture-before-read")],
    )
}

/// Rewrites every byte of `src` in place (no truncation: the agent keeps the file open).
fn rewrite(src: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(src).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(52);
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..SIZE).step_by(MIB as usize) {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, off).unwrap();
    }
    f.sync_all().unwrap();
}

/// The server's first restore point of a 64 MiB disk is a full capture (no parent), and its
/// read is paused 5 s by a failpoint. Meanwhile the same agent (`--follow`) rescans and sends
/// a rewrite of the whole source, so the writer must preserve nearly every block of the
/// capture before overwriting it. With `capture_memory = "4MiB"` the server's peak RSS grows
/// far less than the disk (the preserved blocks go to the spill file, which leaves no name
/// behind), the exported restore point is the source at the marker, byte for byte, and the
/// replica then has the rewrite.
#[test]
fn a_full_capture_of_a_rewritten_disk_keeps_server_memory_bounded() {
    let d = tempfile::tempdir().unwrap();
    let var = d.path().join("var");
    let server = start_server(d.path(), &var);
    let token = server.token("big");
    let src = d.path().join("big.img");
    make_disk(&src, SIZE, 51);
    let at_marker = d.path().join("at-marker.img");
    std::fs::copy(&src, &at_marker).unwrap();
    let follow = ["--follow", "--rescan-interval", "1s"];
    let mut agent = Agent::start(&server, "big", &token, &[&src], &follow);
    wait_until("a capture is being read", Duration::from_secs(120), || {
        server.log().contains("failpoint capture-before-read")
    });
    // The initial sync is behind us: its queues set the peak so far.
    let before = server.peak_rss_kib();

    rewrite(&src);

    wait_until(
        "the restore point is listed",
        Duration::from_secs(120),
        || !server.restore_points().is_empty(),
    );
    let after = server.peak_rss_kib();
    let (_, metrics) = server.http_get("/metrics");
    let spilled = metric(&metrics, "slipway_capture_spilled_bytes_total") as u64;
    let growth_mib = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "server VmHWM {before} KiB before the rewrite, {after} KiB after \
         (+{growth_mib:.1} MiB); spilled {} MiB",
        spilled / MIB
    );
    assert!(
        growth_mib < 32.0,
        "server peak RSS grew {growth_mib:.1} MiB during a capture of a {} MiB disk",
        SIZE / MIB
    );
    // The test only means something if the rewrite overtook the capture's read.
    assert!(
        spilled >= 16 * MIB,
        "only {spilled} bytes spilled: the rewrite did not overtake the capture"
    );
    assert_eq!(
        std::fs::read_dir(var.join("spill")).unwrap().count(),
        0,
        "spill files have no name"
    );

    let rp = server.restore_points()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let exported = d.path().join("rp.img");
    server.export(&rp, "big.img", &exported);
    assert_same(&at_marker, &exported, SIZE);
    server.verify(&rp);
    wait_until(
        "the replica has the rewrite",
        Duration::from_secs(120),
        || same_bytes(&src, &server.volume("big", "big.img"), SIZE),
    );
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
}

/// Decision (docs/decisions.md, "Restore points"): a spill that fails fails the restore point,
/// not replication. The spill directory is a symlink to an 8 MiB filesystem, so the same
/// rewrite during a paused full capture runs out of space spilling: that restore point fails,
/// the writer goes on (the replica gets the rewrite, the disk is not in error), and the next
/// restore point, taken once the disk is quiet again, is the source byte for byte.
#[test]
fn a_spill_that_runs_out_of_space_fails_the_restore_point_not_replication() {
    if !is_root() {
        eprintln!("skipped: the small filesystem is a loop mount and needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(d.path(), 8);
    let var = d.path().join("var");
    std::fs::create_dir_all(&var).unwrap();
    std::os::unix::fs::symlink(&fs.mount, var.join("spill")).unwrap();
    let server = start_server(d.path(), &var);
    let token = server.token("big");
    let src = d.path().join("big.img");
    make_disk(&src, SIZE, 53);
    let follow = ["--follow", "--rescan-interval", "1s"];
    let mut agent = Agent::start(&server, "big", &token, &[&src], &follow);
    wait_until("a capture is being read", Duration::from_secs(120), || {
        server.log().contains("failpoint capture-before-read")
    });
    rewrite(&src);
    wait_until("the restore point failed", Duration::from_secs(120), || {
        server.log().contains("restore point failed")
    });
    let log = server.log();
    assert!(
        log.contains("restore point capture failed; replication goes on")
            && log.contains("No space left on device"),
        "{log}"
    );
    assert!(!log.contains("volume failed"), "{log}");
    wait_until(
        "the replica has the rewrite",
        Duration::from_secs(120),
        || same_bytes(&src, &server.volume("big", "big.img"), SIZE),
    );
    wait_until(
        "a restore point is listed",
        Duration::from_secs(120),
        || !server.restore_points().is_empty(),
    );
    let state = server.disk_state("big", "big.img");
    assert!(state != "error", "{state}");
    let rp = server.restore_points()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let exported = d.path().join("rp.img");
    server.export(&rp, "big.img", &exported);
    assert_same(&src, &exported, SIZE);
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    drop(server);
    drop(fs);
}
