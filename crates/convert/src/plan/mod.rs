//! The conversion plan: from what a root filesystem holds ([`Facts`]) and the layout of the
//! restore point's disks, the list of changes that make it boot on EC2 Nitro (NVMe storage,
//! ENA network, serial console) and in the local test launch — or the reason it cannot be
//! converted.
//!
//! I/O-free: the shell ([`crate::apply`]) reads the files named in [`READ`], [`READ_DIRS`] and
//! [`PROBE`] into `Facts`, calls [`plan`], and carries out the [`Action`]s in order. Every
//! decision is therefore reachable from unit tests with file contents as strings.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::disk::{Content, DiskLayout};
use crate::distro::{self, Distro, Family};

/// Files whose contents the plan reads (those that exist).
pub const READ: &[&str] = &[
    "/etc/os-release",
    "/usr/lib/os-release",
    "/etc/fstab",
    "/etc/crypttab",
    "/etc/initramfs-tools/modules",
    "/etc/initramfs-tools/initramfs.conf",
    "/etc/default/grub",
    "/boot/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/boot/grub2/grubenv",
    "/boot/extlinux/extlinux.conf",
    "/boot/extlinux.conf",
    "/extlinux.conf",
    "/boot/syslinux/syslinux.cfg",
    "/boot/syslinux.cfg",
    "/etc/cloud/cloud.cfg",
];

/// Directories whose regular files the plan reads.
pub const READ_DIRS: &[&str] = &[
    "/etc/initramfs-tools/conf.d",
    "/boot/loader/entries",
    "/etc/dracut.conf.d",
];

/// Paths whose existence the plan asks about (tools, services).
pub const PROBE: &[&str] = &[
    "/usr/sbin/update-initramfs",
    "/sbin/update-initramfs",
    "/usr/bin/dracut",
    "/usr/sbin/dracut",
    "/sbin/dracut",
    "/usr/sbin/update-grub",
    "/usr/sbin/grub2-mkconfig",
    "/lib/systemd/systemd-networkd",
    "/usr/lib/systemd/systemd-networkd",
    "/usr/sbin/NetworkManager",
    "/bin/systemctl",
    "/usr/bin/systemctl",
    "/etc/NetworkManager/system-connections/slipway-dhcp.nmconnection",
    "/etc/systemd/network/80-slipway-dhcp.network",
];

/// What the shell found in the root filesystem (paths are absolute inside it).
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Contents of the files of [`READ`] and [`READ_DIRS`] that exist.
    pub files: BTreeMap<String, String>,
    /// The paths of [`PROBE`] that exist.
    pub present: BTreeSet<String>,
    /// Installed kernels (`/lib/modules/*`).
    pub kernels: Vec<KernelModules>,
}

/// The modules a kernel has, names normalised (`-` as `_`).
#[derive(Clone, Debug, Default)]
pub struct KernelModules {
    pub version: String,
    /// Loadable (`modules.dep`).
    pub modules: BTreeSet<String>,
    /// Compiled in (`modules.builtin`).
    pub builtin: BTreeSet<String>,
}

impl KernelModules {
    /// Reads `modules.dep` / `modules.builtin` contents.
    pub fn from_lists(version: &str, dep: &str, builtin: &str) -> KernelModules {
        fn names(list: &str) -> BTreeSet<String> {
            list.lines()
                .filter_map(|l| l.split(':').next())
                .filter_map(|p| p.rsplit('/').next())
                .filter_map(|f| f.split(".ko").next())
                .filter(|n| !n.is_empty())
                .map(normalise)
                .collect()
        }
        KernelModules {
            version: version.to_string(),
            modules: names(dep),
            builtin: names(builtin),
        }
    }
}

fn normalise(m: &str) -> String {
    m.trim().replace('-', "_")
}

/// Where the root filesystem is: disk index (restore point order) and partition number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PartRef {
    pub disk: usize,
    pub partition: u32,
}

/// One thing the shell does to the copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create or replace a file (parents created).
    Write { content: String, mode: u32 },
    /// Create a symbolic link (replacing what is there).
    Symlink { target: String },
    /// Run a command in a chroot of the root filesystem; a failure of a `required` one fails
    /// the conversion, of another is recorded.
    Run { argv: Vec<String>, required: bool },
}

/// What a change is about (the report groups by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    Fstab,
    BootLoader,
    Initramfs,
    Network,
    CloudInit,
    /// Not conversion: the local test launch's check command.
    Drill,
}

/// One change, as planned and as reported (`slipway launch --json` lists them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub kind: ChangeKind,
    /// The file changed, or the command run.
    pub path: String,
    /// What changed and why, as a sentence.
    pub detail: String,
    #[serde(skip)]
    pub action: Action,
}

/// A conversion plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub distro: Distro,
    /// `initramfs-tools` or `dracut`.
    pub initramfs_tool: &'static str,
    pub changes: Vec<Change>,
    /// What was checked and left alone, or could not be done.
    pub notes: Vec<String>,
}

/// Why a root filesystem cannot be converted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// unknown distribution
    #[error("unknown distribution {0:?} (conversion handles the Debian and RHEL families)")]
    UnknownDistribution(String),
    /// no os-release
    #[error("no /etc/os-release or /usr/lib/os-release on the root filesystem")]
    NoOsRelease,
    /// no initramfs tool
    #[error("neither update-initramfs nor dracut is installed: the initramfs cannot be rebuilt")]
    NoInitramfsTool,
    /// no kernel
    #[error("no kernel modules under /lib/modules: no kernel to boot")]
    NoKernel,
    /// LVM root
    #[error("the root filesystem is on LVM, which conversion cannot activate yet (no device-mapper on the staging host)")]
    LvmRoot,
    /// encrypted root
    #[error("the root filesystem is encrypted ({0}): conversion cannot open it, and the launched instance would wait for a passphrase")]
    EncryptedRoot(String),
}

/// Drivers a Nitro (NVMe, ENA), Xen (blkfront, netfront) or KVM (virtio) machine needs early.
pub const DRIVERS: &[&str] = &[
    "nvme",
    "ena",
    "xen_blkfront",
    "xen_netfront",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
];

/// The serial console argument added to the kernel command line (ttyS0 on EC2 and in QEMU).
pub const SERIAL_CONSOLE: &str = "console=ttyS0,115200";

/// Plans the conversion of the root filesystem at `root` of `disks`.
pub fn plan(facts: &Facts, disks: &[DiskLayout], root: PartRef) -> Result<Plan, Refusal> {
    let os_release = facts
        .files
        .get("/etc/os-release")
        .or_else(|| facts.files.get("/usr/lib/os-release"))
        .ok_or(Refusal::NoOsRelease)?;
    let distro = distro::detect(os_release).map_err(Refusal::UnknownDistribution)?;
    if facts.kernels.is_empty() {
        return Err(Refusal::NoKernel);
    }
    let has = |p: &str| facts.present.contains(p);
    let initramfs_tool = if has("/usr/sbin/update-initramfs") || has("/sbin/update-initramfs") {
        "initramfs-tools"
    } else if has("/usr/bin/dracut") || has("/usr/sbin/dracut") || has("/sbin/dracut") {
        "dracut"
    } else {
        return Err(Refusal::NoInitramfsTool);
    };
    let mut p = Plan {
        distro,
        initramfs_tool,
        changes: Vec::new(),
        notes: Vec::new(),
    };
    let root_fs = match disks
        .get(root.disk)
        .and_then(|d| d.partition(root.partition))
        .map(|x| &x.content)
    {
        Some(Content::Filesystem { fs, .. }) => fs.clone(),
        _ => String::new(),
    };
    fstab(facts, disks, &mut p)?;
    boot_loader(facts, disks, &mut p);
    initramfs(facts, &root_fs, &mut p);
    network(facts, &mut p);
    cloud_init(facts, &mut p);
    Ok(p)
}

/// The partition a `/dev/…` name denotes, by the order of the restore point's disks:
/// `/dev/sdb3`, `/dev/vdb3`, `/dev/xvdb3`, `/dev/hdb3` and `/dev/nvme1n1p3` are disk 1,
/// partition 3; without a number, the whole disk (partition 0). Stable names (`UUID=`,
/// `LABEL=`, `/dev/disk/by-*`, `/dev/mapper/*`) are not resolved: they need no change.
pub fn resolve_device(spec: &str) -> Option<PartRef> {
    let name = spec.strip_prefix("/dev/")?;
    if let Some(rest) = name.strip_prefix("nvme") {
        let (ctrl, rest) = rest.split_once('n')?;
        let disk: usize = ctrl.parse().ok()?;
        let partition = match rest.split_once('p') {
            Some((_, part)) => part.parse().ok()?,
            None => {
                rest.parse::<u32>().ok()?;
                0
            }
        };
        return Some(PartRef { disk, partition });
    }
    let rest = ["xvd", "sd", "vd", "hd"]
        .iter()
        .find_map(|p| name.strip_prefix(p))?;
    let letters: String = rest
        .chars()
        .take_while(|c| c.is_ascii_lowercase())
        .collect();
    let digits = &rest[letters.len()..];
    if letters.is_empty() || letters.len() > 2 {
        return None;
    }
    let mut disk = 0usize;
    for c in letters.bytes() {
        disk = disk * 26 + (c - b'a') as usize + 1;
    }
    let partition = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    Some(PartRef {
        disk: disk - 1,
        partition,
    })
}

/// The UUID of the filesystem or swap a device name denotes.
fn uuid_of(spec: &str, disks: &[DiskLayout]) -> Option<String> {
    let r = resolve_device(spec)?;
    match &disks.get(r.disk)?.partition(r.partition)?.content {
        Content::Filesystem { uuid, .. } | Content::Swap { uuid } => Some(uuid.clone()),
        _ => None,
    }
}

fn fstab(facts: &Facts, disks: &[DiskLayout], p: &mut Plan) -> Result<(), Refusal> {
    let Some(text) = facts.files.get("/etc/fstab") else {
        p.notes.push("no /etc/fstab".into());
        return Ok(());
    };
    let crypt: BTreeSet<&str> = facts
        .files
        .get("/etc/crypttab")
        .map(|c| {
            c.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_whitespace().next())
                .collect()
        })
        .unwrap_or_default();
    let mut out = String::new();
    let mut edits = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 2 || fields[0].starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let (spec, mnt) = (fields[0], fields[1]);
        if let Some(name) = spec.strip_prefix("/dev/mapper/") {
            if crypt.contains(name) {
                if mnt == "/" {
                    return Err(Refusal::EncryptedRoot(format!("{spec} in /etc/crypttab")));
                }
                p.notes.push(format!(
                    "{mnt} is on the encrypted {spec}: left as is, it needs its key at boot"
                ));
            }
        }
        match uuid_of(spec, disks) {
            Some(uuid) => {
                let new = format!("UUID={uuid}");
                edits.push(format!("{spec} → {new} ({mnt})"));
                // Keep the line's spacing: replace the first field only.
                let at = line.find(spec).unwrap_or(0);
                out.push_str(&line[..at]);
                out.push_str(&new);
                out.push_str(&line[at + spec.len()..]);
            }
            None => {
                if resolve_device(spec).is_some() {
                    p.notes.push(format!(
                        "fstab names {spec} ({mnt}), which is no filesystem on the restore point's disks: left as is"
                    ));
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    if !edits.is_empty() {
        p.changes.push(Change {
            kind: ChangeKind::Fstab,
            path: "/etc/fstab".into(),
            detail: format!(
                "device names replaced by filesystem UUIDs (disks are NVMe devices on Nitro): {}",
                edits.join(", ")
            ),
            action: Action::Write {
                content: out,
                mode: 0o644,
            },
        });
    }
    Ok(())
}

/// Edits a kernel command line: `root=`/`resume=` device names to UUIDs, the serial console
/// added. Returns the new line and what changed.
pub fn edit_cmdline(args: &str, disks: &[DiskLayout], add_console: bool) -> (String, Vec<String>) {
    let mut out: Vec<String> = Vec::new();
    let mut what = Vec::new();
    for a in args.split_whitespace() {
        let replaced = ["root=", "resume="].iter().find_map(|k| {
            let dev = a.strip_prefix(k)?;
            let uuid = uuid_of(dev, disks)?;
            Some(format!("{k}UUID={uuid}"))
        });
        match replaced {
            Some(r) => {
                what.push(format!("{a} → {r}"));
                out.push(r);
            }
            None => out.push(a.to_string()),
        }
    }
    if add_console && !out.iter().any(|a| a.starts_with("console=ttyS0")) {
        out.push(SERIAL_CONSOLE.to_string());
        what.push(format!("{SERIAL_CONSOLE} added"));
    }
    (out.join(" "), what)
}

/// Rewrites the argument part of lines whose first word is one of `keywords`
/// (`skip_words` words after the keyword are kept as they are: the kernel path of GRUB's
/// `linux`). Returns None if nothing changed.
fn edit_lines(
    text: &str,
    keywords: &[&str],
    skip_words: usize,
    disks: &[DiskLayout],
    what: &mut Vec<String>,
) -> Option<String> {
    let mut out = String::new();
    let mut changed = false;
    for line in text.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        let mut words = t.split_whitespace();
        let first = words.next().unwrap_or("");
        if keywords.iter().any(|k| first.eq_ignore_ascii_case(k)) {
            let kept: Vec<&str> = words.by_ref().take(skip_words).collect();
            let rest: Vec<&str> = words.collect();
            let (new, w) = edit_cmdline(&rest.join(" "), disks, true);
            if !w.is_empty() {
                changed = true;
                what.extend(w);
                let mut l = format!("{indent}{first}");
                for k in kept {
                    l.push(' ');
                    l.push_str(k);
                }
                l.push(' ');
                l.push_str(&new);
                out.push_str(&l);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    changed.then_some(out)
}

fn boot_loader(facts: &Facts, disks: &[DiskLayout], p: &mut Plan) {
    let mut any = false;
    // extlinux / syslinux: APPEND lines.
    for path in [
        "/boot/extlinux/extlinux.conf",
        "/boot/extlinux.conf",
        "/extlinux.conf",
        "/boot/syslinux/syslinux.cfg",
        "/boot/syslinux.cfg",
    ] {
        let Some(text) = facts.files.get(path) else {
            continue;
        };
        any = true;
        let mut what = Vec::new();
        if let Some(new) = edit_lines(text, &["append"], 0, disks, &mut what) {
            p.changes
                .push(boot_change(path, &what, new, "extlinux/syslinux"));
        } else {
            p.notes
                .push(format!("{path}: kernel command line already stable"));
        }
    }
    // GRUB: /etc/default/grub for the next regeneration, grub.cfg as it is now.
    if let Some(text) = facts.files.get("/etc/default/grub") {
        any = true;
        let mut out = String::new();
        let mut what = Vec::new();
        let mut seen_cmdline = false;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("GRUB_CMDLINE_LINUX=") {
                seen_cmdline = true;
                let v = v.trim_matches('"');
                let (new, w) = edit_cmdline(v, disks, true);
                if !w.is_empty() {
                    what.extend(w);
                    out.push_str(&format!("GRUB_CMDLINE_LINUX=\"{new}\"\n"));
                    continue;
                }
            } else if line.trim() == "GRUB_DISABLE_LINUX_UUID=true" {
                what.push("GRUB_DISABLE_LINUX_UUID=true → false".into());
                out.push_str("GRUB_DISABLE_LINUX_UUID=false\n");
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        if !seen_cmdline {
            out.push_str(&format!("GRUB_CMDLINE_LINUX=\"{SERIAL_CONSOLE}\"\n"));
            what.push(format!("GRUB_CMDLINE_LINUX=\"{SERIAL_CONSOLE}\" added"));
        }
        if !what.is_empty() {
            p.changes.push(boot_change(
                "/etc/default/grub",
                &what,
                out,
                "GRUB defaults",
            ));
        }
    }
    for path in ["/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"] {
        let Some(text) = facts.files.get(path) else {
            continue;
        };
        any = true;
        let mut what = Vec::new();
        if let Some(new) = edit_lines(text, &["linux", "linux16", "linuxefi"], 1, disks, &mut what)
        {
            p.changes.push(boot_change(path, &what, new, "GRUB menu"));
        }
    }
    // Boot Loader Specification entries (RHEL 8+, Fedora): `options` lines.
    for (path, text) in facts.files.range("/boot/loader/entries/".to_string()..) {
        if !path.starts_with("/boot/loader/entries/") {
            break;
        }
        if !path.ends_with(".conf") {
            continue;
        }
        any = true;
        let mut what = Vec::new();
        if let Some(new) = edit_lines(text, &["options"], 0, disks, &mut what) {
            p.changes.push(boot_change(path, &what, new, "boot entry"));
        }
    }
    // RHEL 8 keeps the command line in grubenv's kernelopts: a 1024-byte block.
    if let Some(text) = facts.files.get("/boot/grub2/grubenv") {
        let mut what = Vec::new();
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.strip_prefix("kernelopts=") {
                Some(v) => {
                    let (new, w) = edit_cmdline(v, disks, true);
                    what.extend(w);
                    format!("kernelopts={new}\n")
                }
                None => format!("{l}\n"),
            })
            .collect();
        let header = "# GRUB Environment Block\n";
        if !what.is_empty() {
            if header.len() + body.len() <= 1024 {
                let mut block = format!("{header}{body}");
                block.push_str(&"#".repeat(1024 - block.len()));
                p.changes.push(boot_change(
                    "/boot/grub2/grubenv",
                    &what,
                    block,
                    "GRUB environment",
                ));
            } else {
                p.notes.push(
                    "/boot/grub2/grubenv: the edited block would exceed 1024 bytes; left as is"
                        .into(),
                );
            }
        }
    }
    // Regenerate GRUB's menu from the edited defaults where the tool is there (the direct
    // edit of grub.cfg above stands if it fails).
    let grub_changed = p.changes.iter().any(|c| c.path == "/etc/default/grub");
    if grub_changed {
        let argv: Option<Vec<&str>> = if facts.present.contains("/usr/sbin/update-grub") {
            Some(vec!["update-grub"])
        } else if facts.present.contains("/usr/sbin/grub2-mkconfig")
            && facts.files.contains_key("/boot/grub2/grub.cfg")
        {
            Some(vec!["grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"])
        } else {
            None
        };
        if let Some(argv) = argv {
            p.changes.push(Change {
                kind: ChangeKind::BootLoader,
                path: argv.join(" "),
                detail: "GRUB's menu regenerated from the edited defaults".into(),
                action: Action::Run {
                    argv: argv.iter().map(|s| s.to_string()).collect(),
                    required: false,
                },
            });
        }
    }
    if !any {
        p.notes.push(
            "no boot loader configuration found (GRUB, extlinux, syslinux, BLS entries): the kernel command line was not checked".into(),
        );
    }
}

fn boot_change(path: &str, what: &[String], content: String, name: &str) -> Change {
    Change {
        kind: ChangeKind::BootLoader,
        path: path.to_string(),
        detail: format!("{name}: {}", what.join(", ")),
        action: Action::Write {
            content,
            mode: 0o644,
        },
    }
}

fn initramfs(facts: &Facts, root_fs: &str, p: &mut Plan) {
    let mut want: Vec<&str> = DRIVERS.to_vec();
    if matches!(root_fs, "ext4" | "ext3" | "ext2" | "xfs" | "btrfs") {
        want.push(if root_fs.starts_with("ext") {
            "ext4"
        } else {
            root_fs
        });
    }
    let listed: BTreeSet<String> = match p.initramfs_tool {
        "initramfs-tools" => facts
            .files
            .get("/etc/initramfs-tools/modules")
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.starts_with('#'))
                    .filter_map(|l| l.split_whitespace().next())
                    .map(normalise)
                    .collect()
            })
            .unwrap_or_default(),
        _ => BTreeSet::new(),
    };
    let mut add = Vec::new();
    for m in want {
        if listed.contains(m) {
            p.notes.push(format!("initramfs: {m} already listed"));
            continue;
        }
        let loadable: Vec<&str> = facts
            .kernels
            .iter()
            .filter(|k| k.modules.contains(m))
            .map(|k| k.version.as_str())
            .collect();
        if !loadable.is_empty() {
            add.push(m);
        } else if facts.kernels.iter().all(|k| k.builtin.contains(m)) {
            p.notes.push(format!(
                "initramfs: {m} is built into every installed kernel"
            ));
        } else {
            p.notes.push(format!(
                "initramfs: no installed kernel has the {m} driver (fine unless the instance type needs it)"
            ));
        }
    }
    if add.is_empty() {
        return;
    }
    let names = add.join(" ");
    match p.initramfs_tool {
        "initramfs-tools" => {
            let mut text = facts
                .files
                .get("/etc/initramfs-tools/modules")
                .cloned()
                .unwrap_or_default();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str("# Added by slipway's launch conversion: storage and network drivers for EC2 (Nitro, Xen) and KVM.\n");
            for m in &add {
                text.push_str(m);
                text.push('\n');
            }
            p.changes.push(Change {
                kind: ChangeKind::Initramfs,
                path: "/etc/initramfs-tools/modules".into(),
                detail: format!("drivers added to the initramfs: {names}"),
                action: Action::Write {
                    content: text,
                    mode: 0o644,
                },
            });
            // MODULES=dep keeps only the drivers of the machine the initramfs is built on
            // (here: the staging host's loop device); `most` carries every storage driver.
            let mut mode = "most".to_string();
            let confd = facts
                .files
                .range("/etc/initramfs-tools/conf.d/".to_string()..)
                .take_while(|(k, _)| k.starts_with("/etc/initramfs-tools/conf.d/"))
                .map(|(_, v)| v);
            for text in facts
                .files
                .get("/etc/initramfs-tools/initramfs.conf")
                .into_iter()
                .chain(confd)
            {
                for l in text.lines() {
                    if let Some(v) = l.trim().strip_prefix("MODULES=") {
                        mode = v.trim_matches('"').to_string();
                    }
                }
            }
            if mode == "dep" {
                p.changes.push(Change {
                    kind: ChangeKind::Initramfs,
                    path: "/etc/initramfs-tools/conf.d/zz-slipway-modules".into(),
                    detail: "MODULES=dep → most: dep would keep only the drivers of the host doing the conversion".into(),
                    action: Action::Write {
                        content: "# Added by slipway's launch conversion (MODULES=dep was set).\nMODULES=most\n".into(),
                        mode: 0o644,
                    },
                });
            }
            p.changes.push(Change {
                kind: ChangeKind::Initramfs,
                path: "update-initramfs -u -k all".into(),
                detail: "initramfs of every installed kernel rebuilt".into(),
                action: Action::Run {
                    argv: ["update-initramfs", "-u", "-k", "all"]
                        .map(String::from)
                        .to_vec(),
                    required: true,
                },
            });
        }
        _ => {
            p.changes.push(Change {
                kind: ChangeKind::Initramfs,
                path: "/etc/dracut.conf.d/90-slipway.conf".into(),
                detail: format!("drivers added to the initramfs: {names}"),
                action: Action::Write {
                    content: format!(
                        "# Added by slipway's launch conversion: storage and network drivers for EC2 (Nitro, Xen) and KVM.\nadd_drivers+=\" {names} \"\n"
                    ),
                    mode: 0o644,
                },
            });
            for k in &facts.kernels {
                let img = format!("/boot/initramfs-{}.img", k.version);
                p.changes.push(Change {
                    kind: ChangeKind::Initramfs,
                    path: format!("dracut -f {img} {}", k.version),
                    detail: format!("initramfs of kernel {} rebuilt", k.version),
                    action: Action::Run {
                        argv: vec!["dracut".into(), "-f".into(), img, k.version.clone()],
                        required: true,
                    },
                });
            }
        }
    }
}

fn network(facts: &Facts, p: &mut Plan) {
    let has = |x: &str| facts.present.contains(x);
    if has("/usr/sbin/NetworkManager") {
        let path = "/etc/NetworkManager/system-connections/slipway-dhcp.nmconnection";
        if has(path) {
            p.notes.push(format!("{path} already there"));
            return;
        }
        p.changes.push(Change {
            kind: ChangeKind::Network,
            path: path.into(),
            detail: "NetworkManager profile: DHCP on any Ethernet NIC, whatever its name".into(),
            action: Action::Write {
                content: "# Added by slipway's launch conversion: DHCP on any Ethernet NIC.\n[connection]\nid=slipway-dhcp\ntype=ethernet\nautoconnect=true\nautoconnect-priority=-100\n\n[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n".into(),
                mode: 0o600,
            },
        });
        if p.distro.family == Family::Rhel {
            p.notes.push(
                "RHEL ifcfg files that pin a NIC by HWADDR are left as is; the slipway-dhcp profile covers the new NIC".into(),
            );
        }
        return;
    }
    if has("/lib/systemd/systemd-networkd") || has("/usr/lib/systemd/systemd-networkd") {
        let path = "/etc/systemd/network/80-slipway-dhcp.network";
        if !has(path) {
            p.changes.push(Change {
                kind: ChangeKind::Network,
                path: path.into(),
                detail: "systemd-networkd: DHCP on any Ethernet NIC (en*, eth*), whatever its name".into(),
                action: Action::Write {
                    content: "# Added by slipway's launch conversion: DHCP on any Ethernet NIC (ens5 on Nitro).\n[Match]\nType=ether\nName=en* eth*\n\n[Network]\nDHCP=yes\n".into(),
                    mode: 0o644,
                },
            });
        }
        if has("/bin/systemctl") || has("/usr/bin/systemctl") {
            p.changes.push(Change {
                kind: ChangeKind::Network,
                path: "systemctl enable systemd-networkd.service".into(),
                detail: "systemd-networkd enabled at boot".into(),
                action: Action::Run {
                    argv: ["systemctl", "enable", "systemd-networkd.service"]
                        .map(String::from)
                        .to_vec(),
                    required: false,
                },
            });
        }
        return;
    }
    p.notes.push(
        "neither NetworkManager nor systemd-networkd is installed: the network configuration is left as is (it may name the old NIC)".into(),
    );
}

fn cloud_init(facts: &Facts, p: &mut Plan) {
    if !facts.files.contains_key("/etc/cloud/cloud.cfg") {
        return;
    }
    p.changes.push(Change {
        kind: ChangeKind::CloudInit,
        path: "/etc/cloud/cloud.cfg.d/99-slipway-network.cfg".into(),
        detail: "cloud-init's network configuration disabled, so it keeps the DHCP setup above"
            .into(),
        action: Action::Write {
            content: "# Added by slipway's launch conversion.\nnetwork: {config: disabled}\n"
                .into(),
            mode: 0o644,
        },
    });
}

#[cfg(test)]
mod tests;
