"""Reading and writing cgroup files, with errors that say what went wrong.

A write to a cgroup file fails for two very different reasons: the value is wrong
(EINVAL, ERANGE: "pids.max 2**63") or execbox may not write there (EACCES, EPERM, EROFS:
the cgroup was not delegated to it). The messages keep them apart, because the fixes are
different.
"""

from __future__ import annotations

import errno
import os

ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
VALUE_ERRNOS = frozenset({errno.EINVAL, errno.ERANGE})
DELEGATE_ADVICE = ("run it in a unit with Delegate=yes "
                   "(e.g. systemd-run -p Delegate=yes --scope execbox ...)")


class CgroupError(OSError):
    """A cgroup could not be created or configured; the message names the file."""


def errno_name(code: int | None) -> str:
    return errno.errorcode.get(code or 0, str(code))


def read(path: str) -> str:
    """The whole file (a kernel file may come in several reads). Without the io module's
    layers: a launch reads several of these on its path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="surrogateescape")


def not_delegated(directory: str, why: str) -> str:
    """The message for "execbox may not manage cgroups below directory"."""
    if is_v2(directory):
        return (f"cgroup v2: {directory} is not delegated to execbox ({why}) — "
                f"{DELEGATE_ADVICE}")
    return (f"cgroup v1: {directory} is not writable by execbox ({why}) — give execbox "
            "a cgroup of its own it may write")


def is_v2(directory: str) -> bool:
    return os.path.exists(f"{directory}/cgroup.controllers")


def write_error(path: str, value: str, exc: OSError, owner: str) -> CgroupError:
    """CgroupError for a failed write of value to path; owner is the cgroup that would
    have to be delegated to us for the write to be allowed."""
    code = exc.errno or errno.EIO
    name = errno_name(code)
    if code in VALUE_ERRNOS:
        message = f"{path}: value {value.strip()!r} is out of range or invalid here ({name})"
    elif code in ACCESS_ERRNOS:
        message = not_delegated(owner, f"cannot write {os.path.basename(path)}: {name}")
    else:
        message = f"{path}: {exc.strerror or name} ({name})"
    return CgroupError(code, message)


def write(path: str, value: str, owner: str | None = None) -> None:
    """Write value to a cgroup file. owner defaults to the grandparent directory, i.e. the
    delegated cgroup that holds the step cgroup path is in."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        where = owner or os.path.dirname(os.path.dirname(path))
        raise write_error(path, value, exc, where) from None
