"""A sandboxed step's own terminal: a pty from the sandbox's devpts, relayed by pid 1.

The outer terminal's slave (fds 0-2 of the relay) belongs to the host's devpts, which the
sandbox cannot see, so `tty` and /dev/tty would not work with it; pid 1 copies between the
two and follows the outer window size.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import termios
import time

from ..linux.arch import ioctl_number
from ..linux.terminal import make_raw, set_window_size, terminal_size
from .context import ChildContext

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def open_sandbox_terminal(ctx: ChildContext) -> None:
    """A pty from the sandbox's own devpts for the step; the outer one (fd 0) becomes the
    raw transport, and the step's terminal gets its modes and size."""
    ctx.label = "pty_open_master (sandbox)"
    ctx.path_tried = "/dev/ptmx (the sandbox's own devpts)"
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    ctx.label = "pty_unlockpt (sandbox)"
    fcntl.ioctl(master, ioctl_number("TIOCSPTLCK"), struct.pack("i", 0))
    ctx.label = "pty_get_slave (sandbox)"
    slave = fcntl.ioctl(master, ioctl_number("TIOCGPTPEER"),
                        os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    ctx.label = "pty_window_size (sandbox)"
    termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(0))
    size = terminal_size(0)
    if size is not None:
        set_window_size(master, size)
    make_raw(0)
    ctx.extra["pty_master"], ctx.extra["pty_slave"] = master, slave


def attach_step_terminal(ctx: ChildContext, master: int, slave: int) -> None:
    """In the step (after the fork into the sandbox): a new session whose controlling
    terminal is the sandbox pty's slave, on fds 0-2."""
    ctx.label = "setsid (sandbox terminal)"
    os.close(master)
    os.setsid()
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(slave)
    ctx.label = "tiocsctty (sandbox terminal)"
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def relay_terminal(master: int, step: int, step_ended: Callable[[], None]) -> int:
    """Copy between the outer terminal (fds 0/1) and the sandbox terminal's master, follow
    the outer size, reap; after the step ends (step_ended() is called then), drain the
    master until EIO (bounded). Returns the step's wait status."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGWINCH, lambda *_: None)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    status: int | None = None
    drain_until = 0.0
    inputs = [master, 0, wake_r]
    last = b"\n"  # the last byte of input relayed
    while True:
        if status is None:
            try:
                pid, st = os.waitpid(step, os.WNOHANG)
            except ChildProcessError:
                pid, st = step, 0
            if pid == step:
                status, drain_until = st, time.monotonic() + 2.0
                step_ended()  # what still holds the terminal goes: the drain ends at once
        if status is not None and (master not in inputs or time.monotonic() > drain_until):
            break
        ready, _, _ = select.select(inputs, [], [], 0.1 if status is not None else 1.0)
        for fd in ready:
            if fd == wake_r:
                if signal.SIGWINCH in os.read(wake_r, 64):
                    size = terminal_size(0)
                    if size is not None:
                        set_window_size(master, size)
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:
                inputs.remove(fd)
                continue
            if not data:
                inputs.remove(fd)
                if fd == 0:
                    _end_of_input(master, last)
                continue
            if fd == 0:
                last = data[-1:]
            _write_all(1 if fd == master else master, data)
    signal.set_wakeup_fd(-1)
    return status


def _end_of_input(master: int, last: bytes) -> None:
    """The outer terminal reached its end: the caller's input was no terminal and is over
    (cli/runner.py makes this terminal canonical for its end-of-file character, which it
    keeps raw otherwise). The step's terminal gets its own end-of-file character where it
    is canonical (twice after a partial line), as script(1) gives it; a raw one gets
    nothing, since there every byte is data."""
    try:
        modes = termios.tcgetattr(master)
    except termios.error:
        return
    if modes[3] & termios.ICANON:
        eof = modes[6][termios.VEOF]
        _write_all(master, eof if last == b"\n" else eof * 2)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:
            return
