"""State shared by the steps of one child: the error pipe, kept fds, what to report."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ChildContext:
    """error_fd is the close-on-exec pipe the runner reports a failing step through.

    label, when a step sets it, names the failing operation more precisely than the step
    (e.g. "bind /usr -> /usr"); path_tried is the file the failing syscall was about.
    extra carries values between steps, and from the supervisor's parent-side steps (such
    as the cgroup's procs files) into the child, which inherits them at fork.
    """

    __slots__ = ("error_fd", "extra", "keep_fds", "label", "path_tried")

    def __init__(self, error_fd: int, extra: dict[str, Any] | None = None) -> None:
        self.error_fd = error_fd
        self.keep_fds: set[int] = set()
        self.path_tried = ""
        self.label = ""
        self.extra: dict[str, Any] = dict(extra or {})
