"""The Python API: run (sync), run_async, and start for a handle to stream or cancel."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..model.options import build_spec
from ..model.result import Result
from ..model.spec import CommandSpec, PathArg
from ..server.client import ForkServer, default_server
from ..streams.pty import DEFAULT_SIZE, PtySetupError, check_size, open_pty, parse_size
from ..streams.stdio import PreparedStdio, StdioArg, prepare, prepare_pty
from .execution import Execution

if TYPE_CHECKING:
    from typing import Unpack

    from ..model.options import StepOptions


def start(
    argv: Iterable[PathArg],
    *,
    stdin: StdioArg = None,
    stdout: StdioArg = None,
    stderr: StdioArg = None,
    pass_fds: Iterable[int] | Mapping[int, int] = (),
    output_limit: int | None = None,
    timestamps: bool = False,
    pty_size: tuple[int, int] | str | None = None,
    pty_raw: bool = False,
    server: ForkServer | None = None,
    _sandbox_role: str = "new",
    _join_pidfd: int = -1,
    **options: Unpack[StepOptions],
) -> Execution:
    """Start a step through the fork server and return its handle.

    The step's own options (cwd, env, timeout, grace, cancel_signal, rlimits, umask, pty,
    pty_term, sandbox, memory, pids, cpus, devices, device_mode) are those of
    execbox.make_spec, with the defaults every front end shares (model.options).

    env=None inherits this process's environment as it is now; a mapping is the exact
    environment. stdout/stderr take None (inherit), an fd, a file object, a path, a
    callback(bytes), CAPTURE, PIPE (see Execution.stream) or DEVNULL.

    pty=True gives the step a new session whose controlling terminal is a fresh pty (its
    output, stdout and stderr together, goes to stdout); pty="auto" falls back to pipes if
    the terminal cannot be set up and says so in Result.pty_fallback.
    """
    pty = options.get("pty", False)
    spec = build_spec(argv, sandbox_role=_sandbox_role, **options)
    size = DEFAULT_SIZE
    if spec.controlling_tty and pty_size is not None:
        size = parse_size(pty_size) if isinstance(pty_size, str) else check_size(pty_size)
    server = server or default_server()

    def with_pipes() -> tuple[CommandSpec, PreparedStdio, str]:
        plain = spec.replace(controlling_tty=False)
        return plain, prepare(stdin, stdout, stderr, pass_fds, output_limit, timestamps), ""

    if not spec.controlling_tty:
        return Execution(spec, with_pipes()[1], server, join_pidfd=_join_pidfd)
    auto = pty == "auto" or (isinstance(pty, str) and pty.lower() == "auto")
    try:
        pair = open_pty(size, raw=pty_raw)
    except PtySetupError as exc:
        from ..report.diagnose import describe

        failure = describe(exc.step, exc.errno, exc.path)
        if auto:
            plain, stdio, _ = with_pipes()
            note = f"{failure.step}: {failure.errno}: {failure.hint}"
            return Execution(plain, stdio, server, note=note, join_pidfd=_join_pidfd)
        return Execution(spec, PreparedStdio(), None, failure=failure)
    stdio = prepare_pty(pair.master, pair.slave, stdin, stdout, stderr, pass_fds,
                        output_limit, timestamps)
    return Execution(spec, stdio, server, fallback=with_pipes if auto else None,
                     join_pidfd=_join_pidfd)


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
