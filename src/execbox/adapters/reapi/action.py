"""One lease, start to end: fetch the Action and Command, stage the input root, run the
command through execbox, upload the outputs, and say how it went (status + ActionResult).

Errors keep their layer: a CAS failure is UNAVAILABLE (BuildGrid retries the job), a bad
action INVALID_ARGUMENT, an action that could not be started INVALID_ARGUMENT or INTERNAL
with execbox's first error line, a timeout DEADLINE_EXCEEDED with whatever it produced.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from ...api.execution import Execution
from ...api.run import start
from ...model.errors import SpecError
from ...model.result import Result
from ...model.sandbox import SandboxSpec
from ...streams.stdio import DEVNULL
from .cache import LocalCas
from .cas import CasClient, CasError
from .config import WorkerConfig
from .digests import digest_key, digest_of_bytes
from .outputs import OutputError, collect_outputs, upload_std_stream
from .protos import bots_pb2, code_pb2, error_details_pb2, re_pb2, status_pb2
from .stage import InputError, prepare_outputs, stage_input_root
from .status import cgroup_message, failure_code, failure_message, first_line, usage_message
from .workspace import ActionDir, Workspace


@dataclass
class LeaseOutcome:
    """What the session reports for a lease, and what the log line and metrics say."""

    lease_id: str
    code: int = code_pb2.OK
    message: str = ""
    result: re_pb2.ActionResult | None = None
    action_digest: str = ""
    exit_code: int | None = None
    cancelled: bool = False
    handed_back: bool = False  # cancelled by the worker's own shutdown, given back
    timings: dict[str, float] = field(default_factory=dict)
    fetched_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    missing: list[str] = field(default_factory=list)

    def status(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code, message=printable(self.message))
        if self.missing:
            failure = error_details_pb2.PreconditionFailure()
            for key in self.missing:
                failure.violations.add(type="MISSING", subject=f"blobs/{key}")
            status.details.add().Pack(failure)
        return status

    def lease(self) -> bots_pb2.Lease:
        """The COMPLETED lease reported to BuildGrid."""
        lease = bots_pb2.Lease(id=self.lease_id, state=bots_pb2.COMPLETED,
                               status=self.status())
        if self.result is not None:
            lease.result.Pack(self.result)
        return lease


def payload_digest(lease: bots_pb2.Lease) -> str | None:
    """The action's digest as the lease names it (no CAS read); None for a payload that is
    neither an Action nor a Digest, or does not decode (the runner reports those)."""
    payload = lease.payload
    try:
        if payload.Is(re_pb2.Action.DESCRIPTOR):
            action = re_pb2.Action()
            payload.Unpack(action)
            return digest_key(digest_of_bytes(action.SerializeToString()))
        if payload.Is(re_pb2.Digest.DESCRIPTOR):
            digest = re_pb2.Digest()
            payload.Unpack(digest)
            return digest_key(digest)
    except DecodeError:
        return None
    return None


def printable(text: str) -> str:
    """Valid UTF-8 whatever the action named its files (a non-UTF-8 name arrives as
    surrogates, which protobuf refuses to encode)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_environment(command: re_pb2.Command) -> None:
    """REAPI: environment variable names must be unique (a duplicate would silently lose
    one of the values)."""
    seen: set[str] = set()
    for i, variable in enumerate(command.environment_variables):
        if variable.name in seen:
            raise _Failed(code_pb2.INVALID_ARGUMENT,
                          f"command.environment_variables[{i}].name: {variable.name!r} "
                          "appears more than once")
        seen.add(variable.name)


class _Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class RunningLease:
    """A lease being worked on, cancellable from the session thread."""

    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        self.cancelled = threading.Event()
        self._execution: Execution | None = None
        self._lock = threading.Lock()

    def attach(self, execution: Execution) -> None:
        with self._lock:
            self._execution = execution
            cancel = self.cancelled.is_set()
        if cancel:
            execution.cancel()

    def cancel(self, hard: bool = False) -> None:
        """The lease is gone (cancelled by the client, or given to another bot): the
        action's whole tree gets the cancel signal, then SIGKILL after the grace."""
        with self._lock:
            self.cancelled.set()
            execution = self._execution
        if execution is not None:
            execution.cancel(hard=hard)


class ActionRunner:
    """Runs leases; one instance per worker, called from one thread per lease."""

    def __init__(self, config: WorkerConfig, cas: CasClient, cache: LocalCas,
                 workspace: Workspace) -> None:
        self.config = config
        self.cas = cas
        self.cache = cache
        self.workspace = workspace

    def run(self, lease: bots_pb2.Lease, running: RunningLease,
            queued: timestamp_pb2.Timestamp | None = None) -> LeaseOutcome:
        outcome = LeaseOutcome(lease.id)
        outcome.timings["worker_start"] = time.time()
        began = time.monotonic()
        metadata = re_pb2.ExecutedActionMetadata(worker=self.config.bot_id,
                                                 worker_start_timestamp=_now())
        if queued is not None:
            metadata.queued_timestamp.CopyFrom(queued)
        action_dir: ActionDir | None = None
        try:
            action, outcome.action_digest = self._action(lease)
            command = self._command(action)
            self._network(action, command)  # refused before anything is staged
            action_dir = self.workspace.new_action()
            metadata.input_fetch_start_timestamp.CopyFrom(_now())
            started = time.monotonic()
            # An action that would own the cache's files (unsandboxed, or a non-root
            # worker's) could write into them through hardlinks: it gets copies (see
            # Workspace.copy_inputs). Symlinks are never followed while staging, so absolute
            # and climbing targets (common in sysroots) are staged as they are.
            stats = stage_input_root(self.cache, self.cas, action.input_root_digest,
                                     action_dir.root, allow_escaping_symlinks=True,
                                     copy=self.workspace.copy_inputs)
            outcome.fetched_bytes = stats.bytes_fetched
            outcome.cache_hits, outcome.cache_misses = stats.cache_hits, stats.cache_misses
            prepare_outputs(command, action_dir.root, command.working_directory)
            action_dir.own_directories()
            metadata.input_fetch_completed_timestamp.CopyFrom(_now())
            outcome.timings["input_fetch"] = time.monotonic() - started
            if running.cancelled.is_set():
                outcome.cancelled = True
                return outcome
            metadata.execution_start_timestamp.CopyFrom(_now())
            started = time.monotonic()
            result = self._execute(action, command, action_dir, running, outcome)
            metadata.execution_completed_timestamp.CopyFrom(_now())
            outcome.timings["execution"] = time.monotonic() - started
            if running.cancelled.is_set() or result.cancelled:
                outcome.cancelled = True
                return outcome
            metadata.output_upload_start_timestamp.CopyFrom(_now())
            started = time.monotonic()
            action_result, output_error = self._outputs(command, action_dir)
            metadata.output_upload_completed_timestamp.CopyFrom(_now())
            outcome.timings["output_upload"] = time.monotonic() - started
            self._report(result, outcome, action_result, metadata)
            if output_error is not None and outcome.code == code_pb2.OK:
                # Like bb_worker: the error goes with the partly filled result, so the
                # client still sees the exit code, stdout and stderr.
                outcome.code = code_pb2.FAILED_PRECONDITION
                outcome.message = str(output_error)
        except _Failed as failed:
            outcome.code, outcome.message = failed.code, failed.message
        except InputError as exc:
            outcome.code, outcome.message = code_pb2.INVALID_ARGUMENT, str(exc)
        except CasError as exc:
            if exc.missing:  # REAPI: the client uploads what is missing and tries again
                outcome.code = code_pb2.FAILED_PRECONDITION
                outcome.message = f"missing from the CAS: {', '.join(exc.missing)}"
                outcome.missing = list(exc.missing)
            else:  # BuildGrid retries the job
                outcome.code, outcome.message = code_pb2.UNAVAILABLE, f"CAS: {exc}"
        except SpecError as exc:
            outcome.code, outcome.message = code_pb2.INVALID_ARGUMENT, str(exc)
        except OSError as exc:
            outcome.code = code_pb2.INTERNAL
            where = f": {exc.filename}" if exc.filename else ""
            outcome.message = f"worker: {exc.strerror or exc}{where}"
        finally:
            if action_dir is not None:
                action_dir.close()
        if outcome.result is None and outcome.code != code_pb2.OK:
            metadata.worker_completed_timestamp.CopyFrom(_now())
            outcome.result = re_pb2.ActionResult(execution_metadata=metadata)
        outcome.timings["total"] = time.monotonic() - began
        return outcome

    # -- the stages ----------------------------------------------------------------------
    def _action(self, lease: bots_pb2.Lease) -> tuple[re_pb2.Action, str]:
        try:
            return self._decode_action(lease)
        except DecodeError as exc:
            raise _Failed(code_pb2.INVALID_ARGUMENT,
                          f"lease payload: the Action does not decode: {exc}") from None

    def _decode_action(self, lease: bots_pb2.Lease) -> tuple[re_pb2.Action, str]:
        payload = lease.payload
        if payload.Is(re_pb2.Action.DESCRIPTOR):
            action = re_pb2.Action()
            payload.Unpack(action)
            return action, digest_key(digest_of_bytes(action.SerializeToString()))
        if payload.Is(re_pb2.Digest.DESCRIPTOR):
            digest = re_pb2.Digest()
            payload.Unpack(digest)
            action = re_pb2.Action()
            action.ParseFromString(self._blob(digest, "action"))
            return action, digest_key(digest)
        raise _Failed(code_pb2.INVALID_ARGUMENT,
                      f"lease payload: expected an Action or its Digest, got {payload.type_url}")

    def _blob(self, digest: re_pb2.Digest, what: str) -> bytes:
        blobs = self.cas.read_blobs([digest])
        blob = blobs.get(digest_key(digest))
        if blob is None:
            raise CasError(f"{what} {digest_key(digest)} is not in the CAS",
                           code_pb2.NOT_FOUND, missing=[digest_key(digest)])
        return blob

    def _command(self, action: re_pb2.Action) -> re_pb2.Command:
        command = re_pb2.Command()
        command.ParseFromString(self._blob(action.command_digest, "command"))
        if not command.arguments:
            raise _Failed(code_pb2.INVALID_ARGUMENT, "command.arguments: must not be empty")
        if command.output_node_properties:
            raise _Failed(code_pb2.INVALID_ARGUMENT,
                          "command.output_node_properties: not supported by this worker: "
                          + ", ".join(command.output_node_properties))
        wd = command.working_directory
        normal = posixpath.normpath(wd) if wd else "."
        if wd.startswith("/") or normal == ".." or normal.startswith("../"):
            raise _Failed(code_pb2.INVALID_ARGUMENT, f"command.working_directory: must be "
                                                     f"inside the input root, got {wd!r}")
        _check_environment(command)
        return command

    def _timeout(self, action: re_pb2.Action) -> float | None:
        requested = action.timeout.ToNanoseconds() / 1e9 if action.HasField("timeout") else 0
        limits = [t for t in (requested or None, self.config.max_timeout) if t]
        return min(limits) if limits else None

    def _network(self, action: re_pb2.Action, command: re_pb2.Command) -> bool:
        """The host network when the action asks (network=on). A worker that does not offer
        it (--property network=off) refuses the lease rather than run the action without
        the network it asked for."""
        properties = list(action.platform.properties) or list(command.platform.properties)
        wanted = any(p.name == "network" and p.value == "on" for p in properties)
        if wanted and ("network", "on") not in self.config.properties:
            offered = dict(self.config.properties).get("network", "")
            raise _Failed(code_pb2.FAILED_PRECONDITION,
                          f"platform.network: the action asks for network=on; this worker "
                          f"offers network={offered or '(none)'}")
        return wanted

    def _ids(self, action: re_pb2.Action,
             command: re_pb2.Command) -> tuple[int | None, int | None]:
        """The user and group the action runs as inside its sandbox, from the platform's
        unixUID / unixGID (BuildStream sends them); the sandbox's default otherwise."""
        properties = list(action.platform.properties) or list(command.platform.properties)
        ids: dict[str, int] = {}
        for name, key in (("unixUID", "uid"), ("unixGID", "gid")):
            values = [p.value for p in properties if p.name == name]
            if not values:
                continue
            if len(values) > 1 or not values[0].isdigit() or int(values[0]) >= 2**32 - 1:
                raise _Failed(code_pb2.INVALID_ARGUMENT, f"platform.{name}: expected one id "
                                                         f"in 0..4294967294, got {values}")
            ids[key] = int(values[0])
        return ids.get("uid"), ids.get("gid")

    def _execute(self, action: re_pb2.Action, command: re_pb2.Command, action_dir: ActionDir,
                 running: RunningLease, outcome: LeaseOutcome) -> Result:
        wd = command.working_directory
        options: dict[str, Any] = {}
        if self.config.sandbox:
            uid, gid = self._ids(action, command)
            network = self._network(action, command)
            if self.config.input_root_as_root:  # BuildStream's sysroots, buildbox-run's chroot
                options["sandbox"] = SandboxSpec(str(action_dir.root), root_writable=True,
                                                 bind_workdir=False, share_net=network, uid=uid,
                                                 gid=gid)
                options["cwd"] = posixpath.normpath(posixpath.join("/", wd))
            else:
                inside = self.config.input_root_path
                options["sandbox"] = SandboxSpec(
                    binds=[(str(action_dir.root), inside)], bind_workdir=False,
                    share_net=network, uid=uid, gid=gid)
                options["cwd"] = posixpath.normpath(posixpath.join(inside, wd))
        else:
            options["cwd"] = os.path.normpath(os.path.join(action_dir.root, wd))
        if self.config.memory is not None:
            options["memory"] = self.config.memory
        if self.config.pids is not None:
            options["pids"] = self.config.pids
        launched = time.monotonic()
        execution = start(list(command.arguments),
                          env={v.name: v.value for v in command.environment_variables},
                          timeout=self._timeout(action), grace=self.config.grace,
                          stdin=DEVNULL, stdout=str(action_dir.stdout),
                          stderr=str(action_dir.stderr), **options)
        running.attach(execution)
        if execution.wait_started() is not None:
            outcome.timings["launch"] = time.monotonic() - launched
        result = execution.wait()
        outcome.exit_code = result.exit_code
        outcome.timings["command"] = result.usage.wall_time
        return result

    def _outputs(self, command: re_pb2.Command,
                 action_dir: ActionDir) -> tuple[re_pb2.ActionResult, OutputError | None]:
        """The outputs, stdout and stderr uploaded; an output that does not match its
        declaration is returned (the others and the streams are still reported)."""
        action_result = re_pb2.ActionResult()
        error: OutputError | None = None
        try:
            collect_outputs(command, action_dir.root, command.working_directory, self.cas,
                            action_result)
        except OutputError as exc:
            error = exc
        for name, path in (("stdout", action_dir.stdout), ("stderr", action_dir.stderr)):
            if path.exists():
                digest, raw = upload_std_stream(self.cas, path)
                getattr(action_result, f"{name}_digest").CopyFrom(digest)
                if raw:
                    setattr(action_result, f"{name}_raw", raw)
        return action_result, error

    def _report(self, result: Result, outcome: LeaseOutcome, action_result: re_pb2.ActionResult,
                metadata: re_pb2.ExecutedActionMetadata) -> None:
        action_result.exit_code = result.exit_code
        metadata.auxiliary_metadata.append(_pack(usage_message(result.usage)))
        cgroup = cgroup_message(result, self.config.memory)
        if cgroup is not None:
            metadata.auxiliary_metadata.append(_pack(cgroup))
        if result.failure is not None:
            metadata.auxiliary_metadata.append(_pack(failure_message(result.failure)))
            outcome.code = failure_code(result.failure)
            outcome.message = first_line(result.failure.message)
        elif result.timed_out:
            outcome.code = code_pb2.DEADLINE_EXCEEDED
            outcome.message = "the action's timeout passed; execbox ended its whole tree"
        elif result.unkillable:
            outcome.code = code_pb2.INTERNAL
            outcome.message = f"processes of the action survived SIGKILL: {result.unkillable}"
        metadata.worker_completed_timestamp.CopyFrom(_now())
        action_result.execution_metadata.CopyFrom(metadata)
        outcome.result = action_result
