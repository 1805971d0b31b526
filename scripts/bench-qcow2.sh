#!/usr/bin/env bash
# qcow2 benchmarks (issue 3), on page-cached files in a scratch directory:
#  1. convert of a 2 GiB RAW with half its 1 MiB chunks filled: diskkit raw->qcow2 and
#     qcow2->raw against qemu-img convert on the same data (the qcow2 read back is qemu-img's).
#  2. sequential 1 MiB reads of a fully allocated 1 GiB qcow2 (64 KiB clusters): diskkit's
#     iobench against `qemu-img bench` (same file, page cache, queue depth 1).
# Usage: scripts/bench-qcow2.sh [RUNS] [SCRATCH_DIR]. Prints medians and ratios (time ratios:
# below 1 means diskkit is faster; throughput ratio: above 1 means diskkit is faster).
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
runs=${1:-1}
cd "$(dirname "$0")/.."
root=$PWD
cargo build --release --locked --bin diskkit --example iobench -q
dk=$root/target/release/diskkit
iob=$root/target/release/examples/iobench
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
