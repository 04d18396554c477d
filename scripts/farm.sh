#!/usr/bin/env bash
# A BuildGrid farm (PostgreSQL + BuildGrid server on loopback) for end-to-end tests.
#
#   scripts/farm.sh install      install PostgreSQL 15 (apt, as root) and BuildGrid into its own
#                                venv; idempotent, fast once done; prints the bgd path
#   scripts/farm.sh start DIR    start a farm in DIR and print its remote URL
#   scripts/farm.sh stop DIR     stop the farm in DIR (only the pids recorded in DIR/pids)
#
# EXECBOX_FARM_DIR (default ~/.cache/execbox-farm) holds the BuildGrid venv; EXECBOX_PG_BIN
# (default /usr/lib/postgresql/15/bin) the PostgreSQL binaries.
# `install` exits 3 when a prerequisite is missing and cannot be installed here.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
farm_dir="${EXECBOX_FARM_DIR:-$HOME/.cache/execbox-farm}"
venv="$farm_dir/buildgrid"
stamp="$venv/.execbox-installed"
pg_bin="${EXECBOX_PG_BIN:-/usr/lib/postgresql/15/bin}"
requirement="buildgrid==0.9.1"

missing() {
    echo "farm: $*" >&2
    exit 3
}

# The newest Python 3.13 interpreter: pyenv's, else python3.13 on PATH.
find_python() {
    local root candidate found=""
    if [ -n "${EXECBOX_FARM_PYTHON:-}" ]; then
        echo "$EXECBOX_FARM_PYTHON"
        return
    fi
    if command -v pyenv >/dev/null; then
        root="$(pyenv root)"
    else
        root="${PYENV_ROOT:-$HOME/.pyenv}"
    fi
    for candidate in "$root"/versions/3.13*/bin/python3.13; do
        [ -x "$candidate" ] && found="$candidate"
    done
    if [ -z "$found" ] && command -v python3.13 >/dev/null; then
        # Through a pyenv shim this is the real interpreter's path.
        found="$(python3.13 -c 'import sys; print(sys.executable)' 2>/dev/null || true)"
    fi
    [ -n "$found" ] && echo "$found"
}

install_postgres() {
    [ -x "$pg_bin/initdb" ] && return
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        missing "PostgreSQL 15 is not installed ($pg_bin/initdb); install postgresql-15 as root"
    fi
    echo "farm: installing postgresql-15" >&2
    mkdir -p "$farm_dir"
    local log="$farm_dir/apt.log"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            postgresql-15; } </dev/null >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "farm: installing postgresql-15 failed (log: $log)" >&2
        exit 1
    fi
    [ -x "$pg_bin/initdb" ] || { echo "farm: $pg_bin/initdb is still missing" >&2; exit 1; }
}

install_buildgrid() {
    [ -x "$venv/bin/bgd" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$requirement" ] && return
    local python log
    python="$(find_python)" ||
        missing "BuildGrid needs Python 3.13 and none was found (pyenv install 3.13, or put python3.13 on PATH)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 13))' ||
        missing "$python is not Python >= 3.13, which BuildGrid needs"
    mkdir -p "$farm_dir"
    # One installer at a time; the others wait, then find it done.
    exec 9>"$farm_dir/.install.lock"
    flock 9
    if [ ! -x "$venv/bin/bgd" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$requirement" ]; then
        echo "farm: installing $requirement into $venv" >&2
        log="$farm_dir/install.log"
        rm -rf "$venv"
        if ! { "$python" -m venv "$venv" &&
            "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input \
                "$requirement"; } >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            echo "farm: installing $requirement failed (log: $log)" >&2
            exit 1
        fi
        echo "$requirement" >"$stamp"
    fi
    exec 9>&-
}

farm_python() {
    if [ -x "$venv/bin/python" ]; then echo "$venv/bin/python"; else echo python3; fi
}

case "${1:-}" in
    install)
        [ $# = 1 ] || { echo "usage: $0 install" >&2; exit 2; }
        install_postgres
        install_buildgrid
        echo "$venv/bin/bgd"
        ;;
    start)
        [ $# = 2 ] || { echo "usage: $0 start DIR" >&2; exit 2; }
        install_postgres
        install_buildgrid
        EXECBOX_BGD="$venv/bin/bgd" exec "$venv/bin/python" "$repo/tests/farm.py" start "$2"
        ;;
    stop)
        [ $# = 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }
        exec "$(farm_python)" "$repo/tests/farm.py" stop "$2"
        ;;
    *)
        echo "usage: $0 install | start DIR | stop DIR" >&2
        exit 2
        ;;
esac
