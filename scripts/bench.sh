#!/usr/bin/env bash
# End-to-end benchmark on a real broker (Tansu, sqlite storage, loopback). N seeded messages
# are produced first; then, on the same broker and data:
#   1. the transport floor: a bare rdkafka consumer reads all N and does nothing else
#      (crates/cli/examples/transport_floor.rs);
#   2. `npsflow run` (release build, default configuration, every role) consumes them from
#      the earliest offset until every message has its outcome, the aggregator has applied
#      every accepted response and every detractor alert has opened its case.
# For each: events per CPU-second (user+sys of the process), wall events/s, max RSS; then the
# ratio. A benchmark, not a test: it asserts nothing about speed.
#   scripts/bench.sh [N]                       # default 200000
#   NPSFLOW_BENCH_BIN=path scripts/bench.sh    # measure another build of npsflow
#   NPSFLOW_BENCH_PERF=file scripts/bench.sh   # and record a CPU profile of the run (perf)
#   NPSFLOW_BENCH_BROKER=noida scripts/bench.sh # on noida-db instead of Tansu: a broker fast
#                                               # enough that npsflow, not the broker, is the limit
set -euo pipefail
cd "$(dirname "$0")/.."
count="${1:-200000}"
port="${NPSFLOW_BENCH_PORT:-19392}"
http_port="${NPSFLOW_BENCH_HTTP_PORT:-19466}"
work=".tmp/bench-$$"
mkdir -p "$work"
run_pid=""
source scripts/bench-broker.sh
cleanup() {
  [ -n "$run_pid" ] && kill "$run_pid" 2>/dev/null || true
  "scripts/$broker.sh" stop "$port"
  rm -rf "$work"
}
trap cleanup EXIT

cargo build -j2 --release -p npsflow --bins --example transport_floor
floor=target/release/examples/transport_floor
bin="${NPSFLOW_BENCH_BIN:-target/release/npsflow}"
start_bench_broker "$port" "$work"
export NPSFLOW__KAFKA__BROKERS="127.0.0.1:$port"
export NPSFLOW__HTTP__LISTEN="127.0.0.1:$http_port"
export NPSFLOW__LOG__FORMAT=json
seed_bench_input "$bin" "$count"

# Prints "wall_ns cpu_ticks rss_kib minor_faults" of a running process.
measure() { # pid start_ns
  local end_ns utime stime rss faults
  end_ns=$(date +%s%N)
  read -r faults utime stime < <(awk '{print $10, $14, $15}' "/proc/$1/stat")
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$1/status")
  echo "$((end_ns - $2)) $((utime + stime)) $rss $faults"
}

echo "== transport floor: a bare consumer reads all $count"
start_ns=$(date +%s%N)
# It prints its own CPU ticks and peak RSS just before it exits.
read -r floor_ticks floor_rss < <("$floor" "127.0.0.1:$port" survey.responses "$count")
floor_figures="$(($(date +%s%N) - start_ns)) $floor_ticks $floor_rss"

metric() { awk -v name="$1" '$1 ~ "^"name {s += $2} END {printf "%d", s}' "$work/metrics.txt"; }
echo "== npsflow run until all $count are decided and applied"
start_ns=$(date +%s%N)
"$bin" run >"$work/run.log" 2>&1 &
run_pid=$!
perf_pid=""
if [ -n "${NPSFLOW_BENCH_PERF:-}" ]; then
  # A CPU profile of the run (perf's software clock: works without hardware counters).
  perf record -F ${NPSFLOW_BENCH_PERF_HZ:-999} ${NPSFLOW_BENCH_PERF_CALLS:--g} -p "$run_pid" -o "$NPSFLOW_BENCH_PERF" >/dev/null 2>&1 &
  perf_pid=$!
fi
while :; do
  curl -sf "http://127.0.0.1:$http_port/metrics" >"$work/metrics.txt" 2>/dev/null || true
  total=$(metric 'npsflow_events_total')
  accepted=$(metric 'npsflow_events_total\{outcome="accepted"\}')
  applied=$(metric 'npsflow_delta_responses_total\{result="applied"\}')
  alerts=$(metric 'npsflow_alerts_total')
  opened=$(metric 'npsflow_cases_opened_total')
  # Every accepted response counts in segment `all` and at least one more delta; every
  # detractor alert has opened its case.
  if [ "$total" -ge "$count" ] && [ "$applied" -ge "$accepted" ] && [ "$accepted" -gt 0 ] &&
    [ "$opened" -ge "$alerts" ]; then
    break
  fi
  kill -0 "$run_pid" 2>/dev/null || { echo "npsflow exited" >&2; tail "$work/run.log" >&2; exit 1; }
  # Each scrape renders every segment gauge, which costs the process CPU: poll about as
  # often as a Prometheus would scrape a busy target, not ten times a second.
  sleep 1
done
run_figures=$(measure "$run_pid" "$start_ns")
if [ -n "$perf_pid" ]; then kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" || true; fi
# Batches per role (each batch is one commit point): events per batch is what the per-batch
# costs (snapshots, case records, deltas) are spread over.
awk '/^npsflow_batch_seconds_count/ { sub(/.*role="/, "", $1); sub(/".*/, "", $1); printf "batches %s: %d\n", $1, $2 }' "$work/metrics.txt"
kill -INT "$run_pid"
wait "$run_pid" || true
run_pid=""

python3 - "$count" "$(getconf CLK_TCK)" "$floor_figures" "$run_figures" <<'EOF'
import sys
count, ticks = int(sys.argv[1]), int(sys.argv[2])
rows = []
for name, figures in (("transport floor", sys.argv[3]), ("npsflow run", sys.argv[4])):
    wall_ns, cpu_ticks, rss_kib = (int(x) for x in figures.split()[:3])
    # At least one tick: a short run of the floor can finish within one.
    wall, cpu = wall_ns / 1e9, max(cpu_ticks, 1) / ticks
    rows.append((name, count / cpu, count / wall, rss_kib / 1024, wall, cpu))
print(f"{'':18}{'events/cpu-s':>14}{'wall events/s':>15}{'max rss MiB':>13}{'wall s':>9}{'cpu s':>8}")
for name, per_cpu, per_wall, rss, wall, cpu in rows:
    print(f"{name:18}{per_cpu:>14,.0f}{per_wall:>15,.0f}{rss:>13,.0f}{wall:>9.2f}{cpu:>8.2f}")
print(f"npsflow run: {int(sys.argv[4].split()[3]):,} minor page faults")
print(f"npsflow costs {rows[0][1] / rows[1][1]:.1f}x the transport floor's CPU per event ({count} messages)")
EOF
