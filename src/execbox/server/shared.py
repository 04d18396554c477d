"""A supervisor for many sandboxed steps at once, one thread per step.

A supervisor is a Python process with about 2.7 MB of pages of its own while it runs a
job, so one per running step made 64 sandboxed steps cost some 200 MB. A root caller's
sandboxed step with a native pid 1 (linux/native_init.py) leaves its supervisor only its
own two children to reap, pid 1 and the step: whatever the step orphans goes to its pid 1,
and pid 1's death ends all of it. So one process can supervise many such steps, each from
a thread, and no step's waits or kills can reach another's processes (Supervision's scope).
A job that turns out to need more (no native pid 1 here after all) is supervised in a
process forked for it alone. Every other job keeps a supervisor of its own (forkserver.py),
on a control socket of its own: the caller sends each job to the one it needs.

The steps' processes are forked from this threaded process, with only what was imported
before and without a lock another thread could hold (the child's steps are os and ctypes
calls): what a fork server's supervisor always did, from one thread of several.

Jobs run on worker threads that live as long as the process: a parent-death signal comes
from the thread that forked, and a thread started per job cost about 1 ms per launch. While
it runs no job it makes, on its main thread, a ready pid 1 for the profile of the last step
(spawn/ready.py); not while a job runs, whose thread would wait for the interpreter lock.
It leaves when idle for long, or once the fork server is gone and its last job is done; it
dies with the server while idle.
"""

from __future__ import annotations

import gc
import math
import os
import queue
import select
import signal
import socket
import threading
import time
import warnings

from ..linux.syscalls import (
    one_malloc_arena,
    set_child_subreaper,
    set_parent_death_signal,
    trim_malloc,
)
from ..model import wire
from ..plan.kept import make_spare
from ..spawn import ahead
from . import forkserver as server_module

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from ..plan.build import Plan
    from ..spawn.ready import ReadyInit

# Supervisors the fork server keeps for shared jobs, once the first such job comes: one
# making the next ready pid 1 after a job leaves two to take jobs at once (two cores).
SHARED_SUPERVISORS = 3
_THREAD_STACK = 1 << 20  # a job's thread runs shallow Python; its stack is mostly untouched
IDLE_WORKER_SECONDS = 10.0
# How long a supervisor lets a waiting job be taken by a better-placed one: while it has
# jobs of its own (one finishing would take the next job without a ready pid 1), or no
# ready pid 1.
_DEFER_BUSY = 0.003
_DEFER_UNREADY = 0.001


def serve_shared(control: socket.socket, server: int) -> None:
    """Take jobs from control until idle for long or the server is gone. Runs forked."""
    # Loaded before any thread: a fork made while another thread imports a module for the
    # first time leaves its child that module's import lock held.
    import traceback

    from ..cgroups import devices  # noqa: F401
    from ..cgroups.step import retry_left_behind
    from ..child import handoff  # noqa: F401
    from ..linux import bpf  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    set_child_subreaper()  # (a pid 1's orphans are its own; this is for the forked jobs')
    with open("/proc/self/comm", "w") as comm:
        comm.write(server_module.SUPERVISOR_NAME)
    # Python 3.12 warns of every fork in a threaded process; see the module's docstring.
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork")
    threading.stack_size(_THREAD_STACK)
    one_malloc_arena()
    ahead.remember_home()
    wake_r, wake_w = os.pipe()
    done: list[Plan | None] = []  # finished jobs' profiles (ready.profile_of), by workers
    workers = _Workers(done, wake_w)
    ready: ReadyInit | None = None
    last_plan: Plan | None = None
    closing = False  # the server or every caller end is gone: finish, take nothing new
    untrimmed = False  # jobs have ended since malloc last gave memory back
    frozen = False  # the garbage collector has frozen what a first job left
    idle_since = time.monotonic()

    def leave() -> NoReturn:
        if ready is not None:
            ready.discard()
        retry_left_behind(server_module.LEFT_BEHIND_WAIT)
        os._exit(0)

    while True:
        # A failure here must not end the process: every job running in it would go.
        try:
            jobs = workers.running()
            set_parent_death_signal(0 if jobs else signal.SIGKILL)  # idle: go with the server
            if os.getppid() != server and not closing:
                closing = True
                control.close()  # a job sent meanwhile is not left waiting for our jobs' end
            if closing and not jobs:
                leave()
            untrimmed = untrimmed or bool(done)
            while done:  # (a job's profile: what its ready pid 1 needs of its plan)
                last_plan = done.pop(0) or last_plan  # the newest, last
                idle_since = time.monotonic()
            server_module.reap_stuck()
            wait = idle_since + server_module.IDLE_EXIT_SECONDS - time.monotonic()
            if not jobs and wait <= 0:
                leave()
            if jobs:
                wait = server_module.LEFT_BEHIND_RECHECK
            elif not retry_left_behind() or server_module.has_stuck():
                wait = min(wait, server_module.LEFT_BEHIND_RECHECK)
            if ready is not None and (ready.expires_in() <= 0 or not ready.usable()):
                ready.discard()  # too old to trust its view of the host, or it failed
                ready = None
            if untrimmed and not jobs:
                # A step is forked from this process, so until its exec it is a copy of it:
                # memory a big job left here (freed, but kept by malloc) would show in later
                # steps' maximum_resident_set_size and in this process's own size.
                give_back_memory(freeze=not frozen)
                frozen, untrimmed = True, False
            if ready is None and last_plan is not None and not jobs and not closing:
                # First, as an unshared supervisor does: a job that comes meanwhile goes to
                # another supervisor, with its ready pid 1 (or waits a moment for this one).
                ready = server_module.ready_for(last_plan)  # (None if it cannot be made now)
                if ready is None:
                    ahead.refill()
                last_plan = None
                make_spare()
            if ready is not None:
                wait = min(wait, ready.expires_in())
            poller = select.poll()
            poller.register(wake_r, select.POLLIN)
            if not closing:
                poller.register(control.fileno(), select.POLLIN)
            if ready is not None:  # readable if the ready pid 1 dies or a step of its fails
                poller.register(ready.report_fd, select.POLLIN)
            woken = {fd for fd, _ in poller.poll(math.ceil(max(wait, 0.0) * 1000))}
            if wake_r in woken:
                os.read(wake_r, 4096)
            if closing or control.fileno() not in woken:
                continue
            # A job goes first to an idle supervisor with a ready pid 1: the others let it.
            if jobs or ready is None:
                time.sleep(_DEFER_BUSY if jobs else _DEFER_UNREADY)
            try:
                data, fds = wire.receive_fds(control, block=False)
            except BlockingIOError:
                continue  # another supervisor took it
            if not data and not fds:
                closing = True  # every caller end is closed
                control.close()
                continue
            if not fds:
                continue
            set_parent_death_signal(0)  # a running job must outlive the server
            workers.hand((fds, ready))  # the job's now: it adopts it or discards it
            ready = None
        except Exception:
            server_module.log("a shared supervisor's loop failed (it goes on):\n"
                              + traceback.format_exc())
            last_plan = None  # (what failed is not tried again at once)
            if ready is not None:
                try:
                    ready.discard()
                except Exception:
                    pass
                ready = None
            time.sleep(0.1)


def give_back_memory(freeze: bool) -> None:
    """Collect a job's cycles (its Supervision's readers' closures) and give freed memory
    back to the system. freeze: then freeze what is left, after the first job, which
    imports what every job uses: later collections walk only what came since (with the
    trim, 0.08 ms instead of 0.25 ms before each ready pid 1 is made), as for the fork
    server's own imports (forkserver._preload)."""
    gc.collect()
    if freeze:
        gc.freeze()
    trim_malloc()


Job = tuple[list[int], "ReadyInit | None"]  # the job's fds, a ready pid 1 it may adopt


class _Workers:
    """The worker threads. Each runs one job at a time, then waits for the next; one idle
    for IDLE_WORKER_SECONDS ends (a burst's threads would count against a pids limit for
    as long as the process lives). A job that finds no idle worker and cannot start a
    thread (a pids limit, memory) waits for the next worker done with a job: failing to
    start a thread must not take down the jobs running here."""

    def __init__(self, done: list[Plan | None], wake: int) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Job]] = []
        self._busy = 0
        self._pending: list[Job] = []
        self._done = done
        self._wake = wake

    def running(self) -> int:
        """Jobs taken and not finished (waiting ones hold a caller's fds too)."""
        with self._lock:
            return self._busy + len(self._pending)

    def hand(self, job: Job) -> None:
        with self._lock:
            self._busy += 1
            if self._idle:
                self._idle.pop().put(job)
                return
        inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        inbox.put(job)
        try:
            threading.Thread(target=self._work, args=(inbox,), name="execbox-job",
                             daemon=True).start()
            return
        except RuntimeError as exc:
            with self._lock:
                if self._idle:  # one has finished meanwhile
                    self._idle.pop().put(job)
                    return
                self._busy -= 1
                if self._busy:
                    self._pending.append(job)
                    return
            server_module.log(f"a shared supervisor cannot take a job: {exc}")
        fds, ready = job
        if ready is not None:
            ready.discard()
        server_module.close_each(fds)  # (its caller sees the job socket close, resubmits)

    def _work(self, inbox: queue.SimpleQueue[Job]) -> None:
        while True:
            job: Job | None
            try:
                job = inbox.get(timeout=IDLE_WORKER_SECONDS)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:  # (else a job is on its way to it)
                        self._idle.remove(inbox)
                        return
                continue
            while job is not None:
                try:
                    _run(*job, self._done, self._wake)
                except BaseException:  # (what escaped even _run's own logging): the
                    pass  # worker lives on, and the count must not say a job runs
                with self._lock:
                    job = self._pending.pop(0) if self._pending else None
                    if job is None:
                        self._busy -= 1
                        self._idle.append(inbox)
            _say(self._wake)


def _say(wake: int) -> None:
    """Wake the main thread: a job is done (its plan is in done)."""
    try:
        os.write(wake, b".")
    except OSError:
        pass


def _run(fds: list[int], ready: ReadyInit | None, done: list[Plan | None], wake: int
         ) -> None:
    """One job; a failure is logged (its step, if it started, was killed)."""
    plan: Plan | None = None
    job: socket.socket | None = None
    io_fds = fds[1:]  # run_job closes each once, and says so by emptying the list
    try:
        job = socket.socket(fileno=fds[0])
        plan, _ = server_module.run_job(job, io_fds, ready, scoped=True)
    except BaseException:
        import traceback

        server_module.log("a shared supervisor's job failed:\n" + traceback.format_exc())
        server_module.close_each(io_fds if job is not None else [*fds])
        if job is None and ready is not None:
            ready.discard()
    finally:
        if job is not None:
            job.close()
        done.append(plan)
