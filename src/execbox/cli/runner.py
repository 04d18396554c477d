"""`execbox run`'s supervisor: spawn in this process, signals as cancel, pump output.

It runs in the process the CLI forked for it (see cli.guard), so the step's tree outlives
neither this process nor the `execbox run` process the user sees.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import signal
import time

from ..model.errors import SpecError
from ..model.exits import EXIT_TIMEOUT
from ..model.result import Failure, Result
from ..plan.build import build_plan
from ..streams.output import OutputSink, fd_writer
from ..supervise.supervision import Supervision
from .terminal import PARENT_DIED, STOPS, SignalsAsPipe, TerminalKept, follow_window_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..model.spec import CommandSpec
    from ..streams.pty import PtyPair

_DRAIN_AFTER_EXIT = 2.0  # output held open by something outside the tree
_OPEN_RETRY = 0.05


class OutputTimedOut(Exception):
    """An output path could not be opened before the step's deadline (a FIFO nobody
    reads); the step never started."""

    def __init__(self, field: str, path: str) -> None:
        super().__init__(field, path)
        self.field = field
        self.path = path


def open_output(path: str, field: str, deadline: float | None, signal_fd: int) -> int:
    """Open an output path for writing without blocking past the deadline or a signal: a
    FIFO nobody reads is retried (O_NONBLOCK gives ENXIO) until then."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    while True:
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise SpecError(field, f"cannot open {path}: {exc.strerror}") from None
        else:
            os.set_blocking(fd, True)
            try:
                if os.path.isfile(path):
                    os.ftruncate(fd, 0)
            except OSError:
                pass
            return fd
        if deadline is not None and time.monotonic() >= deadline:
            raise OutputTimedOut(field, path)
        ready = select.select([signal_fd], [], [], _OPEN_RETRY)[0]
        if ready and any(s in STOPS for s in os.read(signal_fd, 64)):
            raise KeyboardInterrupt


def run_in_process(spec: CommandSpec, *, stdout: str | None, stderr: str | None,
                   output_limit: int | None, timestamps: bool, pty: bool | str = False,
                   pty_size: tuple[int, int] | None = None, pty_raw: bool = False) -> Result:
    """Run spec to the end in this process; pty="auto" falls back to pipes when the
    terminal cannot be set up (before the step ran) and says why in pty_fallback."""
    from ..linux.syscalls import set_child_subreaper

    set_child_subreaper()
    if not pty:
        return _run(spec, None, stdout, stderr, output_limit, timestamps)
    from ..linux.terminal import terminal_size
    from ..report.diagnose import describe, exit_status_for_failure
    from ..streams.pty import DEFAULT_SIZE, PtySetupError, open_pty, terminal_setup_failed

    if stderr is not None:
        raise SpecError("--stderr", "cannot be used with --pty: the terminal carries both")
    size = pty_size or terminal_size(0) or terminal_size(1) or DEFAULT_SIZE
    try:
        pair = open_pty(size, raw=pty_raw)
    except PtySetupError as exc:
        opened = describe(exc.step, exc.errno, exc.path)
        result = Result(exit_code=exit_status_for_failure(opened.step, 0), failure=opened)
    else:
        if not os.isatty(0):  # as script(1): piped input is passed on, not echoed back
            _no_echo(pair.slave)
        try:
            result = _run(spec, pair, stdout, None, output_limit, timestamps)
        finally:
            pair.close()
    failure = result.failure
    if pty == "auto" and failure is not None and terminal_setup_failed(failure.step):
        plain = _run(spec.replace(controlling_tty=False), None, stdout, stderr, output_limit,
                     timestamps)
        return plain.replace(pty_fallback=f"{failure.step}: {failure.errno}: {failure.hint}")
    return result


def _drain(fd: int, sink: OutputSink, deadline: float) -> None:
    """Read what is left after the tree is gone; bounded, since a leaked pty slave or pipe
    end outside the tree would otherwise keep this open forever."""
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


class _Streams:
    """Where the step's output goes: fds handed to it, and pumps for what execbox reads
    (a pty master, or pipes when output is capped or timestamped)."""

    def __init__(self) -> None:
        self.fd_map: list[list[int]] = []
        self.pumps: dict[int, OutputSink] = {}
        self.to_close: list[int] = []
        self.write_ends: list[int] = []

    def close(self) -> None:
        for fd in self.write_ends + self.to_close:
            os.close(fd)
        self.write_ends.clear()
        self.to_close.clear()

    def dropped(self, names: dict[int, str]) -> dict[str, int]:
        return {names[fd]: sink.dropped for fd, sink in self.pumps.items() if sink.dropped}


def _open_streams(streams: _Streams, pair: PtyPair | None, stdout: str | None,
                  stderr: str | None, limit: int | None, timestamps: bool,
                  deadline: float | None, signal_fd: int,
                  stalled: Callable[[], bool]) -> dict[int, str]:
    names: dict[int, str] = {}

    def destination(path: str | None, target: int, field: str) -> int:
        if path is None:
            return target
        fd = open_output(path, field, deadline, signal_fd)
        streams.to_close.append(fd)
        return fd

    devnull = -1
    if pair is not None or limit is not None or timestamps:  # (execbox copies output)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        streams.to_close.append(devnull)
    if pair is not None:
        streams.fd_map = [[pair.slave, 0], [pair.slave, 1], [pair.slave, 2]]
        out = destination(stdout, 1, "--stdout")
        streams.pumps[pair.master] = OutputSink(
            fd_writer(out, stalled, functools.partial(_hang_up, pair.master, devnull)),
            limit=limit, timestamps=timestamps)
        names[pair.master] = "stdout"
        return names
    streams.fd_map = [[0, 0]]
    for target, path, field in ((1, stdout, "--stdout"), (2, stderr, "--stderr")):
        out = destination(path, target, field)
        if limit is None and not timestamps:
            streams.fd_map.append([out, target])
            continue
        read_end, write_end = os.pipe()
        streams.to_close.append(read_end)
        streams.write_ends.append(write_end)
        streams.pumps[read_end] = OutputSink(
            fd_writer(out, stalled, functools.partial(_hang_up, read_end, devnull)),
            limit=limit, timestamps=timestamps)
        names[read_end] = field.removeprefix("--")
        streams.fd_map.append([write_end, target])
    return names


def _hang_up(fd: int, devnull: int) -> None:
    """Our end of the step's output (a pipe's read end, a terminal's master) stops being
    one, as if closed, while the number stays ours and valid (now /dev/null: reads see the
    end, writes go nowhere): the step's next write gets SIGPIPE, or its terminal hangs up.
    devnull is opened ahead: this needs no new fd when it happens."""
    os.dup2(devnull, fd, inheritable=False)


def _run(spec: CommandSpec, pair: PtyPair | None, stdout: str | None, stderr: str | None,
         output_limit: int | None, timestamps: bool) -> Result:
    checks: list[Callable[[], bool]] = []

    def stalled() -> bool:  # output blocked: timeouts and signals must still work
        return bool(checks) and checks[0]()

    streams = _Streams()
    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    try:
        with TerminalKept(), SignalsAsPipe() as signal_fd:
            try:
                names = _open_streams(streams, pair, stdout, stderr, output_limit, timestamps,
                                      deadline, signal_fd, stalled)
            except OutputTimedOut as exc:
                return Result(exit_code=EXIT_TIMEOUT, timed_out=True, failure=Failure(
                    f"open {exc.field}", "ETIMEDOUT",
                    f"{exc.field}: {exc.path} could not be opened before the timeout",
                    "it is a FIFO (named pipe) that nothing opened for reading"))
            supervision = Supervision(spec, build_plan(spec, streams.fd_map))
            result = _supervise(supervision, pair, streams, signal_fd, checks)
            return result.replace(output_dropped=streams.dropped(names))
    finally:
        streams.close()


def _no_echo(terminal: int) -> None:
    import termios

    try:
        modes = termios.tcgetattr(terminal)
        modes[3] &= ~termios.ECHO
        termios.tcsetattr(terminal, termios.TCSANOW, modes)
    except termios.error:
        pass  # (the step still runs; its input is echoed to its output)


def _piped_input(master: int, to_terminal: Callable[[bytes], object] | None,
                 supervision: Supervision, relayed: bool) -> Callable[[int], None]:
    """Input that is no terminal (a pipe, a file, /dev/null) goes to the step's terminal as
    script(1) passes it; at its end the terminal's end-of-file character follows (twice
    after a partial line: the first only ends that line), so a step reading to the end of
    its input ends, as it would with a pipe. relayed: a sandbox's pid 1 relays this
    terminal, which it keeps raw, to the step's own (child/console.py): this one is made
    canonical for its end-of-file, which pid 1 reads as the end and passes on as the
    step's terminal's own, if that one is canonical."""
    last = [b"\n"]

    def on_input(fd: int) -> None:
        assert to_terminal is not None
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if data:
            last[0] = data[-1:]
            to_terminal(data)
            return
        supervision.remove_reader(fd)
        import termios

        try:
            modes = termios.tcgetattr(master)
        except termios.error:
            return
        if relayed and not modes[3] & termios.ICANON:
            modes[3] |= termios.ICANON  # (a partial line pid 1 has not read yet ends first)
            try:
                termios.tcsetattr(master, termios.TCSANOW, modes)
            except termios.error:
                return
            to_terminal(modes[6][termios.VEOF] * 2)
        elif modes[3] & termios.ICANON:  # (a raw terminal has no end-of-file character)
            eof = modes[6][termios.VEOF]
            to_terminal(eof if last[0] == b"\n" else eof * 2)

    return on_input


def _supervise(supervision: Supervision, pair: PtyPair | None, streams: _Streams,
               signal_fd: int, checks: list[Callable[[], bool]]) -> Result:
    requests = 0

    def on_signal(fd: int) -> None:
        nonlocal requests
        for signum in os.read(fd, 64):
            if signum == signal.SIGWINCH:
                follow_window_size(pair)
                continue
            requests += 1
            supervision.cancel(hard=requests > 1 or signum == PARENT_DIED)

    def on_output(fd: int) -> None:
        sink = streams.pumps[fd]
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

    to_terminal = fd_writer(pair.master, lambda: bool(checks) and checks[0]()) \
        if pair is not None else None

    def on_keyboard(fd: int) -> None:
        assert to_terminal is not None
        data = os.read(fd, 65536)
        if not data:
            supervision.remove_reader(fd)
            return
        to_terminal(data)

    supervision.add_reader(signal_fd, on_signal)

    def serve_signals_and_clocks() -> bool:
        if select.select([signal_fd], [], [], 0)[0]:
            on_signal(signal_fd)
        return supervision.output_stalled()

    checks.append(serve_signals_and_clocks)
    supervision.start()
    for fd in streams.write_ends:
        os.close(fd)
    streams.write_ends.clear()
    if pair is not None:
        pair.close_slave()
    for fd in streams.pumps:
        os.set_blocking(fd, False)
        supervision.add_reader(fd, on_output)
    if pair is not None and os.isatty(0) and supervision.pid is not None:
        from ..linux.terminal import make_raw

        make_raw(0)  # keystrokes go to the step's terminal as typed
        supervision.add_reader(0, on_keyboard)
    elif pair is not None and supervision.pid is not None:
        relayed = supervision.spec.sandbox is not None
        supervision.add_reader(0, _piped_input(pair.master, to_terminal, supervision,
                                               relayed))
    result = supervision.run()

    def give_up_on_signal() -> bool:
        """The step is over: wait for a slow reader, unless told to stop."""
        if not select.select([signal_fd], [], [], 0)[0]:
            return False
        return any(signum in STOPS for signum in os.read(signal_fd, 64))

    checks[0] = give_up_on_signal
    deadline = time.monotonic() + _DRAIN_AFTER_EXIT
    for fd, sink in streams.pumps.items():
        _drain(fd, sink, deadline)
        sink.close()
    return result
