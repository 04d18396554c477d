"""The outcome of one run: how it ended, why it failed to start, and what it used."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..report.diagnose import EXIT_TIMEOUT


@dataclass(frozen=True)
class Failure:
    """A setup step that failed in the child: its name, the errno name, and advice."""

    step: str
    errno: str
    message: str
    hint: str


@dataclass(frozen=True)
class Usage:
    """Field names follow Buildbarn's POSIXResourceUsage; seconds and bytes."""

    user_time: float = 0.0
    system_time: float = 0.0
    maximum_resident_set_size: int = 0
    page_reclaims: int = 0
    page_faults: int = 0
    swaps: int = 0
    block_input_operations: int = 0
    block_output_operations: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    signals_received: int = 0
    voluntary_context_switches: int = 0
    involuntary_context_switches: int = 0
    termination_signal: str | None = None
    wall_time: float = 0.0
    cgroup_cpu_time: float | None = None  # from the step's cgroup, when it had one
    cgroup_peak_memory: int | None = None


@dataclass(frozen=True)
class Result:
    """exit_code is the child's status, 128+n if signal n killed it, or 125/126/127 when a
    setup step or execve failed (see failure)."""

    exit_code: int
    signal: str | None = None
    timed_out: bool = False
    cancelled: bool = False
    failure: Failure | None = None
    usage: Usage = Usage()
    pid: int | None = None
    stdout: bytes | None = None
    stderr: bytes | None = None
    pty_fallback: str | None = None
    oom_killed: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.failure is None and not self.timed_out

    @property
    def exit_status(self) -> int:
        """What `execbox run` exits with: 124 on timeout, else exit_code."""
        return EXIT_TIMEOUT if self.timed_out else self.exit_code

    def to_json_dict(self) -> dict[str, Any]:
        data = {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "failure": None if self.failure is None else asdict(self.failure),
            "usage": asdict(self.usage),
            "pid": self.pid,
            "pty_fallback": self.pty_fallback,
            "oom_killed": self.oom_killed,
        }
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any], stdout: bytes | None = None,
                  stderr: bytes | None = None) -> Result:
        usage_fields = {f.name for f in fields(Usage)}
        failure = data.get("failure")
        return cls(
            exit_code=data["exit_code"],
            signal=data["signal"],
            timed_out=data["timed_out"],
            cancelled=data["cancelled"],
            failure=None if failure is None else Failure(**failure),
            usage=Usage(**{k: v for k, v in data["usage"].items() if k in usage_fields}),
            pid=data.get("pid"),
            stdout=stdout,
            stderr=stderr,
            pty_fallback=data.get("pty_fallback"),
            oom_killed=bool(data.get("oom_killed")),
        )
