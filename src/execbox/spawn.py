"""fork + ordered steps + exec, reporting a failing step as (name, errno) on a CLOEXEC pipe.

Only call this from a single-threaded process (the fork server's supervisor or the CLI):
Python code runs in the child between fork and exec.
"""

from __future__ import annotations

import errno
import os
import time

from . import steps as step_registry
from .steps.context import ChildContext

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .plan import Step

_CHILD_FAILED = 127
ETXTBSY_ATTEMPTS = 12  # about 2 s of backoff in all


class StepFailure(Exception):
    """The child could not get past step; errno is the number the syscall returned."""

    def __init__(self, step: str, errno: int, path: str) -> None:
        super().__init__(step, errno, path)
        self.step = step
        self.errno = errno
        self.path = path

    def __str__(self) -> str:
        return f"step {self.step} failed: {os.strerror(self.errno)} ({self.path})"


def _run_in_child(plan: Sequence[Step], error_fd: int) -> None:
    ctx = ChildContext(error_fd=error_fd)
    name = "?"
    try:
        for name, args in plan:
            ctx.label = ""
            step_registry.lookup(name)(ctx, *args)
        raise OSError(errno.EINVAL, "plan ended without execve")
    except OSError as exc:
        code = exc.errno or errno.EIO
        step = ctx.label or name
        report = f"{step}\0{code}\0{ctx.path_tried}".encode(errors="surrogateescape")
    except BaseException as exc:
        step = ctx.label or name
        report = f"{step}\0{errno.EIO}\0{type(exc).__name__}: {exc}".encode(errors="replace")
    try:
        os.write(ctx.error_fd, report)
    finally:
        os._exit(_CHILD_FAILED)


def spawn_once(plan: Sequence[Step]) -> int:
    """Start the child; return its pid once execve succeeded, or raise StepFailure."""
    from .fastspawn import NotExpressible, posix_spawn_plan

    try:
        return posix_spawn_plan(list(plan))
    except NotExpressible:
        return fork_spawn(plan)


def fork_spawn(plan: Sequence[Step]) -> int:
    """fork, run each step in Python in the child, exec; the general path."""
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # child
        try:
            os.close(read_end)
            _run_in_child(plan, write_end)
        finally:
            os._exit(_CHILD_FAILED)
    os.close(write_end)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except InterruptedError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    if not chunks:
        return pid
    os.waitpid(pid, 0)
    name, code, path = b"".join(chunks).decode(errors="surrogateescape").split("\0", 2)
    raise StepFailure(name, int(code), path)


def spawn(plan: Sequence[Step], attempts: int = ETXTBSY_ATTEMPTS) -> int:
    """spawn_once with a bounded, backed-off retry on ETXTBSY (a writer fd leaked elsewhere)."""
    delay = 0.001
    for attempt in range(attempts):
        try:
            return spawn_once(plan)
        except StepFailure as failure:
            if failure.errno != errno.ETXTBSY or attempt == attempts - 1:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    raise AssertionError("unreachable")
