#!/usr/bin/env bash
# Peak memory of `diskkit unpack` for a layer of ENTRIES entries (default 100,000: files of
# 0-8 KiB in 1,000 directories, every 10th a symlink), plain and zstd, by /usr/bin/time;
# arcbox-ext4 and mkfs.ext4 -d (on the extracted tree) on the same input for comparison.
# Usage: scripts/bench-unpack-rss.sh [ENTRIES] [SCRATCH_DIR]
set -euo pipefail
. "$(dirname "$0")/bench-unpack-lib.sh"
n=${1:-100000}
runs=1
setup_bench "${2:-}"
python3 - "$n" <<'PY'
import io, sys, tarfile
n = int(sys.argv[1])
with tarfile.open("layer.tar", "w", format=tarfile.PAX_FORMAT) as t:
    dirs = max(1, n // 100)
    for d in range(dirs):
        ti = tarfile.TarInfo(f"d{d:04}")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        t.addfile(ti)
    for i in range(n - dirs):
        ti = tarfile.TarInfo(f"d{i % dirs:04}/entry-with-a-longer-name-{i:07}")
        if i % 10 == 9:
            ti.type, ti.linkname = tarfile.SYMTYPE, f"entry-with-a-longer-name-{i - 1:07}"
            t.addfile(ti)
        else:
            data = (b"%07d" % i) * ((i * 7919) % 1170)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000 + i
            t.addfile(ti, io.BytesIO(data))
PY
entries=$(tar tf layer.tar | wc -l)
echo "input: $entries entries, layer.tar $(stat -c %s layer.tar) bytes"
zstd -q -T2 -3 -k layer.tar -o layer.tar.zst
mklayout lay-tar layer.tar
mklayout lay-zst layer.tar.zst
for c in tar zst; do
    /usr/bin/time -f "diskkit unpack ($c): %e s wall, %U s user, %S s sys, %M KiB max RSS" \
        "$dk_bin" unpack "lay-$c:bench" out-$c.img >/dev/null
    check_fsck out-$c.img "diskkit ($c)"
    echo "  $(debugfs -R stats out-$c.img 2>/dev/null | grep -m1 'Inode count') ($(debugfs -R stats out-$c.img 2>/dev/null | grep -m1 'Free inodes'))"
    rm -f out-$c.img
done
/usr/bin/time -f "arcbox-ext4 (tar): %e s wall, %M KiB max RSS" "$ab_bin" ab.img layer.tar
rm -f ab.img
mkdir x && tar -C x -xf layer.tar
truncate -s 2G mk.img
/usr/bin/time -f "mkfs.ext4 -d (extracted tree): %e s wall, %M KiB max RSS" mkfs.ext4 -q -F -d x mk.img
