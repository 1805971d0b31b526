# Helpers for the scripts/bench-unpack*.sh benchmarks (sourced, not run).
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

# setup_bench [SCRATCH]: build diskkit and the arcbox-ext4 peer (release), make and enter the
# scratch directory (removed at exit). Sets root, dk_bin, ab_bin, mkoci, work.
setup_bench() {
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    (cd "$root" && cargo build --release --locked --bin diskkit -q)
    (cd "$root/scripts/bench-arcbox" && cargo build --release --locked -q)
    dk_bin=${CARGO_TARGET_DIR:-$root/target}/release/diskkit
    ab_bin=${CARGO_TARGET_DIR:-$root/scripts/bench-arcbox/target}/release/bench-arcbox
    mkoci=${MKOCI:-$root/crates/diskkit-oci/tests/fixtures/mkoci-layout.sh}
    work=${1:-$(mktemp -d /var/tmp/diskkit-unpack-bench.XXXXXX)}
    mkdir -p "$work"
    trap 'cd /; rm -rf "$work"' EXIT
    cd "$work"
}

# med COMMAND...: the median wall time of `runs` runs.
med() { local i; for i in $(seq "$runs"); do t "$@"; done | median; }
# medp PREP COMMAND...: like med, with the shell snippet PREP run (untimed) before each run:
# removing the previous output there keeps the cost of freeing its pages out of the timing.
medp() {
    local i prep=$1
    shift
    for i in $(seq "$runs"); do bash -c "$prep"; t "$@"; done | median
}

# rss COMMAND...: peak resident set size in KiB of one run.
rss() { /usr/bin/time -f %M -o rss.txt "$@" >/dev/null 2>&1; cat rss.txt; rm -f rss.txt; }

# mklayout OUT BLOB...: an OCI layout OUT (tag `bench`) whose layers are the BLOBs, which are
# then replaced by hard links to the layout's copies (one copy in memory on tmpfs).
mklayout() {
    local out=$1 b
    shift
    bash "$mkoci" "$out" bench "$@" >/dev/null
    for b in "$@"; do
        ln -f "$out/blobs/sha256/$(sha256sum "$b" | cut -d' ' -f1)" "$b"
    done
}

# need_memory BYTES: stop unless the scratch directory is on disk or memory has BYTES + 1 GiB.
need_memory() {
    [ "$(stat -f -c %T .)" = tmpfs ] || return 0
    local avail
    avail=$(($(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024))
    if [ "$avail" -lt $(($1 + (1 << 30))) ]; then
        echo "not enough memory for a tmpfs scratch: need $(gib "$1") GiB + 1, have $(gib "$avail") GiB" >&2
        exit 1
    fi
}

# check_fsck IMAGE WHAT: e2fsck -fn must pass.
check_fsck() {
    e2fsck -fn "$1" >/dev/null 2>&1 || { echo "e2fsck failed on $2 output" >&2; exit 1; }
}

gib() { printf '%.2f' "$(echo "$1 / 1073741824" | bc -l)"; }
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
sum() { echo "$1 + $2" | bc -l; }

# row NAME SECONDS [LABEL RATIO]...: a Markdown table row.
row() {
    local name=$1 s=$2 r=""
    shift 2
    while [ $# -ge 2 ]; do r+="$1 **$2**, "; shift 2; done
    printf '| %s | %.2f | %s |\n' "$name" "$s" "${r%, }"
}
