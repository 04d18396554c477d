"""How a spawn reports a step that failed: StepFailure, and its form on the error pipe."""

from __future__ import annotations

import os

ETXTBSY_ATTEMPTS = 12  # about 2 s of backoff in all


class StepFailure(Exception):
    """The child could not get past step; errno is the number the syscall returned."""

    def __init__(self, step: str, errno: int, path: str) -> None:
        super().__init__(step, errno, path)
        self.step = step
        self.errno = errno
        self.path = path

    def __str__(self) -> str:
        return f"step {self.step} failed: {os.strerror(self.errno)} ({self.path})"


def failure_from(report: bytes) -> StepFailure:
    name, code, path = report.decode(errors="surrogateescape").split("\0", 2)
    return StepFailure(name, int(code), path)
