#!/usr/bin/env bash
# Remote bases against their peers, on the same image from the same localhost nginx, in one run:
#   cold:   first full read through a diskkit cache layer (diskkit serve + nbdcopy to null:)
#           vs nbdkit curl + --filter=cache cache-on-read=true (same nbdcopy)     goal >= 1.0x
#           and vs curl -o /dev/null (throughput)
#   warm:   second full read (cache filled) vs the same image as a local ASIF file,
#           both through diskkit serve + nbdcopy                                  goal >= 0.9x
#   random: N random 4 KiB reads on a cold cache (python3-libnbd, one connection):
#           HTTP requests per read (nginx's access log) and median/p99 latency, diskkit vs nbdkit
#
# Usage: scripts/bench-remote.sh [SIZE_MIB (2048)] [RANDOM_READS (2000)] [SCRATCH]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/bench-lib.sh"
size_mib=${1:-2048}
nrand=${2:-2000}
(cd "$here/.." && cargo build --release -q -p diskkit-cli &&
    cargo build --release -q -p diskkit-deliver --example remote_serve)
dk="$here/../target/release/diskkit"
# Without the CLI's remote options (a build before they were added), the library's own server
# (examples/remote_serve.rs: the same stack and NBD server as `diskkit serve`) is used.
if "$dk" layer create --help 2>/dev/null | grep -q -- --allow-remote; then cli=1; else cli=0; fi
example="$here/../target/release/examples/remote_serve"
scratch_dir "${3:-}" diskkit-bench-remote

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
requests() { grep -c '"GET /base.img' nginx/access.log || true; }
mbps() { echo "scale=1; $size_mib / $1" | bc -l; }

# make_cache PATH: a cache layer over $url.
make_cache() {
    if ((cli)); then
        "$dk" layer create -q --type cache --parent "$url" "${allow[@]}" "$1"
    else
        # The example makes it when given the URL; it serves until its input ends.
        "$example" "$work/make.sock" "$1" "$url" </dev/null
    fi
}
# serve IMAGE SOCKET: serve IMAGE read-only in the background until stop_last.
serve() {
    local img=$1 sock=$2
    if ((cli)); then
        "$dk" serve -q --foreground --read-only --socket "$sock" "${allow[@]}" "$img" &
        pids+=($!)
    else
        mkfifo "$sock.ctl"
        "$example" "$sock" "$img" <"$sock.ctl" &
        pids+=($!)
        exec 7>"$sock.ctl"
    fi
    while [ ! -S "$sock" ]; do sleep 0.05; done
}
# stop_last: stop the server started last (in order: the cache layer is flushed).
stop_last() {
    if ((cli)) || [ "${1:-}" = nbdkit ]; then
        kill "${pids[-1]}"
    else
        exec 7>&-
    fi
    wait "${pids[-1]}" 2>/dev/null || true
    unset 'pids[-1]'
}

echo "curl -o /dev/null" >&2
t_curl=$(t curl -s -o /dev/null "$url")

echo "nbdkit curl + cache filter, first read" >&2
nbdkit -r -f -U "$work/nbdkit.sock" --filter=cache curl "$url" cache-on-read=true &
pids+=($!)
while [ ! -S "$work/nbdkit.sock" ]; do sleep 0.05; done
t_nbdkit=$(t nbdcopy "nbd+unix:///?socket=$work/nbdkit.sock" null:)
stop_last nbdkit

echo "diskkit cache layer, first read" >&2
make_cache cache.asif
serve cache.asif "$work/dk.sock"
t_cold=$(t nbdcopy "nbd+unix:///?socket=$work/dk.sock" null:)
stop_last
echo "diskkit cache layer, second read" >&2
before=$(requests)
serve cache.asif "$work/dk2.sock"
t_warm=$(t nbdcopy "nbd+unix:///?socket=$work/dk2.sock" null:)
stop_last
warm_gets=$(($(requests) - before))

echo "local ASIF" >&2
"$dk" convert -O asif www/base.img local.asif >/dev/null
serve local.asif "$work/local.sock"
t_local=$(t nbdcopy "nbd+unix:///?socket=$work/local.sock" null:)
stop_last

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
echo "random 4 KiB reads, cold: nbdkit" >&2
nbdkit -r -f -U "$work/nbdkit2.sock" --filter=cache curl "$url" cache-on-read=true &
pids+=($!)
while [ ! -S "$work/nbdkit2.sock" ]; do sleep 0.05; done
before=$(requests)
read -r nk_med nk_p99 < <(/usr/bin/python3 rand.py "nbd+unix:///?socket=$work/nbdkit2.sock" "$nrand")
nk_req=$(($(requests) - before))
stop_last nbdkit
echo "random 4 KiB reads, cold: diskkit" >&2
make_cache cache2.asif
serve cache2.asif "$work/dk3.sock"
before=$(requests)
read -r dk_med dk_p99 < <(/usr/bin/python3 rand.py "nbd+unix:///?socket=$work/dk3.sock" "$nrand")
dk_req=$(($(requests) - before))
stop_last

ratio() { echo "scale=2; $1 / $2" | bc -l; }
echo
echo "image: $size_mib MiB from localhost nginx"
printf 'first read   diskkit %6.2f s (%s MiB/s)   nbdkit curl+cache %6.2f s (%s MiB/s)   curl -o %6.2f s (%s MiB/s)\n' \
    "$t_cold" "$(mbps "$t_cold")" "$t_nbdkit" "$(mbps "$t_nbdkit")" "$t_curl" "$(mbps "$t_curl")"
echo "  throughput vs nbdkit: $(ratio "$t_nbdkit" "$t_cold")x (goal >= 1.0)   vs curl: $(ratio "$t_curl" "$t_cold")x"
printf 'second read  diskkit %6.2f s (%s MiB/s, %s GETs)   local ASIF %6.2f s (%s MiB/s)\n' \
    "$t_warm" "$(mbps "$t_warm")" "$warm_gets" "$t_local" "$(mbps "$t_local")"
echo "  throughput vs local ASIF: $(ratio "$t_local" "$t_warm")x (goal >= 0.9)"
echo "random 4 KiB reads ($nrand, cold cache, 1 connection):"
echo "  diskkit: $(ratio "$dk_req" "$nrand") requests/read, median ${dk_med} ms, p99 ${dk_p99} ms"
echo "  nbdkit:  $(ratio "$nk_req" "$nrand") requests/read, median ${nk_med} ms, p99 ${nk_p99} ms"
