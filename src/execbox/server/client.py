"""The caller's side of the fork server: start it once, restart it if it died."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading

from ..model import wire
from ..model.errors import ForkServerError

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ForkServer:
    """Process-wide handle on the helper; safe to use from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._shared: socket.socket | None = None  # jobs a shared supervisor takes
        self.shares = False  # whether the server has shared supervisors
        self._owner = 0
        self.pid: int | None = None
        self._pidfd = -1
        self._identity: Helpers = ()
        self.starts = 0

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        shared, shared_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = (f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
                f"from execbox.server.forkserver import launch; "
                f"launch({theirs.fileno()}, {shared_theirs.fileno()})")
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-S", "-c", code],
                pass_fds=[theirs.fileno(), shared_theirs.fileno()],
                stdin=subprocess.DEVNULL, capture_output=True, start_new_session=True,
                timeout=60, check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            ours.close()
            shared.close()
            raise ForkServerError(f"cannot start the fork server: {exc}") from exc
        finally:
            theirs.close()
            shared_theirs.close()
        if proc.returncode != 0:
            ours.close()
            shared.close()
            detail = proc.stderr.decode(errors="replace").strip().splitlines()
            raise ForkServerError("the fork server failed to start: "
                                  + (detail[-1] if detail else f"exit {proc.returncode}"))
        pid, shares = proc.stdout.split()
        self._sock, self._shared, self._owner = ours, shared, os.getpid()
        self.pid, self.shares = int(pid), shares == b"1"
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:  # already gone: the first submit will notice
            self._pidfd = -1
        anchor = _parent_with_start(self.pid)
        from ..cgroups.stale import start_time

        self._identity = (("fork server", (self.pid, start_time(self.pid))),
                          *((("anchor", anchor),) if anchor is not None else ()))
        self.starts += 1

    def _alive(self) -> bool:
        """False once the server process has exited (its pidfd turns readable)."""
        if self._pidfd < 0:
            return False
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)

    def _discard(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._shared is not None:
            self._shared.close()
        self._shared = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
        self._sock = None
        self._pidfd = -1
        self.pid = None

    def submit(self, fds: list[int], shared: bool = False) -> Helpers:
        """Hand a job socket and the step's fds to a supervisor, restarting the server once
        if it is gone. shared: a root caller's sandboxed step with no terminal, which a
        shared supervisor takes where the server has them (server/shared.py). Returns the
        processes that kill what a dead supervisor of this server leaves: the server, then
        its parent (the anchor), each as (name, (pid, start time)); the job keeps them, as
        the server may be restarted before it is asked."""
        with self._lock:
            for _ in range(3):
                # After fork the inherited socket is the parent's server; a dead server may
                # still have a supervisor finishing a job, which would swallow this message.
                if self._sock is None or self._owner != os.getpid() or not self._alive():
                    self._discard()
                    self._start()
                assert self._sock is not None and self._shared is not None
                try:
                    wire.send_fds(self._shared if shared and self.shares else self._sock,
                                  fds)
                    return self._identity
                except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError):
                    self._discard()
            raise ForkServerError("the fork server keeps dying on start")

    def close(self) -> None:
        with self._lock:
            self._discard()


Helpers = tuple[tuple[str, tuple[int, "int | None"]], ...]


def cleaner_alive(helpers: Helpers, settle: float = 0.2) -> str | None:
    """The first of helpers still alive, or None when all are gone. A supervisor killed
    with them (a kill of their whole group, the OOM killer's) is often seen dead before
    they are: each gets settle seconds to be seen gone first."""
    import time

    from ..cgroups.stale import gone

    for name, (pid, started) in helpers:
        deadline = time.monotonic() + settle
        while not gone(pid, started):
            if time.monotonic() >= deadline:
                return name
            time.sleep(0.01)
    return None


def _parent_with_start(pid: int) -> tuple[int, int | None] | None:
    """(parent pid, its start time) of pid, to tell later whether it still lives."""
    from ..cgroups.stale import start_time
    from ..supervise.proctree import parent_of

    parent = parent_of(pid)
    if parent is None or parent <= 1:
        return None
    return parent, start_time(parent)


_SERVER: ForkServer | None = None
_SERVER_LOCK = threading.Lock()


def default_server() -> ForkServer:
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None:
            _SERVER = ForkServer()
        return _SERVER
