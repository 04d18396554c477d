"""execbox's Result -> what bb_worker expects from Run: a RunResponse (exit code as Go's
ExitCode() gives it, resource usage as Any messages) or a gRPC status for an action that
could not be started, and the record the runner leaves in the server logs directory."""

from __future__ import annotations

import json
from typing import Any

from ...model.result import Result
from ..common.status import cgroup_message, failure_code, first_line, usage_message
from .protos import any_pb2, grpc, runner_pb2

# bb_runner reports a process a signal ended as Go's ProcessState.ExitCode() does: -1 (the
# signal itself is POSIXResourceUsage.termination_signal).
SIGNALLED_EXIT_CODE = -1
SERVER_LOG_NAME = "execbox-result.json"

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def exit_code(result: Result) -> int:
    return SIGNALLED_EXIT_CODE if result.signal is not None else result.exit_code


def run_response(result: Result, memory_limit: int | None) -> runner_pb2.RunResponse:
    """POSIXResourceUsage first (what bb_worker reads), then execbox.v1.CgroupUsage when
    the action had a cgroup."""
    usage = [_pack(usage_message(result.usage))]
    cgroup = cgroup_message(result, memory_limit)
    if cgroup is not None:
        usage.append(_pack(cgroup))
    return runner_pb2.RunResponse(exit_code=exit_code(result), resource_usage=usage)


def error_status(result: Result) -> tuple[grpc.StatusCode, str] | None:
    """The status for a Run that did not run to an end bb_worker can report, else None.
    Start failures follow bb_runner: ENOENT, EACCES, ENOEXEC, EISDIR (the request's fault)
    are INVALID_ARGUMENT, anything else INTERNAL; the message is execbox's first line."""
    if result.failure is not None:
        return _CODES[failure_code(result.failure)], first_line(result.failure.message)
    if result.unkillable:
        pids = ", ".join(str(p) for p in result.unkillable)
        return grpc.StatusCode.INTERNAL, f"processes of the action survived SIGKILL: {pids}"
    return None


def server_log(result: Result) -> bytes | None:
    """execbox's whole Result (failure with its hint, OOM, survivors, cleanup errors) when
    there is something to explain; bb_worker attaches the directory's files to the result."""
    if (result.failure is None and not result.oom_killed and not result.unkillable
            and not result.cleanup_errors):
        return None
    return (json.dumps(result.to_dict(), indent=1, sort_keys=True) + "\n").encode()
