"""Where a root caller's sandboxed launch of /bin/true spends its time, inside the process
that supervises it (run by run_bench.py in a process of its own; prints JSON).

Each launch: a ready pid 1 is made for the profile (spawn/ready.py, as an idle supervisor
does, timed apart since it is off the launch path), then the step is supervised as a
supervisor does. Where the step launcher serves, what runs in the ready process is its
program of syscalls, timed as one; otherwise the Python child steps are wrapped with timers
from outside (nothing in src is changed for it), and the process that runs them writes its
timestamps to shared memory, since it is another process.
"""

from __future__ import annotations

import itertools
import json
import mmap
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from execbox import child
from execbox.model.options import build_spec
from execbox.model.sandbox import SandboxSpec
from execbox.plan.build import build_plan
from execbox.spawn import ready
from execbox.supervise import supervision as sv

_SLOT = struct.Struct("q24s")
_memory = mmap.mmap(-1, 1 << 16)  # shared with forked children


def _mark(label: str) -> None:
    count = struct.unpack_from("i", _memory, 0)[0]
    _SLOT.pack_into(_memory, 8 + count * _SLOT.size, time.perf_counter_ns(), label.encode()[:24])
    struct.pack_into("i", _memory, 0, count + 1)


def _marks() -> list[tuple[str, int]]:
    count = struct.unpack_from("i", _memory, 0)[0]
    found = []
    for index in range(count):
        stamp, label = _SLOT.unpack_from(_memory, 8 + index * _SLOT.size)
        found.append((label.rstrip(b"\0").decode(), stamp))
    return found


def _timed_step(name: str, function: Callable[..., None]) -> Callable[..., None]:
    def step(ctx: Any, *args: Any) -> None:
        if name == "spawn_step":
            _mark("spawn")
        function(ctx, *args)
        _mark(f"step {name}")

    return step


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    child.lookup("fork_relay")
    for name in child.CORE_STEPS:
        child.lookup(name)
    for name, function in list(child.STEPS.items()):
        if name != "execve":
            child.STEPS[name] = _timed_step(name, function)
    original_hand_over = ready.ReadyInit.hand_over

    def hand_over(self: ready.ReadyInit, *args: Any) -> None:
        _mark("hand over")
        original_hand_over(self, *args)
        _mark("sent")

    ready.ReadyInit.hand_over = hand_over  # type: ignore[method-assign]
    original_end_init = sv.Supervision._end_init

    def end_init(self: sv.Supervision, wait: bool = True) -> bool:
        _mark("step reaped")  # (pid 1's end and the cgroup's come next, in run())
        return original_end_init(self, wait)

    sv.Supervision._end_init = end_init  # type: ignore[method-assign]
    workdir = tempfile.TemporaryDirectory(prefix="execbox-phases-")  # (not /tmp itself)
    spec = build_spec(["/bin/true"], sandbox=SandboxSpec(), cwd=workdir.name)
    phases: dict[str, list[float]] = {}
    made_ahead: list[float] = []
    adopted = launcher = 0
    for _ in range(runs):
        began = time.perf_counter_ns()
        prepared = ready.prepare(ready.profile_of(build_plan(spec, [[1, 1], [2, 2]])))
        assert prepared is not None
        launcher += prepared.launcher
        assert prepared.wait_built(30)  # (says so when everything ahead is done)
        made_ahead.append((time.perf_counter_ns() - began) / 1e6)
        time.sleep(0.02)
        struct.pack_into("i", _memory, 0, 0)
        _mark("job")
        supervision = sv.Supervision(spec, build_plan(spec, [[1, 1], [2, 2]]), prepared,
                                     defer_teardown=True)  # as the fork server's
        pid = supervision.start()
        _mark("exec seen")
        result = supervision.run()
        _mark("result")
        supervision.release()  # after the result, as the fork server's supervisor does
        assert result.exit_code == 0, result.failure
        adopted += pid == prepared.pid
        marks = _marks()
        for (_, before), (label, after) in itertools.pairwise(marks):
            phases.setdefault(label, []).append((after - before) / 1e6)
        phases.setdefault("total", []).append((marks[-1][1] - marks[0][1]) / 1e6)
    print(json.dumps({"adopted": adopted, "runs": runs, "launcher": launcher,
                      "made_ahead": statistics.median(made_ahead),
                      "phases": {k: statistics.median(v) for k, v in phases.items()}}))
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
