"""execbox's Result -> the messages and status codes every adapter reports: Buildbarn's
POSIXResourceUsage, execbox.v1.SetupFailure and CgroupUsage, and Buildbarn's rule for which
start failures are the request's fault.

Needs only protobuf (no grpc, no REAPI protos), so each adapter maps codes its own way.
"""

from __future__ import annotations

import errno as errno_module

from google.protobuf import duration_pb2

from ...model.result import Failure, Result, Usage
from ..protos import execbox_pb2, resourceusage_pb2

# google.rpc.Code numbers (the same as grpc.StatusCode's): stable across the protocol.
INVALID_ARGUMENT = 3
INTERNAL = 13

# Buildbarn's rule for a process that could not be started: the request was at fault for
# these (a missing or non-executable program, a directory as program or working directory),
# execbox or the host for anything else.
_REQUEST_ERRNOS = ("ENOENT", "EACCES", "ENOEXEC", "EISDIR", "ENOTDIR", "ELOOP",
                   "ENAMETOOLONG", "E2BIG")  # E2BIG: the arguments and environment
_REQUEST_STEPS = ("execve", "chdir")


# An input root used as the sandbox's / whose proc, sys, dev or tmp entry is a symlink or a
# file: the request's own data is at fault.
_ROOT_ENTRY_STEPS = ("mount /proc", "mount /sys", "mount /dev", "tmpfs /tmp")
_ROOT_ENTRY_ERRNOS = ("ELOOP", "EEXIST", "ENOTDIR")


def failure_code(failure: Failure) -> int:
    """INVALID_ARGUMENT when the action itself names a program or directory that cannot be
    used; INTERNAL when a setup step of execbox or the host failed."""
    if failure.step in _ROOT_ENTRY_STEPS and failure.errno in _ROOT_ENTRY_ERRNOS:
        return INVALID_ARGUMENT
    if failure.step in _REQUEST_STEPS and failure.errno in _REQUEST_ERRNOS:
        return INVALID_ARGUMENT
    return INTERNAL


def _duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


def usage_message(usage: Usage) -> resourceusage_pb2.POSIXResourceUsage:
    """Usage as Buildbarn's POSIXResourceUsage (same wire format)."""
    return resourceusage_pb2.POSIXResourceUsage(
        user_time=_duration(usage.user_time), system_time=_duration(usage.system_time),
        maximum_resident_set_size=usage.maximum_resident_set_size,
        page_reclaims=usage.page_reclaims, page_faults=usage.page_faults, swaps=usage.swaps,
        block_input_operations=usage.block_input_operations,
        block_output_operations=usage.block_output_operations,
        messages_sent=usage.messages_sent, messages_received=usage.messages_received,
        signals_received=usage.signals_received,
        voluntary_context_switches=usage.voluntary_context_switches,
        involuntary_context_switches=usage.involuntary_context_switches,
        termination_signal=usage.termination_signal or "")


def failure_message(failure: Failure, path: str = "") -> execbox_pb2.SetupFailure:
    """The setup failure as a record a client can read (step, errno, hint)."""
    number = getattr(errno_module, failure.errno, 0) if failure.errno else 0
    return execbox_pb2.SetupFailure(step=failure.step, errno_name=failure.errno or "",
                                    errno_number=int(number), path=path,
                                    message=failure.message, hint=failure.hint)


def cgroup_message(result: Result, memory_limit: int | None) -> execbox_pb2.CgroupUsage | None:
    """The cgroup's view of the action, when execbox ran it in one."""
    usage = result.usage
    if usage.cgroup_peak_memory is None and usage.cgroup_cpu_time is None:
        return None
    return execbox_pb2.CgroupUsage(
        memory_peak_bytes=usage.cgroup_peak_memory or 0,
        cpu_usage_usec=round((usage.cgroup_cpu_time or 0.0) * 1e6),
        memory_limit_bytes=memory_limit or 0, oom_killed=result.oom_killed)


def first_line(text: str) -> str:
    """A status message is one line: execbox's messages put the reason first."""
    return text.strip().splitlines()[0] if text.strip() else ""
