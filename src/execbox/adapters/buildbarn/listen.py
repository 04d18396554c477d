"""Where the runner listens, checked before gRPC sees it so that a bad --listen is one line
saying why: the UNIX socket file (refuse to take over a live runner's socket, replace a
stale one, remove at exit only the file this runner created, same inode), or a TCP address
(resolvable, bindable, not taken by another runner)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from collections.abc import Callable

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


def check_socket_path(path: str) -> None:
    """A trial bind of the (free) socket path: its directory must let us create it. The
    trial file is removed only if it is still the one bound here (same inode): a runner
    started at the same moment may have replaced it with its own."""
    trial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        trial.bind(path)
        made = SocketFile(path)
    except OSError as exc:
        raise SpecError("--listen", f"cannot create the socket {path} ({exc.strerror or exc}): "
                                    f"{os.path.dirname(path)} must be a writable "
                                    "directory") from None
    finally:
        trial.close()
    made.remove()


def check_tcp_address(host: str, port: int) -> None:
    """host resolves and every address it resolves to can be bound at port now (without
    SO_REUSEPORT, so another runner's port is refused, as the server's own bind is)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SpecError("--listen", f"cannot resolve {host}: {exc.strerror}") from None
    problems = []
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                trial.bind(address)
            except OSError as exc:
                problems.append(_bind_problem(exc, host, str(address[0]), port))
    if len(problems) == len(found):  # gRPC listens if any of the addresses binds
        raise SpecError("--listen", problems[0])


def _bind_problem(exc: OSError, host: str, address: str, port: int) -> str:
    shown = host if host == address else f"{host} ({address})"
    if exc.errno == errno.EADDRINUSE:
        return f"another process listens on {shown} port {port}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{shown} is not an address of this host"
    if exc.errno == errno.EACCES:
        return f"port {port} is privileged (below 1024): not allowed for this user"
    return f"cannot bind {shown} port {port}: {exc.strerror or exc}"


def add_port(add: Callable[[str], int], address: str) -> int:
    """add(address) (gRPC's add_insecure_port) with gRPC's own log line about a failure
    kept off stderr: its reason becomes the one line of our SpecError instead. Only for
    the bind, so gRPC's later errors still reach the operator's log."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            port = add(address)
            failed = None
        except RuntimeError as exc:
            port, failed = 0, str(exc)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = captured.read().decode(errors="replace")
    if failed is None and port != 0:
        if said:
            os.write(2, said.encode())  # nothing failed: gRPC's words are the operator's
        return port
    reason = said.partition("Failed to add port to server: ")[2].strip() or failed or ""
    raise SpecError("--listen", f"cannot listen on {address}: {reason.splitlines()[0]}"
                    if reason else f"cannot listen on {address}")


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
