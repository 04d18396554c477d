"""Process-state steps: signals, session, umask, resource limits, working directory."""

from __future__ import annotations

import errno
import importlib
import os
import resource
import signal

from ..linux.syscalls import CGROUP_SUPER_MAGIC, filesystem_type, look_up
from .context import ChildContext

look_up("fstatfs")  # (for open_join_file, in forked children)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def reset_signals(ctx: ChildContext) -> None:
    """Give the program default dispositions and an empty mask, as a fresh process has.

    Through the C module _signal: the signal module's wrappers turn every number and
    handler into an enum, which for 64 signals costs more than the rest of a fork."""
    _raw.set_wakeup_fd(-1)
    for sig in _CATCHABLE:
        try:
            if _raw.getsignal(sig) != _raw.SIG_DFL:
                _raw.signal(sig, _raw.SIG_DFL)
        except (OSError, ValueError):
            continue
    # Python ignores SIGPIPE/SIGXFSZ at start-up without always reporting it via getsignal.
    _raw.signal(signal.SIGPIPE.value, _raw.SIG_DFL)
    _raw.signal(signal.SIGXFSZ.value, _raw.SIG_DFL)
    _raw.pthread_sigmask(_raw.SIG_SETMASK, ())


try:  # CPython's C module behind signal, which takes and returns plain ints
    _raw: Any = importlib.import_module("_signal")
except ImportError:
    _raw = signal
_CATCHABLE = tuple(int(s) for s in signal.valid_signals()
                   if s not in (signal.SIGKILL, signal.SIGSTOP))


def setsid(ctx: ChildContext) -> None:
    """New session and process group: no controlling terminal, one group to signal."""
    os.setsid()


def own_process_group(ctx: ChildContext) -> None:
    """A process group of its own, for the supervisor's killpg (a session leader, after
    setsid, has one already)."""
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)


def set_umask(ctx: ChildContext, mask: int) -> None:
    os.umask(mask)


def set_rlimits(ctx: ChildContext, limits: list[list[int]], highest_fd: int = 2) -> None:
    """setrlimit for each (which, soft, hard[, the soft limit the job asked for, named if
    it fails]); a nofile limit that leaves no room for the step's own fds fails here, by
    name, rather than as a puzzling dup2 or exec error later."""
    from ..model.spec import no_room, rlimit_text

    for which, soft, hard, *asked in limits:
        problem = no_room(which, soft, highest_fd)
        if problem is not None:
            ctx.path_tried = problem
            raise OSError(errno.EINVAL, ctx.path_tried)
        try:
            resource.setrlimit(which, (soft, hard))
        except ValueError as exc:  # Python's word for the kernel's EPERM or EINVAL
            ctx.path_tried = rlimit_text(which, asked[0] if asked else soft, hard)
            raising = "raise" in str(exc)
            raise OSError(errno.EPERM if raising else errno.EINVAL, ctx.path_tried) from None


def join_cgroups(ctx: ChildContext, procs_files: list[str] | None = None) -> None:
    """Move this process into the step's cgroup(s) before anything else can fork; without
    an argument, into the cgroup the supervisor's create_cgroup step made."""
    for path in ctx.extra["cgroup_procs"] if procs_files is None else procs_files:
        ctx.path_tried = path
        fd, ctx.path_tried = open_join_file(path)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def open_join_file(procs_file: str) -> tuple[int, str]:
    """The file (an fd, and its path for a report) a forked child writes "0" to, to join
    the cgroup of procs_file. Only for a process of one thread, as a forked child is: on
    cgroup v1 it is the directory's tasks file, which moves the writing thread only. The
    kernel moves a thread group under a global lock whose first writer after a quiet spell
    waits out an RCU grace period, 8 to 15 ms on small machines; a thread moving itself
    skips that lock. cgroup2 (no tasks file: its moves of one thread are for threaded
    subtrees only) and anything that is not a cgroup get procs_file itself."""
    if procs_file.endswith("/cgroup.procs"):
        tasks = procs_file[:-len("cgroup.procs")] + "tasks"
        try:
            fd = os.open(tasks, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:  # (none: cgroup2; or a delegation that chowned only cgroup.procs,
            pass  # whose move, and failure if any, are then cgroup.procs's own)
        else:
            try:
                if filesystem_type(fd) == CGROUP_SUPER_MAGIC:
                    return fd, tasks
            except OSError:
                pass
            os.close(fd)  # (never written: a file of that name somewhere else)
    return os.open(procs_file, os.O_WRONLY | os.O_CLOEXEC), procs_file


def change_dir(ctx: ChildContext, path: str) -> None:
    ctx.path_tried = path
    os.chdir(path)

