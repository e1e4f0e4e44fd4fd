//! The local test launch ("drill"): boot a restore point in a throw-away VM on this machine
//! and report whether it came up — the embedded local default's way to prove a restore point
//! boots without an AWS account.
//!
//! Steps: export each disk of the restore point to a private work directory (sparse copies;
//! the replica and the restore point are never written), apply the launch conversion to the
//! copies ([`slipway_convert`]) unless told not to, inject the user's check command as a
//! oneshot systemd unit that reports on the second serial port, boot the copies in QEMU with
//! every disk NVMe-attached (like Nitro), and read the serial console as it grows until a
//! login prompt (and the check's status) appears, the guest fails to find its root, panics,
//! or the timeout passes. The VM is killed and the copies deleted afterwards, also on errors
//! and on SIGINT/SIGTERM ([`install_interrupt_handler`]); the console log is kept.
//!
//! KVM is used when it actually runs the guest: `auto` tries it first and falls back to TCG
//! when QEMU reports that KVM failed (these machines have a `/dev/kvm` whose guests stop with
//! an emulation failure).

pub mod qemu;
pub mod watch;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use slipway_convert::{Action, BootMode, Change, ChangeKind, ConvertError};
use slipway_store::snapshot::{Manifest, SnapshotStore};
use slipway_store::StoreError;

pub use qemu::Accel;
use watch::{Console, ConsoleVerdict};

/// Which accelerator to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if it runs the guest, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// How to run a drill.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// Parent of the private work directory (the copies: as large as the disks, sparse).
    pub work_dir: PathBuf,
    /// Apply the launch conversion to the copies.
    pub convert: bool,
    /// A shell command run in the guest once it is up (after network-online.target); its exit
    /// status decides the drill.
    pub check: Option<String>,
    /// From power-on to the verdict.
    pub timeout: Duration,
    pub accel: AccelChoice,
    pub memory_mib: u32,
    /// Where the serial console log is written (kept after the drill).
    pub console_log: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
}

/// How a drill ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Login prompt reached (and the check command, if any, exited 0).
    Booted,
    /// The login prompt was reached but the check command failed.
    CheckFailed,
    RootNotFound,
    EmergencyMode,
    KernelPanic,
    /// The firmware found nothing to boot (OVMF's UEFI shell).
    NoBootDevice,
    /// The VM stopped (powered off, rebooted, QEMU failed) before a verdict.
    VmExited,
    Timeout,
}

/// The check command's result.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub command: String,
    /// None: it had not finished when the drill ended.
    pub exit_code: Option<i32>,
    pub output: String,
}

/// Seconds spent in each step.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub export: f64,
    pub convert: f64,
    pub boot: f64,
}

/// One exported disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub id: String,
    pub size_bytes: u64,
    /// `nvme0n1` for the first, and so on: the name the guest sees.
    pub attached_as: String,
}

/// What a drill did and saw (`slipway launch --local --json`).
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    pub restore_point: String,
    pub source: String,
    /// True when the restore point booted (and the check passed).
    pub ok: bool,
    pub outcome: Outcome,
    pub reached_login: bool,
    pub check: Option<CheckReport>,
    pub disks: Vec<DiskReport>,
    pub boot_mode: BootMode,
    /// `seabios` or `ovmf`.
    pub firmware: &'static str,
    pub accel: Accel,
    /// Why KVM was not used when `auto` tried it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvm_fallback: Option<String>,
    /// Whether the launch conversion was applied.
    pub converted: bool,
    /// The conversion's report: every change, and what was left alone.
    pub conversion: Option<slipway_convert::Report>,
    pub seconds: Timings,
    pub console_log: PathBuf,
    pub console_tail: Vec<String>,
}

/// Why a drill could not be carried out (a guest that does not boot is not an error: see
/// [`DrillReport::outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// exporting a disk failed
    #[error("exporting disk {disk} of restore point {rp}: {source}")]
    Export {
        rp: String,
        disk: String,
        #[source]
        source: StoreError,
    },
    /// conversion refused or failed
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// the disk needs UEFI and no OVMF is installed
    #[error("the boot disk is set up for UEFI and no OVMF firmware was found (Debian: apt-get install ovmf)")]
    NoUefiFirmware,
    /// QEMU could not be started
    #[error("starting {qemu}: {source}")]
    Qemu {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// file I/O failed
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// stopped by a signal
    #[error("interrupted: the VM was stopped and its copies deleted")]
    Interrupted,
}

fn io_at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DrillError + 'a {
    move |source| DrillError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM stop a running drill cleanly (VM killed, copies deleted) instead
/// of killing the process with the copies left behind.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn interrupted() -> Result<(), DrillError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(DrillError::Interrupted)
    } else {
        Ok(())
    }
}

/// The systemd unit and script that run the check command and report on ttyS1. Written into
/// the disposable copy only (never part of a conversion for AWS).
pub fn check_changes(command: &str) -> Vec<Change> {
    let write = |path: &str, content: String, mode: u32, detail: &str| Change {
        kind: ChangeKind::Drill,
        path: path.into(),
        detail: detail.into(),
        action: Action::Write { content, mode },
    };
    vec![
        write(
            "/etc/slipway-check/command",
            format!("{command}\n"),
            0o644,
            "the check command",
        ),
        write(
            "/etc/slipway-check/run",
            format!(
                "#!/bin/sh\n# Written by slipway's local test launch into a disposable copy.\nexec >/dev/ttyS1 2>&1\necho {}\n/bin/sh /etc/slipway-check/command\necho \"{}$?\"\n",
                watch::CHECK_BEGIN,
                watch::CHECK_EXIT
            ),
            0o755,
            "runs the check command, reports on the second serial port",
        ),
        write(
            "/etc/systemd/system/slipway-check.service",
            "[Unit]\nDescription=Slipway test launch check\nWants=network-online.target\nAfter=network-online.target\n\n[Service]\nType=oneshot\nExecStart=/bin/sh /etc/slipway-check/run\n\n[Install]\nWantedBy=multi-user.target\n".into(),
            0o644,
            "oneshot unit for the check command",
        ),
        Change {
            kind: ChangeKind::Drill,
            path: "/etc/systemd/system/multi-user.target.wants/slipway-check.service".into(),
            detail: "check unit enabled".into(),
            action: Action::Symlink {
                target: "/etc/systemd/system/slipway-check.service".into(),
            },
        },
    ]
}

/// A running VM, killed on drop.
struct Vm {
    child: Child,
    stderr: PathBuf,
}

impl Vm {
    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one drill of restore point `m` from `store`.
pub fn run(
    store: &SnapshotStore,
    m: &Manifest,
    opts: &DrillOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<DrillReport, DrillError> {
    fs::create_dir_all(&opts.work_dir).map_err(io_at("creating", &opts.work_dir))?;
    let work = tempfile::Builder::new()
        .prefix(&format!("drill-{}.", m.id))
        .tempdir_in(&opts.work_dir)
        .map_err(io_at("creating a work directory in", &opts.work_dir))?;
    let mut t = Timings::default();

    let started = Instant::now();
    let mut images = Vec::new();
    let mut disks = Vec::new();
    for (i, d) in m.disks.iter().enumerate() {
        interrupted()?;
        progress(&format!(
            "exporting disk {} ({} MiB) of {}",
            d.id,
            d.size >> 20,
            m.id
        ));
        let out = work.path().join(format!("disk{i}.raw"));
        store
            .export(m, &d.id, &out)
            .map_err(|source| DrillError::Export {
                rp: m.id.clone(),
                disk: d.id.clone(),
                source,
            })?;
        images.push(out);
        disks.push(DiskReport {
            id: d.id.clone(),
            size_bytes: d.size,
            attached_as: format!("nvme{i}n1"),
        });
    }
    t.export = started.elapsed().as_secs_f64();
    interrupted()?;

    let started = Instant::now();
    let extra = opts.check.as_deref().map(check_changes).unwrap_or_default();
    let conversion = if opts.convert || !extra.is_empty() {
        progress(if opts.convert {
            "converting the copies for an NVMe-attached boot"
        } else {
            "adding the check command to the copies (no conversion)"
        });
        let r = slipway_convert::convert(
            &images,
            &slipway_convert::Options {
                convert: opts.convert,
                extra,
            },
            progress,
        )?;
        Some(r)
    } else {
        None
    };
    t.convert = started.elapsed().as_secs_f64();
    interrupted()?;

    let boot_mode = match &conversion {
        Some(r) => r.boot_mode,
        None => slipway_convert::inspect(&images[..1])?
            .first()
            .map_or(BootMode::LegacyBios, |l| l.boot_mode),
    };
    let uefi = if boot_mode == BootMode::Uefi {
        let (code, vars) = qemu::find_ovmf().ok_or(DrillError::NoUefiFirmware)?;
        let copy = work.path().join("OVMF_VARS.fd");
        fs::copy(&vars, &copy).map_err(io_at("copying", &vars))?;
        Some(qemu::Uefi { code, vars: copy })
    } else {
        None
    };

    let mut spec = qemu::VmSpec {
        accel: Accel::Tcg,
        memory_mib: opts.memory_mib,
        disks: images.clone(),
        uefi,
        console: opts.console_log.clone(),
        check: work.path().join("check.log"),
    };
    let tries: Vec<Accel> = match opts.accel {
        AccelChoice::Kvm => vec![Accel::Kvm],
        AccelChoice::Tcg => vec![Accel::Tcg],
        AccelChoice::Auto if qemu::kvm_device_usable() => vec![Accel::Kvm, Accel::Tcg],
        AccelChoice::Auto => vec![Accel::Tcg],
    };
    let mut kvm_fallback = None;
    let started = Instant::now();
    let mut result = None;
    for (n, accel) in tries.iter().enumerate() {
        spec.accel = *accel;
        let last = n + 1 == tries.len();
        let b = boot(&spec, opts, work.path(), last, progress)?;
        match b {
            Boot::KvmFailed(why) if !last => {
                progress(&format!(
                    "KVM did not run the guest ({why}); booting again under TCG"
                ));
                kvm_fallback = Some(why);
            }
            Boot::KvmFailed(why) => {
                result = Some((Outcome::VmExited, Console::default(), None, why));
            }
            Boot::Done(o, c, check) => {
                result = Some((o, c, check, String::new()));
                break;
            }
        }
    }
    t.boot = started.elapsed().as_secs_f64();
    let (outcome, console, check_result, _) = result.expect("at least one boot was tried");
    let check = opts.check.as_ref().map(|command| CheckReport {
        command: command.clone(),
        exit_code: check_result.as_ref().map(|c| c.0),
        output: check_result.map(|c| c.1).unwrap_or_default(),
    });
    progress("deleting the copies");
    drop(work);
    Ok(DrillReport {
        restore_point: m.id.clone(),
        source: m.source.clone(),
        ok: outcome == Outcome::Booted,
        outcome,
        reached_login: console.saw_login(),
        check,
        disks,
        boot_mode,
        firmware: if spec.uefi.is_some() {
            "ovmf"
        } else {
            "seabios"
        },
        accel: spec.accel,
        kvm_fallback,
        converted: opts.convert,
        conversion,
        seconds: t,
        console_log: opts.console_log.clone(),
        console_tail: console.tail(40),
    })
}

enum Boot {
    KvmFailed(String),
    Done(Outcome, Console, Option<(i32, String)>),
}

/// How often the growing logs are read.
const POLL: Duration = Duration::from_millis(250);
/// Under `auto`, a KVM guest silent this long is taken as hung and booted again under TCG.
const KVM_SILENCE: Duration = Duration::from_secs(60);
/// How often a progress line is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(15);

fn boot(
    spec: &qemu::VmSpec,
    opts: &DrillOptions,
    work: &Path,
    last_try: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Boot, DrillError> {
    for p in [&spec.console, &spec.check] {
        fs::write(p, b"").map_err(io_at("creating", p))?;
    }
    let stderr_path = work.join(format!("qemu-{}.stderr", spec.accel.as_str()));
    let stderr = fs::File::create(&stderr_path).map_err(io_at("creating", &stderr_path))?;
    let args = qemu::args(spec);
    progress(&format!(
        "booting under {} (timeout {} s): {} {}",
        spec.accel.as_str().to_uppercase(),
        opts.timeout.as_secs(),
        opts.qemu.display(),
        args.join(" ")
    ));
    let child = Command::new(&opts.qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|source| DrillError::Qemu {
            qemu: opts.qemu.clone(),
            source,
        })?;
    let mut vm = Vm {
        child,
        stderr: stderr_path,
    };
    let mut console_file =
        fs::File::open(&spec.console).map_err(io_at("opening", &spec.console))?;
    let mut console = Console::default();
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut next_progress = start + PROGRESS_EVERY;
    let mut buf = Vec::new();
    loop {
        interrupted()?;
        let exited = vm.child.try_wait().ok().flatten().is_some();
        // Read after the exit check, so a VM that exited has its last words read.
        buf.clear();
        console_file
            .read_to_end(&mut buf)
            .map_err(io_at("reading", &spec.console))?;
        console.feed(&buf);
        let check = if opts.check.is_some() {
            watch::parse_check(&fs::read(&spec.check).unwrap_or_default())
        } else {
            None
        };
        if spec.accel == Accel::Kvm && !last_try && qemu::kvm_failed(&vm.stderr()) {
            return Ok(Boot::KvmFailed(
                vm.stderr().lines().next().unwrap_or("").to_string(),
            ));
        }
        let done = |o: Outcome, console: Console, check| Ok(Boot::Done(o, console, check));
        match console.verdict() {
            Some(ConsoleVerdict::RootNotFound) => {
                return done(Outcome::RootNotFound, console, check)
            }
            Some(ConsoleVerdict::KernelPanic) => return done(Outcome::KernelPanic, console, check),
            Some(ConsoleVerdict::EmergencyMode) => {
                return done(Outcome::EmergencyMode, console, check)
            }
            Some(ConsoleVerdict::NoBootDevice) => {
                return done(Outcome::NoBootDevice, console, check)
            }
            Some(ConsoleVerdict::Login) => match (&opts.check, &check) {
                (None, _) => return done(Outcome::Booted, console, check),
                (Some(_), Some((0, _))) => return done(Outcome::Booted, console, check),
                (Some(_), Some(_)) => return done(Outcome::CheckFailed, console, check),
                (Some(_), None) => {}
            },
            None => {}
        }
        if let Some((code, _)) = &check {
            if *code != 0 {
                return done(Outcome::CheckFailed, console, check);
            }
        }
        if exited {
            if spec.accel == Accel::Kvm && !last_try && console.bytes() == 0 {
                return Ok(Boot::KvmFailed(format!(
                    "QEMU exited at once: {}",
                    vm.stderr().lines().last().unwrap_or("")
                )));
            }
            return done(Outcome::VmExited, console, check);
        }
        let now = Instant::now();
        if spec.accel == Accel::Kvm
            && !last_try
            && console.bytes() == 0
            && now - start > KVM_SILENCE
        {
            return Ok(Boot::KvmFailed(format!(
                "no console output in {} s",
                KVM_SILENCE.as_secs()
            )));
        }
        if now >= deadline {
            return done(Outcome::Timeout, console, check);
        }
        if now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            progress(&format!(
                "booting: {} s, console {} KiB: {}",
                (now - start).as_secs(),
                console.bytes() >> 10,
                console.last_line().chars().take(100).collect::<String>()
            ));
        }
        // The logs are plain files QEMU appends to: read them again after a short pause
        // (bounded by the deadline above).
        std::thread::sleep(POLL);
    }
}
