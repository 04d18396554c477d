#!/usr/bin/env bash
# Install, then measure execbox against its peers in one interleaved run; updates docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python bench/run_bench.py "$@"
