"""`execbox runner` under load, played by a client doing bb_worker's part: many Runs at a
given concurrency, some cancelled at random moments (an action timeout or a client giving
up), every response checked, and nothing of any action left behind.

Each Run is one of: an exit with a random code and its own line on stdout; a shell that
kills itself with a signal (exit_code -1 and the signal's name, as bb_runner reports it);
or, for the cancelled share, a tree that ignores SIGTERM and has a setsid child, cancelled
after a random delay. Every action carries a marker in its argv, so a survivor is found by
scanning /proc. Afterwards: no marked process, the runner holds the fds it held before,
the host has the mounts it had, and once the runner is stopped no cgroup of its is left.

Prints one JSON line; exits 1 if anything was wrong. `--runs 5000 --concurrency 16
--cancel 0.1` is the full battery (scripts/runner-load.sh); the test suite runs a short one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from execbox.adapters.protos import resourceusage_pb2, runner_pb2, runner_pb2_grpc
from execbox.supervise.proctree import processes_with

EXECBOX = [sys.executable, str(Path(__file__).resolve().parent.parent / "bin" / "execbox")]
PATH = "/usr/bin:/bin"
SIGNALS = ("TERM", "KILL", "HUP", "USR1")  # none that dumps core


def _execbox_cgroups() -> set[str]:
    found = set()
    for top, directories, _ in os.walk("/sys/fs/cgroup"):
        for name in directories:
            if name.startswith("execbox"):
                found.add(os.path.join(top, name))
    return found


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" ", 4)[4] for line in f)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Load:
    def __init__(self, base: Path, flags: list[str], marker: str) -> None:
        self.base = base
        self.build = base / "build"
        self.build.mkdir()
        self.socket = base / "runner.sock"
        self.log = base / "runner.log"
        self.flags = flags
        self.marker = marker
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.wrong: list[str] = []
        self.counts = {"exit": 0, "signal": 0, "cancelled": 0}

    def start(self) -> runner_pb2_grpc.RunnerStub:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*EXECBOX, "runner", "--listen", f"unix:{self.socket}", "--build-directory",
                 str(self.build), *self.flags], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while b"listening" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the runner did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        return runner_pb2_grpc.RunnerStub(grpc.insecure_channel(f"unix:{self.socket}"))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _action(self, index: int) -> tuple[str, Path]:
        name = f"a{index}"
        directory = self.build / name
        for sub in ("", "root", "tmp", "server_logs"):
            (directory / sub).mkdir(exist_ok=True)
            (directory / sub).chmod(0o777)
        return name, directory

    def _request(self, name: str, script: str) -> runner_pb2.RunRequest:
        return runner_pb2.RunRequest(
            arguments=["sh", "-c", script, self.marker], environment_variables={"PATH": PATH},
            input_root_directory=f"{name}/root", temporary_directory=f"{name}/tmp",
            stdout_path=f"{name}/stdout", stderr_path=f"{name}/stderr",
            server_logs_directory=f"{name}/server_logs")

    def _note(self, problem: str) -> None:
        with self.lock:
            self.wrong.append(problem)

    def _count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    def one(self, stub: runner_pb2_grpc.RunnerStub, index: int, cancel: bool,
            rng: random.Random) -> None:
        name, directory = self._action(index)
        if cancel:
            # $0 is the marker: the setsid child and the waiting shell carry it in argv.
            script = ("trap '' TERM; setsid sh -c \"trap '' TERM; sleep 60\" \"$0\" & "
                      "sh -c \"trap '' TERM; sleep 60\" \"$0\" & wait")
            future = stub.Run.future(self._request(name, script), timeout=120)
            time.sleep(rng.uniform(0.0, 0.3))
            if future.cancel():
                self._count("cancelled")
            else:
                self._note(f"{name}: a 60 s action ended before its cancel: {future.result()}")
            return
        if rng.random() < 0.5:
            code = rng.randrange(0, 256)
            response = stub.Run(self._request(name, f"echo {name}; exit {code}"), timeout=120)
            got = (response.exit_code, (directory / "stdout").read_text())
            if got != (code, f"{name}\n"):
                self._note(f"{name}: expected exit {code} and its line, got {got}")
            self._count("exit")
            return
        sig = rng.choice(SIGNALS)
        response = stub.Run(self._request(name, f"kill -{sig} $$"), timeout=120)
        usage = resourceusage_pb2.POSIXResourceUsage()
        response.resource_usage[0].Unpack(usage)
        if (response.exit_code, usage.termination_signal) != (-1, sig):
            self._note(f"{name}: expected exit -1 by {sig}, got {response.exit_code} "
                       f"by {usage.termination_signal!r}")
        self._count("signal")


def _survivors(marker: str, seconds: float) -> list[int]:
    """Marked processes, waited for: a cancelled call returns before the runner has ended
    its tree (bb_worker does not wait either), which takes the grace period."""
    deadline = time.monotonic() + seconds
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def run(runs: int, concurrency: int, cancel: float, flags: list[str],
        seed: int) -> dict[str, object]:
    marker = f"execbox-load-{uuid.uuid4().hex[:12]}"
    rng = random.Random(seed)
    plan = [rng.random() < cancel for _ in range(runs)]
    cgroups_before, mounts_before = _execbox_cgroups(), _mounts()
    with tempfile.TemporaryDirectory(prefix="execbox-runner-load-") as base:
        load = Load(Path(base), ["--concurrency", str(concurrency), *flags], marker)
        try:
            stub = load.start()
            assert load.proc is not None
            # One Run first: the runner's fds then include our connection (and the fork
            # server's), which stay for as long as we are connected.
            stub.Run(load._request(load._action(runs)[0], "true"), timeout=120)
            fds_before = _fds(load.proc.pid)
            began = time.monotonic()
            with ThreadPoolExecutor(concurrency) as pool:
                jobs = [pool.submit(load.one, stub, index, cancelled,
                                    random.Random(seed * 100003 + index))
                        for index, cancelled in enumerate(plan)]
                for index, job in enumerate(jobs):
                    try:
                        job.result()
                    except grpc.RpcError as exc:
                        load._note(f"a{index}: {exc.code().name}: {exc.details()}")
            seconds = time.monotonic() - began
            survivors = _survivors(marker, 30)
            fds_after = _fds(load.proc.pid)
            deadline = time.monotonic() + 10
            while fds_after > fds_before and time.monotonic() < deadline:
                time.sleep(0.1)
                fds_after = _fds(load.proc.pid)
        finally:
            load.stop()
        left_cgroups = sorted(_execbox_cgroups() - cgroups_before)
        deadline = time.monotonic() + 10
        while left_cgroups and time.monotonic() < deadline:  # idle supervisors' ready cgroups
            time.sleep(0.1)
            left_cgroups = sorted(_execbox_cgroups() - cgroups_before)
        new_mounts = sorted(set(_mounts()) - set(mounts_before))
    return {"runs": runs, "concurrency": concurrency, "flags": flags, **load.counts,
            "wrong": load.wrong[:20], "wrong_count": len(load.wrong),
            "leaked_processes": survivors, "runner_fds_before": fds_before,
            "runner_fds_after": fds_after, "leaked_mounts": new_mounts,
            "leaked_cgroups": left_cgroups, "seconds": round(seconds, 2),
            "runs_per_second": round(runs / seconds, 1)}


def failed(report: dict[str, object]) -> bool:
    return bool(report["wrong_count"] or report["leaked_processes"] or report["leaked_mounts"]
                or report["leaked_cgroups"]
                or report["runner_fds_after"] != report["runner_fds_before"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cancel", type=float, default=0.1, help="share of Runs cancelled")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=("sandbox", "no-sandbox"), default="sandbox")
    args = parser.parse_args()
    flags = ["--no-sandbox"] if args.mode == "no-sandbox" else []
    report = run(args.runs, args.concurrency, args.cancel, flags, args.seed)
    print(json.dumps(report))
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
