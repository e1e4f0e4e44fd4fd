//! Live sources: the agent follows a block device while a filesystem mounted on it is written.
//!
//! A filesystem writes file data with bios straight to the device, past the device's page
//! cache, so an agent reading the device buffered would keep seeing what its first pass cached
//! there. These tests need root (loop devices, mount) and skip themselves otherwise.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rand::{RngCore, SeedableRng};

use crate::support::*;

/// Whether this process can make loop devices and filesystems; says why not on stderr.
fn can_run(test: &str) -> bool {
    root_with_tools(test, &["losetup", "mkfs.ext4", "mount", "umount", "dd"])
}

/// A loop device over an image file, optionally with a filesystem mounted on it. Dropping it
/// unmounts and detaches, also when a test panics; declare it before the server and the agent
/// so they are stopped first.
struct LoopDevice {
    dev: PathBuf,
    mount: Option<PathBuf>,
    attached: bool,
}

impl LoopDevice {
    /// Creates a zeroed image of `size` bytes (or keeps an existing one) and attaches it.
    fn attach(image: &Path, size: u64, losetup_args: &[&str]) -> LoopDevice {
        if !image.exists() {
            std::fs::File::create(image).unwrap().set_len(size).unwrap();
        }
        let mut args = vec!["--find", "--show"];
        args.extend_from_slice(losetup_args);
        args.push(image.to_str().unwrap());
        let dev = PathBuf::from(sh("losetup", &args).trim());
        LoopDevice {
            dev,
            mount: None,
            attached: true,
        }
    }

    /// Makes an ext4 (initialised in full now, so no background thread writes the device
    /// later) and mounts it on `dir`.
    fn mkfs_and_mount(&mut self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let dev = self.dev.to_str().unwrap();
        sh(
            "mkfs.ext4",
            &["-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev],
        );
        sh("mount", &[dev, dir.to_str().unwrap()]);
        self.mount = Some(dir.to_owned());
    }

    /// Unmounts. The agent's freeze of a restore point (and its watchdog) holds the mount
    /// point open for a moment, and `umount` then says "target is busy": try again until it
    /// succeeds, within a bound.
    fn umount(&mut self) {
        if let Some(m) = self.mount.take() {
            wait_until("umount", Duration::from_secs(20), || {
                Command::new("umount")
                    .arg(&m)
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
        }
    }

    fn detach(&mut self) {
        self.umount();
        if self.attached {
            self.attached = false;
            sh("losetup", &["-d", self.dev.to_str().unwrap()]);
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let m = m.to_str().unwrap();
            let ok = Command::new("umount")
                .arg(m)
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                let _ = Command::new("umount").args(["-l", m]).output();
            }
        }
        if self.attached {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
        }
    }
}

/// The first `len` bytes (whole MiB) of `dev`, read with `O_DIRECT` (`dd iflag=direct`):
/// what is on the device, whatever its page cache holds.
fn read_direct(dev: &Path, len: u64) -> Vec<u8> {
    assert_eq!(len % (1 << 20), 0);
    let out = Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .args(["bs=1M", &format!("count={}", len >> 20)])
        .args(["iflag=direct", "status=none"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout.len() as u64 == len,
        "dd of {}: {}",
        dev.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Whether the replica `volume` begins with the bytes on `dev` (read directly).
fn replica_matches_device(volume: &Path, dev: &Path, len: u64) -> bool {
    let want = read_direct(dev, len);
    let got = std::fs::read(volume).unwrap_or_default();
    got.len() >= want.len() && got[..want.len()] == want[..]
}

/// Whether `block` appears in `hay` at an offset that is a multiple of its length.
fn holds_block(hay: &[u8], block: &[u8]) -> bool {
    hay.chunks_exact(block.len()).any(|c| c == block)
}

/// A file rewritten in place through the ext4 mounted on a followed loop device reaches the
/// replica. Buffered reads of the device fail this: the first pass caches the old blocks in
/// the device's page cache, the filesystem's writes bypass that cache, and every rescan reads
/// the old bytes again.
#[test]
fn rewrites_through_a_mounted_filesystem_reach_the_replica() {
    if !can_run("rewrites_through_a_mounted_filesystem_reach_the_replica") {
        return;
    }
    const SIZE: u64 = 64 << 20;
    const FILE_LEN: usize = 4 << 20;
    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("live.img");
    let mut lo = LoopDevice::attach(&image, SIZE, &[]);
    lo.mkfs_and_mount(&d.path().join("mnt"));
    let file = d.path().join("mnt").join("data.bin");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(31);
    let mut old = vec![0u8; FILE_LEN];
    rng.fill_bytes(&mut old);
    std::fs::write(&file, &old).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .sync_all()
        .unwrap();
    sh("sync", &[]);

    let server = Server::start(&d.path().join("var"));
    let token = server.token("live");
    let disk_id = lo.dev.file_name().unwrap().to_str().unwrap().to_owned();
    let vol = server.volume("live", &disk_id);
    let agent = Agent::start(
        &server,
        "live",
        &token,
        &[&lo.dev],
        &["--follow", "--rescan-interval", "1s"],
    );
    wait_until_or(
        "the first pass over the device",
        Duration::from_secs(120),
        || server.disk_state("live", &disk_id) == "continuous",
        || format!("{}\n{}", agent.log_text(), server.log()),
    );

    // Rewrite the file in place (no truncate: the same blocks of the device), durably.
    let mut new = vec![0u8; FILE_LEN];
    rng.fill_bytes(&mut new);
    let f = OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&new, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    sh("sync", &[]);
    let on_device = read_direct(&lo.dev, SIZE);
    assert!(
        holds_block(&on_device, &new[..1024]) && !holds_block(&on_device, &old[..1024]),
        "the rewrite is on the device, in place"
    );

    wait_until_or(
        "the replica to hold the rewritten file (as an O_DIRECT read of the device has it)",
        Duration::from_secs(60),
        || replica_matches_device(&vol, &lo.dev, SIZE),
        || {
            let got = std::fs::read(&vol).unwrap_or_default();
            format!(
                "replica holds the old file: {}, the new one: {}\nagent log:\n{}",
                holds_block(&got, &old[..1024]),
                holds_block(&got, &new[..1024]),
                agent.log_text()
            )
        },
    );

    // Unmounting writes the superblock; the agent follows that too. Then the image file, read
    // after the device is gone, is what the replica must be.
    lo.umount();
    wait_until_or(
        "the replica to follow the unmount",
        Duration::from_secs(60),
        || replica_matches_device(&vol, &lo.dev, SIZE),
        || agent.log_text(),
    );
    drop(agent);
    lo.detach();
    assert_same(&image, &vol, SIZE);
}

/// A device whose logical block is larger than `--block-size` is refused with a clear error
/// (direct reads need whole logical blocks); with `--block-size` equal to it, it replicates.
#[test]
fn a_device_with_logical_blocks_larger_than_the_block_size() {
    if !can_run("a_device_with_logical_blocks_larger_than_the_block_size") {
        return;
    }
    const SIZE: u64 = 16 << 20;
    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("4k.img");
    make_disk(&image, SIZE, 41);
    let lo = LoopDevice::attach(&image, SIZE, &["--sector-size", "4096"]);
    let server = Server::start(&d.path().join("var"));
    let token = server.token("big");
    let disk_id = lo.dev.file_name().unwrap().to_str().unwrap().to_owned();

    let mut a = Agent::start(&server, "big", &token, &[&lo.dev], &[]);
    let st = a.wait(Duration::from_secs(30));
    let log = a.log_text();
    assert_eq!(st.code(), Some(2), "a permanent error:\n{log}");
    assert!(
        log.contains("logical block size of 4096 bytes, which does not divide the block size 512"),
        "{log}"
    );

    let mut b = Agent::start(
        &server,
        "big",
        &token,
        &[&lo.dev],
        &["--block-size", "4096"],
    );
    let st = b.wait(Duration::from_secs(60));
    assert!(st.success(), "{}", b.log_text());
    assert_same(&image, &server.volume("big", &disk_id), SIZE);
}

/// Follow mode on a block device, as root: the kernel reports the writes (tracefs), so a
/// change reaches the replica although the agent never rereads the disk on its own (the
/// rescan interval is an hour). Without tracking the change would wait for that hour.
#[test]
fn kernel_tracked_writes_reach_the_replica_without_a_rescan() {
    if !can_run("kernel_tracked_writes_reach_the_replica_without_a_rescan") {
        return;
    }
    const SIZE: u64 = 64 << 20;
    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("tracked.img");
    let mut lo = LoopDevice::attach(&image, SIZE, &[]);
    lo.mkfs_and_mount(&d.path().join("mnt"));
    sh("sync", &[]);
    let server = Server::start(&d.path().join("var"));
    let token = server.token("trk");
    let disk_id = lo.dev.file_name().unwrap().to_str().unwrap().to_owned();
    let vol = server.volume("trk", &disk_id);
    let agent = Agent::start(
        &server,
        "trk",
        &token,
        &[&lo.dev],
        &["--follow", "--rescan-interval", "1h"],
    );
    wait_until_or(
        "the first pass over the device",
        Duration::from_secs(120),
        || server.disk_state("trk", &disk_id) == "continuous",
        || format!("{}\n{}", agent.log_text(), server.log()),
    );
    assert!(
        agent
            .log_text()
            .contains("follow mode: writes tracked in the kernel"),
        "{}",
        agent.log_text()
    );
    let disk = server.disk_report("trk", &disk_id);
    assert_eq!(disk["tracking"], "kernel", "{disk}");
    let metrics = server.http_get("/metrics").1;
    let line =
        format!("slipway_disk_tracking{{disk=\"{disk_id}\",mode=\"kernel\",source=\"trk\"}} 1");
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    // The scheduler's first restore point asks the agent to look for changes before its
    // marker; let it pass first, so only the tracker can bring what is written below.
    wait_until(
        "the first scheduled restore point",
        Duration::from_secs(60),
        || !server.restore_points().is_empty(),
    );
    // Several files through the filesystem, each made durable (fsync + rename, as a database
    // or a package manager does).
    let mut rng = rand::rngs::SmallRng::seed_from_u64(77);
    let mnt = d.path().join("mnt");
    for i in 0..8 {
        let mut data = vec![0u8; 256 << 10];
        rng.fill_bytes(&mut data);
        let tmp = mnt.join(format!("f{i}.tmp"));
        std::fs::write(&tmp, &data).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&tmp)
            .unwrap()
            .sync_all()
            .unwrap();
        std::fs::rename(&tmp, mnt.join(format!("f{i}"))).unwrap();
    }
    sh("sync", &[]);
    wait_until_or(
        "the replica to hold the new files (as an O_DIRECT read of the device has them)",
        Duration::from_secs(60),
        || replica_matches_device(&vol, &lo.dev, SIZE),
        || agent.log_text(),
    );
    lo.umount();
    wait_until_or(
        "the replica to follow the unmount",
        Duration::from_secs(60),
        || replica_matches_device(&vol, &lo.dev, SIZE),
        || agent.log_text(),
    );
    drop(agent);
    lo.detach();
    assert_same(&image, &vol, SIZE);
}

/// A restore point of a followed, mounted block device is taken with its filesystem frozen
/// (a short, bounded freeze, reported by the agent), and the exported point is a filesystem
/// that needs no repair.
#[test]
fn a_restore_point_of_a_mounted_device_freezes_it_briefly() {
    if !can_run("a_restore_point_of_a_mounted_device_freezes_it_briefly") {
        return;
    }
    const SIZE: u64 = 64 << 20;
    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("frz.img");
    let mut lo = LoopDevice::attach(&image, SIZE, &[]);
    lo.mkfs_and_mount(&d.path().join("mnt"));
    let server = Server::start(&d.path().join("var"));
    let token = server.token("frz");
    let disk_id = lo.dev.file_name().unwrap().to_str().unwrap().to_owned();
    let agent = Agent::start(
        &server,
        "frz",
        &token,
        &[&lo.dev],
        &["--follow", "--rescan-interval", "1s"],
    );
    wait_until_or(
        "the first pass",
        Duration::from_secs(120),
        || server.disk_state("frz", &disk_id) == "continuous",
        || agent.log_text(),
    );
    // Dirty data in the page cache when the point is asked for: the freeze must flush it.
    std::fs::write(
        d.path().join("mnt").join("dirty.bin"),
        vec![0x42u8; 3 << 20],
    )
    .unwrap();
    let rp = server.create_restore_point("frz");
    let log = agent.log_text();
    assert!(
        log.contains("filesystems frozen: one instant"),
        "the marker was placed under a freeze:\n{log}"
    );
    let listed = server.restore_points();
    let point = listed.iter().find(|m| m["id"] == rp.as_str()).unwrap();
    assert_eq!(point["consistency"], "one-instant", "{point}");
    let metrics = server.http_get("/metrics").1;
    assert!(
        metric(
            &metrics,
            "slipway_source_freeze_seconds_count{source=\"frz\"}"
        ) >= 1.0,
        "the freeze is exported"
    );
    crate::promtool_check(&metrics);
    let out = d.path().join("rp.img");
    server.export(&rp, &disk_id, &out);
    let fsck = Command::new("e2fsck")
        .args(["-fn", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn of the exported point: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    // The file was only in the page cache when the point was asked for: the freeze wrote it.
    let cat = Command::new("debugfs")
        .args(["-R", "cat /dirty.bin", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        cat.stdout.len() == 3 << 20 && cat.stdout.iter().all(|&b| b == 0x42),
        "the point holds the file written before it was asked for ({} bytes read): {}",
        cat.stdout.len(),
        String::from_utf8_lossy(&cat.stderr)
    );
    drop(agent);
}
