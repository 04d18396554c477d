"""The outcome of one run, and its one encoding.

The supervisor builds a Result, sends Result.to_dict() to the caller, the caller rebuilds it
with Result.from_dict(); the CLI's --result file and the adapters use the same dict.
"""

from __future__ import annotations

from .exits import EXIT_TIMEOUT
from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Failure(Record):
    """Why the step did not run or was not seen to the end: the failing step's name, the
    errno name, a message and advice."""

    __slots__ = ("errno", "hint", "message", "step")
    step: str
    errno: str
    message: str
    hint: str

    def __init__(self, step: str, errno: str, message: str, hint: str = "") -> None:
        self._set(step=step, errno=errno, message=message, hint=hint)

    def to_dict(self) -> dict[str, str]:
        return {"step": self.step, "errno": self.errno, "message": self.message,
                "hint": self.hint}


USAGE_COUNTERS = ("page_reclaims", "page_faults", "swaps", "block_input_operations",
                  "block_output_operations", "messages_sent", "messages_received",
                  "signals_received", "voluntary_context_switches",
                  "involuntary_context_switches")


class Usage(Record):
    """Every process of the step together. Field names follow Buildbarn's
    POSIXResourceUsage (termination_signal without "SIG"); seconds and bytes."""

    __slots__ = ("block_input_operations", "block_output_operations", "cgroup_cpu_time",
                 "cgroup_peak_memory", "involuntary_context_switches",
                 "maximum_resident_set_size", "messages_received", "messages_sent",
                 "page_faults", "page_reclaims", "signals_received", "swaps", "system_time",
                 "termination_signal", "user_time", "voluntary_context_switches", "wall_time")
    user_time: float
    system_time: float
    maximum_resident_set_size: int
    page_reclaims: int
    page_faults: int
    swaps: int
    block_input_operations: int
    block_output_operations: int
    messages_sent: int
    messages_received: int
    signals_received: int
    voluntary_context_switches: int
    involuntary_context_switches: int
    termination_signal: str | None
    wall_time: float
    cgroup_cpu_time: float | None
    cgroup_peak_memory: int | None

    def __init__(self, user_time: float = 0.0, system_time: float = 0.0,
                 maximum_resident_set_size: int = 0, page_reclaims: int = 0,
                 page_faults: int = 0, swaps: int = 0, block_input_operations: int = 0,
                 block_output_operations: int = 0, messages_sent: int = 0,
                 messages_received: int = 0, signals_received: int = 0,
                 voluntary_context_switches: int = 0, involuntary_context_switches: int = 0,
                 termination_signal: str | None = None, wall_time: float = 0.0,
                 cgroup_cpu_time: float | None = None,
                 cgroup_peak_memory: int | None = None) -> None:
        self._set(user_time=user_time, system_time=system_time,
                  maximum_resident_set_size=maximum_resident_set_size,
                  page_reclaims=page_reclaims, page_faults=page_faults, swaps=swaps,
                  block_input_operations=block_input_operations,
                  block_output_operations=block_output_operations,
                  messages_sent=messages_sent, messages_received=messages_received,
                  signals_received=signals_received,
                  voluntary_context_switches=voluntary_context_switches,
                  involuntary_context_switches=involuntary_context_switches,
                  termination_signal=termination_signal, wall_time=wall_time,
                  cgroup_cpu_time=cgroup_cpu_time, cgroup_peak_memory=cgroup_peak_memory)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _USAGE_ORDER}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        return cls(**{k: v for k, v in data.items() if k in cls.__slots__})


_USAGE_ORDER = ("user_time", "system_time", "maximum_resident_set_size", *USAGE_COUNTERS,
                "termination_signal", "wall_time", "cgroup_cpu_time", "cgroup_peak_memory")


class Result(Record):
    """How a run ended. exit_code is the step's status, 128+n if signal n killed it, or
    125/126/127 when a setup step or execve failed (see failure).

    started_at/ended_at are wall-clock seconds since the epoch; usage.wall_time is measured
    on the monotonic clock. signal is "SIGKILL"-style, signal_number the number and
    usage.termination_signal Buildbarn's "KILL". unkillable lists pids that survived every
    kill; output_dropped counts bytes an output cap dropped per stream; cleanup_errors says
    what could not be cleaned up (a cgroup left, say)."""

    __slots__ = ("cancelled", "cleanup_errors", "ended_at", "exit_code", "failure",
                 "oom_killed", "output_dropped", "pid", "pty_fallback", "signal",
                 "signal_number", "started_at", "stderr", "stdout", "timed_out",
                 "unkillable", "usage")
    exit_code: int
    signal: str | None
    signal_number: int | None
    timed_out: bool
    cancelled: bool
    failure: Failure | None
    usage: Usage
    pid: int | None
    started_at: float | None
    ended_at: float | None
    stdout: bytes | None
    stderr: bytes | None
    pty_fallback: str | None
    oom_killed: bool
    unkillable: tuple[int, ...]
    output_dropped: dict[str, int]
    cleanup_errors: tuple[str, ...]

    def __init__(self, exit_code: int, signal: str | None = None,
                 signal_number: int | None = None, timed_out: bool = False,
                 cancelled: bool = False, failure: Failure | None = None,
                 usage: Usage | None = None, pid: int | None = None,
                 started_at: float | None = None, ended_at: float | None = None,
                 stdout: bytes | None = None, stderr: bytes | None = None,
                 pty_fallback: str | None = None, oom_killed: bool = False,
                 unkillable: tuple[int, ...] | list[int] = (),
                 output_dropped: dict[str, int] | None = None,
                 cleanup_errors: tuple[str, ...] | list[str] = ()) -> None:
        self._set(exit_code=exit_code, signal=signal, signal_number=signal_number,
                  timed_out=timed_out, cancelled=cancelled, failure=failure,
                  usage=usage if usage is not None else Usage(), pid=pid,
                  started_at=started_at, ended_at=ended_at, stdout=stdout, stderr=stderr,
                  pty_fallback=pty_fallback, oom_killed=oom_killed,
                  unkillable=tuple(unkillable), output_dropped=dict(output_dropped or {}),
                  cleanup_errors=tuple(cleanup_errors))

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.failure is None and not self.timed_out

    @property
    def exit_status(self) -> int:
        """What `execbox run` exits with: 124 on timeout, else exit_code."""
        return EXIT_TIMEOUT if self.timed_out else self.exit_code

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON- and marshal-safe); captured output is not part of it."""
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "signal_number": self.signal_number,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "failure": None if self.failure is None else self.failure.to_dict(),
            "usage": self.usage.to_dict(),
            "pid": self.pid,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "pty_fallback": self.pty_fallback,
            "oom_killed": self.oom_killed,
            "unkillable": list(self.unkillable),
            "output_dropped": dict(self.output_dropped),
            "cleanup_errors": list(self.cleanup_errors),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], stdout: bytes | None = None,
                  stderr: bytes | None = None) -> Result:
        failure = data.get("failure")
        return cls(
            exit_code=data["exit_code"], signal=data.get("signal"),
            signal_number=data.get("signal_number"), timed_out=bool(data.get("timed_out")),
            cancelled=bool(data.get("cancelled")),
            failure=None if failure is None else Failure(**failure),
            usage=Usage.from_dict(data.get("usage") or {}), pid=data.get("pid"),
            started_at=data.get("started_at"), ended_at=data.get("ended_at"),
            stdout=stdout, stderr=stderr, pty_fallback=data.get("pty_fallback"),
            oom_killed=bool(data.get("oom_killed")), unkillable=data.get("unkillable", ()),
            output_dropped=data.get("output_dropped"),
            cleanup_errors=data.get("cleanup_errors", ()))


def not_started(failure: Failure, exit_code: int) -> Result:
    """The Result of a step that never ran (a setup step failed before or at its start)."""
    return Result(exit_code=exit_code, failure=failure)
