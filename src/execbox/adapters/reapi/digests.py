"""SHA-256 digests as REAPI uses them, the "hash/size" key the worker indexes by, and the
check every Digest that arrives from the wire goes through before it names a file."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .protos import re_pb2

Digest = re_pb2.Digest

#: read size for hashing files: large enough that the syscall cost vanishes, small enough to
#: keep the worker's memory flat however large the file is
CHUNK = 1 << 20

EMPTY_HASH = hashlib.sha256(b"").hexdigest()

_HASH = re.compile(r"[0-9a-f]{64}")


class InputError(ValueError):
    """The request itself is wrong (a bad digest, name or path): retrying cannot help, so the
    worker answers INVALID_ARGUMENT. `field` says which part of the request is at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def digest_of_bytes(data: bytes) -> Digest:
    return Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def digest_of_fd(fd: int) -> Digest:
    """Digest of an open file from its current offset, read in chunks (never whole in memory)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        h.update(view[:n])
        size += n
    return Digest(hash=h.hexdigest(), size_bytes=size)


def digest_of_file(path: str | Path, *, follow_symlinks: bool = True) -> Digest:
    """Digest of a file's contents, streamed."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        return digest_of_fd(fd)
    finally:
        os.close(fd)


def digest_key(digest: Digest) -> str:
    """"hash/size": hashable, readable in messages, and the tail of a ByteStream resource name."""
    return f"{digest.hash}/{digest.size_bytes}"


def digest_from_key(text: str) -> Digest:
    hash_, sep, size = text.partition("/")
    if not sep or not size.isdigit():
        raise InputError("digest", f"{text!r} is not of the form hash/size")
    return validate_digest(Digest(hash=hash_, size_bytes=int(size)), "digest")


def validate_digest(digest: Digest, field: str) -> Digest:
    """The digest itself, if its hash can safely name a file (64 lowercase hex digits), its
    size is not negative and a size of 0 comes with the empty blob's hash; else InputError
    naming `field`."""
    if not _HASH.fullmatch(digest.hash):
        raise InputError(f"{field}.hash",
                         f"{digest.hash[:80]!r} is not a SHA-256 hash (64 lowercase hex digits)")
    if digest.size_bytes < 0:
        raise InputError(f"{field}.size_bytes", f"{digest.size_bytes} is negative")
    if digest.size_bytes == 0 and digest.hash != EMPTY_HASH:
        # an empty file under another hash would poison the local cache for that hash
        raise InputError(f"{field}.hash", f"size 0 but {digest.hash} is not the empty blob's hash")
    return digest


def is_empty(digest: Digest) -> bool:
    """The empty blob is never fetched nor uploaded: REAPI lets servers omit it."""
    return digest.size_bytes == 0
