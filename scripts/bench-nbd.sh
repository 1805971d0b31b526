#!/usr/bin/env bash
# NBD server benchmark: diskkit serve against qemu-nbd and nbdkit (file plugin), one server at a
# time, serving the same page-cached image, with the same clients (nbdcopy, fio's nbd engine).
# For ASIF, diskkit serves the same data converted to ASIF (the peers cannot read ASIF). For qcow2,
# diskkit and qemu-nbd take turns serving one qcow2 file holding the same data (made by qemu-img).
#
# Usage: scripts/bench-nbd.sh [RUNS] [SIZE_MiB] [SCRATCH_DIR]     (defaults: 3 runs, 2048 MiB)
# Prints the median of each test per server and the ratios diskkit / qemu-nbd and
# diskkit / nbdkit, and diskkit-qcow2 / qemu-nbd-qcow2. MB/s = 10^6 bytes/s. Needs qemu-utils, nbdkit, libnbd-bin, fio.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
SIZE_MIB=${2:-2048}
work=${3:-$(mktemp -d /var/tmp/diskkit-nbd-bench.XXXXXX)}
mkdir -p "$work"
export PATH=/usr/bin:$PATH   # libnbd's tools want Debian's python3 and binaries first
(cd "$root" && cargo build --release --locked --bin diskkit -q)
dk=${CARGO_TARGET_DIR:-$root/target}/release/diskkit
sock=$work/b.sock
results=$work/results.txt
: > "$results"
size=$((SIZE_MIB * 1024 * 1024))

echo "preparing ${SIZE_MIB} MiB of random data in $work" >&2
head -c "$size" /dev/urandom > "$work/src.raw"
cp "$work/src.raw" "$work/dst.raw"
rm -f "$work/dst.asif"
"$dk" convert -O asif "$work/src.raw" "$work/dst.asif"
rm -f "$work/dst.qcow2"
qemu-img convert -f raw -O qcow2 "$work/src.raw" "$work/dst.qcow2"
sync   # no writeback of the fresh copies during the first measurements
cat "$work/src.raw" "$work/dst.raw" "$work/dst.asif" "$work/dst.qcow2" > /dev/null

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
stop() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }
trap stop EXIT

now() { date +%s.%N; }
mbps() { echo "$size / ($2 - $1) / 1000000" | bc -l; }
fio_run() {  # rw bs depth [runtime] -> MB/s for sequential, IOPS for random
  local rw=$1 bs=$2 depth=$3 out=$work/fio.json extra=()
  [ $# -ge 4 ] && extra=(--runtime="$4" --time_based)
  fio --name=b --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$depth" --size="$size" \
      "${extra[@]}" --output-format=json --output="$out" >/dev/null 2>&1
  python3 - "$out" "$rw" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = "read" if "read" in sys.argv[2] else "write"
print(j[side]["iops"] if sys.argv[2].startswith("rand") else j[side]["bw_bytes"] / 1e6)
PY
}
record() { echo "$1 $2 $3" >> "$results"; }

bench_once() {  # server-name: one run of every test
  local name=$1 s e
  uri="nbd+unix:///disk?socket=$sock"
  s=$(now); nbdcopy "$uri" null:; e=$(now); record "$name" read_nbdcopy "$(mbps "$s" "$e")"
  record "$name" read_fio_1M_qd16 "$(fio_run read 1M 16)"
  s=$(now); nbdcopy "$work/src.raw" "$uri"; e=$(now); record "$name" write_nbdcopy "$(mbps "$s" "$e")"
  record "$name" write_fio_1M_qd16 "$(fio_run write 1M 16)"
  record "$name" randread_4k_qd32_iops "$(fio_run randread 4k 32 5)"
  record "$name" randwrite_4k_qd32_iops "$(fio_run randwrite 4k 32 5)"
}

# Servers take turns within each run, so slow phases of a noisy machine hit all of them.
for run in $(seq "$RUNS"); do
  start "$dk" serve --foreground -f raw --socket "$sock" --export disk --shared 16 --sync fsync "$work/dst.raw"
  bench_once diskkit-raw; stop
  start qemu-nbd -t --shared=16 -k "$sock" -f raw -x disk "$work/dst.raw"
  bench_once qemu-nbd-raw; stop
  start nbdkit -f -U "$sock" -e disk file "$work/dst.raw"
  bench_once nbdkit-raw; stop
  start "$dk" serve --foreground -f asif --socket "$sock" --export disk --shared 16 --sync fsync "$work/dst.asif"
  bench_once diskkit-asif; stop
  start "$dk" serve --foreground -f qcow2 --socket "$sock" --export disk --shared 16 --sync fsync "$work/dst.qcow2"
  bench_once diskkit-qcow2; stop
  start qemu-nbd -t --shared=16 -k "$sock" -f qcow2 -x disk "$work/dst.qcow2"
  bench_once qemu-nbd-qcow2; stop
  echo "run $run done" >&2
done

python3 - "$results" <<'PY'
import sys, statistics, collections
vals = collections.defaultdict(list)
for line in open(sys.argv[1]):
    server, test, v = line.split()
    vals[(server, test)].append(float(v))
servers = ["diskkit-raw", "qemu-nbd-raw", "nbdkit-raw", "diskkit-asif", "diskkit-qcow2", "qemu-nbd-qcow2"]
tests = list(dict.fromkeys(t for _, t in vals))
med = {k: statistics.median(v) for k, v in vals.items()}
print("%-24s" % "test (median)" + "".join("%16s" % s for s in servers)
      + "  raw/qemu-nbd  raw/nbdkit  asif/qemu-nbd  qcow2/qemu-nbd-qcow2")
for t in tests:
    row = [med.get((s, t), float("nan")) for s in servers]
    print("%-24s" % t + "".join("%16.0f" % v for v in row)
          + "  %11.2f  %10.2f  %13.2f  %20.2f"
          % (row[0] / row[1], row[0] / row[2], row[3] / row[1], row[4] / row[5]))
print("units: MB/s (10^6 B/s) except *_iops; runs per cell: %s" % len(next(iter(vals.values()))))
PY
