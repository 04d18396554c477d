"""The step a ready pid 1 (spawn/ready.py) waits in: it receives the rest of its plan, the
values those steps take from ctx.extra, and the job's fds, from its supervisor; or, where
the step launcher serves (linux/launcher.py), it execs into that to wait there."""

from __future__ import annotations

import fcntl
import marshal
import os
import socket

from .context import ChildContext

MAX_FDS = 64  # fds one handover carries (the supervisor sends no more)
MAX_MESSAGE = 1 << 20
READY = b"ready"  # what pid 1 says once it waits for the job


def await_job(ctx: ChildContext, sock_fd: int) -> None:
    """Block until the job comes; exit quietly if the supervisor drops this pid 1."""
    ctx.label = "wait for the job"
    sock = socket.socket(fileno=sock_fd)
    try:
        try:  # everything ahead is done: a job that came meanwhile can be handed over
            sock.send(READY, socket.MSG_NOSIGNAL)
        except OSError:
            os._exit(0)  # the supervisor has dropped us already
        message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS,
                                             socket.MSG_CMSG_CLOEXEC)
    finally:
        sock.close()
    if not message:
        os._exit(0)
    rest, extra, sources = marshal.loads(message)
    renumbered = dict(zip(sources, fds, strict=True))
    for key, value in extra.items():
        ctx.extra[key] = renumbered[value] if key.startswith("idmap ") else value
    steps = []
    for name, args in rest:
        if name == "dup2":  # the sources are the supervisor's fds: ours now have new numbers
            args = ([[renumbered[source], target] for source, target in args[0]],)
        steps.append((name, args))
    ctx.extra["then"] = steps


# Where the step launcher finds its socket, its error pipe and the step's user namespace.
LAUNCHER_FDS = (3, 4, 5)


def become_launcher(ctx: ChildContext, sock_fd: int) -> None:
    """Exec the step launcher, which says READY and waits for the job (the rest of the plan
    as a program of syscalls, spawn/launcher_program.py): the exec of this copy of the
    supervisor is paid now, before the job, and the step is exec'd from a few pages."""
    ctx.label = "start the step launcher"
    program = ctx.extra.pop("launcher_fd")
    wanted = (sock_fd, ctx.error_fd, ctx.extra.get("userns_fd", -1))
    floor = max(LAUNCHER_FDS) + 1
    program = fcntl.fcntl(program, fcntl.F_DUPFD_CLOEXEC, floor)
    staged = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) if fd >= 0 else -1
              for fd in wanted]
    ctx.error_fd = staged[1]  # (a failing exec is reported on it)
    for target, fd in zip(LAUNCHER_FDS, staged, strict=True):
        if fd >= 0:
            os.dup2(fd, target, inheritable=True)
        else:
            os.closerange(target, target + 1)
    for name in os.listdir("/proc/self/fd"):  # (the sandbox's /proc: the root is entered)
        # nothing else reaches the launcher (stdio stays, as for the Python steps)
        if int(name) > 2 and int(name) not in LAUNCHER_FDS:
            try:
                os.set_inheritable(int(name), False)
            except OSError:
                pass  # (the listing's own fd)
    os.execve(program, [b"execbox-step"], {})
