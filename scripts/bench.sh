#!/usr/bin/env bash
# Install, then measure execbox against its peers in one interleaved run; updates docs/benchmarks.md.
# `--worker [OPTIONS]` runs only the worker benchmark (scripts/bench-worker.sh);
# `--runner-load [OPTIONS]` only the Buildbarn runner's load battery (scripts/runner-load.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--worker" ]; then
    shift
    exec ./scripts/bench-worker.sh "$@"
fi
if [ "${1:-}" = "--runner-load" ]; then
    shift
    exec ./scripts/runner-load.sh "$@"
fi
./scripts/setup.sh
# The sandbox is compared with bubblewrap and PTY throughput with script(1).
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap bsdutils >/dev/null
fi
exec .venv/bin/python bench/run_bench.py "$@"
