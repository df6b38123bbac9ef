#!/usr/bin/env bash
# Installs noida-db (a local Kafka-protocol broker with transactions: commit, abort,
# read_committed, TxnOffsetCommit, fencing; data kept across restarts) if missing, and starts
# or stops it on loopback.
#   scripts/noida.sh start PORT [DATA_DIR]   # DATA_DIR default: a fresh temporary directory
#   scripts/noida.sh stop PORT               # SIGTERM; the data directory is kept
#   scripts/noida.sh pause PORT | resume PORT
# Pinned to noida-db 0.2.3 from PyPI, in a virtual environment under ~/.cache/npsflow.
# Its cooperative-sticky rebalancing hangs (the second member never gets partitions): clients
# use partition.assignment.strategy=range with it (NPSFLOW__KAFKA__PROPERTIES__...).
set -euo pipefail
action="${1:?start|stop|pause|resume}"
port="${2:?port}"
version="0.2.3"
venv="${NPSFLOW_CACHE:-$HOME/.cache/npsflow}/noida-$version"
state_dir="${TMPDIR:-/tmp}/npsflow-noida-$port"
mkdir -p "$state_dir"

install() {
  if [ -x "$venv/bin/noida-db" ]; then
    return 0
  fi
  echo "installing noida-db $version into $venv"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "noida-db==$version"
}

case "$action" in
start)
  install
  data="${3:-$(mktemp -d)}"
  mkdir -p "$data"
  # The binary wants a newer glibc symbol version than Debian 12 has and says so once on
  # stderr; it runs fine (checked by the tiers that use it).
  # In a session of its own, so that `stop` reaches every process of it (the Python entry
  # point runs the broker as a child).
  (cd "$data" && exec setsid "$venv/bin/noida-db" start --only kafka --data-dir "$data" \
    --kafka-port "$port") >"$state_dir/broker.log" 2>&1 &
  echo $! >"$state_dir/pid"
  echo "$data" >"$state_dir/data"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "noida-db listening on 127.0.0.1:$port (pid $(cat "$state_dir/pid"), data $data)"
      exit 0
    fi
    sleep 0.1
  done
  echo "noida-db did not start; its log:" >&2
  cat "$state_dir/broker.log" >&2
  exit 1
  ;;
stop)
  if [ -f "$state_dir/pid" ]; then
    pid="$(cat "$state_dir/pid")"
    # Every process of the broker's session, gracefully first. With much data it takes a
    # while to close (over 10 s at 100,000 messages): until the last of them has exited it
    # holds its data directory and its port, and a start on the same directory would fail.
    pkill -TERM -s "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do
      pgrep -s "$pid" >/dev/null 2>&1 || break
      sleep 0.1
    done
    pkill -KILL -s "$pid" 2>/dev/null || true
    while pgrep -s "$pid" >/dev/null 2>&1; do sleep 0.1; done
    rm -f "$state_dir/pid"
  fi
  ;;
pause | resume)
  signal=STOP
  [ "$action" = resume ] && signal=CONT
  pid="$(cat "$state_dir/pid")"
  pkill "-$signal" -P "$pid" 2>/dev/null || true
  kill "-$signal" "$pid"
  ;;
*)
  echo "usage: $0 start|stop|pause|resume PORT [DATA_DIR]" >&2
  exit 2
  ;;
esac
