//! The shell of conversion: attach the copies' partitions to loop devices (by offset, so no
//! partition scanning or udev is needed), find and mount the root filesystem (and `/boot`,
//! `/boot/efi` as its fstab says), collect [`Facts`], plan, and carry out the plan — file
//! writes confined to the root (symbolic links are resolved inside it, never on the host),
//! commands in a chroot with `/dev`, `/proc` and `/sys` bound. Everything attached or mounted
//! is undone by a guard, also on errors and panics.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::disk::{self, BootMode, Content, DiskLayout, LayoutError};
use crate::distro::Distro;
use crate::plan::{self, Action, Change, Facts, KernelModules, PartRef, Refusal};

/// An error converting (or preparing) a restore point's disks.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// a disk's layout could not be read
    #[error("reading the layout of {path}: {source}")]
    Layout {
        path: PathBuf,
        #[source]
        source: LayoutError,
    },
    /// the machine cannot be converted
    #[error("cannot convert: {0}")]
    Refused(#[from] Refusal),
    /// no root filesystem was found
    #[error("no partition of the restore point's disks holds a Linux root filesystem (etc/os-release): {0}")]
    NoRoot(String),
    /// not root
    #[error("conversion mounts the copies (loop devices, chroot): it must run as root")]
    NotPrivileged,
    /// a tool could not be started
    #[error("running {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    /// a command failed
    #[error("{cmd} failed ({status}): {output}")]
    Command {
        cmd: String,
        status: String,
        output: String,
    },
    /// file I/O failed
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// a symbolic link loop inside the root
    #[error("too many symbolic links resolving {0} inside the root filesystem")]
    SymlinkLoop(String),
}

fn io_at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ConvertError + 'a {
    move |source| ConvertError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What to do to the copies.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Plan and apply the conversion; false applies only `extra` (`--no-convert` with a check
    /// command) and refuses nothing but a missing root.
    pub convert: bool,
    /// Changes applied after the conversion's (the test launch's check unit). Only `Write` and
    /// `Symlink` actions.
    pub extra: Vec<Change>,
}

/// The root filesystem conversion found.
#[derive(Clone, Debug, Serialize)]
pub struct RootInfo {
    pub disk: usize,
    pub partition: u32,
    pub fs: String,
    pub uuid: String,
}

/// What conversion found and did (`slipway launch --json` prints it).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Boot mode of the disk holding the root (legacy-bios, uefi, hybrid).
    pub boot_mode: BootMode,
    pub root: RootInfo,
    /// None when only `extra` was applied.
    pub distro: Option<Distro>,
    pub initramfs_tool: Option<&'static str>,
    /// Every change made, in order.
    pub changes: Vec<Change>,
    /// What was checked and left alone, or could not be done.
    pub notes: Vec<String>,
}

/// Reads the layout of each disk (no privileges needed).
pub fn inspect(disks: &[PathBuf]) -> Result<Vec<DiskLayout>, ConvertError> {
    disks
        .iter()
        .map(|p| {
            let f = fs::File::open(p).map_err(io_at("opening", p))?;
            disk::probe(&f).map_err(|source| ConvertError::Layout {
                path: p.clone(),
                source,
            })
        })
        .collect()
}

/// Fails with [`ConvertError::NotPrivileged`] unless this process may convert (runs as root):
/// for callers that make copies at a cost (EBS volumes) and want to know before.
pub fn require_privileges() -> Result<(), ConvertError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ConvertError::NotPrivileged);
    }
    Ok(())
}

/// Converts the disk images `disks` (in the restore point's disk order) in place. They must be
/// copies: this writes to them. Block devices (volumes made from a restore point's snapshots,
/// attached for the purpose) are images too.
pub fn convert(
    disks: &[PathBuf],
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, ConvertError> {
    require_privileges()?;
    let layouts = inspect(disks)?;
    let work = tempfile::Builder::new()
        .prefix("slipway-convert.")
        .tempdir()
        .map_err(io_at("creating a mount point in", &std::env::temp_dir()))?;
    let mnt = work.path().join("root");
    fs::create_dir(&mnt).map_err(io_at("creating", &mnt))?;
    let mut g = Guard::default();
    let (root, root_info) = find_root(&mut g, disks, &layouts, &mnt, progress)?;
    let boot_mode = layouts[root.disk].boot_mode;
    let mut notes = Vec::new();
    mount_boot(&mut g, disks, &layouts, &mnt, &mut notes)?;

    let mut report = Report {
        boot_mode,
        root: root_info,
        distro: None,
        initramfs_tool: None,
        changes: Vec::new(),
        notes,
    };
    let mut changes = Vec::new();
    if opts.convert {
        progress("reading the root filesystem");
        let facts = collect(&mnt)?;
        let p = plan::plan(&facts, &layouts, root)?;
        report.distro = Some(p.distro);
        report.initramfs_tool = Some(p.initramfs_tool);
        report.notes.extend(p.notes);
        changes = p.changes;
    }
    changes.extend(opts.extra.iter().cloned());
    for c in changes {
        match &c.action {
            Action::Write { content, mode } => write_in_root(&mnt, &c.path, content, *mode)?,
            Action::Symlink { target } => symlink_in_root(&mnt, &c.path, target)?,
            Action::Run { argv, required } => {
                progress(&format!("running {} in the copy", argv.join(" ")));
                g.bind_system(&mnt)?;
                if let Err(e) = run_in_chroot(&mnt, argv) {
                    if *required {
                        return Err(e);
                    }
                    report
                        .notes
                        .push(format!("{e} (not needed to boot; left as is)"));
                    continue;
                }
            }
        }
        report.changes.push(c);
    }
    progress("unmounting the copies");
    g.undo()?;
    Ok(report)
}

/// Loop devices and mounts, undone in reverse order on drop (or by [`Guard::undo`], which
/// reports a failure).
#[derive(Default)]
struct Guard {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    bound: bool,
}

impl Guard {
    fn attach(&mut self, image: &Path, start: u64, size: u64) -> Result<String, ConvertError> {
        let out = run(Command::new("losetup")
            .args([
                "-f",
                "--show",
                "-o",
                &start.to_string(),
                "--sizelimit",
                &size.to_string(),
            ])
            .arg(image))?;
        let dev = out.trim().to_string();
        self.loops.push(dev.clone());
        Ok(dev)
    }

    fn mount(&mut self, args: &[&str], dev: &str, at: &Path) -> Result<(), ConvertError> {
        run(Command::new("mount").args(args).arg(dev).arg(at))?;
        self.mounts.push(at.to_path_buf());
        Ok(())
    }

    fn unmount_last(&mut self) -> Result<(), ConvertError> {
        if let Some(m) = self.mounts.pop() {
            run(Command::new("umount").arg(&m))?;
        }
        Ok(())
    }

    fn detach_last(&mut self) -> Result<(), ConvertError> {
        if let Some(l) = self.loops.pop() {
            run(Command::new("losetup").args(["-d", &l]))?;
        }
        Ok(())
    }

    fn bind_system(&mut self, root: &Path) -> Result<(), ConvertError> {
        if self.bound {
            return Ok(());
        }
        for d in ["dev", "proc", "sys"] {
            let at = root.join(d);
            fs::create_dir_all(&at).map_err(io_at("creating", &at))?;
            self.mount(&["--bind"], &format!("/{d}"), &at)?;
        }
        self.bound = true;
        // The host's /dev is the converting machine's: on AWS a replication server, whose
        // replica volumes are being written. GRUB's os-prober (enabled by default before GRUB
        // 2.06) would mount every partition it sees there, and a read-only mount of a
        // filesystem with a dirty journal replays it: a write to a live replica. It never runs
        // in a copy: it is replaced by a no-op for as long as the copy is mounted (and
        // GRUB_DISABLE_OS_PROBER is set in the chroot's environment too).
        let noop = root.parent().unwrap_or(root).join("os-prober-disabled");
        fs::write(&noop, "#!/bin/sh\nexit 0\n").map_err(io_at("writing", &noop))?;
        fs::set_permissions(&noop, fs::Permissions::from_mode(0o755))
            .map_err(io_at("writing", &noop))?;
        for p in OS_PROBER {
            let at = root.join(p);
            if at.is_file() {
                self.mount(&["--bind"], &noop.to_string_lossy(), &at)?;
            }
        }
        Ok(())
    }

    fn undo(&mut self) -> Result<(), ConvertError> {
        while !self.mounts.is_empty() {
            self.unmount_last()?;
        }
        while !self.loops.is_empty() {
            self.detach_last()?;
        }
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        while let Some(m) = self.mounts.pop() {
            if run(Command::new("umount").arg(&m)).is_err() {
                let _ = run(Command::new("umount").arg("-l").arg(&m));
            }
        }
        while let Some(l) = self.loops.pop() {
            let _ = run(Command::new("losetup").args(["-d", &l]));
        }
    }
}

fn run(cmd: &mut Command) -> Result<String, ConvertError> {
    let tool = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| ConvertError::Spawn {
        tool: tool.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(ConvertError::Command {
            cmd: tool,
            status: out.status.to_string(),
            output: tail(&out.stdout, &out.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = all.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Where distributions install os-prober (relative to the root).
const OS_PROBER: [&str; 3] = ["usr/bin/os-prober", "usr/sbin/os-prober", "bin/os-prober"];

fn run_in_chroot(root: &Path, argv: &[String]) -> Result<String, ConvertError> {
    run(Command::new("chroot")
        .arg(root)
        .args(argv)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C")
        .env("GRUB_DISABLE_OS_PROBER", "true")
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn is_linux_root_fs(fs: &str) -> bool {
    matches!(fs, "ext2" | "ext3" | "ext4" | "xfs" | "btrfs")
}

/// Mounts each Linux filesystem in turn until one holds an os-release: the root.
fn find_root(
    g: &mut Guard,
    disks: &[PathBuf],
    layouts: &[DiskLayout],
    mnt: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(PartRef, RootInfo), ConvertError> {
    let mut tried = Vec::new();
    for (d, l) in layouts.iter().enumerate() {
        for p in &l.partitions {
            let Content::Filesystem { fs, uuid, .. } = &p.content else {
                continue;
            };
            if !is_linux_root_fs(fs) {
                continue;
            }
            progress(&format!(
                "looking for the root on disk {d} partition {}",
                p.number
            ));
            let dev = g.attach(&disks[d], p.start, p.size)?;
            g.mount(&["-t", fs], &dev, mnt)?;
            let found = ["/etc/os-release", "/usr/lib/os-release"]
                .iter()
                .any(|f| in_root(mnt, f).map(|p| p.is_file()).unwrap_or(false));
            if found {
                let r = PartRef {
                    disk: d,
                    partition: p.number,
                };
                return Ok((
                    r,
                    RootInfo {
                        disk: d,
                        partition: p.number,
                        fs: fs.clone(),
                        uuid: uuid.clone(),
                    },
                ));
            }
            tried.push(format!("disk {d} partition {} ({fs})", p.number));
            g.unmount_last()?;
            g.detach_last()?;
        }
    }
    for (d, l) in layouts.iter().enumerate() {
        for p in &l.partitions {
            match &p.content {
                Content::Luks { .. } => {
                    return Err(Refusal::EncryptedRoot(format!(
                        "disk {d} partition {} is a LUKS container",
                        p.number
                    ))
                    .into())
                }
                Content::LvmPv => return Err(Refusal::LvmRoot.into()),
                _ => {}
            }
        }
    }
    Err(ConvertError::NoRoot(if tried.is_empty() {
        "no ext2/3/4, xfs or btrfs filesystem at all".into()
    } else {
        format!("looked in {}", tried.join(", "))
    }))
}

/// Mounts the filesystems the root's fstab puts under /boot (deepest last).
fn mount_boot(
    g: &mut Guard,
    disks: &[PathBuf],
    layouts: &[DiskLayout],
    mnt: &Path,
    notes: &mut Vec<String>,
) -> Result<(), ConvertError> {
    let fstab = in_root(mnt, "/etc/fstab")?;
    let Ok(text) = fs::read_to_string(&fstab) else {
        return Ok(());
    };
    let mut wanted: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 2 && (f[1] == "/boot" || f[1].starts_with("/boot/")))
                .then(|| (f[0].to_string(), f[1].to_string()))
        })
        .collect();
    wanted.sort_by_key(|(_, m)| m.matches('/').count());
    for (spec, at) in wanted {
        let found = layouts.iter().enumerate().find_map(|(d, l)| {
            l.partitions.iter().find_map(|p| {
                let Content::Filesystem { fs, uuid, label } = &p.content else {
                    return None;
                };
                let hit = match plan::resolve_device(&spec) {
                    Some(r) => r.disk == d && r.partition == p.number,
                    None => {
                        spec.strip_prefix("UUID=")
                            .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
                            || spec
                                .strip_prefix("/dev/disk/by-uuid/")
                                .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
                            || spec
                                .strip_prefix("LABEL=")
                                .is_some_and(|x| Some(x) == label.as_deref())
                    }
                };
                hit.then(|| (d, p.start, p.size, fs.clone()))
            })
        });
        let Some((d, start, size, fs)) = found else {
            notes.push(format!(
                "{at} ({spec}) is on no filesystem of the restore point's disks: not mounted"
            ));
            continue;
        };
        let target = in_root(mnt, &at)?;
        let dev = g.attach(&disks[d], start, size)?;
        g.mount(&["-t", &fs], &dev, &target)?;
    }
    Ok(())
}

/// Reads what [`plan::plan`] looks at.
fn collect(root: &Path) -> Result<Facts, ConvertError> {
    const MAX: u64 = 4 << 20;
    let mut f = Facts::default();
    let read = |p: &Path| -> Option<String> {
        let m = fs::metadata(p).ok()?;
        (m.is_file() && m.len() <= MAX)
            .then(|| fs::read(p).ok())
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    for path in plan::READ {
        if let Some(t) = read(&in_root(root, path)?) {
            f.files.insert(path.to_string(), t);
        }
    }
    for dir in plan::READ_DIRS {
        let Ok(entries) = fs::read_dir(in_root(root, dir)?) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = format!("{dir}/{name}");
            if let Some(t) = read(&in_root(root, &path)?) {
                f.files.insert(path, t);
            }
        }
    }
    for path in plan::PROBE {
        if in_root(root, path)?.exists() {
            f.present.insert(path.to_string());
        }
    }
    if let Ok(entries) = fs::read_dir(in_root(root, "/lib/modules")?) {
        for e in entries.flatten() {
            let v = e.file_name().to_string_lossy().into_owned();
            let dep = read(&e.path().join("modules.dep"));
            let builtin = read(&e.path().join("modules.builtin")).unwrap_or_default();
            if let Some(dep) = dep {
                f.kernels
                    .push(KernelModules::from_lists(&v, &dep, &builtin));
            }
        }
    }
    f.kernels.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(f)
}

/// `path` (absolute, as the machine sees it) as a host path under `root`, symbolic links
/// resolved inside `root`: an absolute link target restarts at `root`, `..` stops there. The
/// last component need not exist.
pub fn in_root(root: &Path, path: &str) -> Result<PathBuf, ConvertError> {
    let mut todo: VecDeque<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&cur);
        candidate.push(&c);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(ConvertError::SymlinkLoop(path.to_string()));
                }
                let target = fs::read_link(&candidate).map_err(io_at("reading", &candidate))?;
                let t = target.to_string_lossy();
                if t.starts_with('/') {
                    cur.clear();
                }
                for part in t.split('/').filter(|c| !c.is_empty()).rev() {
                    todo.push_front(part.to_string());
                }
            }
            _ => cur.push(c),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&cur);
    Ok(out)
}

fn write_in_root(root: &Path, path: &str, content: &str, mode: u32) -> Result<(), ConvertError> {
    let p = in_root(root, path)?;
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(io_at("creating", parent))?;
    }
    fs::write(&p, content).map_err(io_at("writing", &p))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_at("chmod", &p))
}

fn symlink_in_root(root: &Path, path: &str, target: &str) -> Result<(), ConvertError> {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let parent = in_root(root, if dir.is_empty() { "/" } else { dir })?;
    fs::create_dir_all(&parent).map_err(io_at("creating", &parent))?;
    let p = parent.join(name);
    match fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at("replacing", &p)(e)),
    }
    std::os::unix::fs::symlink(target, &p).map_err(io_at("linking", &p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies `bin` and the libraries it loads into `root` (a minimal chroot).
    fn copy_with_libs(root: &Path, bin: &str) {
        let out = Command::new("ldd").arg(bin).output().unwrap();
        let mut files = vec![bin.to_string()];
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = l.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(p.to_string());
            }
        }
        for f in files {
            let real = fs::canonicalize(&f).unwrap();
            let at = root.join(f.trim_start_matches('/'));
            fs::create_dir_all(at.parent().unwrap()).unwrap();
            fs::copy(&real, &at).unwrap();
        }
    }

    /// In a copy's chroot, os-prober (which would mount the host's disks: on AWS the live
    /// replicas) does nothing, and GRUB is told not to call it.
    #[test]
    fn os_prober_never_runs_in_a_copy() {
        if require_privileges().is_err() {
            eprintln!("skipped: needs root (chroot, bind mounts)");
            return;
        }
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("out")).unwrap();
        copy_with_libs(&root, "/bin/sh");
        // The copy's os-prober leaves a mark when it runs.
        fs::write(
            root.join("usr/bin/os-prober"),
            "#!/bin/sh\necho ran > /out/os-prober-ran\n",
        )
        .unwrap();
        fs::set_permissions(
            root.join("usr/bin/os-prober"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let mut g = Guard::default();
        g.bind_system(&root).unwrap();
        let argv: Vec<String> = [
            "/bin/sh",
            "-c",
            "/usr/bin/os-prober; echo \"$GRUB_DISABLE_OS_PROBER\" > /out/env",
        ]
        .map(String::from)
        .to_vec();
        run_in_chroot(&root, &argv).unwrap();
        g.undo().unwrap();
        assert!(!root.join("out/os-prober-ran").exists(), "os-prober ran");
        assert_eq!(
            fs::read_to_string(root.join("out/env")).unwrap().trim(),
            "true"
        );
        // Undone: the copy's own os-prober is back as it was.
        assert!(fs::read_to_string(root.join("usr/bin/os-prober"))
            .unwrap()
            .contains("os-prober-ran"));
    }

    #[test]
    fn paths_resolve_inside_the_root_even_through_absolute_links() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        fs::create_dir_all(r.join("etc")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        std::os::unix::fs::symlink("/etc/real", r.join("etc/fstab")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc/passwd", r.join("etc/escape")).unwrap();
        std::os::unix::fs::symlink("/etc/loop", r.join("etc/loop")).unwrap();
        assert_eq!(
            in_root(r, "/lib/modules").unwrap(),
            r.join("usr/lib/modules")
        );
        assert_eq!(in_root(r, "/etc/fstab").unwrap(), r.join("etc/real"));
        assert_eq!(in_root(r, "/etc/escape").unwrap(), r.join("etc/passwd"));
        assert!(matches!(
            in_root(r, "/etc/loop"),
            Err(ConvertError::SymlinkLoop(_))
        ));
        write_in_root(r, "/etc/fstab", "x\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(r.join("etc/real")).unwrap(), "x\n");
        symlink_in_root(r, "/lib/systemd/x.service", "/etc/x").unwrap();
        assert_eq!(
            fs::read_link(r.join("usr/lib/systemd/x.service")).unwrap(),
            PathBuf::from("/etc/x")
        );
    }
}
