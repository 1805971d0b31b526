#!/usr/bin/env bash
# Benchmark for `diskkit unpack` (issue 6) on a Debian multi-layer image:
#   1. base: `mmdebstrap --variant=minbase --mode=root bookworm` (needs root and the mirror);
#   2. more files: this machine's /usr/lib/python3.11 and /usr/lib/gcc as usr/lib/...;
#   3. deletions and replacements: whiteouts of usr/share/doc, usr/share/man (directories,
#      recursive), usr/lib/gcc (all of layer 2's gcc: deleted data never reaches the image) and
#      usr/bin/perl; an opaque usr/lib/python3.11/email (marker first) holding one new file; a
#      new etc/os-release.
# The layers as plain, gzip and zstd OCI layouts, unpacked by diskkit; against the extraction
# (tar -xf of each layer in order, whiteouts applied) + `mkfs.ext4 -d` on the merged tree,
# `tar c | cat` of the merged tree (floor) and the arcbox-ext4 crate (scripts/bench-arcbox) on
# the three plain tars. Warm page cache, median of RUNS, ratios against each peer.
# Usage: scripts/bench-unpack-debian.sh [RUNS (default 3)] [SCRATCH_DIR]
# BASE_TAR=path reuses a base tar made earlier instead of running mmdebstrap.
set -euo pipefail
. "$(dirname "$0")/bench-unpack-lib.sh"
runs=${1:-3}
base_tar=${BASE_TAR:-}
setup_bench "${2:-}"

if [ -n "$base_tar" ]; then
    cp "$base_tar" base.tar
else
    command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 1; }
    mmdebstrap --quiet --variant=minbase --mode=root bookworm base.tar >/dev/null
fi
tar --numeric-owner -C / -cf l2.tar usr/lib/python3.11 usr/lib/gcc
py=usr/lib/python3.11/email
mkdir -p st/usr/share st/$py st/usr/bin st/etc
touch st/usr/share/.wh.doc st/usr/share/.wh.man st/usr/lib/.wh.gcc st/usr/bin/.wh.perl st/$py/.wh..wh..opq
echo "# layer 3" >st/$py/__init__.py
printf 'PRETTY_NAME="bench layer 3"\nID=debian\n' >st/etc/os-release
tar --numeric-owner -C st -cf l3.tar usr/share/.wh.doc usr/share/.wh.man usr/lib/.wh.gcc \
    usr/bin/.wh.perl $py/.wh..wh..opq $py/__init__.py etc/os-release
rm -rf st
layers=(base.tar l2.tar l3.tar)
for l in "${layers[@]}"; do
    echo "$l: $(tar tf "$l" | wc -l) entries, $(stat -c %s "$l") bytes"
    zstd -q -T2 -3 -k "$l"
    pigz -6 -n -k "$l"
done
mklayout lay-tar "${layers[@]}"
mklayout lay-zst "${layers[@]/%/.zst}"
mklayout lay-gz "${layers[@]/%/.gz}"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

# The merged tree by extraction: each layer in order, its whiteouts applied first.
cat >extract.sh <<'EOF'
set -euo pipefail
mkdir m
for l in "$@"; do
    { tar tf "$l" | grep -E '(^|/)\.wh\.' || true; } | while read -r p; do
        d=$(dirname "$p") b=$(basename "$p")
        if [ "$b" = .wh..wh..opq ]; then
            find "m/$d" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
        else
            rm -rf "m/$d/${b#.wh.}"
        fi
    done
    tar -C m -xf "$l" --exclude='.wh.*'
done
EOF
rm -rf m && bash extract.sh "${layers[@]}" # once in the open: it must work
extract=$(medp 'rm -rf m' bash extract.sh "${layers[@]}")
entries=$(find m | wc -l)
bytes=$(du -sb m | cut -f1)
fs_bytes=$(( (bytes * 12 / 10 / 4096 + 65536) * 4096 ))
export MIN_SIZE=$fs_bytes
floor=$(med bash -c 'tar -C m -cf - . | cat >/dev/null')
mkfs=$(medp 'rm -f mk.img' bash -c "truncate -s $fs_bytes mk.img && mkfs.ext4 -q -F -d m mk.img")
rm -f mk.img

declare -A dk
for c in tar zst gz; do
    dk[$c]=$(medp 'rm -f out.img' "$dk_bin" unpack "lay-$c:bench" out.img)
    check_fsck out.img "diskkit ($c)"
done
ino=$(debugfs -R stats out.img 2>/dev/null | awk -F: '/^Inode count/ {c=$2} /^Free inodes/ {f=$2} END {print c - f}')
dk_rss=$(rss "$dk_bin" unpack --force lay-tar:bench out.img)
rm -f out.img
ab=$(medp 'rm -f ab.img' "$ab_bin" ab.img "${layers[@]}")
if e2fsck -fn ab.img >ab-fsck.txt 2>&1; then ab_fsck=clean; else
    ab_fsck="NOT clean"
    echo "arcbox-ext4 image, e2fsck -fn:"; grep -v '^ *$' ab-fsck.txt | sed -n 1,12p
fi
rm -f ab.img
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| Debian bookworm minbase + 2 layers: merged $entries entries, $(gib "$bytes") GiB | median s (n=$runs) | ratios |"
echo "|---|---|---|"
row "tar c \| cat of the merged tree (floor)" "$floor"
row "extraction (3 tars, whiteouts)" "$extract"
row "mkfs.ext4 -d (merged tree)" "$mkfs" "extraction + mkfs / floor" "$(ratio "$(sum "$extract" "$mkfs")" "$floor")"
for c in tar zst gz; do
    row "diskkit unpack ($c)" "${dk[$c]}" "/ floor" "$(ratio "${dk[$c]}" "$floor")" \
        "/ arcbox (tar)" "$(ratio "${dk[$c]}" "$ab")" "/ mkfs -d" "$(ratio "${dk[$c]}" "$mkfs")" \
        "/ (extraction + mkfs -d)" "$(ratio "${dk[$c]}" "$(sum "$extract" "$mkfs")")"
done
row "arcbox-ext4 (3 plain tars; e2fsck $ab_fsck)" "$ab" "/ floor" "$(ratio "$ab" "$floor")"
echo
echo "diskkit: $ino inodes in use (the merged tree has $entries entries + lost+found + 10 reserved);" \
    "peak RSS $dk_rss KiB (tar)"
