//! AWS launches with the launch conversion, against the emulator: a small bootable-looking
//! Debian disk (MBR, ext4 root with os-release, an fstab and extlinux naming `/dev/sda1`) is a
//! restore point's snapshot; the launch converts it on an instance of the emulator (its
//! attachments are files, `slipway_aws::FileMap`, which the moto launcher fills from the
//! snapshot and captures again at CreateSnapshot) and the *registered image's* snapshot is read
//! back through EBS direct. Needs root (conversion mounts the copy through loop devices).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use aws_sdk_ec2::types::{BootModeValues, Filter, ResourceType};
use slipway_fleet::{
    Conversion, ConvertOn, FleetError, LaunchMode, LaunchReport, LaunchRequest, Template,
};

use crate::support::{spec, Env, ZONE};

const MIB: u64 = 1 << 20;
/// The root partition's length in the disk image.
const PART_LEN: u64 = 48 * MIB;
/// The EFI system partition type (GPT).
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

/// How the test disk is partitioned.
#[derive(Clone, Copy)]
enum Table {
    /// MBR, the root on partition 1 (`/dev/sda1`) at 1 MiB: a BIOS machine.
    Mbr,
    /// GPT, an (empty) EFI system partition 1 and the root on partition 2 (`/dev/sda2`) at
    /// 9 MiB: a UEFI machine.
    GptEsp,
}

impl Table {
    fn root_start(self) -> u64 {
        match self {
            Table::Mbr => MIB,
            Table::GptEsp => 9 * MIB,
        }
    }
    fn root_device(self) -> &'static str {
        match self {
            Table::Mbr => "/dev/sda1",
            Table::GptEsp => "/dev/sda2",
        }
    }
}

/// A Debian-like disk image of 1 GiB holding an ext4 root as a machine from another
/// hypervisor has it (root and fstab by `/dev/sdaN`, extlinux), with a kernel's module lists
/// (every Nitro driver built in, so no initramfs rebuild is needed) and update-initramfs
/// present. `os_id` goes into os-release.
fn debian_like_disk(dir: &Path, os_id: &str, table: Table) -> PathBuf {
    debian_like_disk_with(dir, os_id, table, "")
}

/// [`debian_like_disk`] with more lines in its fstab.
fn debian_like_disk_with(dir: &Path, os_id: &str, table: Table, fstab_extra: &str) -> PathBuf {
    let dev = table.root_device();
    let root = dir.join("root");
    let files = [
        (
            "etc/os-release",
            format!(
                "PRETTY_NAME=\"Test {os_id} 12\"\nNAME=\"Test\"\nID={os_id}\nVERSION_ID=\"12\"\n"
            ),
        ),
        (
            "etc/fstab",
            format!("{dev} / ext4 errors=remount-ro 0 1\n{fstab_extra}"),
        ),
        (
            "boot/extlinux/extlinux.conf",
            format!("DEFAULT linux\nLABEL linux\n  KERNEL /boot/vmlinuz-6.1.0-test\n  INITRD /boot/initrd.img-6.1.0-test\n  APPEND root={dev} ro quiet\n"),
        ),
        ("lib/modules/6.1.0-test/modules.dep", String::new()),
        (
            "lib/modules/6.1.0-test/modules.builtin",
            [
                "nvme", "ena", "xen-blkfront", "xen-netfront", "virtio_pci", "virtio_blk",
                "virtio_scsi", "virtio_net", "ext4",
            ]
            .iter()
            .map(|m| format!("kernel/drivers/{m}.ko\n"))
            .collect(),
        ),
        ("usr/sbin/update-initramfs", "#!/bin/sh\nexit 0\n".to_string()),
    ];
    for (path, text) in &files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    }
    let part = dir.join("part.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&part)
        .arg(format!("{}k", PART_LEN / 1024)));
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(
            match table {
                Table::Mbr => format!(
                    "label: dos\nstart={}, size={}, type=83, bootable\n",
                    MIB / 512,
                    PART_LEN / 512
                ),
                Table::GptEsp => format!(
                    "label: gpt\nstart={}, size={}, type={ESP_TYPE}\nstart={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
                    MIB / 512,
                    8 * MIB / 512,
                    9 * MIB / 512,
                    PART_LEN / 512
                ),
            }
            .as_bytes(),
        )
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk");
    let data = std::fs::read(&part).unwrap();
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&data, table.root_start())
        .unwrap();
    disk
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file of the ext4 root filesystem in `disk`, read without mounting.
fn file_in(dir: &Path, disk: &[u8], table: Table, path: &str) -> String {
    let part = dir.join("readback.img");
    let start = table.root_start() as usize;
    std::fs::write(&part, &disk[start..start + PART_LEN as usize]).unwrap();
    run(Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(&part))
}

/// The first `len` bytes of a snapshot as EBS direct serves them (unlisted blocks are zeros).
async fn snapshot_data(env: &Env, snapshot_id: &str, len: usize) -> Vec<u8> {
    let ebs = aws_sdk_ebs::Client::new(&env.sdk);
    let mut out = vec![0u8; len];
    let mut token: Option<String> = None;
    loop {
        let page = ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot_id)
            .set_next_token(token.take())
            .send()
            .await
            .unwrap_or_else(|e| panic!("ListSnapshotBlocks {snapshot_id}: {e:?}"));
        let bs = page.block_size().unwrap() as usize;
        for b in page.blocks() {
            let got = ebs
                .get_snapshot_block()
                .snapshot_id(snapshot_id)
                .block_index(b.block_index().unwrap())
                .block_token(b.block_token().unwrap())
                .send()
                .await
                .unwrap();
            let data = got.block_data.collect().await.unwrap().into_bytes();
            let at = b.block_index().unwrap() as usize * bs;
            if at < len {
                let n = (len - at).min(data.len());
                out[at..at + n].copy_from_slice(&data[..n]);
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    out
}

/// A restore point of `source` whose one disk holds `image` (a completed snapshot of a volume
/// whose emulated device is the image). Returns the snapshot id.
async fn restore_point_of(env: &Env, source: &str, rp: &str, image: &Path) -> String {
    restore_point_disk(env, source, rp, "disk0", image).await
}

/// One disk of a restore point (see [`restore_point_of`]).
async fn restore_point_disk(env: &Env, source: &str, rp: &str, disk: &str, image: &Path) -> String {
    let vol = env
        .ec2
        .create_volume()
        .availability_zone(ZONE)
        .size(1)
        .send()
        .await
        .unwrap()
        .volume_id()
        .unwrap()
        .to_string();
    std::fs::copy(image, env.device_dir.join(format!("{vol}.img"))).unwrap();
    let tags = [
        (slipway_aws::tags::SOURCE_ID, source),
        (slipway_aws::tags::DISK_ID, disk),
        (slipway_aws::tags::RESTORE_POINT, rp),
        (slipway_aws::tags::CREATED_MS, "1000"),
        (slipway_aws::tags::ROLE, slipway_aws::tags::ROLE_REPLICA),
        (slipway_aws::tags::SERVER, "wave1-0"),
    ];
    env.ec2
        .create_snapshot()
        .volume_id(&vol)
        .tag_specifications(spec(ResourceType::Snapshot, &tags))
        .send()
        .await
        .unwrap()
        .snapshot_id()
        .unwrap()
        .to_string()
}

/// The instance the conversion runs on (in the emulator: any running instance of the zone).
async fn converter(env: &Env) -> ConvertOn {
    let out = env
        .ec2
        .run_instances()
        .image_id("ami-12345678")
        .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
        .subnet_id(&env.subnet)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    ConvertOn {
        instance_id: Some(out.instances()[0].instance_id().unwrap().to_string()),
        devices: Arc::new(slipway_aws::FileMap {
            dir: env.device_dir.clone(),
        }),
        interrupt: None,
    }
}

/// Volumes, or snapshots, carrying `slipway:role = role`.
async fn with_role(env: &Env, role: &str) -> (Vec<String>, Vec<String>) {
    let f = Filter::builder()
        .name(format!("tag:{}", slipway_aws::tags::ROLE))
        .values(role)
        .build();
    let vols = env
        .ec2
        .describe_volumes()
        .filters(f.clone())
        .send()
        .await
        .unwrap()
        .volumes()
        .iter()
        .filter_map(|v| v.volume_id().map(str::to_string))
        .collect();
    let snaps = env
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(f)
        .send()
        .await
        .unwrap()
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_string))
        .collect();
    (vols, snaps)
}

/// A launch of source src-00's newest restore point.
async fn launch_src00(
    env: &Env,
    t: &Template,
    mode: LaunchMode,
    conversion: Conversion,
) -> Result<LaunchReport, FleetError> {
    env.fleet
        .launch(
            t,
            &LaunchRequest {
                source: "src-00".into(),
                mode,
                restore_point: None,
                conversion,
            },
        )
        .await
}

#[tokio::test]
async fn an_aws_launch_boots_an_image_of_converted_copies_and_leaves_the_restore_point_alone() {
    let env = Env::start().await;
    let t = env.template(1, "");
    let dir = tempfile::tempdir().unwrap();
    let image = debian_like_disk(dir.path(), "debian", Table::Mbr);
    let original = std::fs::read(&image).unwrap();
    let rp_snap = restore_point_of(&env, "src-00", "rp-1", &image).await;
    let len = (Table::Mbr.root_start() + PART_LEN) as usize;
    let before = snapshot_data(&env, &rp_snap, len).await;
    assert_eq!(before, original[..len], "the emulator captured the image");
    let on = converter(&env).await;

    let r = launch_src00(&env, &t, LaunchMode::Test, Conversion::On(on.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.converted && !r.reused_image, "{r}");
    assert_eq!(r.boot_mode.as_deref(), Some("legacy-bios"), "{r}");
    let c = r.conversion.as_ref().expect("the conversion's report");
    assert_eq!(c.instance_id, on.instance_id.clone().unwrap());
    assert_eq!(c.availability_zone, ZONE);
    let kinds: Vec<String> = c
        .report
        .changes
        .iter()
        .map(|ch| {
            serde_json::to_value(ch.kind)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(kinds.contains(&"fstab".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"boot-loader".to_string()), "{kinds:?}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["converted"], true);
    assert_eq!(json["boot_mode"], "legacy-bios");
    assert!(json["conversion"]["report"]["changes"].is_array(), "{json}");

    // The registered image: its boot mode, and its root snapshot is the converted copy.
    let img = env
        .ec2
        .describe_images()
        .image_ids(&r.image_id)
        .send()
        .await
        .unwrap()
        .images()[0]
        .clone();
    assert_eq!(img.boot_mode(), Some(&BootModeValues::LegacyBios));
    let root_snap = img
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == img.root_device_name())
        .and_then(|m| m.ebs()?.snapshot_id())
        .expect("the image's root snapshot")
        .to_string();
    assert_ne!(
        root_snap, rp_snap,
        "the image boots from the converted copy"
    );
    assert_eq!(c.snapshots[0].snapshot, root_snap);
    assert_eq!(c.snapshots[0].from_snapshot, rp_snap);
    assert_eq!(r.devices[0].snapshot_id, root_snap);

    // What the image boots: fstab and the kernel command line by UUID.
    let uuid = c.report.root.uuid.clone();
    let converted = snapshot_data(&env, &root_snap, len).await;
    let fstab = file_in(dir.path(), &converted, Table::Mbr, "/etc/fstab");
    assert!(fstab.contains(&format!("UUID={uuid}")), "{fstab}");
    assert!(!fstab.contains("/dev/sda1"), "{fstab}");
    let boot = file_in(
        dir.path(),
        &converted,
        Table::Mbr,
        "/boot/extlinux/extlinux.conf",
    );
    assert!(boot.contains(&format!("root=UUID={uuid}")), "{boot}");
    assert!(boot.contains("console=ttyS0"), "{boot}");

    // The restore point is as it was, and still only its own snapshot.
    assert!(
        snapshot_data(&env, &rp_snap, len).await == before,
        "the restore point's snapshot changed"
    );
    let rps = env.fleet.restore_points("src-00").await.unwrap();
    assert_eq!(rps.len(), 1);
    assert_eq!(
        rps[0]
            .disks
            .iter()
            .map(|d| d.snapshot_id.as_str())
            .collect::<Vec<_>>(),
        [rp_snap.as_str()]
    );

    // No intermediate volume is left; the converted snapshot stays (the image uses it).
    let (vols, snaps) = with_role(&env, slipway_fleet::ROLE_CONVERSION).await;
    assert!(vols.is_empty(), "conversion volumes left: {vols:?}");
    assert!(snaps.is_empty());
    assert_eq!(
        with_role(&env, slipway_fleet::ROLE_CONVERTED).await.1,
        std::slice::from_ref(&root_snap)
    );
    assert_eq!(c.volumes_deleted.len(), 1);

    // The instance itself boots from the converted snapshot too.
    let vols = env
        .ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(&r.instance_id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(vols.volumes()[0].snapshot_id(), Some(root_snap.as_str()));

    // A second launch of the restore point finds the converted image again.
    let again = launch_src00(&env, &t, LaunchMode::Test, Conversion::On(on))
        .await
        .unwrap();
    assert_eq!(again.image_id, r.image_id);
    assert!(again.reused_image && again.converted && again.conversion.is_none());
    assert_eq!(again.devices[0].snapshot_id, root_snap);
    assert_eq!(again.boot_mode.as_deref(), Some("legacy-bios"));
}

#[tokio::test]
async fn a_source_conversion_refuses_fails_the_launch_before_anything_is_registered() {
    let env = Env::start().await;
    let t = env.template(1, "");
    let dir = tempfile::tempdir().unwrap();
    let image = debian_like_disk(dir.path(), "plan9", Table::Mbr);
    let rp_snap = restore_point_of(&env, "src-00", "rp-1", &image).await;
    let on = converter(&env).await;
    let before: Vec<String> = env
        .instances()
        .await
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();

    let e = launch_src00(&env, &t, LaunchMode::Cutover, Conversion::On(on))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            FleetError::Conversion {
                source: slipway_convert::ConvertError::Refused(
                    slipway_convert::Refusal::UnknownDistribution(_)
                ),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("unknown distribution"), "{e}");
    assert!(e.to_string().contains("rp-1"), "{e}");

    let images = env
        .ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap();
    assert!(images.images().is_empty(), "{:?}", images.images());
    assert_eq!(
        with_role(&env, slipway_fleet::ROLE_CONVERSION).await,
        (vec![], vec![])
    );
    assert_eq!(
        with_role(&env, slipway_fleet::ROLE_CONVERTED).await,
        (vec![], vec![])
    );
    let after: Vec<String> = env
        .instances()
        .await
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    assert_eq!(after, before, "no instance launched");
    let rps = env.fleet.restore_points("src-00").await.unwrap();
    assert_eq!(rps[0].disks[0].snapshot_id, rp_snap);
}

#[tokio::test]
async fn a_uefi_source_is_registered_with_the_uefi_boot_mode() {
    let env = Env::start().await;
    let t = env.template(1, "");
    let dir = tempfile::tempdir().unwrap();
    let image = debian_like_disk(dir.path(), "debian", Table::GptEsp);
    restore_point_of(&env, "src-00", "rp-1", &image).await;
    let on = converter(&env).await;
    let r = launch_src00(&env, &t, LaunchMode::Test, Conversion::On(on))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.boot_mode.as_deref(), Some("uefi"), "{r}");
    let c = r.conversion.as_ref().unwrap();
    assert_eq!(c.report.root.partition, 2);
    let img = env
        .ec2
        .describe_images()
        .image_ids(&r.image_id)
        .send()
        .await
        .unwrap()
        .images()[0]
        .clone();
    assert_eq!(img.boot_mode(), Some(&BootModeValues::Uefi));
    let len = (Table::GptEsp.root_start() + PART_LEN) as usize;
    let converted = snapshot_data(&env, &r.devices[0].snapshot_id, len).await;
    let fstab = file_in(dir.path(), &converted, Table::GptEsp, "/etc/fstab");
    assert!(
        fstab.contains(&format!("UUID={}", c.report.root.uuid)),
        "{fstab}"
    );

    // Without conversion nothing inspects the disk: no boot mode is set.
    let plain = launch_src00(&env, &t, LaunchMode::Test, Conversion::Skip)
        .await
        .unwrap();
    assert!(!plain.converted && plain.conversion.is_none());
    assert_eq!(plain.boot_mode, None);
    assert_ne!(
        plain.image_id, r.image_id,
        "a converted image never stands in"
    );
    let img = env
        .ec2
        .describe_images()
        .image_ids(&plain.image_id)
        .send()
        .await
        .unwrap()
        .images()[0]
        .clone();
    assert_eq!(img.boot_mode(), None);
}

#[tokio::test]
async fn an_interrupted_conversion_deletes_its_volumes_and_registers_nothing() {
    let env = Env::start().await;
    let t = env.template(1, "");
    let dir = tempfile::tempdir().unwrap();
    let image = debian_like_disk(dir.path(), "debian", Table::Mbr);
    restore_point_of(&env, "src-00", "rp-1", &image).await;
    let mut on = converter(&env).await;
    // SIGINT as the volumes are being made: the interrupt is already set when the conversion
    // first looks (after its CreateVolume calls).
    let (_tx, rx) = tokio::sync::watch::channel(true);
    on.interrupt = Some(rx);
    let e = launch_src00(&env, &t, LaunchMode::Test, Conversion::On(on))
        .await
        .unwrap_err();
    assert!(matches!(e, FleetError::Interrupted), "{e:?}");
    assert_eq!(env.capture.calls("CreateVolume").len(), 1);
    assert_eq!(env.capture.calls("DeleteVolume").len(), 1);
    assert_eq!(
        with_role(&env, slipway_fleet::ROLE_CONVERSION).await,
        (vec![], vec![])
    );
    let images = env
        .ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap();
    assert!(images.images().is_empty());
    assert!(env.capture.calls("RunInstances").is_empty());
}

#[tokio::test]
async fn every_disk_is_converted_in_the_restore_points_order_and_mapped_to_its_device() {
    let mut env = Env::start().await;
    env.disks.insert("src-00".into(), 2);
    let t = env.template(1, "");
    let dir = tempfile::tempdir().unwrap();
    // The root names its data disk as the source saw it: the restore point's second disk.
    let root = debian_like_disk_with(
        dir.path(),
        "debian",
        Table::Mbr,
        "/dev/sdb /data ext4 defaults 0 2\n",
    );
    let data = dir.path().join("data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-U", "0b5e7a11-da7a-4d15-8a5e-000000000001"])
        .arg(&data));
    let rp0 = restore_point_disk(&env, "src-00", "rp-1", "disk0", &root).await;
    let rp1 = restore_point_disk(&env, "src-00", "rp-1", "disk1", &data).await;
    let on = converter(&env).await;
    let r = launch_src00(&env, &t, LaunchMode::Test, Conversion::On(on))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let c = r.conversion.as_ref().unwrap();
    assert_eq!(
        c.snapshots
            .iter()
            .map(|s| (s.disk.as_str(), s.from_snapshot.as_str()))
            .collect::<Vec<_>>(),
        [("disk0", rp0.as_str()), ("disk1", rp1.as_str())]
    );
    assert_eq!(c.volumes_deleted.len(), 2);
    let devs: Vec<(&str, &str, &str)> = r
        .devices
        .iter()
        .map(|d| (d.device.as_str(), d.disk.as_str(), d.snapshot_id.as_str()))
        .collect();
    assert_eq!(
        devs,
        [
            ("/dev/sda1", "disk0", c.snapshots[0].snapshot.as_str()),
            ("/dev/sdf", "disk1", c.snapshots[1].snapshot.as_str()),
        ]
    );
    let len = (Table::Mbr.root_start() + PART_LEN) as usize;
    let converted = snapshot_data(&env, &c.snapshots[0].snapshot, len).await;
    let fstab = file_in(dir.path(), &converted, Table::Mbr, "/etc/fstab");
    assert!(
        fstab.contains("UUID=0b5e7a11-da7a-4d15-8a5e-000000000001 /data"),
        "{fstab}"
    );
    assert_eq!(
        with_role(&env, slipway_fleet::ROLE_CONVERSION).await,
        (vec![], vec![])
    );
}
