"""A shared supervisor under a limit on processes (server/shared.py): a job that cannot get
a thread waits for a worker instead of taking the supervisor (and every step it holds)
down, idle workers end rather than count against a pids limit for the process's life, and
a fork the kernel refuses is the step's own failure."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from execbox.server import shared


def _until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def jobs_run(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], dict[int, threading.Event]]:
    """_run replaced: a job is a number; it runs until its event is set."""
    ran: list[int] = []
    gates: dict[int, threading.Event] = {}

    def fake_run(fds: list[int], ready: Any, done: list[Any], wake: int) -> None:
        ran.append(fds[0])
        gates.setdefault(fds[0], threading.Event()).wait(30)
        done.append(None)

    monkeypatch.setattr(shared, "_run", fake_run)
    return ran, gates


def test_a_job_that_cannot_get_a_thread_waits_for_a_running_worker(
        jobs_run: tuple[list[int], dict[int, threading.Event]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ran, gates = jobs_run
    wake_r, wake_w = os.pipe()
    try:
        workers = shared._Workers([], wake_w)
        gates[1] = threading.Event()
        workers.hand(([1], None))
        assert _until(lambda: ran == [1])
        start = threading.Thread.start

        def no_thread(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", no_thread)
        workers.hand(([2], None))  # must neither raise nor drop the job
        assert workers.running() == 2
        monkeypatch.setattr(threading.Thread, "start", start)
        gates[2] = threading.Event()
        gates[1].set()  # the first job ends: its worker takes the waiting one
        assert _until(lambda: ran == [1, 2])
        gates[2].set()
        assert _until(lambda: workers.running() == 0)
    finally:
        for gate in gates.values():
            gate.set()
        os.close(wake_r)
        os.close(wake_w)


def test_a_job_with_no_thread_and_no_worker_is_dropped_alone(
        jobs_run: tuple[list[int], dict[int, threading.Event]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing runs that could take it: its fds are closed (its caller sees the job socket
    close and resubmits), and the supervisor goes on."""
    ran, _ = jobs_run
    wake_r, wake_w = os.pipe()
    job_r, job_w = os.pipe()
    try:
        workers = shared._Workers([], wake_w)

        def no_thread(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", no_thread)
        workers.hand(([job_w], None))
        assert workers.running() == 0 and not ran
        with pytest.raises(OSError):
            os.fstat(job_w)  # closed
    finally:
        os.close(wake_r)
        os.close(wake_w)
        os.close(job_r)


def test_idle_workers_end(jobs_run: tuple[list[int], dict[int, threading.Event]],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    ran, gates = jobs_run
    monkeypatch.setattr(shared, "IDLE_WORKER_SECONDS", 0.2)
    wake_r, wake_w = os.pipe()
    try:
        workers = shared._Workers([], wake_w)
        before = threading.active_count()
        for number in range(5):
            gates[number] = threading.Event()
            workers.hand(([number], None))
        assert _until(lambda: len(ran) == 5)
        assert threading.active_count() == before + 5
        for gate in gates.values():
            gate.set()
        assert _until(lambda: workers.running() == 0)
        assert _until(lambda: threading.active_count() == before), threading.enumerate()
        gates[9] = threading.Event()
        gates[9].set()
        workers.hand(([9], None))  # a new worker serves once the old ones are gone
        assert _until(lambda: ran[-1] == 9)
    finally:
        for gate in gates.values():
            gate.set()
        os.close(wake_r)
        os.close(wake_w)


def test_a_fork_the_kernel_refuses_is_the_steps_failure_with_the_limit_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pids limit met by a supervisor (shared or not) is the step's one-line failure,
    not a supervisor that fails and leaves its callers told it was killed."""
    import errno

    from execbox.report.diagnose import describe
    from execbox.spawn import fork
    from execbox.spawn.failure import StepFailure

    def refused() -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", refused)
    with pytest.raises(StepFailure) as failed:
        fork.start_fork([("execve", (["/bin/true"], [], None))])
    monkeypatch.undo()
    assert (failed.value.step, failed.value.errno) == ("fork", errno.EAGAIN)
    assert len(os.listdir("/proc/self/fd")) == before  # its pipe is closed
    failure = describe("fork", errno.EAGAIN, "")
    assert failure.errno == "EAGAIN" and "pids.max" in failure.hint, failure


def test_a_spawn_the_kernel_refuses_is_a_fork_failure_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from execbox.spawn import posix
    from execbox.spawn.failure import StepFailure

    def refused(*args: Any, **kwargs: Any) -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "posix_spawn", refused)
    with pytest.raises(StepFailure) as failed:
        posix.posix_spawn_plan([("execve", (["/bin/true"], [], None))])
    assert (failed.value.step, failed.value.errno) == ("fork", errno.EAGAIN)


def test_a_job_that_fails_in_its_worker_is_not_counted_as_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever escapes a job, its worker says it is done: else the supervisor would never
    be idle again (no ready pid 1, no leaving once the server is gone)."""
    ran: list[int] = []

    def failing_run(fds: list[int], ready: Any, done: list[Any], wake: int) -> None:
        ran.append(fds[0])
        raise MemoryError("in the middle of a job")

    monkeypatch.setattr(shared, "_run", failing_run)
    wake_r, wake_w = os.pipe()
    try:
        workers = shared._Workers([], wake_w)
        workers.hand(([1], None))
        assert _until(lambda: ran == [1] and workers.running() == 0), workers.running()
        workers.hand(([2], None))  # the worker is still there to take the next one
        assert _until(lambda: ran == [1, 2] and workers.running() == 0)
    finally:
        os.close(wake_r)
        os.close(wake_w)
