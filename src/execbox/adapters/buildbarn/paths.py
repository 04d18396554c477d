"""Request paths -> files and directories below the build directory, never anywhere else.

Every path in a RunRequest is relative (to the build directory, or for working_directory to
the input root). An absolute path or a `..` that climbs out is refused before anything is
opened, naming the request field. Opening then walks one component at a time from an fd of
the build directory with O_NOFOLLOW, as bb_runner does: a symlink anywhere on the way (an
`evil -> /etc` planted in the build directory) is refused, not followed, so the runner, which
may be root, never creates or reads a file outside its build directory.
"""

from __future__ import annotations

import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RequestError(Exception):
    """A request field the runner cannot use; reported as INVALID_ARGUMENT naming it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def relative_parts(value: str, field: str, below: str = "the build directory") \
        -> tuple[str, ...]:
    """The components of a relative path with `.` and inner `..` resolved; refuses an
    absolute path and a `..` that leaves its base (lexically, before any lookup)."""
    if "\0" in value:
        raise RequestError(field, "must not contain a NUL byte")
    if value.startswith("/"):
        raise RequestError(field, f"must be relative to {below}, got the absolute path "
                                  f"{value!r}")
    parts: list[str] = []
    for part in value.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise RequestError(field, f"{value!r} leaves {below} ('..')")
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


def _problem(exc: OSError, shown: str) -> str:
    if exc.errno == errno.ELOOP:
        return f"{shown} is a symlink; the runner follows no symlink in the build directory"
    if exc.errno == errno.ENOTDIR:
        return f"{shown} is not a directory"
    if exc.errno == errno.ENOENT:
        return f"{shown} does not exist"
    return f"{shown}: {exc.strerror or exc}"


def _is_symlink(name: str, dir_fd: int) -> bool:
    """O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR: say what it is."""
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


class BuildDirectory:
    """An open fd of the build directory and the lookups below it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)
        self.fd = os.open(self.path, _DIR_FLAGS)

    def replaced(self) -> str | None:
        """Why the directory at our path is no longer the one we opened at start (removed,
        or removed and made again: we would look up every request path in the old one)."""
        try:
            now = os.stat(self.path)
        except OSError as exc:
            happened = "was removed" if exc.errno == errno.ENOENT else (
                f"cannot be examined ({exc.strerror})")
            return (f"the build directory {self.path} {happened} since the runner started; "
                    "restart the runner once it exists again")
        opened = os.fstat(self.fd)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            return (f"the build directory {self.path} was replaced by another directory "
                    "since the runner started; restart the runner")
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_dir(self, parts: tuple[str, ...], field: str) -> int:
        """An fd of the directory at parts, walked without following any symlink."""
        fd = os.dup(self.fd)
        for i, part in enumerate(parts):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                shown = "/".join(parts[: i + 1])
                if exc.errno == errno.ENOTDIR and _is_symlink(part, fd):
                    exc = OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                raise RequestError(field, _problem(exc, shown)) from None
            finally:
                os.close(fd)
            fd = child
        return fd

    def directory(self, parts: tuple[str, ...], field: str) -> str:
        """The real path of a directory strictly below the build directory."""
        if not parts:
            raise RequestError(field, "must name a directory below the build directory, "
                                      "not the build directory itself")
        fd = self.open_dir(parts, field)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if not real.startswith(self.path.rstrip("/") + "/"):  # moved away meanwhile
            raise RequestError(field, f"{'/'.join(parts)} is no longer below the build "
                                      "directory")
        return real

    def create_file(self, parts: tuple[str, ...], field: str, owner: int | None = None) -> int:
        """A write fd (O_APPEND) of a regular file at parts: created if missing, emptied if
        it is a regular file with no other link; a symlink or anything else is refused.
        owner: the host id the action runs as, when not ours: the file becomes its own, so
        that the action can reopen it (`> /dev/stdout`), as it can under bb_runner."""
        if not parts:
            raise RequestError(field, "must name a file below the build directory")
        parent = self.open_dir(parts[:-1], field)
        shown = "/".join(parts)
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd = os.open(parts[-1], flags | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=parent)
                created = True
            except FileExistsError:
                fd = os.open(parts[-1], flags, dir_fd=parent)  # ELOOP for a symlink
                created = False
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO nobody reads
                raise RequestError(field, f"{shown} is not a regular file") from None
            raise RequestError(field, _problem(exc, shown)) from None
        finally:
            os.close(parent)
        try:
            if not created:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise RequestError(field, f"{shown} is not a regular file")
                if st.st_nlink > 1:  # emptying it would empty its other names too
                    raise RequestError(field, f"{shown} has other hard links; refusing to "
                                              "empty it")
                os.ftruncate(fd, 0)
            if owner is not None and (created or os.fstat(fd).st_uid == os.geteuid()):
                os.fchown(fd, owner, owner)  # never another user's file: it stays theirs
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def exists(self, parts: tuple[str, ...], field: str) -> bool:
        """Whether parts names anything (lstat: a symlink at the end counts); the
        directories on the way must be real directories."""
        if not parts:
            return True
        try:
            parent = self.open_dir(parts[:-1], field)
        except RequestError:
            return False
        try:
            os.lstat(parts[-1], dir_fd=parent)
        except OSError:
            return False
        finally:
            os.close(parent)
        return True

    def write_new(self, parts: tuple[str, ...], field: str, name: str, data: bytes) -> None:
        """A new file named name in the directory at parts (the server logs directory)."""
        fd = self.open_dir(parts, field)
        try:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o644, dir_fd=fd)
        finally:
            os.close(fd)
        with os.fdopen(out, "wb") as f:
            f.write(data)
