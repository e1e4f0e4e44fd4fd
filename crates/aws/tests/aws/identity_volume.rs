//! The identity volume: found by the instance's tags and attached here (against the
//! emulator), and mounted on the data dir — formatted only when new and empty — on a real
//! loop device (root only; skipped otherwise).

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use slipway_aws::identity_volume::{mount_identity, IdentityVolumeError, Mounted};
use slipway_aws::{tags, AwsError};
use slipway_backend::VolumeBackend;

use crate::support::{fast_settings, tag_map, MotoEnv, GIB, ZONE};

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A loop device over a file; unmounted and detached when dropped.
struct Loop {
    dev: String,
    mounts: Vec<PathBuf>,
}

impl Loop {
    fn new(file: &Path) -> Loop {
        Loop {
            dev: sh("losetup", &["-f", "--show", file.to_str().unwrap()]),
            mounts: Vec::new(),
        }
    }
    fn path(&self) -> &Path {
        Path::new(&self.dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = Command::new("umount")
                .arg(m)
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// The mount of `dir` in /proc/self/mountinfo: (filesystem type, mount options).
fn mount_info(dir: &Path) -> Option<(String, String)> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (Path::new(f[4]) == dir).then(|| (f[sep + 1].to_string(), f[5].to_string()))
    })
}

fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

#[test]
fn an_empty_volume_is_formatted_once_and_mounted_again_with_its_data() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mkfs, mount)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("identity.img");
    sparse(&img, 64 << 20);
    let mnt = d.path().join("var");
    let mut lo = Loop::new(&img);
    lo.mounts.push(mnt.clone());

    // New and empty: formatted, then mounted with the data dir's options.
    assert_eq!(mount_identity(lo.path(), &mnt).unwrap(), Mounted::Formatted);
    let (fstype, opts) = mount_info(&mnt).expect("mounted");
    assert_eq!(fstype, "ext4");
    for o in ["nodev", "nosuid", "noexec"] {
        assert!(opts.split(',').any(|x| x == o), "{opts}");
    }
    assert_eq!(
        sh("blkid", &["-o", "value", "-s", "LABEL", &lo.dev]),
        "slipway-identity"
    );
    std::fs::create_dir_all(mnt.join("tls")).unwrap();
    std::fs::write(mnt.join("tls/key.pem"), b"the server's key").unwrap();
    // A second run in the same boot changes nothing.
    assert_eq!(mount_identity(lo.path(), &mnt).unwrap(), Mounted::Already);
    sh("umount", &[mnt.to_str().unwrap()]);
    assert!(mount_info(&mnt).is_none());
    assert!(!mnt.join("tls/key.pem").exists());

    // The next boot (a replacement instance): mounted as it is, never formatted again.
    assert_eq!(mount_identity(lo.path(), &mnt).unwrap(), Mounted::Existing);
    assert_eq!(
        std::fs::read(mnt.join("tls/key.pem")).unwrap(),
        b"the server's key"
    );
    sh("umount", &[mnt.to_str().unwrap()]);
}

/// A server that ran with its data dir on the root disk keeps it: a new, empty identity
/// volume is not formatted and mounted over it (that would hide its certificate and secret).
#[test]
fn a_new_volume_is_not_mounted_over_a_data_dir_that_holds_data() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mkfs, mount)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("identity.img");
    sparse(&img, 64 << 20);
    let mnt = d.path().join("var");
    std::fs::create_dir_all(mnt.join("tls")).unwrap();
    std::fs::write(mnt.join("tls/key.pem"), b"the server's key").unwrap();
    let mut lo = Loop::new(&img);
    lo.mounts.push(mnt.clone());
    let e = mount_identity(lo.path(), &mnt).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    assert!(mount_info(&mnt).is_none());
    assert_eq!(
        std::fs::read(mnt.join("tls/key.pem")).unwrap(),
        b"the server's key"
    );
    // Nothing was written to the volume either.
    let head = std::fs::read(&img).unwrap();
    assert!(head.iter().all(|b| *b == 0));
}

#[test]
fn a_volume_with_other_data_is_refused_and_left_as_it_was() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mkfs, mount)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("var");

    // One non-zero byte: not empty, not ours.
    let img = d.path().join("data.img");
    sparse(&img, 64 << 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(b"customer data", 300 << 10)
        .unwrap();
    let before = std::fs::read(&img).unwrap();
    let mut lo = Loop::new(&img);
    lo.mounts.push(mnt.clone());
    let e = mount_identity(lo.path(), &mnt).unwrap_err();
    assert!(
        matches!(&e, IdentityVolumeError::Refused { reason, .. } if reason.contains("offset 307200")),
        "{e}"
    );
    assert!(mount_info(&mnt).is_none());
    drop(lo);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the volume was written"
    );

    // Zeros at the start, a GPT backup header at the end (its primary header lost), read
    // through a real block device: refused, not formatted.
    let gpt = d.path().join("gpt.img");
    let len: u64 = 64 << 20;
    sparse(&gpt, len);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&gpt)
        .unwrap()
        .write_all_at(b"EFI PART", len - 512)
        .unwrap();
    let before = std::fs::read(&gpt).unwrap();
    let mut lo = Loop::new(&gpt);
    lo.mounts.push(mnt.clone());
    let e = mount_identity(lo.path(), &mnt).unwrap_err();
    assert!(
        matches!(&e, IdentityVolumeError::Refused { reason, .. } if reason.contains("512 bytes before the end")),
        "{e}"
    );
    assert!(mount_info(&mnt).is_none());
    drop(lo);
    assert!(
        std::fs::read(&gpt).unwrap() == before,
        "the volume was written"
    );

    // Someone else's ext4: refused too.
    let other = d.path().join("other.img");
    sparse(&other, 64 << 20);
    sh("mkfs.ext4", &["-q", "-L", "data", other.to_str().unwrap()]);
    let mut lo = Loop::new(&other);
    lo.mounts.push(mnt.clone());
    let e = mount_identity(lo.path(), &mnt).unwrap_err();
    assert!(e.to_string().contains("labelled \"data\""), "{e}");
    assert!(mount_info(&mnt).is_none());

    // A mount point that holds another mount already: left alone.
    let ours = d.path().join("ours.img");
    sparse(&ours, 64 << 20);
    let mut lo2 = Loop::new(&ours);
    lo2.mounts.push(mnt.clone());
    sh("mount", &["-t", "tmpfs", "tmpfs", mnt.to_str().unwrap()]);
    let e = mount_identity(lo2.path(), &mnt).unwrap_err();
    assert!(matches!(e, IdentityVolumeError::OtherMount { .. }), "{e}");
    assert_eq!(mount_info(&mnt).unwrap().0, "tmpfs");
    sh("umount", &[mnt.to_str().unwrap()]);
}

fn identity_tags(template: &str, index: &str) -> TagSpecification {
    let mut b = TagSpecification::builder().resource_type(ResourceType::Volume);
    for (k, v) in [
        (tags::ROLE, tags::ROLE_IDENTITY),
        (tags::TEMPLATE, template),
        (tags::SERVER_INDEX, index),
    ] {
        b = b.tags(Tag::builder().key(k).value(v).build());
    }
    b.build()
}

async fn tag_instance(env: &MotoEnv, id: &str, template: &str, index: &str) {
    env.ec2
        .create_tags()
        .resources(id)
        .tags(Tag::builder().key(tags::TEMPLATE).value(template).build())
        .tags(Tag::builder().key(tags::SERVER_INDEX).value(index).build())
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_identity_volume_is_found_by_the_instances_tags_and_attached_here() {
    let env = MotoEnv::start().await;
    let me = env.identity.instance_id.clone();
    let b = env.backend(fast_settings()).await;

    // Not a template's server: no identity volume, the data dir stays where it is.
    assert_eq!(b.identity_volume().await.unwrap(), None);

    // A template's server without one: an error that says who creates it.
    tag_instance(&env, &me, "wave1", "0").await;
    let e = b.identity_volume().await.unwrap_err();
    assert!(
        matches!(&e, AwsError::Conflict(m) if m.contains("server 0 of template wave1")),
        "{e}"
    );

    // Server 0's volume is attached to the previous (stopped) instance; another template's
    // and another index's are not ours.
    let old = env.run_instance().await.instance_id;
    let mk = |template: &'static str, index: &'static str| {
        let ec2 = env.ec2.clone();
        async move {
            ec2.create_volume()
                .availability_zone(ZONE)
                .size(1)
                .encrypted(true)
                .tag_specifications(identity_tags(template, index))
                .send()
                .await
                .unwrap()
                .volume_id()
                .unwrap()
                .to_string()
        }
    };
    let ours = mk("wave1", "0").await;
    let _other_index = mk("wave1", "1").await;
    let _other_template = mk("wave2", "0").await;
    env.ec2
        .attach_volume()
        .volume_id(&ours)
        .instance_id(&old)
        .device("/dev/sdf")
        .send()
        .await
        .unwrap();
    env.ec2
        .stop_instances()
        .instance_ids(&old)
        .send()
        .await
        .unwrap();

    let v = b.identity_volume().await.unwrap().unwrap();
    assert_eq!(v.volume_id, ours);
    assert_eq!(v.path, env.dir.path().join(format!("devices/{ours}.img")));
    assert_eq!(std::fs::metadata(&v.path).unwrap().len(), GIB);
    let vol = env.volume(&ours).await;
    let att: Vec<_> = vol
        .attachments()
        .iter()
        .map(|a| a.instance_id().unwrap().to_string())
        .collect();
    assert_eq!(
        att,
        std::slice::from_ref(&me),
        "moved from the stopped server to this one"
    );
    assert_eq!(tag_map(vol.tags())[tags::ROLE], "identity");
    // Found again (attached here now) without another attach.
    assert_eq!(b.identity_volume().await.unwrap().unwrap().volume_id, ours);

    // Held by a running server: refused, not taken from it.
    let b2_id = env.run_instance().await;
    tag_instance(&env, &b2_id.instance_id, "wave1", "0").await;
    let b2 = env
        .backend_for(fast_settings(), b2_id, env.sdk.clone())
        .await;
    let e = b2.identity_volume().await.unwrap_err();
    assert!(e.to_string().contains("running"), "{e}");
    assert_eq!(
        env.volume(&ours).await.attachments()[0].instance_id(),
        Some(me.as_str())
    );
}

#[tokio::test]
async fn the_server_publishes_its_fingerprint_as_an_instance_tag() {
    let env = MotoEnv::start().await;
    let b = env.backend(fast_settings()).await;
    let fp = "ab".repeat(32);
    b.publish_fingerprint(&fp).await.unwrap();
    let out = env
        .ec2
        .describe_instances()
        .instance_ids(&env.identity.instance_id)
        .send()
        .await
        .unwrap();
    let i = &out.reservations()[0].instances()[0];
    assert_eq!(tag_map(i.tags())[tags::TLS_FINGERPRINT], fp);
}
