#!/usr/bin/env bash
# Bundles and the cache against their peers, on the same data in the same run:
#   extract: diskkit bundle extract      vs  zstd -dc | tar -xS            (goal: time <= 0.8x)
#   create:  diskkit bundle create       vs  tar -cS --format=gnu | zstd -T0 (goal: time <= 1.0x)
#   fetch:   diskkit cache fetch (nginx) vs  curl -o                        (goal: throughput >= 0.95x)
#            (a fetch also checks and extracts the bundle while it downloads, so it is also
#            compared with curl | tee | zstd -dc | tar -xS, and its download phase with curl)
# and the peak RSS of every diskkit command (goal: < 256 MiB).
#
# The disk is SIZE_GIB (default 4) GiB, half of it data (64 MiB runs of files from /usr,
# compressible like a system disk), half holes. Page cache warm for both sides.
#
# Usage: scripts/bench-bundle.sh [RUNS] [SIZE_GIB] [SCRATCH]
# DISKKIT_BIN=PATH benchmarks that binary instead of building this tree (to compare two
# builds on the same machine state). The load average is printed before and after: on a
# shared machine, compare only figures from one run of the script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/bench-lib.sh"
runs=${1:-3}
size_gib=${2:-4}
if [[ -n "${DISKKIT_BIN:-}" ]]; then
    dk=$(realpath "$DISKKIT_BIN")
else
    (cd "$here/.." && cargo build --release -q -p diskkit-cli)
    dk="${CARGO_TARGET_DIR:-$here/../target}/release/diskkit"
fi
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
scratch_dir "${3:-}" diskkit-bench-bundle

# rt COMMAND...: wall seconds and peak RSS (KiB) of COMMAND, as "SECONDS KIB".
rt() {
    local s e
    s=$(date +%s.%N)
    /usr/bin/time -f "%M" -o rss.txt "$@" >out.txt 2>err.txt || { cat err.txt >&2; exit 1; }
    e=$(date +%s.%N)
    echo "$(echo "$e - $s" | bc -l) $(tail -1 rss.txt)"
}

echo "building a ${size_gib} GiB disk, half data..." >&2
mkdir -p src && truncate -s "${size_gib}G" src/disk.img
find /usr/lib /usr/share -type f -size +64k 2>/dev/null | head -20000 | xargs cat 2>/dev/null \
    | head -c $((size_gib * 512))M > data.bin || true
chunks=$((size_gib * 8))
for ((i = 0; i < chunks; i++)); do
    dd if=data.bin of=src/disk.img bs=64M skip=$((i)) seek=$((2 * i)) count=1 conv=notrunc,sparse \
        iflag=fullblock status=none 2>/dev/null || true
done
rm -f data.bin
qemu-img create -q -f qcow2 -F raw -b disk.img src/layer.qcow2
echo '{"version":1,"memory":2048}' > src/machine.json
echo "data: $(du -B1 src/disk.img | cut -f1) bytes allocated of $(stat -c %s src/disk.img)" >&2

declare -A T R
add() { T[$1]+="$2"$'\n'; R[$1]+="$3"$'\n'; }
for ((r = 1; r <= runs; r++)); do
    echo "run $r/$runs" >&2
    rm -f peer.tar.zst dk.tar.zst
    read -r s k < <(rt sh -c "tar -cS --format=gnu -C src -f - disk.img layer.qcow2 machine.json | zstd -q -T0 -3 -o peer.tar.zst")
    add create_peer "$s" "$k"
    read -r s k < <(rt "$dk" bundle create -q --machine src/machine.json src/disk.img dk.tar.zst)
    add create_dk "$s" "$k"
    rm -rf x1 x2 && mkdir x1
    read -r s k < <(rt sh -c "zstd -dc peer.tar.zst | tar -xS -C x1 -f -")
    add extract_peer "$s" "$k"
    read -r s k < <(rt "$dk" bundle extract -q peer.tar.zst x2)
    add extract_dk "$s" "$k"
    qemu-img compare -q -f raw -F raw x1/disk.img x2/disk.img
    rm -rf x1 x2
done

# fetch from nginx on localhost.
mkdir -p www ngx/{client,proxy,fastcgi,uwsgi,scgi} && mv peer.tar.zst www/img.tar.zst
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > ngx/nginx.conf <<EOF
daemon off; master_process off; worker_processes 1; pid $PWD/ngx/nginx.pid; error_log $PWD/ngx/error.log;
events { worker_connections 64; }
http { access_log off; sendfile on; default_type application/octet-stream;
  client_body_temp_path $PWD/ngx/client; proxy_temp_path $PWD/ngx/proxy; fastcgi_temp_path $PWD/ngx/fastcgi;
  uwsgi_temp_path $PWD/ngx/uwsgi; scgi_temp_path $PWD/ngx/scgi;
  server { listen 127.0.0.1:$port; root $PWD/www; location / { } } }
EOF
nginx -p "$PWD/ngx" -c "$PWD/ngx/nginx.conf" & ngx_pid=$!
trap 'kill $ngx_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
url="http://127.0.0.1:$port/img.tar.zst"
bytes=$(stat -c %s www/img.tar.zst)
sha=$(sha256sum www/img.tar.zst | cut -d' ' -f1)
# dl_secs: the download time diskkit reports ("downloaded ... in S s") in out.txt.
dl_secs() { sed -n 's/.*downloaded .* in \([0-9.]*\) s.*/\1/p' out.txt; }
for ((r = 1; r <= runs; r++)); do
    rm -f got.tar.zst && rm -rf cache x
    read -r s k < <(rt curl -s -o got.tar.zst "$url")
    add fetch_curl "$s" "$k"
    mkdir x
    read -r s k < <(rt sh -c "curl -s '$url' | tee got.tar.zst | zstd -dc | tar -xS -C x -f -")
    add fetch_pipe "$s" "$k"
    rm -rf x got.tar.zst
    read -r s k < <(rt "$dk" cache --dir cache fetch img "$url")
    add fetch_dk "$s" "$k"
    add fetch_dk_dl "$(dl_secs)" 0
    rm -rf cache
    read -r s k < <(rt "$dk" cache --dir cache fetch --no-sync --sha256 "$sha" img "$url")
    add fetch_dk_nosync "$s" "$k"
    add fetch_dk_nosync_dl "$(dl_secs)" 0
    rm -rf cache
done

med() { printf '%s' "${T[$1]}" | median; }
rss() { printf '%s' "${R[$1]}" | sort -g | tail -1; }
ratio() { echo "scale=3; $1 / $2" | bc -l; }
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); every run (seconds):"
for k in create_dk create_peer extract_dk extract_peer fetch_dk fetch_dk_dl fetch_curl fetch_pipe; do
    echo "  $k: $(printf '%s' "${T[$k]}" | tr '\n' ' ')"
done
echo "bundle: $(stat -c %s dk.tar.zst) bytes (diskkit), $bytes bytes (tar | zstd -T0 -3); medians of $runs runs"
printf '%-44s %10s %10s %8s %14s\n' "operation" "diskkit s" "peer s" "ratio" "peak RSS MiB"
line() { printf '%-44s %10.3f %10.3f %8s %14s\n' "$1" "$(med "$2")" "$(med "$3")" "$4" "$(( $(rss "$2") / 1024 ))"; }
line "create vs tar -cS | zstd -T0 (time)" create_dk create_peer "$(ratio "$(med create_dk)" "$(med create_peer)")"
line "extract vs zstd -dc | tar -xS (time)" extract_dk extract_peer "$(ratio "$(med extract_dk)" "$(med extract_peer)")"
line "fetch+extract vs curl | tee | zstd -dc | tar -xS" fetch_dk fetch_pipe "$(ratio "$(med fetch_pipe)" "$(med fetch_dk)")"
line "  fetch's download phase vs curl -o (thrpt)" fetch_dk_dl fetch_curl "$(ratio "$(med fetch_curl)" "$(med fetch_dk_dl)")"
line "  fetch+extract vs curl -o (throughput)" fetch_dk fetch_curl "$(ratio "$(med fetch_curl)" "$(med fetch_dk)")"
line "fetch --no-sync --sha256 vs the same pipe" fetch_dk_nosync fetch_pipe "$(ratio "$(med fetch_pipe)" "$(med fetch_dk_nosync)")"
line "  its download phase vs curl -o (thrpt)" fetch_dk_nosync_dl fetch_curl "$(ratio "$(med fetch_curl)" "$(med fetch_dk_nosync_dl)")"
echo "peer peak RSS MiB: tar|zstd create $(( $(rss create_peer) / 1024 )) (sh only), curl $(( $(rss fetch_curl) / 1024 ))"
