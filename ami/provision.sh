#!/usr/bin/env bash
# Installs the Slipway replication server into a system (Packer runs it on the AMI build
# instance) or into a scratch root (DESTDIR, for tests and packaging).
#
#   SLIPWAY_BINARY   the slipway binary to install (required)
#   DESTDIR          install under this root instead of / (no packages, no service start)
#
# Installs: /usr/local/bin/slipway; the user slipway (sysusers.d, member of disk for EBS block
# devices); slipway.service (Type=notify, hardened), slipway-userdata.service and
# slipway-identity.service (mounts the server's identity volume on the data dir), enabled;
# /etc/slipway/slipway.toml (backend = "aws", QUIC 0.0.0.0:1500, metrics 0.0.0.0:9500);
# sysctl net.core.rmem_max/wmem_max = 16 MiB; persistent journald; the SSM agent, enabled
# (Session Manager: the operators' way onto a server, which has no key pair and no SSH).
#
# The SSM agent is not in Debian's archive: files/install-ssm-agent fetches its .deb from the
# agent's own regional S3 bucket and installs it only if its signature verifies against the
# public key the build brings in files/amazon-ssm-agent.gpg (docs/operations.md step 1).
#
#   SLIPWAY_SSM_REGION   region of the SSM agent's bucket (Packer passes the build region)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
files="${SLIPWAY_FILES:-$here/files}"
dest="${DESTDIR:-}"
bin="${SLIPWAY_BINARY:?set SLIPWAY_BINARY to the slipway binary to install}"
unitdir="/usr/lib/systemd/system"

die() { echo "provision.sh: $*" >&2; exit 1; }
[ -x "$bin" ] || die "$bin is not an executable file"
for f in slipway.service slipway-userdata.service slipway-identity.service slipway-userdata install-ssm-agent slipway.toml 90-slipway.conf journald-slipway.conf slipway.sysusers; do
  [ -f "$files/$f" ] || die "missing $files/$f"
done

if [ -z "$dest" ]; then
  [ "$(id -u)" = 0 ] || die "run as root (or set DESTDIR)"
  # curl for slipway-userdata and the SSM agent's download, gpg to verify it, e2fsprogs for
  # the identity volume's mkfs.ext4; systemd for sysusers.
  if ! command -v curl >/dev/null || ! command -v gpg >/dev/null || ! command -v mkfs.ext4 >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends curl ca-certificates gpg e2fsprogs
  fi
  # The SSM agent, from its own bucket, only if its signature verifies (see the header).
  sh "$files/install-ssm-agent" \
    "${SLIPWAY_SSM_REGION:?set SLIPWAY_SSM_REGION to the region of the SSM agent bucket}" \
    "$files/amazon-ssm-agent.gpg"
fi

install -D -m 0755 "$bin" "$dest/usr/local/bin/slipway"
install -D -m 0755 "$files/slipway-userdata" "$dest/usr/local/lib/slipway/slipway-userdata"
install -D -m 0644 "$files/slipway.service" "$dest$unitdir/slipway.service"
install -D -m 0644 "$files/slipway-userdata.service" "$dest$unitdir/slipway-userdata.service"
install -D -m 0644 "$files/slipway-identity.service" "$dest$unitdir/slipway-identity.service"
install -D -m 0644 "$files/slipway.sysusers" "$dest/usr/lib/sysusers.d/slipway.conf"
install -D -m 0644 "$files/90-slipway.conf" "$dest/etc/sysctl.d/90-slipway.conf"
install -D -m 0644 "$files/journald-slipway.conf" "$dest/etc/systemd/journald.conf.d/slipway.conf"
install -d -m 0755 "$dest/etc/slipway"
# An existing settings file is kept (re-provisioning an instance must not reset it).
if [ ! -e "$dest/etc/slipway/slipway.toml" ]; then
  install -m 0644 "$files/slipway.toml" "$dest/etc/slipway/slipway.toml"
fi

# The service user. systemd-sysusers works on a scratch root too (--root).
if command -v systemd-sysusers >/dev/null; then
  if [ -n "$dest" ]; then
    mkdir -p "$dest/etc"
    touch "$dest/etc/passwd" "$dest/etc/group" "$dest/etc/shadow" "$dest/etc/gshadow"
    systemd-sysusers --root="$dest" "$dest/usr/lib/sysusers.d/slipway.conf"
  else
    systemd-sysusers /usr/lib/sysusers.d/slipway.conf
  fi
elif [ -z "$dest" ]; then
  getent group disk >/dev/null || groupadd --system disk
  id slipway >/dev/null 2>&1 || useradd --system --home-dir /var/lib/slipway \
    --shell /usr/sbin/nologin --groups disk --user-group slipway
fi

# Enable the units (what `systemctl enable` does, offline), and the SSM agent's, which its
# package installs (on a scratch root only the link is made: no packages there).
wants="$dest/etc/systemd/system/multi-user.target.wants"
mkdir -p "$wants"
for u in slipway.service slipway-userdata.service slipway-identity.service amazon-ssm-agent.service; do
  ln -sfn "$unitdir/$u" "$wants/$u"
done

if [ -z "$dest" ]; then
  sysctl -q --load /etc/sysctl.d/90-slipway.conf || true
  systemctl daemon-reload || true
fi
echo "provision.sh: slipway installed under ${dest:-/}"
