"""The one front-end policy: user options -> CommandSpec.

The API's start(), `execbox run` and Sandbox all call build_spec, so defaults (the working
directory, TERM on a terminal, runc's device allowlist for a root caller's sandbox) are the
same whichever front end a step comes through.
"""

from __future__ import annotations

import os

from .errors import SpecError
from .exits import DEFAULT_TERM
from .spec import CommandSpec, make_spec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any, TypedDict, Unpack

    from .sandbox import SandboxSpec
    from .spec import PathArg

    class StepOptions(TypedDict, total=False):
        """What a step may be given, in every front end (see make_spec for each)."""

        cwd: PathArg | None
        env: Mapping[str, str] | None
        timeout: float | None
        grace: float
        cancel_signal: str | int
        rlimits: Mapping[str, int | tuple[int, int]] | None
        umask: int | None
        pty: bool | str
        pty_term: str | None
        sandbox: SandboxSpec | None
        memory: int | str | None
        pids: int | None
        cpus: float | None
        devices: list[str] | None
        device_mode: str
        join_cgroup: list[str] | None

_TRUE = ("1", "yes", "on", "true")
_FALSE = ("0", "no", "off", "false")


def pty_mode(value: object, field: str = "pty") -> bool | str:
    """False, True or "auto"; the CLI's spellings (yes/no/on/off) are accepted too."""
    if isinstance(value, bool):
        return value
    text = str(value).lower() if isinstance(value, str) else None
    if text == "auto":
        return "auto"
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SpecError(field, f"expected True, False or 'auto', got {value!r}")


def _working_directory(cwd: PathArg | None, sandbox: SandboxSpec | None) -> str:
    """The supervisor runs elsewhere: "here" is pinned to the caller's now."""
    if cwd is not None and not isinstance(cwd, str | bytes | os.PathLike):
        raise SpecError("cwd", f"expected a path, got {type(cwd).__name__}")
    text = None if cwd is None else os.fsdecode(os.fspath(cwd))
    if text is not None and "\0" in text:
        raise SpecError("cwd", "must not contain a NUL byte")
    if text == "":
        raise SpecError("cwd", "must not be empty (leave it out for the current directory)")
    if sandbox is not None and sandbox.cwd_inside:  # a path inside the sandbox
        work_dir = "/" if text is None else os.path.normpath(text)
        if not work_dir.startswith("/"):
            raise SpecError("cwd", "must be absolute (inside the sandbox root)")
        return work_dir
    work_dir = os.getcwd() if text is None else os.path.abspath(text)
    if sandbox is not None:
        from .sandbox import check_workdir

        work_dir = check_workdir(sandbox, work_dir)
    return work_dir


def _environment(env: Mapping[str, str] | None, pty: bool | str, pty_term: str | None,
                 term_given: bool | None) -> Mapping[str, str]:
    """The caller's environment now (env=None) or exactly env; on a terminal, TERM is
    pty_term, else the TERM the caller set explicitly, else xterm-256color."""
    if env is not None and not hasattr(env, "items"):
        raise SpecError("env", f"expected a mapping of names to values, got "
                               f"{type(env).__name__}")
    step_env = _callers_environment() if env is None else dict(env)
    if pty:
        if term_given is None:
            term_given = env is not None and "TERM" in env
        if pty_term is not None:
            if not isinstance(pty_term, str) or not pty_term or "\0" in pty_term:
                raise SpecError("pty_term", f"expected a terminal type, got {pty_term!r}")
            step_env["TERM"] = pty_term
        elif not term_given:
            step_env["TERM"] = DEFAULT_TERM
    return step_env


def _callers_environment() -> dict[str, str]:
    """A copy of os.environ. Decoding each name and value is most of a launch's work in
    the caller when the step inherits the environment, which mostly has not changed since
    the last launch: the copy is made again only when os.environ's bytes (kept by the os
    module, as the process has them) differ from those the last copy was made from."""
    raw = getattr(os.environ, "_data", None)
    if not isinstance(raw, dict):
        return dict(os.environ)
    last_raw, last = _last_environment
    if last_raw != raw:  # (a comparison of bytes, in C)
        last_raw = dict(raw)  # decoded from this one copy: os.environ may change meanwhile
        last = {os.fsdecode(k): os.fsdecode(v) for k, v in last_raw.items()}
        _last_environment[:] = [last_raw, last]
    return dict(last)  # (the caller's to change: the pty's TERM)


_last_environment: list[Any] = [None, {}]


def default_devices(devices: list[str] | None, extra: list[str], sandbox: bool,
                    joining: bool) -> list[str] | None:
    """runc's allowlist for a root caller's sandbox (and under any extra rule); an explicit
    list is taken as it is."""
    if devices is not None:
        if isinstance(devices, str) or not isinstance(devices, list | tuple):
            raise SpecError("devices", "expected a list of rules such as ['c 1:3 rwm']")
        return [*devices, *extra]
    if extra or (sandbox and not joining and os.geteuid() == 0):
        from .devices import DEFAULT_RULES

        return [*DEFAULT_RULES, *extra]
    return None


def _is_sandbox_spec(value: object) -> bool:
    from .sandbox import SandboxSpec

    return isinstance(value, SandboxSpec)


_DECIDED_HERE = ("sandbox", "cwd", "env", "pty", "pty_term", "devices", "join_cgroup")
STEP_OPTIONS = ("cwd", "env", "timeout", "grace", "cancel_signal", "rlimits", "umask", "pty",
                "pty_term", "sandbox", "memory", "pids", "cpus", "devices", "device_mode",
                "join_cgroup")  # StepOptions' keys, for the error an unknown one gets


def build_spec(argv: Iterable[PathArg], *, term_given: bool | None = None,
               sandbox_role: str = "new", extra_devices: list[str] | None = None,
               **options: Unpack[StepOptions]) -> CommandSpec:
    """Every front end's options -> a validated CommandSpec (errors name the field)."""

    unknown = sorted(set(options) - set(STEP_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}; a step takes "
                        f"{', '.join(STEP_OPTIONS)}, and start()/run() also stdin, stdout, "
                        "stderr, pass_fds, output_limit, timestamps, pty_size, pty_raw")
    sandbox = options.get("sandbox")
    cwd = options.get("cwd")
    env = options.get("env")
    pty = options.get("pty", False)
    pty_term = options.get("pty_term")
    devices = options.get("devices")
    join_cgroup = options.get("join_cgroup")
    passed: dict[str, Any] = {k: v for k, v in options.items() if k not in _DECIDED_HERE}
    if sandbox is not None and not _is_sandbox_spec(sandbox):
        raise SpecError("sandbox", f"expected a SandboxSpec, got {type(sandbox).__name__}")
    mode = pty_mode(pty)
    rules = default_devices(devices, list(extra_devices or ()), sandbox is not None,
                            join_cgroup is not None)
    if sandbox is not None:
        from .sandbox import check_device_binds

        check_device_binds(sandbox, rules)
    return make_spec(
        argv, cwd=_working_directory(cwd, sandbox),
        env=_environment(env, mode, pty_term, term_given), controlling_tty=bool(mode),
        sandbox=sandbox, sandbox_role=sandbox_role, devices=rules, join_cgroup=join_cgroup,
        cgroup_optional=sandbox is not None and _asks_no_limits(options, extra_devices),
        **passed)


def _asks_no_limits(options: Mapping[str, Any], extra_devices: list[str] | None) -> bool:
    """Whether the job leaves its cgroup to execbox: no limit and no device rule of its
    own. A sandbox's cgroup is then optional (an extra kill guarantee, skipped where
    cgroups are not writable); limits a job asked for are never dropped that way."""
    return (not extra_devices and options.get("devices") is None
            and all(options.get(name) is None for name in ("memory", "pids", "cpus")))
