#!/usr/bin/env bash
# Install, then put `execbox runner` under load as bb_worker would: 5,000 Runs at concurrency
# 16, a tenth of them cancelled at random moments; every response checked, and no process,
# fd, mount or cgroup of any action left. One JSON line; exit status 1 if anything was wrong.
# Options: see `.venv/bin/python bench/runner_load.py --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python bench/runner_load.py "$@"
