"""The CLI as its own fork server: spawn in-process, forward signals as cancel, pump output."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

from .errors import SpecError
from .output import OutputSink, fd_writer
from .plan import build_plan
from .spec import CommandSpec
from .supervise import Supervision

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _terminal_kept() -> Iterator[None]:
    """Put the terminal's settings back as they were if the step changed them."""
    if not os.isatty(0):
        yield
        return
    import termios

    try:
        saved = termios.tcgetattr(0)
    except termios.error:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            if termios.tcgetattr(0) != saved:
                old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                try:
                    termios.tcsetattr(0, termios.TCSANOW, saved)
                finally:
                    signal.signal(signal.SIGTTOU, old)


@contextlib.contextmanager
def _signals_as_pipe() -> Iterator[int]:
    """SIGINT/SIGTERM/SIGHUP become bytes on a pipe the supervision loop reads."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in _FORWARDED}
    old_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield read_end
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(read_end)
        os.close(write_end)


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
        with _terminal_kept(), _signals_as_pipe() as signal_fd:
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
