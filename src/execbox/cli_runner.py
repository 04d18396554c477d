"""The CLI as its own fork server: spawn in-process, forward signals as cancel, pump output."""

from __future__ import annotations

import os
import signal

from .errors import SpecError
from .output import OutputSink, fd_writer
from .plan import build_plan
from .spec import CommandSpec
from .supervise import Supervision

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _TerminalKept:
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


class _SignalsAsPipe:
    """SIGINT/SIGTERM/SIGHUP become bytes on a pipe the supervision loop reads."""

    def __enter__(self) -> int:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.read_end, False)
        os.set_blocking(self.write_end, False)
        self.previous = {sig: signal.signal(sig, _ignore) for sig in _FORWARDED}
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


def _open_output(path: str | None, target: int, field: str) -> tuple[int, bool]:
    if path is None:
        return target, False
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666), True
    except OSError as exc:
        raise SpecError(field, f"cannot open {path}: {exc.strerror}") from None


def run_in_process(spec: CommandSpec, *, stdout: str | None, stderr: str | None,
                   output_limit: int | None, timestamps: bool) -> dict[str, Any]:
    from .linux.syscalls import set_child_subreaper

    set_child_subreaper()
    fd_map: list[list[int]] = [[0, 0]]
    pumps: dict[int, OutputSink] = {}
    to_close: list[int] = []
    write_ends: list[int] = []
    try:
        for target, path, field in ((1, stdout, "--stdout"), (2, stderr, "--stderr")):
            destination, opened = _open_output(path, target, field)
            if opened:
                to_close.append(destination)
            if output_limit is None and not timestamps:
                fd_map.append([destination, target])
                continue
            read_end, write_end = os.pipe()
            to_close.append(read_end)
            write_ends.append(write_end)
            pumps[read_end] = OutputSink(fd_writer(destination), limit=output_limit,
                                         timestamps=timestamps)
            fd_map.append([write_end, target])
        supervision = Supervision(spec, build_plan(spec, fd_map))
        with _TerminalKept(), _SignalsAsPipe() as signal_fd:
            requests = 0

            def on_signal(fd: int) -> None:
                nonlocal requests
                for _ in os.read(fd, 64):
                    requests += 1
                    supervision.cancel(hard=requests > 1)

            def on_output(fd: int) -> None:
                data = os.read(fd, 65536)
                if data:
                    pumps[fd].feed(data)
                else:
                    supervision.remove_reader(fd)

            supervision.add_reader(signal_fd, on_signal)
            supervision.start()
            for fd in write_ends:
                os.close(fd)
            write_ends.clear()
            for fd in pumps:
                supervision.add_reader(fd, on_output)
            result = supervision.run()
        for fd, sink in pumps.items():  # the tree is gone: drain what is left
            while data := os.read(fd, 65536):
                sink.feed(data)
            sink.close()
        return result
    finally:
        for fd in write_ends + to_close:
            os.close(fd)
