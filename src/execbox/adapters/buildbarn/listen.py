"""The runner's UNIX socket file: refuse to take over a live runner's socket, replace a
stale one, and remove at exit only the file this runner created (same inode)."""

from __future__ import annotations

import errno
import os
import socket
import stat

from ...model.errors import SpecError


def claim_socket_path(path: str) -> None:
    """Make path free for bind(): a socket nobody listens on is removed; a live one, or
    anything that is not a socket, is an error naming --listen."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SpecError("--listen", f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SpecError("--listen", f"{path}: {exc.strerror or exc}") from None
        os.unlink(path)  # stale: left by a runner that was killed
        return
    finally:
        probe.close()
    raise SpecError("--listen", f"another process listens on {path}")


class SocketFile:
    """The socket file this runner bound, remembered by inode."""

    def __init__(self, path: str) -> None:
        self.path = path
        st = os.lstat(path)
        self._identity = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            os.unlink(self.path)
