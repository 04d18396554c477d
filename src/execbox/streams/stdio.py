"""Resolve what a caller passes as stdin/stdout/stderr into fds to send and pumps to run."""

from __future__ import annotations

import enum
import errno
import os
import resource
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..model.errors import SpecError
from .output import OutputSink, fd_writer


class Redirect(enum.Enum):
    """Special destinations: CAPTURE into Result, PIPE to read via Execution.stream()."""

    CAPTURE = "capture"
    DEVNULL = "devnull"
    PIPE = "pipe"


CAPTURE = Redirect.CAPTURE
DEVNULL = Redirect.DEVNULL
PIPE = Redirect.PIPE

StdioArg = Any  # None | int | file object | path | callable | Redirect


@dataclass
class Reader:
    """A pipe read end in the caller and where its bytes go."""

    name: str
    sink: OutputSink
    close_when_done: list[int] = field(default_factory=list)


@dataclass
class PreparedStdio:
    send: list[int] = field(default_factory=list)  # fds handed to the supervisor
    targets: list[int] = field(default_factory=list)  # fd number each gets in the child
    close_after_handoff: list[int] = field(default_factory=list)
    readers: dict[int, Reader] = field(default_factory=dict)
    stream_chunks: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, fd: int, target: int) -> None:
        self.send.append(fd)
        self.targets.append(target)

    def close_all(self) -> None:
        for fd in self.close_after_handoff:
            _close_quietly(fd)
        self.close_after_handoff.clear()
        for fd, reader in list(self.readers.items()):
            _close_quietly(fd)
            for extra in reader.close_when_done:
                _close_quietly(extra)
        self.readers.clear()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


SUBPROCESS_PIPE, SUBPROCESS_STDOUT, SUBPROCESS_DEVNULL = -1, -2, -3


def _from_subprocess(value: Any) -> Any:
    """Accept subprocess.PIPE (captured) and subprocess.DEVNULL as a subprocess user would."""
    if type(value) is int and value == SUBPROCESS_PIPE:
        return CAPTURE
    if type(value) is int and value == SUBPROCESS_DEVNULL:
        return DEVNULL
    return value


def _fd_of(value: Any, name: str) -> int | None:
    """The fd behind an int or file object, or None if value is neither."""
    if isinstance(value, bool):
        raise SpecError(name, f"expected a file, fd, path or callback, got {value!r}")
    if isinstance(value, int):
        fd = value
    elif hasattr(value, "fileno"):
        if getattr(value, "closed", False) is True:
            raise SpecError(name, "the file object is closed")
        flush = getattr(value, "flush", None)
        if callable(flush):
            try:
                flush()
            except (OSError, ValueError) as exc:
                raise SpecError(name, f"cannot flush the file object ({exc})") from None
        try:
            fd = int(value.fileno())
        except (OSError, ValueError) as exc:
            raise SpecError(name, f"file object has no usable fd ({exc})") from None
    else:
        return None
    if fd < 0 or not _is_open(fd):
        raise SpecError(name, f"fd {fd} is not open")
    return fd


def _open_path(value: Any, name: str, flags: int) -> int | None:
    if not isinstance(value, str | bytes | os.PathLike):
        return None
    if "\0" in os.fsdecode(os.fspath(value)):
        raise SpecError(name, "path must not contain a NUL byte")
    try:
        if flags & os.O_ACCMODE == os.O_RDONLY:
            return os.open(value, flags | os.O_CLOEXEC, 0o666)
        return _open_for_writing(value, flags)
    except OSError as exc:
        raise SpecError(name, f"cannot open {os.fsdecode(os.fspath(value))}: "
                              f"{exc.strerror}") from None


def _open_for_writing(path: Any, flags: int) -> int:
    """Never blocks the caller: a FIFO nobody reads yet (ENXIO without blocking) is opened
    read-write, so the step starts, its output waits in the FIFO for a reader, and the
    step's timeout and cancellation apply as to any step that cannot write."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return fd


def _prepare_input(value: Any, prep: PreparedStdio) -> None:
    if type(value) is int and value == SUBPROCESS_DEVNULL:
        value = DEVNULL
    if value is None:
        if _is_open(0):
            prep.add(0, 0)
            return
        value = DEVNULL
    if value is DEVNULL:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        prep.close_after_handoff.append(fd)
        prep.add(fd, 0)
        return
    given = _fd_of(value, "stdin")
    if given is not None:
        prep.add(given, 0)
        return
    opened = _open_path(value, "stdin", os.O_RDONLY)
    if opened is None:
        raise SpecError("stdin", f"expected None, DEVNULL, an fd, a file or a path, got {value!r}")
    prep.close_after_handoff.append(opened)
    prep.add(opened, 0)


def _prepare_output(value: Any, name: str, target: int, prep: PreparedStdio,
                    limit: int | None, timestamps: bool, pump_from: int | None = None) -> None:
    """Send the destination straight to the step, or pump through a sink when output must be
    processed (cap, timestamps, capture, callbacks) or comes from pump_from (a pty master)."""
    value = _from_subprocess(value)
    destination: int | None = None
    opened = False
    sink: OutputSink | None = None
    if value is CAPTURE:
        sink = OutputSink(None, limit=limit, timestamps=timestamps, capture=True)
    elif value is PIPE:
        def to_stream(data: bytes) -> None:
            prep.stream_chunks.append((name, data))
        sink = OutputSink(to_stream, timestamps=timestamps)
    elif value is DEVNULL:
        destination = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        opened = True
    elif value is None:
        destination = target if _is_open(target) else None
        if destination is None:
            destination, opened = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC), True
    elif callable(value) and not hasattr(value, "fileno"):
        callback: Callable[[bytes], object] = value
        sink = OutputSink(callback, timestamps=timestamps)
    else:
        destination = _fd_of(value, name)
        if destination is None:
            destination = _open_path(value, name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            opened = destination is not None
        if destination is None:
            raise SpecError(name, "expected None, CAPTURE, PIPE, DEVNULL, an fd, a file, "
                                  f"a path or a callback, got {value!r}")
    needs_pump = limit is not None or timestamps or pump_from is not None
    if sink is None and destination is not None and needs_pump:
        sink = OutputSink(fd_writer(destination), limit=limit, timestamps=timestamps)
    if sink is None:
        assert destination is not None
        prep.add(destination, target)
        if opened:
            prep.close_after_handoff.append(destination)
        return
    keep = [destination] if opened and destination is not None else []
    if pump_from is not None:
        prep.readers[pump_from] = Reader(name, sink, keep)
        return
    read_end, write_end = os.pipe()
    prep.readers[read_end] = Reader(name, sink, keep)
    prep.close_after_handoff.append(write_end)
    prep.add(write_end, target)


def prepare_pty(master: int, slave: int, stdin: StdioArg, stdout: StdioArg, stderr: StdioArg,
                pass_fds: Iterable[int] | Mapping[int, int] = (),
                output_limit: int | None = None, timestamps: bool = False) -> PreparedStdio:
    """The slave becomes fds 0-2; the master is pumped into stdout's destination.

    Takes ownership of master and slave (closed on error, or by the handle later).
    """
    prep = PreparedStdio()
    try:
        if stdin is not None:
            raise SpecError("stdin", "must be None in pty mode: the step reads its terminal")
        if stderr is not None and not (type(stderr) is int and stderr == SUBPROCESS_STDOUT):
            raise SpecError("stderr", "must be None in pty mode: it shares stdout's terminal")
        _check_limit(output_limit)
        for target in (0, 1, 2):
            prep.add(slave, target)
        prep.close_after_handoff.append(slave)
        _prepare_output(stdout, "stdout", 1, prep, output_limit, timestamps, pump_from=master)
        _add_pass_fds(prep, pass_fds)
    except BaseException:
        owned = set(prep.readers) | set(prep.close_after_handoff)
        prep.close_all()
        for fd in (master, slave):
            if fd not in owned:  # never close an fd twice: another thread may reuse it
                _close_quietly(fd)
        raise
    return prep


def _check_limit(output_limit: int | None) -> None:
    if output_limit is not None and (isinstance(output_limit, bool)
                                     or not isinstance(output_limit, int) or output_limit < 0):
        raise SpecError("output_limit", f"expected a byte count >= 0, got {output_limit!r}")


def _add_pass_fds(prep: PreparedStdio, pass_fds: Iterable[int] | Mapping[int, int]) -> None:
    if pass_fds is None:
        return
    if isinstance(pass_fds, str | bytes) or not isinstance(pass_fds, Mapping | Iterable):
        raise SpecError("pass_fds", f"expected a list of fds or a mapping of target fd to "
                                    f"fd, got {type(pass_fds).__name__}")
    mapping = pass_fds.items() if isinstance(pass_fds, Mapping) else ((f, f) for f in pass_fds)
    for target, source in mapping:
        field_name = f"pass_fds[{target}]"
        if isinstance(target, bool) or not isinstance(target, int) or target < 3:
            raise SpecError(field_name, "target fd must be an int >= 3 (0-2 are stdio)")
        ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # (only with pass_fds)
        if ceiling != resource.RLIM_INFINITY and target >= ceiling:
            raise SpecError(field_name, f"target fd must be below the open-file limit "
                                        f"({ceiling}); the step could not have it")
        fd = _fd_of(source, field_name)
        if fd is None:
            raise SpecError(field_name, f"expected an fd or file object, got {source!r}")
        prep.add(fd, target)


def prepare(stdin: StdioArg, stdout: StdioArg, stderr: StdioArg,
            pass_fds: Iterable[int] | Mapping[int, int] = (),
            output_limit: int | None = None, timestamps: bool = False) -> PreparedStdio:
    """Everything is opened here; on a SpecError nothing stays open."""
    _check_limit(output_limit)
    prep = PreparedStdio()
    try:
        _prepare_input(stdin, prep)
        _prepare_output(stdout, "stdout", 1, prep, output_limit, timestamps)
        if type(stderr) is int and stderr == SUBPROCESS_STDOUT:
            prep.add(prep.send[prep.targets.index(1)], 2)  # 2>&1: the same pipe or file
        else:
            _prepare_output(stderr, "stderr", 2, prep, output_limit, timestamps)
        _add_pass_fds(prep, pass_fds)
    except BaseException:
        prep.close_all()
        raise
    return prep
