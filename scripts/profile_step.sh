#!/usr/bin/env bash
# Where the time of a CPU training step goes, by category (GEMM, scan, conv, attention, ...).
#
#   scripts/profile_step.sh [ZAMBA_TRAIN_BIN] [SECONDS]
#
# Starts `zamba-train bench model` (zamba-bench preset, batch 4 x seq 512), waits until its peak
# measurement is printed (so the profile holds training steps only), then samples it with
# `perf record -e cpu-clock` (software clock: works in VMs without hardware counters) for SECONDS
# and prints the share of samples per category (scripts/perf_categories.py). Needs Debian's
# linux-perf (`apt-get install linux-perf`).
set -euo pipefail
bin=${1:-target/debug/zamba-train}
seconds=${2:-20}
out=$(mktemp -d)
extra=()
"$bin" bench model --help | grep -q -- --no-torch && extra=(--no-torch)
"$bin" bench model --steps 100 "${extra[@]}" >"$out/bench.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
until grep -qs "memory bandwidth" "$out/bench.log"; do
    kill -0 $pid 2>/dev/null || { cat "$out/bench.log"; exit 1; }
    sleep 0.2
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
perf record -q -e cpu-clock -F 997 -g -p "$pid" -o "$out/perf.data" -- sleep "$seconds" 2>/dev/null
perf report -i "$out/perf.data" --no-children --sort symbol --stdio -g none --percent-limit 0 \
    >"$out/report.txt" 2>/dev/null
echo "perf report: $out/report.txt" >&2
# Samples per thread: the lowest thread id is the main thread, whose work no other thread shares
# (rayon's workers idle meanwhile); cores busy = all samples / (seconds x sampling rate).
perf report -i "$out/perf.data" --stdio --sort pid -n -g none 2>/dev/null \
    | awk -v s="$seconds" '/^ +[0-9.]+%/ { print "  thread " $4 ": " $1 " of samples" > "/dev/stderr"; n += $3 }
        END { printf "  cores busy: %.2f\n", n / (s * 997) > "/dev/stderr" }'
python3 "$(dirname "$0")/perf_categories.py" <"$out/report.txt"
