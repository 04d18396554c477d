"""A lock for set-up done once per process that several threads may ask for at once.

A fork made while another thread held a lock leaves the child's copy held by no thread
of its own, so the child's first use would wait forever: a forked child gets it unheld.
Never fork while holding one.
"""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
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
