#!/usr/bin/env bash
# Benchmark `diskkit boot` against the floor: the same QEMU command line run by hand.
#
#   scripts/bench-boot.sh [RUNS] [LAYOUT] [SCRATCH]
#
# LAYOUT is an OCI layout of a bootable image (default: the boot tests' Debian bookworm
# fixture, target/test-cache/boot-fixture/layout; `cargo test -p diskkit-cli --test boot`
# builds it). Every run boots the image and runs `cat /etc/os-release` in the guest:
#
#   floor  QEMU started by hand with the arguments `diskkit boot --dry-run --output json`
#          prints, on the same kernel, initramfs and store entry, with a qcow2 overlay made
#          by `qemu-img create` (file-backed, as diskkit's), the guest channel's sockets
#          replaced by files; timed until the guest's exit status is in the status file,
#          then QEMU is killed (which is what diskkit does).
#   warm   `diskkit boot LAYOUT -- cat /etc/os-release`, store and kernel cache filled.
#   nbd    the same with the root served by diskkit's NBD server (--via nbd) instead of
#          QEMU opening the RAW store entry itself.
#   cold   the same with an empty store: unpack + kernel extraction + boot; `unpack` is
#          also timed alone (`diskkit unpack --store`), and the kernel extraction from -v.
#
# ACCEL=tcg (default) or ACCEL=kvm. Goal (issue 13): warm ≤ floor + max(5 %, 1 s); cold adds
# ≤ 3 s for unpack + kernel extraction.
set -euo pipefail
. "$(dirname "$0")/bench-lib.sh"
cd "$(dirname "$0")/.."
runs=${1:-3}
layout=$(realpath "${2:-target/test-cache/boot-fixture/layout}")
accel=${ACCEL:-tcg}
[ -f "$layout/index.json" ] || { echo "no OCI layout at $layout (run: cargo test -p diskkit-cli --test boot)" >&2; exit 1; }
cargo build --release -q -p diskkit-cli
D=${CARGO_TARGET_DIR:-$PWD/target}/release/diskkit
scratch_dir "${3:-}" diskkit-bench-boot
export XDG_RUNTIME_DIR=$work/run
mkdir -p "$XDG_RUNTIME_DIR"
chmod 700 "$XDG_RUNTIME_DIR"
store=$work/store
boot() { "$D" boot --accel "$accel" --store "$1" "${@:2}" "$layout" -- cat /etc/os-release; }

# The floor's command line, from diskkit itself.
"$D" boot --accel "$accel" --store "$store" --dry-run --output json "$layout" -- cat /etc/os-release > plan.json
qemu=$(jq -r .qemu plan.json)
rundir=$(jq -r .runtime_dir plan.json)
floor=$work/floor
mkdir -p "$floor"
jq -r --arg dir "$rundir" --arg new "$floor" '.args[] | gsub($dir; $new) | sub("^socket,(?<rest>.*)path=(?<p>.*)$"; "file,\(.rest)path=\(.p).out")' plan.json > floor.args
jq -r --arg dir "$rundir" --arg new "$floor" '.credentials[] | select(.[2] != null) | [(.[1] | gsub($dir; $new)), .[2]] | @base64' plan.json |
    while read -r c; do
        f=$(echo "$c" | base64 -d | jq -r '.[0]')
        echo "$c" | base64 -d | jq -j '.[1]' > "$f"
    done
base=$(jq -r '.root_layers[-1][0]' plan.json)
cat > floor.sh <<EOF
#!/usr/bin/env bash
set -e
cd "$floor"
rm -f overlay.qcow2 *.out
qemu-img create -q -f qcow2 -b "$base" -F raw overlay.qcow2
mapfile -t args < "$work/floor.args"
"$qemu" "\${args[@]}" </dev/null >/dev/null 2>qemu.err &
q=\$!
until grep -qs '^exit ' status.sock.out; do
    kill -0 \$q 2>/dev/null || { echo "QEMU ended early" >&2; cat qemu.err >&2; exit 1; }
    sleep 0.05
done
kill \$q; wait \$q || true
grep -q 'ID=debian' stdout.sock.out
EOF
chmod +x floor.sh

unpack_times=() cold=() warm=() nbd=() flo=() kernel=() over=()
for i in $(seq "$runs"); do
    rm -rf "$store.cold"
    s=$(date +%s.%N); "$D" unpack --store "$store.cold" "$layout" >/dev/null; e=$(date +%s.%N)
    unpack_times+=("$(echo "$e - $s" | bc -l)")
    rm -rf "$store.cold"
    s=$(date +%s.%N); boot "$store.cold" -v > cold.out 2> cold.err; e=$(date +%s.%N)
    grep -q ID=debian cold.out
    cold+=("$(echo "$e - $s" | bc -l)")
    kernel+=("$(sed -n 's/^diskkit: kernel .*(\([0-9.]*\)s, .*/\1/p' cold.err)")
    s=$(date +%s.%N); boot "$store.cold" -v > warm.out 2> warm.err; e=$(date +%s.%N)
    w=$(echo "$e - $s" | bc -l); warm+=("$w")
    # diskkit's own share: the wall time minus QEMU-start-to-exit-status (from -v).
    g=$(sed -n 's/^diskkit: command exited .* after \([0-9.]*\)s$/\1/p' warm.err)
    over+=("$(echo "$w - $g" | bc -l)")
    n=$(t boot "$store.cold" --via nbd); nbd+=("$n")
    f=$(t ./floor.sh); flo+=("$f")
    echo "run $i ($accel): floor ${f}s  warm ${w}s (diskkit's own ${over[-1]}s)  nbd ${n}s  cold ${cold[-1]}s  (unpack alone ${unpack_times[-1]}s, kernel extraction ${kernel[-1]}s)"
done
m() { printf '%s\n' "$@" | median; }
O=$(m "${over[@]}") F=$(m "${flo[@]}") W=$(m "${warm[@]}") N=$(m "${nbd[@]}") C=$(m "${cold[@]}") U=$(m "${unpack_times[@]}") K=$(m "${kernel[@]}")
echo "medians of $runs ($accel): diskkit's own time in a warm boot ${O}s (setup before QEMU starts + teardown after the status; the rest is the guest's)"
echo "medians of $runs ($accel): floor ${F}s, warm ${W}s ($(echo "$W / $F" | bc -l | cut -c1-5)x, +$(echo "$W - $F" | bc -l | cut -c1-5)s), via NBD ${N}s ($(echo "$N / $F" | bc -l | cut -c1-5)x), cold ${C}s (+$(echo "$C - $W" | bc -l | cut -c1-5)s over warm; unpack alone ${U}s, kernel extraction ${K}s)"
