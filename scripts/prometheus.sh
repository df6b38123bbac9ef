#!/usr/bin/env bash
# The real-Prometheus tier: lint and unit-test the rules, then run npsflow (the demo, on its
# embedded broker) with a real Prometheus scraping it and evaluating our rules, and check that
# every dashboard query and every recording rule returns data, that every rule evaluates
# without error, and that `promtool check metrics` passes on what Prometheus scraped. Before
# that, statically: dashboards importable into any Grafana (datasource variable, no hard-coded
# uid), every query scoped by the job and namespace variables, a unit on every panel, and a
# description and runbook for every alert (deploy/check_prometheus.py --lint); and the
# Kubernetes manifests against the Kubernetes schemas (scripts/k8s-validate.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/prereqs.sh
http_port="${NPSFLOW_PROM_APP_PORT:-19465}"
prom_port="${NPSFLOW_PROM_PORT:-19090}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

echo "== promtool: rules"
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml

echo "== dashboards and rules: import-ready, scoped by job and namespace, units, runbooks"
python3 deploy/check_prometheus.py --lint --dashboards deploy/grafana/dashboards/*.json \
  --rules deploy/prometheus/rules.yml

cargo build -j2 -p npsflow

echo "== Kubernetes manifests: schemas (offline), restricted pods, probes, PDBs, config"
NPSFLOW_BIN=target/debug/npsflow ./scripts/k8s-validate.sh

echo "== npsflow demo with a real Prometheus"
target/debug/npsflow demo --http "127.0.0.1:$http_port" --rate 200 >"$work/demo.out" 2>"$work/demo.err" &
pids+=($!)
sed -e "s|@TARGET@|127.0.0.1:$http_port|" -e "s|@RULES@|$PWD/deploy/prometheus/rules.yml|" \
  deploy/prometheus/prometheus.test.yml >"$work/prometheus.yml"
promtool check config "$work/prometheus.yml"
# The docker-compose Prometheus config too, with its rules path pointed at the repository.
sed "s|/etc/prometheus/rules.yml|$PWD/deploy/prometheus/rules.yml|" deploy/prometheus/prometheus.yml \
  >"$work/compose-prometheus.yml"
promtool check config "$work/compose-prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
pids+=($!)

curl -sf --retry 50 --retry-delay 1 --retry-connrefused "http://127.0.0.1:$http_port/metrics" >"$work/metrics.txt"
python3 deploy/check_prometheus.py "http://127.0.0.1:$prom_port" "http://127.0.0.1:$http_port" \
  --dashboards deploy/grafana/dashboards/*.json --rules deploy/prometheus/rules.yml
curl -sf "http://127.0.0.1:$http_port/metrics" | promtool check metrics
echo "promtool check metrics: ok"
echo "prometheus tier: ok"
