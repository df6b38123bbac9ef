#!/usr/bin/env bash
# Many-segments benchmark on a real broker (Tansu, sqlite storage, loopback): memory with
# 10,000 active segments x 4 windows, and the time to restore them from the state topic.
#   1. N responses (default 20,000) spread over S segments (default 10,000) of one
#      dimension, `shard`, are produced first (python3 with confluent-kafka);
#   2. `npsflow run` (release, every role) consumes them until the aggregator owns S + 1
#      segments (`all` too); its RSS is read then (current and peak);
#   3. it stops (committing), and a fresh `npsflow run --roles aggregate` restores every
#      segment from the compacted state topic: the time from start to ready, and the
#      restore's own time and record count from its log, and its RSS.
# A benchmark, not a test: it asserts nothing about speed or size.
#   scripts/bench-segments.sh [S] [N]
#   NPSFLOW_BENCH_BROKER=noida scripts/bench-segments.sh  # on noida-db instead of Tansu: how
#                                                         # long the restore takes when the
#                                                         # broker serves the state quickly
set -euo pipefail
cd "$(dirname "$0")/.."
segments="${1:-10000}"
count="${2:-20000}"
port="${NPSFLOW_BENCH_PORT:-19393}"
http_port="${NPSFLOW_BENCH_HTTP_PORT:-19467}"
work=".tmp/bench-segments-$$"
mkdir -p "$work"
pid=""
source scripts/bench-broker.sh
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  "scripts/$broker.sh" stop "$port"
  rm -rf "$work"
}
trap cleanup EXIT

python3 -c "import confluent_kafka" 2>/dev/null || pip install --quiet confluent-kafka
cargo build -j2 --release -p npsflow --bins --example transport_floor
bin="${NPSFLOW_BENCH_BIN:-target/release/npsflow}"
start_bench_broker "$port" "$work"
export NPSFLOW__KAFKA__BROKERS="127.0.0.1:$port"
export NPSFLOW__HTTP__LISTEN="127.0.0.1:$http_port"
export NPSFLOW__LOG__FORMAT=json
export NPSFLOW__SEGMENTS__DIMENSIONS=shard
export NPSFLOW__SEGMENTS__COMBINATIONS=
export NPSFLOW__SEGMENTS__MAX_VALUES_PER_DIMENSION=$((segments + 1))
"$bin" topics create >/dev/null

echo "== producing $count responses over $segments segments"
python3 - "$port" "$segments" "$count" <<'EOF'
import datetime, json, sys
from confluent_kafka import Producer
port, segments, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}", "linger.ms": 50})
at = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5))
at = at.strftime("%Y-%m-%dT%H:%M:%S.000Z")
for i in range(count):
    response = {"response_id": f"seg-{i}", "score": i % 11, "responded_at": at,
                "customer_id": f"c-{i}", "segments": {"shard": f"s{i % segments:05d}"}}
    producer.produce("survey.responses", json.dumps(response).encode(), key=f"c-{i}")
    if i % 10000 == 0:
        producer.poll(0)
producer.flush(120)
EOF

gauge() { awk -v name="$1" '$1 == name {print int($2)}' "$work/metrics.txt"; }
scrape() { curl -sf "http://127.0.0.1:$http_port/metrics" >"$work/metrics.txt" 2>/dev/null || true; }
rss() {
  awk '/VmRSS/ {r = $2} /VmHWM/ {h = $2} /RssAnon/ {a = $2} /RssFile/ {f = $2}
    END {printf "%d MiB now (%d anonymous, %d file), %d MiB peak", r / 1024, a / 1024, f / 1024, h / 1024}' "/proc/$1/status"
}

echo "== npsflow run until it owns $((segments + 1)) segments"
"$bin" run >"$work/run.log" 2>&1 &
pid=$!
while :; do
  scrape
  owned=$(gauge npsflow_segments); owned=${owned:-0}
  applied=$(awk '$1 ~ /^npsflow_delta_responses_total\{result="applied"\}/ {print int($2)}' "$work/metrics.txt")
  if [ "$owned" -ge $((segments + 1)) ] && [ "${applied:-0}" -ge $((2 * count)) ]; then break; fi
  kill -0 "$pid" 2>/dev/null || { echo "npsflow exited" >&2; tail "$work/run.log" >&2; exit 1; }
  sleep 1
done
sleep 2
echo "segments owned: $(gauge npsflow_segments); RSS: $(rss "$pid")"
kill -INT "$pid"; wait "$pid" || true; pid=""

records=$(python3 - "$port" <<'EOF2'
import sys
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": f"127.0.0.1:{sys.argv[1]}", "group.id": "bench-count"})
meta = c.list_topics("npsflow.state", timeout=30).topics["npsflow.state"]
print(sum(c.get_watermark_offsets(TopicPartition("npsflow.state", p), timeout=30)[1] for p in meta.partitions))
EOF2
)
echo "== the transport floor: a bare consumer reads the $records state records"
floor_start=$(date +%s%N)
target/release/examples/transport_floor "127.0.0.1:$port" npsflow.state "$records" >/dev/null
echo "floor read them in $(( ($(date +%s%N) - floor_start) / 1000000 )) ms"

echo "== a fresh aggregator restores them from the state topic"
start_ns=$(date +%s%N)
"$bin" run --roles aggregate >"$work/restore.log" 2>&1 &
pid=$!
until curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1; do
  kill -0 "$pid" 2>/dev/null || { echo "npsflow exited" >&2; tail "$work/restore.log" >&2; exit 1; }
  sleep 0.05
done
ready_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
ready_rss=$(rss "$pid")
scrape
restored=$(grep '"restored"' "$work/restore.log" | tail -1 | grep -o '"records":[0-9]*\|"millis":[0-9]*' | tr '\n' ' ')
echo "ready after ${ready_ms} ms; restore: ${restored}; RSS: ${ready_rss}"
echo "after one scrape: segments owned: $(gauge npsflow_segments); RSS: $(rss "$pid")"
