#!/usr/bin/env bash
# Exactly once, proven on a broker that implements Kafka transactions (noida-db, installed
# and started by scripts/noida.sh), with processing.guarantee = exactly_once:
# 1. the known-answer tier (tests/real_broker.rs), every output read back with
#    isolation.level=read_committed: every alert, escalation and dead letter exactly once,
#    every segment exact, every group's offsets committed to the end of its inputs;
# 2. the zombie test (tests/chaos.rs): a process frozen past its session timeout while the
#    other takes its partitions, then resumed: nothing it writes afterwards is visible;
# 3. the chaos test's short form (tests/chaos.rs): SIGKILLs, rebalances and a broker restart
#    (stopped, started again on its data directory), then exact figures with 0 duplicates.
# noida-db's cooperative-sticky rebalancing hangs: the clients use range assignment.
#   scripts/eos.sh          # as CI runs it (~8 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
port="${NPSFLOW_EOS_PORT:-19292}"
data="$(mktemp -d)"
trap 'scripts/noida.sh stop "$port"; rm -rf "$data"' EXIT

echo "== known answer in exactly_once mode (noida-db, read_committed)"
scripts/noida.sh stop "$port"
scripts/noida.sh start "$port" "$data/kat"
NPSFLOW_E2E_BROKERS="127.0.0.1:$port" NPSFLOW_E2E_GUARANTEE=exactly_once \
  NPSFLOW_E2E_KAFKA_PROPERTIES="partition.assignment.strategy=range" \
  cargo test -j2 -p npsflow-tests --test real_broker -- --ignored
scripts/noida.sh stop "$port"

echo "== a process frozen past its session timeout is fenced (noida-db)"
NPSFLOW_CHAOS_BROKER=noida NPSFLOW_CHAOS_GUARANTEE=exactly_once NPSFLOW_CHAOS_PORT="$port" \
  NPSFLOW_CHAOS_TEST=a_process_frozen NPSFLOW_CHAOS_MESSAGES=3000 NPSFLOW_CHAOS_SECONDS=30 \
  scripts/chaos.sh

echo "== chaos in exactly_once mode: kills, rebalances, a broker restart (noida-db)"
NPSFLOW_CHAOS_BROKER=noida NPSFLOW_CHAOS_GUARANTEE=exactly_once NPSFLOW_CHAOS_PORT="$port" \
  scripts/chaos.sh "$@"
