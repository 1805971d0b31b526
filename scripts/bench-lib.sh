# Helpers shared by the scripts/bench-*.sh benchmarks (sourced, not run).
# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# t COMMAND...: run COMMAND quietly and print its wall time in seconds.
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
# scratch_dir [DIR] [NAME]: cd into DIR (created if missing), or into a new
# /var/tmp/NAME.XXXXXX (NAME defaults to diskkit-bench); either is removed when the script exits.
scratch_dir() {
    work=${1:-$(mktemp -d "/var/tmp/${2:-diskkit-bench}.XXXXXX")}
    mkdir -p "$work"
    trap 'rm -rf "$work"' EXIT
    cd "$work"
}
