"""Parent-side PTY setup, one named step per operation.

The slave is obtained from the master itself (TIOCGPTPEER), never by path, and every open
uses O_NOCTTY, so no process of ours can acquire or lose a terminal by accident (the
Buildkite agent's PTY start failed with TIOCSCTTY EPERM).
The child then does setsid and TIOCSCTTY with argument 0, which fails rather than steals.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios

from ..linux.arch import ioctl_number
from ..linux.terminal import make_raw, set_window_size

DEFAULT_SIZE = (24, 80)
_CHILD_STEPS = ("setsid", "tiocsctty")


def terminal_setup_failed(step: str) -> bool:
    """True when step is one of the terminal's own (parent-side pty_* or the child's setsid
    and tiocsctty): the step never ran, so pty="auto" may run it again with pipes."""
    return step.startswith("pty_") or step in _CHILD_STEPS


class PtySetupError(Exception):
    """A parent-side PTY step failed."""

    def __init__(self, step: str, errno: int, path: str = "/dev/ptmx") -> None:
        super().__init__(step, errno, path)
        self.step = step
        self.errno = errno
        self.path = path


class PtyPair:
    """master stays with the pump; slave becomes the step's stdin, stdout and stderr."""

    __slots__ = ("master", "path", "slave")

    def __init__(self, master: int, slave: int, path: str) -> None:
        self.master = master
        self.slave = slave
        self.path = path

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


def parse_size(text: str, field: str = "pty_size") -> tuple[int, int]:
    """'40x120' -> (40, 120)."""
    from ..model.errors import SpecError

    rows, sep, cols = text.lower().partition("x")
    if not sep or not all(n.isascii() and n.isdigit() and len(n) < 7 for n in (rows, cols)):
        raise SpecError(field, f"expected ROWSxCOLS such as 24x80, got {text!r}")
    return check_size((int(rows), int(cols)), field)


def check_size(size: tuple[int, int], field: str = "pty_size") -> tuple[int, int]:
    from ..model.errors import SpecError

    if (not isinstance(size, tuple | list) or len(size) != 2
            or not all(type(n) is int for n in size)):
        raise SpecError(field, f"expected (rows, columns) as two ints, got {size!r}")
    rows, cols = size
    if not (0 < rows < 65536 and 0 < cols < 65536):
        raise SpecError(field, f"rows and columns must be 1..65535, got {rows}x{cols}")
    return rows, cols


def open_pty(size: tuple[int, int], raw: bool = False) -> PtyPair:
    """Open a pty pair for one step; raises PtySetupError naming the failed step."""
    step = "pty_open_master"
    master = slave = -1
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        step = "pty_unlockpt"
        fcntl.ioctl(master, ioctl_number("TIOCSPTLCK"), struct.pack("i", 0))
        step = "pty_get_slave"
        slave = fcntl.ioctl(master, ioctl_number("TIOCGPTPEER"),
                            os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        path = os.ttyname(slave)
        step = "pty_window_size"
        set_window_size(master, size)
        if raw:
            step = "pty_raw_mode"
            make_raw(slave)
    except OSError as exc:
        for fd in (slave, master):
            if fd >= 0:
                os.close(fd)
        raise PtySetupError(step, exc.errno or errno.EIO) from None
    except termios.error as exc:
        for fd in (slave, master):
            if fd >= 0:
                os.close(fd)
        raise PtySetupError(step, int(exc.args[0]) if exc.args else errno.EIO) from None
    return PtyPair(master, slave, path)
