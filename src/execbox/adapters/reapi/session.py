"""The bot session: CreateBotSession, then UpdateBotSession in a loop, every call with a
deadline; leases started in threads, finished ones reported, vanished ones cancelled.

BuildGrid never sends CANCELLED: a lease cancelled by its client, or handed to another bot,
simply is not in the reply any more. So every running lease missing from a reply has its
whole tree killed (with the grace) and its result discarded.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from google.protobuf import timestamp_pb2, unknown_fields

from .action import ActionRunner, LeaseOutcome, RunningLease, payload_digest
from .config import WorkerConfig
from .logs import WorkerLog
from .metrics import WorkerMetrics
from .protos import bots_grpc, bots_pb2, code_pb2, grpc, re_pb2, worker_pb2

# Errors after which the same session is tried again: the server is away or slow.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED}

RUNNING, DRAINING, STOPPING = "running", "draining", "stopping"

_BATCH_WAIT = 0.05  # seconds a finished lease waits for others before it is reported


class Backoff:
    """Exponential, with jitter, capped: how long to wait before the next attempt."""

    def __init__(self, first: float = 0.25, cap: float = 10.0) -> None:
        self.first, self.cap, self.attempt = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2 ** self.attempt)
        self.attempt += 1
        return float(delay * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.attempt = 0


class _Lease:
    def __init__(self, running: RunningLease, thread: threading.Thread) -> None:
        self.running = running
        self.thread = thread
        self.discard = False  # BuildGrid dropped it: never report its result


class BotSessionLoop:
    """Owns the session and the running leases; run() returns when stopped."""

    def __init__(self, config: WorkerConfig, channel: grpc.Channel, runner: ActionRunner,
                 metrics: WorkerMetrics, log: WorkerLog) -> None:
        self.config = config
        self.stub = bots_grpc.BotsStub(channel)
        self.runner = runner
        self.metrics = metrics
        self.log = log
        self.state = RUNNING
        self.session: bots_pb2.BotSession | None = None
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._finished: dict[str, LeaseOutcome] = {}
        self._queued: dict[str, timestamp_pb2.Timestamp] = {}
        # Leases finished here, newest last: never started again, whatever a reply lists.
        self._done: dict[str, None] = {}
        self._backoff = Backoff()
        self._report_tries = 20  # after a drain: updates left to report finished leases

    # -- signals (called from the main thread's handlers) --------------------------------
    def drain(self) -> None:
        """Stop taking leases; finish the running ones; then report BOT_TERMINATING."""
        if self.state == RUNNING:
            self.state = DRAINING
            self.log.event("draining", running=len(self._leases))
        else:
            self.stop()
        self.wake.set()

    def stop(self) -> None:
        """Cancel every running lease (tree kill with the grace), report, exit."""
        hard = self.state == STOPPING
        self.state = STOPPING
        self.log.event("stopping", running=len(self._leases), hard=hard)
        with self._lock:
            leases = list(self._leases.values())
        for lease in leases:
            lease.running.cancel(hard=hard)
        self.wake.set()

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        while True:
            with self._lock:
                busy = bool(self._leases)
                unreported = bool(self._finished)
            if self.state != RUNNING and not busy:
                if unreported and self.session is not None and self._report_tries > 0:
                    self._report_tries -= 1  # the server may be briefly away: a few more
                else:
                    self._say_goodbye()
                    return 0
            try:
                if self.session is None:
                    if self.state != RUNNING:  # stopping: wait for the leases to end
                        self._sleep(0.1)
                        continue
                    self._create()
                    continue
                self._update()
            except Exception as exc:
                self.log.event("internal error", error=f"{type(exc).__name__}: {exc}")
                self._sleep(self._backoff.next())

    def _worker(self) -> worker_pb2.Worker:
        device = worker_pb2.Device(handle="execbox")
        for key, value in self.config.properties:
            device.properties.add(key=key, value=value)
        worker = worker_pb2.Worker(devices=[device])
        worker.configs.add(key="capacity", value=str(self.config.capacity))
        return worker

    def _status(self) -> bots_pb2.BotStatus.ValueType:
        return bots_pb2.OK if self.state == RUNNING else bots_pb2.BOT_TERMINATING

    def _create(self) -> None:
        if self.state != RUNNING:
            self.session = None
            return
        session = bots_pb2.BotSession(bot_id=self.config.bot_id, status=bots_pb2.OK,
                                      worker=self._worker())
        request = bots_pb2.CreateBotSessionRequest(parent=self.config.instance,
                                                   bot_session=session)
        call = self.stub.CreateBotSession.future(request, timeout=self.config.session_timeout)
        reply = self._wait(call, self.config.session_timeout)
        if reply is None:
            return
        self.session = reply
        self._backoff.reset()
        self.log.event("session", name=reply.name, bot_id=self.config.bot_id,
                       capacity=self.config.capacity)
        self._take(reply, call)

    def _request(self) -> tuple[bots_pb2.UpdateBotSessionRequest, list[str]]:
        assert self.session is not None
        session = bots_pb2.BotSession()
        session.CopyFrom(self.session)
        session.status = self._status()
        del session.leases[:]
        with self._lock:
            for lease_id in self._leases:
                session.leases.add(id=lease_id, state=bots_pb2.ACTIVE)
            reported = list(self._finished)
            for outcome in self._finished.values():
                session.leases.append(outcome.lease())
        return bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session), \
            reported

    def _update(self) -> None:
        with self._lock:
            batch = bool(self._finished) and bool(self._leases)
        if batch:
            # Every report costs a session round trip (BuildGrid's database): a lease about
            # to end as well is worth a short wait, so that one call reports both.
            self.wake.wait(_BATCH_WAIT)
            self.wake.clear()
        request, reported = self._request()
        with self._lock:
            idle = not self._leases and not reported
        # An idle bot's call long-polls on the server: give it a deadline long enough for
        # BuildGrid to wait for work; a busy one is a heartbeat.
        deadline = self.config.session_timeout if idle else max(10.0, self.config.session_timeout)
        call = self.stub.UpdateBotSession.future(request, timeout=deadline)
        # A lease ending interrupts a poll so that it is reported at once; never a call that
        # carries reports (BuildGrid would roll them back).
        reply = self._wait(call, deadline, interruptible=not reported)
        if reply is None:
            return
        self._backoff.reset()
        with self._lock:
            for lease_id in reported:
                self._finished.pop(lease_id, None)
        self.session = reply
        self._take(reply, call)
        with self._lock:
            busy = bool(self._leases) or bool(self._finished)
        if busy and not self._finished:
            self.wake.wait(self.config.poll_interval)
            self.wake.clear()

    def _wait(self, call: Any, deadline: float, interruptible: bool = True) -> Any:
        """The call's reply, or None after handling its error (backoff, new session). A
        lease finishing or a signal interrupts a long poll (the call is cancelled: BuildGrid
        then re-sends whatever it had assigned)."""
        end = time.monotonic() + deadline + 5
        while not call.done():
            if self.wake.wait(0.05 if interruptible else 0.2):
                self.wake.clear()
                if interruptible or self.state != RUNNING:
                    call.cancel()
                    break
            if time.monotonic() > end:
                call.cancel()
                break
        try:
            return call.result()
        except grpc.FutureCancelledError:
            return None
        except grpc.RpcError as error:
            self._on_error(error)
            return None

    def _on_error(self, error: grpc.RpcError) -> None:
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.session is not None:
            return  # a long poll with nothing to hand out
        if code in _TRANSIENT:
            delay = self._backoff.next()
            self.log.event("server unreachable", code=code.name, retry_in=delay,
                           detail=error.details())
            self._sleep(delay)
            return
        # The session is gone (expired while the server was away, or replaced): BuildGrid
        # has requeued its jobs, so ours are no longer ours.
        self.log.event("session lost", code=code.name, detail=error.details(),
                       hint="if this repeats, another worker may use the same bot id "
                            f"({self.config.bot_id}); give each worker its own --bot-id")
        self._drop_all("the bot session was lost")
        self.session = None
        self._backoff.reset()  # the server answers: a new session at once

    def _sleep(self, seconds: float) -> None:
        if self.wake.wait(seconds):
            self.wake.clear()

    def _drop_all(self, why: str) -> None:
        with self._lock:
            leases = list(self._leases.items())
            self._finished.clear()
        for lease_id, lease in leases:
            lease.discard = True
            lease.running.cancel()
            self.log.event("lease cancelled", lease=lease_id, why=why)

    def _take(self, reply: bots_pb2.BotSession, call: Any) -> None:
        """Start new leases; cancel running ones the server no longer lists."""
        self._remember_queue_times(reply, call)
        listed = {lease.id for lease in reply.leases}
        with self._lock:
            vanished = [(i, lease) for i, lease in self._leases.items() if i not in listed]
        for lease_id, lease in vanished:
            if not lease.discard:
                lease.discard = True
                lease.running.cancel()
                self.log.event("lease cancelled", lease=lease_id,
                               why="no longer in the session (cancelled or reassigned)")
        for offered in reply.leases:
            if offered.state not in (bots_pb2.ACTIVE, bots_pb2.PENDING):
                continue
            with self._lock:
                known = (offered.id in self._leases or offered.id in self._finished
                         or offered.id in self._done)
            if not known:
                self._start(offered)

    def _remember_queue_times(self, reply: bots_pb2.BotSession, call: Any) -> None:
        try:
            trailing = call.trailing_metadata() or ()
        except Exception:
            return
        entries = [value for key, value in trailing if key == "executeoperationmetadata-bin"]
        if len(entries) != len(reply.leases):
            return
        for lease, raw in zip(reply.leases, entries, strict=True):
            if lease.id in self._leases or lease.id in self._done:
                continue  # BuildGrid sends it for every listed lease, every time
            queued = _queued_timestamp(raw)
            if queued is not None:
                self._queued[lease.id] = queued

    def _start(self, lease: bots_pb2.Lease) -> None:
        running = RunningLease(lease.id)
        thread = threading.Thread(target=self._work, args=(lease, running),
                                  name=f"lease {lease.id}", daemon=True)
        with self._lock:
            self._leases[lease.id] = _Lease(running, thread)
            self.metrics.running.set(len(self._leases))
        thread.start()

    def _work(self, lease: bots_pb2.Lease, running: RunningLease) -> None:
        queued = self._queued.pop(lease.id, None)
        try:
            # Long actions show in the log from their start, not only when they end.
            self.log.event("lease started", lease=lease.id, action=payload_digest(lease))
            outcome = self.runner.run(lease, running, queued)
        except Exception as exc:
            outcome = LeaseOutcome(lease.id, code=code_pb2.INTERNAL,
                                   message=f"worker: {type(exc).__name__}: {exc}")
        with self._lock:
            entry = self._leases.pop(lease.id, None)
            discard = entry is None or entry.discard
            if self.state == STOPPING and (outcome.cancelled or running.cancelled.is_set()):
                # Cancelled by our own shutdown: hand the job back so BuildGrid retries it.
                outcome.code = code_pb2.UNAVAILABLE
                outcome.message = "the worker was stopped; the action was cancelled"
                outcome.result = None
                outcome.cancelled = False
                outcome.handed_back = True
                discard = False
            if not discard and not outcome.cancelled:
                self._finished[lease.id] = outcome
            self._done[lease.id] = None
            while len(self._done) > 10_000:
                del self._done[next(iter(self._done))]
            self._queued.pop(lease.id, None)
            self.metrics.running.set(len(self._leases))
        self._account(outcome, discard or outcome.cancelled, queued)
        self.wake.set()

    def _account(self, outcome: LeaseOutcome, cancelled: bool,
                 queued: timestamp_pb2.Timestamp | None) -> None:
        code = _code_name(code_pb2.CANCELLED if cancelled else outcome.code)
        if cancelled:
            kind = "cancelled"
        elif outcome.handed_back:
            kind = "handed_back"  # our own shutdown: BuildGrid runs it again elsewhere
        elif outcome.code == code_pb2.DEADLINE_EXCEEDED:
            kind = "timeout"
        elif outcome.code != code_pb2.OK:
            kind = "error"
        else:
            kind = "success" if outcome.exit_code == 0 else "nonzero_exit"
        m = self.metrics
        m.leases.labels(outcome=kind, code=code).inc()
        t = outcome.timings
        if "execution" in t:
            m.action_duration.observe(t["execution"])
        if "input_fetch" in t:
            m.input_fetch.observe(t["input_fetch"])
        if "output_upload" in t:
            m.output_upload.observe(t["output_upload"])
        if "launch" in t:
            m.launch.observe(t["launch"])
        if queued is not None and "worker_start" in t:
            m.queue_to_start.observe(max(0.0, t["worker_start"] - queued.ToNanoseconds() / 1e9))
        m.count_cache(outcome.cache_hits, outcome.cache_misses, outcome.fetched_bytes)
        self.log.event("lease", lease=outcome.lease_id, action=outcome.action_digest or None,
                       outcome=kind, exit=None if cancelled else outcome.exit_code,
                       status=code,
                       message=outcome.message or None,
                       fetch=t.get("input_fetch"), execute=t.get("execution"),
                       upload=t.get("output_upload"), launch=t.get("launch"),
                       command=t.get("command"),
                       total=t.get("total"))

    def _say_goodbye(self) -> None:
        """Report what is left and BOT_TERMINATING, best effort."""
        if self.session is not None:
            request, _ = self._request()
            try:
                self.stub.UpdateBotSession(request, timeout=5)
            except grpc.RpcError as error:
                self.log.event("final report failed", code=error.code().name,
                               unreported=len(self._finished))
        self.log.event("stopped")


def _code_name(code: int) -> str:
    for name, number in code_pb2.Code.items():
        if number == code:
            return name
    return str(code)


# ExecuteOperationMetadata.partial_execution_metadata (REAPI 2.3), newer than the protos
# buildgrid-common ships: read from the unknown fields.
_PARTIAL_EXECUTION_METADATA = 5


def _queued_timestamp(raw: bytes) -> timestamp_pb2.Timestamp | None:
    """When BuildGrid queued the job, from the metadata it trails each lease with."""
    try:
        metadata = re_pb2.ExecuteOperationMetadata.FromString(raw)
        fields = unknown_fields.UnknownFieldSet(metadata)
        for index in range(len(fields)):
            field = fields[index]
            if field.field_number == _PARTIAL_EXECUTION_METADATA and isinstance(field.data,
                                                                                bytes):
                partial = re_pb2.ExecutedActionMetadata.FromString(field.data)
                if partial.queued_timestamp.seconds:
                    return partial.queued_timestamp
    except Exception:
        return None
    return None
