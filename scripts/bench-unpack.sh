#!/usr/bin/env bash
# Benchmark for `diskkit unpack` (issue 6), one layer: a directory tree as one OCI layer,
# plain, gzip and zstd, turned into ext4 by diskkit. Peers, same input, same run: `tar c | cat`
# (the floor), `tar -xf` (extraction) and `mkfs.ext4 -d` on the extracted tree, the
# arcbox-ext4 crate (scripts/bench-arcbox), `zstd -dc | cat` and `pigz -dc | cat`. Warm page
# cache, median of RUNS, ratios against each peer; peak RSS from /usr/bin/time.
# Usage: scripts/bench-unpack.sh [TREE (default /usr/share)] [RUNS (default 3)] [SCRATCH_DIR]
# EXCLUDE='./a ./b' leaves those paths of TREE out. The 3-4 GiB case is bench-unpack-big.sh.
# SCRATCH should be on tmpfs (disk-backed scratch is distorted by page-cache reclaim); it
# needs about three times the tree's size, and the script stops if memory is short for that.
set -euo pipefail
. "$(dirname "$0")/bench-unpack-lib.sh"
tree=${1:-/usr/share}
runs=${2:-3}
setup_bench "${3:-}"

excl=()
for e in ${EXCLUDE:-}; do excl+=(--exclude="$e"); done
tar --numeric-owner "${excl[@]}" -C "$tree" -cf layer.tar . 2>/dev/null || true
entries=$(tar tf layer.tar | wc -l)
bytes=$(stat -c %s layer.tar)
echo "input: $tree${EXCLUDE:+ without $EXCLUDE}, $entries entries, layer.tar $bytes bytes ($(gib "$bytes") GiB)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
need_memory $((bytes * 23 / 10))
mklayout lay-tar layer.tar
fs_bytes=$(( (bytes * 12 / 10 / 4096 + 65536) * 4096 ))
export MIN_SIZE=$fs_bytes

# Peers on the extracted tree (the last extraction stays for tar c and mkfs -d).
extract=$(medp 'rm -rf x' bash -c 'mkdir x && tar -C x -xf layer.tar')
floor=$(med bash -c 'tar -C x -cf - . | cat >/dev/null')
mkfs=$(medp 'rm -f mk.img' bash -c "truncate -s $fs_bytes mk.img && mkfs.ext4 -q -F -d x mk.img")
mkfs_rss=$(rss mkfs.ext4 -q -F -d x mk.img)
rm -rf x mk.img

declare -A dk ab dk_rss
run_pair() { # CODEC LAYOUT BLOB
    dk[$1]=$(medp 'rm -f out.img' "$dk_bin" unpack "$2:bench" out.img)
    check_fsck out.img "diskkit ($1)"
    dk_rss[$1]=$(rss "$dk_bin" unpack --force "$2:bench" out.img)
    rm -f out.img
    ab[$1]=$(medp 'rm -f ab.img' "$ab_bin" ab.img "$3")
    check_fsck ab.img "arcbox-ext4 ($1)"
    [ "$1" = tar ] && ab_rss=$(rss "$ab_bin" ab.img "$3")
    rm -f ab.img
}
run_pair tar lay-tar layer.tar
zstd -q -T2 -3 layer.tar -o layer.tar.zst
pigz -6 -n -k layer.tar
rm -rf lay-tar layer.tar # the compressed runs do not need the plain tar: less memory
mklayout lay-zst layer.tar.zst
mklayout lay-gz layer.tar.gz
zstd_dc=$(med bash -c 'zstd -dc layer.tar.zst | cat >/dev/null')
run_pair zst lay-zst layer.tar.zst
pigz_dc=$(med bash -c 'pigz -dc layer.tar.gz | cat >/dev/null')
run_pair gz lay-gz layer.tar.gz

echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| $tree${EXCLUDE:+ without $EXCLUDE}: $entries entries, $(gib "$bytes") GiB | median s (n=$runs) | ratios |"
echo "|---|---|---|"
row "tar c \| cat (floor)" "$floor"
row "tar -xf (extraction)" "$extract"
row "mkfs.ext4 -d (extracted tree)" "$mkfs" "extraction + mkfs / floor" "$(ratio "$(sum "$extract" "$mkfs")" "$floor")"
row "zstd -dc \| cat" "$zstd_dc"
row "pigz -dc \| cat" "$pigz_dc"
for c in tar zst gz; do
    peer=$floor pname=floor
    [ "$c" = zst ] && peer=$zstd_dc pname="zstd -dc"
    [ "$c" = gz ] && peer=$pigz_dc pname="pigz -dc"
    row "diskkit unpack ($c)" "${dk[$c]}" "/ $pname" "$(ratio "${dk[$c]}" "$peer")" \
        "/ arcbox" "$(ratio "${dk[$c]}" "${ab[$c]}")" "/ mkfs -d" "$(ratio "${dk[$c]}" "$mkfs")" \
        "/ (extraction + mkfs -d)" "$(ratio "${dk[$c]}" "$(sum "$extract" "$mkfs")")"
    row "arcbox-ext4 ($c)" "${ab[$c]}" "/ $pname" "$(ratio "${ab[$c]}" "$peer")"
done
echo
echo "peak RSS: diskkit tar ${dk_rss[tar]} KiB, zst ${dk_rss[zst]} KiB, gz ${dk_rss[gz]} KiB;" \
    "arcbox-ext4 tar $ab_rss KiB; mkfs.ext4 -d $mkfs_rss KiB"
