//! The real binary over a real FUSE mount: what a cut keeps and what it drops, and the
//! `syncfs` interposer. Root only (skipped otherwise, and without /dev/fuse).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_slipway-powercut");

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: needs root and /dev/fuse");
        return false;
    }
    true
}

fn mount(backing: &Path, mnt: &Path, ctl: &Path) -> Child {
    let mut c = Command::new(BIN)
        .arg("mount")
        .arg(backing)
        .arg(mnt)
        .arg("--control")
        .arg(ctl)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("ready"), "{line}");
    c
}

fn command(ctl: &Path, cmd: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(ctl).unwrap();
    writeln!(s, "{cmd}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

fn wait_exit(c: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "slipway-powercut did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_cut_keeps_synced_data_and_metadata_and_drops_the_rest() {
    if !can_run() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (b, m, ctl) = (d.path().join("b"), d.path().join("m"), d.path().join("ctl"));
    std::fs::create_dir_all(&b).unwrap();
    std::fs::create_dir_all(&m).unwrap();
    let mut c = mount(&b, &m, &ctl);

    // Synced: data and size survive.
    let f = std::fs::File::create(m.join("synced")).unwrap();
    f.write_all_at(b"durable", 0).unwrap();
    f.sync_data().unwrap();
    f.write_all_at(b"DUR", 0).unwrap(); // after the sync: lost
                                        // Unsynced, closed: close persists nothing; read-your-writes before the cut.
    std::fs::write(m.join("closed"), b"gone at the cut").unwrap();
    assert_eq!(std::fs::read(m.join("closed")).unwrap(), b"gone at the cut");
    assert_eq!(std::fs::read(m.join("synced")).unwrap(), b"DURable");
    // A rename moves the unsynced data with the file; the name itself is metadata (kept).
    std::fs::create_dir(m.join("dir")).unwrap();
    std::fs::write(m.join("tmp"), b"renamed, never synced").unwrap();
    std::fs::rename(m.join("tmp"), m.join("dir/final")).unwrap();
    assert_eq!(
        std::fs::read(m.join("dir/final")).unwrap(),
        b"renamed, never synced"
    );
    // A size change is data too.
    let t = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("synced"))
        .unwrap();
    t.set_len(3).unwrap();
    assert_eq!(std::fs::read(m.join("synced")).unwrap(), b"DUR");
    drop((f, t));
    let status = command(&ctl, "status");
    assert!(status.starts_with("ok pending_bytes"), "{status}");

    let answer = command(&ctl, "cut");
    assert!(answer.starts_with("ok dropped"), "{answer}");
    wait_exit(&mut c);
    // The backing dir is what a machine would find after the power cut.
    assert_eq!(std::fs::read(b.join("synced")).unwrap(), b"durable");
    assert_eq!(std::fs::read(b.join("closed")).unwrap(), b"");
    assert_eq!(std::fs::read(b.join("dir/final")).unwrap(), b"");

    // Mounted again: the same view; `sync` persists everything.
    let mut c = mount(&b, &m, &ctl);
    assert_eq!(std::fs::read(m.join("synced")).unwrap(), b"durable");
    std::fs::write(m.join("closed"), b"kept by sync").unwrap();
    assert!(command(&ctl, "sync").starts_with("ok"));
    // SIGUSR1 is a cut too. (O_TRUNC is a size change: data, lost with the rest.)
    std::fs::write(m.join("synced"), b"lost").unwrap();
    Command::new("kill")
        .args(["-USR1", &c.id().to_string()])
        .status()
        .unwrap();
    wait_exit(&mut c);
    assert_eq!(std::fs::read(b.join("closed")).unwrap(), b"kept by sync");
    assert_eq!(std::fs::read(b.join("synced")).unwrap(), b"durable");
}

/// `syncfs` never reaches FUSE; the preloaded interposer tells the filesystem.
#[test]
fn the_preloaded_syncfs_persists_the_filesystem() {
    if !can_run() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let so = d.path().join("libsyncfs.so");
    let st = Command::new(BIN).arg("preload").arg(&so).status().unwrap();
    assert!(st.success(), "building the interposer");
    let (b, m, ctl) = (d.path().join("b"), d.path().join("m"), d.path().join("ctl"));
    std::fs::create_dir_all(&b).unwrap();
    std::fs::create_dir_all(&m).unwrap();
    let mut c = mount(&b, &m, &ctl);
    // `sync -f FILE` (coreutils) is a syncfs of FILE's filesystem.
    std::fs::write(m.join("a"), b"made durable by syncfs").unwrap();
    let st = Command::new("sync")
        .arg("-f")
        .arg(m.join("a"))
        .env("LD_PRELOAD", &so)
        .env("SLIPWAY_POWERCUT_CONTROL", &ctl)
        .env("SLIPWAY_POWERCUT_MOUNT", &m)
        .status()
        .unwrap();
    assert!(st.success());
    // Without the interposer a syncfs never reaches the filesystem.
    std::fs::write(m.join("b"), b"a plain syncfs does nothing here").unwrap();
    assert!(Command::new("sync")
        .arg("-f")
        .arg(m.join("b"))
        .status()
        .unwrap()
        .success());
    assert!(command(&ctl, "cut").starts_with("ok"));
    wait_exit(&mut c);
    assert_eq!(
        std::fs::read(b.join("a")).unwrap(),
        b"made durable by syncfs"
    );
    assert_eq!(std::fs::read(b.join("b")).unwrap(), b"");
}
