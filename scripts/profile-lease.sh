#!/usr/bin/env bash
# Profiles the whole machine (perf record -a) while the lease benchmark's 64-client NATS round-trip cell runs at 1,000
# proxies, and prints the CPU share per process and the top symbols. Needs a release build of proxypool-bench and
# perf (Debian: linux-perf); run from the repository root. Used for docs/benchmarks.md, "Where the time goes".
set -euo pipefail
bench=${CARGO_TARGET_DIR:-target}/release/proxypool-bench
out=${TMPDIR:-/tmp}/proxypool-profile
mkdir -p "$out"
"$bench" --sizes 1000 --concurrency 64 --secs 10 > "$out/bench.md" 2> "$out/bench.err" &
pid=$!
# The cell after the sorted find_one_and_update baseline is the NATS round trip: profile 7 s of its 10.
until grep -q "sorted find_one_and_update" "$out/bench.err" 2>/dev/null; do
  sleep 0.2
  kill -0 $pid 2>/dev/null || { echo "the benchmark ended early: see $out/bench.err" >&2; exit 1; }
done
sleep 1
perf record -a -g -F 499 -o "$out/perf.data" -- sleep 7 2> "$out/perf-record.err"
wait $pid
perf report -i "$out/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null | grep "%" | head -8
perf report -i "$out/perf.data" --no-children --sort comm,dso,sym --stdio -g none 2>/dev/null | grep "%" | head -40
