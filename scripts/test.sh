#!/usr/bin/env bash
# Install, then run everything CI runs: lint, type check, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Programs the PTY tests drive (tmux, less, ps) and the kernel headers tests/test_arch.py
# checks the syscall table against; installed with apt when missing and root.
missing=""
packages=""
for tool in tmux less ps script; do command -v "$tool" >/dev/null || missing="$missing $tool"; done
[ -z "$missing" ] || packages="tmux less procps bsdutils"
if [ ! -f /usr/include/asm-generic/unistd.h ] || [ ! -f /usr/include/linux/sockios.h ]; then
    missing="$missing kernel-headers"
    packages="$packages linux-libc-dev"
fi
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing$missing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
fi
.venv/bin/ruff check src tests bench
.venv/bin/mypy
./scripts/farm.sh install >/dev/null || [ $? = 3 ]  # 3: a prerequisite is missing; farm tests skip
# pytest exits 5 when it collects no tests; set -e turns that (and any failure) into a failure.
.venv/bin/python -m pytest "$@"
