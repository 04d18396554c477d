#!/usr/bin/env bash
# Install, then measure `execbox worker` on a local BuildGrid farm (per-action overhead, input
# root staging against cp -al, actions per second sandboxed and not); updates the worker
# section of docs/benchmarks.md. Options: see `.venv/bin/python bench/worker_bench.py --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# PostgreSQL 15 (apt, as root) and BuildGrid in its own venv; exits 3 if they cannot be had.
./scripts/farm.sh install >/dev/null
exec .venv/bin/python bench/worker_bench.py "$@"
