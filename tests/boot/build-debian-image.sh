#!/usr/bin/env bash
# Builds the boot test's source disk: a small real Debian bookworm on one MBR partition, booted
# by extlinux, made to look like a machine from another hypervisor (tests/e2e/boot.rs):
#   - its initramfs is built with MODULES=list from an ATA/SCSI driver list: no nvme, no virtio;
#   - /etc/fstab and the kernel command line name the root as /dev/sda1.
# The kernel command line carries console=ttyS0 so that both the failing (unconverted) and the
# converted boot can be watched on the serial console.
#
# usage: build-debian-image.sh OUT.img      (root; needs mmdebstrap, extlinux, sfdisk, losetup)
# Writes OUT.img atomically (OUT.img.tmp, then rename); skips the build if OUT.img exists.
set -euo pipefail
out=${1:?usage: build-debian-image.sh OUT.img}
[ -s "$out" ] && { echo "build-debian-image: $out exists, reusing it"; exit 0; }
mkdir -p "$(dirname "$out")"
mirror=${SLIPWAY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
size=${SLIPWAY_IMAGE_SIZE:-1536M}

work=$(mktemp -d "${TMPDIR:-/tmp}/slipway-image.XXXXXX")
loop=""
cleanup() {
  set +e
  mountpoint -q "$work/mnt" && umount -R "$work/mnt"
  [ -n "$loop" ] && losetup -d "$loop"
  rm -rf "$work"
}
trap cleanup EXIT

start=$(date +%s)
# The hook runs before the kernel package configures, so its first initramfs already has the
# test's shape; conf.d overrides initramfs.conf without touching a conffile.
mmdebstrap --variant=minbase --mode=root --format=directory \
  --include=systemd-sysv,udev,kmod,linux-image-amd64,initramfs-tools,e2fsprogs,procps \
  --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
  --setup-hook='printf "MODULES=list\n" > "$1/etc/initramfs-tools/conf.d/slipway-test"' \
  --setup-hook='mkdir -p "$1/etc/initramfs-tools" && printf "ata_piix\nahci\nsd_mod\next4\n" > "$1/etc/initramfs-tools/modules"' \
  --customize-hook='echo slipway-src > "$1/etc/hostname"' \
  --customize-hook='printf "/dev/sda1 / ext4 errors=remount-ro 0 1\n" > "$1/etc/fstab"' \
  --customize-hook='for d in sound drivers/gpu drivers/media drivers/net/wireless drivers/infiniband drivers/staging drivers/bluetooth net/wireless net/bluetooth drivers/iio drivers/usb/gadget; do rm -rf "$1"/usr/lib/modules/*/kernel/$d; done' \
  --customize-hook='chroot "$1" sh -c "depmod -a \$(ls /usr/lib/modules) && update-initramfs -u -k all"' \
  --customize-hook='rm -rf "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/locale "$1"/var/cache/apt/*.bin' \
  bookworm "$work/root" "$mirror"
echo "build-debian-image: mmdebstrap done in $(( $(date +%s) - start )) s"

kver=$(ls "$work/root/usr/lib/modules" | head -1)
if chroot "$work/root" lsinitramfs "/boot/initrd.img-$kver" | grep -q '/nvme'; then
  echo "build-debian-image: the initramfs carries nvme, the test needs it absent" >&2; exit 1
fi

truncate -s "$size" "$out.tmp"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$out.tmp"
# The partition through a loop device of its own (offset 1 MiB): partition nodes of a
# `losetup -P` device need udev, which containers and CI machines may lack.
loop=$(losetup -f --show -o 1048576 "$out.tmp")
mkfs.ext4 -q -L slipway-root -d "$work/root" "$loop"
mkdir "$work/mnt"
mount "$loop" "$work/mnt"
mkdir -p "$work/mnt/boot/extlinux"
cat > "$work/mnt/boot/extlinux/extlinux.conf" <<CONF
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=/dev/sda1 ro console=ttyS0,115200 panic=-1
CONF
extlinux --install "$work/mnt/boot/extlinux" 2>&1 | grep -v '^/boot/extlinux is device' || true
umount "$work/mnt"
losetup -d "$loop"; loop=""
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$out.tmp" bs=440 count=1 conv=notrunc status=none
mv "$out.tmp" "$out"
echo "build-debian-image: $out built in $(( $(date +%s) - start )) s (kernel $kver)"
