#!/usr/bin/env bash
# The JSON Schemas under deploy/schemas against the code, both ways:
#  1. tests/schemas.rs runs every sample through npsflow's own decoders (verdict and reason
#     code), and writes real outputs (alerts, cases, escalation notices, dead-letter headers,
#     from the core and from the whole pipeline on the in-process broker), a corpus of
#     timestamps with the decoder's verdict, and the samples' raw messages;
#  2. deploy/schemas/check.py validates the samples and those outputs with a real JSON Schema
#     validator (Python's jsonschema), and runs `npsflow validate` on the raw messages.
#
#   scripts/schemas.sh          run the check
#   scripts/schemas.sh --venv   only install the Python tools (jsonschema, schemathesis) if
#                               missing, and print the virtual environment's directory
#
# The Python tools are pinned and kept in a virtual environment under ~/.cache/npsflow (or
# target/ if that is not writable), made again only when the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

requirements="jsonschema==4.26.0 referencing==0.37.0 schemathesis==4.32.5"

venv_path() {
  local key base
  key="$(printf '%s %s' "$(python3 --version 2>&1)" "$requirements" | sha256sum | cut -c1-12)"
  base="${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/npsflow"
  if ! mkdir -p "$base" 2>/dev/null || [ ! -w "$base" ]; then
    base="$PWD/target"
    mkdir -p "$base"
  fi
  echo "$base/contract-venv-$key"
}

ensure_venv() {
  local dir="$1"
  if [ -x "$dir/bin/python" ] && [ -f "$dir/.complete" ]; then
    return
  fi
  command -v python3 >/dev/null 2>&1 || { echo "python3 is needed" >&2; exit 1; }
  rm -rf "$dir"
  if ! python3 -m venv "$dir" >/dev/null 2>&1; then
    # Debian's python3 has venv (ensurepip) in a package of its own.
    rm -rf "$dir"
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing python3-venv" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2
      apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    python3 -m venv "$dir"
  fi
  echo "installing $requirements into $dir" >&2
  # shellcheck disable=SC2086
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check $requirements >&2
  touch "$dir/.complete"
}

venv="$(venv_path)"
ensure_venv "$venv"
if [ "${1:-}" = "--venv" ]; then
  echo "$venv"
  exit 0
fi

out="$PWD/target/schema-outputs"
rm -rf "$out"
mkdir -p "$out"
cargo build -j2 -p npsflow
# The test's own "test result:" line is renamed so that CI's count (of cargo test --workspace,
# which runs these tests too) does not count them twice.
NPSFLOW_SCHEMA_OUTPUTS="$out" cargo test -j2 -p npsflow-tests --test schemas 2>&1 |
  sed 's/^test result:/schemas: test result:/'
"$venv/bin/python" deploy/schemas/check.py --outputs "$out" --npsflow target/debug/npsflow
