#!/usr/bin/env bash
# Benchmark: reading out of an ext4 image with diskkit's own reader against debugfs on the same
# image, warm page cache, in the same run:
#   - `diskkit cat IMG:/big` of a 1 GiB file vs `debugfs -R "dump /big /dev/null"`, with the
#     page-cache floor (`cat IMG > /dev/null` of the raw image);
#   - `diskkit cp IMG:/tree out` of a 50,000-file tree vs `debugfs -R "rdump /tree out"`.
# Prints each run's times and the median ratios (debugfs time / diskkit time: > 1 means
# diskkit is faster).
# Usage: scripts/bench-ext4read.sh [runs] [scratch dir]   (builds the release binary first)
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release -q -p diskkit-cli
D=${CARGO_TARGET_DIR:-$PWD/target}/release/diskkit
scratch_dir "${2:-}" diskkit-bench-ext4read

echo "building the images..."
mkdir -p big/tree
head -c 1G /dev/urandom > big/big
mkfs.ext4 -q -F -d big big.img 1300M
rm -rf big
# 50,000 files in 500 directories, 0 to 16 KiB each (about 400 MiB).
python3 - <<'PY'
import os, random
random.seed(1)
blob = os.urandom(1 << 20)
for d in range(500):
    p = f"small/tree/d{d:03}"
    os.makedirs(p)
    for f in range(100):
        n = random.randrange(0, 16 << 10)
        o = random.randrange(0, len(blob) - n)
        with open(f"{p}/f{f:03}", "wb") as fh:
            fh.write(blob[o:o + n])
PY
mkfs.ext4 -q -F -N 60000 -d small small.img 800M
rm -rf small
cat big.img small.img > /dev/null # warm the page cache

cat_d=() cat_g=() cat_f=() cp_d=() cp_g=()
for i in $(seq "$runs"); do
    f=$(t cat big.img)
    a=$(t sh -c "'$D' cat big.img:/big > /dev/null")
    b=$(t debugfs -R "dump /big /dev/null" big.img)
    rm -rf out; c=$(t "$D" cp small.img:/tree out); rm -rf out
    # rdump needs its destination to exist
    mkdir out_g; d=$(t debugfs -R "rdump /tree out_g" small.img); rm -rf out_g
    echo "run $i: cat 1 GiB: diskkit ${a}s  debugfs dump ${b}s  raw-image cat ${f}s | cp 50k files: diskkit ${c}s  debugfs rdump ${d}s"
    cat_d+=("$a"); cat_g+=("$b"); cat_f+=("$f"); cp_d+=("$c"); cp_g+=("$d")
done
md() { printf '%s\n' "$@" | median; }
a=$(md "${cat_d[@]}"); b=$(md "${cat_g[@]}"); f=$(md "${cat_f[@]}"); c=$(md "${cp_d[@]}"); d=$(md "${cp_g[@]}")
printf 'median cat 1 GiB: diskkit %.3fs, debugfs %.3fs (%.2fx), page-cache floor %.3fs (diskkit at %.0f%% of the floor speed)\n' \
    "$a" "$b" "$(echo "$b / $a" | bc -l)" "$f" "$(echo "100 * $f / $a" | bc -l)"
printf 'median cp 50k files: diskkit %.3fs, debugfs rdump %.3fs (%.2fx)\n' "$c" "$d" "$(echo "$d / $c" | bc -l)"
