#!/usr/bin/env bash
# Builds the slipway-agent Debian package with dpkg-deb (Debian's own tool, nothing else to
# install) from a staged tree: `make deb` runs it after a release build.
#
#   SLIPWAY_AGENT_BINARY   the binary to package (default: target/release/slipway-agent)
#   SLIPWAY_DEB_VERSION    package version (default: the workspace version in Cargo.toml)
#   SLIPWAY_DEB_ARCH       Debian architecture (default: dpkg --print-architecture)
#   SLIPWAY_DEB_OUT        output directory (default: target/debian)
#
# The package holds /usr/bin/slipway-agent, the unit /lib/systemd/system/slipway-agent.service
# (not enabled, not started: it needs /etc/slipway/agent.toml and a token file first),
# /etc/slipway/agent.toml.example (a conffile) and docs/agent.md. Its postinst only reloads
# systemd, and only where systemd runs. Depends on libc6 alone (the binary is Rust, TLS by
# rustls, no OpenSSL). Prints the path of the .deb on stdout.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${SLIPWAY_AGENT_BINARY:-$repo/target/release/slipway-agent}"
out="${SLIPWAY_DEB_OUT:-$repo/target/debian}"

die() { echo "build-deb.sh: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (Debian: apt-get install dpkg)"
[ -x "$bin" ] || die "$bin is not an executable file (cargo build --release -p slipway-agent, or set SLIPWAY_AGENT_BINARY)"
for f in deploy/slipway-agent.service deploy/agent.toml.example docs/agent.md; do
  [ -f "$repo/$f" ] || die "missing $repo/$f"
done

version="${SLIPWAY_DEB_VERSION:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml")}"
[ -n "$version" ] || die "no version: set SLIPWAY_DEB_VERSION"
case "$version" in [0-9]*) ;; *) die "version $version must start with a digit" ;; esac
arch="${SLIPWAY_DEB_ARCH:-$(dpkg --print-architecture 2>/dev/null || echo amd64)}"

# The newest glibc symbol version the binary needs, for a versioned libc6 dependency.
glibc="$(grep -ao 'GLIBC_2\.[0-9][0-9]*' "$bin" | sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -u | tail -n1 || true)"
depends="libc6${glibc:+ (>= $glibc)}"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
install -D -m 0755 "$bin" "$root/usr/bin/slipway-agent"
install -D -m 0644 "$repo/deploy/slipway-agent.service" "$root/lib/systemd/system/slipway-agent.service"
install -D -m 0644 "$repo/deploy/agent.toml.example" "$root/etc/slipway/agent.toml.example"
install -D -m 0644 "$repo/docs/agent.md" "$root/usr/share/doc/slipway-agent/agent.md"
cat > "$root/usr/share/doc/slipway-agent/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: slipway
License: Apache-2.0

Files: *
Copyright: the Slipway authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
chmod 0644 "$root/usr/share/doc/slipway-agent/copyright"

install -d -m 0755 "$root/DEBIAN"
installed_kib="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat > "$root/DEBIAN/control" <<CONTROL
Package: slipway-agent
Version: $version
Architecture: $arch
Maintainer: Slipway maintainers <slipway@localhost>
Installed-Size: $installed_kib
Depends: $depends
Section: admin
Priority: optional
Description: Slipway agent: replicates a server's disks to a Slipway replication server
 Streams the source server's block devices over QUIC to a Slipway replication server and
 keeps the replica up to date, tracking writes in the kernel (tracefs) and freezing the
 filesystems around restore points. Configure /etc/slipway/agent.toml (see
 agent.toml.example), then: systemctl enable --now slipway-agent.
CONTROL
echo /etc/slipway/agent.toml.example > "$root/DEBIAN/conffiles"

# Maintainer scripts. Chrootless installs (dpkg --root --force-script-chrootless) set DPKG_ROOT:
# the host's systemd is then none of our business.
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
# Makes systemd see the unit. Neither enabled nor started: /etc/slipway/agent.toml and a token
# file come first (docs/agent.md).
set -e
if [ "$1" = configure ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
POSTINST
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
# Stops the agent when the package is removed (not on upgrade: the new binary takes over at
# the next restart). A clean stop saves the run (state_file), so a reinstall resumes it.
set -e
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl stop slipway-agent.service >/dev/null 2>&1 || true
fi
exit 0
PRERM
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ "$1" = remove ] || [ "$1" = purge ]; then
  if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
  fi
fi
if [ "$1" = purge ]; then
  rm -rf "${DPKG_ROOT:-}/var/lib/slipway-agent"
fi
exit 0
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles"

mkdir -p "$out"
deb="$out/slipway-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
