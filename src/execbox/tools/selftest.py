"""`execbox selftest [--seconds N] [--json]`: run, on this host, the batteries that prove
execbox works here, and print runs, failures and rate for each.

The suite runs it with a small N; the README shows a longer run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

Battery = tuple[str, int, int, float, str]  # name, runs, failures, seconds, note


def _loop(seconds: float, threads: int, once: Callable[[int, int], str | None]
          ) -> tuple[int, list[str]]:
    """Call once(thread, n) from `threads` threads until seconds pass; collect failures."""
    stop = time.monotonic() + seconds
    failures: list[str] = []
    runs = [0]
    lock = threading.Lock()

    def worker(index: int) -> None:
        n = 0
        while time.monotonic() < stop:
            problem = once(index, n)
            n += 1
            with lock:
                runs[0] += 1
                if problem:
                    failures.append(problem)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return runs[0], failures


def etxtbsy(seconds: float, workdir: str) -> Battery:
    from .. import run

    def once(index: int, n: int) -> str | None:
        path = f"{workdir}/script-{index}-{n}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
        os.write(fd, b"#!/bin/sh\nexit 0\n")
        os.close(fd)
        result = run([path])
        os.unlink(path)
        return None if result.exit_code == 0 else f"{result.exit_code} {result.failure}"

    started = time.monotonic()
    runs, failures = _loop(seconds, 8, once)
    return ("write-then-exec, 8 threads (ETXTBSY)", runs, len(failures),
            time.monotonic() - started, failures[0] if failures else "")


def pty_starts(seconds: float) -> Battery:
    from .. import DEVNULL, run

    def once(index: int, n: int) -> str | None:
        result = run(["/bin/true"], pty=True, stdout=DEVNULL)
        return None if result.exit_code == 0 else f"{result.exit_code} {result.failure}"

    started = time.monotonic()
    runs, failures = _loop(seconds, 8, once)
    return ("PTY starts, 8 threads", runs, len(failures), time.monotonic() - started,
            failures[0] if failures else "")


def tree_kill(seconds: float) -> Battery:
    from .. import run
    from ..supervise.proctree import processes_with

    def once(index: int, n: int) -> str | None:
        marker = f"execbox-selftest-{os.getpid()}-{index}-{n}"
        script = (f'setsid sh -c "trap \\"\\" TERM; sleep 300 # {marker}" & '
                  f'(sleep 300 # {marker}\n) & sleep 300 # {marker}')
        result = run(["sh", "-c", script], timeout=0.2, grace=0.2)
        left = processes_with(marker)
        for pid in left:
            os.kill(pid, 9)
        if not result.timed_out:
            return "the timeout did not fire"
        return f"left {len(left)} processes" if left else None

    started = time.monotonic()
    runs, failures = _loop(seconds, 2, once)
    return ("timeout kills setsid/double-fork escapees", runs, len(failures),
            time.monotonic() - started, failures[0] if failures else "")


def leaks(seconds: float) -> Battery:
    from .. import run

    def snapshot() -> tuple[set[str], str, int]:
        with open("/proc/self/mountinfo") as f:
            mounts = f.read()
        return set(os.listdir("/proc/self/fd")), mounts, len(os.listdir("/proc/self/task"))

    run(["true"])
    before = snapshot()
    started = time.monotonic()
    runs = 0
    while time.monotonic() - started < seconds:
        run(["true"])
        runs += 1
    after = snapshot()
    problems = [what for what, a, b in zip(("fds", "mounts", "threads"), before, after,
                                           strict=True) if a != b]
    return ("leak check (fds, mounts, threads)", runs, len(problems),
            time.monotonic() - started, ", ".join(problems))


def devices(seconds: float) -> Battery:
    from .. import CAPTURE, run

    started = time.monotonic()
    runs = failures = 0
    note = ""
    while time.monotonic() - started < seconds:
        result = run(["sh", "-c", "echo > /dev/null && (head -c1 /dev/zero >/dev/null 2>&1 "
                      "&& echo zero-opened || echo zero-denied)"], devices=["c 1:3 rwm"],
                     stdout=CAPTURE)
        runs += 1
        if result.failure is not None and result.failure.step == "cgroup":
            return ("device allow/deny", 0, 0, 0.0, f"skipped: {result.failure.message}")
        if result.stdout != b"zero-denied\n":
            failures += 1
            note = f"{result.stdout!r} {result.failure}"
    return ("device allow/deny", runs, failures, time.monotonic() - started, note)


def sandbox_escape(seconds: float, workdir: str) -> Battery:
    from .. import SandboxSpec, run

    canary_dir = f"{workdir}/host"
    os.mkdir(canary_dir)
    with open(f"{canary_dir}/canary", "w") as f:
        f.write("untouched")
    root = f"{workdir}/root"
    os.mkdir(root)
    os.symlink("/", f"{root}/evil")
    os.symlink("../../../../../..", f"{root}/up")
    attempts = [SandboxSpec(root, tmpfs=[f"/evil{canary_dir}"]),
                SandboxSpec(root, dirs=[f"/up{canary_dir}/made"]),
                SandboxSpec(root, symlinks=[("/", f"/evil{canary_dir}/link")])]
    started = time.monotonic()
    runs = failures = 0
    note = ""
    while time.monotonic() - started < seconds:
        for box in attempts:
            result = run(["/bin/true"], sandbox=box)
            runs += 1
            if result.failure is not None and result.failure.step in ("user namespace",
                                                                      "unshare"):
                return ("sandbox escape attempts", 0, 0, 0.0, "skipped: no namespaces")
            if os.listdir(canary_dir) != ["canary"]:
                failures += 1
                note = f"host directory changed: {os.listdir(canary_dir)}"
    return ("sandbox escape attempts (canary)", runs, failures,
            time.monotonic() - started, note)


def run_batteries(seconds: float) -> list[Battery]:
    share = max(seconds / 6, 0.5)
    workdir = tempfile.mkdtemp(prefix="execbox-selftest-")
    try:
        os.chmod(workdir, 0o755)
        return [etxtbsy(share, workdir), pty_starts(share), tree_kill(share), leaks(share),
                devices(share), sandbox_escape(share, workdir)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(args: list[str]) -> int:
    seconds = 30.0
    if "--seconds" in args:
        try:
            seconds = float(args[args.index("--seconds") + 1])
        except (IndexError, ValueError):
            print("execbox selftest: error: --seconds needs a number")
            return 2
    results = run_batteries(seconds)
    if "--json" in args:
        import json

        print(json.dumps([{"battery": n, "runs": r, "failures": f, "seconds": round(s, 2),
                           "note": note} for n, r, f, s, note in results], indent=1))
    else:
        print(f"{'battery':44} {'runs':>7} {'failures':>8} {'rate/s':>8}  note")
        for name, runs, failures, secs, note in results:
            rate = runs / secs if secs else 0.0
            print(f"{name:44} {runs:7d} {failures:8d} {rate:8.1f}  {note}")
    return 1 if any(f for _, _, f, _, _ in results) else 0
