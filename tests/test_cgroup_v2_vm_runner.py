"""Runs the cgroup v2 tests in a pure cgroup v2 VM (scripts/vm-cgroup-v2.sh) from the normal
suite. Where the VM cannot start it skips with the script's reason, except in CI as root on
x86_64, where the VM must run."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "vm-cgroup-v2.sh"
UNAVAILABLE = 77  # the script's "the VM could not start"
TIMEOUT = 15 * 60
GRACE = 10


def _must_run() -> bool:
    return (os.environ.get("CI") == "true" and os.geteuid() == 0
            and platform.machine() == "x86_64")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the script's process group (vng, qemu and the rest): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, GRACE), (signal.SIGKILL, GRACE)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_vm() -> tuple[int, str]:
    proc = subprocess.Popen([str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(proc)
        output = proc.stdout.read() if proc.stdout else b""
        pytest.fail(f"the cgroup v2 VM run took over {TIMEOUT} s:\n"
                    f"{output.decode(errors='replace')[-4000:]}")
    finally:
        _stop(proc)  # nothing of the run may outlive the test, even after a failure
    return proc.returncode, output.decode(errors="replace")


def _failure_report(output: str, limit: int = 8000) -> str:
    """What failed in the VM, first failure first: a later failure is often only the
    aftermath of the first (a cgroup one test left behind fails every check after it)."""
    lines = output.splitlines()
    verdict = re.compile(r"::\S+ (FAILED|ERROR)\b|^(FAILED|ERROR) ")  # -v's, or -rf's
    failed = [line for line in lines if verdict.search(line)]
    start = next((i for i, line in enumerate(lines) if "= FAILURES =" in line), None)
    if start is None:
        return output[-limit:]
    first = lines[start + 1:start + 2]
    for line in lines[start + 2:]:
        if line.startswith("____") or line.startswith("===="):
            break
        first.append(line)
    report = "\n".join(["failed in the VM:", *failed, "", "the first failure:", *first])
    return report[:limit] + ("\n..." if len(report) > limit else "")


@pytest.mark.slow
def test_cgroup_v2_in_a_vm() -> None:
    status, output = _run_vm()
    if status == UNAVAILABLE:
        reason = next((line for line in output.splitlines()
                       if line.startswith("cgroup v2 VM could not start")), output[-500:])
        if _must_run():
            pytest.fail(f"{reason} (CI=true, root, x86_64: the VM must run)")
        pytest.skip(reason)
    assert status == 0, _failure_report(output)
    assert " passed" in output
