#!/usr/bin/env bash
# Concurrency benchmark (issue 18).
#
# A. NBD reads under a flush storm: `diskkit serve` and `qemu-nbd` take turns serving the same
#    page-cached image; fio's nbd engine reads random 4 KiB blocks over 1, 4 and 8 connections
#    (queue depth 8 each) while another connection (python3-libnbd) writes a 4 KiB block every
#    millisecond, each with FUA, or each followed by FLUSH, or not at all (baseline). Reported:
#    read IOPS and p99 read latency, the ratios diskkit / qemu-nbd, and how much the storm
#    multiplies each server's p99. qcow2: both servers serve one qcow2 file (made by qemu-img).
#    ASIF: diskkit serves the same data as ASIF; qemu-nbd cannot read ASIF, so its row is
#    compared with qemu-nbd's qcow2 row. Two read loads: `max` (queue depth 8 per connection,
#    as fast as the server goes: throughput, and p99 under saturation) and `paced` (queue depth
#    1, 500 reads/s per connection: the machine is far from saturated, so the p99 shows what a
#    reader waits for, not how busy the CPUs are).
# B. Library scaling: 1, 2, 4 and 8 threads sharing one open DiskImage doing random 4 KiB reads,
#    writes, and a 3:1 mix on fully allocated qcow2 and ASIF images (examples/threadbench.rs),
#    next to fio's psync engine reading the same data as a RAW file with 1 to 8 jobs (what the
#    page cache itself gives on this machine).
#
# LOADS (default "max paced") and PARTS (default "nbd lib") choose what runs.
# With DISKKIT_BEFORE=/path/to/an/older/diskkit, that binary serves too (rows before-qcow2 and
# before-asif), to compare a change.
#
# Usage: scripts/bench-concurrency.sh [RUNS] [SIZE_MiB] [SECONDS] [SCRATCH_DIR]
#        (defaults: 3 runs, 1024 MiB, 5 s per measurement, a new directory in /var/tmp)
# The scratch directory must be on a disk (not tmpfs): FUA and FLUSH cost an fdatasync there.
# Medians over RUNS. Needs qemu-utils, libnbd-bin, python3-libnbd, fio.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
SIZE_MIB=${2:-1024}
SECS=${3:-5}
work=${4:-$(mktemp -d /var/tmp/diskkit-concurrency-bench.XXXXXX)}
mkdir -p "$work"
export PATH=/usr/bin:$PATH   # libnbd's tools and module want Debian's python3
(cd "$root" && cargo build --release --locked --bin diskkit --example threadbench -q)
dk=${CARGO_TARGET_DIR:-$root/target}/release/diskkit
tb=${CARGO_TARGET_DIR:-$root/target}/release/examples/threadbench
sock=$work/b.sock
results=$work/results.txt
: > "$results"
size=$((SIZE_MIB * 1024 * 1024))
LOADS=${LOADS:-max paced}
PARTS=${PARTS:-nbd lib}

echo "preparing ${SIZE_MIB} MiB of random data in $work" >&2
head -c "$size" /dev/urandom > "$work/src.raw"
rm -f "$work/img.qcow2" "$work/img.asif"
qemu-img convert -f raw -O qcow2 "$work/src.raw" "$work/img.qcow2"
"$dk" convert -O asif "$work/src.raw" "$work/img.asif"
sync
cat "$work/src.raw" "$work/img.qcow2" "$work/img.asif" > /dev/null

cat > "$work/writer.py" <<'PY'
# One connection writing a 4 KiB block every millisecond: with FUA, or followed by FLUSH.
import os, random, sys, time
import nbd
uri, mode, secs, size = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
buf = os.urandom(4096)
rng = random.Random(7)
n = 0
t = time.monotonic()
end = t + secs
while time.monotonic() < end:
    off = rng.randrange(size // 4096) * 4096
    if mode == "fua":
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA)
    else:
        h.pwrite(buf, off)
        h.flush()
    n += 1
    t += 0.001
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)
h.shutdown()
print(f"{n / (time.monotonic() - end + secs):.0f}")
PY

pid=
start() {  # start a server in the background on $sock
  rm -f "$sock"
  "$@" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 200); do
    nbdinfo --size "nbd+unix:///disk?socket=$sock" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "server did not start: $*" >&2
  exit 1
}
stop() { [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; pid=; }
trap stop EXIT

# name conns writer load: one fio run of random 4 KiB reads (with the writer alongside).
measure() {
  local name=$1 conns=$2 writer=$3 load=$4 uri="nbd+unix:///disk?socket=$sock" wpid= writes=0
  local pace=(--iodepth=8)
  [ "$load" = paced ] && pace=(--iodepth=1 --rate_iops=500)
  if [ "$writer" != none ]; then
    python3 "$work/writer.py" "$uri" "$writer" "$((SECS + 2))" "$size" > "$work/writes.txt" &
    wpid=$!
    sleep 0.5
  fi
  fio --name=r --ioengine=nbd --uri="$uri" --rw=randread --bs=4k "${pace[@]}" --numjobs="$conns" \
      --group_reporting --size="$size" --runtime="$SECS" --time_based \
      --output-format=json --output="$work/fio.json" >/dev/null 2>&1
  if [ -n "$wpid" ]; then wait "$wpid"; writes=$(cat "$work/writes.txt"); fi
  python3 - "$work/fio.json" "$name" "$conns" "$writer" "$writes" "$load" >> "$results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
p99 = r["clat_ns"]["percentile"]["99.000000"] / 1000
print(f"A {sys.argv[6]}:{sys.argv[2]} {sys.argv[3]} {sys.argv[4]} {r['iops']:.0f} {p99:.0f} {sys.argv[5]}")
PY
}

for run in $(seq "$RUNS"); do
 if [[ " $PARTS " == *" nbd "* ]]; then
  echo "run $run/$RUNS: NBD" >&2
  servers="diskkit-qcow2 qemu-nbd-qcow2 diskkit-asif"
  [ -n "${DISKKIT_BEFORE:-}" ] && servers="$servers before-qcow2 before-asif"
  for server in $servers; do
    case $server in
      before-qcow2) start "$DISKKIT_BEFORE" serve --foreground -f qcow2 --socket "$sock" --export disk --shared 16 --sync fsync "$work/img.qcow2" ;;
      before-asif) start "$DISKKIT_BEFORE" serve --foreground -f asif --socket "$sock" --export disk --shared 16 --sync fsync "$work/img.asif" ;;
      diskkit-qcow2) start "$dk" serve --foreground -f qcow2 --socket "$sock" --export disk --shared 16 --sync fsync "$work/img.qcow2" ;;
      qemu-nbd-qcow2) start qemu-nbd -t --shared=16 -k "$sock" -f qcow2 -x disk "$work/img.qcow2" ;;
      diskkit-asif) start "$dk" serve --foreground -f asif --socket "$sock" --export disk --shared 16 --sync fsync "$work/img.asif" ;;
    esac
    for load in $LOADS; do
      for conns in 1 4 8; do
        for writer in none fua flush; do
          measure "$server" "$conns" "$writer" "$load"
        done
      done
    done
    stop
  done
 fi
 if [[ " $PARTS " == *" lib "* ]]; then
  echo "run $run/$RUNS: library" >&2
  for fmt in qcow2 asif; do
    for pattern in rand-read rand-write rand-mixed; do
      for t in 1 2 4 8; do
        echo "B $("$tb" "$work/img.$fmt" "$fmt" "$pattern" "$t" "$SECS")" >> "$results"
      done
    done
  done
  for t in 1 2 4 8; do
    fio --name=p --ioengine=psync --filename="$work/src.raw" --rw=randread --bs=4k --numjobs="$t" \
        --invalidate=0 --group_reporting --size="$size" --runtime="$SECS" --time_based \
        --output-format=json --output="$work/fio.json" >/dev/null 2>&1
    python3 - "$work/fio.json" "$t" >> "$results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
print(f"B rand-read fio-psync-raw {sys.argv[2]} {r['iops']:.0f}")
PY
  done
 fi
done

python3 - "$results" "$RUNS" "$SIZE_MIB" "$SECS" <<'PY'
import statistics, sys
from collections import defaultdict
a = defaultdict(lambda: ([], [], []))
b = defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "A":
        k = (f[1], int(f[2]), f[3])
        a[k][0].append(float(f[4])); a[k][1].append(float(f[5])); a[k][2].append(float(f[6]))
    else:
        b[(f[1], f[2], int(f[3]))].append(float(f[4]))
med = statistics.median
for load in ("max", "paced"):
    rows = {k: v for k, v in a.items() if k[0].startswith(load + ":")}
    if not rows:
        continue
    what = "QD8 per connection, unpaced" if load == "max" else "QD1, 500 reads/s per connection"
    print(f"\nA ({load}). random 4 KiB reads over NBD (fio, {what}) while one connection writes 4 KiB every ms")
    print(f"   {sys.argv[3]} MiB image, {sys.argv[4]} s each, medians of {sys.argv[2]} runs; p99 in microseconds\n")
    print(f"{'server':16} {'conns':>5} {'writer':>6} {'read IOPS':>10} {'p99 us':>8} {'writes/s':>8} {'IOPS/qemu':>9} {'p99/qemu':>8} {'p99/no-storm':>12}")
    qemu = load + ":qemu-nbd-qcow2"
    for (key, conns, writer), (iops, p99, writes) in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], ["none", "fua", "flush"].index(kv[0][2]))):
        server = key.split(":", 1)[1]
        q = a.get((qemu, conns, writer))
        base = a.get((key, conns, "none"))
        ri = f"{med(iops) / med(q[0]):.2f}" if q and key != qemu else "-"
        rp = f"{med(p99) / med(q[1]):.2f}" if q and key != qemu else "-"
        storm = f"{med(p99) / med(base[1]):.2f}" if base and writer != "none" else "-"
        ws = f"{med(writes):.0f}" if writer != "none" else "-"
        print(f"{server:16} {conns:>5} {writer:>6} {med(iops):>10.0f} {med(p99):>8.0f} {ws:>8} {ri:>9} {rp:>8} {storm:>12}")
if b:
    print(f"\nB. random 4 KiB I/O through the library, threads sharing one open image (IOPS; x = over 1 thread)\n")
    print(f"{'format':16} {'pattern':11} " + " ".join(f"{t:>14}" for t in (1, 2, 4, 8)))
for fmt, pat in sorted({(fmt, pat) for (pat, fmt, _) in b}):
    one = med(b[(pat, fmt, 1)])
    cells = []
    for t in (1, 2, 4, 8):
        v = med(b[(pat, fmt, t)])
        cells.append(f"{v:>8.0f} {v / one:>4.2f}x")
    print(f"{fmt:16} {pat:11} " + " ".join(f"{c:>14}" for c in cells))
PY
echo "raw results: $results (scratch: $work; remove it when done)" >&2
