"""The Python API: run (sync), run_async, and start for a handle to stream or cancel."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..model.errors import SpecError
from ..model.result import Result
from ..model.sandbox import SandboxSpec, check_workdir
from ..model.spec import DEFAULT_GRACE, CommandSpec, PathArg, make_spec
from ..report.diagnose import describe
from ..server.client import ForkServer, default_server
from ..streams.pty import (
    DEFAULT_SIZE,
    DEFAULT_TERM,
    PtySetupError,
    check_size,
    open_pty,
    parse_size,
)
from ..streams.stdio import PreparedStdio, StdioArg, prepare, prepare_pty
from .execution import Execution


def start(
    argv: Iterable[PathArg],
    *,
    cwd: PathArg | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    grace: float = DEFAULT_GRACE,
    cancel_signal: str | int = "SIGTERM",
    stdin: StdioArg = None,
    stdout: StdioArg = None,
    stderr: StdioArg = None,
    pass_fds: Iterable[int] | Mapping[int, int] = (),
    output_limit: int | None = None,
    timestamps: bool = False,
    rlimits: Mapping[str, int | tuple[int, int]] | None = None,
    umask: int | None = None,
    pty: bool | str = False,
    pty_size: tuple[int, int] | str | None = None,
    pty_term: str | None = None,
    pty_raw: bool = False,
    sandbox: SandboxSpec | None = None,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    devices: list[str] | None = None,
    device_mode: str = "auto",
    join_cgroup: list[str] | None = None,
    server: ForkServer | None = None,
    _sandbox_role: str = "new",
    _join_pidfd: int = -1,
) -> Execution:
    """Start a step through the fork server and return its handle.

    env=None inherits this process's environment as it is now; a mapping is the exact
    environment. stdout/stderr take None (inherit), an fd, a file object, a path, a
    callback(bytes), CAPTURE, PIPE (see Execution.stream) or DEVNULL.

    pty=True gives the step a new session whose controlling terminal is a fresh pty (its
    output, stdout and stderr together, goes to stdout); pty="auto" falls back to pipes if
    the terminal cannot be set up and says so in Result.pty_fallback.
    """
    mode = pty_mode(pty)
    # The supervisor runs elsewhere: pin "here" and "this environment" to the caller's now.
    work_dir = os.getcwd() if cwd is None else os.path.abspath(os.fsdecode(os.fspath(cwd)))
    if sandbox is not None and not isinstance(sandbox, SandboxSpec):
        raise SpecError("sandbox", f"expected a SandboxSpec, got {type(sandbox).__name__}")
    if sandbox is not None and sandbox.root is None:
        work_dir = check_workdir(sandbox, work_dir)
    if sandbox is not None and sandbox.root is not None:  # cwd is a path inside the root
        work_dir = "/" if cwd is None else os.path.normpath(os.fsdecode(os.fspath(cwd)))
        if not work_dir.startswith("/"):
            raise SpecError("cwd", "must be absolute (inside the sandbox root)")
    step_env = dict(os.environ) if env is None else dict(env)
    if mode:
        if pty_term is not None:
            step_env["TERM"] = pty_term
        elif env is None or "TERM" not in env:
            step_env["TERM"] = DEFAULT_TERM
    if sandbox is not None and devices is None and join_cgroup is None and os.geteuid() == 0:
        from ..cgroups.devices import DEFAULT_RULES

        devices = list(DEFAULT_RULES)  # runc's allowlist, verified before the step runs
    spec = make_spec(argv, cwd=work_dir, env=step_env, timeout=timeout, grace=grace,
                     cancel_signal=cancel_signal, rlimits=rlimits, umask=umask,
                     controlling_tty=bool(mode), memory=memory, pids=pids, cpus=cpus,
                     devices=devices, device_mode=device_mode, join_cgroup=join_cgroup,
                     cgroup_optional=sandbox is not None,
                     sandbox=None if sandbox is None else {**sandbox.to_wire(),
                                                           "role": _sandbox_role})
    server = server or default_server()

    def with_pipes() -> tuple[CommandSpec, PreparedStdio, str]:
        plain = spec.replace(controlling_tty=False)
        return plain, prepare(stdin, stdout, stderr, pass_fds, output_limit, timestamps), ""

    if not mode:
        return Execution(spec, with_pipes()[1], server, join_pidfd=_join_pidfd)
    size = DEFAULT_SIZE
    if pty_size is not None:
        size = parse_size(pty_size) if isinstance(pty_size, str) else check_size(pty_size)
    try:
        pair = open_pty(size, raw=pty_raw)
    except PtySetupError as exc:
        failure = describe(exc.step, exc.errno, exc.path)
        if mode == "auto":
            plain, stdio, _ = with_pipes()
            note = f"{failure['step']}: {failure['errno']}: {failure['hint']}"
            return Execution(plain, stdio, server, note=note, join_pidfd=_join_pidfd)
        return Execution(spec, PreparedStdio(), None, failure=failure)
    stdio = prepare_pty(pair.master, pair.slave, stdin, stdout, stderr, pass_fds,
                        output_limit, timestamps)
    return Execution(spec, stdio, server, fallback=with_pipes if mode == "auto" else None,
                     join_pidfd=_join_pidfd)


def pty_mode(value: bool | str) -> bool | str:
    """False, True or "auto"; the CLI's spellings (yes/no/on/off) are accepted too."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("auto",):
        return "auto"
    if text in ("1", "yes", "on", "true"):
        return True
    if text in ("0", "no", "off", "false"):
        return False
    raise SpecError("pty", f"expected True, False or 'auto', got {value!r}")


def run(argv: Iterable[PathArg], **options: Any) -> Result:
    """Run a step to completion (it and every process it started) and return its Result.

    Accepts the keyword arguments of start(). A KeyboardInterrupt while waiting cancels the
    step (signal, grace, SIGKILL) before it propagates.
    """
    return start(argv, **options).wait_or_cancel()


async def run_async(argv: Iterable[PathArg], **options: Any) -> Result:
    """asyncio counterpart of run(); cancelling the awaiting task cancels the step."""
    execution = start(argv, **options)
    return await execution.wait_async()
