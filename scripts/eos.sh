#!/usr/bin/env bash
# Exactly once, proven on a broker that implements Kafka transactions (noida-db, installed
# and started by scripts/noida.sh), with processing.guarantee = exactly_once:
# 1. the known-answer tier (tests/real_broker.rs), every output read back with
#    isolation.level=read_committed: every alert, escalation and dead letter exactly once,
#    every segment exact, every group's offsets committed to the end of its inputs;
# 2. zombie fencing (tests/chaos.rs, a_zombie_is_fenced_by_a_successor_in_groups_of_its_own):
#    a process frozen (within its session timeout), its partitions moved to a successor (new
#    consumer groups holding the old ones' committed offsets, the same transactional ids),
#    then resumed and fed input: it finds itself fenced and stops, and read_committed readers
#    see every output exactly once with every figure exact (~1.5 minutes); cases lost only
#    because noida-db hides records committed after an aborted transaction of the same
#    producer id are told apart and counted (README, "Brokers and guarantees");
# 3. (--all) the zombie test with the broker moving the partitions (group expiry) and the
#    chaos test's short form (tests/chaos.rs): SIGKILLs, rebalances and a broker restart
#    (stopped, started again on its data directory), then exact figures with 0 duplicates.
# noida-db's cooperative-sticky rebalancing hangs: the clients use range assignment.
#   scripts/eos.sh               # as CI runs it: parts 1 and 2 (~2.5 minutes once built)
#   scripts/eos.sh --all [--long]  # parts 1-3 (--long: the chaos test's long form)
# Part 3 does not pass on noida-db 0.2.3, a broker bug: its group coordinator never removes
# a member that stopped heartbeating (a frozen or SIGKILLed process) by itself, and while
# such a member is in the group, a process that joins is not given partitions or the group
# rebalances again every rebalance timeout (see README, "Brokers and guarantees"). Part 2
# does not need the coordinator to move anything.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# Ports of its own (hostile.sh uses 19292, chaos.sh 19192 and HTTP 19500-19699), so that it
# can run beside another tier: the broker's, and the first of the npsflow processes' HTTP ports.
port="${NPSFLOW_EOS_PORT:-19992}"
export NPSFLOW_CHAOS_HTTP_PORT="${NPSFLOW_EOS_HTTP_PORT:-19700}"
data="$(mktemp -d)"
trap 'scripts/noida.sh stop "$port"; rm -rf "$data"' EXIT

all=""
if [ "${1:-}" = "--all" ]; then all=1; shift; fi

echo "== known answer in exactly_once mode (noida-db, read_committed)"
# Not the twins test: it SIGKILLs one of two processes and waits for the survivor to take
# every partition, which noida-db 0.2.3 never lets happen (the dead member stays in the
# group; see below). It runs on Tansu (scripts/e2e.sh).
scripts/noida.sh stop "$port"
scripts/noida.sh start "$port" "$data/kat"
NPSFLOW_E2E_BROKERS="127.0.0.1:$port" NPSFLOW_E2E_GUARANTEE=exactly_once \
  NPSFLOW_E2E_KAFKA_PROPERTIES="partition.assignment.strategy=range" \
  cargo test -j2 -p npsflow-tests --test real_broker -- --ignored \
  --skip two_processes_answer_identically_for_every_segment
scripts/noida.sh stop "$port"

echo "== a zombie is fenced: frozen, its partitions moved to a successor in groups of its own, then resumed (noida-db)"
NPSFLOW_CHAOS_BROKER=noida NPSFLOW_CHAOS_GUARANTEE=exactly_once NPSFLOW_CHAOS_PORT="$port" \
  NPSFLOW_CHAOS_TEST=a_zombie_is_fenced NPSFLOW_CHAOS_MESSAGES=3000 NPSFLOW_CHAOS_SECONDS=30 \
  scripts/chaos.sh
[ -n "$all" ] || exit 0

echo "== a process frozen past its session timeout is fenced, the broker moving its partitions (noida-db)"
NPSFLOW_CHAOS_BROKER=noida NPSFLOW_CHAOS_GUARANTEE=exactly_once NPSFLOW_CHAOS_PORT="$port" \
  NPSFLOW_CHAOS_TEST=a_process_frozen NPSFLOW_CHAOS_MESSAGES=3000 NPSFLOW_CHAOS_SECONDS=45 \
  scripts/chaos.sh

echo "== chaos in exactly_once mode: kills, rebalances, a broker restart (noida-db)"
NPSFLOW_CHAOS_BROKER=noida NPSFLOW_CHAOS_GUARANTEE=exactly_once NPSFLOW_CHAOS_PORT="$port" \
  scripts/chaos.sh "$@"
