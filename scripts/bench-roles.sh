#!/usr/bin/env bash
# CPU per role: each role alone on inputs produced before it starts, on noida-db (see
# BENCHMARKS.md). Usage: scripts/bench-roles.sh [N] [NAME=VALUE ...] (extra environment for
# the runs); BIN=path measures another build; PERF_ROLE=ingest|aggregate|followup records a
# perf profile of that role into $PERF_DIR (default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}
port=19892
work=$(mktemp -d)
scripts/noida.sh start $port $work/noida >/dev/null
trap 'scripts/noida.sh stop '$port' >/dev/null; rm -rf '$work EXIT
export NPSFLOW__KAFKA__BROKERS=127.0.0.1:$port NPSFLOW__KAFKA__PROPERTIES__PARTITION_ASSIGNMENT_STRATEGY=range NPSFLOW__LOG__FORMAT=json
for kv in "${@:2}"; do export "$kv"; done
bin=${BIN:-target/release/npsflow}
$bin topics create >/dev/null 2>&1
$bin loadgen --count $count --rate 0 --seed 7 >/dev/null 2>&1
metric() { awk -v name="$1" '$1 ~ "^"name {s += $2} END {printf "%d", s}' $2; }
stage() { # role port metric target
  local role=$1 http=$2
  local wrap=""
  [ "${PERF_ROLE:-}" = "$role" ] && wrap="perf record -F 499 --call-graph dwarf,16384 -o ${PERF_DIR:-/tmp}/$role.perf --"
  NPSFLOW__HTTP__LISTEN=127.0.0.1:$http $wrap $bin run --roles $role > $work/$role.log 2>&1 &
  local pid=$! t0=$(date +%s%N) pp=""
  [ -n "$wrap" ] && { sleep 0.5; pid=$(pgrep -f -n "$bin run --roles $role"); }
  while :; do
    curl -sf http://127.0.0.1:$http/metrics > $work/$role.metrics 2>/dev/null || true
    [ "$(metric "$3" $work/$role.metrics)" -ge "$4" ] && break
    sleep 0.2
  done
  local t1=$(date +%s%N)
  read -r u s < <(awk '{print $14, $15}' /proc/$pid/stat)
  local rss=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
  echo "$role: $(( (u+s)*10 )) ms CPU, $(( (t1-t0)/1000000 )) ms wall, $((rss/1024)) MiB, $(metric npsflow_batch_seconds_count $work/$role.metrics) batches"
  kill -INT $pid; wait || true
}
stage ingest 19871 'npsflow_events_total' $count
accepted=$(metric 'npsflow_events_total\{outcome="accepted"\}' $work/ingest.metrics)
alerts=$(metric 'npsflow_alerts_total' $work/ingest.metrics)
echo "accepted $accepted, alerts $alerts"
stage aggregate 19872 'npsflow_delta_responses_total\{result="applied"\}' $accepted
stage followup 19873 'npsflow_cases_opened_total' $alerts
