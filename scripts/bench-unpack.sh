#!/usr/bin/env bash
# Benchmark for `diskkit unpack` (issue 6): one OCI layer made from a directory tree, as plain
# tar, gzip and zstd, unpacked to ext4 by diskkit; against `mkfs.ext4 -d` on the extracted tree
# (plus the extraction itself), and `tar c | cat` as the floor. Warm page cache, median of RUNS.
# Usage: scripts/bench-unpack.sh [TREE (default /usr/share)] [RUNS (default 3)] [SCRATCH_DIR]
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
tree=${1:-/usr/share}
runs=${2:-3}
cd "$(dirname "$0")/.."
root=$PWD
cargo build --release --locked --bin diskkit -q
dk=$root/target/release/diskkit
mkoci=${MKOCI:-$root/crates/diskkit-oci/tests/fixtures/mkoci-layout.sh}
work=${3:-$(mktemp -d /var/tmp/diskkit-unpack-bench.XXXXXX)}
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
cd "$work"

med() { local i; for i in $(seq "$runs"); do t "$@"; done | median; }

tar --numeric-owner -C "$tree" -cf layer.tar . 2>/dev/null || true
zstd -q -T2 -3 -k layer.tar -o layer.tar.zst
pigz -6 -n -k layer.tar
entries=$(tar tf layer.tar | wc -l)
bytes=$(stat -c %s layer.tar)
echo "input: $tree, $entries entries, layer.tar $bytes bytes"
for c in tar tar.gz tar.zst; do bash "$mkoci" "lay-$c" bench "layer.$c" >/dev/null; done
mkdir x && tar -C x -xf layer.tar 2>/dev/null || true
fs_bytes=$(( (bytes * 12 / 10 / 4096 + 65536) * 4096 ))

floor=$(med bash -c 'tar -C x -cf - . | cat >/dev/null')
extract=$(med bash -c 'rm -rf y && mkdir y && tar -C y -xf layer.tar')
mkfs=$(med bash -c "rm -f mk.img && truncate -s $fs_bytes mk.img && mkfs.ext4 -q -F -d x mk.img")
printf '%-34s %8s s\n' "tar c | cat (floor)" "$floor" "tar -xf (extraction)" "$extract" \
    "mkfs.ext4 -d on the extracted tree" "$mkfs"
for c in tar tar.gz tar.zst; do
    d=$(med bash -c "rm -f out.img && '$dk' unpack lay-$c:bench out.img")
    e2fsck -fn out.img >/dev/null 2>&1 || { echo "e2fsck failed on diskkit output ($c)"; exit 1; }
    printf '%-34s %8s s   mkfs/diskkit %.2f   diskkit/floor %.2f\n' "diskkit unpack ($c)" "$d" \
        "$(echo "$mkfs / $d" | bc -l)" "$(echo "$d / $floor" | bc -l)"
done
printf '%-34s %8s s\n' "zstd -dc | cat" "$(med bash -c 'zstd -dc layer.tar.zst | cat >/dev/null')" \
    "pigz -dc | cat" "$(med bash -c 'pigz -dc layer.tar.gz | cat >/dev/null')"
rm -f out.img
/usr/bin/time -f 'diskkit unpack (tar): %e s wall, %U s user, %S s sys, %M KiB max RSS' \
    "$dk" unpack lay-tar:bench out.img >/dev/null
echo "image: $(stat -c %s out.img) bytes apparent, $(du -k out.img | cut -f1) KiB allocated"
