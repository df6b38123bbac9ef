#!/usr/bin/env bash
# Fuzzes the message decoder with libFuzzer via cargo-fuzz for N seconds (default 60).
# Installs cargo-fuzz if missing. Stable Rust: RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (once per machine)"
  cargo install --locked cargo-fuzz -j2
fi
cd crates/core
mkdir -p fuzz/corpus/decode
RUSTC_BOOTSTRAP=1 cargo fuzz run decode fuzz/corpus/decode fuzz/seeds/decode -- \
  -max_total_time="$seconds" -max_len=4096 -print_final_stats=1
