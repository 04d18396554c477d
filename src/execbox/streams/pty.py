"""Parent-side PTY setup, one named step per operation.

The slave is obtained from the master itself (TIOCGPTPEER), never by path, and every open
uses O_NOCTTY, so no process of ours can acquire or lose a terminal by accident (seed 000).
The child then does setsid and TIOCSCTTY with argument 0, which fails rather than steals.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

from ..linux.arch import ioctl_number
from ..linux.terminal import make_raw, set_window_size

DEFAULT_SIZE = (24, 80)
DEFAULT_TERM = "xterm-256color"
PARENT_STEPS = ("pty_open_master", "pty_unlockpt", "pty_get_slave", "pty_window_size",
                "pty_raw_mode")
CHILD_STEPS = ("setsid", "tiocsctty")


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
    if not sep or not rows.isdigit() or not cols.isdigit():
        raise SpecError(field, f"expected ROWSxCOLS such as 24x80, got {text!r}")
    return check_size((int(rows), int(cols)), field)


def check_size(size: tuple[int, int], field: str = "pty_size") -> tuple[int, int]:
    from ..model.errors import SpecError

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
        raise PtySetupError(step, exc.errno or 5) from None
    except termios.error as exc:
        for fd in (slave, master):
            if fd >= 0:
                os.close(fd)
        raise PtySetupError(step, int(exc.args[0]) if exc.args else 5) from None
    return PtyPair(master, slave, path)


def controlling_sessions(tty_path: str) -> list[tuple[int, str]]:
    """(session leader pid, command) of sessions whose controlling terminal is tty_path."""
    try:
        rdev = os.stat(tty_path).st_rdev
    except OSError:
        return []
    from ..supervise.reaper import stat_fields

    leaders = []
    for entry in os.listdir("/proc"):
        fields = stat_fields(entry) if entry.isdigit() else None
        if fields is None:
            continue
        session, tty_nr = int(fields[3]), int(fields[4])
        if tty_nr == rdev and session == int(entry):
            leaders.append((session, _command(entry)))
    return leaders


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return " ".join(os.fsdecode(a) for a in f.read().split(b"\0") if a) or "?"
    except OSError:
        return "?"
