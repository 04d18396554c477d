"""How a spawn reports a step that failed: StepFailure, and its form on the error pipe."""

from __future__ import annotations

import os

ETXTBSY_ATTEMPTS = 12  # about 2 s of backoff in all


class StepFailure(Exception):
    """The child could not get past step; errno is the number the syscall returned."""

    def __init__(self, step: str, errno: int, path: str, hint: str | None = None) -> None:
        super().__init__(step, errno, path)
        self.step = step
        self.errno = errno
        self.path = path
        self.hint = hint  # found by the step's side, in its own view (child/exec_hint.py)

    def __str__(self) -> str:
        return f"step {self.step} failed: {os.strerror(self.errno)} ({self.path})"


def failure_from(report: bytes) -> StepFailure:
    """Parse "step\0errno\0path[\0hint]" from the error pipe."""
    name, code, path, *hint = report.decode(errors="surrogateescape").split("\0", 3)
    return StepFailure(name, int(code), path, hint[0] if hint else None)
