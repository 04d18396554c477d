"""The worker's build directory: one locked directory per worker process, one directory per
action inside it, removed after the action; what a crashed worker left is removed when the
next worker starts.

    BUILD_DIR/worker-<pid>/lock        flock held for the worker's whole life
    BUILD_DIR/worker-<pid>/<n>/root    the action's input root (its outputs land here)
    BUILD_DIR/worker-<pid>/<n>/stdout  the action's stdout, stderr

The build directory may be shared with other files (an operator's existing directory): only
what is provably a worker's is ever removed (a `worker-<pid>` directory holding a regular
`lock` file that no process holds, or an empty `worker-<pid>` left by a crash before its lock
was made), and only a build directory the worker creates gets its mode set.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import shutil
import stat
import threading
from pathlib import Path

from ...model.sandbox import step_host_id

_PREFIX = "worker-"
_WORKER_DIR = re.compile(r"worker-[0-9]+")


def remove_tree(path: Path) -> None:
    """rm -rf that also removes what an action made unwritable (chmod 0 on a directory)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except PermissionError:
        _make_writable(str(path))
        shutil.rmtree(path)


def _make_writable(directory: str, dir_fd: int | None = None) -> None:
    """chmod u+rwx every directory below, through fds opened without following symlinks:
    an action's leftovers may have swapped a directory for a link since it was listed."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, stat.S_IRWXU)
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
        for name in names:
            try:
                _make_writable(name, fd)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone, or no longer a directory: nothing to open up
    finally:
        os.close(fd)


def _ours(path: Path) -> bool:
    """Owned by this worker's user: what another user put in a shared build directory is
    never taken for a worker's (and never removed)."""
    try:
        return path.lstat().st_uid == os.geteuid()
    except OSError:
        return False


def _remove_if_dead(entry: Path) -> bool:
    """Remove a worker directory whose lock no process holds; True if it was removed."""
    lock = entry / "lock"
    if not _ours(entry) or (lock.exists() and not _ours(lock)):
        return False
    if lock.is_symlink() or not lock.is_file():
        try:
            entry.rmdir()  # empty: a crash between its mkdir and its lock
        except OSError:
            return False  # not provably a worker's: someone else's files
        return True
    fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False  # a live worker's
        raise
    try:
        remove_tree(entry)
    finally:
        os.close(fd)
    return True


class BuildDirInUse(Exception):
    """Another live worker holds this build directory."""


class ActionDir:
    """One action's directory: root/, stdout, stderr; removed by close()."""

    def __init__(self, path: Path, owner: int | None) -> None:
        self.path = path
        self.root = path / "root"
        self.stdout = path / "stdout"
        self.stderr = path / "stderr"
        self.owner = owner
        path.mkdir(mode=0o700)
        self.root.mkdir()
        self.own(self.root)
        for stream in (self.stdout, self.stderr):
            self._make_stream(stream)

    def _make_stream(self, path: Path) -> None:
        """The action's stdout/stderr files are its own, so that it can reopen them through
        /dev/stdout or /proc/self/fd/1 when it runs as another id (execbox opens them
        without O_EXCL and keeps their owner)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            if self.owner is not None:
                os.fchown(fd, self.owner, self.owner)
        finally:
            os.close(fd)

    def own(self, directory: Path) -> None:
        """Directories the action may write in belong to the id its sandbox maps onto
        (root worker): the cached input files stay root's, so the action cannot chmod or
        write them through their hardlinks."""
        if self.owner is not None:
            os.chown(directory, self.owner, self.owner)

    def own_directories(self) -> None:
        """After staging: every directory of the input root is the action's to write in."""
        if self.owner is None:
            return
        for directory, _, _ in os.walk(self.root):
            os.chown(directory, self.owner, self.owner)

    def close(self) -> None:
        remove_tree(self.path)


class Workspace:
    """This worker's part of the build directory."""

    def __init__(self, build_dir: Path, sandboxed: bool) -> None:
        if not build_dir.is_dir():
            build_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(build_dir, 0o711)  # ours: searchable, not listable, by the action's id
        self.build_dir = build_dir
        # One worker per build directory: two would share a bot id (HOST:BUILD_DIR) and
        # keep replacing each other's session.
        self._dir_lock = os.open(build_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600)
        found = os.fstat(self._dir_lock)
        if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
            os.close(self._dir_lock)
            raise BuildDirInUse(f"{build_dir / '.lock'} is not a file of this user's; "
                                "remove it, or use another --build-dir")
        try:
            fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._dir_lock, 32, 0).decode(errors="replace").strip()
            os.close(self._dir_lock)
            raise BuildDirInUse(f"{build_dir} is in use by another execbox worker"
                                + (f" (pid {holder})" if holder else "")) from None
        os.ftruncate(self._dir_lock, 0)
        os.pwrite(self._dir_lock, str(os.getpid()).encode(), 0)
        self.removed_stale = self._remove_stale()
        self.path = build_dir / f"{_PREFIX}{os.getpid()}"
        try:
            self.path.mkdir(mode=0o711)
        except FileExistsError:
            os.close(self._dir_lock)
            raise BuildDirInUse(f"{self.path} exists and is not an execbox worker's "
                                "directory; move it away") from None
        os.chmod(self.path, 0o711)
        self._lock = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._counter = itertools.count(1)
        self._mutex = threading.Lock()
        # A root worker's sandbox maps the action onto the unprivileged host id, which owns
        # none of the cache's files: inputs can be hardlinks. Any other action would own
        # them (an unsandboxed one, or a non-root worker's, mapped onto the worker's own
        # uid) and could chmod and rewrite a cached file in place: it gets copies.
        self.owner = step_host_id(sandboxed)
        self.copy_inputs = self.owner is None

    def _remove_stale(self) -> list[str]:
        """Directories of workers that died without cleaning up (see the module docstring);
        anything else in the build directory is left alone."""
        removed = []
        for entry in sorted(self.build_dir.iterdir()):
            if not _WORKER_DIR.fullmatch(entry.name) or entry.is_symlink() \
                    or not entry.is_dir():
                continue
            if _remove_if_dead(entry):
                removed.append(entry.name)
        return removed

    def new_action(self) -> ActionDir:
        with self._mutex:
            number = next(self._counter)
        return ActionDir(self.path / str(number), self.owner)

    def close(self) -> None:
        remove_tree(self.path)
        os.close(self._lock)
        os.close(self._dir_lock)
