"""The step launcher: a small static program (linux/launcher.c) a ready sandbox process
execs into once the work made ahead is done (spawn/ready.py).

Why: the process that becomes a sandboxed step starts as a fork of its supervisor's
Python, and an execve frees every page of the address space it leaves, about 1 ms from a
forked Python on these machines, on every launch's path. Exec'd into ahead of the job, the
launcher holds a few pages when the job comes; it then runs the rest of the plan as a list
of syscalls (spawn/launcher_program.py) and execs the step from there.

It is exec'd from a sealed, read-only memfd: no file on disk, nothing another process can
change. Architectures without a build (linux/launcher_code.py), kernels before 5.12 (no
mount_setattr), hosts that refuse to exec a memfd (vm.memfd_noexec), and callers with
EXECBOX_STEP_LAUNCHER=off in their environment keep the Python steps, which do the same.
"""

from __future__ import annotations

import errno
import os

from .arch import current, kernel_before
from .forksafe import ForkLock
from .launcher_code import CODE

_F_ADD_SEALS = 1033
_SEALS = 0x1 | 0x2 | 0x4 | 0x8  # F_SEAL_SEAL, SHRINK, GROW, WRITE
_MFD_CLOEXEC, _MFD_ALLOW_SEALING, _MFD_EXEC = 0x1, 0x2, 0x10

_fd = -1
_unavailable: str | None = None
_making = ForkLock()  # threads asking at once make one memfd, not one each


def _make() -> int:
    code = CODE.get(current())
    if code is None:
        raise OSError(errno.ENOSYS, f"no step launcher for {current()}")
    if kernel_before(5, 12):
        raise OSError(errno.ENOSYS, "the step launcher needs Linux 5.12 (mount_setattr)")
    try:  # MFD_EXEC: asked for where vm.memfd_noexec would make it noexec by default
        writable = os.memfd_create("execbox-step", _MFD_CLOEXEC | _MFD_ALLOW_SEALING
                                   | _MFD_EXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a kernel before 6.3 does not know MFD_EXEC
            raise
        writable = os.memfd_create("execbox-step", _MFD_CLOEXEC | _MFD_ALLOW_SEALING)
    try:
        os.write(writable, code)
        import fcntl

        fcntl.fcntl(writable, _F_ADD_SEALS, _SEALS)
        # An execve of a file open for writing fails (ETXTBSY): keep a read-only one.
        return os.open(f"/proc/self/fd/{writable}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(writable)


def available() -> bool:
    """Whether this process can give ready sandbox processes the launcher."""
    global _fd, _unavailable
    if _fd < 0 and _unavailable is None:
        with _making:
            if _fd < 0 and _unavailable is None:
                if os.environ.get("EXECBOX_STEP_LAUNCHER") == "off":
                    _unavailable = "EXECBOX_STEP_LAUNCHER=off"
                    return False
                try:
                    _fd = _make()  # (read-only: a fork's inherited copy serves as well)
                except OSError as exc:
                    _unavailable = str(exc)
    return _fd >= 0


def program_fd() -> int:
    """The launcher's read-only memfd (close-on-exec; forks inherit it). Call available()
    first."""
    assert _fd >= 0
    return _fd


def why_unavailable() -> str | None:
    return _unavailable
