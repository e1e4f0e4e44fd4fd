use super::*;
use crate::disk::{BootMode, Partition, TableKind};

fn fs(number: u32, uuid: &str) -> Partition {
    Partition {
        number,
        start: 0,
        size: 0,
        esp: false,
        bios_boot: false,
        content: Content::Filesystem {
            fs: "ext4".into(),
            uuid: uuid.into(),
            label: None,
        },
    }
}

fn disks() -> Vec<DiskLayout> {
    let mut swap = fs(5, "");
    swap.content = Content::Swap {
        uuid: "5555".into(),
    };
    vec![
        DiskLayout {
            table: TableKind::Mbr,
            boot_mode: BootMode::LegacyBios,
            partitions: vec![fs(1, "1111"), swap],
        },
        DiskLayout {
            table: TableKind::Mbr,
            boot_mode: BootMode::LegacyBios,
            partitions: vec![fs(1, "2222")],
        },
    ]
}

const ROOT: PartRef = PartRef {
    disk: 0,
    partition: 1,
};

fn kernel(modules: &[&str], builtin: &[&str]) -> KernelModules {
    KernelModules {
        version: "6.1.0-50-amd64".into(),
        modules: modules.iter().map(|s| s.to_string()).collect(),
        builtin: builtin.iter().map(|s| s.to_string()).collect(),
    }
}

/// A Debian machine from another hypervisor: /dev/sdX names, no serial console, MODULES=dep.
fn debian() -> Facts {
    let mut f = Facts::default();
    for (k, v) in [
        ("/etc/os-release", "ID=debian\nVERSION_ID=\"12\"\n"),
        (
            "/etc/fstab",
            "# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/sda1  /  ext4  errors=remount-ro  0  1\n/dev/sdb1 /srv ext4 defaults 0 2\n/dev/sda5 none swap sw 0 0\nUUID=abcd /data xfs defaults 0 0\n/dev/sdc1 /gone ext4 defaults 0 2\n",
        ),
        ("/etc/initramfs-tools/modules", "# list\nahci\n"),
        ("/etc/initramfs-tools/initramfs.conf", "MODULES=dep\nBUSYBOX=auto\n"),
        (
            "/boot/extlinux/extlinux.conf",
            "DEFAULT debian\nLABEL debian\n  LINUX /boot/vmlinuz\n  APPEND root=/dev/sda1 ro quiet\n",
        ),
        (
            "/etc/default/grub",
            "GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"\"\n",
        ),
        (
            "/boot/grub/grub.cfg",
            "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1 root=/dev/sda1 ro resume=/dev/sda5 quiet\n}\n",
        ),
        ("/etc/cloud/cloud.cfg", "users: [default]\n"),
    ] {
        f.files.insert(k.into(), v.into());
    }
    for p in [
        "/usr/sbin/update-initramfs",
        "/usr/sbin/update-grub",
        "/lib/systemd/systemd-networkd",
        "/bin/systemctl",
    ] {
        f.present.insert(p.into());
    }
    f.kernels = vec![kernel(
        &[
            "nvme",
            "ena",
            "xen_blkfront",
            "virtio_net",
            "virtio_blk",
            "ext4",
        ],
        &["virtio_pci"],
    )];
    f
}

fn change<'a>(p: &'a Plan, path: &str) -> &'a Change {
    p.changes
        .iter()
        .find(|c| c.path == path)
        .unwrap_or_else(|| panic!("no change of {path} in {:#?}", p.changes))
}

fn written(c: &Change) -> &str {
    match &c.action {
        Action::Write { content, .. } => content,
        a => panic!("{a:?}"),
    }
}

#[test]
fn device_names_resolve_by_disk_order() {
    let r = |d, p| {
        Some(PartRef {
            disk: d,
            partition: p,
        })
    };
    assert_eq!(resolve_device("/dev/sda1"), r(0, 1));
    assert_eq!(resolve_device("/dev/xvdb3"), r(1, 3));
    assert_eq!(resolve_device("/dev/vdc"), r(2, 0));
    assert_eq!(resolve_device("/dev/hda2"), r(0, 2));
    assert_eq!(resolve_device("/dev/sdaa1"), r(26, 1));
    assert_eq!(resolve_device("/dev/nvme1n1p2"), r(1, 2));
    assert_eq!(resolve_device("/dev/nvme0n1"), r(0, 0));
    assert_eq!(resolve_device("UUID=x"), None);
    assert_eq!(resolve_device("/dev/mapper/vg-root"), None);
    assert_eq!(resolve_device("/dev/disk/by-uuid/x"), None);
    assert_eq!(resolve_device("/dev/loop0"), None);
}

#[test]
fn a_debian_machine_from_another_hypervisor_is_converted() {
    let p = plan(&debian(), &disks(), ROOT).unwrap();
    assert_eq!(p.distro.family, Family::Debian);
    assert_eq!(p.initramfs_tool, "initramfs-tools");

    let f = written(change(&p, "/etc/fstab"));
    assert!(
        f.contains("UUID=1111  /  ext4  errors=remount-ro  0  1\n"),
        "{f}"
    );
    assert!(f.contains("UUID=2222 /srv ext4"), "{f}");
    assert!(f.contains("UUID=5555 none swap"), "{f}");
    assert!(f.contains("UUID=abcd /data xfs"), "{f}");
    assert!(f.starts_with("# <file system>"), "{f}");
    // A name that is on no disk of the restore point stays, with a note.
    assert!(f.contains("/dev/sdc1 /gone"), "{f}");
    assert!(
        p.notes.iter().any(|n| n.contains("/dev/sdc1")),
        "{:?}",
        p.notes
    );

    let e = written(change(&p, "/boot/extlinux/extlinux.conf"));
    assert!(
        e.contains("  APPEND root=UUID=1111 ro quiet console=ttyS0,115200\n"),
        "{e}"
    );
    let g = written(change(&p, "/boot/grub/grub.cfg"));
    assert!(
        g.contains("\tlinux /boot/vmlinuz-6.1 root=UUID=1111 ro resume=UUID=5555 quiet console=ttyS0,115200\n"),
        "{g}"
    );
    let d = written(change(&p, "/etc/default/grub"));
    assert!(
        d.contains("GRUB_CMDLINE_LINUX=\"console=ttyS0,115200\"\n"),
        "{d}"
    );
    assert!(d.contains("GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n"), "{d}");
    assert!(matches!(
        change(&p, "update-grub").action,
        Action::Run {
            required: false,
            ..
        }
    ));

    let m = written(change(&p, "/etc/initramfs-tools/modules"));
    let added: Vec<&str> = m
        .lines()
        .skip_while(|l| !l.starts_with("# Added"))
        .skip(1)
        .collect();
    assert_eq!(
        added,
        [
            "nvme",
            "ena",
            "xen_blkfront",
            "virtio_blk",
            "virtio_net",
            "ext4"
        ]
    );
    assert!(m.starts_with("# list\nahci\n"));
    assert!(p
        .notes
        .iter()
        .any(|n| n.contains("virtio_pci is built into")));
    assert!(p
        .notes
        .iter()
        .any(|n| n.contains("no installed kernel has the xen_netfront")));
    assert_eq!(
        written(change(&p, "/etc/initramfs-tools/conf.d/zz-slipway-modules")),
        "# Added by slipway's launch conversion (MODULES=dep was set).\nMODULES=most\n"
    );
    // The rebuild comes after the files it reads.
    let pos = |path: &str| p.changes.iter().position(|c| c.path == path).unwrap();
    assert!(pos("update-initramfs -u -k all") > pos("/etc/initramfs-tools/modules"));
    assert!(
        pos("update-initramfs -u -k all") > pos("/etc/initramfs-tools/conf.d/zz-slipway-modules")
    );

    assert!(
        written(change(&p, "/etc/systemd/network/80-slipway-dhcp.network")).contains("DHCP=yes")
    );
    change(&p, "systemctl enable systemd-networkd.service");
    assert!(
        written(change(&p, "/etc/cloud/cloud.cfg.d/99-slipway-network.cfg"))
            .contains("config: disabled")
    );
}

#[test]
fn an_already_converted_machine_needs_nothing_but_notes() {
    let mut f = debian();
    f.files.insert(
        "/etc/fstab".into(),
        "UUID=1111 / ext4 defaults 0 1\n".into(),
    );
    f.files.insert(
        "/etc/initramfs-tools/modules".into(),
        "nvme\nena\nxen-blkfront\nvirtio_blk\nvirtio_net\next4\n".into(),
    );
    f.files.insert(
        "/boot/extlinux/extlinux.conf".into(),
        "APPEND root=UUID=1111 console=ttyS0,115200\n".into(),
    );
    f.files.remove("/etc/default/grub");
    f.files.remove("/boot/grub/grub.cfg");
    f.files.remove("/etc/cloud/cloud.cfg");
    f.present
        .insert("/etc/systemd/network/80-slipway-dhcp.network".into());
    f.present.remove("/bin/systemctl");
    let p = plan(&f, &disks(), ROOT).unwrap();
    assert!(p.changes.is_empty(), "{:#?}", p.changes);
    assert!(p.notes.iter().any(|n| n.contains("already stable")));
    assert!(p
        .notes
        .iter()
        .any(|n| n == "initramfs: xen_blkfront already listed"));
}

#[test]
fn a_rhel_machine_uses_dracut_bls_entries_and_networkmanager() {
    let mut f = Facts::default();
    f.files.insert(
        "/etc/os-release".into(),
        "NAME=\"Rocky Linux\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n".into(),
    );
    f.files
        .insert("/etc/fstab".into(), "/dev/vda1 / xfs defaults 0 0\n".into());
    f.files.insert(
        "/boot/loader/entries/abc-5.14.conf".into(),
        "title Rocky\nlinux /vmlinuz-5.14\noptions root=/dev/vda1 ro crashkernel=auto\n".into(),
    );
    f.files.insert(
        "/etc/default/grub".into(),
        "GRUB_CMDLINE_LINUX=\"crashkernel=auto console=ttyS0,115200\"\nGRUB_DISABLE_LINUX_UUID=true\n".into(),
    );
    f.files
        .insert("/boot/grub2/grub.cfg".into(), "blscfg\n".into());
    f.present.insert("/usr/bin/dracut".into());
    f.present.insert("/usr/sbin/grub2-mkconfig".into());
    f.present.insert("/usr/sbin/NetworkManager".into());
    f.kernels = vec![KernelModules {
        version: "5.14.0-1.el9".into(),
        ..kernel(&["nvme", "ena"], &[])
    }];
    let p = plan(&f, &disks(), ROOT).unwrap();
    assert_eq!(p.initramfs_tool, "dracut");
    assert!(written(change(&p, "/etc/fstab")).starts_with("UUID=1111 / xfs"));
    assert_eq!(
        written(change(&p, "/boot/loader/entries/abc-5.14.conf")),
        "title Rocky\nlinux /vmlinuz-5.14\noptions root=UUID=1111 ro crashkernel=auto console=ttyS0,115200\n"
    );
    let d = written(change(&p, "/etc/default/grub"));
    assert!(d.contains("GRUB_DISABLE_LINUX_UUID=false\n"), "{d}");
    assert!(d.contains("GRUB_CMDLINE_LINUX=\"crashkernel=auto console=ttyS0,115200\"\n"));
    change(&p, "grub2-mkconfig -o /boot/grub2/grub.cfg");
    assert!(written(change(&p, "/etc/dracut.conf.d/90-slipway.conf"))
        .contains("add_drivers+=\" nvme ena \""));
    assert!(matches!(
        &change(
            &p,
            "dracut -f /boot/initramfs-5.14.0-1.el9.img 5.14.0-1.el9"
        )
        .action,
        Action::Run { required: true, .. }
    ));
    let nm = change(
        &p,
        "/etc/NetworkManager/system-connections/slipway-dhcp.nmconnection",
    );
    assert!(matches!(nm.action, Action::Write { mode: 0o600, .. }));
    assert!(written(nm).contains("type=ethernet"));
    assert!(!written(nm).contains("interface-name"));
}

#[test]
fn grubenv_keeps_its_1024_bytes() {
    let mut f = debian();
    let mut env = "# GRUB Environment Block\nkernelopts=root=/dev/sda1 ro\n".to_string();
    env.push_str(&"#".repeat(1024 - env.len()));
    f.files.insert("/boot/grub2/grubenv".into(), env);
    let p = plan(&f, &disks(), ROOT).unwrap();
    let g = written(change(&p, "/boot/grub2/grubenv"));
    assert_eq!(g.len(), 1024);
    assert!(g.contains("kernelopts=root=UUID=1111 ro console=ttyS0,115200\n"));
}

#[test]
fn refusals() {
    let mut f = debian();
    f.files
        .insert("/etc/os-release".into(), "ID=gentoo\n".into());
    assert_eq!(
        plan(&f, &disks(), ROOT).unwrap_err(),
        Refusal::UnknownDistribution("gentoo".into())
    );
    let mut f = debian();
    f.files.remove("/etc/os-release");
    assert_eq!(plan(&f, &disks(), ROOT).unwrap_err(), Refusal::NoOsRelease);
    let mut f = debian();
    f.present.remove("/usr/sbin/update-initramfs");
    assert_eq!(
        plan(&f, &disks(), ROOT).unwrap_err(),
        Refusal::NoInitramfsTool
    );
    let mut f = debian();
    f.kernels.clear();
    assert_eq!(plan(&f, &disks(), ROOT).unwrap_err(), Refusal::NoKernel);
    let mut f = debian();
    f.files.insert(
        "/etc/fstab".into(),
        "/dev/mapper/cryptroot / ext4 defaults 0 1\n".into(),
    );
    f.files.insert(
        "/etc/crypttab".into(),
        "cryptroot UUID=x none luks\n".into(),
    );
    assert!(matches!(
        plan(&f, &disks(), ROOT).unwrap_err(),
        Refusal::EncryptedRoot(_)
    ));
}

#[test]
fn module_lists_are_read_from_modules_dep_and_builtin() {
    let k = KernelModules::from_lists(
        "6.1",
        "kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko\nkernel/drivers/block/xen-blkfront.ko.xz:\n",
        "kernel/drivers/virtio/virtio_pci.ko\n",
    );
    assert!(k.modules.contains("nvme"));
    assert!(k.modules.contains("xen_blkfront"));
    assert!(k.builtin.contains("virtio_pci"));
}
