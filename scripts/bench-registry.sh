#!/usr/bin/env bash
# Registry transfers against skopeo, on the same data, the same local docker-registry and in
# the same run:
#   pull: diskkit pull --layout   vs  skopeo copy docker://… oci:…   (goal: throughput >= 1.0x)
#   push: diskkit push LAYOUT     vs  skopeo copy oci:… docker://…   (goal: throughput >= 1.0x)
# of a multi-layer image (LAYERS gzip layers of files from /usr, about 40 MiB compressed each),
# every run into a new registry and a fresh output directory (nothing is skipped as already
# there). Then a VM disk in tart's layout: push and pull of a DISK_GIB (default 4) GiB disk,
# half data (64 MiB runs of files from /usr), half holes: time, bytes sent, bytes the registry
# stores and bytes the pulled RAW file allocates, against the data size. skopeo has no VM disk
# layout, so the disk has no peer; the figures are set against the data size.
#
# Needs docker-registry, skopeo, pigz, python3, qemu-img.
# Usage: scripts/bench-registry.sh [RUNS] [LAYERS] [DISK_GIB] [SCRATCH]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/bench-lib.sh"
runs=${1:-3}
layers=${2:-4}
disk_gib=${3:-4}
(cd "$here/.." && cargo build --release -q -p diskkit-cli)
dk="${CARGO_TARGET_DIR:-$here/../target}/release/diskkit"
scratch_dir "${4:-}" diskkit-bench-registry

# start_registry NAME: a new docker-registry on a free port with empty storage in dataNAME/
# (sets $host and $reg_pid). Each image run gets its own, so that no tool can skip an upload:
# skopeo remembers where it saw each blob (its blob-info cache) and mounts it from there.
reg_pid=
start_registry() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat > "registry$1.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $PWD/data$1}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$port, secret: bench}
EOF
    docker-registry serve "registry$1.yml" >"registry$1.log" 2>&1 &
    reg_pid=$!
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.1; done
    host="127.0.0.1:$port"
}
stop_registry() {
    [ -n "$reg_pid" ] || return 0
    kill "$reg_pid" 2>/dev/null
    wait "$reg_pid" 2>/dev/null || true
    reg_pid=
}
trap 'stop_registry; rm -rf "$work"' EXIT

# The image: LAYERS gzip layers of distinct files from /usr, as an OCI layout.
echo "building a ${layers}-layer image..." >&2
mkdir -p lay/blobs/sha256
find /usr/lib /usr/share -type f -size +16k 2>/dev/null | sort > files.txt
total_files=$(wc -l < files.txt)
per=$((total_files / (layers + 1)))
for ((i = 0; i < layers; i++)); do
    sed -n "$((i * per + 1)),$(((i + 1) * per))p" files.txt > part.txt
    # Stop a layer at about 120 MiB of files.
    python3 - part.txt > part2.txt <<'EOF'
import os, sys
n = 0
for line in open(sys.argv[1]):
    p = line.rstrip("\n")
    try:
        n += os.path.getsize(p)
    except OSError:
        continue
    print(p)
    if n > 120 << 20:
        break
EOF
    tar -cf - --no-recursion -T part2.txt 2>/dev/null | pigz -6 > "layer$i.tar.gz"
done
python3 - "$layers" <<'EOF'
import hashlib, json, os, sys
n = int(sys.argv[1])
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"lay/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d
layers, diff_ids = [], []
for i in range(n):
    data = open(f"layer{i}.tar.gz", "rb").read()
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                   "digest": put(data), "size": len(data)})
    diff_ids.append("sha256:" + hashlib.sha256(__import__("gzip").decompress(data)).hexdigest())
    os.remove(f"layer{i}.tar.gz")
cfg = json.dumps({"architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": put(cfg), "size": len(cfg)},
                "layers": layers}).encode()
idx = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
       "digest": put(m), "size": len(m), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
json.dump(idx, open("lay/index.json", "w"))
json.dump({"imageLayoutVersion": "1.0.0"}, open("lay/oci-layout", "w"))
EOF
image_bytes=$(du -sb lay/blobs | cut -f1)
echo "image: $layers layers, $image_bytes bytes of blobs" >&2

declare -A T
add() { T[$1]+="$2"$'\n'; }
for ((r = 1; r <= runs; r++)); do
    echo "run $r/$runs" >&2
    start_registry "$r"
    add push_peer "$(t skopeo copy -q --dest-tls-verify=false oci:lay:v1 "docker://$host/peer/img$r:v1")"
    add push_dk "$(t "$dk" push -q lay:v1 "$host/dk/img$r:v1")"
    rm -rf out-peer out-dk
    add pull_peer "$(t skopeo copy -q --src-tls-verify=false "docker://$host/peer/img$r:v1" oci:out-peer:v1)"
    add pull_dk "$(t "$dk" pull -q --layout out-dk "$host/dk/img$r:v1")"
    # The same blobs on both sides.
    diff <(ls out-peer/blobs/sha256 | sort) <(ls out-dk/blobs/sha256 | sort) >/dev/null \
        || { echo "the pulled layouts hold different blobs" >&2; exit 1; }
    stop_registry
    rm -rf "data$r"
done

mb() { echo "scale=1; $image_bytes / $1 / 1048576" | bc -l; }
row() { # NAME KEY_DK KEY_PEER
    local d p
    d=$(median <<<"${T[$2]}")
    p=$(median <<<"${T[$3]}")
    printf '| %s | %.2f s (%s MiB/s) | %.2f s (%s MiB/s) | %.2fx |\n' "$1" "$d" "$(mb "$d")" "$p" "$(mb "$p")" \
        "$(echo "$p / $d" | bc -l)"
}
echo
echo "Image of $layers gzip layers, $image_bytes bytes; median of $runs runs (ratio: diskkit's throughput / skopeo's)"
echo
echo "| operation | diskkit | skopeo copy | ratio |"
echo "|---|---|---|---|"
row "pull into an OCI layout" pull_dk pull_peer
row "push from an OCI layout" push_dk push_peer
rm -rf out-peer out-dk lay

# The VM disk: half data in 64 MiB runs, half holes.
echo "building a ${disk_gib} GiB disk, half data..." >&2
truncate -s "${disk_gib}G" disk.raw
xargs cat < files.txt 2>/dev/null | head -c $((disk_gib * 512))M > data.bin || true
data_bytes=$(stat -c %s data.bin)
for ((i = 0; i < disk_gib * 8; i++)); do
    dd if=data.bin of=disk.raw bs=64M skip=$i seek=$((2 * i)) count=1 conv=notrunc,sparse \
        iflag=fullblock status=none 2>/dev/null || true
done
rm -f data.bin files.txt
start_registry disk
declare -a pt pl
for ((r = 1; r <= runs; r++)); do
    echo "disk run $r/$runs" >&2
    # Each run pushes to a new repository: nothing is skipped as already there.
    s=$(date +%s.%N)
    "$dk" push disk.raw "$host/vm/disk$r:v1" > push.txt
    e=$(date +%s.%N)
    pt+=("$(echo "$e - $s" | bc -l)")
    rm -f back.raw
    pl+=("$(t "$dk" pull -q --disk back.raw "$host/vm/disk$r:v1")")
    qemu-img compare -q -f raw -F raw disk.raw back.raw
done
# The blobs of the first push are stored once; later pushes of the same disk to other
# repositories share them in the registry's storage.
stored=$(du -sb datadisk | cut -f1)
allocated=$(du -B1 back.raw | cut -f1)
push_t=$(printf '%s\n' "${pt[@]}" | median)
pull_t=$(printf '%s\n' "${pl[@]}" | median)
dmb() { echo "scale=1; $data_bytes / $1 / 1048576" | bc -l; }
echo
echo "VM disk of $disk_gib GiB, $data_bytes bytes of data (half), tart's layout; median of $runs runs"
echo
echo "| | time | data rate | bytes | of the data |"
echo "|---|---|---|---|---|"
printf '| push | %.2f s | %s MiB/s | %s | |\n' "$push_t" "$(dmb "$push_t")" "$(grep -o '[0-9.]* [KMG]iB sent' push.txt || true)"
printf '| pull (sparse RAW) | %.2f s | %s MiB/s | %s allocated | %.2fx |\n' "$pull_t" "$(dmb "$pull_t")" "$allocated" \
    "$(echo "$allocated / $data_bytes" | bc -l)"
printf '| registry storage | | | %s | %.2fx |\n' "$stored" "$(echo "$stored / $data_bytes" | bc -l)"
echo
echo "push said: $(cat push.txt)"
