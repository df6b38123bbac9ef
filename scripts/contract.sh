#!/usr/bin/env bash
# The contract artefacts against the running code:
#  1. the JSON Schemas under deploy/schemas against the decoders and the outputs npsflow writes
#     (scripts/schemas.sh), and `npsflow validate` on the samples;
#  2. the OpenAPI document deploy/openapi.yaml against a live `npsflow demo` (every role on an
#     embedded broker, with traffic and a simulated follow-up team): schemathesis generates
#     requests from the document and fails on a 5xx, a crash, a status code, content type or
#     body that the document does not describe, an invalid request that is accepted or a valid
#     one that is refused; then every case the demo serves is validated against the case
#     schema, and a few malformed requests must get JSON errors.
# Environment: NPSFLOW_CONTRACT_PORT (default 19466), NPSFLOW_CONTRACT_EXAMPLES (schemathesis
# examples per operation, default 50), NPSFLOW_CONTRACT_SEED (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
port="${NPSFLOW_CONTRACT_PORT:-19466}"
examples="${NPSFLOW_CONTRACT_EXAMPLES:-50}"
seed="${NPSFLOW_CONTRACT_SEED:-1}"
url="http://127.0.0.1:$port"

./scripts/schemas.sh
venv="$(./scripts/schemas.sh --venv)"

work="$(mktemp -d)"
demo=""
cleanup() {
  if [ -n "$demo" ]; then
    kill "$demo" 2>/dev/null || true
    wait "$demo" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
demo_failed() {
  echo "$1; the demo's output:" >&2
  tail -n 40 "$work/demo.err" >&2 || true
  exit 1
}

echo "== OpenAPI: npsflow demo on $url"
target/debug/npsflow demo --http "127.0.0.1:$port" --rate 100 >"$work/demo.out" 2>"$work/demo.err" &
demo=$!
ready=""
for _ in $(seq 1 180); do
  kill -0 "$demo" 2>/dev/null || demo_failed "npsflow demo stopped"
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz" || true)" = 200 ]; then
    ready=yes
    break
  fi
  sleep 1
done
[ -n "$ready" ] || demo_failed "npsflow demo not ready (/readyz) after 180 s"
# Some cases and segment windows to answer with, for the document's response schemas.
for _ in $(seq 1 60); do
  if curl -sf "$url/v1/cases?limit=1" | grep -q '"case_id"'; then
    break
  fi
  sleep 1
done

"$venv/bin/python" deploy/schemas/check.py --api "$url"

# Run from a scratch directory: schemathesis keeps a cache where it runs.
(
  cd "$work"
  "$venv/bin/st" --no-color run "$OLDPWD/deploy/openapi.yaml" --url "$url" --checks all \
    --max-examples "$examples" --seed "$seed" --request-timeout 30
)
kill -0 "$demo" 2>/dev/null || demo_failed "npsflow demo stopped during the run"
# Still healthy after everything schemathesis sent.
[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/healthz")" = 200 ] || demo_failed "/healthz is not 200 after the run"
echo "contract: ok"
