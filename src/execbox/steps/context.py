"""State shared by the steps of one child: the error pipe and the fds it must keep."""

from __future__ import annotations


class ChildContext:
    """error_fd is the close-on-exec pipe the runner reports a failing step through."""

    __slots__ = ("error_fd", "keep_fds", "path_tried")

    def __init__(self, error_fd: int) -> None:
        self.error_fd = error_fd
        self.keep_fds: set[int] = set()
        self.path_tried = ""
