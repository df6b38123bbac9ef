#!/usr/bin/env bash
# Rebalance benchmark on a real broker (Tansu, sqlite storage, loopback): how long a newly
# assigned partition waits before its role works on it again.
#   1. N seeded messages (default 100,000) are produced first, and one `npsflow run` (release,
#      every role) processes them all;
#   2. a second `npsflow run` joins the group: the partitions it is given are restored there
#      (duplicate memory, segments, cases) while the first process keeps the others;
#   3. the second stops (SIGTERM, leaving the group): the first takes its partitions back and
#      restores them.
# For each step: every "restored" line the process logged (role, partitions, records read,
# milliseconds) and the time from the step's start until the process was ready again
# (`/readyz`), which adds the group's join to the restore. A benchmark, not a test: it asserts
# nothing about speed.
#   scripts/bench-rebalance.sh [N]
#   NPSFLOW_BENCH_BROKER=noida scripts/bench-rebalance.sh
set -euo pipefail
cd "$(dirname "$0")/.."
count="${1:-100000}"
port="${NPSFLOW_BENCH_PORT:-19394}"
first_http="${NPSFLOW_BENCH_HTTP_PORT:-19468}"
second_http=$((first_http + 1))
work=".tmp/bench-rebalance-$$"
mkdir -p "$work"
first="" second=""
source scripts/bench-broker.sh
cleanup() {
  for pid in $first $second; do kill "$pid" 2>/dev/null || true; done
  "scripts/$broker.sh" stop "$port"
  rm -rf "$work"
}
trap cleanup EXIT

cargo build -j2 --release -p npsflow --bins
bin="${NPSFLOW_BENCH_BIN:-target/release/npsflow}"
start_bench_broker "$port" "$work"
export NPSFLOW__KAFKA__BROKERS="127.0.0.1:$port"
export NPSFLOW__LOG__FORMAT=json
seed_bench_input "$bin" "$count"

metric() { # http_port name_regex
  curl -sf "http://127.0.0.1:$1/metrics" 2>/dev/null |
    awk -v name="$2" '$1 ~ "^"name {s += $2} END {printf "%d", s}'
}
ready() { curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; }
# Prints the "restored" lines of log $1 from line $2 on: role, partitions, records, millis.
restores() {
  tail -n +"$2" "$1" | grep '"restored"' |
    python3 -c '
import json, sys
for line in sys.stdin:
    f = json.loads(line).get("fields", {})
    print("  restored: {:9} {:>3} partitions {:>7} records {:>6} ms".format(
        f.get("role"), f.get("partitions"), f.get("records"), f.get("millis")))
' || true
}
wait_ready() { # http_port pid start_ns
  until ready "$1"; do
    kill -0 "$2" 2>/dev/null || { echo "npsflow exited" >&2; exit 1; }
    sleep 0.05
  done
  echo "  ready after $(( ($(date +%s%N) - $3) / 1000000 )) ms"
}

echo "== one process processes all $count"
start_ns=$(date +%s%N)
NPSFLOW__HTTP__LISTEN="127.0.0.1:$first_http" "$bin" run >"$work/first.log" 2>&1 &
first=$!
until [ "$(metric "$first_http" 'npsflow_events_total')" -ge "$count" ]; do
  kill -0 "$first" 2>/dev/null || { echo "npsflow exited" >&2; tail "$work/first.log" >&2; exit 1; }
  sleep 1
done
echo "  done after $(( ($(date +%s%N) - start_ns) / 1000000 )) ms"
sleep 5 # every snapshot and case record written, every offset committed

echo "== a second process joins: what it is given, it restores"
mark=$(($(wc -l <"$work/first.log") + 1))
start_ns=$(date +%s%N)
NPSFLOW__HTTP__LISTEN="127.0.0.1:$second_http" "$bin" run >"$work/second.log" 2>&1 &
second=$!
wait_ready "$second_http" "$second" "$start_ns"
sleep 5 # the first process's own rebalance settles
echo " the second process:"
restores "$work/second.log" 1
echo " the first process (keeps the rest):"
restores "$work/first.log" "$mark"

echo "== the second process stops: the first takes its partitions back"
mark=$(($(wc -l <"$work/first.log") + 1))
start_ns=$(date +%s%N)
kill -TERM "$second"; wait "$second" || true; second=""
until [ "$(tail -n +"$mark" "$work/first.log" | grep -c '"restored"')" -gt 0 ]; do sleep 0.05; done
wait_ready "$first_http" "$first" "$start_ns"
sleep 5
restores "$work/first.log" "$mark"
