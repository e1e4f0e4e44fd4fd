//! Launches that boot (issue 15): a real Debian root disk from "another hypervisor" — its
//! initramfs has no NVMe driver, its fstab and kernel command line name `/dev/sda1` — is
//! replicated by the real agent to the real server; a restore point of it is launched
//! locally (`slipway launch --mode test --local`) with its disk NVMe-attached, as on Nitro.
//! Without conversion it must fail to find its root (that run is the proof the converted one
//! needs: put conversion's initramfs step back out and the converted boot fails the same way);
//! with conversion it must reach its login prompt and pass a check command run inside it.
//!
//! Ignored in `make test` (a TCG boot takes a minute or two, the image a few minutes to
//! build): `make test-boot` runs them, as root, with qemu-system-x86, mmdebstrap and extlinux
//! installed (.ci/run installs them). The image is built once by tests/boot/build-debian-image.sh
//! and cached at target/boot/debian-bookworm.img (or $SLIPWAY_BOOT_IMAGE).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

fn image() -> PathBuf {
    let p = std::env::var_os("SLIPWAY_BOOT_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/boot/debian-bookworm.img")
        });
    if !p.exists() {
        assert!(
            is_root(),
            "the boot tests need root (loop devices, mount, chroot)"
        );
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let t = Instant::now();
        let st = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/boot/build-debian-image.sh"))
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "building the Debian image failed");
        eprintln!(
            "built {} in {:.0} s",
            p.display(),
            t.elapsed().as_secs_f64()
        );
    }
    p
}

/// Runs `slipway launch --mode test --local …` and returns its JSON report (it exits non-zero
/// when the guest does not boot; the report is printed all the same).
fn launch(server: &Server, rp: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "launch",
        "--mode",
        "test",
        "--local",
        "--restore-point",
        rp,
        "--json",
    ];
    args.extend_from_slice(extra);
    let t = Instant::now();
    let (ok, out, err) = server.cli(&args);
    eprintln!(
        "launch {extra:?}: {:.0} s, exit ok={ok}\n{err}",
        t.elapsed().as_secs_f64()
    );
    let r: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): stdout {out:?}\nstderr {err}"));
    assert_eq!(
        ok,
        r["ok"].as_bool().unwrap(),
        "exit status and report disagree: {r:#}"
    );
    r
}

/// Replicates `src` as source `source`, disk `disk0`, until the replica is continuous and
/// identical; takes a restore point and returns its id.
fn replicate_and_take_restore_point(server: &Server, source: &str, src: &Path) -> String {
    let token = server.token(source);
    let disk = format!("{}:disk0", src.display());
    let mut agent = Agent::start(
        server,
        source,
        &token,
        &[Path::new(&disk)],
        &["--follow", "--rescan-interval", "2s"],
    );
    let vol = server.volume(source, "disk0");
    let same = || {
        Command::new("cmp")
            .arg("-s")
            .arg(src)
            .arg(&vol)
            .status()
            .is_ok_and(|s| s.success())
    };
    wait_until_or(
        "the replica to be continuous and identical to the image",
        Duration::from_secs(600),
        || server.disk_state(source, "disk0") == "continuous" && same(),
        || agent.log_text(),
    );
    let rp = server.create_restore_point(source);
    let _ = agent.child.kill();
    let _ = agent.wait(Duration::from_secs(30));
    rp
}

fn console(r: &serde_json::Value) -> String {
    std::fs::read_to_string(r["console_log"].as_str().unwrap()).unwrap_or_default()
}

fn changed(r: &serde_json::Value) -> Vec<String> {
    r["conversion"]["changes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["path"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "boots a VM under TCG for minutes: make test-boot"]
fn a_foreign_debian_boots_on_nvme_only_after_conversion() {
    assert!(
        is_root(),
        "the boot tests need root (loop devices, mount, chroot)"
    );
    let img = image();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("debian.img");
    // The source disk: a sparse copy of the cached image, so the test never changes the cache.
    let st = Command::new("cp")
        .args(["--sparse=always"])
        .arg(&img)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let server = Server::start(&d.path().join("var"));
    let t = Instant::now();
    let rp = replicate_and_take_restore_point(&server, "foreign", &src);
    eprintln!(
        "replicated and took {rp} in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let vol = server.volume("foreign", "disk0");

    // As it is, the machine cannot find its root on an NVMe disk: no nvme driver in its
    // initramfs, and root=/dev/sda1.
    let r = launch(&server, &rp, &["--no-convert", "--timeout", "300s"]);
    assert_eq!(r["outcome"], "root-not-found", "{r:#}");
    assert_eq!(r["reached_login"], false);
    assert_eq!(r["converted"], false);
    assert_eq!(r["disks"][0]["attached_as"], "nvme0n1");
    assert_eq!(r["boot_mode"], "legacy-bios");
    // (The drill stops at the first line of the initramfs' complaint: the lines after it,
    // "ALERT! /dev/sda1 does not exist", may or may not be in the log yet.)
    let log = console(&r);
    assert!(
        log.contains("Gave up waiting for root file system device")
            && log.contains("root=/dev/sda1"),
        "{log}"
    );

    // Converted, it boots from the NVMe disk by UUID, gets an address by DHCP on a NIC it has
    // never seen, and runs the check command.
    let check = "grep -q 10.0.2.15 /proc/net/fib_trie && echo dhcp-ok; findmnt -n -o SOURCE /; cat /proc/cmdline; grep -c nvme /proc/modules";
    let r = launch(&server, &rp, &["--check", check, "--timeout", "600s"]);
    assert_eq!(r["outcome"], "booted", "{r:#}\n{}", console(&r));
    assert_eq!(r["ok"], true);
    assert_eq!(r["reached_login"], true);
    assert_eq!(r["check"]["exit_code"], 0, "{r:#}");
    let out = r["check"]["output"].as_str().unwrap();
    assert!(out.contains("dhcp-ok"), "{out}");
    assert!(out.contains("/dev/nvme0n1p1"), "{out}");
    let uuid = r["conversion"]["root"]["uuid"].as_str().unwrap();
    assert!(out.contains(&format!("root=UUID={uuid}")), "{out}");
    assert!(out.contains("console=ttyS0"), "{out}");
    assert_eq!(r["conversion"]["distro"]["family"], "debian");
    let c = changed(&r);
    for want in [
        "/etc/fstab",
        "/boot/extlinux/extlinux.conf",
        "/etc/initramfs-tools/modules",
        "update-initramfs -u -k all",
        "/etc/systemd/network/80-slipway-dhcp.network",
        "systemctl enable systemd-networkd.service",
    ] {
        assert!(c.iter().any(|p| p == want), "{want} not in {c:?}");
    }

    // Stopped in the middle of a boot (SIGTERM, as Ctrl-C's SIGINT), the launch kills its VM
    // and deletes its copies before it exits.
    interrupted_launch_leaves_nothing_behind(&server, &rp, d.path());

    // Neither launch wrote the replica or the restore point; the copies are gone.
    let (ok, out, err) = server.cli(&["restore-points", "verify", &rp]);
    assert!(ok, "{out}{err}");
    let same = Command::new("cmp").arg(&src).arg(&vol).status().unwrap();
    assert!(same.success(), "the replica changed");
    let launches = d.path().join("var/launches");
    let left: Vec<_> = std::fs::read_dir(&launches)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".console.log"))
        .collect();
    assert!(left.is_empty(), "copies left behind: {left:?}");
}

fn interrupted_launch_leaves_nothing_behind(server: &Server, rp: &str, dir: &Path) {
    use std::io::BufRead;
    let data_dir = dir.join("var");
    let mut child = Command::new(SLIPWAY)
        .args(["launch", "--mode", "test", "--local", "--restore-point", rp])
        .args([
            "--no-convert",
            "--accel",
            "tcg",
            "--timeout",
            "300s",
            "--data-dir",
        ])
        .arg(&data_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let booting = l.contains("booting under TCG");
                seen.push(l);
                if booting {
                    break;
                }
            }
            Err(_) => panic!("the launch never started its VM: {seen:#?}"),
        }
    }
    // The VM is running: its work directory (with the copy) exists.
    let work: Vec<PathBuf> = std::fs::read_dir(data_dir.join("launches"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("drill-")
        })
        .collect();
    assert_eq!(work.len(), 1, "{work:?}");
    let qemu_running = |work: &Path| {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(work.to_str().unwrap()))
                .unwrap_or(false)
        })
    };
    // The line is printed as QEMU is spawned: wait for the process itself.
    wait_until("QEMU to run on the copy", Duration::from_secs(60), || {
        qemu_running(&work[0])
    });
    let t = Instant::now();
    sh("kill", &["-TERM", &child.id().to_string()]);
    let mut status = None;
    wait_until(
        "the interrupted launch to exit",
        Duration::from_secs(30),
        || {
            status = child.try_wait().unwrap();
            status.is_some()
        },
    );
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(!status.unwrap().success());
    assert!(rest.iter().any(|l| l.contains("interrupted")), "{rest:#?}");
    assert!(!work[0].exists(), "the copies are still there");
    assert!(!qemu_running(&work[0]), "QEMU still runs");
    eprintln!(
        "interrupted launch: stopped and cleaned up in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = server;
}

/// A source image attached whole (`losetup -P`, as a source server's disk) with its root
/// partition mounted and a writer busy in it; dropping it stops the writer, unmounts and
/// detaches, also when the test panics.
struct LiveSource {
    dev: String,
    mnt: PathBuf,
    writer: Option<std::process::Child>,
    mounted: bool,
}

impl LiveSource {
    fn start(image: &Path, mnt: &Path) -> LiveSource {
        let dev = sh("losetup", &["-f", "--show", "-P", image.to_str().unwrap()])
            .trim()
            .to_string();
        let mut s = LiveSource {
            dev: dev.clone(),
            mnt: mnt.to_path_buf(),
            writer: None,
            mounted: false,
        };
        // The partition: this kernel's loop partition scan may find none (no MBR parser built
        // in), so add it explicitly (BLKPG) when it is not there; and its node, which udev
        // or devtmpfs make where they run, from sysfs otherwise.
        let name = dev.trim_start_matches("/dev/");
        let part = format!("{dev}p1");
        let sys = format!("/sys/block/{name}/{name}p1/dev");
        if !Path::new(&sys).exists() {
            sh("partx", &["-a", &dev]);
        }
        wait_until(
            "the partition of the loop device",
            Duration::from_secs(10),
            || Path::new(&sys).exists(),
        );
        if !Path::new(&part).exists() {
            let mm = std::fs::read_to_string(&sys).unwrap();
            let (ma, mi) = mm.trim().split_once(':').unwrap();
            sh("mknod", &[&part, "b", ma, mi]);
        }
        std::fs::create_dir_all(mnt).unwrap();
        sh("mount", &[&part, mnt.to_str().unwrap()]);
        s.mounted = true;
        // Small files and a log line, each fsync'd: the journal is always busy, and a line in
        // the log is on the disk once the next one is there (the loop waits for each fsync).
        // Bounded by WRITER_LIMIT_S whatever happens to the test.
        let script = format!(
            "mkdir -p {m}/var/tmp/slipway-work; end=$(( $(date +%s) + {lim} )); i=0; \
             while [ $(date +%s) -lt $end ]; do i=$((i+1)); \
             dd if=/dev/urandom of={m}/var/tmp/slipway-work/f$((i % 200)) bs=64k count=4 conv=fsync status=none; \
             echo $i | dd of={m}/var/tmp/slipway-work/log oflag=append conv=notrunc,fsync status=none; done",
            m = mnt.display(),
            lim = WRITER_LIMIT_S
        );
        // Its own process group, so that stopping it stops the dd it is running too.
        use std::os::unix::process::CommandExt;
        s.writer = Some(
            Command::new("sh")
                .args(["-c", &script])
                .process_group(0)
                .spawn()
                .unwrap(),
        );
        s
    }
}

const WRITER_LIMIT_S: u32 = 600;

impl Drop for LiveSource {
    fn drop(&mut self) {
        if let Some(mut w) = self.writer.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", w.id())])
                .status();
            let _ = w.wait();
        }
        if self.mounted {
            let m = self.mnt.to_str().unwrap();
            let ok = Command::new("umount")
                .arg(m)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A restore point taken while the source's root filesystem is mounted and written, without
/// freezing it (`--no-freeze`): the point is crash-consistent only, its ext4 journal holds
/// transactions to replay (conversion's mount replays it; without conversion the guest would).
/// Converted and launched, it must boot and pass its check, with the writer's log there.
#[test]
#[ignore = "boots a VM under TCG for minutes: make test-boot"]
fn a_restore_point_of_a_mounted_busy_root_boots_after_journal_replay() {
    assert!(
        is_root(),
        "the boot tests need root (loop devices, mount, chroot)"
    );
    let img = image();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("live.img");
    let st = Command::new("cp")
        .args(["--sparse=always"])
        .arg(&img)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let live = LiveSource::start(&src, &d.path().join("mnt"));
    let server = Server::start(&d.path().join("var"));
    let token = server.token("live");
    let disk = format!("{}:disk0", live.dev);
    let mut agent = Agent::start(
        &server,
        "live",
        &token,
        &[Path::new(&disk)],
        &["--follow", "--rescan-interval", "1s", "--no-freeze"],
    );
    wait_until_or(
        "the first pass over the live source",
        Duration::from_secs(600),
        || server.disk_state("live", "disk0") == "continuous",
        || format!("{}\n{}", agent.log_text(), server.log()),
    );
    // The check looks for the writer's log in the launched guest: it must be on the disk
    // before the restore point's marker. A second line means the first one's fsync returned.
    let log = live.mnt.join("var/tmp/slipway-work/log");
    wait_until(
        "two fsync'd lines in the writer's log",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .count()
                >= 2
        },
    );
    // The server refuses while the disk is briefly not continuous: ask until it takes one.
    let deadline = Instant::now() + Duration::from_secs(300);
    let rp = loop {
        let (ok, out, err) =
            server.cli(&["restore-points", "create", "--source", "live", "--wait"]);
        if ok {
            break out.trim().to_string();
        }
        assert!(Instant::now() < deadline, "no restore point: {err}");
        wait_until(
            "the disk to be continuous again",
            Duration::from_secs(60),
            || server.disk_state("live", "disk0") == "continuous",
        );
    };
    let _ = agent.child.kill();
    let _ = agent.wait(Duration::from_secs(30));
    drop(live);

    let check = "findmnt -n -o SOURCE /; test -s /var/tmp/slipway-work/log && echo work-log-ok";
    let r = launch(&server, &rp, &["--check", check, "--timeout", "600s"]);
    assert_eq!(r["outcome"], "booted", "{r:#}\n{}", console(&r));
    let out = r["check"]["output"].as_str().unwrap();
    assert!(
        out.contains("/dev/nvme0n1p1") && out.contains("work-log-ok"),
        "{out}"
    );
}

/// A GPT disk with an EFI system partition is launched with OVMF (UEFI), not SeaBIOS; with
/// nothing on its ESP the firmware falls through to its shell, which the launch reports as
/// `no-boot-device` at once rather than waiting for its timeout. (Needs no root: no
/// conversion.)
#[test]
#[ignore = "boots a VM under TCG: make test-boot"]
fn a_gpt_disk_with_an_esp_is_launched_with_ovmf() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("uefi.img");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&src)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"label: gpt\nstart=2048, size=32768, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n",
        )
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let server = Server::start(&d.path().join("var"));
    let rp = replicate_and_take_restore_point(&server, "uefi", &src);
    let r = launch(
        &server,
        &rp,
        &["--no-convert", "--accel", "tcg", "--timeout", "300s"],
    );
    assert_eq!(r["boot_mode"], "uefi", "{r:#}");
    assert_eq!(r["firmware"], "ovmf", "{r:#}");
    assert_eq!(r["outcome"], "no-boot-device", "{r:#}\n{}", console(&r));
}
