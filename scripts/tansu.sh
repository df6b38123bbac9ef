#!/usr/bin/env bash
# Installs Tansu (a Kafka-compatible broker) if missing and starts it on loopback.
#   scripts/tansu.sh start PORT [STORAGE]   # STORAGE: memory://tansu/ (default) or sqlite://FILE
#   scripts/tansu.sh stop PORT
#   scripts/tansu.sh pause PORT | resume PORT   # SIGSTOP / SIGCONT: an unresponsive broker
# The first install builds from crates.io: about 15 minutes on 2 cores, once per machine.
set -euo pipefail
action="${1:?start|stop}"
port="${2:?port}"
storage="${3:-memory://tansu/}"
state_dir="${TMPDIR:-/tmp}/npsflow-tansu-$port"
mkdir -p "$state_dir"

# Tansu 0.6's sqlite schema lacks two indexes its own queries need; once Tansu has created its
# tables, add them (Python's sqlite3 reads libsql's files; the path is the one Tansu opens,
# relative to the working directory). No data and no behaviour changes, only the cost:
# - header (topition, offset_id): its fetch looks up the headers of every record it serves
#   with a query that scans the whole header table, so each record fetched costs O(headers
#   stored), and once some tens of thousands of headers are stored (dead letters, alerts) the
#   broker runs at 100 % CPU and stops answering heartbeats. (A Kafka broker keeps headers
#   inside the record batch.)
# - record (topition, k, offset_id): its maintenance (at start, then every 10 minutes)
#   compacts the compacted topics with a query that, for every key with more than one
#   record, walks all the older records of that key's partition: O(keys x records), 23 s
#   for 20,000 records of 1,000 keys, and far more for a long run's state, case and view
#   topics, holding sqlite's write lock meanwhile, so the broker answers nothing (not even
#   metadata) for minutes. With this index the same compaction takes 0.24 s (3.2 s for
#   200,000 records of 5,000 keys).
add_indexes() { # storage
  case "$1" in
  sqlite://*) ;;
  *) return 0 ;;
  esac
  python3 - "${1#sqlite:///}" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
for _ in range(100):
    if db.execute("select count(*) from sqlite_master where type = 'table' and name in ('header', 'record')").fetchone()[0] == 2:
        break
    time.sleep(0.1)
db.execute("create index if not exists npsflow_header_by_record on header (topition, offset_id)")
db.execute("create index if not exists npsflow_record_by_key on record (topition, k, offset_id)")
db.commit()
PY
}

case "$action" in
start)
  if ! command -v tansu >/dev/null 2>&1; then
    echo "installing tansu (once per machine, ~15 minutes)"
    cargo install --locked tansu --features dynostore,libsql -j2
  fi
  tansu broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "$storage" >"$state_dir/broker.log" 2>&1 &
  echo $! >"$state_dir/pid"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      add_indexes "$storage"
      echo "tansu listening on 127.0.0.1:$port (pid $(cat "$state_dir/pid"))"
      exit 0
    fi
    sleep 0.1
  done
  echo "tansu did not start; its log:" >&2
  cat "$state_dir/broker.log" >&2
  exit 1
  ;;
stop)
  if [ -f "$state_dir/pid" ]; then
    pid="$(cat "$state_dir/pid")"
    kill "$pid" 2>/dev/null || true
    # Wait until it is gone: a new broker on the same sqlite file must not overlap it.
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$state_dir/pid"
  fi
  ;;
pause)
  kill -STOP "$(cat "$state_dir/pid")"
  ;;
resume)
  kill -CONT "$(cat "$state_dir/pid")"
  ;;
*)
  echo "usage: $0 start|stop|pause|resume PORT [STORAGE]" >&2
  exit 2
  ;;
esac
