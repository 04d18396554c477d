"""Terminal steps: make the pty slave (already on fd 0) the controlling terminal."""

from __future__ import annotations

import fcntl
import os
import termios

from .context import ChildContext


def set_controlling_tty(ctx: ChildContext, fd: int) -> None:
    """TIOCSCTTY with argument 0: fails with EPERM instead of stealing another session's."""
    try:
        ctx.path_tried = os.ttyname(fd)
    except OSError:
        ctx.path_tried = f"fd {fd}"
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
