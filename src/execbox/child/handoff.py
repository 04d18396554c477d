"""The step a ready pid 1 (spawn/ready.py) waits in: it receives the rest of its plan, the
values those steps take from ctx.extra, and the job's fds, from its supervisor."""

from __future__ import annotations

import marshal
import os
import socket

from .context import ChildContext

_MAX_FDS = 64
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
        message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, _MAX_FDS,
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
