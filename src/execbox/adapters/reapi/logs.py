"""The worker's log: one line per lease (action digest, exit, status, durations) and one
per session event, as text or JSON (--log-format), on stderr."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO


class WorkerLog:
    def __init__(self, form: str = "text", stream: TextIO | None = None) -> None:
        self.form = form
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def event(self, event: str, **fields: Any) -> None:
        """One line: `execbox worker: EVENT key=value ...` or a JSON object."""
        if self.form == "json":
            line = json.dumps({"time": round(time.time(), 3), "event": event, **fields},
                              default=str, sort_keys=False)
        else:
            parts = [f"{k}={_text(v)}" for k, v in fields.items() if v is not None]
            line = " ".join(["execbox worker:", event, *parts])
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text
