"""`execbox selftest [--seconds N] [--json]`: run, on this host, the batteries that prove
execbox works here, and print runs, failures and rate for each. The batteries share the N
seconds equally.

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


NO_NAMESPACES = ("user namespace", "join user namespace", "unshare")


def sandbox_launches(seconds: float, workdir: str) -> Battery:
    """Sandboxed /bin/true, one at a time: the launch rate a sandboxed worker can reach
    here, and any launch that fails is a failure (not a slower rate)."""
    from .. import SandboxSpec, run

    name = "sandbox launches of /bin/true, 1 at a time"
    box = SandboxSpec()
    started = time.monotonic()
    first = run(["/bin/true"], sandbox=box, cwd=workdir)
    if first.failure is not None and first.failure.step in NO_NAMESPACES:
        return (name, 0, 0, 0.0, f"skipped: this host cannot sandbox ({first.failure.step}: "
                f"{first.failure.message})")

    def once(index: int, n: int) -> str | None:
        result = run(["/bin/true"], sandbox=box, cwd=workdir)
        return None if result.exit_code == 0 else f"{result.exit_code} {result.failure}"

    # The first launch, which decided the skip, counts like the others.
    failures = [] if first.exit_code == 0 else [f"{first.exit_code} {first.failure}"]
    runs, more = _loop(max(seconds - (time.monotonic() - started), 0.0), 1, once)
    failures += more
    return (name, runs + 1, len(failures), time.monotonic() - started,
            failures[0] if failures else "")


# The processes of killed_mid_step's tree; each is `exec -a MARKER-ROLE sleep`, so its
# argv[0] names it (a `# MARKER` comment would never reach argv).
_ROLES = ("setsid", "double-fork", "background", "step")


def _tree_script(marker: str) -> str:
    return (f"setsid bash -c 'trap \"\" TERM; exec -a {marker}-setsid sleep 1000' &\n"
            f"(bash -c 'exec -a {marker}-double-fork sleep 1000' &)\n"
            f"bash -c 'exec -a {marker}-background sleep 1000' &\n"
            f"exec -a {marker}-step sleep 1000\n")


def _roles_running(marker: str) -> dict[int, str]:
    """pid -> role of the tree's processes that have exec'd into their marked sleep."""
    from ..supervise.proctree import processes_with

    found = {}
    for pid in processes_with(marker):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        role = argv0.removeprefix(f"{marker}-")
        if role in _ROLES:
            found[pid] = role
    return found


def kill_execbox_once(command: list[str], cwd: str, marker: str) -> str | None:
    """Start command (an `execbox run` of the tree script), SIGKILL it once the whole tree
    runs, and report what of the tree is still alive 2 s later (None: nothing)."""
    import signal
    import subprocess

    from ..supervise.proctree import processes_with

    with open(f"{cwd}/{marker}.sh", "w") as f:
        f.write(_tree_script(marker))
    # stderr goes to a file: a pipe would stay open in the tree (and could fill up).
    errors = open(f"{cwd}/{marker}.err", "w+b")  # noqa: SIM115 (closed in finally)
    cli = subprocess.Popen([*command, "bash", f"{marker}.sh"], cwd=cwd, start_new_session=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
    problem = None
    try:
        deadline = time.monotonic() + 30
        while set(_roles_running(marker).values()) != set(_ROLES):
            if cli.poll() is not None or time.monotonic() > deadline:
                cli.kill()
                cli.wait()
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip()[-200:]
                problem = f"the tree never started (exit {cli.returncode}: {said})"
                break
            time.sleep(0.01)
        else:
            os.kill(cli.pid, signal.SIGKILL)  # execbox run only, never its group
    finally:
        cli.wait()
        errors.close()
        os.unlink(f"{cwd}/{marker}.err")
        gone_by = time.monotonic() + 2
        while processes_with(marker) and time.monotonic() < gone_by:
            time.sleep(0.02)
        left = _roles_running(marker)
        for pid in processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.unlink(f"{cwd}/{marker}.sh")
    if problem is None and left:
        problem = f"left {', '.join(sorted(left.values()))} running"
    return problem


def _sandbox_works(cwd: str) -> bool:
    from .. import SandboxSpec, run

    return run(["true"], sandbox=SandboxSpec(), cwd=cwd).exit_code == 0


def _cgroups_writable() -> bool:
    from ..cgroups.step import StepCgroup

    try:
        StepCgroup.create(None, 100, None).remove()
    except OSError:
        return False
    return True


def killed_mid_step(seconds: float, workdir: str) -> Battery:
    """`execbox run` SIGKILLed while its step's tree (a setsid child ignoring SIGTERM, a
    double-forked and a background child) runs: nothing of the tree may survive it."""
    import sys

    cwd = f"{workdir}/killed"
    os.mkdir(cwd)
    os.chmod(cwd, 0o755)
    modes = [("plain", []), ("--pty", ["--pty"])]
    skipped = []
    if _sandbox_works(cwd):
        modes.append(("--sandbox", ["--sandbox"]))
    else:
        skipped.append("--sandbox (no namespaces)")
    if _cgroups_writable():
        modes.append(("--pids 100", ["--pids", "100"]))
    else:
        skipped.append("--pids (no writable cgroup)")
    started = time.monotonic()
    runs = 0
    ran: dict[str, int] = {}
    failures: list[str] = []
    # Every mode at least once, then round after round while the time share lasts.
    while runs < len(modes) or time.monotonic() - started < seconds:
        name, options = modes[runs % len(modes)]
        marker = f"execbox-selftest-killed-{os.getpid()}-{runs}"
        problem = kill_execbox_once([sys.executable, "-m", "execbox", "run", *options, "--"],
                                    cwd, marker)
        runs += 1
        ran[name] = ran.get(name, 0) + 1
        if problem:
            failures.append(f"{name}: {problem}")
    note = "modes " + ", ".join(f"{name} x{count}" for name, count in ran.items())
    if skipped:
        note += "; not here: " + ", ".join(skipped)
    if failures:
        note = f"{failures[0]}; {note}"
    return ("execbox killed mid-step", runs, len(failures), time.monotonic() - started, note)


BATTERIES = 8


WORKDIR_PREFIX = "execbox-selftest-"


def make_workdir(parent: str | None = None) -> str:
    """A fresh work directory named after this process (execbox-selftest-<pid>-<start
    time>-...), once those of selftests that are gone are removed: one killed by SIGKILL
    cannot remove its own."""
    from ..cgroups.stale import gone, start_time

    parent = parent or tempfile.gettempdir()
    for name in os.listdir(parent):
        fields = name[len(WORKDIR_PREFIX):].split("-") if name.startswith(WORKDIR_PREFIX) else []
        if len(fields) < 3 or not (fields[0].isdigit() and fields[1].isdigit()):
            continue  # not one of ours (or of a release that named them otherwise)
        if gone(int(fields[0]), int(fields[1])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-{start_time(os.getpid())}-",
                               dir=parent)
    os.chmod(workdir, 0o755)
    return workdir


def run_batteries(seconds: float) -> list[Battery]:
    share = max(seconds / BATTERIES, 0.5)
    workdir = make_workdir()
    try:
        return [etxtbsy(share, workdir), pty_starts(share), tree_kill(share), leaks(share),
                devices(share), sandbox_escape(share, workdir),
                sandbox_launches(share, workdir), killed_mid_step(share, workdir)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _seconds(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def main(args: list[str]) -> int:
    """`execbox selftest [--seconds N] [--json]`; a bad argument is a usage error (exit 2)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="execbox selftest", description="Run the batteries that prove execbox works on "
        "this host. Exit status 0: no failures; 1: a battery failed; 2: a usage error.")
    parser.add_argument("--seconds", type=_seconds, default=30.0, metavar="N",
                        help="total time the batteries share (default: 30)")
    parser.add_argument("--json", action="store_true", help="print the batteries as JSON")
    try:
        options = parser.parse_args(args)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    results = run_batteries(options.seconds)
    if options.json:
        import json

        print(json.dumps([{"battery": n, "runs": r, "failures": f, "seconds": round(s, 2),
                           "rate": round(r / s, 1) if s else 0.0, "note": note}
                          for n, r, f, s, note in results], indent=1))
    else:
        print(f"{'battery':44} {'runs':>7} {'failures':>8} {'rate/s':>8}  note")
        for name, runs, failures, secs, note in results:
            rate = runs / secs if secs else 0.0
            print(f"{name:44} {runs:7d} {failures:8d} {rate:8.1f}  {note}")
    return 1 if any(f for _, _, f, _, _ in results) else 0
