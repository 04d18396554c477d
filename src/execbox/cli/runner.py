"""The CLI as its own fork server: spawn in-process, forward signals as cancel, pump output."""

from __future__ import annotations

import errno
import os
import select
import signal

from ..model.errors import SpecError
from ..model.spec import CommandSpec
from ..plan.build import build_plan
from ..streams.output import OutputSink, fd_writer
from ..supervise.supervision import Supervision

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..streams.pty import PtyPair

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH)


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
    """SIGINT/SIGTERM/SIGHUP (cancel) and SIGWINCH (resize) become bytes on a pipe."""

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


def _failed(failure: dict[str, str]) -> dict[str, Any]:
    from ..report.diagnose import exit_status_for_failure
    from ..supervise.reaper import Reaper
    from ..supervise.supervision import usage_dict

    return {"exit_code": exit_status_for_failure(failure["step"], 0), "signal": None,
            "timed_out": False, "cancelled": False, "failure": failure, "pid": None,
            "usage": usage_dict(Reaper(), 0.0, None)}


def run_in_process(spec: CommandSpec, *, stdout: str | None, stderr: str | None,
                   output_limit: int | None, timestamps: bool, pty: bool | str = False,
                   pty_size: tuple[int, int] | None = None,
                   pty_raw: bool = False) -> dict[str, Any]:
    """Run spec to the end in this process; pty="auto" falls back to pipes when the
    terminal cannot be set up (before the step ran) and says why in "pty_fallback"."""
    from ..linux.syscalls import set_child_subreaper

    set_child_subreaper()
    if not pty:
        result = _run(spec, None, stdout, stderr, output_limit, timestamps)
        result["pty_fallback"] = None
        return result
    from ..report.diagnose import describe
    from ..streams.pty import CHILD_STEPS, DEFAULT_SIZE, PtySetupError, open_pty, terminal_size

    if stderr is not None:
        raise SpecError("--stderr", "cannot be used with --pty: the terminal carries both")
    size = pty_size or terminal_size(0) or terminal_size(1) or DEFAULT_SIZE
    try:
        pair = open_pty(size, raw=pty_raw)
    except PtySetupError as exc:
        result = _failed(describe(exc.step, exc.errno, exc.path))
    else:
        try:
            result = _run(spec, pair, stdout, None, output_limit, timestamps)
        finally:
            pair.close()
    failure = result["failure"]
    if pty == "auto" and failure and (failure["step"].startswith("pty_")
                                      or failure["step"] in CHILD_STEPS):
        plain = spec.replace(controlling_tty=False)
        result = _run(plain, None, stdout, stderr, output_limit, timestamps)
        result["pty_fallback"] = f"{failure['step']}: {failure['errno']}: {failure['hint']}"
        return result
    result["pty_fallback"] = None
    return result


def _drain(fd: int, sink: OutputSink, deadline: float) -> None:
    """Read what is left after the tree is gone; bounded, since a leaked pty slave or pipe
    end outside the tree would otherwise keep this open forever."""
    import time

    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            select.select([fd], [], [], remaining)
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:  # pty master: every slave fd is closed
                return
            raise
        if not data:
            return
        sink.feed(data)


def _run(spec: CommandSpec, pair: PtyPair | None, stdout: str | None, stderr: str | None,
         output_limit: int | None, timestamps: bool) -> dict[str, Any]:
    checks: list[Callable[[], bool]] = []

    def stalled() -> bool:  # output blocked: timeouts and signals must still work
        return bool(checks) and checks[0]()

    pumps: dict[int, OutputSink] = {}
    to_close: list[int] = []
    write_ends: list[int] = []
    try:
        if pair is not None:
            fd_map = [[pair.slave, 0], [pair.slave, 1], [pair.slave, 2]]
            destination, opened = _open_output(stdout, 1, "--stdout")
            if opened:
                to_close.append(destination)
            pumps[pair.master] = OutputSink(fd_writer(destination, stalled), limit=output_limit,
                                            timestamps=timestamps)
        else:
            fd_map = [[0, 0]]
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
                pumps[read_end] = OutputSink(fd_writer(destination, stalled), limit=output_limit,
                                             timestamps=timestamps)
                fd_map.append([write_end, target])
        supervision = Supervision(spec, build_plan(spec, fd_map))
        interactive = pair is not None and os.isatty(0)
        with _TerminalKept(), _SignalsAsPipe() as signal_fd:
            requests = 0

            def on_signal(fd: int) -> None:
                nonlocal requests
                for signum in os.read(fd, 64):
                    if signum == signal.SIGWINCH:
                        _follow_window_size(pair)
                        continue
                    requests += 1
                    supervision.cancel(hard=requests > 1)

            def on_output(fd: int) -> None:
                sink = pumps[fd]
                for _ in range(64):  # drain what is there before polling again
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        return
                    except OSError as exc:
                        if exc.errno != errno.EIO:  # EIO: pty master, all slave fds closed
                            raise
                        data = b""
                    if not data:
                        supervision.remove_reader(fd)
                        return
                    sink.feed(data)

            to_terminal = fd_writer(pair.master, stalled) if pair is not None else None

            def on_keyboard(fd: int) -> None:
                assert to_terminal is not None
                data = os.read(fd, 65536)
                if not data:
                    supervision.remove_reader(fd)
                    return
                to_terminal(data)

            supervision.add_reader(signal_fd, on_signal)

            def serve_signals_and_clocks() -> bool:
                waiting = select.poll()
                waiting.register(signal_fd, select.POLLIN)
                if waiting.poll(0):
                    on_signal(signal_fd)
                return supervision.output_stalled()

            checks.append(serve_signals_and_clocks)
            supervision.start()
            for fd in write_ends:
                os.close(fd)
            write_ends.clear()
            if pair is not None:
                pair.close_slave()
            for fd in pumps:
                os.set_blocking(fd, False)
                supervision.add_reader(fd, on_output)
            if interactive and supervision.pid is not None:
                from ..streams.pty import make_raw

                make_raw(0)  # keystrokes go to the step's terminal as typed
                supervision.add_reader(0, on_keyboard)
            result = supervision.run()

            def give_up_on_signal() -> bool:
                """The step is over: wait for a slow reader, unless told to stop."""
                waiting = select.poll()
                waiting.register(signal_fd, select.POLLIN)
                if not waiting.poll(0):
                    return False
                stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
                return any(signum in stops for signum in os.read(signal_fd, 64))

            checks[0] = give_up_on_signal
            import time

            deadline = time.monotonic() + 2.0
            for fd, sink in pumps.items():
                _drain(fd, sink, deadline)
                sink.close()
        return result
    finally:
        for fd in write_ends + to_close:
            os.close(fd)


def _follow_window_size(pair: PtyPair | None) -> None:
    """SIGWINCH: give the step's terminal the size of ours (the kernel tells the step)."""
    if pair is None or pair.master < 0:
        return
    from ..streams.pty import set_window_size, terminal_size

    size = terminal_size(0) or terminal_size(1)
    if size is not None:
        try:
            set_window_size(pair.master, size)
        except OSError:
            pass
