//! Filesystem freezes: the instant a consistent restore point of a running source is taken.
//!
//! A restore point of a live server must be one instant across all its disks. Write tracking
//! says which chunks changed, but a chunk read while the filesystem keeps writing belongs to no
//! single instant. So the agent `syncfs`es every filesystem mounted from the source disks,
//! freezes them all (`FIFREEZE`), reads the still-dirty chunks, places the marker on every disk
//! and thaws (`FITHAW`) (DESIGN.md, "Consistent points on a live source"). A frozen filesystem
//! is clean on disk (data and journal flushed, as after an unmount), so the point is
//! filesystem-consistent; the optional pre/post hooks (as AWS DRS and Windows VSS run them) let
//! an application quiesce too.
//!
//! Why this shape:
//! - **A freeze must always end, and soon.** A process that writes to a frozen filesystem sleeps
//!   uninterruptibly: even SIGKILL waits for the thaw. A freeze left behind hangs the server
//!   (its root, its databases) until someone runs `fsfreeze -u` by hand. Three bounds: the
//!   caller thaws when it is done; an in-process timer thaws at [`FreezeOptions::max_freeze`]
//!   (default 1 s) whatever the caller is doing, and the point is then reported
//!   [`expired`](ThawReport::expired); and a **watchdog process** thaws at `max_freeze +
//!   watchdog_margin` (default 1 + 2 s), or at once if the agent goes away.
//! - **Why a separate process.** The agent's own threads die with it (kill -9, the OOM killer,
//!   an abort) and stop with it (SIGSTOP, a debugger). The watchdog is the agent binary
//!   re-executed as the hidden `freeze-watchdog` subcommand ([`watchdog_main`]): it opens every
//!   mount point before the freeze (no path lookup on a frozen filesystem afterwards), locks its
//!   memory, says `ready`, then only waits on its stdin pipe. The kernel closes that pipe however
//!   the agent dies, so EOF is the death notice. It runs in its own process group and ignores
//!   SIGINT, SIGTERM, SIGHUP and SIGQUIT: a Ctrl-C or a service stop that signals the agent does
//!   not take the guard down with it (it exits on its own within the deadline). The protocol is
//!   described at [`watchdog_main`].
//! - **The agent must not write to what it froze** (its logs, temp files): it would put itself
//!   to sleep until the watchdog's deadline. Nothing here logs between the first freeze and the
//!   last thaw, and the caller must not either: a log line to journald blocks too, once journald
//!   blocks on the frozen root. Hooks and the watchdog talk over pipes only. The agent's memory
//!   is locked during the freeze (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: what is
//!   resident stays resident, nothing is faulted in), the watchdog locks all of its own.
//! - **Children before parents.** Filesystems are frozen deepest mount point first and thawed
//!   in reverse: a filesystem whose writeback goes through another one (a loop device over a
//!   file) must be frozen before the one holding the file. Bind mounts of one superblock are
//!   frozen once; a mount point is used only if it really reaches that superblock (it is
//!   checked by mount id, so an overmounted path is not frozen by mistake).
//! - **Never silently best-effort.** A filesystem that cannot be frozen (FAT and exFAT have no
//!   freeze: `EOPNOTSUPP`) is still synced and reported; `EBUSY` means someone else froze it,
//!   and what we did not freeze we do not thaw (neither does the watchdog: it is told which
//!   filesystems the agent froze). [`ThawReport::consistency`] then calls the point
//!   crash-consistent-best-effort and says why. A read-only superblock needs no freeze.
//!
//! The core (mountinfo parsing, the selection and ordering in [`plan`], the reports) does no
//! I/O and is unit-tested without root; [`Plan::for_disks`], [`freeze`], [`Frozen`] and
//! [`watchdog_main`] are the shell over procfs, sysfs and the ioctls.

use std::cmp::Reverse;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::track::DevId;

/// `_IOWR('X', 119, int)` from `<linux/fs.h>` (checked against this machine's headers).
pub const FIFREEZE: u32 = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
pub const FITHAW: u32 = 0xC004_5878;

/// Filesystem types whose kernel driver has no freeze (`FIFREEZE` answers `EOPNOTSUPP`): FAT
/// (`vfat`, `msdos`, fs/fat/inode.c) and exFAT set no `freeze_fs`. The ioctl's answer is what
/// counts; this list lets a [`Plan`] say so before anything is tried.
pub const NO_FREEZE_FS_TYPES: [&str; 3] = ["vfat", "msdos", "exfat"];

/// Why nothing was frozen (the caller takes no consistent point and reports this).
#[derive(Debug, Error)]
pub enum FreezeError {
    #[error("{path} is not a block device: there is no filesystem on it to freeze")]
    NotBlockDevice { path: PathBuf },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    MountInfo(#[from] MountInfoError),
    #[error("freezing needs root (CAP_SYS_ADMIN): {what}: {source}")]
    NotPermitted {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the pre-freeze hook {} {}; nothing was frozen", .outcome.path.display(), .outcome.status)]
    PreHook {
        outcome: Box<HookOutcome>,
        /// The post hook, which runs whatever happened.
        post: Option<Box<HookOutcome>>,
    },
    #[error("the freeze watchdog {0}; nothing is frozen")]
    Watchdog(String),
}

/// A line of `/proc/self/mountinfo` the parser did not understand.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unrecognized mountinfo line: {0:?}")]
pub struct MountInfoError(pub String);

fn dev_str(d: DevId) -> String {
    format!("{}:{}", d.major, d.minor)
}

fn parse_dev(s: &[u8]) -> Option<DevId> {
    let s = std::str::from_utf8(s).ok()?;
    let (major, minor) = s.trim().split_once(':')?;
    Some(DevId {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

/// One mount, a line of `/proc/self/mountinfo` (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub id: u32,
    pub parent: u32,
    /// The superblock's device (`st_dev`): the block device for a disk filesystem, an
    /// anonymous `0:N` for btrfs and virtual filesystems.
    pub dev: DevId,
    /// The directory of the filesystem mounted here (`/` unless a bind mount of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `relatime`, …).
    pub mount_options: String,
    pub fs_type: String,
    /// The mount source (`/dev/vda1`, `none`, …).
    pub source: String,
    /// Per-superblock options: `ro` here means nothing can write to the filesystem.
    pub super_options: String,
}

impl Mount {
    /// Whether the filesystem itself is read-only (a read-only bind mount of a writable
    /// filesystem is not).
    pub fn superblock_read_only(&self) -> bool {
        self.super_options.split(',').any(|o| o == "ro")
    }

    /// The number of components of the mount point: 0 for `/`.
    pub fn depth(&self) -> usize {
        depth(&self.mount_point)
    }

    /// Whether this mounts the whole filesystem, not a bind-mounted subtree of it.
    pub fn whole(&self) -> bool {
        self.root == Path::new("/")
    }
}

fn depth(p: &Path) -> usize {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count()
}

/// Undoes the kernel's escaping of paths in mountinfo and `/proc/swaps`: a space, tab,
/// newline or backslash is written as `\` and three octal digits (`\040`).
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = oct.iter().fold(0u32, |v, &b| v * 8 + u32::from(b - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

fn os_path(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}

/// Parses one line of `/proc/self/mountinfo` (without its newline):
///
/// ```text
/// 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
/// ```
///
/// mount id, parent id, `major:minor`, root, mount point, mount options, zero or more optional
/// fields, `-`, filesystem type, source, superblock options.
pub fn parse_mountinfo_line(line: &[u8]) -> Result<Mount, MountInfoError> {
    let bad = || MountInfoError(String::from_utf8_lossy(line).into_owned());
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let sep = fields
        .iter()
        .skip(6)
        .position(|f| *f == b"-")
        .map(|p| p + 6)
        .ok_or_else(bad)?;
    if fields.len() < sep + 3 {
        return Err(bad());
    }
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u32>().ok();
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    Ok(Mount {
        id: number(fields[0]).ok_or_else(bad)?,
        parent: number(fields[1]).ok_or_else(bad)?,
        dev: parse_dev(fields[2]).ok_or_else(bad)?,
        root: os_path(unescape(fields[3])),
        mount_point: os_path(unescape(fields[4])),
        mount_options: text(fields[5]),
        fs_type: text(fields[sep + 1]),
        source: text(fields[sep + 2]),
        super_options: fields
            .get(sep + 3..)
            .map(|rest| text(&rest.join(&b' ')))
            .unwrap_or_default(),
    })
}

/// Parses the whole of `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &[u8]) -> Result<Vec<Mount>, MountInfoError> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(parse_mountinfo_line)
        .collect()
}

/// The swap partitions of `/proc/swaps` (swap files live in a filesystem and need nothing).
pub fn parse_swaps(text: &[u8]) -> Vec<PathBuf> {
    text.split(|&b| b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let mut fields = line
                .split(|b| b.is_ascii_whitespace())
                .filter(|f| !f.is_empty());
            let name = fields.next()?;
            (fields.next()? == b"partition").then(|| os_path(unescape(name)))
        })
        .collect()
}

/// What a block device is to the source disk it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The source disk itself, a whole disk.
    Disk,
    /// A partition: the source disk itself, or one of the whole source disk's partitions.
    Partition,
    /// A device stacked on it (a sysfs holder: device mapper, md), transitively.
    Stacked,
}

/// A block device whose writes land on a source disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// The kernel's name (`loop0p1`, `dm-0`).
    pub name: String,
    pub dev: DevId,
    pub kind: DeviceKind,
    /// Nothing is stacked on it and it has no partitions: a filesystem or swap would be here.
    pub leaf: bool,
}

/// A source disk and every block device through which something can write to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDisk {
    pub path: PathBuf,
    /// The disk itself first, then its partitions, then what is stacked on them.
    pub devices: Vec<BlockDevice>,
}

impl SourceDisk {
    /// Resolves `/dev/sda`, `/dev/loop0p1` or a symlink to one through `/sys`.
    pub fn resolve(path: &Path) -> Result<SourceDisk, FreezeError> {
        let meta = fs::metadata(path).map_err(|e| FreezeError::Io {
            what: format!("stat {}", path.display()),
            source: e,
        })?;
        if !meta.file_type().is_block_device() {
            return Err(FreezeError::NotBlockDevice {
                path: path.to_owned(),
            });
        }
        SourceDisk::from_sysfs(Path::new("/sys"), path, DevId::from_rdev(meta.rdev()))
    }

    /// Resolves device `dev` against the sysfs mounted at `sys`: `dev/block/MAJ:MIN` is the
    /// device's directory; a directory in it with a `partition` file is a partition; the
    /// entries of `holders/` are devices stacked on it, found under `class/block/NAME`.
    pub fn from_sysfs(sys: &Path, path: &Path, dev: DevId) -> Result<SourceDisk, FreezeError> {
        let io = |what: &Path, e: io::Error| FreezeError::Io {
            what: format!("{} (for {})", what.display(), path.display()),
            source: e,
        };
        let read_dev = |dir: &Path| -> Result<DevId, FreezeError> {
            let file = dir.join("dev");
            let text = fs::read(&file).map_err(|e| io(&file, e))?;
            parse_dev(&text).ok_or_else(|| {
                io(
                    &file,
                    io::Error::other(format!(
                        "not a device number: {:?}",
                        String::from_utf8_lossy(&text)
                    )),
                )
            })
        };
        let name_of = |dir: &Path| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let link = sys.join(format!("dev/block/{}", dev_str(dev)));
        let dir = fs::canonicalize(&link).map_err(|e| io(&link, e))?;
        let kind = if dir.join("partition").exists() {
            DeviceKind::Partition
        } else {
            DeviceKind::Disk
        };
        let mut devices = vec![BlockDevice {
            name: name_of(&dir),
            dev,
            kind,
            leaf: true,
        }];
        let mut dirs = vec![dir.clone()];
        if kind == DeviceKind::Disk {
            let mut parts = Vec::new();
            for entry in fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
                let entry = entry.map_err(|e| io(&dir, e))?;
                if entry.path().join("partition").is_file() {
                    parts.push(entry.path());
                }
            }
            parts.sort();
            devices[0].leaf = parts.is_empty();
            for part in parts {
                devices.push(BlockDevice {
                    name: name_of(&part),
                    dev: read_dev(&part)?,
                    kind: DeviceKind::Partition,
                    leaf: true,
                });
                dirs.push(part);
            }
        }
        let mut i = 0;
        while i < devices.len() {
            let holders_dir = dirs[i].join("holders");
            let mut holders = match fs::read_dir(&holders_dir) {
                Ok(entries) => entries
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(|e| io(&holders_dir, e))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io(&holders_dir, e)),
            };
            holders.sort();
            if !holders.is_empty() {
                devices[i].leaf = false;
            }
            for name in holders {
                if devices.iter().any(|d| d.name == name) {
                    continue;
                }
                let link = sys.join("class/block").join(&name);
                let hdir = fs::canonicalize(&link).map_err(|e| io(&link, e))?;
                devices.push(BlockDevice {
                    name,
                    dev: read_dev(&hdir)?,
                    kind: DeviceKind::Stacked,
                    leaf: true,
                });
                dirs.push(hdir);
            }
            i += 1;
        }
        Ok(SourceDisk {
            path: path.to_owned(),
            devices,
        })
    }
}

/// Why a filesystem or device is not frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotFrozen {
    /// The superblock is read-only: nothing can write to it, so it needs no freeze.
    ReadOnly,
    /// Its type has no freeze (`EOPNOTSUPP`); synced before the point, not frozen.
    Unsupported,
    /// `EBUSY`: someone else froze it. Not ours to thaw; it may thaw during the point.
    AlreadyFrozen,
    /// None of its mount points could be opened as that filesystem (overmounted, gone).
    Unreachable(String),
    /// `FIFREEZE` failed otherwise.
    Failed(String),
    /// The freeze's time limit passed before its turn came.
    Expired,
    /// A device on the source disk with no mount in this mount namespace. Nothing to freeze;
    /// a program writing to it directly is not stopped.
    Unmounted,
    /// An active swap partition: nothing a restore needs.
    Swap,
}

impl NotFrozen {
    /// Whether a point taken with this filesystem unfrozen is only crash-consistent.
    pub fn breaks_consistency(&self) -> bool {
        match self {
            NotFrozen::ReadOnly | NotFrozen::Unmounted | NotFrozen::Swap => false,
            NotFrozen::Unsupported
            | NotFrozen::AlreadyFrozen
            | NotFrozen::Unreachable(_)
            | NotFrozen::Failed(_)
            | NotFrozen::Expired => true,
        }
    }
}

impl fmt::Display for NotFrozen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotFrozen::ReadOnly => f.write_str("read-only, needs no freeze"),
            NotFrozen::Unsupported => {
                f.write_str("its filesystem type cannot be frozen (synced only)")
            }
            NotFrozen::AlreadyFrozen => {
                f.write_str("already frozen by someone else (EBUSY), not ours to thaw")
            }
            NotFrozen::Unreachable(why) => write!(f, "could not be opened: {why}"),
            NotFrozen::Failed(why) => write!(f, "freeze failed: {why}"),
            NotFrozen::Expired => f.write_str("the freeze's time limit passed before its turn"),
            NotFrozen::Unmounted => {
                f.write_str("not mounted here (direct writes to it are not stopped)")
            }
            NotFrozen::Swap => f.write_str("swap"),
        }
    }
}

/// A filesystem or device that is not frozen, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The source disk it is on.
    pub disk: PathBuf,
    /// Its mount point, or `/dev/NAME` for a device with no mount.
    pub what: PathBuf,
    pub dev: DevId,
    pub fs_type: Option<String>,
    pub why: NotFrozen,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.what.display(), dev_str(self.dev))?;
        if let Some(t) = &self.fs_type {
            write!(f, " {t}")?;
        }
        write!(f, " on {}): {}", self.disk.display(), self.why)
    }
}

/// A writable filesystem on a source disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filesystem {
    /// Its superblock's device number (as in mountinfo): the key for deduplicating mounts.
    pub dev: DevId,
    pub fs_type: String,
    pub source: String,
    /// The source disk it is on.
    pub disk: PathBuf,
    /// Its mounts (mount id, mount point), the one to use first: whole-filesystem mounts
    /// before bind mounts of a subtree, then shallower, then older.
    pub mounts: Vec<(u32, PathBuf)>,
    /// False for a type known to have no freeze: it is synced, not frozen.
    pub freezable: bool,
}

impl Filesystem {
    /// The mount point the freeze goes through.
    pub fn mount_point(&self) -> &Path {
        &self.mounts[0].1
    }

    fn skipped(&self, why: NotFrozen) -> Skipped {
        Skipped {
            disk: self.disk.clone(),
            what: self.mount_point().to_owned(),
            dev: self.dev,
            fs_type: Some(self.fs_type.clone()),
            why,
        }
    }
}

/// What a freeze of the source disks' filesystems will do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The writable filesystems, in freeze order (children before parents); thaw is the
    /// reverse.
    pub filesystems: Vec<Filesystem>,
    /// Read-only filesystems and devices with no mount, with why they are not frozen.
    pub skipped: Vec<Skipped>,
}

/// Plans the freeze of the filesystems on `disks`, from the mount table and the active swap
/// partitions. A mount belongs to a disk when its device is one of the disk's devices; for a
/// mount with an anonymous device (btrfs), `source_dev` resolves its source instead. Mounts of
/// one superblock (bind mounts) become one [`Filesystem`]. Order: deeper mount point first,
/// then the later mount first (a filesystem mounted later may depend on an earlier one).
pub fn plan(
    mounts: &[Mount],
    disks: &[SourceDisk],
    swaps: &[DevId],
    source_dev: impl Fn(&Mount) -> Option<DevId>,
) -> Plan {
    let owner = |dev: DevId| {
        disks
            .iter()
            .find(|d| d.devices.iter().any(|b| b.dev == dev))
            .map(|d| d.path.clone())
    };
    let mut mounted: HashSet<DevId> = HashSet::new();
    let mut groups: Vec<(DevId, PathBuf, Vec<&Mount>)> = Vec::new();
    for m in mounts {
        let (block, disk) = match owner(m.dev) {
            Some(disk) => (m.dev, disk),
            None if m.dev.major == 0 => {
                let Some((block, disk)) = source_dev(m).and_then(|d| Some((d, owner(d)?))) else {
                    continue;
                };
                (block, disk)
            }
            None => continue,
        };
        mounted.insert(block);
        match groups.iter_mut().find(|g| g.0 == m.dev) {
            Some(g) => g.2.push(m),
            None => groups.push((m.dev, disk, vec![m])),
        }
    }
    let mut filesystems = Vec::new();
    let mut skipped = Vec::new();
    for (dev, disk, mut ms) in groups {
        ms.sort_by_key(|m| (!m.whole(), m.depth(), m.id));
        let fs = Filesystem {
            dev,
            fs_type: ms[0].fs_type.clone(),
            source: ms[0].source.clone(),
            disk,
            mounts: ms.iter().map(|m| (m.id, m.mount_point.clone())).collect(),
            freezable: !NO_FREEZE_FS_TYPES.contains(&ms[0].fs_type.as_str()),
        };
        if ms[0].superblock_read_only() {
            skipped.push(fs.skipped(NotFrozen::ReadOnly));
        } else {
            filesystems.push(fs);
        }
    }
    filesystems.sort_by_key(|f| (Reverse(depth(f.mount_point())), Reverse(f.mounts[0].0)));
    let mut seen: HashSet<DevId> = HashSet::new();
    for disk in disks {
        for b in &disk.devices {
            if b.leaf && !mounted.contains(&b.dev) && seen.insert(b.dev) {
                skipped.push(Skipped {
                    disk: disk.path.clone(),
                    what: Path::new("/dev").join(&b.name),
                    dev: b.dev,
                    fs_type: None,
                    why: if swaps.contains(&b.dev) {
                        NotFrozen::Swap
                    } else {
                        NotFrozen::Unmounted
                    },
                });
            }
        }
    }
    Plan {
        filesystems,
        skipped,
    }
}

impl Plan {
    /// Plans the freeze of the filesystems on these source disks (block devices) from
    /// `/proc/self/mountinfo`, `/sys` and `/proc/swaps`.
    pub fn for_disks<P: AsRef<Path>>(disks: &[P]) -> Result<Plan, FreezeError> {
        let disks = disks
            .iter()
            .map(|p| SourceDisk::resolve(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let text = fs::read("/proc/self/mountinfo").map_err(|e| FreezeError::Io {
            what: "reading /proc/self/mountinfo".into(),
            source: e,
        })?;
        let mounts = parse_mountinfo(&text)?;
        let swaps: Vec<DevId> = fs::read("/proc/swaps")
            .map(|t| parse_swaps(&t))
            .unwrap_or_default()
            .iter()
            .filter_map(|p| block_dev_of(p))
            .collect();
        Ok(plan(&mounts, &disks, &swaps, |m| {
            m.source
                .starts_with('/')
                .then(|| block_dev_of(Path::new(&m.source)))
                .flatten()
        }))
    }

    /// The mount points the freeze goes through, in freeze order.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.filesystems
            .iter()
            .map(|f| f.mount_point().to_owned())
            .collect()
    }
}

fn block_dev_of(path: &Path) -> Option<DevId> {
    let meta = fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| DevId::from_rdev(meta.rdev()))
}

/// How a hook script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookStatus {
    Exited(i32),
    Signaled(i32),
    /// Killed (with its process group) after the timeout.
    TimedOut(Duration),
    NotStarted(String),
}

impl fmt::Display for HookStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookStatus::Exited(0) => f.write_str("succeeded"),
            HookStatus::Exited(code) => write!(f, "exited with status {code}"),
            HookStatus::Signaled(sig) => write!(f, "was killed by signal {sig}"),
            HookStatus::TimedOut(t) => write!(f, "did not finish within {t:?} and was killed"),
            HookStatus::NotStarted(why) => write!(f, "could not be started: {why}"),
        }
    }
}

/// What a hook did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    pub path: PathBuf,
    pub status: HookStatus,
    pub took: Duration,
    /// The end of its stdout and stderr, interleaved.
    pub output: String,
}

impl HookOutcome {
    pub fn ok(&self) -> bool {
        self.status == HookStatus::Exited(0)
    }
}

/// The most hook output kept (its end).
const HOOK_OUTPUT_MAX: usize = 16 << 10;

/// Runs a hook: `PATH pre` or `PATH post`, stdin from /dev/null, stdout and stderr captured,
/// in its own process group (killed whole at the timeout). Environment:
/// `SLIPWAY_FREEZE_PHASE` (`pre`/`post`), `SLIPWAY_FREEZE_MOUNTS` (the mount points to freeze,
/// one a line) and, for `post`, `SLIPWAY_FREEZE_RESULT` (`consistent`, `best-effort` or
/// `aborted`).
fn run_hook(
    path: &Path,
    phase: &str,
    mounts: &[PathBuf],
    result: Option<&str>,
    timeout: Duration,
) -> HookOutcome {
    let start = Instant::now();
    let outcome = |status: HookStatus, output: String| HookOutcome {
        path: path.to_owned(),
        status,
        took: start.elapsed(),
        output,
    };
    let (reader, writer) = match io::pipe() {
        Ok(p) => p,
        Err(e) => return outcome(HookStatus::NotStarted(format!("pipe: {e}")), String::new()),
    };
    let writer2 = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return outcome(HookStatus::NotStarted(format!("pipe: {e}")), String::new()),
    };
    let mut list = OsString::new();
    for m in mounts {
        list.push(m.as_os_str());
        list.push("\n");
    }
    let mut cmd = Command::new(path);
    cmd.arg(phase)
        .env("SLIPWAY_FREEZE_PHASE", phase)
        .env("SLIPWAY_FREEZE_MOUNTS", list)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .process_group(0);
    if let Some(r) = result {
        cmd.env("SLIPWAY_FREEZE_RESULT", r);
    }
    let spawned = cmd.spawn();
    // The pipe's write ends must close here, or the output never ends.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return outcome(HookStatus::NotStarted(e.to_string()), String::new()),
    };
    let (out_tx, out_rx) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("slipway-hook-out".into())
        .spawn(move || {
            let mut reader = reader;
            let mut kept: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        kept.extend_from_slice(&buf[..n]);
                        if kept.len() > 2 * HOOK_OUTPUT_MAX {
                            kept.drain(..kept.len() - HOOK_OUTPUT_MAX);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if kept.len() > HOOK_OUTPUT_MAX {
                kept.drain(..kept.len() - HOOK_OUTPUT_MAX);
            }
            let _ = out_tx.send(String::from_utf8_lossy(&kept).into_owned());
        });
    let pid = child.id();
    let (wait_tx, wait_rx) = mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name("slipway-hook-wait".into())
        .spawn(move || {
            let _ = wait_tx.send(child.wait());
        });
    if let Err(e) = waiter {
        return outcome(
            HookStatus::NotStarted(format!("thread: {e}")),
            String::new(),
        );
    }
    let status = match wait_rx.recv_timeout(timeout) {
        Ok(Ok(s)) => exit_status(s),
        Ok(Err(e)) => HookStatus::NotStarted(format!("wait: {e}")),
        Err(_) => {
            kill_group(pid);
            let _ = wait_rx.recv();
            HookStatus::TimedOut(timeout)
        }
    };
    if matches!(status, HookStatus::TimedOut(_)) {
        // What it started may still hold the pipe.
        kill_group(pid);
    }
    let output = out_rx
        .recv_timeout(Duration::from_millis(500))
        .unwrap_or_else(|_| "(output not collected: a process the hook started holds it)".into());
    outcome(status, output)
}

fn exit_status(s: ExitStatus) -> HookStatus {
    match (s.code(), s.signal()) {
        (Some(code), _) => HookStatus::Exited(code),
        (None, Some(sig)) => HookStatus::Signaled(sig),
        (None, None) => HookStatus::Exited(-1),
    }
}

/// SIGKILLs the process group led by a child we started.
fn kill_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory preconditions; the group is the one our child leads.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

/// The post hook, run once after the thaw (or after an aborted freeze).
#[derive(Debug, Clone)]
struct PostHook {
    path: PathBuf,
    mounts: Vec<PathBuf>,
    timeout: Duration,
}

impl PostHook {
    fn run(&self, result: &str) -> HookOutcome {
        let outcome = run_hook(&self.path, "post", &self.mounts, Some(result), self.timeout);
        if !outcome.ok() {
            tracing::warn!(
                "the post-thaw hook {} {}: {}",
                outcome.path.display(),
                outcome.status,
                outcome.output.trim_end()
            );
        }
        outcome
    }
}

/// How to start the watchdog process: `PROGRAM ARGS… --deadline-ms N -- MOUNTPOINT…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchdogCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WatchdogCommand {
    /// The running agent binary's hidden `freeze-watchdog` subcommand. `/proc/self/exe` is
    /// the running binary even if the file was replaced by an upgrade since.
    pub fn agent() -> WatchdogCommand {
        WatchdogCommand {
            program: PathBuf::from("/proc/self/exe"),
            args: vec!["freeze-watchdog".into()],
        }
    }
}

/// Settings of a freeze.
#[derive(Debug, Clone)]
pub struct FreezeOptions {
    /// The longest a freeze may last: at this age the in-process timer thaws everything and
    /// the point is reported [`expired`](ThawReport::expired).
    pub max_freeze: Duration,
    /// The watchdog thaws at `max_freeze + watchdog_margin` after it is ready. The margin
    /// leaves the in-process timer to end every freeze of a live agent (the watchdog is for a
    /// dead or stopped one) while bounding the worst case: 3 s by default.
    pub watchdog_margin: Duration,
    pub watchdog: WatchdogCommand,
    /// How long the watchdog may take to say `ready`.
    pub watchdog_ready_timeout: Duration,
    /// Run before anything is synced or frozen; a failure (or timeout) aborts the freeze.
    pub pre_hook: Option<PathBuf>,
    /// Run after the thaw, whatever happened, once the pre hook ran or a freeze was tried.
    pub post_hook: Option<PathBuf>,
    pub hook_timeout: Duration,
    /// Lock the agent's resident memory during the freeze.
    pub lock_memory: bool,
}

impl Default for FreezeOptions {
    fn default() -> Self {
        FreezeOptions {
            max_freeze: Duration::from_secs(1),
            watchdog_margin: Duration::from_secs(2),
            watchdog: WatchdogCommand::agent(),
            watchdog_ready_timeout: Duration::from_secs(5),
            pre_hook: None,
            post_hook: None,
            hook_timeout: Duration::from_secs(60),
            lock_memory: true,
        }
    }
}

impl FreezeOptions {
    /// When the watchdog thaws on its own.
    pub fn watchdog_deadline(&self) -> Duration {
        self.max_freeze + self.watchdog_margin
    }
}

/// What the freeze did, known while frozen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreezeReport {
    /// The mount points frozen, one per filesystem, in freeze order.
    pub frozen: Vec<PathBuf>,
    /// What was not frozen (planned or found out), with why.
    pub not_frozen: Vec<Skipped>,
    /// `syncfs` failures (the freeze syncs again; these are for the log).
    pub sync_errors: Vec<String>,
    /// Why the agent's memory could not be locked, if it could not.
    pub memlock_error: Option<String>,
    /// The watchdog's `memlock=` answer (`ok` or why not).
    pub watchdog_memlock: Option<String>,
    pub pre_hook: Option<HookOutcome>,
    /// `syncfs` of every filesystem, before the freeze.
    pub sync_took: Duration,
    /// The `FIFREEZE` calls (each writes what was dirtied since the `syncfs`).
    pub freeze_took: Duration,
}

impl FreezeReport {
    /// Why a point taken under this freeze is only crash-consistent (empty: it is not).
    pub fn best_effort_reasons(&self) -> Vec<String> {
        self.not_frozen
            .iter()
            .filter(|s| s.why.breaks_consistency())
            .map(|s| s.to_string())
            .collect()
    }
}

/// How the watchdog ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchdogOutcome {
    /// Nothing was frozen, so none was started.
    NotNeeded,
    /// Told of the thaw, it exited without touching anything.
    Released,
    /// It thawed (its `fired` line: why and what).
    Fired(String),
    /// No answer: it died or did not say.
    Lost(String),
}

/// Whether a point is filesystem-consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consistency {
    /// Every writable filesystem on the source disks was frozen for the whole read.
    Consistent,
    /// Crash-consistent at best, for these reasons.
    BestEffort(Vec<String>),
}

/// What a freeze did, once thawed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThawReport {
    pub freeze: FreezeReport,
    /// From the first `FIFREEZE` call to the end of the last `FITHAW`: the longest any writer
    /// waited. Zero when nothing was frozen.
    pub frozen_for: Duration,
    /// The `FITHAW` calls.
    pub thaw_took: Duration,
    /// The in-process timer thawed at `max_freeze`, before the caller: whatever was read
    /// after that is not part of the point.
    pub expired: bool,
    pub watchdog: WatchdogOutcome,
    /// Filesystems already thawed when we thawed them (by the watchdog or someone else).
    pub thawed_early: Vec<PathBuf>,
    /// `FITHAW` failures other than "not frozen" (the watchdog is then left to retry).
    pub thaw_errors: Vec<String>,
    pub post_hook: Option<HookOutcome>,
    max_freeze: Duration,
}

impl ThawReport {
    pub fn consistency(&self) -> Consistency {
        let mut reasons = self.freeze.best_effort_reasons();
        if self.expired {
            reasons.push(format!(
                "the freeze reached its {:?} limit and was thawed before the read ended",
                self.max_freeze
            ));
        }
        if let WatchdogOutcome::Fired(line) = &self.watchdog {
            reasons.push(format!("the watchdog thawed: {line}"));
        }
        for p in &self.thawed_early {
            reasons.push(format!("{} was thawed early by someone else", p.display()));
        }
        if reasons.is_empty() {
            Consistency::Consistent
        } else {
            Consistency::BestEffort(reasons)
        }
    }
}

/// `FIFREEZE` on the filesystem of `fd`.
pub fn freeze_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    fs_ioctl(fd, FIFREEZE)
}

/// `FITHAW` on the filesystem of `fd`; `EINVAL` means it was not frozen (by userspace).
pub fn thaw_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    fs_ioctl(fd, FITHAW)
}

fn fs_ioctl(fd: BorrowedFd<'_>, request: u32) -> io::Result<()> {
    // SAFETY: FIFREEZE and FITHAW take an int argument the kernel ignores and touch no memory
    // of ours; `fd` is open for the duration of the call. The request type differs between C
    // libraries (unsigned long on glibc, int on musl), hence the cast.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: syncfs only takes a descriptor, open for the call.
    if unsafe { libc::syncfs(fd.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a mount point as a directory, read-only: all a freeze, a sync or a thaw needs.
pub fn open_mount_point(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
}

/// The id of the mount an open file is on (as in mountinfo): `statx(STATX_MNT_ID)`, or
/// `/proc/self/fdinfo` on kernels before 5.8.
pub fn mount_id(file: &File) -> Option<u64> {
    // SAFETY: statx is a plain C struct for which all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH means the descriptor itself,
    // which is open for the call; `stx` is a live, writable statx.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0 {
        return Some(stx.stx_mnt_id);
    }
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Opens a filesystem through the first of its mount points that really is a mount of it
/// (an overmounted path leads somewhere else).
fn open_filesystem(fs: &Filesystem) -> Result<(File, PathBuf, Option<u64>), String> {
    let mut why = Vec::new();
    for (id, point) in &fs.mounts {
        match open_mount_point(point) {
            Ok(file) => {
                let got = mount_id(&file);
                if got.is_none_or(|g| g == u64::from(*id)) {
                    return Ok((file, point.clone(), got));
                }
                why.push(format!(
                    "{} leads to another mount (overmounted)",
                    point.display()
                ));
            }
            Err(e) => why.push(format!("{}: {e}", point.display())),
        }
    }
    Err(why.join("; "))
}

/// The parent's end of a running watchdog.
struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    finished: bool,
}

/// The watchdog's `ready` line.
struct Ready {
    mount_ids: Vec<Option<u64>>,
    memlock: String,
}

fn parse_ready(line: &str) -> Option<Ready> {
    let rest = line.strip_prefix("ready mnt=")?;
    let (ids, memlock) = rest.split_once(" memlock=")?;
    let mount_ids = if ids.is_empty() {
        Vec::new()
    } else {
        ids.split(',').map(|s| s.parse().ok()).collect()
    };
    Some(Ready {
        mount_ids,
        memlock: memlock.to_owned(),
    })
}

impl Watchdog {
    fn start(
        cmd: &WatchdogCommand,
        deadline: Duration,
        mounts: &[&Path],
        ready_timeout: Duration,
    ) -> Result<(Watchdog, Ready), FreezeError> {
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .arg("--deadline-ms")
            .arg(deadline.as_millis().to_string())
            .arg("--")
            .args(mounts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .current_dir("/")
            .process_group(0);
        let mut child = c.spawn().map_err(|e| {
            FreezeError::Watchdog(format!(
                "{} could not be started: {e}",
                cmd.program.display()
            ))
        })?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("slipway-freeze-watchdog".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        let (err_tx, err_rx) = mpsc::channel();
        let err_reader = std::thread::Builder::new()
            .name("slipway-freeze-watchdog".into())
            .spawn(move || {
                let mut text = Vec::new();
                let _ = stderr.take(8 << 10).read_to_end(&mut text);
                let _ = err_tx.send(String::from_utf8_lossy(&text).into_owned());
            });
        let stdin = child.stdin.take();
        let wd = Watchdog {
            child,
            stdin,
            lines,
            finished: false,
        };
        let fail = |mut wd: Watchdog, why: String| {
            let _ = wd.child.kill();
            let status = wd.child.wait().map(|s| s.to_string()).unwrap_or_default();
            wd.finished = true;
            let stderr = err_rx
                .recv_timeout(Duration::from_millis(500))
                .unwrap_or_default();
            FreezeError::Watchdog(format!(
                "{} {why} ({status}){}{}",
                cmd.program.display(),
                if stderr.trim().is_empty() { "" } else { ": " },
                stderr.trim()
            ))
        };
        if let Err(e) = reader.and(err_reader) {
            return Err(fail(wd, format!("reader thread: {e}")));
        }
        let until = Instant::now() + ready_timeout;
        loop {
            match wd
                .lines
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    if let Some(ready) = parse_ready(&line) {
                        return Ok((wd, ready));
                    }
                    if let Some(e) = line.strip_prefix("error ") {
                        return Err(fail(wd, format!("failed: {e}")));
                    }
                    // Anything else before `ready` is noise (a test harness's banner).
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(fail(
                        wd,
                        format!("did not say ready within {ready_timeout:?}"),
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(fail(wd, "exited before saying ready".into()));
                }
            }
        }
    }

    fn send(&mut self, line: &str) -> io::Result<()> {
        match &mut self.stdin {
            Some(stdin) => stdin.write_all(format!("{line}\n").as_bytes()),
            None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
        }
    }

    /// Closes its stdin (EOF: a watchdog not yet released thaws what it was told of), reads
    /// its last word and reaps it.
    fn finish(&mut self) -> WatchdogOutcome {
        self.finished = true;
        drop(self.stdin.take());
        let until = Instant::now() + Duration::from_secs(2);
        let mut outcome = None;
        while outcome.is_none() {
            match self
                .lines
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line == "released" => outcome = Some(WatchdogOutcome::Released),
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("fired ") {
                        outcome = Some(WatchdogOutcome::Fired(rest.to_owned()));
                    }
                }
                Err(_) => break,
            }
        }
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s.to_string(),
                Ok(None) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break "killed: it did not exit".to_owned();
                }
                Err(e) => break format!("wait: {e}"),
            }
        };
        outcome.unwrap_or_else(|| WatchdogOutcome::Lost(format!("no last word ({status})")))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.finish();
        }
    }
}

/// A filesystem being frozen, through one of its mount points.
#[derive(Debug, Clone)]
struct Target {
    fs: Filesystem,
    mount_point: PathBuf,
}

/// Frozen state shared with the timer thread.
struct State {
    files: Vec<File>,
    /// Indexes into `files` of what we froze, in freeze order.
    frozen: Vec<usize>,
    watchdog: Option<Watchdog>,
    /// The timer thawed.
    expired: bool,
    /// Thawed (by the timer or the caller); nothing more may be frozen.
    released: bool,
    thawed_at: Option<Instant>,
    thaw_took: Duration,
    thawed_early: Vec<usize>,
    thaw_errors: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Thaws what we froze, last frozen first. No logging here: the caller may hold a freeze.
fn thaw_all(st: &mut State, targets: &[Target]) {
    if st.released {
        return;
    }
    st.released = true;
    let start = Instant::now();
    for &i in st.frozen.iter().rev() {
        match thaw_fd(st.files[i].as_fd()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => st.thawed_early.push(i),
            Err(e) => st
                .thaw_errors
                .push(format!("{}: {e}", targets[i].mount_point.display())),
        }
    }
    st.thawed_at = Some(Instant::now());
    st.thaw_took = start.elapsed();
    if st.thaw_errors.is_empty() {
        if let Some(wd) = st.watchdog.as_mut() {
            let _ = wd.send("thawed");
        }
    }
}

/// Filesystems frozen by [`freeze`]. [`thaw`](Self::thaw) (or drop) thaws them, last frozen
/// first, and runs the post hook; the in-process timer thaws them at
/// [`FreezeOptions::max_freeze`] if the caller has not, and the watchdog process if the agent
/// is gone. Do not log or write to a file while holding it.
pub struct Frozen {
    shared: Arc<Shared>,
    timer: Option<JoinHandle<()>>,
    targets: Vec<Target>,
    started: Instant,
    deadline: Instant,
    max_freeze: Duration,
    report: FreezeReport,
    post_hook: Option<PostHook>,
    memlocked: bool,
    aborted: bool,
    done: bool,
}

impl fmt::Debug for Frozen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frozen")
            .field("frozen", &self.report.frozen)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Frozen {
    /// What was frozen and what was not.
    pub fn report(&self) -> &FreezeReport {
        &self.report
    }

    /// When the timer thaws: the read of the leftover chunks must end before.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Whether the timer already thawed (the point is no longer consistent).
    pub fn expired(&self) -> bool {
        self.shared.lock().expired
    }

    /// Thaws (unless the timer did), stops the watchdog, runs the post hook, and reports.
    pub fn thaw(mut self) -> ThawReport {
        self.finish()
    }

    fn abort(&mut self, e: FreezeError) -> FreezeError {
        self.aborted = true;
        let _ = self.finish();
        e
    }

    fn finish(&mut self) -> ThawReport {
        self.done = true;
        let (mut watchdog, expired, thawed_at, thaw_took, thawed_early, thaw_errors, anything) = {
            let mut st = self.shared.lock();
            thaw_all(&mut st, &self.targets);
            self.shared.cv.notify_all();
            (
                st.watchdog.take(),
                st.expired,
                st.thawed_at,
                st.thaw_took,
                std::mem::take(&mut st.thawed_early),
                std::mem::take(&mut st.thaw_errors),
                !st.frozen.is_empty(),
            )
        };
        // Thawed: logging and files are safe again.
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
        if self.memlocked {
            // SAFETY: munlockall has no preconditions.
            unsafe { libc::munlockall() };
            self.memlocked = false;
        }
        let watchdog = match watchdog.as_mut() {
            Some(wd) => wd.finish(),
            None => WatchdogOutcome::NotNeeded,
        };
        let frozen_for = match (anything, thawed_at) {
            (true, Some(t)) => t.duration_since(self.started),
            _ => Duration::ZERO,
        };
        let mut report = ThawReport {
            freeze: self.report.clone(),
            frozen_for,
            thaw_took,
            expired,
            watchdog,
            thawed_early: thawed_early
                .iter()
                .map(|&i| self.targets[i].mount_point.clone())
                .collect(),
            thaw_errors,
            post_hook: None,
            max_freeze: self.max_freeze,
        };
        for e in &report.thaw_errors {
            tracing::error!("thawing {e}; the watchdog retries");
        }
        match &report.watchdog {
            WatchdogOutcome::Fired(line) => tracing::warn!("the freeze watchdog thawed: {line}"),
            WatchdogOutcome::Lost(why) if anything => {
                tracing::warn!("the freeze watchdog went away: {why}")
            }
            _ => {}
        }
        let result = match report.consistency() {
            _ if self.aborted => "aborted",
            Consistency::Consistent => "consistent",
            Consistency::BestEffort(_) => "best-effort",
        };
        if let Some(post) = self.post_hook.take() {
            report.post_hook = Some(post.run(result));
        }
        tracing::debug!(
            frozen_for = ?report.frozen_for,
            sync = ?report.freeze.sync_took,
            freeze = ?report.freeze.freeze_took,
            thaw = ?report.thaw_took,
            "filesystems thawed ({result})"
        );
        report
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.finish();
        }
    }
}

/// The timer thread: thaws at the deadline unless released first.
fn timer(shared: &Shared, targets: &[Target], deadline: Instant) {
    let mut st = shared.lock();
    loop {
        if st.released {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            st.expired = true;
            thaw_all(&mut st, targets);
            return;
        }
        st = shared
            .cv
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// Freezes the planned filesystems: runs the pre hook, opens each filesystem (through a mount
/// point checked to be it), `syncfs`es all of them, starts the watchdog and waits for it to be
/// ready, locks memory, then freezes them in plan order (children first). A filesystem that
/// cannot be frozen is reported in [`FreezeReport::not_frozen`], not an error; `EPERM`, a
/// failed pre hook or a watchdog that does not start are errors, and nothing stays frozen.
pub fn freeze(plan: &Plan, opts: &FreezeOptions) -> Result<Frozen, FreezeError> {
    let mounts = plan.mount_points();
    let mut report = FreezeReport {
        not_frozen: plan.skipped.clone(),
        ..FreezeReport::default()
    };
    let post = opts.post_hook.as_ref().map(|p| PostHook {
        path: p.clone(),
        mounts: mounts.clone(),
        timeout: opts.hook_timeout,
    });
    if let Some(pre) = &opts.pre_hook {
        let outcome = run_hook(pre, "pre", &mounts, None, opts.hook_timeout);
        if !outcome.ok() {
            let post = post.map(|p| Box::new(p.run("aborted")));
            return Err(FreezeError::PreHook {
                outcome: Box::new(outcome),
                post,
            });
        }
        report.pre_hook = Some(outcome);
    }
    let abort = |e: FreezeError| {
        if let Some(p) = &post {
            p.run("aborted");
        }
        e
    };

    let mut targets = Vec::new();
    let mut files = Vec::new();
    let mut sync_only = Vec::new();
    for fs in &plan.filesystems {
        match open_filesystem(fs) {
            Ok((file, mount_point, _)) if fs.freezable => {
                targets.push(Target {
                    fs: fs.clone(),
                    mount_point,
                });
                files.push(file);
            }
            Ok((file, mount_point, _)) => {
                sync_only.push((file, mount_point));
                report.not_frozen.push(fs.skipped(NotFrozen::Unsupported));
            }
            Err(why) => report
                .not_frozen
                .push(fs.skipped(NotFrozen::Unreachable(why))),
        }
    }
    let sync_start = Instant::now();
    let all = files
        .iter()
        .zip(targets.iter().map(|t| &t.mount_point))
        .chain(sync_only.iter().map(|(f, m)| (f, m)));
    for (file, mount_point) in all {
        if let Err(e) = syncfs(file.as_fd()) {
            report
                .sync_errors
                .push(format!("syncfs {}: {e}", mount_point.display()));
        }
    }
    report.sync_took = sync_start.elapsed();
    drop(sync_only);

    let watchdog = if targets.is_empty() {
        None
    } else {
        let points: Vec<&Path> = targets.iter().map(|t| t.mount_point.as_path()).collect();
        let (mut wd, ready) = Watchdog::start(
            &opts.watchdog,
            opts.watchdog_deadline(),
            &points,
            opts.watchdog_ready_timeout,
        )
        .map_err(abort)?;
        // It must hold the very mounts we are about to freeze.
        for (i, (file, t)) in files.iter().zip(&targets).enumerate() {
            let ours = mount_id(file);
            let theirs = ready.mount_ids.get(i).copied().flatten();
            if ours.is_some() && theirs.is_some() && ours != theirs {
                wd.finish();
                return Err(abort(FreezeError::Watchdog(format!(
                    "opened another mount than ours at {} (mount id {theirs:?}, ours {ours:?})",
                    t.mount_point.display()
                ))));
            }
        }
        report.watchdog_memlock = Some(ready.memlock);
        Some(wd)
    };

    let memlocked = if opts.lock_memory && watchdog.is_some() {
        // SAFETY: mlockall has no memory preconditions.
        let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
        if r != 0 {
            report.memlock_error = Some(io::Error::last_os_error().to_string());
        }
        r == 0
    } else {
        false
    };

    let started = Instant::now();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            files,
            frozen: Vec::new(),
            watchdog,
            expired: false,
            released: false,
            thawed_at: None,
            thaw_took: Duration::ZERO,
            thawed_early: Vec::new(),
            thaw_errors: Vec::new(),
        }),
        cv: Condvar::new(),
    });
    let deadline = started + opts.max_freeze;
    let mut frozen = Frozen {
        shared: Arc::clone(&shared),
        timer: None,
        targets,
        started,
        deadline,
        max_freeze: opts.max_freeze,
        report,
        post_hook: post,
        memlocked,
        aborted: false,
        done: false,
    };
    if frozen.targets.is_empty() {
        return Ok(frozen);
    }
    let timer_targets = frozen.targets.clone();
    match std::thread::Builder::new()
        .name("slipway-freeze-timer".into())
        .spawn(move || timer(&shared, &timer_targets, deadline))
    {
        Ok(t) => frozen.timer = Some(t),
        Err(e) => {
            return Err(frozen.abort(FreezeError::Io {
                what: "starting the freeze timer".into(),
                source: e,
            }))
        }
    }

    // From the first FIFREEZE to the last FITHAW: no logging, no files.
    for i in 0..frozen.targets.len() {
        let mut st = frozen.shared.lock();
        if st.expired {
            for t in &frozen.targets[i..] {
                frozen
                    .report
                    .not_frozen
                    .push(t.fs.skipped(NotFrozen::Expired));
            }
            break;
        }
        let wd = st.watchdog.as_mut().expect("started");
        if let Err(e) = wd.send(&format!("freeze {i}")) {
            drop(st);
            return Err(frozen.abort(FreezeError::Watchdog(format!(
                "went away during the freeze ({e})"
            ))));
        }
        match freeze_fd(st.files[i].as_fd()) {
            Ok(()) => st.frozen.push(i),
            Err(e) => {
                let _ = st
                    .watchdog
                    .as_mut()
                    .expect("started")
                    .send(&format!("skip {i}"));
                let why = match e.raw_os_error() {
                    Some(libc::EOPNOTSUPP) => NotFrozen::Unsupported,
                    Some(libc::EBUSY) => NotFrozen::AlreadyFrozen,
                    Some(libc::EPERM | libc::EACCES) => {
                        drop(st);
                        let what = format!("FIFREEZE {}", frozen.targets[i].mount_point.display());
                        return Err(frozen.abort(FreezeError::NotPermitted { what, source: e }));
                    }
                    _ => NotFrozen::Failed(e.to_string()),
                };
                frozen
                    .report
                    .not_frozen
                    .push(frozen.targets[i].fs.skipped(why));
            }
        }
    }
    let st = frozen.shared.lock();
    frozen.report.freeze_took = started.elapsed();
    frozen.report.frozen = st
        .frozen
        .iter()
        .map(|&i| frozen.targets[i].mount_point.clone())
        .collect();
    drop(st);
    Ok(frozen)
}

/// The `freeze-watchdog` subcommand: guards a freeze from outside the agent.
///
/// Protocol, one line each way (stdin and stdout are pipes to the agent; stderr is never
/// written once ready):
/// 1. It opens every `MOUNTPOINT` (index 0, 1, … in argument order) and locks its memory,
///    then writes `ready mnt=<mount id>,… memlock=<ok or why not>` (or `error …` and exits 2).
///    The agent freezes nothing before this line, and checks the mount ids against its own.
/// 2. The agent writes `freeze <i>` before each `FIFREEZE` of mount `i`, and `skip <i>` if that
///    failed (`EBUSY`: someone else's freeze, which is not ours to thaw).
/// 3. `thawed`: the agent thawed everything. It answers `released` and exits 0 having touched
///    nothing.
/// 4. EOF on stdin (the agent died, however: the kernel closes the pipe) or
///    `--deadline-ms` after `ready`: it `FITHAW`s every mount it was told of, last first
///    (`EINVAL`, not frozen, is fine), writes `fired <eof|deadline> thawed=… not-frozen=…
///    failed=…` and exits 1.
///
/// It ignores SIGINT, SIGTERM, SIGHUP and SIGQUIT (and runs in its own process group) so that
/// what stops the agent does not stop it first.
pub fn watchdog_main(deadline: Duration, mounts: &[PathBuf]) -> ExitCode {
    ExitCode::from(watchdog_run(deadline, mounts))
}

fn watchdog_run(deadline: Duration, mounts: &[PathBuf]) -> u8 {
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
    ] {
        // SAFETY: setting a signal to SIG_IGN installs no handler and touches no memory.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut out = io::stdout().lock();
    let mut say = |line: &str| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let mut files = Vec::with_capacity(mounts.len());
    let mut ids = Vec::with_capacity(mounts.len());
    for m in mounts {
        match open_mount_point(m) {
            Ok(f) => {
                ids.push(mount_id(&f).map(|i| i.to_string()).unwrap_or_default());
                files.push(f);
            }
            Err(e) => {
                say(&format!("error opening {}: {e}", m.display()));
                return 2;
            }
        }
    }
    let mut stdin = match io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => {
            say(&format!("error reading stdin: {e}"));
            return 2;
        }
    };
    // SAFETY: mlockall has no memory preconditions.
    let memlock = if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } == 0 {
        "ok".to_owned()
    } else {
        io::Error::last_os_error().to_string()
    };
    let deadline = Instant::now() + deadline;
    say(&format!("ready mnt={} memlock={memlock}", ids.join(",")));

    let mut armed: Vec<usize> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 512];
    let reason = 'wait: loop {
        let now = Instant::now();
        if now >= deadline {
            break "deadline";
        }
        let ms = (deadline - now).as_micros().div_ceil(1000);
        let mut fds = libc::pollfd {
            fd: stdin.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live, writable pollfd and a count of 1; stdin stays open for the call.
        let r = unsafe { libc::poll(&mut fds, 1, i32::try_from(ms).unwrap_or(i32::MAX)) };
        if r == 0 {
            continue;
        }
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break "poll-failed";
        }
        let n = match stdin.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break "read-failed",
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            let mut words = line.split(' ');
            match (
                words.next(),
                words.next().and_then(|w| w.parse::<usize>().ok()),
            ) {
                (Some("thawed"), None) => break 'wait "released",
                (Some("freeze"), Some(i)) if i < files.len() && !armed.contains(&i) => {
                    armed.push(i);
                }
                (Some("skip"), Some(i)) => armed.retain(|&a| a != i),
                _ => {}
            }
        }
    };
    if reason == "released" {
        say("released");
        return 0;
    }
    let (mut thawed, mut not_frozen, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for &i in armed.iter().rev() {
        match thaw_fd(files[i].as_fd()) {
            Ok(()) => thawed.push(i.to_string()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => not_frozen.push(i.to_string()),
            Err(e) => failed.push(format!("{i}:{}", e.raw_os_error().unwrap_or(0))),
        }
    }
    say(&format!(
        "fired {reason} thawed={} not-frozen={} failed={}",
        thawed.join(","),
        not_frozen.join(","),
        failed.join(",")
    ));
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::mpsc::Receiver;

    fn dev(major: u32, minor: u32) -> DevId {
        DevId { major, minor }
    }

    fn mount(id: u32, d: DevId, root: &str, point: &str, fs_type: &str, sopts: &str) -> Mount {
        Mount {
            id,
            parent: 1,
            dev: d,
            root: root.into(),
            mount_point: point.into(),
            mount_options: "rw,relatime".into(),
            fs_type: fs_type.into(),
            source: format!("/dev/x{id}"),
            super_options: sopts.into(),
        }
    }

    fn block(name: &str, d: DevId, kind: DeviceKind, leaf: bool) -> BlockDevice {
        BlockDevice {
            name: name.into(),
            dev: d,
            kind,
            leaf,
        }
    }

    /// `/dev/sda` (8:0) with partitions sda1 (8:1), sda2 (8:2, LVM under dm-0 253:0) and
    /// sda3 (8:3).
    fn sda() -> SourceDisk {
        SourceDisk {
            path: "/dev/sda".into(),
            devices: vec![
                block("sda", dev(8, 0), DeviceKind::Disk, false),
                block("sda1", dev(8, 1), DeviceKind::Partition, true),
                block("sda2", dev(8, 2), DeviceKind::Partition, false),
                block("sda3", dev(8, 3), DeviceKind::Partition, true),
                block("dm-0", dev(253, 0), DeviceKind::Stacked, true),
            ],
        }
    }

    fn no_source(_: &Mount) -> Option<DevId> {
        None
    }

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() {
        let m = parse_mountinfo_line(
            b"36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert_eq!(
            m,
            Mount {
                id: 36,
                parent: 35,
                dev: dev(98, 0),
                root: "/mnt1".into(),
                mount_point: "/mnt/parent".into(),
                mount_options: "rw,noatime".into(),
                fs_type: "ext3".into(),
                source: "/dev/root".into(),
                super_options: "rw,errors=continue".into(),
            }
        );
        assert!(!m.whole());
        assert_eq!(m.depth(), 2);
        assert!(!m.superblock_read_only());

        // No optional fields; a space, a tab, a newline and a backslash in the mount point.
        let m = parse_mountinfo_line(
            br"27 1 254:0 / /srv/my\040data\011x\012y\134z rw - ext4 /dev/vda ro,discard",
        )
        .unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/srv/my data\tx\ny\\z"));
        assert!(m.whole());
        assert!(m.superblock_read_only());
        assert_eq!(m.depth(), 2);

        // Non-UTF-8 bytes survive in paths.
        let m = parse_mountinfo_line(b"28 27 7:1 / /mnt/\xff rw - ext4 /dev/loop1 rw").unwrap();
        assert_eq!(m.mount_point, os_path(b"/mnt/\xff".to_vec()));

        for bad in [
            &b""[..],
            b"27 1 254:0 / / rw ext4 /dev/vda rw",
            b"27 1 254:0 / / rw - ext4",
            b"x 1 254:0 / / rw - ext4 /dev/vda rw",
            b"27 1 254 / / rw - ext4 /dev/vda rw",
        ] {
            assert!(parse_mountinfo_line(bad).is_err(), "{bad:?}");
        }
        let all = parse_mountinfo(
            b"22 27 0:21 / /proc rw,relatime - proc proc rw\n27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n",
        )
        .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].dev, dev(254, 0));
    }

    #[test]
    fn unescape_leaves_what_is_not_an_escape() {
        assert_eq!(unescape(br"a\040b"), b"a b");
        assert_eq!(unescape(br"a\04"), br"a\04");
        assert_eq!(unescape(br"a\089"), br"a\089");
        assert_eq!(unescape(br"a\777"), br"a\777", "above 255 is no byte");
        assert_eq!(unescape(br"\\"), br"\\");
        assert_eq!(unescape(br"\134\134"), br"\\");
    }

    #[test]
    fn swaps_lists_partitions_only() {
        let text = b"Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
            /dev/vda2                               partition\t1048572\t\t0\t\t-2\n\
            /swap\\040file                          file\t\t1048572\t\t0\t\t-3\n";
        assert_eq!(parse_swaps(text), vec![PathBuf::from("/dev/vda2")]);
        assert!(parse_swaps(b"Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn the_plan_takes_the_disks_filesystems_children_first_and_each_superblock_once() {
        let other = dev(254, 0);
        let mounts = vec![
            mount(27, other, "/", "/", "ext4", "rw"),
            mount(30, dev(253, 0), "/", "/srv", "xfs", "rw"),
            mount(31, dev(8, 1), "/", "/srv/data", "ext4", "rw"),
            mount(32, dev(8, 3), "/", "/srv/data/logs", "ext4", "rw"),
            // A bind mount of a subtree of sda1, deeper and older than sda1's own mount
            // would be: dedup keeps one entry, through the whole-filesystem mount.
            mount(40, dev(8, 1), "/www", "/var/www", "ext4", "rw"),
            // Another bind of /srv (a whole mount, but deeper): /srv stays first.
            mount(41, dev(253, 0), "/", "/mnt/srv2", "xfs", "rw"),
            mount(42, dev(0, 50), "/", "/tmp", "tmpfs", "rw"),
        ];
        let p = plan(&mounts, &[sda()], &[], no_source);
        assert_eq!(
            p.mount_points(),
            vec![
                PathBuf::from("/srv/data/logs"),
                PathBuf::from("/srv/data"),
                PathBuf::from("/srv"),
            ],
            "deepest first; the root and tmpfs are on no source disk"
        );
        let data = &p.filesystems[1];
        assert_eq!(data.dev, dev(8, 1));
        assert_eq!(
            data.mounts,
            vec![(31, PathBuf::from("/srv/data")), (40, "/var/www".into())]
        );
        assert_eq!(p.filesystems[2].mounts.len(), 2);
        assert!(p.filesystems.iter().all(|f| f.freezable));
        assert!(p
            .filesystems
            .iter()
            .all(|f| f.disk == Path::new("/dev/sda")));
        assert!(p.skipped.is_empty(), "{:?}", p.skipped);
    }

    #[test]
    fn equal_depths_freeze_the_later_mount_first() {
        let mounts = vec![
            mount(50, dev(8, 1), "/", "/a", "ext4", "rw"),
            mount(51, dev(8, 3), "/", "/b", "ext4", "rw"),
        ];
        let p = plan(&mounts, &[sda()], &[], no_source);
        assert_eq!(p.mount_points(), vec![PathBuf::from("/b"), "/a".into()]);
    }

    #[test]
    fn the_plan_reports_what_it_will_not_freeze() {
        let mounts = vec![
            mount(30, dev(8, 1), "/", "/boot/efi", "vfat", "rw"),
            mount(31, dev(253, 0), "/", "/ro", "ext4", "ro,errors=remount-ro"),
        ];
        // sda3 is an active swap partition; nothing else is unmounted (sda and sda2 are
        // not leaves).
        let p = plan(&mounts, &[sda()], &[dev(8, 3)], no_source);
        assert_eq!(p.filesystems.len(), 1);
        assert!(!p.filesystems[0].freezable, "vfat is synced, not frozen");
        let why: Vec<_> = p
            .skipped
            .iter()
            .map(|s| (s.what.clone(), s.why.clone()))
            .collect();
        assert_eq!(
            why,
            vec![
                (PathBuf::from("/ro"), NotFrozen::ReadOnly),
                ("/dev/sda3".into(), NotFrozen::Swap),
            ]
        );
        assert!(p.skipped.iter().all(|s| !s.why.breaks_consistency()));

        let p = plan(&[], &[sda()], &[], no_source);
        let unmounted: Vec<_> = p.skipped.iter().map(|s| s.what.clone()).collect();
        assert_eq!(
            unmounted,
            vec![
                PathBuf::from("/dev/sda1"),
                "/dev/sda3".into(),
                "/dev/dm-0".into()
            ]
        );
        assert!(p.skipped.iter().all(|s| s.why == NotFrozen::Unmounted));
        assert_eq!(
            p.skipped[0].to_string(),
            "/dev/sda1 (8:1 on /dev/sda): not mounted here (direct writes to it are not stopped)"
        );
    }

    #[test]
    fn an_anonymous_device_mount_is_matched_by_its_source() {
        // btrfs: mountinfo shows 0:N, shared by its subvolume mounts.
        let mounts = vec![
            mount(60, dev(0, 33), "/@", "/", "btrfs", "rw"),
            mount(61, dev(0, 33), "/@home", "/home", "btrfs", "rw"),
            mount(62, dev(0, 34), "/", "/run", "tmpfs", "rw"),
        ];
        let source = |m: &Mount| (m.fs_type == "btrfs").then_some(dev(8, 1));
        let p = plan(&mounts, &[sda()], &[], source);
        assert_eq!(p.filesystems.len(), 1);
        assert_eq!(p.filesystems[0].dev, dev(0, 33));
        assert_eq!(p.filesystems[0].mount_point(), Path::new("/"));
        assert_eq!(p.filesystems[0].mounts.len(), 2);
        assert!(
            !p.skipped.iter().any(|s| s.dev == dev(8, 1)),
            "sda1 counts as mounted"
        );
    }

    #[test]
    fn a_disk_resolves_to_its_partitions_and_what_is_stacked_on_them() {
        let sys = tempfile::tempdir().unwrap();
        let s = sys.path();
        let mkdev = |dir: &Path, d: &str, partition: bool| {
            fs::create_dir_all(dir.join("holders")).unwrap();
            fs::write(dir.join("dev"), format!("{d}\n")).unwrap();
            if partition {
                fs::write(dir.join("partition"), "1\n").unwrap();
            }
        };
        let sda = s.join("devices/pci/block/sda");
        mkdev(&sda, "8:0", false);
        mkdev(&sda.join("sda1"), "8:1", true);
        mkdev(&sda.join("sda2"), "8:2", true);
        let dm0 = s.join("devices/virtual/block/dm-0");
        mkdev(&dm0, "253:0", false);
        let dm1 = s.join("devices/virtual/block/dm-1");
        mkdev(&dm1, "253:1", false);
        fs::create_dir_all(s.join("dev/block")).unwrap();
        fs::create_dir_all(s.join("class/block")).unwrap();
        std::os::unix::fs::symlink(&sda, s.join("dev/block/8:0")).unwrap();
        std::os::unix::fs::symlink(sda.join("sda2"), s.join("dev/block/8:2")).unwrap();
        for (name, dir) in [("dm-0", &dm0), ("dm-1", &dm1)] {
            std::os::unix::fs::symlink(dir, s.join("class/block").join(name)).unwrap();
        }
        // sda2 → dm-0 (LVM PV) → dm-1 (dm-crypt on the LV).
        std::os::unix::fs::symlink(&dm0, sda.join("sda2/holders/dm-0")).unwrap();
        std::os::unix::fs::symlink(&dm1, dm0.join("holders/dm-1")).unwrap();

        let disk = SourceDisk::from_sysfs(s, Path::new("/dev/sda"), dev(8, 0)).unwrap();
        assert_eq!(
            disk.devices,
            vec![
                block("sda", dev(8, 0), DeviceKind::Disk, false),
                block("sda1", dev(8, 1), DeviceKind::Partition, true),
                block("sda2", dev(8, 2), DeviceKind::Partition, false),
                block("dm-0", dev(253, 0), DeviceKind::Stacked, false),
                block("dm-1", dev(253, 1), DeviceKind::Stacked, true),
            ]
        );
        let part = SourceDisk::from_sysfs(s, Path::new("/dev/sda2"), dev(8, 2)).unwrap();
        assert_eq!(
            part.devices,
            vec![
                block("sda2", dev(8, 2), DeviceKind::Partition, false),
                block("dm-0", dev(253, 0), DeviceKind::Stacked, false),
                block("dm-1", dev(253, 1), DeviceKind::Stacked, true),
            ]
        );
        assert!(matches!(
            SourceDisk::from_sysfs(s, Path::new("/dev/sdb"), dev(8, 16)),
            Err(FreezeError::Io { .. })
        ));
    }

    #[test]
    fn a_file_is_not_a_source_disk_to_freeze() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            Plan::for_disks(&[f.path()]),
            Err(FreezeError::NotBlockDevice { .. })
        ));
    }

    // --- hooks (no root needed: an empty plan freezes nothing) ---

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn hooks_run_before_and_after_with_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let body = format!(
            "echo \"$1 $SLIPWAY_FREEZE_PHASE ${{SLIPWAY_FREEZE_RESULT:-none}}\" >> {}\necho said $1",
            log.display()
        );
        let hook = script(dir.path(), "hook", &body);
        let opts = FreezeOptions {
            pre_hook: Some(hook.clone()),
            post_hook: Some(hook),
            ..FreezeOptions::default()
        };
        let frozen = freeze(&Plan::default(), &opts).unwrap();
        assert!(frozen.report().pre_hook.as_ref().unwrap().ok());
        assert_eq!(
            frozen.report().pre_hook.as_ref().unwrap().output,
            "said pre\n"
        );
        let report = frozen.thaw();
        assert_eq!(report.consistency(), Consistency::Consistent);
        assert_eq!(report.watchdog, WatchdogOutcome::NotNeeded);
        assert_eq!(report.frozen_for, Duration::ZERO);
        assert!(report.post_hook.unwrap().ok());
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            "pre pre none\npost post consistent\n"
        );
    }

    #[test]
    fn a_failing_pre_hook_aborts_and_the_post_hook_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let opts = FreezeOptions {
            pre_hook: Some(script(dir.path(), "pre", "echo cannot quiesce >&2\nexit 3")),
            post_hook: Some(script(
                dir.path(),
                "post",
                &format!("echo \"$SLIPWAY_FREEZE_RESULT\" > {}", log.display()),
            )),
            ..FreezeOptions::default()
        };
        match freeze(&Plan::default(), &opts) {
            Err(FreezeError::PreHook { outcome, post }) => {
                assert_eq!(outcome.status, HookStatus::Exited(3));
                assert_eq!(outcome.output, "cannot quiesce\n");
                assert!(post.unwrap().ok());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fs::read_to_string(&log).unwrap(), "aborted\n");
    }

    #[test]
    fn a_hook_that_hangs_is_killed_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let opts = FreezeOptions {
            pre_hook: Some(script(dir.path(), "pre", "sleep 30 &\nsleep 30")),
            hook_timeout: Duration::from_millis(300),
            ..FreezeOptions::default()
        };
        let start = Instant::now();
        match freeze(&Plan::default(), &opts) {
            Err(FreezeError::PreHook { outcome, .. }) => {
                assert_eq!(
                    outcome.status,
                    HookStatus::TimedOut(Duration::from_millis(300))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let e = freeze(
            &Plan::default(),
            &FreezeOptions {
                pre_hook: Some(dir.path().join("missing")),
                ..FreezeOptions::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("could not be started"), "{e}");
    }

    // --- the watchdog, run as this test binary (no root needed to talk to it) ---

    /// Starts this test binary as the watchdog: libtest runs only `watchdog_child` (`--exact`)
    /// and leaves everything after `--` alone, where the watchdog's arguments go.
    fn test_watchdog() -> WatchdogCommand {
        WatchdogCommand {
            program: std::env::current_exe().unwrap(),
            args: [
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "-q",
                "freeze::tests::watchdog_child",
                "--",
            ]
            .into_iter()
            .map(OsString::from)
            .collect(),
        }
    }

    /// Not a test of its own: the watchdog of the other tests when this binary is started by
    /// [`test_watchdog`] (`… -- --deadline-ms N -- MOUNT…`); otherwise it does nothing.
    #[test]
    fn watchdog_child() {
        let args: Vec<OsString> = std::env::args_os().collect();
        let Some(at) = args.iter().position(|a| a == "--") else {
            return;
        };
        let rest = &args[at + 1..];
        if rest.len() < 3 || rest[0] != "--deadline-ms" || rest[2] != "--" {
            return;
        }
        let ms: u64 = rest[1].to_str().unwrap().parse().unwrap();
        let mounts: Vec<PathBuf> = rest[3..].iter().map(PathBuf::from).collect();
        std::process::exit(i32::from(watchdog_run(Duration::from_millis(ms), &mounts)));
    }

    fn start_test_watchdog(deadline: Duration, mounts: &[&Path]) -> Watchdog {
        let (wd, ready) =
            Watchdog::start(&test_watchdog(), deadline, mounts, Duration::from_secs(20)).unwrap();
        assert_eq!(ready.mount_ids.len(), mounts.len());
        for (id, m) in ready.mount_ids.iter().zip(mounts) {
            let ours = mount_id(&open_mount_point(m).unwrap());
            assert_eq!(*id, ours, "{}", m.display());
        }
        wd
    }

    #[test]
    fn a_released_watchdog_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut wd = start_test_watchdog(Duration::from_secs(60), &[dir.path()]);
        wd.send("freeze 0").unwrap();
        wd.send("thawed").unwrap();
        assert_eq!(wd.finish(), WatchdogOutcome::Released);
    }

    #[test]
    fn the_watchdog_fires_on_eof_for_what_it_was_told_of() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let mut wd = start_test_watchdog(Duration::from_secs(60), &[dir.path(), other.path()]);
        wd.send("freeze 0").unwrap();
        wd.send("freeze 1").unwrap();
        wd.send("skip 1").unwrap();
        let start = Instant::now();
        let WatchdogOutcome::Fired(line) = wd.finish() else {
            panic!("did not fire")
        };
        assert!(start.elapsed() < Duration::from_secs(2));
        // Not frozen, so FITHAW says EINVAL (EPERM without root); mount 1 was skipped.
        assert!(
            line == "eof thawed= not-frozen=0 failed="
                || line == "eof thawed= not-frozen= failed=0:1",
            "{line}"
        );
    }

    #[test]
    fn the_watchdog_fires_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let mut wd = start_test_watchdog(Duration::from_millis(300), &[dir.path()]);
        wd.send("freeze 0").unwrap();
        let line = wd.lines.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(line.starts_with("fired deadline "), "{line}");
        assert!(start.elapsed() >= Duration::from_millis(300));
        // That line read, all that is left is its exit.
        match wd.finish() {
            WatchdogOutcome::Lost(why) => assert!(why.contains("exit status: 1"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_watchdog_that_cannot_open_a_mount_point_fails_the_start() {
        let e = Watchdog::start(
            &test_watchdog(),
            Duration::from_secs(60),
            &[Path::new("/nonexistent/slipway")],
            Duration::from_secs(20),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("failed: opening /nonexistent/slipway"),
            "{e}"
        );
        let e = Watchdog::start(
            &WatchdogCommand {
                program: "/nonexistent/slipway-agent".into(),
                args: vec![],
            },
            Duration::from_secs(60),
            &[Path::new("/")],
            Duration::from_secs(20),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("could not be started"), "{e}");
    }

    // --- real freezes (root, loop devices, ext4) ---

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// Whether loop-mounted ext4 filesystems can be made here; says why not if not.
    fn can_mount_ext4() -> bool {
        if !is_root() {
            eprintln!("skipped: freezing needs root");
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

    fn sh(cmd: &str, args: &[&OsStr]) {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    use std::ffi::OsStr;

    /// A 32 MiB ext4 on a loop device, mounted; unmounted (thawed first) and detached on drop.
    struct Ext4 {
        dev: PathBuf,
        image: PathBuf,
        mount_point: PathBuf,
        mounted: bool,
    }

    impl Ext4 {
        fn make(image: PathBuf, mount_point: PathBuf) -> Ext4 {
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
            let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            let mut fs = Ext4 {
                dev,
                image,
                mount_point,
                mounted: false,
            };
            sh(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-E".as_ref(),
                    "lazy_itable_init=0,lazy_journal_init=0".as_ref(),
                    fs.dev.as_os_str(),
                ],
            );
            fs::create_dir_all(&fs.mount_point).unwrap();
            sh("mount", &[fs.dev.as_os_str(), fs.mount_point.as_os_str()]);
            fs.mounted = true;
            fs
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
            let _ = fs::remove_file(&self.image);
        }
    }

    /// Creates (or appends to) `path`, writes and fsyncs, in a thread: the receiver hears when
    /// it is done.
    fn write_in_thread(path: PathBuf) -> Receiver<io::Result<()>> {
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

    fn assert_blocked(rx: &Receiver<io::Result<()>>, what: &str) {
        match rx.recv_timeout(Duration::from_millis(300)) {
            Err(RecvTimeoutError::Timeout) => {}
            other => panic!("a write to {what} was not held by the freeze: {other:?}"),
        }
    }

    fn assert_completes(rx: &Receiver<io::Result<()>>, what: &str) {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            other => panic!("a write to {what} did not complete after the thaw: {other:?}"),
        }
    }

    /// Dirties `mb` MiB of page cache on a filesystem, for syncfs and the freeze to write.
    fn dirty(dir: &Path, mb: usize) {
        let mut f = File::create(dir.join("dirty")).unwrap();
        let block = vec![0x5au8; 1 << 20];
        for _ in 0..mb {
            f.write_all(&block).unwrap();
        }
    }

    #[test]
    fn nested_filesystems_freeze_children_first_hold_writers_and_thaw() {
        if !can_mount_ext4() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let outer = Ext4::make(dir.path().join("outer.img"), dir.path().join("outer"));
        let inner_point = outer.mount_point.join("inner");
        let inner = Ext4::make(dir.path().join("inner.img"), inner_point.clone());

        let plan = Plan::for_disks(&[&outer.dev, &inner.dev]).unwrap();
        assert_eq!(
            plan.mount_points(),
            vec![inner_point.clone(), outer.mount_point.clone()],
            "the nested filesystem first"
        );
        let opts = FreezeOptions {
            max_freeze: Duration::from_secs(5),
            watchdog: test_watchdog(),
            ..FreezeOptions::default()
        };

        // Measured: syncfs + freeze + thaw with 8 MiB dirty on each filesystem.
        for round in 0..5 {
            dirty(&outer.mount_point, 8);
            dirty(&inner_point, 8);
            let frozen = freeze(&plan, &opts).unwrap();
            let report = frozen.thaw();
            assert_eq!(report.consistency(), Consistency::Consistent);
            eprintln!(
                "round {round}: sync {:?}, freeze {:?}, thaw {:?}, frozen for {:?}",
                report.freeze.sync_took,
                report.freeze.freeze_took,
                report.thaw_took,
                report.frozen_for
            );
        }

        let frozen = freeze(&plan, &opts).unwrap();
        assert_eq!(
            frozen.report().frozen,
            vec![inner_point.clone(), outer.mount_point.clone()]
        );
        assert_eq!(frozen.report().watchdog_memlock.as_deref(), Some("ok"));
        assert_eq!(frozen.report().memlock_error, None);
        let w_inner = write_in_thread(inner_point.join("f"));
        let w_outer = write_in_thread(outer.mount_point.join("f"));
        assert_blocked(&w_inner, "the inner filesystem");
        assert_blocked(&w_outer, "the outer filesystem");
        assert!(!frozen.expired());
        let report = frozen.thaw();
        assert_completes(&w_inner, "the inner filesystem");
        assert_completes(&w_outer, "the outer filesystem");
        assert_eq!(report.consistency(), Consistency::Consistent);
        assert_eq!(report.watchdog, WatchdogOutcome::Released);
        assert!(!report.expired);
        assert!(report.thaw_errors.is_empty() && report.thawed_early.is_empty());
        assert!(
            report.frozen_for >= Duration::from_millis(600),
            "{:?}",
            report.frozen_for
        );
        eprintln!("held writers for {:?}", report.frozen_for);

        // Dropping thaws too.
        let frozen = freeze(&plan, &opts).unwrap();
        let w = write_in_thread(inner_point.join("g"));
        assert_blocked(&w, "the inner filesystem");
        drop(frozen);
        assert_completes(&w, "the inner filesystem");
        drop(inner);
    }

    #[test]
    fn the_timer_thaws_at_max_freeze() {
        if !can_mount_ext4() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = Ext4::make(dir.path().join("a.img"), dir.path().join("a"));
        let plan = Plan::for_disks(&[&fs.dev]).unwrap();
        let opts = FreezeOptions {
            max_freeze: Duration::from_millis(400),
            // Only the in-process timer can thaw within this test's bounds.
            watchdog_margin: Duration::from_secs(60),
            watchdog: test_watchdog(),
            ..FreezeOptions::default()
        };
        let frozen = freeze(&plan, &opts).unwrap();
        let w = write_in_thread(fs.mount_point.join("f"));
        assert_completes(&w, "the filesystem");
        assert!(frozen.expired());
        assert!(frozen.started.elapsed() < Duration::from_secs(5));
        let report = frozen.thaw();
        assert!(report.expired);
        assert!(
            report.frozen_for >= Duration::from_millis(400)
                && report.frozen_for < Duration::from_secs(2),
            "{:?}",
            report.frozen_for
        );
        assert_eq!(report.watchdog, WatchdogOutcome::Released);
        let Consistency::BestEffort(reasons) = report.consistency() else {
            panic!("an expired freeze is not consistent")
        };
        assert!(reasons[0].contains("limit"), "{reasons:?}");
    }

    #[test]
    fn someone_elses_freeze_is_reported_and_left_alone() {
        if !can_mount_ext4() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = Ext4::make(dir.path().join("a.img"), dir.path().join("a"));
        let plan = Plan::for_disks(&[&fs.dev]).unwrap();
        let theirs = open_mount_point(&fs.mount_point).unwrap();
        freeze_fd(theirs.as_fd()).unwrap();
        let opts = FreezeOptions {
            watchdog: test_watchdog(),
            ..FreezeOptions::default()
        };
        let frozen = freeze(&plan, &opts).unwrap();
        assert!(frozen.report().frozen.is_empty());
        assert_eq!(frozen.report().not_frozen.len(), 1);
        assert_eq!(frozen.report().not_frozen[0].why, NotFrozen::AlreadyFrozen);
        let report = frozen.thaw();
        assert!(matches!(report.consistency(), Consistency::BestEffort(_)));
        assert_eq!(report.frozen_for, Duration::ZERO);
        let w = write_in_thread(fs.mount_point.join("f"));
        assert_blocked(&w, "a filesystem someone else froze");
        thaw_fd(theirs.as_fd()).unwrap();
        assert_completes(&w, "the filesystem");
    }
}
