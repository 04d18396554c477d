"""What to run, validated once and frozen: argv, environment, directory, limits, lifecycle."""

from __future__ import annotations

import math
import os
import resource
import signal
from collections.abc import Mapping

from .errors import SpecError
from .record import Record
from .signals import parse_signal

TYPE_CHECKING = False  # typing and dataclasses cost start-up time the CLI cannot spare
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from .sandbox import SandboxSpec

DEFAULT_GRACE = 10.0

PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]

_RLIMIT_NAMES = {
    name[len("RLIMIT_"):].lower(): int(getattr(resource, name))
    for name in dir(resource)
    if name.startswith("RLIMIT_")
}


def rlimit_name(which: int) -> str:
    """RLIMIT_NOFILE -> "nofile", as rlimits= names it."""
    return next((name for name, number in _RLIMIT_NAMES.items() if number == which),
                str(which))


def rlimit_text(which: int, soft: int, hard: int) -> str:
    """"nofile 100:unlimited": a limit as a failure names it."""
    def value(limit: int) -> str:
        return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)

    return f"{rlimit_name(which)} {value(soft)}:{value(hard)}"


def no_room(which: int, soft: int, highest_fd: int) -> str | None:
    """Why a nofile soft limit leaves the step's highest fd no room, or None."""
    if which != resource.RLIMIT_NOFILE or soft == resource.RLIM_INFINITY or soft > highest_fd:
        return None
    return f"nofile {soft} leaves no room for the step's fd {highest_fd}"


class Limits(Record):
    """cgroup limits and device rules of one step. join_cgroup: the cgroup.procs files of a
    long-lived sandbox's cgroup, which its runs join instead of getting their own;
    optional: a sandbox's cgroup is an extra kill guarantee, skipped where cgroups are not
    writable."""

    __slots__ = ("cpus", "device_mode", "devices", "join_cgroup", "memory", "optional", "pids")
    memory: int | None
    pids: int | None
    cpus: float | None
    devices: tuple[str, ...] | None
    device_mode: str
    optional: bool
    join_cgroup: tuple[str, ...]

    def __init__(self, memory: int | None = None, pids: int | None = None,
                 cpus: float | None = None, devices: tuple[str, ...] | list[str] | None = None,
                 device_mode: str = "auto", optional: bool = False,
                 join_cgroup: tuple[str, ...] | list[str] = ()) -> None:
        self._set(memory=memory, pids=pids, cpus=cpus,
                  devices=None if devices is None else tuple(devices), device_mode=device_mode,
                  optional=optional, join_cgroup=tuple(join_cgroup))

    def to_wire(self) -> dict[str, Any]:
        return {n: (list(v) if isinstance(v, tuple) else v)
                for n in self.__slots__ for v in (getattr(self, n),)}


class CommandSpec(Record):
    """A validated command; env=None means "the submitting process's environment".

    Immutable once built (use make_spec to build one from user input). sandbox_role says
    how the step relates to a long-lived sandbox (see model.sandbox.SANDBOX_ROLES).
    """

    __slots__ = ("argv", "cancel_signal", "controlling_tty", "cwd", "env", "grace", "limits",
                 "new_session", "rlimits", "sandbox", "sandbox_role", "timeout", "umask")

    argv: tuple[str, ...]
    cwd: str | None
    env: tuple[tuple[str, str], ...] | None
    timeout: float | None
    grace: float
    cancel_signal: int
    rlimits: tuple[tuple[int, int, int], ...]
    umask: int | None
    new_session: bool
    controlling_tty: bool
    sandbox: SandboxSpec | None
    sandbox_role: str
    limits: Limits | None

    def __init__(self, argv: tuple[str, ...], cwd: str | None = None,
                 env: tuple[tuple[str, str], ...] | None = None, timeout: float | None = None,
                 grace: float = DEFAULT_GRACE, cancel_signal: int = int(signal.SIGTERM),
                 rlimits: tuple[tuple[int, int, int], ...] = (), umask: int | None = None,
                 new_session: bool = True, controlling_tty: bool = False,
                 sandbox: SandboxSpec | None = None, sandbox_role: str = "new",
                 limits: Limits | None = None) -> None:
        self._set(argv=argv, cwd=cwd, env=env, timeout=timeout, grace=grace,
                  cancel_signal=cancel_signal, rlimits=rlimits, umask=umask,
                  new_session=new_session, controlling_tty=controlling_tty, sandbox=sandbox,
                  sandbox_role=sandbox_role, limits=limits)

    def to_wire(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "cwd": self.cwd,
            "env": None if self.env is None else [list(kv) for kv in self.env],
            "timeout": self.timeout,
            "grace": self.grace,
            "cancel_signal": self.cancel_signal,
            "rlimits": [list(r) for r in self.rlimits],
            "umask": self.umask,
            "new_session": self.new_session,
            "controlling_tty": self.controlling_tty,
            "sandbox": None if self.sandbox is None else self.sandbox.to_wire(),
            "sandbox_role": self.sandbox_role,
            "limits": None if self.limits is None else self.limits.to_wire(),
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CommandSpec:
        env = data["env"]
        box = data["sandbox"]
        limits = data["limits"]
        if box is not None:
            from .sandbox import SandboxSpec

            box = SandboxSpec.from_wire(box)
        return cls(
            argv=tuple(data["argv"]),
            cwd=data["cwd"],
            env=None if env is None else tuple((k, v) for k, v in env),
            timeout=data["timeout"],
            grace=data["grace"],
            cancel_signal=data["cancel_signal"],
            rlimits=tuple((a, b, c) for a, b, c in data["rlimits"]),
            umask=data["umask"],
            new_session=data["new_session"],
            controlling_tty=data["controlling_tty"],
            sandbox=box,
            sandbox_role=data["sandbox_role"],
            limits=None if limits is None else Limits(**limits),
        )


def _text(value: object, field: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, str):
        raise SpecError(field, f"expected a string, got {type(value).__name__}")
    if "\0" in value:
        raise SpecError(field, "must not contain a NUL byte")
    return value


def _cpus(value: object) -> float:
    """As docker's --cpus: more CPUs than this machine has would limit nothing."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError("cpus", f"expected a number of CPUs, got {value!r}")
    cpus = _duration(value, "cpus", allow_zero=False)
    available = os.cpu_count() or 1
    if cpus > available:
        raise SpecError("cpus", f"out of range: {value!r} is more than the {available} CPUs "
                                "this machine has")
    return cpus


def _duration(value: object, field: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(field, f"expected a number of seconds, got {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise SpecError(field, f"must be finite, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        raise SpecError(field, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return number


def _env(env: Mapping[Any, Any], field: str = "env") -> tuple[tuple[str, str], ...]:
    if not isinstance(env, Mapping):
        raise SpecError(field, f"expected a mapping of names to values, got {type(env).__name__}")
    items = tuple(env.items())
    if all(type(k) is str and type(v) is str and k and "=" not in k and "\0" not in k
           and "\0" not in v for k, v in items):
        return items  # the common case, checked in one pass
    pairs = []
    for key, val in env.items():
        name = _text(key, f"{field} key")
        if not name:
            raise SpecError(field, "variable name must not be empty")
        if "=" in name:
            raise SpecError(f"{field}[{name!r}]", "variable name must not contain '='")
        pairs.append((name, _text(val, f"{field}[{name!r}]")))
    return tuple(pairs)


def _rlimits(limits: Mapping[str, Any]) -> tuple[tuple[int, int, int], ...]:
    if not hasattr(limits, "items"):
        raise SpecError("rlimits", f"expected a mapping of resource names to limits, such "
                                   f"as {{'nofile': 1024}}, got {type(limits).__name__}")
    out = []
    for name, value in limits.items():
        field = f"rlimits[{name!r}]"
        key = str(name).lower().removeprefix("rlimit_")
        if key not in _RLIMIT_NAMES:
            raise SpecError(field, f"unknown resource; known: {', '.join(sorted(_RLIMIT_NAMES))}")
        if isinstance(value, int) and not isinstance(value, bool):
            soft = hard = value
        elif isinstance(value, tuple | list) and len(value) == 2:
            soft, hard = value
        else:
            raise SpecError(field, "expected an int or a (soft, hard) pair")
        for v in (soft, hard):
            valid = isinstance(v, int) and not isinstance(v, bool)
            if not valid or (v < 0 and v != resource.RLIM_INFINITY):
                raise SpecError(field, f"limit must be a non-negative int, got {v!r}")
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            raise SpecError(field, f"soft limit {soft} exceeds hard limit {hard}")
        out.append((_RLIMIT_NAMES[key], soft, hard))
    return tuple(out)


def make_spec(
    argv: Iterable[PathArg],
    *,
    cwd: PathArg | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    grace: float = DEFAULT_GRACE,
    cancel_signal: str | int = "SIGTERM",
    rlimits: Mapping[str, int | tuple[int, int]] | None = None,
    umask: int | None = None,
    new_session: bool = True,
    controlling_tty: bool = False,
    sandbox: SandboxSpec | None = None,
    sandbox_role: str = "new",
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    devices: list[str] | None = None,
    device_mode: str = "auto",
    join_cgroup: list[str] | None = None,
    cgroup_optional: bool = False,
) -> CommandSpec:
    """Validate user input into a CommandSpec; every error names its field."""
    if isinstance(argv, str | bytes | os.PathLike):
        raise SpecError("argv", "expected a list of arguments, not a single string")
    try:
        args = tuple(_text(a, f"argv[{i}]") for i, a in enumerate(argv))
    except TypeError:
        raise SpecError("argv", f"expected a list of strings, got {type(argv).__name__}") from None
    if not args:
        raise SpecError("argv", "must contain at least the program")
    if not args[0]:
        raise SpecError("argv[0]", "program must not be empty")
    work_dir = None if cwd is None else _text(cwd, "cwd")
    if work_dir == "":
        raise SpecError("cwd", "must not be empty (leave it out for the current directory)")
    if umask is not None and (isinstance(umask, bool) or not isinstance(umask, int)
                              or not 0 <= umask <= 0o777):
        raise SpecError("umask", f"expected an int in 0..0o777, got {umask!r}")
    if sandbox_role not in ("new", "hold", "join"):
        raise SpecError("sandbox_role", f"expected new, hold or join, got {sandbox_role!r}")
    if join_cgroup:
        limits: Limits | None = Limits(join_cgroup=join_cgroup)
    else:
        limits = _limits(memory, pids, cpus, devices, device_mode, cgroup_optional)
    return CommandSpec(
        argv=args,
        cwd=work_dir,
        env=None if env is None else _env(env),
        timeout=None if timeout is None else _duration(timeout, "timeout", allow_zero=False),
        grace=_duration(grace, "grace", allow_zero=True),
        cancel_signal=parse_signal(cancel_signal, "cancel_signal"),
        rlimits=_rlimits(rlimits or {}),
        umask=umask,
        new_session=bool(new_session),
        controlling_tty=bool(controlling_tty),
        sandbox=sandbox,
        sandbox_role=sandbox_role,
        limits=limits,
    )


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_PIDS = 4194304  # the kernel's PID_MAX_LIMIT: pids.max accepts nothing larger
MAX_MEMORY = 1 << 62


def parse_size(value: int | str, field: str) -> int:
    """64M, 1g, 1048576 -> bytes."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SpecError(field, f"expected a size such as 64M, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        text = value.strip().lower().removesuffix("b").removesuffix("i")
        number, unit = (text[:-1], text[-1]) if text[-1:].isalpha() else (text, "")
        if (unit not in _SIZE_UNITS or not number.isascii()
                or not number.replace(".", "", 1).isdigit()):
            raise SpecError(field, f"expected a size such as 64M, got {value!r}")
        size = int(float(number) * _SIZE_UNITS[unit])
    if size <= 0:
        raise SpecError(field, f"must be > 0, got {value!r}")
    if size > MAX_MEMORY:
        raise SpecError(field, f"out of range: {value!r} is more than 2**62 bytes")
    return size


def _limits(memory: int | str | None, pids: int | None, cpus: float | None,
            devices: list[str] | None = None, device_mode: str = "auto",
            optional: bool = False) -> Limits | None:
    if device_mode not in ("auto", "v1", "v2"):
        raise SpecError("device_mode", f"expected auto, v1 or v2, got {device_mode!r}")
    if memory is None and pids is None and cpus is None and devices is None and not optional:
        return None
    rules: list[str] | None = None
    if devices is not None:
        from .devices import canonical

        if isinstance(devices, str) or not isinstance(devices, list | tuple):
            raise SpecError("devices", "expected a list of rules such as ['c 1:3 rwm']")
        rules = [canonical(rule, f"devices[{i}]") for i, rule in enumerate(devices)]
    if pids is not None:
        if isinstance(pids, bool) or not isinstance(pids, int) or pids <= 0:
            raise SpecError("pids", f"expected a process count > 0, got {pids!r}")
        if pids > MAX_PIDS:
            raise SpecError("pids", f"out of range: {pids} is more than the kernel's "
                                    f"limit of {MAX_PIDS} processes")
    return Limits(memory=None if memory is None else parse_size(memory, "memory"), pids=pids,
                  cpus=None if cpus is None else _cpus(cpus),
                  devices=rules, device_mode=device_mode, optional=optional)
