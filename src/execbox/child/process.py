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


def setpgid(ctx: ChildContext) -> None:
    os.setpgid(0, 0)


def set_umask(ctx: ChildContext, mask: int) -> None:
    os.umask(mask)


def set_rlimits(ctx: ChildContext, limits: list[list[int]]) -> None:
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


def join_cgroups(ctx: ChildContext, procs_files: list[str]) -> None:
    """Move this process into the step's cgroup(s) before anything else can fork."""
    for path in procs_files:
        ctx.path_tried = path
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def verify_devices(ctx: ChildContext, rules: list[str]) -> None:
    """Prove, from inside the step's cgroup, that the device policy is the one programmed."""
    from ..cgroups.devices import mismatch, parse_rule

    problem = mismatch([parse_rule(rule) for rule in rules])
    if problem is not None:
        ctx.label = "devices"
        ctx.path_tried = f"device policy not in force: {problem}"
        raise PermissionError(errno.EPERM, problem)


def change_dir(ctx: ChildContext, path: str) -> None:
    ctx.path_tried = path
    os.chdir(path)
