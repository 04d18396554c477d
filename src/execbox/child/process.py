"""Process-state steps: signals, session, umask, resource limits, working directory."""

from __future__ import annotations

import errno
import os
import resource
import signal

from .context import ChildContext


def reset_signals(ctx: ChildContext) -> None:
    """Give the program default dispositions and an empty mask, as a fresh process has."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) != signal.SIG_DFL:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue
    # Python ignores SIGPIPE/SIGXFSZ at start-up without always reporting it via getsignal.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def setsid(ctx: ChildContext) -> None:
    """New session and process group: no controlling terminal, one group to signal."""
    os.setsid()


def set_umask(ctx: ChildContext, mask: int) -> None:
    os.umask(mask)


def set_rlimits(ctx: ChildContext, limits: list[list[int]], highest_fd: int = 2) -> None:
    """setrlimit for each; a nofile limit that leaves no room for the step's own fds fails
    here, by name, rather than as a puzzling dup2 or exec error later."""
    for which, soft, hard in limits:
        if which == resource.RLIMIT_NOFILE and soft <= highest_fd:
            ctx.path_tried = f"nofile {soft} leaves no room for the step's fd {highest_fd}"
            raise OSError(errno.EINVAL, ctx.path_tried)
        resource.setrlimit(which, (soft, hard))


def join_cgroups(ctx: ChildContext, procs_files: list[str] | None = None) -> None:
    """Move this process into the step's cgroup(s) before anything else can fork; without
    an argument, into the cgroup the supervisor's create_cgroup step made."""
    for path in ctx.extra["cgroup_procs"] if procs_files is None else procs_files:
        ctx.path_tried = path
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def change_dir(ctx: ChildContext, path: str) -> None:
    ctx.path_tried = path
    os.chdir(path)

