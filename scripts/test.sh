#!/usr/bin/env bash
# Install, then run everything CI runs: lint, type check, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
# pytest exits 5 when it collects no tests; set -e turns that (and any failure) into a failure.
.venv/bin/python -m pytest "$@"
