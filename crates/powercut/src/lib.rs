//! `slipway-powercut`: real power cuts for tests of the real binaries.
//!
//! `kill -9` leaves the page cache alive, so a server that acknowledged a write right after
//! `pwrite` passes every kill test. This crate is a FUSE passthrough filesystem over a backing
//! directory that keeps every file's written data in its own memory until that file is
//! fsync'd, and throws away whatever was not synced when told to (the LazyFS technique):
//! mount it under a server's data dir, cut, mount it again on the same backing dir, and the
//! server sees what a machine would see after losing power.
//!
//! - [`overlay`]: the I/O-free core (one file's unsynced writes over a backing store).
//! - [`fs`]: the FUSE filesystem and its model of what persists when.
//! - [`run`]: mount, serve the control socket, handle signals, unmount.
//! - [`build_preload`]: the `syncfs` interposer (`preload/syncfs.rs`, `LD_PRELOAD`ed into the
//!   program under test), since FUSE never sees `syncfs`.

pub mod fs;
pub mod overlay;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::MountOption;

/// What to do at SIGTERM/SIGINT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Drop unsynced data, as a cut does (the default: a test never gets more durability
    /// than it asked for).
    Cut,
    /// Persist everything first, as a clean shutdown of a real machine would.
    Persist,
}

/// Options of `slipway-powercut mount`.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// A Unix socket taking one command a line: `cut`, `sync`, `status`.
    pub control: Option<PathBuf>,
    pub on_exit: OnExit,
}

/// The source of the `syncfs` interposer: a standalone file (std only, no crates) so that it
/// can be built into a shared object with nothing but `rustc`.
pub const PRELOAD_SOURCE: &str = include_str!("../preload/syncfs.rs");

/// Builds the `syncfs` interposer into the shared object `out` with `rustc` (`$RUSTC` if
/// set). A program run with `LD_PRELOAD=out`, `SLIPWAY_POWERCUT_CONTROL=SOCKET` and
/// `SLIPWAY_POWERCUT_MOUNT=MOUNTPOINT` tells the filesystem about each of its `syncfs` calls
/// on that mount (the control socket's `sync`) before making the real one.
pub fn build_preload(out: &Path) -> std::io::Result<()> {
    let src = out.with_extension("rs");
    std::fs::write(&src, PRELOAD_SOURCE)?;
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let o = std::process::Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "cdylib",
            "-C",
            "opt-level=1",
        ])
        .arg("--crate-name")
        .arg("slipway_powercut_syncfs")
        .arg("-o")
        .arg(out)
        .arg(&src)
        .output()?;
    if !o.status.success() {
        return Err(std::io::Error::other(format!(
            "rustc failed building the syncfs interposer: {}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(())
}

fn lock(s: &Mutex<fs::State>) -> std::sync::MutexGuard<'_, fs::State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unmounts `mountpoint` lazily (the FUSE session then ends).
fn unmount(mountpoint: &Path) {
    if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 on a NUL-terminated path.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Ends the filesystem: a cut (or a full sync first, for [`OnExit::Persist`]). Nothing is
/// persisted after this returns; the caller then unmounts (which ends the process).
fn finish(state: &Mutex<fs::State>, how: OnExit) -> String {
    let mut s = lock(state);
    if how == OnExit::Persist {
        if let Err(e) = s.sync_all() {
            eprintln!("slipway-powercut: persisting at exit failed: {e}");
        }
    }
    let d = s.cut();
    format!("dropped {} bytes in {} files", d.bytes, d.files)
}

/// Runs one control connection: a command a line, an answer a line.
fn serve_control(conn: std::os::unix::net::UnixStream, state: &Mutex<fs::State>, mnt: &Path) {
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let answer = match line.trim() {
            "cut" => {
                let msg = finish(state, OnExit::Cut);
                eprintln!("slipway-powercut: cut: {msg}");
                let _ = writeln!(out, "ok {msg}");
                let _ = out.flush();
                // Exiting closes /dev/fuse: the kernel aborts the connection, so requests of
                // processes that still hold files there fail at once (a lazy unmount alone
                // would wait for them to close).
                unmount(mnt);
                std::process::exit(0);
            }
            "sync" => match lock(state).sync_all() {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error {e}"),
            },
            "status" => {
                let s = lock(state);
                let p = s.pending();
                let st = s.stats;
                format!(
                    "ok pending_bytes {} pending_files {} writes {} written_bytes {} fsyncs {} synced_bytes {}",
                    p.bytes, p.files, st.writes, st.written_bytes, st.fsyncs, st.synced_bytes
                )
            }
            "" => continue,
            other => format!("error unknown command {other:?} (cut, sync, status)"),
        };
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// Mounts, prints a `ready` line on stdout, serves until a cut, a signal or an unmount.
/// SIGUSR1 is a cut; SIGTERM and SIGINT end it as `on_exit` says.
pub fn run(args: MountArgs) -> std::io::Result<()> {
    let backing = std::fs::canonicalize(&args.backing)?;
    let mountpoint = std::fs::canonicalize(&args.mountpoint)?;
    // Signals go to a thread of their own: block them here, before any thread starts.
    // SAFETY: plain libc signal-set calls on a set we own.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let state = Arc::new(Mutex::new(fs::State::new(&backing)?));
    let opts = [
        MountOption::FSName(format!("powercut:{}", backing.display())),
        MountOption::Subtype("slipway-powercut".into()),
        MountOption::RW,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::AllowOther,
    ];
    let mut session = fuser::Session::new(fs::PowerCutFs::new(state.clone()), &mountpoint, &opts)?;

    {
        let (state, mnt, how) = (state.clone(), mountpoint.clone(), args.on_exit);
        std::thread::spawn(move || loop {
            let mut sig = 0;
            // SAFETY: sigwait on the set blocked above; writes the signal number to `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            let how = if sig == libc::SIGUSR1 {
                OnExit::Cut
            } else {
                how
            };
            let msg = finish(&state, how);
            eprintln!("slipway-powercut: signal {sig}: {msg}");
            unmount(&mnt);
            std::process::exit(0);
        });
    }
    if let Some(ctl) = &args.control {
        let _ = std::fs::remove_file(ctl);
        let listener = UnixListener::bind(ctl)?;
        let (state, mnt) = (state.clone(), mountpoint.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (state, mnt) = (state.clone(), mnt.clone());
                std::thread::spawn(move || serve_control(conn, &state, &mnt));
            }
        });
    }
    println!(
        "{{\"event\":\"ready\",\"backing\":\"{}\",\"mountpoint\":\"{}\",\"pid\":{}}}",
        backing.display(),
        mountpoint.display(),
        std::process::id()
    );
    std::io::stdout().flush()?;
    let r = session.run();
    // An unmount from outside (umount) is not a cut: say what was still unsynced.
    let mut s = lock(&state);
    let p = s.pending();
    s.cut();
    drop(s);
    if p.bytes > 0 {
        eprintln!(
            "slipway-powercut: unmounted with {} unsynced bytes in {} files: dropped",
            p.bytes, p.files
        );
    }
    r
}
