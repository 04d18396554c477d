"""Turn a CommandSpec plus the fds to install into the ordered, named child steps."""

from __future__ import annotations

import os

from ..model.spec import CommandSpec

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from typing import Any

    Step = tuple[str, tuple[Any, ...]]


def resolve_env(spec: CommandSpec) -> list[list[str]]:
    if spec.env is None:
        return [[k, v] for k, v in os.environ.items()]
    return [[k, v] for k, v in spec.env]


def search_path(env: list[list[str]]) -> list[str]:
    """PATH of the step's own environment, as execvpe and subprocess use it."""
    for key, value in env:
        if key == "PATH":
            return value.split(os.pathsep)
    return os.defpath.split(os.pathsep)


def build_plan(spec: CommandSpec, fd_map: list[list[int]], join_fd: int = -1) -> list[Step]:
    """fd_map holds (source fd in the spawning process, target fd in the child) pairs;
    join_fd is a pidfd of the long-lived sandbox's pid 1 a "join" step enters."""
    env = resolve_env(spec)
    steps: list[Step] = [("reset_signals", ())]
    if spec.new_session or spec.controlling_tty:
        steps.append(("setsid", ()))
    if spec.umask is not None:
        steps.append(("umask", (spec.umask,)))
    if spec.rlimits:
        steps.append(("rlimits", ([list(r) for r in spec.rlimits],)))
    steps.append(("dup2", (fd_map,)))
    if spec.controlling_tty:
        # setsid above made a session without a terminal; the slave is now fd 0.
        steps.append(("tiocsctty", (0,)))
    keep = [target for _, target in fd_map] + ([join_fd] if join_fd >= 0 else [])
    steps.append(("close_fds", (keep,)))
    if spec.sandbox is not None:
        from ..model.sandbox import SandboxSpec
        from .sandbox import sandbox_steps

        box = SandboxSpec.from_wire(spec.sandbox)
        outside, inside = sandbox_steps(box, spec.cwd or os.getcwd(),
                                        role=str(spec.sandbox.get("role", "new")),
                                        join_fd=join_fd, terminal=spec.controlling_tty)
        steps += outside + inside
        steps.append(("chdir", (spec.cwd or "/",)))
    elif spec.cwd is not None:
        steps.append(("chdir", (spec.cwd,)))
    steps.append(("execve", (list(spec.argv), env, search_path(env))))
    return steps
