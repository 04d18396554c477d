"""The output pump's sink: optional per-line timestamps, a tail-keeping size cap, delivery."""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Callable

    Writer = Callable[[bytes], object]


def truncation_marker(dropped: int) -> bytes:
    return f"[execbox: output truncated, {dropped} earlier bytes dropped]\n".encode()


def _timestamp() -> bytes:
    now = time.time()
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z ").encode()


class OutputSink:
    """Receives one stream's bytes. With a limit, only the last `limit` bytes are kept and
    delivered at close, preceded by a truncation marker if anything was dropped."""

    def __init__(self, write: Writer | None, *, limit: int | None = None,
                 timestamps: bool = False, capture: bool = False) -> None:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        self._write = write
        self._limit = limit
        self._timestamps = timestamps
        self._at_line_start = True
        self._tail = bytearray()
        self._dropped = 0
        self._captured: list[bytes] | None = [] if capture else None
        self.total = 0

    def _stamp(self, data: bytes) -> bytes:
        stamp = _timestamp()
        lines = data.split(b"\n")
        out = []
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if last and not line:
                break
            if self._at_line_start:
                out.append(stamp)
            out.append(line)
            if not last:
                out.append(b"\n")
                self._at_line_start = True
            else:
                self._at_line_start = False
        return b"".join(out)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._timestamps:
            data = self._stamp(data)
        self.total += len(data)
        if self._limit is None:
            self._deliver(data)
            return
        self._tail += data
        if len(self._tail) > 2 * self._limit + 65536:
            self._trim()

    def _trim(self) -> None:
        assert self._limit is not None
        excess = len(self._tail) - self._limit
        if excess > 0:
            del self._tail[:excess]
            self._dropped += excess

    def _deliver(self, data: bytes) -> None:
        if self._captured is not None:
            self._captured.append(data)
        if self._write is not None:
            self._write(data)

    def close(self) -> bytes | None:
        """Flush what the cap kept; return the captured bytes (if capturing)."""
        if self._limit is not None:
            self._trim()
            if self._dropped:
                self._deliver(truncation_marker(self._dropped))
            if self._tail:
                self._deliver(bytes(self._tail))
            self._tail = bytearray()
        if self._captured is None:
            return None
        return b"".join(self._captured)

    @property
    def dropped(self) -> int:
        return self._dropped


def fd_writer(fd: int, stalled: Callable[[], bool] | None = None,
              reader_gone: Callable[[], None] | None = None) -> Writer:
    """A writer that writes everything to fd. It waits for room in slices so that stalled()
    can run (the CLI keeps its timeout and signals working while nobody reads its output)
    and returns True to give up; a write error drops the rest with one message on stderr.
    reader_gone: called instead of that message when fd's reader has gone (EPIPE), to pass
    that on to the writer of what is copied here, as a pipe between the two would."""
    import select
    import stat

    failed: list[str] = []
    room = select.poll()
    room.register(fd, select.POLLOUT)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    # Readiness on a pipe or terminal means room for PIPE_BUF bytes, not for any amount: a
    # bigger blocking write could sleep where stalled() cannot run.
    step = 1 << 20 if regular else select.PIPE_BUF

    def report(reason: str) -> None:
        failed.append(reason)
        if fd != 2:
            try:
                os.write(2, f"execbox: output dropped: {reason}\n".encode())
            except OSError:
                pass

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view and not failed:
            if not regular and not room.poll(100):
                if stalled is not None and stalled():
                    report("nobody reads it")
                continue
            try:
                written = os.write(fd, view[:step])
            except (InterruptedError, BlockingIOError):
                continue
            except BrokenPipeError as exc:
                if reader_gone is None:
                    report(exc.strerror or str(exc))
                    return
                failed.append("its reader has gone")
                reader_gone()
                return
            except OSError as exc:
                report(exc.strerror or str(exc))
                return
            view = view[written:]

    return write
