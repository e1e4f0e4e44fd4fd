//! The `syncfs` interposer of `slipway-powercut` (built by `slipway-powercut preload OUT.so`,
//! i.e. `rustc --crate-type cdylib` on this file alone: std only, no crates).
//!
//! `syncfs(2)` (and `sync(2)`) never reach a FUSE daemon: the kernel forwards `FUSE_SYNCFS`
//! to virtiofs only. A program that makes files durable with `syncfs` (Slipway's snapshot
//! store does, for its block files) would lose them at every cut on the powercut filesystem,
//! although a real filesystem keeps them. Preloaded into such a program with
//! `SLIPWAY_POWERCUT_CONTROL=SOCKET` and `SLIPWAY_POWERCUT_MOUNT=MOUNTPOINT` in its
//! environment, this `syncfs` first asks the filesystem to persist everything (the control
//! socket's `sync`) when the descriptor is on that mount, then calls the C library's. Without
//! those variables it is the C library's `syncfs` and nothing else.

use std::ffi::{c_char, c_int, c_void};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn __errno_location() -> *mut c_int;
}

const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const EIO: c_int = 5;
const ENOSYS: c_int = 38;

/// The control socket, when `fd` is on the powercut mount named by the environment.
fn control_for(fd: c_int) -> Option<String> {
    let ctl = std::env::var("SLIPWAY_POWERCUT_CONTROL").ok()?;
    let mnt = std::env::var("SLIPWAY_POWERCUT_MOUNT").ok()?;
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let mnt = std::fs::canonicalize(mnt).ok()?;
    path.starts_with(&mnt).then_some(ctl)
}

/// Asks the filesystem behind `ctl` to persist everything; false if it could not.
fn persist(ctl: &str) -> bool {
    let Ok(mut s) = UnixStream::connect(ctl) else {
        return false;
    };
    if writeln!(s, "sync").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("ok")
}

fn set_errno(e: c_int) {
    // SAFETY: errno is the calling thread's own.
    unsafe { *__errno_location() = e };
}

/// `syncfs(2)`, telling the powercut filesystem first.
///
/// # Safety
/// As `syncfs(2)`: any integer; an invalid descriptor fails with EBADF.
#[no_mangle]
pub unsafe extern "C" fn syncfs(fd: c_int) -> c_int {
    if let Some(ctl) = control_for(fd) {
        if !persist(&ctl) {
            set_errno(EIO);
            return -1;
        }
    }
    // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT finds the C library's definition.
    let f = unsafe { dlsym(RTLD_NEXT, c"syncfs".as_ptr()) };
    if f.is_null() {
        set_errno(ENOSYS);
        return -1;
    }
    // SAFETY: the symbol is the C library's syncfs, whose signature this is.
    let real =
        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int) -> c_int>(f) };
    // SAFETY: forwarding the caller's argument.
    unsafe { real(fd) }
}
