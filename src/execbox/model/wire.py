"""Framing between a caller and its supervisor: 4-byte length + marshal, over a stream socket.

Both ends are the same interpreter (the fork server is started from sys.executable), so
marshal is safe and the fastest stdlib serializer for plain data.
"""

from __future__ import annotations

import array
import marshal
import socket
import struct

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from typing import Any

_HEADER = struct.Struct("<I")
MAX_FDS = 253  # SCM_MAX_FD


def encode(obj: Any) -> bytes:
    payload = marshal.dumps(obj)
    return _HEADER.pack(len(payload)) + payload


def send(sock: socket.socket, obj: Any) -> None:
    sock.sendall(encode(obj))


class FrameReader:
    """Accumulates bytes and yields complete messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            messages.append(marshal.loads(bytes(self._buffer[_HEADER.size:end])))
            del self._buffer[:end]
        return messages


def receive_one(sock: socket.socket) -> Any:
    """Blocking read of exactly one message."""
    return marshal.loads(receive_frame(sock))


def receive_frame(sock: socket.socket) -> bytes:
    """Blocking read of exactly one message, undecoded (used once per job, for the
    request: a supervisor keeps plans by its bytes)."""
    header = _recv_exact(sock, _HEADER.size)
    (length,) = _HEADER.unpack(header)
    return _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    sock.sendmsg([b"J"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def receive_fds(sock: socket.socket, block: bool = True) -> tuple[bytes, list[int]]:
    """One control message and the fds it carries (received close-on-exec)."""
    flags = socket.MSG_CMSG_CLOEXEC | (0 if block else socket.MSG_DONTWAIT)
    data, ancillary, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(MAX_FDS * 4), flags)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)
