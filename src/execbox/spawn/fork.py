"""fork + ordered steps + exec, reporting a failing step as (name, errno) on a CLOEXEC pipe.

Only call this from a single-threaded process (the fork server's supervisor or the CLI):
Python code runs in the child between fork and exec.
"""

from __future__ import annotations

import errno
import os

from .. import child as step_registry
from ..child import exec_hint
from ..child.context import ChildContext
from ..linux.syscalls import block_all_signals, restore_signal_mask
from .failure import failure_from

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from ..plan.build import Step

_CHILD_FAILED = 127
def _run_in_child(plan: Sequence[Step], error_fd: int, extra: dict[str, Any]) -> None:
    ctx = ChildContext(error_fd=error_fd, extra=extra)
    name = "?"
    steps = list(plan)
    try:
        index = 0
        while index < len(steps):
            name, args = steps[index]
            index += 1
            ctx.label = ctx.path_tried = ""  # a failure never names an earlier step's path
            step_registry.lookup(name)(ctx, *args)
            if "then" in ctx.extra:  # the steps that follow, handed over (child/handoff.py)
                steps[index:] = ctx.extra.pop("then")
        raise OSError(errno.EINVAL, "plan ended without execve")
    except OSError as exc:
        code = exc.errno or errno.EIO
        step = ctx.label or name
        report = f"{step}\0{code}\0{ctx.path_tried}".encode(errors="surrogateescape")
        if step == "execve" and code != errno.ETXTBSY:  # explained here, where the step
            # stands and with its ids (ETXTBSY: the supervisor may name the writer); sent
            # after the failure itself, which must arrive even if this child dies meanwhile
            try:
                os.write(ctx.error_fd, report)
                hint = exec_hint.explain(code, ctx.path_tried)
                report = b"\0" + hint.encode(errors="surrogateescape")
            except BaseException:
                os._exit(_CHILD_FAILED)
    except BaseException as exc:
        step = ctx.label or name
        report = f"{step}\0{errno.EIO}\0{type(exc).__name__}: {exc}".encode(errors="replace")
    try:
        os.write(ctx.error_fd, report)
    finally:
        os._exit(_CHILD_FAILED)


def start_fork(plan: Sequence[Step], extra: dict[str, Any] | None = None) -> tuple[int, int]:
    """fork and run the plan in the child; returns (pid, read end of the error pipe).

    The pipe reaches EOF at a successful execve (it is close-on-exec) and carries
    "step\0errno\0path" if a step failed. The caller waits for it, so a setup step that
    hangs can still be timed out or cancelled.
    """
    for name, _ in plan:  # imported here: the child must not import (after pivot_root it
        step_registry.lookup(name)  # cannot), and importing there would cost every launch
    read_end, write_end = os.pipe()
    # Signals stay blocked from before fork until the child's reset_signals step: until
    # then the child has the parent's handlers and wakeup fd, which must not run in it.
    previous = block_all_signals()
    try:
        pid = os.fork()
    except BaseException as exc:
        restore_signal_mask(previous)
        os.close(read_end)
        os.close(write_end)
        if isinstance(exc, OSError):  # (EAGAIN: a limit on processes; ENOMEM)
            from .failure import StepFailure

            raise StepFailure("fork", exc.errno or errno.EIO, "") from None
        raise
    if pid == 0:  # child
        try:
            os.close(read_end)
            _run_in_child(plan, write_end, extra or {})
        finally:
            os._exit(_CHILD_FAILED)
    restore_signal_mask(previous)
    os.close(write_end)
    return pid, read_end


def fork_spawn(plan: Sequence[Step]) -> int:
    """start_fork and wait (blocking) for exec; for callers without an event loop."""
    pid, read_end = start_fork(plan)
    chunks = []
    try:
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
    if not chunks:
        return pid
    os.waitpid(pid, 0)
    raise failure_from(b"".join(chunks))
