#!/usr/bin/env bash
# `make profile`: where the plugin spends its time per published message.
# Runs the bench's publish phase (10k ExecuteStep publishes at BENCH_INFLIGHT, default 64) with
# the plugin under callgrind (instruction counts: repeatable on a noisy machine) or perf
# (PROFILER=perf: sampled time including the kernel), then prints the summary.
# Needs valgrind (callgrind) or linux-perf; the profiling build keeps symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
profiler=${PROFILER:-callgrind}
inflight=${BENCH_INFLIGHT:-64}
out=${PROFILE_DIR:-target/profile}
plugin=$PWD/target/profiling/workflow-plugin-eventbus
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/callgrind.out.* "$out"/perf.data
wrapper=$out/plugin.sh
case $profiler in
callgrind)
	command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)"; exit 1; }
	printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/callgrind.out.%%p %s "$@"\n' "$out" "$plugin" >"$wrapper"
	;;
perf)
	command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)"; exit 1; }
	printf '#!/bin/sh\nexec perf record -q -F 4999 -g -o %s/perf.data %s "$@"\n' "$out" "$plugin" >"$wrapper"
	;;
*) echo "PROFILER must be callgrind or perf"; exit 1 ;;
esac
chmod +x "$wrapper"
BENCH_ONLY=publish BENCH_INFLIGHT=$inflight BENCH_CALLGRIND=$([ "$profiler" = callgrind ] && echo 1 || true) \
	EVENTBUS_PLUGIN_BIN=$wrapper target/release/examples/bench | grep -v '^#'
case $profiler in
callgrind)
	f=$(ls "$out"/callgrind.out.*.1)
	total=$(callgrind_annotate --auto=no "$f" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
	echo "plugin_instructions_per_publish $((total / 10000)) instr"
	echo "# top functions (self cost) over the measured loop; full profile: callgrind_annotate $f"
	callgrind_annotate --auto=no --threshold=100 "$f" | awk 'p && NF && !/\(100.0%\)/ {print} /file:function/ {p=1; getline}' | head -25 | cut -c1-160
	;;
perf)
	echo "# perf report --no-children -i $out/perf.data (the whole run, setup included)"
	perf report --no-children --sort dso -i "$out/perf.data" --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -12
	;;
esac
