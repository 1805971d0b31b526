#!/usr/bin/env bash
# How disks reach QEMU under `diskkit boot`: QEMU opening the file itself, or diskkit's NBD
# server on a Unix socket. One boot, three extra disks holding the same SIZE MiB of random
# data, read and written by the guest with O_DIRECT, the disks taking turns in each round
# (so load on the host hits all three alike):
#   vdb  RAW file, opened by QEMU
#   vdc  qcow2 file (made by qemu-img), opened by QEMU
#   vdd  ASIF, served by diskkit's NBD server (QEMU cannot open ASIF)
# and a second boot with --via nbd (which applies to every disk of a boot), where a copy of
# the RAW file is vdb, served by diskkit's NBD server.
#
#   scripts/bench-boot-io.sh [ROUNDS] [SIZE_MiB] [LAYOUT] [SCRATCH]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
cd "$(dirname "$0")/.."
rounds=${1:-3}
size=${2:-512}
layout=$(realpath "${3:-target/test-cache/boot-fixture/layout}")
[ -f "$layout/index.json" ] || { echo "no OCI layout at $layout (run: cargo test -p diskkit-cli --test boot)" >&2; exit 1; }
cargo build --release -q -p diskkit-cli
D=${CARGO_TARGET_DIR:-$PWD/target}/release/diskkit
scratch_dir "${4:-}" diskkit-bench-boot-io
export XDG_RUNTIME_DIR=$work/run
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
head -c "$((size << 20))" /dev/urandom > d.raw
qemu-img convert -f raw -O qcow2 d.raw d.qcow2
"$D" convert -O asif d.raw d.asif
cp d.raw e.raw
guest() {
    # $1: device names; reads then writes, each disk in turn, ROUNDS times; MiB/s per line.
    cat <<EOF
for r in \$(seq $rounds); do
  for d in $1; do
    s=\$(date +%s%N); dd if=/dev/\$d of=/dev/null bs=1M count=$size iflag=direct status=none; e=\$(date +%s%N)
    echo "read \$d \$(( $size * 1000000000 / (e - s) ))"
    s=\$(date +%s%N); dd if=/dev/zero of=/dev/\$d bs=1M count=$((size / 2)) oflag=direct status=none; e=\$(date +%s%N)
    echo "write \$d \$(( $size / 2 * 1000000000 / (e - s) ))"
  done
done
EOF
}
"$D" boot --accel tcg --store "$work/store" --disk d.raw --disk d.qcow2 --disk d.asif "$layout" -- sh -c "$(guest 'vdb vdc vdd')" > files.txt
"$D" boot --accel tcg --store "$work/store" --via nbd --disk e.raw "$layout" -- sh -c "$(guest 'vdb')" > nbd.txt
echo "each round (op disk MiB/s):"
sed 's/^/  files boot: /' files.txt
sed 's/^/  nbd boot:   /' nbd.txt
med() { awk -v op="$1" -v d="$2" '$1 == op && $2 == d {print $3}' "$3" | median; }
echo "guest O_DIRECT 1 MiB, MiB/s, median of $rounds ($size MiB read, $((size / 2)) MiB written):"
printf '%-28s %8s %8s\n' disk read write
printf '%-28s %8s %8s\n' "RAW file (QEMU)" "$(med read vdb files.txt)" "$(med write vdb files.txt)"
printf '%-28s %8s %8s\n' "qcow2 file (QEMU)" "$(med read vdc files.txt)" "$(med write vdc files.txt)"
printf '%-28s %8s %8s\n' "ASIF via diskkit NBD" "$(med read vdd files.txt)" "$(med write vdd files.txt)"
printf '%-28s %8s %8s\n' "RAW via diskkit NBD (2nd boot)" "$(med read vdb nbd.txt)" "$(med write vdb nbd.txt)"
