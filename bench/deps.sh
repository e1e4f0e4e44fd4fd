#!/usr/bin/env bash
# Peers and tools `make bench` uses. As root on Debian, installs what is missing; otherwise
# says what is missing (the benchmark still runs and its table marks what it could not measure).
set -u
need=()
command -v nbdcopy  >/dev/null || need+=(libnbd-bin)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v fio      >/dev/null || need+=(fio)
command -v ip       >/dev/null || need+=(iproute2)
command -v ping     >/dev/null || need+=(iputils-ping)
perf stat -e task-clock true >/dev/null 2>&1 || need+=(linux-perf)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bench: installing ${need[*]}" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
        || echo "bench: could not install ${need[*]}; those peers will be reported as missing" >&2
else
    echo "bench: missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install -y ${need[*]});" \
         "the benchmark runs without them and its table says what it could not measure" >&2
fi
exit 0
