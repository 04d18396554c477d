"""The last step: execve, with the PATH search rules of execvp (EACCES is remembered)."""

from __future__ import annotations

import errno
import os

from .context import ChildContext


def candidates(program: str, search: list[str]) -> list[str]:
    """The paths execvp would try, in order."""
    if "/" in program:
        return [program]
    return [os.path.join(directory or ".", program) for directory in search]


def execve(ctx: ChildContext, argv: list[str], env: list[list[str]], search: list[str]) -> None:
    program = argv[0]
    environment = dict(env)
    if "/" in program:
        ctx.path_tried = program
        os.execve(program, argv, environment)
    denied: OSError | None = None
    denied_path = ""
    for directory in search:
        path = os.path.join(directory or ".", program)
        ctx.path_tried = path
        try:
            os.execve(path, argv, environment)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            if exc.errno == errno.EACCES:
                denied, denied_path = exc, path
                continue
            raise
    if denied is not None:
        ctx.path_tried = denied_path
        raise denied
    ctx.path_tried = program
    raise FileNotFoundError(errno.ENOENT, "not found in PATH", program)


def explain_exec(ctx: ChildContext, code: int, path: str) -> None:
    """Stands for execve where the step launcher reported it failing: fails the same way,
    here, where the step stands and with its ids, so that the failure gets the hint only
    this view can give (spawn/fork.py). It never runs the step."""
    ctx.label = "execve"
    ctx.path_tried = path
    raise OSError(code, os.strerror(code))
