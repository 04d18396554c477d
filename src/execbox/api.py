"""The Python API: run (sync), run_async, and start for a handle to stream or cancel."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from .execution import Execution
from .forkserver_client import ForkServer, default_server
from .result import Result
from .spec import DEFAULT_GRACE, PathArg, make_spec
from .stdio import StdioArg, prepare


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
    server: ForkServer | None = None,
) -> Execution:
    """Start a step through the fork server and return its handle.

    env=None inherits this process's environment as it is now; a mapping is the exact
    environment. stdout/stderr take None (inherit), an fd, a file object, a path, a
    callback(bytes), CAPTURE, PIPE (see Execution.stream) or DEVNULL.
    """
    # The supervisor runs elsewhere: pin "here" and "this environment" to the caller's now.
    work_dir = os.getcwd() if cwd is None else os.path.abspath(os.fsdecode(os.fspath(cwd)))
    spec = make_spec(argv, cwd=work_dir, env=dict(os.environ) if env is None else env,
                     timeout=timeout, grace=grace, cancel_signal=cancel_signal,
                     rlimits=rlimits, umask=umask)
    stdio = prepare(stdin, stdout, stderr, pass_fds, output_limit, timestamps)
    return Execution(spec, stdio, server or default_server())


def run(argv: Iterable[PathArg], **options: Any) -> Result:
    """Run a step to completion (it and every process it started) and return its Result.

    Accepts the keyword arguments of start(). A KeyboardInterrupt while waiting cancels the
    step (signal, grace, SIGKILL) before it propagates.
    """
    execution = start(argv, **options)
    try:
        return execution.wait()
    except BaseException:
        execution.cancel(hard=True)
        execution.wait()
        raise


async def run_async(argv: Iterable[PathArg], **options: Any) -> Result:
    """asyncio counterpart of run(); cancelling the awaiting task cancels the step."""
    execution = start(argv, **options)
    return await execution.wait_async()
