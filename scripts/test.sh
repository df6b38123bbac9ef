#!/usr/bin/env bash
# The test command from the README: every test tier that exists, from a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

./scripts/prereqs.sh

echo "== unit, property and service tests"
cargo test --workspace -j2

echo "== contract: schemas and OpenAPI"
./scripts/contract.sh

echo "== end-to-end tests against a real broker (Tansu)"
./scripts/e2e.sh

echo "== hostile input and requests on a real broker"
./scripts/hostile.sh

echo "== chaos: kills, rebalances and a broker outage on a real broker"
./scripts/chaos.sh

echo "== exactly once on a broker with transactions (noida-db)"
./scripts/eos.sh

echo "== real Prometheus: rules, dashboards, metrics"
./scripts/prometheus.sh
