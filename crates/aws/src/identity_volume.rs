//! The server's identity volume: a small encrypted EBS volume that is the server's data dir.
//!
//! Why: the data dir holds what makes a server *this* server to its agents — the TLS key and
//! certificate whose fingerprint they pin, the secret their tokens are derived from, and each
//! disk's metadata (durable position, run id) that lets a disk resume instead of resyncing. On
//! the root disk all of that died with the instance when the fleet replaced a server (an AMI or
//! subnet change, an instance lost): every agent had to be re-enrolled and every disk resynced.
//! On a volume of its own, tagged like the replicas are, it follows the server to its
//! replacement exactly as the replica volumes do.
//!
//! Who does what:
//! - `slipway template apply` (crates/fleet) creates the volume before it launches the server
//!   (tags [`ROLE`](tags::ROLE)` = `[`ROLE_IDENTITY`](tags::ROLE_IDENTITY),
//!   [`TEMPLATE`](tags::TEMPLATE), [`SERVER_INDEX`](tags::SERVER_INDEX),
//!   [`SERVER`](tags::SERVER)), attaches it to the new instance, and moves it with the replicas
//!   when it replaces the server;
//! - at boot, before the server starts, `slipway identity-volume mount` (a root oneshot unit of
//!   the AMI) finds it by this instance's own `slipway:template` and `slipway:server-index`
//!   tags ([`AwsBackend::identity_volume`]), attaches it here if the fleet has not yet (the
//!   same [`attach_here`](AwsBackend::attach_here) as the replicas' adoption: detached from a
//!   stopped or terminated previous server, refused while another server runs with it), and
//!   mounts it on the data dir ([`mount_identity`]).
//!
//! Formatting is decided from the device's first and last MiB, by [`decide`] (no I/O, unit
//! tested): an ext4 filesystem labelled [`IDENTITY_LABEL`] is mounted as it is; all zeros at
//! both ends — what a new EBS volume reads — is formatted, then mounted; anything else
//! (another filesystem, another label, a partition table, a GPT backup header or RAID
//! signature at the end, any non-zero byte, an end that cannot be read whole) is refused, so
//! `mkfs` never runs over data. The label is the claim that the filesystem is ours; zeros are
//! the proof that there is nothing to lose.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;
use tracing::{info, warn};

use crate::backend::AwsBackend;
use crate::error::AwsError;
use crate::tags;
use crate::volumes::{filter, VolInfo};

/// Filesystem label of an identity volume (ext4 labels hold at most 16 bytes).
pub const IDENTITY_LABEL: &str = "slipway-identity";
/// Size of the identity volume the fleet creates, GiB: the data dir holds a few KiB of TLS
/// and token files and about 1 KiB of metadata per disk (the smallest EBS volume is plenty).
pub const IDENTITY_VOLUME_GIB: i32 = 1;
/// How much of the device [`decide`] looks at.
pub const PROBE_BYTES: usize = 1 << 20;

/// Byte offset of the ext2/3/4 superblock, and within it of the magic and the volume label.
const SUPERBLOCK: usize = 1024;
const EXT_MAGIC_AT: usize = SUPERBLOCK + 0x38;
const EXT_LABEL_AT: usize = SUPERBLOCK + 0x78;
const EXT_MAGIC: u16 = 0xEF53;

/// What to do with a device before mounting it as the data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepare {
    /// Our filesystem is on it: mount it as it is.
    Mount,
    /// New and empty: make the filesystem, then mount it.
    Format,
    /// It holds something else: touch nothing (the reason says what).
    Refuse(String),
}

/// The decision from the first bytes of the device (up to [`PROBE_BYTES`]) and its last
/// ones (`tail`, up to [`PROBE_BYTES`]: a GPT's backup header, an md or LVM signature at the
/// end, a filesystem that lost its head). Pure.
pub fn decide(head: &[u8], tail: &[u8]) -> Prepare {
    if head.len() < PROBE_BYTES {
        return Prepare::Refuse(format!(
            "only {} bytes could be read; an identity volume has at least {PROBE_BYTES}",
            head.len()
        ));
    }
    if let Some(p) = decide_existing(head) {
        return p;
    }
    if let Some(at) = head[..PROBE_BYTES].iter().position(|b| *b != 0) {
        return Prepare::Refuse(format!(
            "it is not empty (a non-zero byte at offset {at}) and holds no {IDENTITY_LABEL:?} filesystem; not formatting over it"
        ));
    }
    if tail.len() < PROBE_BYTES {
        return Prepare::Refuse(format!(
            "only {} bytes at its end could be read; an empty volume is formatted only when its last {PROBE_BYTES} read as zeros",
            tail.len()
        ));
    }
    match tail.iter().position(|b| *b != 0) {
        None => Prepare::Format,
        Some(at) => Prepare::Refuse(format!(
            "its start is empty but not its end (a non-zero byte {} bytes before the end: a GPT backup header or a RAID signature, say); not formatting over it",
            tail.len() - at
        )),
    }
}

/// The decision for a device that holds an ext2/3/4 filesystem (from its first bytes):
/// [`Prepare::Mount`] if it is ours, a refusal if it is another one; `None`: no such
/// filesystem. Pure.
fn decide_existing(head: &[u8]) -> Option<Prepare> {
    if head.len() < EXT_LABEL_AT + 16 {
        return None;
    }
    let magic = u16::from_le_bytes([head[EXT_MAGIC_AT], head[EXT_MAGIC_AT + 1]]);
    if magic != EXT_MAGIC {
        return None;
    }
    let raw = &head[EXT_LABEL_AT..EXT_LABEL_AT + 16];
    let label = String::from_utf8_lossy(raw.split(|b| *b == 0).next().unwrap_or_default());
    Some(if label == IDENTITY_LABEL {
        Prepare::Mount
    } else {
        Prepare::Refuse(format!(
            "it holds an ext2/3/4 filesystem labelled {label:?}, not {IDENTITY_LABEL:?}"
        ))
    })
}

/// Why the identity volume could not be mounted.
#[derive(Debug, Error)]
pub enum IdentityVolumeError {
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The device holds something that is not an identity filesystem.
    #[error("refusing to use {device} as the identity volume: {reason}")]
    Refused { device: PathBuf, reason: String },
    /// The mount point is a mount of something else already.
    #[error("{mount_point} is already a mount point of another device; unmount it first")]
    OtherMount { mount_point: PathBuf },
    /// `mkfs.ext4` or `mount` failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// Finding or attaching the volume failed.
    #[error(transparent)]
    Aws(#[from] AwsError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IdentityVolumeError {
    let what = what.into();
    move |source| IdentityVolumeError::Io { what, source }
}

/// What [`mount_identity`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    /// Mounted the existing filesystem.
    Existing,
    /// Made a new filesystem on the empty volume, then mounted it.
    Formatted,
    /// It was mounted there already (the unit ran twice in one boot).
    Already,
}

/// Reads up to [`PROBE_BYTES`] from the start of `device`.
pub fn read_head(device: &Path) -> Result<Vec<u8>, IdentityVolumeError> {
    let f = std::fs::File::open(device).map_err(io(format!("opening {}", device.display())))?;
    let mut head = Vec::with_capacity(PROBE_BYTES);
    f.take(PROBE_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(io(format!("reading {}", device.display())))?;
    Ok(head)
}

/// Reads the last [`PROBE_BYTES`] of `device` (all of it if it is smaller).
pub fn read_tail(device: &Path) -> Result<Vec<u8>, IdentityVolumeError> {
    use std::io::{Seek, SeekFrom};
    let what = || format!("reading the end of {}", device.display());
    let mut f = std::fs::File::open(device).map_err(io(format!("opening {}", device.display())))?;
    // The length of a block device is where its end seeks to (its metadata says 0).
    let len = f.seek(SeekFrom::End(0)).map_err(io(what()))?;
    f.seek(SeekFrom::Start(len.saturating_sub(PROBE_BYTES as u64)))
        .map_err(io(what()))?;
    let mut tail = Vec::with_capacity(PROBE_BYTES);
    f.read_to_end(&mut tail).map_err(io(what()))?;
    Ok(tail)
}

fn run(cmd: &mut Command) -> Result<(), IdentityVolumeError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {shown}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IdentityVolumeError::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether `dir` is a mount point, and of which device (its `st_dev`).
fn mount_of(dir: &Path) -> Result<Option<u64>, IdentityVolumeError> {
    let me = std::fs::metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
    let parent = dir.join("..");
    let up = std::fs::metadata(&parent).map_err(io(format!("reading {}", parent.display())))?;
    Ok((me.dev() != up.dev() || me.ino() == up.ino()).then_some(me.dev()))
}

/// Mounts `device` (a block device; a regular file in tests, which `mount` puts on a loop
/// device) on `mount_point` (created if missing) as the data dir: formats it first only if
/// [`decide`] says it is new and empty, and checks the result before mounting it. Mount
/// options `nodev,nosuid,noexec`: the data dir holds data, never programs or devices.
pub fn mount_identity(device: &Path, mount_point: &Path) -> Result<Mounted, IdentityVolumeError> {
    std::fs::create_dir_all(mount_point)
        .map_err(io(format!("creating {}", mount_point.display())))?;
    if let Some(dev) = mount_of(mount_point)? {
        let meta =
            std::fs::metadata(device).map_err(io(format!("reading {}", device.display())))?;
        if meta.file_type().is_block_device() && meta.rdev() == dev {
            return Ok(Mounted::Already);
        }
        return Err(IdentityVolumeError::OtherMount {
            mount_point: mount_point.to_owned(),
        });
    }
    let refused = |reason: String| IdentityVolumeError::Refused {
        device: device.to_owned(),
        reason,
    };
    let done = match decide(&read_head(device)?, &read_tail(device)?) {
        Prepare::Mount => Mounted::Existing,
        Prepare::Refuse(reason) => return Err(refused(reason)),
        Prepare::Format => {
            // A data dir that already holds something (a server that ran with its data dir
            // on the root disk, then got its identity volume) would be hidden under a new,
            // empty one: a new certificate and token secret, every agent re-enrolled, every
            // disk resynced. Refused; the operator moves the data onto the volume first.
            let mut entries = std::fs::read_dir(mount_point)
                .map_err(io(format!("reading {}", mount_point.display())))?;
            if entries.next().is_some() {
                return Err(refused(format!(
                    "the volume is new but the data dir {} is not empty: a new identity would \
                     hide it (move its contents onto the volume, or empty it, then retry)",
                    mount_point.display()
                )));
            }
            info!(device = %device.display(), "identity volume is new and empty: making its filesystem");
            // `decide` is the only guard: mkfs.ext4 does not check for an existing filesystem
            // when it is not run from a terminal.
            run(Command::new("mkfs.ext4")
                .args(["-q", "-L", IDENTITY_LABEL, "-m", "0"])
                .arg(device))?;
            // Our filesystem now (mkfs writes metadata near the end too: the head decides).
            match decide_existing(&read_head(device)?) {
                Some(Prepare::Mount) => Mounted::Formatted,
                other => {
                    return Err(refused(format!(
                    "after mkfs.ext4 it still does not read as an identity filesystem ({other:?})"
                )))
                }
            }
        }
    };
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "nodev,nosuid,noexec"])
        .arg(device)
        .arg(mount_point))?;
    info!(device = %device.display(), mount_point = %mount_point.display(), ?done, "identity volume mounted");
    Ok(done)
}

/// The identity volume of this server, attached here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityVolume {
    pub volume_id: String,
    /// Its block device (a file under the `FileMap` in tests).
    pub path: PathBuf,
}

impl AwsBackend {
    /// This server's identity volume, attached here: the volume tagged
    /// `slipway:role = identity` with this instance's `slipway:template` and
    /// `slipway:server-index` (the oldest if a crash left two). `None` if this instance carries
    /// no such tags (a server started by hand, not by a replication template): its data dir
    /// stays on the root disk. An error if it does but no identity volume exists, or the
    /// volume cannot be attached here (another server runs with it).
    pub async fn identity_volume(&self) -> Result<Option<IdentityVolume>, AwsError> {
        let me = self.describe_self().await?;
        let (Some(template), Some(index)) = (
            me.tags.get(tags::TEMPLATE).cloned(),
            me.tags.get(tags::SERVER_INDEX).cloned(),
        ) else {
            return Ok(None);
        };
        let mut vols: Vec<VolInfo> = self
            .describe_volumes(vec![
                filter(&format!("tag:{}", tags::ROLE), &[tags::ROLE_IDENTITY]),
                filter(&format!("tag:{}", tags::TEMPLATE), &[&template]),
                filter(&format!("tag:{}", tags::SERVER_INDEX), &[&index]),
            ])
            .await?
            .into_iter()
            .filter(|v| v.usable())
            .collect();
        vols.sort_by(|a, b| {
            (a.create_time.map(|t| t.as_nanos()), &a.id)
                .cmp(&(b.create_time.map(|t| t.as_nanos()), &b.id))
        });
        if vols.len() > 1 {
            let others: Vec<&str> = vols[1..].iter().map(|v| v.id.as_str()).collect();
            warn!(%template, %index, using = %vols[0].id, ?others, "several identity volumes for one server; using the oldest");
        }
        let Some(vol) = vols.into_iter().next() else {
            return Err(AwsError::Conflict(format!(
                "this instance is server {index} of template {template}, but no volume is tagged as its identity volume (slipway:role = identity); `slipway template apply` creates it"
            )));
        };
        let id = vol.id.clone();
        // The fleet attaches the volume to a new server too: if its AttachVolume lands between
        // our look and ours, ours fails; look again (it is attached here then).
        let mut attached = self.attach_here(vol, false).await;
        for _ in 0..2 {
            if attached.is_ok() {
                break;
            }
            let again = self.describe_volume_ids(std::slice::from_ref(&id)).await?;
            let Some(v) = again.into_iter().next() else {
                break;
            };
            attached = self.attach_here(v, false).await;
        }
        let vol = attached?;
        let path = self.resolve_device(&vol).await?;
        info!(volume = %id, path = %path.display(), %template, %index, "identity volume attached");
        Ok(Some(IdentityVolume {
            volume_id: id,
            path,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext4(label: &str) -> Vec<u8> {
        let mut h = vec![0u8; PROBE_BYTES];
        h[EXT_MAGIC_AT..EXT_MAGIC_AT + 2].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        h[EXT_LABEL_AT..EXT_LABEL_AT + label.len()].copy_from_slice(label.as_bytes());
        // Other superblock fields are not zero either.
        h[SUPERBLOCK] = 0x80;
        h
    }

    #[test]
    fn a_new_volume_reads_zeros_and_is_formatted() {
        assert_eq!(
            decide(&vec![0u8; PROBE_BYTES], &vec![0u8; PROBE_BYTES]),
            Prepare::Format
        );
        assert_eq!(
            decide(&vec![0u8; PROBE_BYTES + 4096], &vec![0u8; PROBE_BYTES]),
            Prepare::Format
        );
    }

    #[test]
    fn our_filesystem_is_mounted_as_it_is() {
        assert_eq!(decide(&ext4(IDENTITY_LABEL), &[1u8; 16]), Prepare::Mount);
    }

    #[test]
    fn anything_else_is_refused_never_formatted() {
        // Another ext4 (say, someone's data volume tagged by mistake).
        let r = decide(&ext4("data"), &[]);
        assert!(
            matches!(&r, Prepare::Refuse(m) if m.contains("\"data\"")),
            "{r:?}"
        );
        let r = decide(&ext4("slipway-identit"), &[]);
        assert!(matches!(r, Prepare::Refuse(_)), "{r:?}");
        // A partition table (MBR signature), an XFS superblock at 0, one stray byte at the
        // end of the probed MiB: not empty, not ours.
        let mut mbr = vec![0u8; PROBE_BYTES];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        assert!(matches!(decide(&mbr, &[]), Prepare::Refuse(m) if m.contains("offset 510")));
        let mut xfs = vec![0u8; PROBE_BYTES];
        xfs[..4].copy_from_slice(b"XFSB");
        assert!(matches!(decide(&xfs, &[]), Prepare::Refuse(_)));
        let mut last = vec![0u8; PROBE_BYTES];
        last[PROBE_BYTES - 1] = 1;
        assert!(matches!(decide(&last, &[]), Prepare::Refuse(_)));
        // Empty at the start, not at the end: a GPT's backup header (the primary one lost),
        // an md superblock (version 0.90 and 1.0 sit at the end).
        let mut tail = vec![0u8; PROBE_BYTES];
        tail[PROBE_BYTES - 512..PROBE_BYTES - 504].copy_from_slice(b"EFI PART");
        let r = decide(&vec![0u8; PROBE_BYTES], &tail);
        assert!(
            matches!(&r, Prepare::Refuse(m) if m.contains("512 bytes before the end")),
            "{r:?}"
        );
        // An end that could not be read whole: refused, not taken for zeros.
        let r = decide(&vec![0u8; PROBE_BYTES], &[0u8; 4096]);
        assert!(
            matches!(&r, Prepare::Refuse(m) if m.contains("at its end")),
            "{r:?}"
        );
        // Too short to tell: refused, not formatted.
        assert!(matches!(decide(&[0u8; 4096], &[]), Prepare::Refuse(_)));
    }
}
