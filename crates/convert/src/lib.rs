//! Machine conversion for Linux sources: what makes a restore point of a machine from VMware,
//! KVM/Proxmox or Hyper-V boot on an EC2 Nitro instance (and in the local test launch, which
//! attaches its disks as NVMe devices the same way).
//!
//! A machine from another hypervisor typically lacks what Nitro needs: NVMe and ENA drivers in
//! its initramfs, a root and fstab given by UUID rather than `/dev/sda1`, a serial console,
//! DHCP on whatever the NIC is called now. Conversion fixes those on a *copy* of the restore
//! point's disks (never the replica, never the restore point itself) and reports every change.
//!
//! - [`disk`] reads partition tables and filesystem superblocks (I/O-free parsing; no blkid,
//!   no udev).
//! - [`distro`] and [`plan`] decide what to change from file contents (I/O-free).
//! - [`apply`] is the shell: loop devices, mounts, a chroot for `update-initramfs`/`dracut`,
//!   and the guard that undoes them all. It needs root.
//!
//! What cannot be converted is refused before anything boots: an unknown distribution, an
//! encrypted or LVM root, no initramfs tool ([`plan::Refusal`]).

pub mod apply;
pub mod disk;
pub mod distro;
pub mod plan;

pub use apply::{convert, inspect, require_privileges, ConvertError, Options, Report};
pub use disk::{BootMode, DiskLayout};
pub use plan::{Action, Change, ChangeKind, Refusal};
