#!/usr/bin/env bash
# Benchmarks for the core formats (issue 2), on page-cached files in a scratch directory.
#  1. Sequential 1 MiB and random 4 KiB reads and writes through diskkit on RAW and ASIF,
#     with fio (psync engine) on the same RAW file as the peer/floor.
#  2. Converting a 4 GiB RAW with half its 1 MiB chunks filled: diskkit raw->asif and asif->raw
#     against qemu-img convert raw->qcow2 and qcow2->raw on the same data (with -t writeback,
#     which syncs at the end as diskkit does), and dd conv=fdatasync of the same data as the floor.
# Usage: scripts/bench-core.sh [RUNS] [SCRATCH_DIR]. Prints medians and ratios. On VMs that
# reclaim page cache proactively (DAMON), give a tmpfs SCRATCH_DIR (e.g. /dev/shm/bc, ~10 GiB).
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
runs=${1:-3}
cd "$(dirname "$0")/.."
root=$PWD
cargo build --release --locked --bin diskkit --example iobench -q
dk=${CARGO_TARGET_DIR:-$root/target}/release/diskkit
iob=${CARGO_TARGET_DIR:-$root/target}/release/examples/iobench
scratch_dir "${2:-}"


echo "== 1. I/O through diskkit (single thread, page cache), $runs runs, median"
size=2G
head -c $size /dev/urandom > io.raw
"$dk" convert -O asif io.raw io.asif
cat io.raw io.asif > /dev/null
printf '%-11s %12s %12s %12s %10s %10s\n' pattern raw asif fio-raw asif/raw raw/fio
for p in seq-read:1048576 rand-read:4096 seq-write:1048576 rand-write:4096; do
    pat=${p%%:*}; bs=${p##*:}
    col=$([ "$bs" -gt 65536 ] && echo 3 || echo 4)
    r=$(for i in $(seq "$runs"); do "$iob" io.raw raw "$pat" "$bs" 3 | awk -v c=$col '{print $c}'; done | median)
    a=$(for i in $(seq "$runs"); do "$iob" io.asif asif "$pat" "$bs" 3 | awk -v c=$col '{print $c}'; done | median)
    case $pat in seq-read) rw=read;; rand-read) rw=randread;; seq-write) rw=write;; rand-write) rw=randwrite;; esac
    f=$(for i in $(seq "$runs"); do fio --name=b --filename=io.raw --rw=$rw --bs=$bs --size=$size --ioengine=psync \
        --runtime=3 --time_based --output-format=json 2>/dev/null | python3 -c '
import json,sys; j=json.load(sys.stdin)["jobs"][0]; k="write" if j["write"]["io_bytes"] else "read"
print(j[k]["bw_bytes"]/1e6 if '"$bs"' > 65536 else j[k]["iops"])'; done | median)
    unit=$([ "$bs" -gt 65536 ] && echo MB/s || echo IOPS)
    printf '%-11s %12.0f %12.0f %12.0f %10.2f %10.2f  (%s)\n' "$pat" "$r" "$a" "$f" \
        "$(echo "$a / $r" | bc -l)" "$(echo "$r / $f" | bc -l)" "$unit"
done
rm -f io.raw io.asif

echo "== 2. convert of a 4 GiB RAW with half its chunks filled ($runs runs, median seconds)"
python3 - <<'PY'
import os
with open("src.raw", "wb") as f:
    f.truncate(4 << 30)
    for c in range(0, 4096, 2):
        f.seek(c << 20)
        f.write(os.urandom(1 << 20))
PY
cat src.raw > /dev/null
# The floor: the same 2 GiB of data copied by dd into a new file.
python3 -c "
import os
with open('src.raw','rb') as s, open('data.bin','wb') as d:
    for c in range(0, 4096, 2):
        s.seek(c << 20); d.write(s.read(1 << 20))
"
cat data.bin > /dev/null
row() { # name command...
    local name=$1; shift
    local m; m=$(for i in $(seq "$runs"); do rm -f out.*; t "$@"; done | median)
    printf '%-34s %8.3f s\n' "$name" "$m"
    echo "$m"
}
qemu-img convert -f raw -O qcow2 src.raw src.qcow2
"$dk" convert -O asif src.raw src.asif
res=$(mktemp)
{
row "dd data (floor, fdatasync)" dd if=data.bin of=out.dd bs=1M conv=fdatasync
row "diskkit raw->asif" "$dk" convert -O asif src.raw out.asif
row "qemu-img raw->qcow2 (-t writeback)" qemu-img convert -t writeback -f raw -O qcow2 src.raw out.qcow2
row "diskkit asif->raw" "$dk" convert -O raw src.asif out.raw
row "qemu-img qcow2->raw (-t writeback)" qemu-img convert -t writeback -f qcow2 -O raw src.qcow2 out.raw
} | tee "$res" | grep ' s$'
# For reference: qemu-img's default cache mode for convert is "unsafe" (no sync at the end),
# which diskkit never does; these rows are not used in the ratios.
for i in 1; do
    printf '%-34s %8.3f s\n' "qemu-img raw->qcow2 (default, no sync)" \
        "$(for i in $(seq "$runs"); do rm -f out.*; t qemu-img convert -f raw -O qcow2 src.raw out.qcow2; done | median)"
    printf '%-34s %8.3f s\n' "qemu-img qcow2->raw (default, no sync)" \
        "$(for i in $(seq "$runs"); do rm -f out.*; t qemu-img convert -f qcow2 -O raw src.qcow2 out.raw; done | median)"
done
mapfile -t v < <(grep -v ' s$' "$res")
printf 'ratios: raw->asif / qemu raw->qcow2 = %.2f; asif->raw / qemu qcow2->raw = %.2f\n' \
    "$(echo "${v[1]} / ${v[2]}" | bc -l)" "$(echo "${v[3]} / ${v[4]}" | bc -l)"
printf 'ratios to the dd floor: raw->asif %.2f, asif->raw %.2f, qemu raw->qcow2 %.2f, qemu qcow2->raw %.2f\n' \
    "$(echo "${v[1]} / ${v[0]}" | bc -l)" "$(echo "${v[3]} / ${v[0]}" | bc -l)" \
    "$(echo "${v[2]} / ${v[0]}" | bc -l)" "$(echo "${v[4]} / ${v[0]}" | bc -l)"
