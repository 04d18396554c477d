"""State shared by the steps of one child: the error pipe and the fds it must keep."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ChildContext:
    """error_fd is the close-on-exec pipe the runner reports a failing step through."""

    error_fd: int
    keep_fds: set[int] = field(default_factory=set)
    path_tried: str = ""
