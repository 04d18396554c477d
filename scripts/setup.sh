#!/usr/bin/env bash
# Create .venv with execbox (editable) and its test tools. Idempotent; used by the other scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: execbox needs Python >= 3.11 (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "setup: installing python3-venv" >&2
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$PYTHON" -m venv .venv
        else
            echo "setup: '$PYTHON -m venv' failed; install python3-venv" >&2
            exit 1
        fi
    fi
fi
stamp=.venv/.execbox-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ bin/execbox -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,reapi,buildbarn]'
    touch "$stamp"
fi
# Byte-compile the package as a regular install would (PYTHONDONTWRITEBYTECODE may be set),
# so `execbox run` does not compile its modules on every start.
.venv/bin/python -m compileall -q src/execbox >/dev/null
