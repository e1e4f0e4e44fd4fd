//! `slipway-powercut mount BACKING_DIR MOUNTPOINT [--control SOCKET] [--persist-on-exit]`
//! `slipway-powercut preload OUT.so` (builds the `syncfs` interposer with rustc)
//!
//! A FUSE passthrough over BACKING_DIR that keeps file data unsynced in memory until
//! fsync/fdatasync, and drops it on a cut: `echo cut | nc -U SOCKET` or `kill -USR1 PID`.
//! SIGTERM/SIGINT drop it too (a cut), unless `--persist-on-exit`. Prints one JSON `ready`
//! line on stdout once mounted. See the crate docs and docs/reliability.md.

use std::path::PathBuf;
use std::process::ExitCode;

use slipway_powercut::{run, MountArgs, OnExit};

const USAGE: &str =
    "usage: slipway-powercut mount BACKING_DIR MOUNTPOINT [--control SOCKET] [--persist-on-exit]\n\
       slipway-powercut preload OUT.so   (builds the syncfs interposer to LD_PRELOAD)\n\
  Control socket commands (one a line): cut (drop unsynced data, unmount, exit), sync (persist\n\
  everything, as sync(1) would), status. SIGUSR1 is a cut; SIGTERM/SIGINT cut too unless\n\
  --persist-on-exit.";

fn parse(args: &[String]) -> Result<MountArgs, String> {
    let mut it = args.iter();
    if it.next().map(String::as_str) != Some("mount") {
        return Err(USAGE.into());
    }
    let mut pos = vec![];
    let mut control = None;
    let mut on_exit = OnExit::Cut;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--control" => control = Some(PathBuf::from(it.next().ok_or("--control SOCKET")?)),
            "--persist-on-exit" => on_exit = OnExit::Persist,
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            s => pos.push(PathBuf::from(s)),
        }
    }
    let [backing, mountpoint] = <[PathBuf; 2]>::try_from(pos).map_err(|_| USAGE.to_string())?;
    Ok(MountArgs {
        backing,
        mountpoint,
        control,
        on_exit,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, out] = &args[..] {
        if cmd == "preload" {
            return match slipway_powercut::build_preload(out.as_ref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("slipway-powercut: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    let a = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slipway-powercut: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_mount() {
        let a = parse(&v(&["mount", "b", "m", "--control", "c"])).unwrap();
        assert_eq!(a.backing, PathBuf::from("b"));
        assert_eq!(a.mountpoint, PathBuf::from("m"));
        assert_eq!(a.control, Some(PathBuf::from("c")));
        assert_eq!(a.on_exit, OnExit::Cut);
        let a = parse(&v(&["mount", "b", "m", "--persist-on-exit"])).unwrap();
        assert_eq!(a.on_exit, OnExit::Persist);
        assert!(parse(&v(&["mount", "b"])).is_err());
        assert!(parse(&v(&["umount", "b", "m"])).is_err());
        assert!(parse(&v(&["mount", "b", "m", "--bogus"])).is_err());
    }
}
