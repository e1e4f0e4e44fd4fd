//! The QEMU command line of a test launch, built as data (tested without QEMU), and the
//! firmware lookup. The machine is shaped like a Nitro instance where it matters for booting:
//! every disk is an NVMe controller (the first one boots), the NIC is not the one the source
//! had, and the console is the first serial port. The second serial port is the check channel.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// CPU virtualisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// UEFI firmware: the code (read-only) and a private copy of the variable store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uefi {
    pub code: PathBuf,
    pub vars: PathBuf,
}

/// One test VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub accel: Accel,
    pub memory_mib: u32,
    /// Disk images in the restore point's order; the first boots.
    pub disks: Vec<PathBuf>,
    pub uefi: Option<Uefi>,
    /// Serial console (ttyS0) log.
    pub console: PathBuf,
    /// Check channel (ttyS1) log.
    pub check: PathBuf,
}

/// The arguments after `qemu-system-x86_64`.
pub fn args(s: &VmSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |x: &[&str]| a.extend(x.iter().map(|s| s.to_string()));
    push(&["-machine", "q35", "-accel", s.accel.as_str()]);
    push(&["-cpu", if s.accel == Accel::Kvm { "host" } else { "max" }]);
    push(&["-smp", "1", "-m", &s.memory_mib.to_string()]);
    // No display, no default devices, and a reboot ends the VM (a panic=… reboot included).
    push(&["-nodefaults", "-display", "none", "-no-reboot"]);
    push(&["-serial", &format!("file:{}", s.console.display())]);
    push(&["-serial", &format!("file:{}", s.check.display())]);
    if let Some(u) = &s.uefi {
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,readonly=on,file={}", u.code.display()),
        ]);
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,file={}", u.vars.display()),
        ]);
    }
    for (i, d) in s.disks.iter().enumerate() {
        push(&[
            "-drive",
            &format!(
                "if=none,id=disk{i},format=raw,cache=unsafe,file={}",
                d.display()
            ),
        ]);
        let mut dev = format!("nvme,drive=disk{i},serial=slipway-disk{i}");
        if i == 0 {
            dev.push_str(",bootindex=0");
        }
        push(&["-device", &dev]);
    }
    push(&["-nic", "user,model=virtio-net-pci"]);
    a
}

/// OVMF's code and variable-store template, where Debian (`ovmf`) or Fedora put them.
pub fn find_ovmf() -> Option<(PathBuf, PathBuf)> {
    [
        (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        (
            "/usr/share/OVMF/OVMF_CODE.fd",
            "/usr/share/OVMF/OVMF_VARS.fd",
        ),
        (
            "/usr/share/edk2/ovmf/OVMF_CODE.fd",
            "/usr/share/edk2/ovmf/OVMF_VARS.fd",
        ),
    ]
    .iter()
    .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
    .find(|(c, v)| c.is_file() && v.is_file())
}

/// Lines on QEMU's stderr that mean KVM cannot run this guest (here: KVM present, but its
/// guests stop with an emulation failure).
pub fn kvm_failed(stderr: &str) -> bool {
    [
        "KVM internal error",
        "emulation failure",
        "kvm run failed",
        "failed to initialize kvm",
        "Could not access KVM kernel module",
    ]
    .iter()
    .any(|p| stderr.contains(p))
}

/// Whether `/dev/kvm` can be opened for reading and writing (worth trying at all).
pub fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev/kvm"))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_nvme_the_first_boots_and_uefi_adds_pflash() {
        let s = VmSpec {
            accel: Accel::Tcg,
            memory_mib: 1024,
            disks: vec!["/w/d0.raw".into(), "/w/d1.raw".into()],
            uefi: Some(Uefi {
                code: "/fw/code.fd".into(),
                vars: "/w/vars.fd".into(),
            }),
            console: "/w/console.log".into(),
            check: "/w/check.log".into(),
        };
        let a = args(&s).join(" ");
        assert!(a.contains("-accel tcg -cpu max"), "{a}");
        assert!(
            a.contains("-serial file:/w/console.log -serial file:/w/check.log"),
            "{a}"
        );
        assert!(
            a.contains("-device nvme,drive=disk0,serial=slipway-disk0,bootindex=0 "),
            "{a}"
        );
        assert!(
            a.contains("-device nvme,drive=disk1,serial=slipway-disk1 "),
            "{a}"
        );
        assert!(
            a.contains("if=none,id=disk1,format=raw,cache=unsafe,file=/w/d1.raw"),
            "{a}"
        );
        assert!(
            a.contains("if=pflash,format=raw,readonly=on,file=/fw/code.fd"),
            "{a}"
        );
        assert!(a.contains("-no-reboot"));
        assert!(!a.contains("ide") && !a.contains("virtio-blk"));
    }

    #[test]
    fn kvm_emulation_failures_are_recognised() {
        assert!(kvm_failed(
            "KVM internal error. Suberror: 1\nemulation failure\n"
        ));
        assert!(!kvm_failed(
            "qemu-system-x86_64: warning: host doesn't support requested feature"
        ));
    }
}
