#!/usr/bin/env bash
# Remote bases against their peers through the command line, on the same image from the same
# localhost nginx, peers taking turns within each run:
#   cold:   first full read through a diskkit cache layer (diskkit layer create --type cache,
#           diskkit serve, nbdcopy to null:) vs nbdkit curl + --filter=cache
#           cache-on-read=true (same nbdcopy)                                    goal >= 1.0x
#           and vs curl -o /dev/null (throughput)
#   warm:   second full read (cache filled, new server) vs the same image as a local ASIF
#           file, both through diskkit serve + nbdcopy                           goal >= 0.9x
#   random: N random 4 KiB reads on a cold cache (python3-libnbd, one connection, one
#           request at a time): HTTP requests and bytes per read (nginx's access log) and
#           median/p99 latency, diskkit vs nbdkit
# Each figure is the median of RUNS runs (a fresh cache each run); `uptime` is printed before
# and after.
#
# Usage: scripts/bench-remote.sh [SIZE_MIB (2048)] [RANDOM_READS (2000)] [RUNS (3)] [SCRATCH]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/bench-lib.sh"
size_mib=${1:-2048}
nrand=${2:-2000}
runs=${3:-3}
(cd "$here/.." && cargo build --release -q -p diskkit-cli)
dk="${CARGO_TARGET_DIR:-$here/../target}/release/diskkit"
scratch_dir "${4:-}" diskkit-bench-remote
echo "load before: $(uptime)"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

echo "building a ${size_mib} MiB image (incompressible data in 60% of it, holes elsewhere)..." >&2
mkdir -p www nginx/{client,proxy,fastcgi,uwsgi,scgi}
truncate -s "${size_mib}M" www/base.img
for ((i = 0; i < size_mib / 16; i++)); do
    if ((i % 5 < 3)); then
        head -c 16M /dev/urandom | dd of=www/base.img bs=16M seek="$i" conv=notrunc status=none
    fi
done
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > nginx/nginx.conf <<EOF
daemon off; master_process off; worker_processes 1; pid $work/nginx/pid; error_log $work/nginx/error.log;
events { worker_connections 256; }
http { access_log $work/nginx/access.log; sendfile on; keepalive_requests 100000;
  client_body_temp_path $work/nginx/client; proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi; uwsgi_temp_path $work/nginx/uwsgi; scgi_temp_path $work/nginx/scgi;
  server { listen 127.0.0.1:$port; root $work/www; location / { } } }
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
sleep 0.5
url="http://127.0.0.1:$port/base.img"
allow=(--allow-remote "127.0.0.1:$port")
# GET requests for the image so far, and the body bytes sent for them.
requests() { grep -c '"GET /base.img' nginx/access.log || true; }
sent() { awk '/"GET \/base.img/ {s += $10} END {printf "%.0f\n", s}' nginx/access.log; }
mbps() { echo "scale=1; $size_mib / $1" | bc -l; }
ratio() { echo "scale=2; $1 / $2" | bc -l; }

# serve IMAGE SOCKET: diskkit serve IMAGE read-only in the background until stop_last.
serve() {
    rm -f "$2"
    "$dk" serve -q --foreground --read-only --socket "$2" "${allow[@]}" "$1" &
    pids+=($!)
    while [ ! -S "$2" ]; do sleep 0.05; done
}
# nbdkit_serve SOCKET: nbdkit's curl plugin with its cache filter, a fresh cache.
nbdkit_serve() {
    rm -f "$1"
    nbdkit -r -f -U "$1" --filter=cache curl "$url" cache-on-read=true &
    pids+=($!)
    while [ ! -S "$1" ]; do sleep 0.05; done
}
# stop_last: stop the server started last (SIGTERM: diskkit flushes the cache layer).
stop_last() {
    kill "${pids[-1]}"
    wait "${pids[-1]}" 2>/dev/null || true
    unset 'pids[-1]'
}

"$dk" convert -q -O asif www/base.img local.asif
# python3-libnbd is the system interpreter's module.
cat > rand.py <<'EOF'
import random, sys, time
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
rng = random.Random(7)
lat = []
for _ in range(int(sys.argv[2])):
    off = rng.randrange(0, size // 4096) * 4096
    s = time.perf_counter()
    h.pread(4096, off)
    lat.append(time.perf_counter() - s)
lat.sort()
print(f"{lat[len(lat) // 2] * 1e3:.3f} {lat[int(len(lat) * 0.99)] * 1e3:.3f}")
EOF

declare -a T_CURL T_NBDKIT T_COLD T_WARM T_LOCAL WARM_GETS NK_MED NK_P99 NK_REQ NK_KIB DK_MED DK_P99 DK_REQ DK_KIB
for ((r = 1; r <= runs; r++)); do
    echo "run $r/$runs: curl -o /dev/null" >&2
    T_CURL+=("$(t curl -s -o /dev/null "$url")")

    echo "run $r/$runs: nbdkit curl + cache filter, first read" >&2
    nbdkit_serve "$work/nbdkit.sock"
    T_NBDKIT+=("$(t nbdcopy "nbd+unix:///?socket=$work/nbdkit.sock" null:)")
    stop_last

    echo "run $r/$runs: diskkit cache layer, first read" >&2
    rm -f cache.asif
    "$dk" layer create -q --type cache --parent "$url" "${allow[@]}" cache.asif
    serve cache.asif "$work/dk.sock"
    T_COLD+=("$(t nbdcopy "nbd+unix:///?socket=$work/dk.sock" null:)")
    stop_last

    echo "run $r/$runs: diskkit cache layer, second read" >&2
    before=$(requests)
    serve cache.asif "$work/dk.sock"
    T_WARM+=("$(t nbdcopy "nbd+unix:///?socket=$work/dk.sock" null:)")
    stop_last
    WARM_GETS+=($(($(requests) - before)))

    echo "run $r/$runs: local ASIF" >&2
    serve local.asif "$work/local.sock"
    T_LOCAL+=("$(t nbdcopy "nbd+unix:///?socket=$work/local.sock" null:)")
    stop_last

    echo "run $r/$runs: random 4 KiB reads, cold: nbdkit" >&2
    nbdkit_serve "$work/nbdkit.sock"
    before=$(requests) bytes=$(sent)
    read -r med p99 < <(/usr/bin/python3 rand.py "nbd+unix:///?socket=$work/nbdkit.sock" "$nrand")
    NK_MED+=("$med") NK_P99+=("$p99")
    NK_REQ+=($(($(requests) - before))) NK_KIB+=($((($(sent) - bytes) / nrand / 1024)))
    stop_last

    echo "run $r/$runs: random 4 KiB reads, cold: diskkit" >&2
    rm -f cache.asif
    "$dk" layer create -q --type cache --parent "$url" "${allow[@]}" cache.asif
    serve cache.asif "$work/dk.sock"
    before=$(requests) bytes=$(sent)
    read -r med p99 < <(/usr/bin/python3 rand.py "nbd+unix:///?socket=$work/dk.sock" "$nrand")
    DK_MED+=("$med") DK_P99+=("$p99")
    DK_REQ+=($(($(requests) - before))) DK_KIB+=($((($(sent) - bytes) / nrand / 1024)))
    stop_last
done

m() { printf '%s\n' "$@" | median; }
t_curl=$(m "${T_CURL[@]}") t_nbdkit=$(m "${T_NBDKIT[@]}") t_cold=$(m "${T_COLD[@]}")
t_warm=$(m "${T_WARM[@]}") t_local=$(m "${T_LOCAL[@]}")
echo
echo "image: $size_mib MiB from localhost nginx; medians of $runs runs"
echo "  cold diskkit:  ${T_COLD[*]} s;  nbdkit: ${T_NBDKIT[*]} s;  curl: ${T_CURL[*]} s"
echo "  warm diskkit:  ${T_WARM[*]} s;  local ASIF: ${T_LOCAL[*]} s"
printf 'first read   diskkit %6.2f s (%s MiB/s)   nbdkit curl+cache %6.2f s (%s MiB/s)   curl -o %6.2f s (%s MiB/s)\n' \
    "$t_cold" "$(mbps "$t_cold")" "$t_nbdkit" "$(mbps "$t_nbdkit")" "$t_curl" "$(mbps "$t_curl")"
echo "  throughput vs nbdkit: $(ratio "$t_nbdkit" "$t_cold")x (goal >= 1.0)   vs curl: $(ratio "$t_curl" "$t_cold")x"
printf 'second read  diskkit %6.2f s (%s MiB/s, GETs: %s)   local ASIF %6.2f s (%s MiB/s)\n' \
    "$t_warm" "$(mbps "$t_warm")" "${WARM_GETS[*]}" "$t_local" "$(mbps "$t_local")"
echo "  throughput vs local ASIF: $(ratio "$t_local" "$t_warm")x (goal >= 0.9)"
echo "random 4 KiB reads ($nrand, cold cache, 1 connection, 1 request at a time; median of runs):"
echo "  diskkit: $(ratio "$(m "${DK_REQ[@]}")" "$nrand") requests/read, $(m "${DK_KIB[@]}") KiB/read, median $(m "${DK_MED[@]}") ms, p99 $(m "${DK_P99[@]}") ms  (medians per run: ${DK_MED[*]})"
echo "  nbdkit:  $(ratio "$(m "${NK_REQ[@]}")" "$nrand") requests/read, $(m "${NK_KIB[@]}") KiB/read, median $(m "${NK_MED[@]}") ms, p99 $(m "${NK_P99[@]}") ms  (medians per run: ${NK_MED[*]})"
echo "load after: $(uptime)"
