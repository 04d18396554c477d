"""Exceptions raised by execbox before or around a run (a run's own failure is a Result)."""

from __future__ import annotations


class ExecboxError(Exception):
    """Base class for errors execbox raises."""


class SpecError(ExecboxError, ValueError):
    """A field of a run's specification is invalid; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ForkServerError(ExecboxError):
    """The fork server could not be started or reached."""
