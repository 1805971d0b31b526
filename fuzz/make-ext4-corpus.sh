#!/usr/bin/env bash
# Regenerate the seed filesystems of the ext4_read fuzz target (corpus/ext4_read/): small
# images made by mke2fs -d and debugfs, one per on-disk layout the reader has to parse.
# Needs root (mke2fs -d keeps owners), e2fsprogs and attr.
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)/corpus/ext4_read
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir -p t/d/sub t/big
echo hello > t/d/a
head -c 70 /dev/zero | tr '\0' x > t/d/seventy
head -c 5000 /dev/urandom > t/d/five_k
ln -s d/a t/short
ln -s "$(printf 'long/%.0s' $(seq 20))" t/long
ln t/d/a t/hard
mkfifo t/fifo
mknod t/null c 1 3
setfattr -n user.x -v 1234 t/d/a
for i in $(seq 1 60); do echo "$i" > "t/big/name-$i"; done
# A sparse file reaching the double-indirect blocks of a 1 KiB block map.
dd if=/dev/urandom of=t/sparse bs=1k count=2 seek=300 status=none
mk() { # name size mke2fs-options...
    local name=$1 size=$2; shift 2
    mke2fs -q -F -o Linux -N 128 "$@" -d t "$name" "$size"
    e2fsck -fyD "$name" >/dev/null 2>&1 || true
}
mk ext2-nofiletype.img 600k -t ext2 -b 1024 -O ^filetype,^dir_index,^resize_inode
mk ext4-1k-csum.img 600k -t ext4 -b 1024 -I 128 -O metadata_csum,^has_journal,^resize_inode
mk ext4-inline.img 600k -t ext4 -b 1024 -I 256 -O inline_data,^has_journal,^resize_inode
mk ext4-bigalloc.img 1M -t ext4 -b 1024 -C 4096 -O bigalloc,^has_journal,^resize_inode
mk ext4-meta-bg.img 600k -t ext4 -b 1024 -O meta_bg,^resize_inode,^has_journal,ea_inode
debugfs -w -R "fallocate /d/five_k 8 20" ext4-1k-csum.img >/dev/null 2>&1
# A journal with committed, revoked and uncommitted transactions pending.
mk journal.img 3M -t ext4 -b 1024 -J size=1 -O ^resize_inode
blk=$(debugfs -R "bmap /d/five_k 0" journal.img 2>/dev/null)
head -c 4096 /dev/urandom > jdata
printf 'jo -c\njw -b %s,%s jdata\njw -r %s\njw -b %s -c jdata\njc\n' "$blk" 300 300 "$((blk + 1))" > cmds
debugfs -w -f cmds journal.img >/dev/null 2>&1
mkdir -p "$out"
cp ./*.img "$out/"
ls -la "$out"
