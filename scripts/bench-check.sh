#!/usr/bin/env bash
# qcow2 consistency check and repair: `diskkit check` against `qemu-img check` on images QEMU
# left dirty (lazy refcounts, qemu-io killed after writing), page-cached, in a scratch directory:
#  1. 64 KiB clusters, 1 GiB written (16384 data clusters);
#  2. 4 KiB clusters, 512 MiB written (131072 data clusters).
# Each: check only, then repair (-r all) of two copies; diskkit's repair is verified with
# `qemu-img check` (clean) and `qemu-img compare` against QEMU's own repair.
# Usage: scripts/bench-check.sh [RUNS] [SCRATCH_DIR]. Prints medians and time ratios
# (below 1 means diskkit is faster).
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
runs=${1:-1}
cd "$(dirname "$0")/.."
root=$PWD
cargo build --release --locked --bin diskkit -q
dk=${CARGO_TARGET_DIR:-$root/target}/release/diskkit
scratch_dir "${2:-}"

row() { # name command...
    local name=$1; shift
    local m; m=$(for i in $(seq "$runs"); do t "$@"; done | median)
    printf '%-36s %8.3f s\n' "$name" "$m" >&2
    echo "$m"
}

# repair_row name tool...: median time of repairing a fresh copy of dirty.qcow2.
repair_row() {
    local name=$1; shift
    local m; m=$(for i in $(seq "$runs"); do
        cp dirty.qcow2 r.qcow2; cat r.qcow2 > /dev/null; t "$@" r.qcow2
    done | median)
    printf '%-36s %8.3f s\n' "$name" "$m" >&2
    echo "$m"
}

bench() { # cluster_size bytes_written
    local cs=$1 bytes=$2
    echo "== cluster size $cs, $bytes bytes written, qemu-io killed ($runs runs, median)"
    rm -f dirty.qcow2
    qemu-img create -q -f qcow2 -o "lazy_refcounts=on,cluster_size=$cs" dirty.qcow2 8G
    qemu-io -f qcow2 -c "write -P 0x5a 0 $bytes" -c "write -P 0x6b 4G 1M" -c "sigraise 9" \
        dirty.qcow2 >/dev/null 2>&1 || true
    cat dirty.qcow2 > /dev/null
    local a b c d
    a=$(row "diskkit check" "$dk" check dirty.qcow2)
    b=$(row "qemu-img check" qemu-img check dirty.qcow2)
    c=$(repair_row "diskkit check --repair all" "$dk" check --repair all)
    mv r.qcow2 ours.qcow2
    d=$(repair_row "qemu-img check -r all" qemu-img check -r all)
    qemu-img check -q ours.qcow2
    qemu-img compare -q ours.qcow2 r.qcow2
    printf 'time ratios diskkit/qemu-img: check %.2f, repair %.2f\n' \
        "$(echo "$a / $b" | bc -l)" "$(echo "$c / $d" | bc -l)"
    rm -f dirty.qcow2 ours.qcow2 r.qcow2
}

bench 65536 1G
bench 4096 512M
