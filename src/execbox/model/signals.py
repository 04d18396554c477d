"""Signal names <-> numbers, accepting the spellings users type (TERM, SIGTERM, 15)."""

from __future__ import annotations

import os
import signal

from .errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def parse_signal(value: str | int, field: str = "cancel_signal") -> int:
    """Return the signal number for value or raise SpecError naming field."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SpecError(field, f"expected a signal name or number, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = value.strip().upper()
        if text.isascii() and text.isdigit():
            number = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            try:
                number = int(signal.Signals[name])
            except KeyError:
                raise SpecError(field, f"unknown signal {value!r}") from None
    if number not in _valid() or number == 0:
        raise SpecError(field, f"{value!r} is not a valid signal number")
    return number


_VALID: frozenset[int] = frozenset()


def _valid() -> frozenset[int]:
    global _VALID
    if not _VALID:
        _VALID = frozenset(int(s) for s in signal.valid_signals())
    return _VALID


def signal_name(number: int) -> str:
    """SIGTERM for 15; 'SIG<n>' for real-time or unknown numbers."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def forward_to(pid: int) -> Callable[[int, object], None]:
    """A signal handler passing the signal on to pid; harmless once pid has exited."""

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    return forward
