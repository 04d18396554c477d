"""A running step as the caller sees it: a job socket to its supervisor plus output pipes.

No thread and no child process lives in the caller: waiting is a poll loop (sync) or
event-loop readers (asyncio) over these fds, and cancel() is one message on the socket.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..model import wire
from ..model.errors import ForkServerError
from ..model.exits import EXIT_SETUP_FAILED
from ..model.result import Failure, Result
from ..model.spec import CommandSpec
from ..server.client import ForkServer, Helpers
from ..streams.pty import terminal_setup_failed
from ..streams.stdio import PreparedStdio

_OUTPUT_DRAIN_AFTER_RESULT = 5.0  # output held open by something outside the tree
_SUBMIT_ATTEMPTS = 3


Fallback = Callable[[], tuple[CommandSpec, PreparedStdio, str]]


def _lost(message: str, hint: str, taken_at: float | None = None,
          pid: int | None = None) -> dict[str, Any]:
    """The result of a step whose supervisor could not be reached or died (after it took
    the job at taken_at, the step's start as far as anyone can tell now)."""
    return Result(exit_code=EXIT_SETUP_FAILED,
                  failure=Failure("supervise", "EPIPE", message, hint), started_at=taken_at,
                  ended_at=None if taken_at is None else time.time(), pid=pid).to_dict()


class Execution:
    """Handle on one step: pid, stream(), cancel(), wait(), wait_async()."""

    def __init__(self, spec: CommandSpec, stdio: PreparedStdio, server: ForkServer | None,
                 fallback: Fallback | None = None, failure: Failure | None = None,
                 note: str | None = None, join_pidfd: int = -1) -> None:
        self.spec = spec
        self.pid: int | None = None
        self._stdio = stdio
        self._server = server
        self._job: socket.socket | None = None
        self._frames = wire.FrameReader()
        self._accepted = False
        self._taken_at: float | None = None  # wall clock, when a supervisor took the job
        self._raw: dict[str, Any] | None = None
        self._result: Result | None = None
        self._result_at = 0.0
        self._cancel: bool | None = None  # None: not asked; False: cancel; True: hard
        self._send_lock = threading.Lock()
        self._wait_lock = threading.Lock()
        self._unwatch: Callable[[int], None] | None = None
        self._attempts = 0
        self._captured: dict[str, bytes] = {}
        self._dropped: dict[str, int] = {}  # bytes an output cap dropped, per stream
        self._fallback = fallback
        self._note = note
        self._join_pidfd = join_pidfd
        self._supervisor_pidfd = -1
        self._step_pidfd = -1
        self._helpers: Helpers = ()  # what kills what a dead supervisor leaves
        self.supervisor_pid: int | None = None
        if failure is not None:  # failed before anything could be sent
            from ..report.diagnose import exit_status_for_failure

            self._raw = Result(exit_code=exit_status_for_failure(failure.step, 0),
                               failure=failure).to_dict()
            return
        try:
            self._submit()
        except BaseException:
            stdio.close_all()
            raise

    # -- talking to the supervisor -------------------------------------------------------
    def _submit(self) -> None:
        self._attempts += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        assert self._server is not None
        extra = [] if self._join_pidfd < 0 else [self._join_pidfd]
        self._frames = wire.FrameReader()
        request: dict[str, Any] = {"spec": self.spec.to_wire(),
                                   "fds": list(enumerate(self._stdio.targets))}
        if extra:
            request["join_fd"] = len(self._stdio.send)
        data = wire.encode(request)
        try:
            # Queued before any supervisor holds the other end, as far as the socket's
            # buffer takes it: the supervisor that takes the job finds it there instead of
            # sleeping until a second send wakes it. (No other thread sends on it yet.)
            try:
                sent = ours.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            shared = (self.spec.sandbox is not None and self.spec.sandbox_role == "new"
                      and not self.spec.controlling_tty)
            self._helpers = self._server.submit([theirs.fileno(), *self._stdio.send, *extra],
                                                shared=shared)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        with self._send_lock:  # the request is always the first frame, before any cancel
            try:
                if sent < len(data):  # (a big environment) the rest, as the supervisor reads
                    ours.sendall(memoryview(data)[sent:])
                if self._cancel is not None:
                    wire.send(ours, ("cancel", self._cancel))
            except OSError:
                pass  # the supervisor is gone already; its EOF leads to a resubmit
            self._job = ours

    def cancel(self, hard: bool = False) -> None:
        """Cancel signal to the whole tree, SIGKILL after the grace period (now if hard).
        Safe from any thread; wait() then returns a Result with cancelled=True."""
        with self._send_lock:
            self._cancel = hard or bool(self._cancel)
            if self._job is not None:
                try:
                    wire.send(self._job, ("cancel", self._cancel))
                except OSError:
                    pass

    # -- fd events -----------------------------------------------------------------------
    def _watched(self) -> list[int]:
        fds = list(self._stdio.readers)
        if self._job is not None:
            fds.append(self._job.fileno())
        return fds

    def _close_job(self) -> None:
        with self._send_lock:  # cancel() from another thread must not see a closed socket
            job, self._job = self._job, None
            if job is not None:
                if self._unwatch is not None:
                    self._unwatch(job.fileno())
                job.close()

    def _on_readable(self, fd: int) -> None:
        if self._job is not None and fd == self._job.fileno():
            try:
                data = self._job.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self._on_job_closed()
                return
            for message in self._frames.feed(data):
                self._on_message(message)
            return
        reader = self._stdio.readers.get(fd)
        if reader is None:
            return
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: a pty master whose slave side is all closed
                raise
            data = b""
        if data:
            reader.sink.feed(data)
        else:
            self._close_reader(fd)

    def _close_reader(self, fd: int) -> None:
        reader = self._stdio.readers.pop(fd)
        if self._unwatch is not None:
            self._unwatch(fd)
        os.close(fd)
        captured = reader.sink.close()
        if reader.sink.dropped:
            self._dropped[reader.name] = reader.sink.dropped
        for extra in reader.close_when_done:
            os.close(extra)
        if captured is not None:
            self._captured[reader.name] = captured

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "taken":  # a supervisor has the job: from now on it is never resubmitted
            self._accepted = True
            self._taken_at = time.time()
            self.supervisor_pid = message[1]
        elif kind == "started":  # the supervisor has the fds (and the step, if pid is set)
            self._accepted = True
            self._taken_at = self._taken_at or time.time()
            self.pid, self.supervisor_pid = message[1], message[2]
            self._watch_processes()
            for fd in self._stdio.close_after_handoff:
                os.close(fd)
            self._stdio.close_after_handoff.clear()
        elif kind == "result":
            self._close_job()
            self._forget_processes()
            failure = message[1]["failure"]
            if (self._fallback is not None and failure
                    and terminal_setup_failed(failure["step"])):
                self._retry_without_pty(failure)
                return
            self._raw = message[1]
            self._result_at = time.monotonic()

    def _watch_processes(self) -> None:
        """pidfds on the supervisor and the step: if the supervisor dies, this handle can
        tell so and still kill the step's main process (its escapees are the fork
        server's, which reaps and kills whatever a dead supervisor leaves)."""
        for pid, attr in ((self.supervisor_pid, "_supervisor_pidfd"), (self.pid, "_step_pidfd")):
            if pid is not None:
                try:
                    setattr(self, attr, os.pidfd_open(pid))
                except OSError:
                    pass

    def _forget_processes(self) -> None:
        for attr in ("_supervisor_pidfd", "_step_pidfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def _kill_orphaned_step(self) -> str:
        """The supervisor is gone: SIGKILL the step's process group and main process."""
        if self._step_pidfd < 0 or self.pid is None:
            return "the step had not started"
        import signal

        if not select.select([self._step_pidfd], [], [], 0)[0]:  # still running
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            signal.pidfd_send_signal(self._step_pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return f"execbox killed the step (pid {self.pid}) and its process group"

    def _retry_without_pty(self, failure: dict[str, str]) -> None:
        """pty="auto": the terminal could not be attached, so the step never ran; run it
        again with pipes and say so in the result."""
        assert self._fallback is not None
        for fd in list(self._stdio.readers):
            self._close_reader(fd)
        self._stdio.close_all()
        self.spec, self._stdio, _ = self._fallback()
        self._fallback = None
        self._note = f"{failure['step']}: {failure['errno']}: {failure['hint']}"
        self._accepted = False
        self._attempts = 0
        self._submit()

    def _on_job_closed(self) -> None:
        self._close_job()
        if self._raw is not None:
            return
        if not self._accepted and self._attempts < _SUBMIT_ATTEMPTS:
            try:
                self._submit()  # the server died before any supervisor took the job
                return
            except ForkServerError as exc:
                self._raw = _lost(str(exc), "check that sys.executable can start")
        elif not self._accepted:
            from ..server.forkserver import log_path

            self._raw = _lost(f"no supervisor could take the step ({self._attempts} tries)",
                              f"the fork server's log says why: {log_path()}")
        else:
            when = ("before the step ended; " + self._kill_orphaned_step()
                    if self.pid is not None else "while it set the step up (the step may "
                    "have started; it was not run again)")
            self._forget_processes()
            from ..server.client import cleaner_alive
            from ..server.forkserver import log_path

            cleaner = cleaner_alive(self._helpers)
            left = (f"the {cleaner} process kills what it left behind" if cleaner else
                    "the fork server and its anchor process are gone too: what the step "
                    "started outside its process group may still run (a step with limits "
                    "or a sandbox has a cgroup or pid namespace that ends it)")
            self._raw = _lost(
                f"the step's supervisor (pid {self.supervisor_pid}) was killed {when}",
                "something killed execbox's supervisor process (the OOM killer, or a kill "
                "aimed at it), or it failed and wrote why to the fork server's log "
                f"({log_path()}); {left}", self._taken_at, self.pid)
        self._result_at = time.monotonic()
        for fd in self._stdio.close_after_handoff:
            os.close(fd)
        self._stdio.close_after_handoff.clear()

    @property
    def done(self) -> bool:
        return self._raw is not None and not self._stdio.readers

    def _drain_deadline_passed(self) -> bool:
        return (self._raw is not None and bool(self._stdio.readers)
                and time.monotonic() - self._result_at > _OUTPUT_DRAIN_AFTER_RESULT)

    def _finish(self) -> Result:
        if self._result is None:
            for fd in list(self._stdio.readers):
                self._close_reader(fd)
            assert self._raw is not None
            captured = self._captured
            if self._note is not None:
                self._raw["pty_fallback"] = self._note
            if self._dropped:
                self._raw["output_dropped"] = dict(self._dropped)
            self._result = Result.from_dict(self._raw, captured.get("stdout"),
                                            captured.get("stderr"))
        return self._result

    # -- synchronous waiting ---------------------------------------------------------------
    def _pump(self, poller: select.poll, registered: set[int], wait: float | None) -> None:
        current = set(self._watched())
        for fd in registered - current:
            registered.discard(fd)
        for fd in current - registered:
            poller.register(fd, select.POLLIN)
            registered.add(fd)
        if self._raw is not None:
            wait = 0.05 if wait is None else min(wait, 0.05)
        timeout_ms = None if wait is None else max(0, int(wait * 1000 + 0.999))
        try:
            events = poller.poll(timeout_ms)
        except InterruptedError:
            return
        for fd, _ in events:
            if fd in registered:
                self._on_readable(fd)
        if self._drain_deadline_passed():
            for fd in list(self._stdio.readers):
                self._close_reader(fd)

    def _run_sync(self, until: Callable[[], bool], timeout: float | None) -> None:
        poller = select.poll()
        registered: set[int] = set()

        def unwatch(fd: int) -> None:
            if fd in registered:
                poller.unregister(fd)
                registered.discard(fd)

        deadline = None if timeout is None else time.monotonic() + timeout
        self._unwatch = unwatch
        try:
            while not until():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise TimeoutError(f"step still running after {timeout} s")
                self._pump(poller, registered, wait)
        finally:
            self._unwatch = None

    def wait_or_cancel(self) -> Result:
        """wait(); if waiting is interrupted (KeyboardInterrupt, say), the step is killed and
        reaped before the exception propagates."""
        try:
            return self.wait()
        except BaseException:
            self.cancel(hard=True)
            self.wait()
            raise

    def wait_started(self, timeout: float | None = None) -> int | None:
        """Block until the step has started (its pid) or ended without starting (None)."""
        with self._wait_lock:
            if self.pid is None and self._raw is None:
                self._run_sync(lambda: self.pid is not None or self._raw is not None, timeout)
            return self.pid

    def wait(self, timeout: float | None = None) -> Result:
        """Block until the step and its whole tree are gone. timeout only bounds this call
        (TimeoutError); the step's own timeout is part of its spec."""
        with self._wait_lock:
            if self._result is None:
                self._run_sync(lambda: self.done, timeout)
            return self._finish()

    def stream(self) -> Iterator[tuple[str, bytes]]:
        """Yield ("stdout"|"stderr", chunk) for streams opened with PIPE, until the end."""
        with self._wait_lock:
            while True:
                while self._stdio.stream_chunks:  # re-read: a pty fallback replaces _stdio
                    yield self._stdio.stream_chunks.pop(0)
                if self.done:
                    break
                self._run_sync(lambda: self.done or bool(self._stdio.stream_chunks), None)
        self._finish()

    # -- asyncio ---------------------------------------------------------------------------
    async def wait_async(self) -> Result:
        """Await the Result; if the awaiting task is cancelled, the step is cancelled, its
        tree is gone by the time CancelledError propagates."""
        import asyncio

        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        registered: set[int] = set()

        def sync() -> None:
            current = set(self._watched())
            for fd in registered - current:
                loop.remove_reader(fd)
                registered.discard(fd)
            for fd in current - registered:
                loop.add_reader(fd, on_ready, fd)
                registered.add(fd)
            if self.done and not finished.done():
                finished.set_result(None)

        drain_timer: list[asyncio.TimerHandle] = []

        def stop_draining() -> None:
            """Output held open by something outside the tree: stop waiting for it."""
            if self._raw is not None:
                for reader_fd in list(self._stdio.readers):
                    self._close_reader(reader_fd)
            sync()

        def on_ready(fd: int) -> None:
            self._on_readable(fd)
            if self._drain_deadline_passed():
                for reader_fd in list(self._stdio.readers):
                    self._close_reader(reader_fd)
            if self._raw is not None and not drain_timer:
                drain_timer.append(loop.call_later(_OUTPUT_DRAIN_AFTER_RESULT, stop_draining))
            sync()

        def unwatch(fd: int) -> None:
            if fd in registered:
                loop.remove_reader(fd)
                registered.discard(fd)

        self._unwatch = unwatch
        cancelled = False
        try:
            sync()
            while not finished.done():
                try:
                    await asyncio.shield(finished)
                except asyncio.CancelledError:
                    if finished.done():
                        break
                    self.cancel(hard=cancelled)
                    cancelled = True
        finally:
            for fd in list(registered):
                loop.remove_reader(fd)
            for timer in drain_timer:
                timer.cancel()
            self._unwatch = None
        result = self._finish()
        if cancelled:
            raise asyncio.CancelledError
        return result

    def __del__(self) -> None:
        if self._result is None and getattr(self, "_job", None) is not None:
            # Abandoned handle: closing the job socket makes the supervisor stop the step.
            try:
                self._stdio.close_all()
                if self._job is not None:
                    self._job.close()
            except Exception:
                pass
        if getattr(self, "_step_pidfd", -1) >= 0 or getattr(self, "_supervisor_pidfd", -1) >= 0:
            self._forget_processes()
