"""`execbox worker` on a real BuildGrid farm (tests/farm.py), measured in one run.

1. Worker time per action: /bin/true with a 1,000-file input root (10 dirs x 100 files),
   cold cache (new contents every action) and warm (the same root), interleaved; from the
   worker's `lease` log lines: total - command, and fetch / execute / upload.
2. Staging that root from the warm cache in this process (stage.materialize of a plan built
   once) against `cp -al` of a staged copy, and against `cp -al` minus a /bin/true process
   start, interleaved; stage_input_root (GetTree included) for information.
3. Actions per second at capacity 2: N /bin/true actions from client threads, a sandboxed
   worker against a --no-sandbox one (both running, each on its own execbox-test-pool),
   runs alternated; with the CPU time per action of the worker, BuildGrid, PostgreSQL and
   the client, and the session calls BuildGrid saw cancelled or repeated.

Starts PostgreSQL, BuildGrid and two workers, and stops them by pid at the end. Prints the
figures and replaces the "## Worker (execbox worker + BuildGrid)" section of
docs/benchmarks.md (inserted before "## Latest run:", which bench/run_bench.py rewrites).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from execbox.adapters.reapi.cache import LocalCas  # noqa: E402
from execbox.adapters.reapi.digests import digest_key  # noqa: E402
from execbox.adapters.reapi.protos import code_pb2, re_pb2  # noqa: E402
from execbox.adapters.reapi.stage import (  # noqa: E402
    materialize,
    plan_input_root,
    stage_input_root,
)
from execbox.supervise.proctree import stat_fields  # noqa: E402
from farm import Farm, bgd_binary, new_run_dir, runs_dir  # noqa: E402
from reapi_client import Client  # noqa: E402

try:
    from run_bench import machine
except ImportError:  # bench/ not on sys.path (imported from elsewhere)
    import platform

    def machine() -> str:
        return (f"{platform.node()}: {os.cpu_count()} cores, Linux {platform.release()}, "
                f"Python {platform.python_version()}")

HEADING = "## Worker (execbox worker + BuildGrid)"
DOC = ROOT / "docs" / "benchmarks.md"
POOL = "execbox-test-pool"
#: in the environment of each worker, so its detached fork server and supervisors (which
#: inherit it) can be found for their CPU time
MARK = "EXECBOX_BENCH_WORKER"
STOP_TIMEOUT = 30.0


# -- small helpers -----------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def p90(values: Sequence[float]) -> float:
    """Nearest-rank 90th percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.2f} ms" if abs(value) < 10 else f"{value:.1f} ms"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_tree(root: Path, salt: str, dirs: int = 10, files: int = 100) -> None:
    """dirs x files small text files under root; salt makes every file's contents new."""
    for d in range(dirs):
        sub = root / f"d{d:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            (sub / f"f{f:03d}.txt").write_text(f"{salt} d{d:02d}/f{f:03d}\n" * 3)


# -- the workers -------------------------------------------------------------------------

class WorkerProc:
    """An `execbox worker` process on its own pool, started and stopped by pid."""

    def __init__(self, remote: str, home: Path, pool: str, *, sandbox: bool, capacity: int,
                 extra: Sequence[str] = ()) -> None:
        home.mkdir(parents=True)
        self.pool = pool
        self.sandbox = sandbox
        self.capacity = capacity
        self.log_path = home / "worker.log"
        self.bot_id = f"bench-{pool}-{os.getpid()}"
        self.argv = [sys.executable, str(ROOT / "bin" / "execbox"), "worker",
                     "--remote", remote, "--bot-id", self.bot_id,
                     "--capacity", str(capacity), "--build-dir", str(home / "build"),
                     "--cache-dir", str(home / "cas"), "--property", f"{POOL}={pool}",
                     "--log-format", "json", *([] if sandbox else ["--no-sandbox"]), *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        self._read = 0
        self._events: list[dict[str, Any]] = []

    def start(self, timeout: float = 60.0) -> WorkerProc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True,
                                         env={**os.environ, MARK: self.bot_id})
        deadline = time.monotonic() + timeout
        while not any(e.get("event") == "session" for e in self.events()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.pool} did not open a bot session:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        return self

    def events(self) -> list[dict[str, Any]]:
        """Every JSON line logged so far (complete lines only)."""
        with self.log_path.open("rb") as f:
            f.seek(self._read)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._read += end
        for line in data[:end].decode(errors="replace").splitlines():
            if line.startswith("{"):
                self._events.append(json.loads(line))
        return self._events

    def leases(self, actions: Sequence[str], timeout: float = 15.0) -> list[dict[str, Any]]:
        """The `lease` log lines of these actions ("hash/size"), in the same order."""
        deadline = time.monotonic() + timeout
        while True:
            found = {e.get("action"): e for e in self.events() if e.get("event") == "lease"}
            if all(a in found for a in actions):
                return [found[a] for a in actions]
            if time.monotonic() > deadline:
                missing = [a for a in actions if a not in found]
                raise RuntimeError(f"worker {self.pool} logged no lease for {missing[:3]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after STOP_TIMEOUT."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


def check(response: re_pb2.ExecuteResponse, what: str) -> None:
    if response.status.code != code_pb2.OK or response.result.exit_code != 0:
        raise RuntimeError(f"{what}: status {response.status.code} "
                           f"{response.status.message!r}, exit {response.result.exit_code}")


# -- 1. per-action worker time -----------------------------------------------------------

@dataclass
class ActionTimes:
    """One action, in seconds: the worker's lease line and what the client saw."""

    kind: str
    total: float
    fetch: float
    execute: float
    upload: float
    command: float
    e2e: float        # Execute call to its response, in the client
    queued: float     # Execute call to the worker starting the lease
    reported: float   # the worker done to the client having the response

    @property
    def overhead(self) -> float:
        return self.total - self.command

    @property
    def other(self) -> float:
        return self.total - self.fetch - self.execute - self.upload


def run_action(client: Client, worker: WorkerProc, root: Path, kind: str) -> ActionTimes:
    """Upload and execute /bin/true on root (a new Action salt each time) and time it."""
    digest = client.action(["/bin/true"], root, platform={POOL: worker.pool},
                           salt=os.urandom(8))
    submitted = time.time()
    started = time.perf_counter()
    response = client.execute(digest, skip_cache=True)
    e2e = time.perf_counter() - started
    answered = time.time()
    check(response, f"{kind} action")
    meta = response.result.execution_metadata
    lease = worker.leases([digest_key(digest)])[0]
    return ActionTimes(
        kind=kind, total=lease["total"], fetch=lease["fetch"], execute=lease["execute"],
        upload=lease["upload"], command=lease["command"], e2e=e2e,
        queued=meta.worker_start_timestamp.ToNanoseconds() / 1e9 - submitted,
        reported=answered - meta.worker_completed_timestamp.ToNanoseconds() / 1e9)


def per_action(client: Client, worker: WorkerProc, area: Path, warm_root: Path, cold: int,
               warm: int) -> list[ActionTimes]:
    """cold and warm rounds, the cold ones spread evenly among the warm ones."""
    schedule = sorted([((i + 0.5) / cold, "cold") for i in range(cold)]
                      + [(i / warm, "warm") for i in range(warm)])
    cold_root = area / "cold"
    out = []
    for n, (_, kind) in enumerate(schedule):
        root = warm_root
        if kind == "cold":
            write_tree(cold_root, f"cold-{n}-{os.urandom(6).hex()}")
            root = cold_root
        out.append(run_action(client, worker, root, kind))
    return out


# -- 2. staging against cp -al -----------------------------------------------------------

def staging(client: Client, area: Path, warm_root: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each way to build the warm root (and of stage_input_root's parts),
    interleaved, with the order rotated every round."""
    cache = LocalCas(area / "cas", 1 << 30)
    try:
        cas = client.cas
        root = client.upload_tree(warm_root)
        tree = cas.get_tree(root)
        plan = plan_input_root(tree, root, cache)
        wanted = [(d, x) for (_, x), d in plan.wanted.items()]
        cache.ensure(wanted, cas)
        source = area / "staged"
        materialize(plan, source, cache, cas)
        out = area / "out"
        out.mkdir()
        count = iter(range(1 << 30))

        def fresh() -> Path:
            return out / str(next(count))

        cp = shutil.which("cp") or "/bin/cp"
        ways: dict[str, Callable[[Path], object]] = {
            "materialize": lambda dest: materialize(plan, dest, cache, cas),
            "cp -al": lambda dest: subprocess.run([cp, "-al", str(source), str(dest)],
                                                  check=True),
            "/bin/true": lambda dest: subprocess.run(["/bin/true"], check=True),
            "stage_input_root": lambda dest: stage_input_root(cache, cas, root, dest),
            "GetTree": lambda dest: cas.get_tree(root),
            "plan_input_root": lambda dest: plan_input_root(tree, root, cache),
            "cache check": lambda dest: cache.ensure(wanted, cas),
        }
        names = list(ways)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for i in range(rounds + 2):  # two rounds of warm-up
            for name in names[i % len(names):] + names[:i % len(names)]:
                dest = fresh()
                started = time.perf_counter()
                ways[name](dest)
                seconds = time.perf_counter() - started
                if i >= 2:
                    samples[name].append(seconds)
                if dest.exists():
                    started = time.perf_counter()
                    shutil.rmtree(dest)
                    if i >= 2 and name == "materialize":
                        samples.setdefault("rmtree", []).append(time.perf_counter() - started)
        digests = [d for d, _ in wanted]
        for i in range(max(3, rounds // 3)):  # a cold cache: not interleaved, for information
            empty = LocalCas(out / f"cold-{i}", 1 << 30)
            try:
                started = time.perf_counter()
                empty.ensure(wanted, cas)
                samples.setdefault("cold cache fill", []).append(time.perf_counter() - started)
            finally:
                empty.close()
            shutil.rmtree(out / f"cold-{i}")
            started = time.perf_counter()
            cas.read_blobs(digests)
            samples.setdefault("BatchReadBlobs", []).append(time.perf_counter() - started)
        return samples
    finally:
        cache.close()


# -- 3. actions per second ---------------------------------------------------------------

@dataclass
class Rate:
    """One throughput run."""

    sandbox: bool
    per_second: float      # actions / (first submit to last response)
    steady: float          # (actions - 1) / (first response to last response)
    busy: float            # sum of lease totals / (capacity * wall time)
    totals: list[float]
    commands: list[float]
    window: tuple[float, float]  # wall-clock start and end
    cpu: dict[str, float]  # CPU seconds per action, by process (tree)
    machine: float         # the whole machine's CPU busy share during the run
    cancelled: int = 0     # UpdateBotSession calls the worker cancelled (BuildGrid's log)
    duplicates: int = 0    # completions BuildGrid had already recorded (BuildGrid's log)


def process_times() -> dict[int, tuple[int, float]]:
    """pid -> (parent, CPU seconds of it and of its reaped children), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(entry) if entry.isdigit() else None
        if fields is not None:
            out[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    return out


def tree_cpu(times: dict[int, tuple[int, float]], root: int | None) -> float:
    """CPU seconds of root and its live descendants (with the children they reaped)."""
    if root is None:
        return 0.0
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in times.items() if parent in frontier} - tree
        tree |= frontier
    return sum(times[pid][1] for pid in tree if pid in times)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [float(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def marked_cpu(times: dict[int, tuple[int, float]], value: str) -> float:
    """CPU seconds of the processes whose environment holds MARK=value (a worker, its fork
    server and supervisors, with the steps they reaped)."""
    needle = f"\0{MARK}={value}\0".encode()
    total = 0.0
    for pid, (_, seconds) in times.items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                found = needle in b"\0" + f.read()
        except OSError:
            continue
        if found:
            total += seconds
    return total


def cpu_snapshot(farm: Farm, worker: WorkerProc) -> dict[str, float]:
    """CPU seconds used so far by the worker, BuildGrid, PostgreSQL and this process."""
    times = process_times()
    mine = os.times()
    return {"worker": marked_cpu(times, worker.bot_id),
            "BuildGrid": tree_cpu(times, farm.server_pid),
            "PostgreSQL": tree_cpu(times, farm.postgres_pid),
            "client": mine.user + mine.system}


def throughput(client: Client, farm: Farm, worker: WorkerProc, root: Path, actions: int,
               threads: int) -> Rate:
    """actions /bin/true actions from `threads` client threads; timed to the last response."""
    digests = [client.action(["/bin/true"], root, platform={POOL: worker.pool},
                             salt=os.urandom(8)) for _ in range(actions)]
    pending = list(reversed(digests))
    lock = threading.Lock()
    finished: list[float] = []
    errors: list[str] = []

    def drive() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                digest = pending.pop()
            try:
                check(client.execute(digest, skip_cache=True), "throughput action")
            except Exception as exc:
                with lock:
                    errors.append(str(exc))
                return
            with lock:
                finished.append(time.perf_counter())

    drivers = [threading.Thread(target=drive, daemon=True) for _ in range(threads)]
    cpu_before, machine_before = cpu_snapshot(farm, worker), machine_busy()
    begun = time.time()
    started = time.perf_counter()
    for thread in drivers:
        thread.start()
    for thread in drivers:
        thread.join()
    cpu_after, machine_after = cpu_snapshot(farm, worker), machine_busy()
    if errors:
        raise RuntimeError(errors[0])
    wall = max(finished) - started
    leases = worker.leases([digest_key(d) for d in digests])
    totals = [e["total"] for e in leases]
    return Rate(sandbox=worker.sandbox, per_second=actions / wall,
                steady=(actions - 1) / (max(finished) - min(finished)),
                busy=sum(totals) / (worker.capacity * wall), totals=totals,
                commands=[e["command"] for e in leases], window=(begun, time.time()),
                cpu={k: (cpu_after[k] - cpu_before[k]) / actions for k in cpu_after},
                machine=(machine_after[0] - machine_before[0])
                / (machine_after[1] - machine_before[1]))


def count_session_trouble(log: Path, bot_ids: dict[bool, str], rates: list[Rate]) -> None:
    """Per run, from BuildGrid's log: its worker's UpdateBotSession calls that were cancelled
    by the worker, and completed leases it reported again after BuildGrid had recorded
    them (BuildGrid 0.9.1's wording)."""
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for rate in rates:
        bot = f'request.bot_id="{bot_ids[rate.sandbox]}"'
        for line in lines:
            found = stamp.match(line)
            if not found or (bot not in line and f"'{bot_ids[rate.sandbox]}'" not in line):
                continue
            when = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
            if not rate.window[0] <= when.timestamp() <= rate.window[1] + 0.5:
                continue
            if "][ INFO][" in line and "BotSession update was cancelled by the client" in line:
                rate.cancelled += 1
            elif "Completed lease points to non-existent or invalid job" in line:
                rate.duplicates += 1


# -- the report --------------------------------------------------------------------------

def report(args: argparse.Namespace, stamp: str, loads: tuple[str, str],
           actions: list[ActionTimes], stages: dict[str, list[float]],
           rates: list[Rate]) -> str:
    cold = [a for a in actions if a.kind == "cold"]
    warm = [a for a in actions if a.kind == "warm"]
    rows: list[tuple[str, Callable[[ActionTimes], float]]] = [
        ("**overhead: total - command**", lambda a: a.overhead),
        ("total (lease received to lease completed)", lambda a: a.total),
        ("fetch (GetTree, cache, hardlinks)", lambda a: a.fetch),
        ("execute (includes the sandbox launch)", lambda a: a.execute),
        ("... of which command (execbox's wall time)", lambda a: a.command),
        ("upload (stdout, stderr)", lambda a: a.upload),
        ("other (Action, Command, action dir)", lambda a: a.other),
        ("client: Execute to response", lambda a: a.e2e),
        ("... Execute to the lease's start", lambda a: a.queued),
        ("... lease done to the response", lambda a: a.reported),
    ]
    part1 = ["| per action | cold median | cold p90 | warm median | warm p90 |",
             "|---|---|---|---|---|"]
    for label, get in rows:
        c, w = [get(a) for a in cold], [get(a) for a in warm]
        part1.append(f"| {label} | {ms(median(c))} | {ms(p90(c))} | {ms(median(w))} "
                     f"| {ms(p90(w))} |")
    wt = median([a.total for a in warm])
    parts: list[tuple[str, Callable[[ActionTimes], float]]] = [
        ("fetch", lambda a: a.fetch), ("execute", lambda a: a.execute),
        ("upload", lambda a: a.upload), ("other", lambda a: a.other)]
    shares = ", ".join(f"{name} {median([get(a) for a in warm]) / wt:.0%}"
                       for name, get in parts)

    med = {name: median(v) for name, v in stages.items()}
    bare_cp = med["cp -al"] - med["/bin/true"]
    part2 = [
        "| building the warm root | median | materialize / this | target |",
        "|---|---|---|---|",
        f"| `materialize(plan, dest)` (plan built once; one mkdir or link per entry) "
        f"| {ms(med['materialize'])} | | |",
        f"| `cp -al SRC DEST` (includes a process start) | {ms(med['cp -al'])} "
        f"| {med['materialize'] / med['cp -al']:.2f}x | <= 1.0x |",
        f"| `/bin/true` process start (`subprocess.run`) | {ms(med['/bin/true'])} | | |",
        f"| `cp -al` minus the `/bin/true` start | {ms(bare_cp)} "
        f"| {med['materialize'] / bare_cp:.2f}x | |",
        f"| `stage_input_root` (GetTree + plan + cache check + materialize) "
        f"| {ms(med['stage_input_root'])} | | |",
        f"| ... GetTree alone | {ms(med['GetTree'])} | | |",
        f"| ... `plan_input_root` alone | {ms(med['plan_input_root'])} | | |",
        f"| ... cache check (`LocalCas.ensure`, all hits) alone | {ms(med['cache check'])} "
        "| | |",
        f"| removing a staged tree (`shutil.rmtree`, as the worker does after the lease) "
        f"| {ms(med['rmtree'])} | | |",
        f"| cold: `LocalCas.ensure` into an empty cache (1,000 blobs) "
        f"| {ms(med['cold cache fill'])} | | |",
        f"| ... one BatchReadBlobs of those blobs alone "
        f"| {ms(med['BatchReadBlobs'])} | | |",
    ]

    part3 = ["| worker | actions/s (median) | runs | steady actions/s | lease total "
             "| command | slots busy | updates cancelled | completions repeated |",
             "|---|---|---|---|---|---|---|---|---|"]
    figures: dict[bool, float] = {}
    for sandbox in (True, False):
        mine = [r for r in rates if r.sandbox == sandbox]
        figures[sandbox] = median([r.per_second for r in mine])
        runs = ", ".join(f"{r.per_second:.1f}" for r in mine)
        totals = [t for r in mine for t in r.totals]
        commands = [c for r in mine for c in r.commands]
        part3.append(f"| {'sandboxed' if sandbox else '`--no-sandbox`'} "
                     f"| {figures[sandbox]:.1f} | {runs} "
                     f"| {median([r.steady for r in mine]):.1f} | {ms(median(totals))} "
                     f"| {ms(median(commands))} | {median([r.busy for r in mine]):.0%} "
                     f"| {median([r.cancelled for r in mine]):.0f} "
                     f"| {median([r.duplicates for r in mine]):.0f} |")
    part3.append(f"| sandboxed / `--no-sandbox` | {figures[True] / figures[False]:.2f}x "
                 "| | | | | | | |")
    names = ["worker", "BuildGrid", "PostgreSQL", "client"]
    busiest = max(median([r.busy for r in rates if r.sandbox == sandbox])
                  for sandbox in (True, False))
    farm_cpu = median([r.cpu["BuildGrid"] + r.cpu["PostgreSQL"] for r in rates])
    worker_cpu = {sandbox: median([r.cpu["worker"] for r in rates if r.sandbox == sandbox])
                  for sandbox in (True, False)}
    pace = (f"The workers' slots were busy at most {busiest:.0%} of the time, and BuildGrid "
            f"with PostgreSQL used {ms(farm_cpu)} of CPU per action against the worker's "
            f"{ms(worker_cpu[True])} sandboxed and {ms(worker_cpu[False])} without: at "
            "this rate the bot session's round trips (one UpdateBotSession in flight at a "
            "time), not the leases' own time, set the pace, and the sandboxed / "
            "`--no-sandbox` ratio moves with them from run to run."
            if busiest < 0.5 else "")
    cpu = ["| CPU time per action | worker and its steps | BuildGrid | PostgreSQL "
           "| client (this process) | sum | sum x actions/s | machine busy |",
           "|---|---|---|---|---|---|---|---|"]
    for sandbox in (True, False):
        mine = [r for r in rates if r.sandbox == sandbox]
        per = {name: median([r.cpu[name] for r in mine]) for name in names}
        cpu.append(f"| {'sandboxed' if sandbox else '`--no-sandbox`'} | "
                   + " | ".join(ms(per[name]) for name in names)
                   + f" | {ms(sum(per.values()))} | {sum(per.values()) * figures[sandbox]:.2f} "
                   f"cores | {median([r.machine for r in mine]):.0%} |")

    paragraphs = {
        "intro": (
            "Produced by `./scripts/bench-worker.sh` (`make bench-worker`, or `./scripts/bench.sh "
            "--worker`): a BuildGrid 0.9.1 server on a private PostgreSQL, both on loopback "
            "(`tests/farm.py`), and two `execbox worker`s with `--capacity "
            f"{args.capacity}` and otherwise default flags, one sandboxed and one "
            "`--no-sandbox`, each on its own `execbox-test-pool`; the client "
            "(`tests/reapi_client.py`) runs in the benchmark's process. All on one machine; "
            "each run rewrites this section."),
        "machine": (
            f"Run {stamp}. Machine: {machine()}; load average {loads[0]} at the start, "
            f"{loads[1]} at the end. The machine is shared (other jobs were running on its "
            "2 cores), so absolute times move from run to run: read the ratios and shares."),
        "part1": (
            "**1. Worker time per action**: `/bin/true` with a 1,000-file input root (10 "
            "dirs x 100 files of about 50 bytes) on the sandboxed worker, from its `lease` log "
            "lines. Cold: new contents every action, so all 1,000 blobs are fetched "
            f"({args.cold_rounds} actions); warm: the same root, all in the worker's cache "
            f"({args.warm_rounds} actions, each with a new Action salt); interleaved, one "
            "action at a time; p90 is the nearest rank. `command` is execbox's wall time "
            "for the step, which starts "
            "with its supervisor and so includes the sandbox's set-up (table 3 has the "
            "`--no-sandbox` worker's): `total - command` leaves the sandbox launch out, "
            "`total` is all the time the worker held the lease. Other: reading the Command "
            "(and the Action), creating and removing the action's directory. The client "
            "rows include BuildGrid, whose job assigner runs every 1 to 2 s while no job is "
            "being assigned: that is most of the wait before the lease starts."),
        "part2": (
            "**2. Staging the warm input root, in process, against `cp -al`** "
            f"({args.stage_rounds} rounds, interleaved, the order rotated every round; each "
            "tree is built in a new directory on the cache's filesystem and removed outside "
            "the timing). `cp -al` copies an already staged tree of the same 1,010 entries; "
            "its time includes a process start, so the `/bin/true` row, measured in the "
            "same rounds, is subtracted for the second comparison. The cold rows are not "
            "interleaved and are for information."),
        "part3": (
            f"**3. Actions per second at capacity {args.capacity}**: {args.actions} "
            "`/bin/true` actions (a one-file input root, each with a new Action salt) sent "
            f"from {args.client_threads} client threads (the farm's BuildGrid has 32 server "
            "threads and each Execute stream holds one), timed from the first Execute call "
            f"to the last response; {args.throughput_runs} runs per worker, alternated. "
            "Steady: between the first and the last response, which leaves out the first "
            "assignment's wait. Slots busy: the leases' total time over capacity x wall "
            "time. Updates cancelled: the worker's UpdateBotSession calls that it cancelled "
            "itself when a lease finished (BuildGrid rolls back their work); completions "
            "repeated: finished leases reported again after BuildGrid had recorded them; "
            "both counted in BuildGrid's log, medians per run."),
        "cpu": (
            "CPU time per action in the same runs: user and system time of BuildGrid's and "
            "PostgreSQL's process trees, of the worker with its fork server and supervisors "
            "(which reap the steps), and of this process, over the actions, "
            "medians of the runs; machine busy is the share of all its CPUs that was busy, "
            "other jobs included."),
    }
    paragraphs["pace"] = pace
    text = {k: textwrap.fill(v, 95, break_on_hyphens=False, break_long_words=False)
            for k, v in paragraphs.items()}
    return "\n".join([
        HEADING, "", text["intro"], "", text["machine"], "", text["part1"], "", *part1, "",
        f"Where a warm lease's total goes (medians): {shares}.", "",
        text["part2"], "", *part2, "", text["part3"], "", *part3, "", text["cpu"], "", *cpu, "",
        *([text["pace"], ""] if pace else []),
    ])


def write_section(section: str) -> None:
    """Replace the section (its heading up to the next "## " heading), or insert it before
    "## Latest run:"."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    section = section.rstrip("\n") + "\n\n"
    mine = re.search(rf"^{re.escape(HEADING)}$", text, re.MULTILINE)
    if mine:
        after = re.compile(r"^## ", re.MULTILINE).search(text, mine.end())
        end = after.start() if after else len(text)
        text = text[:mine.start()] + section + text[end:]
    else:
        latest = re.search(r"^## Latest run:", text, re.MULTILINE)
        at = latest.start() if latest else len(text)
        head = text[:at].rstrip("\n") + "\n\n"
        text = head + section + text[at:]
    DOC.write_text(text.rstrip("\n") + "\n")


# -- main --------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold-rounds", type=int, default=8)
    parser.add_argument("--warm-rounds", type=int, default=20)
    parser.add_argument("--stage-rounds", type=int, default=30)
    parser.add_argument("--actions", type=int, default=40, help="actions per throughput run")
    parser.add_argument("--client-threads", type=int, default=16)
    parser.add_argument("--throughput-runs", type=int, default=3, help="per worker")
    parser.add_argument("--capacity", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    parser.add_argument("--keep", action="store_true", help="keep the farm's work directory")
    args = parser.parse_args()

    bgd = bgd_binary()
    if bgd is None:
        print("worker_bench: BuildGrid is not installed; run ./scripts/farm.sh install "
              "(./scripts/bench-worker.sh does)", file=sys.stderr)
        return 3

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(143)  # so that the finally below stops everything

    signal.signal(signal.SIGTERM, on_sigterm)
    began = time.monotonic()
    loads = [load_average()]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    workdir = new_run_dir(runs_dir())
    farm: Farm | None = None
    client: Client | None = None
    workers: list[WorkerProc] = []
    rates: list[Rate] = []
    try:
        farm = Farm.start(workdir, bgd=bgd)
        print(f"farm at {farm.remote} in {time.monotonic() - began:.1f}s", flush=True)
        client = Client(farm.remote, farm.instance)
        for name, sandbox in (("bench-sandbox", True), ("bench-nosandbox", False)):
            workers.append(WorkerProc(farm.remote, workdir / "workers" / name, name,
                                      sandbox=sandbox, capacity=args.capacity))
            workers[-1].start()
        sandboxed, plain = workers
        area = workdir / "trees"
        warm_root = area / "warm"
        write_tree(warm_root, "warm")
        small_root = area / "small"
        small_root.mkdir()
        (small_root / "in.txt").write_text("a small input root\n")
        for worker in workers:  # the first lease of each worker (sandbox, cache, channels)
            run_action(client, worker, small_root, "warm-up")
        run_action(client, sandboxed, warm_root, "warm-up")

        actions = per_action(client, sandboxed, area, warm_root, args.cold_rounds,
                             args.warm_rounds)
        print(f"1. per-action times done at {time.monotonic() - began:.0f}s", flush=True)
        stages = staging(client, area / "stage", warm_root, args.stage_rounds)
        print(f"2. staging done at {time.monotonic() - began:.0f}s", flush=True)
        for i in range(args.throughput_runs):
            order = (sandboxed, plain) if i % 2 == 0 else (plain, sandboxed)
            for worker in order:
                rates.append(throughput(client, farm, worker, small_root, args.actions,
                                        args.client_threads))
        print(f"3. throughput done at {time.monotonic() - began:.0f}s", flush=True)
    finally:
        for worker in reversed(workers):
            worker.stop()
        if client is not None:
            client.close()
        if farm is not None:
            farm.stop()
            if rates:
                count_session_trouble(farm.server_log, {w.sandbox: w.bot_id for w in workers},
                                      rates)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    loads.append(load_average())
    section = report(args, stamp, (loads[0], loads[1]), actions, stages, rates)
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"updated {DOC.relative_to(ROOT)} in {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
