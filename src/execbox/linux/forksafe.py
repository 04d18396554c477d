"""What a process's threads share that a fork must not break: a lock for set-up done
once per process, and a keeper of the last few results of some work, both safe to use
from several threads (a shared supervisor's jobs) and in a forked child.

A fork made while another thread held a lock leaves the child's copy held by no thread
of its own, so the child's first use would wait forever: a forked child gets its locks
unheld. Never fork while holding one.
"""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Hashable
    from typing import Any


class ForkLock:
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


class Recent:
    """The last `entries` values put, by key, the oldest dropped first; one whose size is
    over `biggest` is not kept. A forked child starts empty (what a process kept may name
    its pid or its fds)."""

    __slots__ = ("_biggest", "_entries", "_lock", "_values")

    def __init__(self, entries: int, biggest: int) -> None:
        self._entries, self._biggest = entries, biggest
        self._lock = ForkLock()
        self._values: dict[Hashable, object] = {}
        os.register_at_fork(after_in_child=self.clear)

    def get(self, key: Hashable) -> object | None:
        with self._lock:
            value = self._values.pop(key, None)
            if value is not None:
                self._values[key] = value  # the newest again
            return value

    def put(self, key: Hashable, value: object, size: int) -> None:
        """size: what the caller counts of key and value (bytes, say)."""
        if size > self._biggest:
            return
        with self._lock:
            self._values.pop(key, None)
            self._values[key] = value
            while len(self._values) > self._entries:
                del self._values[next(iter(self._values))]  # the oldest

    def clear(self) -> None:
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)
