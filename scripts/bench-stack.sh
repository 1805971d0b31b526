#!/usr/bin/env bash
# Benchmark for stacks (issue 3): reading a 3-layer stack against the same content flattened,
# and against QEMU on an equivalent qcow2 chain built from the same data.
#
#  - base: a 2 GiB RAW with half of its 1 MiB chunks filled with random data;
#  - layer 1: 64 writes of 4 MiB; layer 2: 64 writes of 1 MiB (random offsets, same for both
#    tools, written with `diskkit write` and `qemu-io write -s`).
# Timed (median of RUNS, page cache warm): converting the stack to RAW with diskkit
# (ASIF overlays over RAW) and qemu-img (qcow2 overlays over RAW, -t writeback so it syncs as
# diskkit does), and diskkit converting the flattened ASIF image to RAW; then sequential and
# random reads through the stack against the flattened image. Prints seconds and ratios; outputs are compared for equality.
# Usage: scripts/bench-stack.sh [RUNS] [SCRATCH_DIR]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
runs=${1:-3}
cd "$(dirname "$0")/.."
root=$PWD
cargo build --release --locked --bin diskkit --example iobench -q
iob=${CARGO_TARGET_DIR:-$root/target}/release/examples/iobench
dk=${CARGO_TARGET_DIR:-$root/target}/release/diskkit
scratch_dir "${2:-}" diskkit-bench-stack


python3 - <<'PY'
import os, random
random.seed(7)
with open("base.raw", "wb") as f:
    f.truncate(2 << 30)
    for c in range(0, 2048, 2):
        f.seek(c << 20)
        f.write(os.urandom(1 << 20))
with open("plan.txt", "w") as plan:
    for layer, (n, size) in enumerate([(64, 4 << 20), (64, 1 << 20)], start=1):
        for i in range(n):
            off = random.randrange(0, (2 << 30) - size, 4096)
            name = f"l{layer}-{i}.bin"
            with open(name, "wb") as d:
                d.write(os.urandom(size))
            plan.write(f"{layer} {off} {size} {name}\n")
PY

for layer in 1 2; do
    if [ "$layer" = 1 ]; then
        "$dk" layer create --chunk-size 256K --parent base.raw l1.asif
        qemu-img create -q -f qcow2 -b base.raw -F raw l1.qcow2
    else
        "$dk" layer create --chunk-size 256K --parent l1.asif l2.asif
        qemu-img create -q -f qcow2 -b l1.qcow2 -F qcow2 l2.qcow2
    fi
    while read -r l off size name; do
        [ "$l" = "$layer" ] || continue
        "$dk" write "l$layer.asif" --offset "$off" --from "$name"
        qemu-io -f qcow2 -c "write -s $name $off $size" "l$layer.qcow2" >/dev/null
    done < plan.txt
done
"$dk" flatten -O asif l2.asif flat.asif
cat base.raw l1.asif l2.asif l1.qcow2 l2.qcow2 flat.asif > /dev/null

"$dk" flatten -O raw l2.asif check-dk.raw
qemu-img convert -O raw l2.qcow2 check-qemu.raw
qemu-img compare -q -f raw -F raw check-dk.raw check-qemu.raw
rm -f check-dk.raw check-qemu.raw

stack=$(for i in $(seq "$runs"); do rm -f o.raw; t "$dk" flatten -O raw l2.asif o.raw; done | median)
flat=$(for i in $(seq "$runs"); do rm -f o.raw; t "$dk" convert -O raw flat.asif o.raw; done | median)
qemu=$(for i in $(seq "$runs"); do rm -f o.raw; t qemu-img convert -t writeback -O raw l2.qcow2 o.raw; done | median)
printf 'diskkit: 3-layer stack -> raw   %8.2f s\n' "$stack"
printf 'diskkit: flattened asif -> raw  %8.2f s\n' "$flat"
printf 'qemu-img: qcow2 chain -> raw    %8.2f s\n' "$qemu"
printf "stack speed / flattened speed  %8.2f  (goal >= 0.8)\n" "$(echo "$flat / $stack" | bc -l)"
printf "diskkit speed / qemu-img speed %8.2f\n" "$(echo "$qemu / $stack" | bc -l)"

reads() {
    echo "== reads through the stack vs the flattened image (iobench, single thread, 3 s, median; $1)"
    local p pat bs col s f unit
    for p in seq-read:1048576 rand-read:4096; do
        pat=${p%%:*}; bs=${p##*:}
        col=$([ "$bs" -gt 65536 ] && echo 3 || echo 4)
        s=$(for i in $(seq "$runs"); do "$iob" l2.asif asif "$pat" "$bs" 3 | awk -v c=$col '{print $c}'; done | median)
        f=$(for i in $(seq "$runs"); do "$iob" flat.asif asif "$pat" "$bs" 3 | awk -v c=$col '{print $c}'; done | median)
        unit=$([ "$bs" -gt 65536 ] && echo MB/s || echo IOPS)
        printf '%-10s stack %10.0f  flattened %10.0f  stack/flattened %5.2f (%s, goal >= 0.8)\n' \
            "$pat" "$s" "$f" "$(echo "$s / $f" | bc -l)" "$unit"
    done
}
reads "files as written"
# On tmpfs a file's pages are allocated when it is written: the layers, written at random
# offsets, end up on scattered memory, the flattened image (written in order) on contiguous
# memory, and copying out of scattered pages is slower on this VM whatever reads them. Copying
# every file afresh, in order, gives both sides the same kind of pages (as a disk-backed page
# cache filled by reading would); the stack's content and layout inside each file are unchanged.
for f in base.raw l1.asif l2.asif flat.asif; do
    cp --sparse=always "$f" "$f.fresh" && mv "$f.fresh" "$f"
done
reads "every file copied afresh in order"
