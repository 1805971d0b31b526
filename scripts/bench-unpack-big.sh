#!/usr/bin/env bash
# The 3-4 GiB one-layer case of scripts/bench-unpack.sh: /usr/lib of this machine without
# jvm/ (3.3 GiB, ~73k entries on the Debian 12 VM it was written on). Scratch on tmpfs needs
# ~8 GiB of free memory at its peak (the tar and the image).
# Usage: scripts/bench-unpack-big.sh [RUNS (default 3)] [SCRATCH_DIR (default /dev/shm/bu-big)]
set -euo pipefail
EXCLUDE=${EXCLUDE-./jvm} exec "$(dirname "$0")/bench-unpack.sh" /usr/lib "${1:-3}" "${2:-/dev/shm/bu-big}"
