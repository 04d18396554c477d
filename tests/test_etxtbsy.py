"""Write-then-exec from many threads (seed 001): execbox never sees ETXTBSY; the same loop
with subprocess does, which proves the loop is sensitive enough to catch it."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import execbox

THREADS = 8
SCRIPT = b"#!/bin/sh\nexit 0\n"


def _stress(run_one: Callable[[str], str | None], directory: Path, seconds: float,
            stop_after_failures: int | None = None) -> tuple[int, list[str]]:
    failures: list[str] = []
    runs = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(index: int) -> None:
        nonlocal runs
        n = 0
        while time.monotonic() < stop:
            if stop_after_failures is not None and len(failures) >= stop_after_failures:
                return
            path = str(directory / f"script-{index}-{n}")
            n += 1
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
            os.write(fd, SCRIPT)
            os.close(fd)
            problem = run_one(path)
            os.unlink(path)
            with lock:
                runs += 1
                if problem is not None:
                    failures.append(problem)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs, failures


def _with_execbox(path: str) -> str | None:
    result = execbox.run([path])
    if result.exit_code != 0 or result.failure is not None:
        return f"exit {result.exit_code}: {result.failure}"
    return None


def _with_subprocess(path: str) -> str | None:
    try:
        subprocess.run([path], start_new_session=True, check=False)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return None


def test_write_then_exec_from_8_threads_never_fails(tmp_path: Path) -> None:
    runs, failures = _stress(_with_execbox, tmp_path, seconds=10)
    assert runs > 100
    assert failures == [], f"{len(failures)} of {runs} runs failed, e.g. {failures[:3]}"


def test_the_stress_loop_catches_etxtbsy_with_subprocess(tmp_path: Path) -> None:
    seen: list[str] = []
    runs = 0
    deadline = time.monotonic() + 120
    while "ETXTBSY" not in seen and time.monotonic() < deadline:
        more, failures = _stress(_with_subprocess, tmp_path, seconds=10, stop_after_failures=1)
        runs += more
        seen += failures
    assert "ETXTBSY" in seen, f"no ETXTBSY in {runs} subprocess runs: the loop is not sensitive"


def test_exhausted_retries_name_the_writer(tmp_path: Path) -> None:
    script = tmp_path / "held-open"
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
    try:
        os.write(fd, SCRIPT)
        result = execbox.run([str(script)])
    finally:
        os.close(fd)
    assert result.exit_code == 126
    assert result.failure is not None and result.failure.errno == "ETXTBSY"
    assert f"pid {os.getpid()}" in result.failure.hint
