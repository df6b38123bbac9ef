#!/usr/bin/env bash
# Hostile-input tier on a real broker process (Tansu, in-memory storage, its own port):
# the npsflow binary is fed a table of labelled hostile messages (encodings, sizes up to
# 10 MiB, nesting, duplicate keys, every field's type and range edges, timestamps, segment
# names, a cardinality flood, re-sends every way) and hostile HTTP requests, and is judged by
# the external contract only (tests/hostile.rs). Prints a table
# `case | expected | observed` and fails listing every mismatch.
#   scripts/hostile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
port="${NPSFLOW_HOSTILE_PORT:-19292}"
work="$(mktemp -d "${TMPDIR:-/tmp}/npsflow-hostile.XXXXXX")"
pidfile="$work/npsflow.pid"
status=1
cleanup() {
  # The npsflow process the test started, if the test ended without stopping it (checked
  # by its command line, so a reused pid is left alone).
  if [ -s "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    if grep -q "npsflow" "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
    fi
  fi
  scripts/tansu.sh stop "$port"
  if [ "$status" -eq 0 ]; then
    rm -rf "$work"
  else
    echo "hostile: logs kept in $work" >&2
  fi
}
trap 'status=$?; cleanup' EXIT

scripts/tansu.sh stop "$port"
scripts/tansu.sh start "$port"
cargo build -j2 -p npsflow
# A copy of the binary: the run is not affected by a rebuild meanwhile, and other tiers'
# clean-ups (`pkill -f .../target/debug/npsflow run`) leave this process alone.
cp target/debug/npsflow "$work/npsflow"

export NPSFLOW_HOSTILE_BROKERS="127.0.0.1:$port" \
  NPSFLOW_HOSTILE_BIN="$work/npsflow" \
  NPSFLOW_HOSTILE_DIR="$work" \
  NPSFLOW_HOSTILE_PIDFILE="$pidfile"
cargo test -j2 -p npsflow-tests --test hostile -- --ignored --nocapture
