"""One line per event on stderr ("execbox runner: EVENT key=value ..."), from any thread:
what an operator greps for next to bb_worker's own log."""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO


class RunnerLog:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def event(self, event: str, **fields: Any) -> None:
        parts = [f"execbox runner: {event}"]
        parts += [f"{key}={_text(value)}" for key, value in fields.items() if value is not None]
        with self._lock:
            print(" ".join(parts), file=self.stream, flush=True)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return repr(text) if (not text or any(c.isspace() or c in "'\"" for c in text)) else text
