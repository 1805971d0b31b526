#!/usr/bin/env bash
# qcow2 benchmarks (issue 3), on page-cached files in a scratch directory:
#  1. convert of a 2 GiB RAW with half its 1 MiB chunks filled: diskkit raw->qcow2 and
#     qcow2->raw against qemu-img convert on the same data (the qcow2 read back is qemu-img's).
#  2. sequential 1 MiB reads of a fully allocated 1 GiB qcow2 (64 KiB clusters): diskkit's
#     iobench against `qemu-img bench` (same file, page cache, queue depth 1).
#  3. on the same image: sequential 1 MiB writes, random 4 KiB reads and writes: iobench vs
#     `qemu-img bench` (random: a prime stride, queue depth 16). Writes go to fresh copies, so
#     both sides overwrite allocated clusters.
# Usage: scripts/bench-qcow2.sh [RUNS] [SCRATCH_DIR]. Prints medians and ratios (time ratios:
# below 1 means diskkit is faster; throughput ratio: above 1 means diskkit is faster).
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
runs=${1:-1}
cd "$(dirname "$0")/.."
root=$PWD
cargo build --release --locked --bin diskkit --example iobench -q
dk=${CARGO_TARGET_DIR:-$root/target}/release/diskkit
iob=${CARGO_TARGET_DIR:-$root/target}/release/examples/iobench
scratch_dir "${2:-}"

row() { # name command...
    local name=$1; shift
    local m; m=$(for i in $(seq "$runs"); do rm -f out.*; t "$@"; done | median)
    printf '%-28s %8.3f s\n' "$name" "$m" >&2
    echo "$m"
}

echo "== 1. convert of a 2 GiB RAW with half its 1 MiB chunks filled ($runs runs, median)"
python3 - <<'PY'
import os
with open("src.raw", "wb") as f:
    f.truncate(2 << 30)
    for c in range(0, 2048, 2):
        f.seek(c << 20)
        f.write(os.urandom(1 << 20))
PY
cat src.raw > /dev/null
qemu-img convert -f raw -O qcow2 src.raw src.qcow2
cat src.qcow2 > /dev/null
a=$(row "diskkit raw->qcow2" "$dk" convert -O qcow2 src.raw out.qcow2)
b=$(row "qemu-img raw->qcow2" qemu-img convert -f raw -O qcow2 src.raw out.qcow2)
c=$(row "diskkit qcow2->raw" "$dk" convert -O raw src.qcow2 out.raw)
d=$(row "qemu-img qcow2->raw" qemu-img convert -f qcow2 -O raw src.qcow2 out.raw)
# The diskkit output is checked, not only timed.
"$dk" convert -O qcow2 src.raw out.qcow2
qemu-img check -q out.qcow2
qemu-img compare -q -f raw -F qcow2 src.raw out.qcow2
printf 'time ratios diskkit/qemu-img: raw->qcow2 %.2f, qcow2->raw %.2f\n' \
    "$(echo "$a / $b" | bc -l)" "$(echo "$c / $d" | bc -l)"
rm -f src.raw src.qcow2 out.*

echo "== 2. sequential 1 MiB reads of a fully allocated 1 GiB qcow2 ($runs runs, median)"
head -c 1G /dev/urandom > full.raw
qemu-img convert -f raw -O qcow2 full.raw full.qcow2
rm -f full.raw
cat full.qcow2 > /dev/null
ours=$(for i in $(seq "$runs"); do "$iob" full.qcow2 qcow2 seq-read 1048576 3 | awk '{print $3}'; done | median)
theirs=$(for i in $(seq "$runs"); do
    s=$(qemu-img bench -f qcow2 -t writeback -i threads -d 1 -c 1024 -s 1M full.qcow2 \
        | sed -n 's/.*completed in \([0-9.]*\) seconds.*/\1/p')
    echo "1073.741824 / $s" | bc -l
done | median)
printf 'diskkit %.0f MB/s, qemu-img bench %.0f MB/s, ratio diskkit/qemu-img %.2f\n' \
    "$ours" "$theirs" "$(echo "$ours / $theirs" | bc -l)"

echo "== 3. writes and random I/O on the same image ($runs runs, median)"
# qemu-img bench has no random pattern; a stride of 104729 blocks (a prime, so every 4 KiB block
# of the 1 GiB image is visited once per 262,144 requests, in scattered order) stands in for it.
# It is given queue depth 16 (its best here; at depth 1 its thread pool's round trip limits it
# to ~25k IOPS); diskkit's iobench is one synchronous thread.
qemu_bench() { # extra qemu-img bench args...
    local s
    cp --sparse=always full.qcow2 q.qcow2
    s=$(qemu-img bench -f qcow2 -t writeback -i threads "$@" q.qcow2 \
        | sed -n 's/.*completed in \([0-9.]*\) seconds.*/\1/p')
    rm -f q.qcow2
    echo "$s"
}
for p in seq-write:1048576 rand-read:4096 rand-write:4096; do
    pat=${p%%:*}; bs=${p##*:}
    col=$([ "$bs" -gt 65536 ] && echo 3 || echo 4)
    ours=$(for i in $(seq "$runs"); do
        cp --sparse=always full.qcow2 d.qcow2
        "$iob" d.qcow2 qcow2 "$pat" "$bs" 3 | awk -v c=$col '{print $c}'
        rm -f d.qcow2
    done | median)
    w=$([ "${pat#*-}" = write ] && echo -w || true)
    if [ "$pat" = seq-write ]; then
        theirs=$(for i in $(seq "$runs"); do
            echo "1073.741824 / $(qemu_bench -w -d 1 -c 1024 -s 1M)" | bc -l
        done | median)
        unit="MB/s"
    else
        theirs=$(for i in $(seq "$runs"); do
            echo "262144 / $(qemu_bench $w -d 16 -c 262144 -s 4k -S $((4096 * 104729)))" | bc -l
        done | median)
        unit="IOPS"
    fi
    printf '%-10s diskkit %10.0f  qemu-img bench %10.0f  ratio diskkit/qemu-img %.2f (%s)\n' \
        "$pat" "$ours" "$theirs" "$(echo "$ours / $theirs" | bc -l)" "$unit"
done
