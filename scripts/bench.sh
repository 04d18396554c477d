#!/usr/bin/env bash
# Install, then measure execbox against its peers in one interleaved run; updates docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The sandbox is compared with bubblewrap and PTY throughput with script(1).
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap bsdutils >/dev/null
fi
exec .venv/bin/python bench/run_bench.py "$@"
