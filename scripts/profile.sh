#!/usr/bin/env bash
# `make profile`: where the plugin spends its time per message.
# Runs one bench phase with the plugin under callgrind (instruction counts: repeatable on a noisy
# machine) or perf (PROFILER=perf: sampled time including the kernel), then prints a summary.
# PROFILE_PHASE=publish (default): 10k ExecuteStep publishes at BENCH_INFLIGHT (default 64).
# PROFILE_PHASE=trigger: the 10k-message burst through trigger max_in_flight 64 (under callgrind
# the phase's 15 s cap cuts it short; counts are per message received).
# Needs valgrind (callgrind) or linux-perf; the profiling build keeps symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
profiler=${PROFILER:-callgrind}
inflight=${BENCH_INFLIGHT:-64}
phase=${PROFILE_PHASE:-publish}
case $phase in publish | trigger) ;; *) echo "PROFILE_PHASE must be publish or trigger"; exit 1 ;; esac
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
BENCH_ONLY=$phase BENCH_INFLIGHT=$inflight BENCH_CALLGRIND=$([ "$profiler" = callgrind ] && echo 1 || true) \
	EVENTBUS_PLUGIN_BIN=$wrapper target/release/examples/bench | grep -v '^#' | tee "$out/bench.txt"
case $profiler in
callgrind)
	if [ "$phase" = publish ]; then
		dump=publish_c$inflight n=10000
	else
		dump=trigger_mif64_burst
		n=$(awk '$1 == "trigger_mif64_burst_received" {print $2}' "$out/bench.txt")
		n=${n:-10000}
	fi
	f=$(grep -l "^desc: Trigger: dump $dump\$" "$out"/callgrind.out.* | head -1)
	total=$(callgrind_annotate --auto=no "$f" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
	echo "plugin_instructions_per_${phase}_message $((total / n)) instr"
	echo "# top functions (self cost) over the measured loop; full profile: callgrind_annotate $f"
	callgrind_annotate --auto=no --threshold=100 "$f" | awk 'p && NF && !/\(100.0%\)/ {print} /file:function/ {p=1; getline}' | head -25 | cut -c1-160
	;;
perf)
	echo "# perf report --no-children -i $out/perf.data (the whole run, setup included)"
	perf report --no-children --sort dso -i "$out/perf.data" --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -12
	;;
esac
