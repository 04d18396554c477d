"""The buildbarn.runner.Runner servicer: CheckReadiness and Run.

A Run takes a slot (at most --concurrency at once; up to --max-waiting others wait, as
bb_worker, which limits its own concurrency, expects of a runner; beyond that the Run is
refused with RESOURCE_EXHAUSTED, so that waiting Runs never hold every thread of the pool and
CheckReadiness is always answered). It runs its action through execbox, and the handler
returns only when the action's whole tree is gone. Cancelling the call (bb_worker's action
timeout, or its client giving up) cancels the action: the cancel signal to every process of
it, the grace, SIGKILL; the handler then still waits for the tree to be reaped, though the
client's call has already ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NoReturn

from ...api.execution import Execution
from ...api.run import start
from ...model.errors import ForkServerError, SpecError
from ...model.result import Result
from ...streams.stdio import DEVNULL
from .action import PreparedAction, prepare, request_field
from .config import RunnerConfig
from .logs import RunnerLog
from .paths import BuildDirectory, RequestError
from .protos import empty_pb2, grpc, runner_pb2, runner_pb2_grpc
from .readiness import Readiness
from .response import SERVER_LOG_NAME, error_status, exit_code, run_response, server_log

_SHUTTING_DOWN = "the runner is shutting down"
_DEADLINE_SLACK = 0.25  # seconds


class Slots:
    """--concurrency slots and the Runs waiting for one, at most max_waiting of them.
    Waiters sleep on a condition (no polling), woken by a release or by a cancel."""

    def __init__(self, size: int, max_waiting: int) -> None:
        self._changed = threading.Condition()
        self._free = size
        self._waiting = 0
        self.max_waiting = max_waiting

    def take(self, cancelled: Callable[[], bool]) -> bool | None:
        """True: a slot is ours; False: cancelled while waiting; None: too many wait."""
        with self._changed:
            if self._free == 0 and self._waiting >= self.max_waiting:
                return None
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: cancelled() or self._free > 0)
                if cancelled():
                    return False
                self._free -= 1
                return True
            finally:
                self._waiting -= 1

    def release(self) -> None:
        with self._changed:
            self._free += 1
            self._changed.notify_all()

    def wake(self) -> None:
        """A waiting Run was cancelled: let it see so."""
        with self._changed:
            self._changed.notify_all()


class RunningAction:
    """One Run's action, cancellable from gRPC's callback thread and from shutdown, also
    before execbox has started it (attach() then cancels at once)."""

    def __init__(self, on_cancel: Callable[[], None] = lambda: None) -> None:
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._execution: Execution | None = None
        self._hard = False
        self.reason: str | None = None  # why it was cancelled; None if it was not
        self.finished = False

    def attach(self, execution: Execution) -> None:
        with self._lock:
            self._execution = execution
            cancel, hard = self.reason is not None, self._hard
        if cancel:
            execution.cancel(hard=hard)

    def cancel(self, reason: str, hard: bool = False) -> None:
        with self._lock:
            if self.finished:
                return
            self.reason = self.reason or reason
            self._hard = self._hard or hard
            execution = self._execution
        if execution is not None:
            execution.cancel(hard=hard)
        self._on_cancel()

    def finish(self) -> None:
        with self._lock:
            self.finished = True


def _why_ended(context: grpc.ServicerContext) -> str:
    """bb_worker ends a Run by its deadline (the action's timeout) or by cancelling it. The
    client's clock runs out first, a few ms before ours, so "about now" is the deadline."""
    remaining = context.time_remaining()
    if remaining is not None and remaining < _DEADLINE_SLACK:
        return "the call's deadline passed"
    return "the client cancelled the call"


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover


class RunnerService(runner_pb2_grpc.RunnerServicer):
    """Serves CheckReadiness and Run; stop() cancels everything for a graceful exit."""

    def __init__(self, config: RunnerConfig, build: BuildDirectory, readiness: Readiness,
                 log: RunnerLog) -> None:
        self.config = config
        self.build = build
        self.readiness = readiness
        self.log = log
        self._slots = Slots(config.concurrency, config.max_waiting)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._running: set[RunningAction] = set()
        self._stopping = False

    # -- shutdown --------------------------------------------------------------------------
    def stop(self, hard: bool = False) -> None:
        """No new Runs; every running or waiting one is cancelled (hard: SIGKILL now)."""
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for action in running:
            action.cancel(_SHUTTING_DOWN, hard)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def wait_idle(self, timeout: float) -> bool:
        """True once no Run is left (every cancelled tree reaped)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._running, timeout)

    # -- CheckReadiness --------------------------------------------------------------------
    def CheckReadiness(self, request: runner_pb2.CheckReadinessRequest,
                       context: grpc.ServicerContext) -> empty_pb2.Empty:
        if self._stopping:
            _abort(context, grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        try:
            problem = self.readiness.problem(request.path)
        except RequestError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if problem is not None:
            self.log.event("not ready", reason=problem)
            _abort(context, grpc.StatusCode.UNAVAILABLE, problem)
        return empty_pb2.Empty()

    # -- Run -------------------------------------------------------------------------------
    def Run(self, request: runner_pb2.RunRequest,
            context: grpc.ServicerContext) -> runner_pb2.RunResponse:
        action = RunningAction(self._slots.wake)
        with self._lock:
            if self._stopping:
                _abort(context, grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
            self._running.add(action)
        try:
            # Called when the call ends for any reason; after a normal end it does nothing.
            context.add_callback(lambda: action.cancel(_why_ended(context)))
            if not context.is_active():
                action.cancel(_why_ended(context))
            self._take_slot(context, action)
            try:
                return self._run(request, context, action)
            finally:
                self._slots.release()
        finally:
            action.finish()
            with self._changed:
                self._running.discard(action)
                self._changed.notify_all()

    def _take_slot(self, context: grpc.ServicerContext, action: RunningAction) -> None:
        """Returns with a slot taken, or aborts the call."""
        taken = self._slots.take(lambda: action.reason is not None)
        if taken is None:
            self.log.event("run refused", reason="too many Runs wait for a slot",
                           concurrency=self.config.concurrency,
                           max_waiting=self.config.max_waiting)
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"{self.config.concurrency} actions run and {self.config.max_waiting} "
                   "more wait for a slot (--concurrency, --max-waiting); bb_worker's "
                   "concurrency for this runner should not exceed their sum")
        if not taken:
            self._abort_cancelled(context, action)

    def _abort_cancelled(self, context: grpc.ServicerContext, action: RunningAction) -> NoReturn:
        if action.reason == _SHUTTING_DOWN:  # bb_worker reports it and may retry elsewhere
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"{_SHUTTING_DOWN}; the action was "
                                                         "cancelled")
        _abort(context, grpc.StatusCode.CANCELLED, action.reason or "cancelled")

    def _prepare(self, request: runner_pb2.RunRequest,
                 context: grpc.ServicerContext) -> PreparedAction:
        replaced = self.build.replaced()
        if replaced is not None:  # every path would be "missing": say what happened
            _abort(context, grpc.StatusCode.UNAVAILABLE, replaced)
        try:
            return prepare(request, self.config, self.build)
        except RequestError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SpecError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"{request_field(exc.field)}: {exc.problem}")
        except OSError as exc:
            _abort(context, grpc.StatusCode.INTERNAL,
                   f"runner: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))

    def _run(self, request: runner_pb2.RunRequest, context: grpc.ServicerContext,
             action: RunningAction) -> runner_pb2.RunResponse:
        began = time.monotonic()
        prepared = self._prepare(request, context)
        try:
            try:
                execution = start(prepared.argv, stdin=DEVNULL, **prepared.options)
            except SpecError as exc:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                       f"{request_field(exc.field)}: {exc.problem}")
            except ForkServerError as exc:
                _abort(context, grpc.StatusCode.INTERNAL, f"execbox: {exc}")
            action.attach(execution)
            result = execution.wait()
        finally:
            prepared.close()
        self._keep_server_log(prepared, result)
        self.log.event("run ended", program=prepared.argv[0], exit_code=exit_code(result),
                       signal=result.signal, seconds=time.monotonic() - began,
                       cancelled=action.reason, failure=result.failure and result.failure.step,
                       oom_killed=result.oom_killed or None)
        if action.reason is not None:
            self._abort_cancelled(context, action)
        failed = error_status(result)
        if failed is not None:
            _abort(context, *failed)
        return run_response(result, self.config.memory)

    def _keep_server_log(self, prepared: PreparedAction, result: Result) -> None:
        data = server_log(result)
        if data is None or prepared.server_logs is None:
            return
        try:
            self.build.write_new(prepared.server_logs, "server_logs_directory",
                                 SERVER_LOG_NAME, data)
        except RequestError as exc:
            self.log.event("cannot write the server log", reason=str(exc))
        except OSError as exc:
            where = "/".join((*prepared.server_logs, SERVER_LOG_NAME))
            reason = (f"{where} already exists" if isinstance(exc, FileExistsError)
                      else f"{where}: {exc.strerror or exc}")
            self.log.event("cannot write the server log", reason=reason)
