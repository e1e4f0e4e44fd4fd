//! The freeze watchdog as the real `slipway-agent freeze-watchdog` process: it thaws a frozen
//! filesystem when the agent goes away (its stdin pipe closes, however the agent died) or its
//! deadline passes, and leaves alone what it was released from or told to skip. The test
//! process plays the agent. Needs root, `losetup`, `mkfs.ext4` and `mount`; skipped otherwise.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use slipway_agent::freeze::{
    self, freeze_fd, open_mount_point, thaw_fd, Consistency, FreezeOptions, Plan, WatchdogCommand,
    WatchdogOutcome,
};

use crate::support::{agent_bin, is_root};

fn can_mount_ext4() -> bool {
    if !is_root() {
        eprintln!("skipped: freezing filesystems needs root");
        return false;
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "umount"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: no {tool}");
            return false;
        }
    }
    true
}

fn run(cmd: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 32 MiB ext4 on a loop device, mounted; thawed, unmounted and detached on drop.
struct Ext4 {
    dev: PathBuf,
    image: PathBuf,
    mount_point: PathBuf,
    mounted: bool,
}

impl Ext4 {
    fn make(dir: &Path) -> Ext4 {
        let image = dir.join("fs.img");
        File::create(&image).unwrap().set_len(32 << 20).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut fs = Ext4 {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            image,
            mount_point: dir.join("mnt"),
            mounted: false,
        };
        run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-E".as_ref(),
                "lazy_itable_init=0,lazy_journal_init=0".as_ref(),
                fs.dev.as_os_str(),
            ],
        );
        std::fs::create_dir_all(&fs.mount_point).unwrap();
        run("mount", &[fs.dev.as_os_str(), fs.mount_point.as_os_str()]);
        fs.mounted = true;
        fs
    }

    fn open(&self) -> File {
        open_mount_point(&self.mount_point).unwrap()
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.mounted {
            if let Ok(f) = open_mount_point(&self.mount_point) {
                let _ = thaw_fd(f.as_fd());
            }
            // A writer the freeze held may still have a file open for a moment.
            let unmounted = (0..100).any(|_| {
                let ok = Command::new("umount")
                    .arg(&self.mount_point)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    std::thread::sleep(Duration::from_millis(50));
                }
                ok
            });
            if !unmounted {
                let _ = Command::new("umount")
                    .arg("--lazy")
                    .arg(&self.mount_point)
                    .status();
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Appends to `path` and fsyncs, in a thread (it sleeps uninterruptibly while frozen).
fn write_in_thread(path: PathBuf) -> Receiver<std::io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| {
            let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
            f.write_all(b"written\n")?;
            f.sync_all()
        })();
        let _ = tx.send(r);
    });
    rx
}

fn assert_blocked(rx: &Receiver<std::io::Result<()>>) {
    match rx.recv_timeout(Duration::from_millis(300)) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("a write was not held by the freeze: {other:?}"),
    }
}

/// Waits for the write to complete; returns how long it took.
fn assert_completes(rx: &Receiver<std::io::Result<()>>, within: Duration) -> Duration {
    let start = Instant::now();
    match rx.recv_timeout(within) {
        Ok(Ok(())) => start.elapsed(),
        other => panic!("the write did not complete within {within:?}: {other:?}"),
    }
}

/// A `slipway-agent freeze-watchdog` guarding one mount point, started by the test.
struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Watchdog {
    /// Starts it with `stdin` as its stdin (a pipe) and waits for its `ready` line.
    fn start(deadline_ms: u64, mount_point: &Path, stdin: Stdio) -> Watchdog {
        let mut child = Command::new(agent_bin())
            .args(["freeze-watchdog", "--deadline-ms", &deadline_ms.to_string()])
            .arg("--")
            .arg(mount_point)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let wd = Watchdog {
            child,
            stdin,
            lines,
        };
        let ready = wd.line();
        assert!(ready.starts_with("ready mnt="), "{ready}");
        assert!(ready.ends_with(" memlock=ok"), "{ready}");
        wd
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    fn line(&self) -> String {
        self.lines.recv_timeout(Duration::from_secs(20)).unwrap()
    }

    fn exit_code(&mut self) -> Option<i32> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < until, "the watchdog did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_watchdog_thaws_when_the_agent_closes_its_pipe() {
    if !can_mount_ext4() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Ext4::make(dir.path());
    let mut wd = Watchdog::start(60_000, &fs.mount_point, Stdio::piped());
    wd.say("freeze 0");
    freeze_fd(fs.open().as_fd()).unwrap();
    let w = write_in_thread(fs.mount_point.join("f"));
    assert_blocked(&w);
    // What the kernel does to a dead agent's end of the pipe.
    drop(wd.stdin.take());
    let took = assert_completes(&w, Duration::from_secs(2));
    assert_eq!(
        wd.line(),
        "fired eof thawed=0 not-frozen= failed=",
        "thawed the mount"
    );
    assert_eq!(wd.exit_code(), Some(1));
    eprintln!("the write completed {took:?} after the pipe closed");
}

#[test]
fn the_watchdog_thaws_when_the_holder_of_its_pipe_is_killed() {
    if !can_mount_ext4() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Ext4::make(dir.path());
    // The pipe's write end is held only by `sleep`, which plays an agent killed with -9.
    let (reader, mut writer) = std::io::pipe().unwrap();
    let mut holder = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .spawn()
        .unwrap();
    writer.write_all(b"freeze 0\n").unwrap();
    drop(writer);
    let mut wd = Watchdog::start(60_000, &fs.mount_point, Stdio::from(reader));
    freeze_fd(fs.open().as_fd()).unwrap();
    let w = write_in_thread(fs.mount_point.join("f"));
    assert_blocked(&w);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_completes(&w, Duration::from_secs(2));
    assert_eq!(wd.line(), "fired eof thawed=0 not-frozen= failed=");
    assert_eq!(wd.exit_code(), Some(1));
}

#[test]
fn the_watchdog_thaws_at_its_deadline() {
    if !can_mount_ext4() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Ext4::make(dir.path());
    // The watchdog starts its deadline before it says `ready`, so the lower bound is measured
    // from before it was started (from after its ready line, a loaded machine that is slow to
    // deliver the line made the deadline look early: 636 ms of 700 in a CI run).
    let before_start = Instant::now();
    let mut wd = Watchdog::start(700, &fs.mount_point, Stdio::piped());
    let ready = Instant::now();
    wd.say("freeze 0");
    freeze_fd(fs.open().as_fd()).unwrap();
    let w = write_in_thread(fs.mount_point.join("f"));
    assert_blocked(&w);
    // Not a word more, and the pipe stays open.
    assert_completes(&w, Duration::from_secs(5));
    let held = before_start.elapsed();
    let after_ready = ready.elapsed();
    assert!(
        held >= Duration::from_millis(700) && after_ready < Duration::from_secs(3),
        "held {held:?} from the start, {after_ready:?} from the ready line"
    );
    assert_eq!(wd.line(), "fired deadline thawed=0 not-frozen= failed=");
    assert_eq!(wd.exit_code(), Some(1));
    assert!(wd.stdin.is_some(), "the pipe was open all along");
}

#[test]
fn the_watchdog_leaves_alone_what_it_was_released_from_or_told_to_skip() {
    if !can_mount_ext4() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Ext4::make(dir.path());
    let theirs = fs.open();

    // Released: it exits without thawing, even if the filesystem is still frozen.
    let mut wd = Watchdog::start(60_000, &fs.mount_point, Stdio::piped());
    wd.say("freeze 0");
    freeze_fd(theirs.as_fd()).unwrap();
    wd.say("thawed");
    assert_eq!(wd.line(), "released");
    assert_eq!(wd.exit_code(), Some(0));
    let w = write_in_thread(fs.mount_point.join("f"));
    assert_blocked(&w);

    // Skipped (the agent's FIFREEZE said EBUSY: someone else's freeze): EOF thaws nothing.
    let mut wd = Watchdog::start(60_000, &fs.mount_point, Stdio::piped());
    wd.say("freeze 0");
    wd.say("skip 0");
    drop(wd.stdin.take());
    assert_eq!(wd.line(), "fired eof thawed= not-frozen= failed=");
    assert_blocked(&w);

    thaw_fd(theirs.as_fd()).unwrap();
    assert_completes(&w, Duration::from_secs(2));
}

#[test]
fn a_freeze_guarded_by_the_real_binary_holds_writers_until_the_thaw() {
    if !can_mount_ext4() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Ext4::make(dir.path());
    let plan = Plan::for_disks(&[&fs.dev]).unwrap();
    assert_eq!(plan.mount_points(), vec![fs.mount_point.clone()]);
    let opts = FreezeOptions {
        watchdog: WatchdogCommand {
            program: agent_bin().into(),
            args: vec!["freeze-watchdog".into()],
        },
        ..FreezeOptions::default()
    };
    let frozen = freeze::freeze(&plan, &opts).unwrap();
    assert_eq!(frozen.report().frozen, vec![fs.mount_point.clone()]);
    assert_eq!(frozen.report().watchdog_memlock.as_deref(), Some("ok"));
    let w = write_in_thread(fs.mount_point.join("f"));
    assert_blocked(&w);
    let report = frozen.thaw();
    assert_completes(&w, Duration::from_secs(2));
    assert_eq!(report.consistency(), Consistency::Consistent);
    assert_eq!(report.watchdog, WatchdogOutcome::Released);
    eprintln!(
        "sync {:?}, freeze {:?}, thaw {:?}, frozen for {:?}",
        report.freeze.sync_took, report.freeze.freeze_took, report.thaw_took, report.frozen_for
    );
}
