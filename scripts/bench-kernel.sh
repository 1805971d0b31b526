#!/usr/bin/env bash
# Benchmark: extract a ~100 MiB kernel + initramfs pair from ext4 in RAW, ASIF and qcow2 images with
# `diskkit kernel`, against `debugfs -R dump` on the RAW image (and virt-get-kernel if present).
# Usage: scripts/bench-kernel.sh [runs]   (builds the release binary first)
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release -q -p diskkit-cli
D=${CARGO_TARGET_DIR:-$PWD/target}/release/diskkit
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir -p tree/boot
head -c 30M /dev/urandom > tree/boot/vmlinuz-6.1.0-bench
head -c 70M /dev/urandom > tree/boot/initrd.img-6.1.0-bench
truncate -s 256M fs.img
mkfs.ext4 -q -F -d tree fs.img
"$D" convert -O asif fs.img fs.asif
"$D" convert -O qcow2 fs.img fs.qcow2
for i in $(seq "$runs"); do
    rm -rf o k i
    a=$(t "$D" kernel fs.img --out o); rm -rf o
    b=$(t "$D" kernel fs.asif --out o); rm -rf o
    q=$(t "$D" kernel fs.qcow2 --out o); rm -rf o
    c=$(t sh -c 'debugfs -R "dump /boot/vmlinuz-6.1.0-bench k" fs.img && debugfs -R "dump /boot/initrd.img-6.1.0-bench i" fs.img')
    echo "run $i: diskkit raw ${a}s  diskkit asif ${b}s  diskkit qcow2 ${q}s  debugfs ${c}s"
done
if command -v virt-get-kernel >/dev/null; then
    echo "virt-get-kernel: $(t virt-get-kernel -a fs.img -o vgk)s"
else
    echo "virt-get-kernel: not installed"
fi
