#!/usr/bin/env bash
# Installs the system packages the build and the test tiers need, when missing:
# a C toolchain (build-essential: cc, make and perl, which librdkafka's build uses; zlib is
# built from source by cargo), pkg-config and libssl-dev for CI's check of the `tls` feature
# (the default build needs neither), curl for the HTTP checks, and Prometheus (for promtool
# and the real-Prometheus tier). Tansu is installed on demand by scripts/tansu.sh.
set -euo pipefail
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v perl >/dev/null 2>&1 || missing+=(perl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "please install: ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian package may start a Prometheus of its own; the tests start their own.
if command -v service >/dev/null 2>&1; then service prometheus stop >/dev/null 2>&1 || true; fi
pkill -x prometheus 2>/dev/null || true
