"""Shared supervisors (server/shared.py): a root caller's sandboxed steps with a native
pid 1 are supervised many to a process, one thread each. Each step still owns its tree
alone: its cancel, its death and its supervisor's death reach it and nothing else, its pid
1 is set up as if it were the only one, and a job that needs a process of its own gets one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest

import execbox
from execbox.linux import native_init
from execbox.server import client
from execbox.server.shared import SHARED_SUPERVISORS
from execbox.supervise.proctree import comm_of, own_children, processes_with

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="shared supervisors serve a root caller"),
    pytest.mark.skipif(not native_init.available(),
                       reason=f"no native pid 1 here: {native_init._unavailable}"),
]

SIGCHLD_ONLY = f"{1 << (signal.SIGCHLD - 1):016x}"
NONE = "0" * 16


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _start_many(count: int, command: str) -> list[execbox.Execution]:
    """count sandboxed steps started at once from as many threads (so that pid 1s are
    cloned at the same moment in one supervisor's threads)."""
    handles: list[execbox.Execution] = []
    lock = threading.Lock()
    go = threading.Barrier(count)

    def one() -> None:
        go.wait()
        handle = execbox.start(["bash", "-c", command], sandbox=execbox.SandboxSpec())
        with lock:
            handles.append(handle)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for handle in handles:
        handle.wait_started(timeout=60)
    return handles


def _end(handles: list[execbox.Execution]) -> list[execbox.Result]:
    for handle in handles:
        handle.cancel(hard=True)
    return [handle.wait(timeout=60) for handle in handles]


def test_many_sandboxed_steps_share_a_few_supervisors_each_pid_1_set_up_alone(
        marker: str) -> None:
    """32 steps at once run below at most SHARED_SUPERVISORS processes; every pid 1, though
    cloned at the same moment as others in the same memory, got its own arguments: its
    name, only SIGCHLD blocked, no handler, its own pid namespace."""
    handles = _start_many(32, f"exec -a {marker} sleep 1000")
    try:
        supervisors = Counter(handle.supervisor_pid for handle in handles)
        assert len(supervisors) <= SHARED_SUPERVISORS, supervisors
        assert max(supervisors.values()) > 1, supervisors
        inits = [pid for supervisor in supervisors for pid in own_children(supervisor)
                 if pid not in {handle.pid for handle in handles}
                 and comm_of(pid) != "execbox-super"]
        assert len(inits) >= len(handles)  # (and each supervisor's ready pid 1s, if any)
        for init in inits:
            status = _status(init)
            assert status["Name"] == "execbox-init", status["Name"]
            # (SIGCHLD shows unblocked while it sleeps in sigtimedwait for it)
            assert status["SigBlk"] in (SIGCHLD_ONLY, NONE), (init, status["SigBlk"])
            assert status["SigCgt"] == status["SigIgn"] == NONE, (init, status)
        namespaces = {os.readlink(f"/proc/{handle.pid}/ns/pid") for handle in handles}
        assert len(namespaces) == len(handles)
        for handle in handles:
            assert handle.pid is not None
            assert _ppid(handle.pid) == handle.supervisor_pid
    finally:
        results = _end(handles)
    assert all(r.signal in ("SIGTERM", "SIGKILL") and r.cancelled for r in results), results
    assert not processes_with(marker)


def test_a_cancel_or_a_crash_of_one_step_leaves_the_others_in_its_supervisor_alone(
        marker: str) -> None:
    """Steps beside each other in one process: one cancelled, one whose pid 1 is killed
    from outside; the rest run to their own end and report their own statuses."""
    handles = _start_many(8, f"exec -a {marker} sleep 3")
    by_supervisor: dict[int | None, list[execbox.Execution]] = {}
    for handle in handles:
        by_supervisor.setdefault(handle.supervisor_pid, []).append(handle)
    group = max(by_supervisor.values(), key=len)
    assert len(group) >= 3, {k: len(v) for k, v in by_supervisor.items()}
    cancelled, crashed, *rest = group
    cancelled.cancel(hard=True)
    assert crashed.pid is not None
    os.kill(crashed.pid, signal.SIGKILL)
    first = cancelled.wait(timeout=30)
    second = crashed.wait(timeout=30)
    assert first.cancelled and first.signal in ("SIGTERM", "SIGKILL"), first
    assert not second.cancelled and second.signal == "SIGKILL", second
    for handle in rest:
        assert handle.pid is not None and os.path.exists(f"/proc/{handle.pid}")
    others = [handle.wait(timeout=30) for handle in handles
              if handle is not cancelled and handle is not crashed]
    assert all(r.exit_code == 0 and not r.cancelled for r in others), others
    assert not processes_with(marker)


def test_a_killed_shared_supervisor_takes_every_tree_it_held_with_it(marker: str) -> None:
    """Each caller gets the one-line report of its supervisor's death, and every step's
    whole pid namespace is gone."""
    handles = _start_many(6, f"sleep 1000 & exec -a {marker} sleep 1000")
    victim = Counter(handle.supervisor_pid for handle in handles).most_common(1)[0][0]
    assert victim is not None
    held = [handle for handle in handles if handle.supervisor_pid == victim]
    try:
        os.kill(victim, signal.SIGKILL)
        for handle in held:
            result = handle.wait(timeout=30)
            assert result.failure is not None and result.failure.step == "supervise", result
            assert "\n" not in result.failure.message
    finally:
        others = _end([handle for handle in handles if handle not in held])
    assert all(r.cancelled for r in others), others
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(marker)
    assert execbox.run(["true"], sandbox=execbox.SandboxSpec()).exit_code == 0


def test_a_job_that_needs_a_supervisor_of_its_own_gets_one_there(
        marker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain step sent to the shared supervisors (which the caller never does) is
    supervised by a process forked for it: its result is exact, and what it orphans is
    still found and killed."""
    submit = client.ForkServer.submit

    def always_shared(self: client.ForkServer, fds: list[int], shared: bool = False) -> None:
        submit(self, fds, shared=True)

    monkeypatch.setattr(client.ForkServer, "submit", always_shared)
    result = execbox.run(["sh", "-c", f"(exec -a {marker} sleep 1000) & exit 3"])
    assert result.exit_code == 3 and result.failure is None, result
    assert not processes_with(marker)
    monkeypatch.undo()
    assert execbox.run(["true"]).exit_code == 0


def test_a_big_step_does_not_swell_the_size_later_steps_report() -> None:
    """A step is a copy of its supervisor until its exec, and a native pid 1 shares the
    supervisor's memory: neither the memory one big job left there nor the supervisor's
    high-water mark may show in other steps' maximum_resident_set_size."""
    box = execbox.SandboxSpec()
    big = execbox.run(["true"], sandbox=box, env={"PATH": "/usr/bin:/bin",
                                                  "BIG": "x" * (60 << 20)})
    assert big.failure is not None and big.failure.errno == "E2BIG", big
    sizes = [execbox.run(["true"], sandbox=box).usage.maximum_resident_set_size >> 20
             for _ in range(3 * SHARED_SUPERVISORS)]
    assert max(sizes) < 40, sizes


def test_what_the_first_job_left_is_frozen_and_its_garbage_collected() -> None:
    """give_back_memory collects a job's cycles first, then (after the first job) freezes
    the rest, so that the collection before each later ready pid 1 skips it."""
    import gc
    import weakref

    from execbox.server.shared import give_back_memory

    class Node:
        pass

    def cycle() -> weakref.ref[Node]:
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        return weakref.ref(node)

    def walked(node: Node) -> bool:  # (frozen objects are in no generation)
        return any(tracked is node for tracked in gc.get_objects())

    kept = Node()
    garbage = cycle()
    frozen = gc.get_freeze_count()
    try:
        give_back_memory(freeze=False)
        assert garbage() is None
        assert gc.get_freeze_count() == frozen and walked(kept)
        garbage = cycle()
        give_back_memory(freeze=True)
        assert garbage() is None  # collected, not frozen
        assert not walked(kept)  # what is alive is frozen
        garbage = cycle()
        give_back_memory(freeze=False)
        assert garbage() is None  # what comes after is collected as before
    finally:
        gc.unfreeze()
