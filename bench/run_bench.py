"""execbox against its peers, each pair measured interleaved in one run.

A: execbox.run(["/bin/true"])           vs  subprocess.run(["/bin/true"])   (per launch)
B: `execbox run -- /bin/true`           vs  the smallest Python wrapper      (start to exit)
C: `execbox run --pty -- cat FILE`      vs  `script -qc 'cat FILE' /dev/null` (200 MB)
D: PTY starts of /bin/true from 8 threads, counting failures (the full stress figure)
E: execbox.run(["/bin/true"], sandbox=SandboxSpec())  vs  bwrap --unshare-all ... /bin/true,
   one at a time and two at a time
F: launches per second of /bin/true from 8 threads, execbox.run vs subprocess.run, the two
   kinds alternated in rounds of a fixed duration
G: where a plain execbox.run(["/bin/true"]) spends its time on the caller's side, timed by
   wrapping the API's internals from outside (nothing in src is changed for it)

Prints medians and ratios and rewrites docs/benchmarks.md (date and machine included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import execbox

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = "import subprocess,sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def interleave(pairs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(rounds):
        for name, action in pairs.items():
            started = time.perf_counter()
            action()
            samples[name].append(time.perf_counter() - started)
    return samples


def pty_throughput(cli: str, megabytes: int, rounds: int) -> dict[str, float]:
    """Median MB/s of a step writing megabytes through a pty, against script(1)."""
    script = shutil.which("script")
    if rounds <= 0 or script is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".txt") as data:
        chunk = (b"0123456789abcdef" * 4 + b"\n") * 16384
        written = 0
        while written < megabytes * 1_000_000:
            written += data.write(chunk[: megabytes * 1_000_000 - written])
        data.flush()
        quoted = shlex.quote(data.name)
        devnull = subprocess.DEVNULL
        samples = interleave({
            "execbox run --pty": lambda: subprocess.run(
                [cli, "run", "--pty", "--", "cat", data.name], stdin=devnull,
                stdout=devnull, check=True),
            "script": lambda: subprocess.run(
                [script, "-qc", f"cat {quoted}", "/dev/null"], stdin=devnull, stdout=devnull,
                check=True),
        }, rounds)
    return {name: megabytes / statistics.median(v) for name, v in samples.items()}


def pty_starts(count: int) -> tuple[int, int, float]:
    """count PTY starts from 8 threads; returns (starts, failures, seconds)."""
    if count <= 0:
        return 0, 0, 0.0
    lock = threading.Lock()
    state = {"left": count, "failed": 0}

    def worker() -> None:
        while True:
            with lock:
                if state["left"] <= 0:
                    return
                state["left"] -= 1
            result = execbox.run(["/bin/true"], pty=True, stdout=execbox.DEVNULL)
            if result.exit_code != 0 or result.failure is not None:
                with lock:
                    state["failed"] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count, state["failed"], time.perf_counter() - started


BWRAP = ["--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc",
         "--dev", "/dev", "/bin/true"]


_WORKDIRS: list[tempfile.TemporaryDirectory[str]] = []


def _workdir() -> str:
    """A project directory for the sandboxed launches (the sandbox never binds the host's
    /tmp itself read-write), removed when the benchmark ends."""
    if not _WORKDIRS:
        _WORKDIRS.append(tempfile.TemporaryDirectory(prefix="execbox-bench-"))
    return _WORKDIRS[0].name


def sandbox_against_bwrap(rounds: int) -> dict[int, tuple[float, float]]:
    """Median ms per sandboxed /bin/true for execbox and bwrap, at concurrency 1 and 2."""
    bwrap = shutil.which("bwrap")
    if rounds <= 0 or bwrap is None:
        return {}
    box = execbox.SandboxSpec()
    tmp = _workdir()

    def ours() -> None:
        result = execbox.run(["/bin/true"], sandbox=box, cwd=tmp)
        assert result.exit_code == 0, result.failure

    def theirs() -> None:
        subprocess.run([bwrap, *BWRAP], check=True)

    def pair(action: Callable[[], object]) -> Callable[[], object]:
        def both() -> None:
            worker = threading.Thread(target=action)
            worker.start()
            action()
            worker.join()
        return both

    ours()
    figures = {}
    for concurrency, (mine, peer) in ((1, (ours, theirs)), (2, (pair(ours), pair(theirs)))):
        samples = interleave({"execbox": mine, "bwrap": peer}, rounds)
        figures[concurrency] = (statistics.median(samples["execbox"]) * 1000,
                                statistics.median(samples["bwrap"]) * 1000)
    return figures


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def _one_per_address_space(pids: list[int]) -> list[int]:
    """pids less those sharing another's address space (a native pid 1 is a CLONE_VM clone
    of its supervisor: smaps_rollup shows it the supervisor's pages, counted once here)."""
    from execbox.linux.syscalls import same_memory

    kept: list[int] = []
    for pid in pids:
        try:
            if not any(same_memory(pid, other) for other in kept):
                kept.append(pid)
        except OSError:  # gone meanwhile
            continue
    return kept


def _restart_server() -> None:
    """Close the fork server and wait until it and its helpers are gone (the next launch
    starts a new one)."""
    from execbox.server.client import default_server
    from execbox.supervise.proctree import descendants, parent_of

    server = default_server()
    if server.pid is None:
        return
    gone = [server.pid, *descendants(server.pid)]
    anchor = parent_of(server.pid)
    if anchor is not None:
        gone.append(anchor)
    server.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in gone):
        time.sleep(0.05)


def helper_memory(count: int) -> dict[str, tuple[float, int, int]]:
    """PSS (MB, from smaps_rollup) and number of the helper processes that keep `count`
    steps (`sleep`) running at once: execbox's fork server, anchor, supervisors, relays and
    pid 1s (sandboxed and plain), and how many address spaces they have (a native pid 1
    shares its supervisor's); bubblewrap's own processes for the same steps."""
    from execbox.server.client import default_server
    from execbox.supervise.proctree import comm_of, descendants, parent_of

    if count <= 0:
        return {}
    figures: dict[str, tuple[float, int, int]] = {}
    # Each kind with a fresh fork server: the other kind's idle supervisors are not these
    # steps' helpers (they would linger up to IDLE_EXIT_SECONDS).
    for label, options in (("plain", {}), ("sandboxed", {"sandbox": execbox.SandboxSpec()})):
        _restart_server()
        handles = [execbox.start(["/bin/sleep", "60"], **options) for _ in range(count)]
        try:
            for handle in handles:
                handle.wait_started(timeout=60)
            time.sleep(1)
            server = default_server().pid
            assert server is not None
            helpers = [pid for pid in (parent_of(server), server) if pid is not None]
            helpers += [pid for pid in descendants(server) if comm_of(pid) != "sleep"]
            spaces = _one_per_address_space(helpers)
            figures[label] = (sum(map(_pss_kib, spaces)) / 1024, len(helpers), len(spaces))
        finally:
            for handle in handles:
                handle.cancel()
            for handle in handles:
                handle.wait(timeout=60)
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        procs = [subprocess.Popen([bwrap, *BWRAP[:-1], "/bin/sleep", "60"]) for _ in range(count)]
        try:
            time.sleep(2)
            helpers = [p.pid for p in procs]
            helpers += [c for p in procs for c in descendants(p.pid)
                        if comm_of(c) == "bwrap"]
            figures["bwrap"] = (sum(map(_pss_kib, helpers)) / 1024, len(helpers), len(helpers))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    return figures


def launch_rates(threads: int, seconds: float, rounds: int
                 ) -> dict[str, tuple[list[float], int]]:
    """Launches/s of /bin/true from `threads` threads, per round, and failures, for
    execbox.run and subprocess.run; the kinds alternate (order swapped every round) so that
    both see the same load on a shared machine."""
    if rounds <= 0 or seconds <= 0:
        return {}

    def ours() -> bool:
        result = execbox.run(["/bin/true"])
        return result.exit_code == 0 and result.failure is None

    def theirs() -> bool:
        return subprocess.run(["/bin/true"], check=False).returncode == 0

    def one_round(launch: Callable[[], bool]) -> tuple[float, int]:
        counts = [0] * threads
        failed = [0] * threads
        ready = threading.Barrier(threads + 1)
        stop = [0.0]

        def worker(index: int) -> None:
            ready.wait()
            while time.perf_counter() < stop[0]:
                if not launch():
                    failed[index] += 1
                counts[index] += 1

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        started = time.perf_counter()
        stop[0] = started + seconds
        ready.wait()
        for thread in pool:
            thread.join()
        return sum(counts) / (time.perf_counter() - started), sum(failed)

    kinds = {"execbox.run": ours, "subprocess.run": theirs}
    figures: dict[str, tuple[list[float], int]] = {name: ([], 0) for name in kinds}
    for number in range(rounds):
        order = list(kinds) if number % 2 == 0 else list(reversed(kinds))
        for name in order:
            rate, failed = one_round(kinds[name])
            rates, failures = figures[name]
            rates.append(rate)
            figures[name] = (rates, failures + failed)
    return figures


PHASES = (
    ("build", "options -> CommandSpec (`build_spec`)"),
    ("prepare", "stdio and `Execution` set-up (rest of `start()`)"),
    ("handoff", "job socket and fds to the fork server (`ForkServer.submit`)"),
    ("request", "socketpair, encode and send the request (rest of `_submit`)"),
    ("pid", "wait until the step's pid arrives (`wait_started()`)"),
    ("result", "wait from the pid to the Result (`wait()`)"),
    ("total", "instrumented launch, `start()` to Result"),
    ("plain", "plain `execbox.run(['/bin/true'])`, same rounds"),
)


SANDBOX_PHASES = (
    ("hand over", "supervisor: plan, checks the ready process fits, renames its cgroup"),
    ("sent", "the rest of the plan made the step launcher's program, sent with the job's "
     "fds (`SCM_RIGHTS`)"),
    ("step await_job", "the rest of the plan and the job's fds to it (`SCM_RIGHTS`)"),
    ("step unshare_namespaces", "in it: its cgroup namespace"),
    ("step dup2", "in it: the job's stdio"),
    ("step bind_workdir", "in it: the working directory (idmapped bind)"),
    ("step enter_root", "in it: read-only root, `pivot_root`, detach the host's"),
    ("step join_userns", "in it: the step's user namespace and ids"),
    ("step drop_privileges", "in it: every capability dropped, `no_new_privs`"),
    ("exec seen", "in it: the launcher's syscalls (cgroup namespace, stdio, working directory, "
     "root, ids, capabilities) and the step's `execve`, until the supervisor sees it"),
    ("step reaped", "the step runs and exits"),
    ("result", "its pid 1 ends (its mount namespace is freed after the Result); the step "
     "cgroup's statistics and removal; the Result"),
    ("total", "the launch, job to Result"),
)


def sandbox_phases(runs: int) -> dict[str, Any]:
    """bench/sandbox_phases.py in a process of its own (it supervises steps itself)."""
    if runs <= 0 or os.geteuid() != 0:
        return {}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sandbox_phases.py"),
                           str(runs)], capture_output=True, text=True, timeout=600,
                          check=False)
    if proc.returncode != 0:
        print(f"sandbox phases failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return {}
    return dict(json.loads(proc.stdout))


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy (every process and the kernel's own
    deferred work), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(value) for value in f.readline().split()[1:]]
    busy = sum(ticks[:3]) + ticks[5] + ticks[6]  # user, nice, system, irq, softirq (not
    return busy / os.sysconf("SC_CLK_TCK")        # steal: other VMs' time on our cores)


def sandbox_sustained(rounds: int, block: int = 20) -> dict[tuple[str, int], tuple[float, float]]:
    """(wall ms per launch, whole-machine CPU ms per launch), medians over blocks of `block`
    sandboxed /bin/true per kind at concurrency 1 and 2, the kinds alternating block by
    block. Unlike the launch-by-launch rows, work a launch leaves for later (a supervisor
    making the next pid 1 ahead, the kernel freeing namespaces) is counted against the
    kind that caused it, not against whichever launch runs next: this is the rate a worker
    that runs only sandboxed steps gets."""
    bwrap = shutil.which("bwrap")
    if rounds <= 0 or bwrap is None:
        return {}
    box = execbox.SandboxSpec()
    tmp = _workdir()
    kinds: dict[str, Callable[[], object]] = {
        "execbox": lambda: execbox.run(["/bin/true"], sandbox=box, cwd=tmp),
        "bwrap": lambda: subprocess.run([bwrap, *BWRAP], check=True)}

    def run_block(launch: Callable[[], object], concurrency: int) -> tuple[float, float]:
        def loop() -> None:
            for _ in range(block):
                launch()

        launch()  # the first after the other kind's block is not counted
        time.sleep(0.1)
        busy, started = _busy_seconds(), time.perf_counter()
        threads = [threading.Thread(target=loop) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        time.sleep(0.1)  # what the block left for later is counted too
        count = block * concurrency
        return wall / count * 1000, (_busy_seconds() - busy) / count * 1000

    figures: dict[tuple[str, int], tuple[float, float]] = {}
    for concurrency in (1, 2):
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in kinds}
        for number in range(rounds):
            order = list(kinds.items()) if number % 2 == 0 else list(kinds.items())[::-1]
            for name, launch in order:
                samples[name].append(run_block(launch, concurrency))
        for name, values in samples.items():
            figures[(name, concurrency)] = (statistics.median(v[0] for v in values),
                                            statistics.median(v[1] for v in values))
    return figures


def launch_phases(runs: int) -> dict[str, float]:
    """Median ms per caller-side phase of a plain launch. build_spec, Execution._submit and
    ForkServer.submit are wrapped with timers for the duration (src is not edited), so an
    instrumented launch is slightly slower than the plain one measured alongside it."""
    if runs <= 0:
        return {}
    import execbox.api.run as api_run
    from execbox.api.execution import Execution
    from execbox.server.client import ForkServer

    spent: dict[str, float] = {}

    def timed(key: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - started
        return wrapper

    originals = [(api_run, "build_spec", api_run.build_spec),
                 (Execution, "_submit", Execution._submit),
                 (ForkServer, "submit", ForkServer.submit)]
    for owner, name, function in originals:
        setattr(owner, name, timed(name, function))
    samples: dict[str, list[float]] = {key: [] for key, _ in PHASES}
    try:
        for _ in range(runs):
            spent.clear()
            t0 = time.perf_counter()
            execution = execbox.start(["/bin/true"])
            t1 = time.perf_counter()
            execution.wait_started()
            t2 = time.perf_counter()
            result = execution.wait()
            t3 = time.perf_counter()
            assert result.exit_code == 0, result.failure
            submit = spent["_submit"]
            phases = {"build": spent["build_spec"],
                      "prepare": (t1 - t0) - spent["build_spec"] - submit,
                      "handoff": spent["submit"], "request": submit - spent["submit"],
                      "pid": t2 - t1, "result": t3 - t2, "total": t3 - t0}
            for key, value in phases.items():
                samples[key].append(value)
            started = time.perf_counter()
            execbox.run(["/bin/true"])
            samples["plain"].append(time.perf_counter() - started)
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)
    return {key: statistics.median(values) * 1000 for key, values in samples.items()}


def _process_cpu(pid: int) -> float:
    """Seconds of CPU (user and system) one process has used, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def launch_cpu(runs: int) -> dict[str, dict[str, float]]:
    """CPU ms per plain launch of /bin/true, by process, one launch at a time: this
    process, the fork server, its supervisors, and the rest of the machine (the steps and
    the kernel's own work); for subprocess.run, this process and the rest. The two kinds
    alternate in blocks, so neither's deferred work is counted against the other."""
    if runs <= 0:
        return {}
    from execbox.server.client import default_server

    server = default_server()
    block = max(1, runs // 5)
    kinds: dict[str, Callable[[], object]] = {
        "execbox": lambda: execbox.run(["/bin/true"]),
        "subprocess": lambda: subprocess.run(["/bin/true"], check=False)}
    totals: dict[str, dict[str, float]] = {name: {} for name in kinds}
    for _ in range(5):
        for name, launch in kinds.items():
            launch()
            helpers = [server.pid, *_children_of(server.pid)] if server.pid else []
            before = {pid: _process_cpu(pid) for pid in helpers}
            busy, mine = _busy_seconds(), time.process_time()
            for _ in range(block):
                launch()
            spent = {"caller": time.process_time() - mine}
            if name == "execbox":
                after = {pid: _process_cpu(pid) for pid in helpers}
                spent["server"] = after[helpers[0]] - before[helpers[0]]
                spent["supervisors"] = sum(after[p] - before[p] for p in helpers[1:])
            time.sleep(0.05)  # what the block left for later is counted too
            spent["machine"] = _busy_seconds() - busy
            for key, value in spent.items():
                totals[name][key] = totals[name].get(key, 0.0) + value
    return {name: {key: value / (block * 5) * 1000 for key, value in spent.items()}
            for name, spent in totals.items()}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-rounds", type=int, default=1000)
    parser.add_argument("--cli-rounds", type=int, default=200)
    parser.add_argument("--pty-rounds", type=int, default=7)  # (3 were too few on shared cores)
    parser.add_argument("--pty-megabytes", type=int, default=200)
    parser.add_argument("--pty-starts", type=int, default=100_000)
    parser.add_argument("--sandbox-rounds", type=int, default=200)
    parser.add_argument("--rate-rounds", type=int, default=3,
                        help="rounds per kind of the 8-thread launch rate (default: 3)")
    parser.add_argument("--rate-seconds", type=float, default=2.0,
                        help="duration of each such round, in seconds (default: 2)")
    parser.add_argument("--phase-runs", type=int, default=1000,
                        help="instrumented launches for the phase breakdown (default: 1000)")
    parser.add_argument("--sandbox-phase-runs", type=int, default=100,
                        help="in-process sandboxed launches for their breakdown (default: 100)")
    parser.add_argument("--memory-steps", type=int, default=64,
                        help="steps kept running at once for the helper-memory row "
                             "(default: 64)")
    parser.add_argument("--sustained-rounds", type=int, default=8,
                        help="blocks of 20 sandboxed launches per kind and concurrency for "
                             "the sustained rows (default: 8)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    load_before = os.getloadavg()

    cli = shutil.which("execbox", path=os.path.dirname(sys.executable)) or "execbox"
    execbox.run(["/bin/true"])  # start the fork server outside the measurement
    for _ in range(50):  # warm caches for both sides
        execbox.run(["/bin/true"])
        subprocess.run(["/bin/true"], check=False)

    api = interleave({
        "execbox.run": lambda: execbox.run(["/bin/true"]),
        "subprocess.run": lambda: subprocess.run(["/bin/true"], check=False),
    }, args.api_rounds)
    devnull = subprocess.DEVNULL
    command = interleave({
        "execbox run": lambda: subprocess.run([cli, "run", "--", "/bin/true"], stdin=devnull,
                                              check=True),
        "python wrapper": lambda: subprocess.run([sys.executable, "-c", WRAPPER, "/bin/true"],
                                                 stdin=devnull, check=True),
    }, args.cli_rounds)

    rates = launch_rates(8, args.rate_seconds, args.rate_rounds)
    phases = launch_phases(args.phase_runs)
    cpu = launch_cpu(args.phase_runs)
    box_phases = sandbox_phases(args.sandbox_phase_runs)
    throughput = pty_throughput(cli, args.pty_megabytes, args.pty_rounds)
    sandbox = sandbox_against_bwrap(args.sandbox_rounds)
    sustained = sandbox_sustained(args.sustained_rounds)
    starts, failures, seconds = pty_starts(args.pty_starts)
    memory = helper_memory(args.memory_steps)

    med = {name: statistics.median(v) * 1000 for name, v in {**api, **command}.items()}
    api_ratio = med["execbox.run"] / med["subprocess.run"]
    cli_ratio = med["execbox run"] / med["python wrapper"]
    lines = [
        f"| `execbox.run(['/bin/true'])` | {med['execbox.run']:.3f} ms "
        f"| `subprocess.run(['/bin/true'])` | {med['subprocess.run']:.3f} ms "
        f"| {api_ratio:.2f}x | <= 1.0x |",
        f"| `execbox run -- /bin/true` | {med['execbox run']:.2f} ms "
        f"| minimal Python wrapper | {med['python wrapper']:.2f} ms "
        f"| {cli_ratio:.2f}x | <= 1.3x |",
    ]
    if rates:
        (mine_rates, mine_failed), (peer_rates, peer_failed) = (
            rates["execbox.run"], rates["subprocess.run"])
        mine, peer = statistics.median(mine_rates), statistics.median(peer_rates)
        lines.append(f"| `execbox.run(['/bin/true'])`, 8 threads, {mine_failed} failed "
                     f"| {mine:.0f} launches/s | `subprocess.run(['/bin/true'])`, 8 threads, "
                     f"{peer_failed} failed | {peer:.0f} launches/s | {mine / peer:.2f}x "
                     f"| >= 1.0x |")
    if throughput:
        mine, peer = throughput["execbox run --pty"], throughput["script"]
        lines.append(f"| `execbox run --pty -- cat` {args.pty_megabytes} MB | {mine:.0f} MB/s "
                     f"| `script -qc cat` | {peer:.0f} MB/s | {mine / peer:.2f}x | >= 0.9x |")
    for concurrency, (mine, peer) in sorted(sandbox.items()):
        lines.append(f"| sandboxed `/bin/true`, {concurrency} at a time | {mine:.2f} ms | "
                     f"`bwrap --unshare-all --ro-bind / / --proc --dev` | {peer:.2f} ms | "
                     f"{mine / peer:.2f}x | <= 0.5x |")
    for concurrency in (1, 2):
        if ("execbox", concurrency) not in sustained:
            continue
        (mine, mine_cpu), (peer, peer_cpu) = (sustained[("execbox", concurrency)],
                                              sustained[("bwrap", concurrency)])
        lines.append(f"| sandboxed `/bin/true`, {concurrency} at a time, sustained (blocks "
                     f"of 20 per kind) | {mine:.2f} ms per launch | bwrap, same | {peer:.2f} "
                     f"ms per launch | {mine / peer:.2f}x | <= 0.5x |")
        lines.append(f"| whole-machine CPU per launch of that row | {mine_cpu:.2f} ms "
                     f"| bwrap, same | {peer_cpu:.2f} ms | {mine_cpu / peer_cpu:.2f}x | |")
    if "sandboxed" in memory:
        mine, helpers, spaces = memory["sandboxed"]
        plain, plain_helpers, _ = memory["plain"]
        peer, peer_helpers, _ = memory.get("bwrap", (0.0, 0, 0))
        lines.append(f"| helper PSS, {args.memory_steps} sandboxed steps running | {mine:.0f} MB "
                     f"in {helpers} processes, {spaces} address spaces (plain steps: "
                     f"{plain:.0f} MB in {plain_helpers}) "
                     f"| bwrap, same steps | {peer:.0f} MB in {peer_helpers} processes "
                     f"| {mine / peer if peer else 0:.2f}x | < 120 MB |")
    if starts:
        lines.append(f"| PTY starts of /bin/true, 8 threads | {starts} starts, {failures} "
                     f"failed, {seconds:.0f} s | | | | 0 failures |")
    tables = [
        "| execbox | median | peer | median | ratio | target |",
        "|---|---|---|---|---|---|",
        *lines,
    ]
    if phases:
        tables += [
            "",
            f"Where a plain launch's time goes, on the caller's side ({args.phase_runs} "
            "launches of `/bin/true`, medians, which need not add up; `build_spec`, "
            "`Execution._submit` and `ForkServer.submit` are wrapped with timers from outside "
            "for this, so the instrumented launch costs a little more than the plain one "
            "timed in the same rounds):",
            "",
            "| phase of `execbox.run(['/bin/true'])` | median | share of total |",
            "|---|---|---|",
            *(f"| {label} | {phases[key]:.3f} ms | "
              f"{phases[key] / phases['total'] * 100:.0f}% |"
              if key not in ("total", "plain") else f"| {label} | {phases[key]:.3f} ms | |"
              for key, label in PHASES),
        ]
    if cpu:
        mine, peer = cpu["execbox"], cpu["subprocess"]
        rest = mine["machine"] - mine["caller"] - mine["server"] - mine["supervisors"]
        tables += [
            "",
            f"CPU per plain launch of `/bin/true`, by process ({args.phase_runs} launches "
            "per kind, one at a time, in alternating blocks; from /proc, in clock ticks, "
            "so small figures are coarse). It bounds the 8-thread row: on a machine whose "
            "cores are all busy, launches per second are the cores over the CPU a launch "
            "takes.",
            "",
            "| CPU per launch | execbox.run | subprocess.run |",
            "|---|---|---|",
            f"| the calling process | {mine['caller']:.3f} ms | {peer['caller']:.3f} ms |",
            f"| the fork server | {mine['server']:.3f} ms | |",
            f"| the step's supervisor | {mine['supervisors']:.3f} ms | |",
            f"| the step itself and the kernel's own work (the rest) | {rest:.3f} ms "
            f"| {peer['machine'] - peer['caller']:.3f} ms |",
            f"| the whole machine | {mine['machine']:.3f} ms | {peer['machine']:.3f} ms |",
        ]
    if box_phases:
        steps = box_phases["phases"]
        tables += [
            "",
            f"Where a root caller's sandboxed launch of `/bin/true` goes, inside the process "
            f"that supervises it ({box_phases['runs']} launches in a process of their own, "
            f"each adopting a sandbox made ahead as an idle supervisor makes it, a native "
            f"pid 1 and the process that becomes the step beside it: "
            f"{box_phases['adopted']} adopted, {box_phases.get('launcher', 0)} of them "
            f"waiting in the step launcher; medians, which need not add up; the caller's "
            f"side and its two process hops come on top, as for a plain launch above). Off "
            f"the launch path, making it (pid 1's clone, the fork, cgroup, device proof, "
            f"namespaces, the base of the root, the exec into the launcher) took "
            f"{box_phases['made_ahead']:.1f} ms.",
            "",
            "| phase of a sandboxed launch | median | share of total |",
            "|---|---|---|",
            *(f"| {label} | {steps[key]:.3f} ms | "
              + (f"{steps[key] / steps['total'] * 100:.0f}% |" if key != "total" else " |")
              for key, label in SANDBOX_PHASES if key in steps),
        ]
    report = "\n".join(tables)
    print(report)
    if not args.no_write:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        load = " ".join(f"{x:.2f}" for x in load_before)
        load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
        reduced = [f"{action.dest.replace('_', '-')} {getattr(args, action.dest)} (default "
                   f"{action.default})" for action in parser._actions
                   if action.dest not in ("help", "no_write")
                   and getattr(args, action.dest) != action.default]
        section = (f"## Latest run: {stamp}\n\nMachine: {machine()}; load average {load} at "
                   f"the start, {load_end} at the end. The machine is shared (other jobs run "
                   f"on its cores), so absolute figures move from run to run: read the ratios. "
                   f"{args.api_rounds} API rounds, {args.cli_rounds} CLI rounds, "
                   f"{args.pty_rounds} PTY throughput rounds and {args.rate_rounds} rounds of "
                   f"{args.rate_seconds:g} s per kind for the 8-thread launch rate, "
                   f"interleaved."
                   + (f" Run with reduced settings to keep it under 6 minutes: "
                      f"{', '.join(reduced)}." if reduced else "")
                   + f"\n\n{report}\n")
        path = ROOT / "docs" / "benchmarks.md"
        text = path.read_text() if path.exists() else ""
        head, marker, _ = text.partition("## Latest run:")
        path.write_text((head if marker else text + "\n") + section)
        print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
