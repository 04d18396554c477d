"""The CLI's own terminal and signals: keep its settings, turn signals into bytes on a pipe,
follow window size changes."""

from __future__ import annotations

import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..streams.pty import PtyPair

PARENT_DIED = signal.SIGRTMIN + 1  # the guard process died: cancel hard (see cli.guard)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH, PARENT_DIED)
STOPS = frozenset((signal.SIGINT, signal.SIGTERM, signal.SIGHUP, PARENT_DIED))


class TerminalKept:
    """Put the terminal's settings back as they were if the step changed them."""

    def __init__(self) -> None:
        self.saved: list[Any] | None = None

    def __enter__(self) -> None:
        if os.isatty(0):
            import termios

            try:
                self.saved = termios.tcgetattr(0)
            except termios.error:
                self.saved = None

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            return
        import termios

        try:
            if termios.tcgetattr(0) != self.saved:
                old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                try:
                    termios.tcsetattr(0, termios.TCSANOW, self.saved)
                finally:
                    signal.signal(signal.SIGTTOU, old)
        except (termios.error, OSError):
            pass


class SignalsAsPipe:
    """SIGINT/SIGTERM/SIGHUP (cancel) and SIGWINCH (resize) become bytes on a pipe."""

    def __enter__(self) -> int:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.read_end, False)
        os.set_blocking(self.write_end, False)
        self.previous = {sig: signal.signal(sig, _ignore) for sig in FORWARDED}
        self.old_wakeup = signal.set_wakeup_fd(self.write_end, warn_on_full_buffer=False)
        return self.read_end

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self.old_wakeup)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.close(self.read_end)
        os.close(self.write_end)


def _ignore(signum: int, frame: object) -> None:
    """The wakeup fd carries the signal; the handler has nothing left to do."""


def follow_window_size(pair: PtyPair | None) -> None:
    """SIGWINCH: give the step's terminal the size of ours (the kernel tells the step)."""
    if pair is None or pair.master < 0:
        return
    from ..linux.terminal import set_window_size, terminal_size

    size = terminal_size(0) or terminal_size(1)
    if size is not None:
        try:
            set_window_size(pair.master, size)
        except OSError:
            pass
