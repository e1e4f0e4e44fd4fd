#!/usr/bin/env bash
# Installs moto's server mode (the AWS API emulator the slipway-aws tests run against) into a
# virtualenv and prints the path of its `moto_server` executable. Idempotent: a venv that
# already has the pinned moto is left alone.
#
#   SLIPWAY_MOTO_VENV   where the venv lives (default /tmp/slipway-moto-venv)
#   SLIPWAY_MOTO_SPEC   what pip installs (default 'moto[server]==5.2.*')
set -euo pipefail

venv="${SLIPWAY_MOTO_VENV:-/tmp/slipway-moto-venv}"
spec="${SLIPWAY_MOTO_SPEC:-moto[server]==5.2.*}"
stamp="$venv/.slipway-moto-spec"

# Several test processes may call this at once: one installs, the others wait for it.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if [ -x "$venv/bin/moto_server" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$spec" ]; then
  echo "$venv/bin/moto_server"
  exit 0
fi

python="${PYTHON:-python3}"
if ! "$python" -m venv --help >/dev/null 2>&1; then
  echo "setup-moto.sh: $python has no venv module (Debian: apt-get install python3-venv)" >&2
  exit 1
fi
# A half-built venv (interrupted earlier) is rebuilt from scratch.
if [ ! -x "$venv/bin/pip" ]; then
  rm -rf "$venv"
  "$python" -m venv "$venv" >&2
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "$spec" >&2
"$venv/bin/moto_server" --help >/dev/null
echo "$spec" > "$stamp"
echo "$venv/bin/moto_server"
