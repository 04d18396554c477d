"""File-descriptor steps: place stdio and passed fds, then close everything else."""

from __future__ import annotations

import fcntl
import os

from .context import ChildContext


def dup2_all(ctx: ChildContext, mapping: list[list[int]]) -> None:
    """Install each (source, target) pair, safe even when sources and targets overlap."""
    if not mapping:
        return
    floor = max(target for _, target in mapping) + 1
    if ctx.error_fd < floor:
        ctx.error_fd = fcntl.fcntl(ctx.error_fd, fcntl.F_DUPFD_CLOEXEC, floor)
    moved: dict[int, int] = {}
    for key, fd in carried_fds(ctx).items():  # out of the targets' way
        if fd < floor:
            if fd not in moved:
                moved[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
            ctx.extra[key] = moved[fd]
    staged = [(fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, floor), target) for src, target in mapping]
    for temp, target in staged:
        os.dup2(temp, target, inheritable=True)
        ctx.keep_fds.add(target)
    for temp, _ in staged:
        os.close(temp)


def close_other_fds(ctx: ChildContext, keep: list[int]) -> None:
    """Close every fd but stdio, the passed fds and the error pipe (which is CLOEXEC)."""
    wanted = sorted({0, 1, 2, ctx.error_fd, *keep, *ctx.keep_fds,
                     *carried_fds(ctx).values()})
    low = 0
    for fd in wanted:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 2**31 - 1)


def carried_fds(ctx: ChildContext) -> dict[str, int]:
    """Descriptors the supervisor hands to later steps through ctx.extra (namespaces made
    ahead, pid 1's status pipe): keys ending in "_fd", and "idmap UID:GID"."""
    return {key: value for key, value in ctx.extra.items()
            if (key.endswith("_fd") or key.startswith("idmap ")) and isinstance(value, int)
            and value >= 0}
