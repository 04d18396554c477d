"""Spec -> plan: every step of a launch, parent-side and child-side, named and in order.

The supervisor runs `parent` (create the step's cgroup and program its device rules), then
forks and the child runs `child` up to execve. Both lists are plain data, decided here; the
supervisor adds nothing (a parent step hands its outputs, such as the cgroup's procs
files, to the child steps that need them through the child's context).
"""

from __future__ import annotations

import os
import resource

from ..model.spec import CommandSpec
from . import host

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from typing import Any

    Step = tuple[str, tuple[Any, ...]]


class Plan:
    """parent: steps the supervisor runs before it forks; child: what the child runs.
    memo: a kept plan's copies share it (plan/kept.py), for what is derived from the plan
    alone and not from the job's fds; None for a plan of its own."""

    __slots__ = ("child", "memo", "parent")

    def __init__(self, parent: list[Step], child: list[Step],
                 memo: dict[Any, Any] | None = None) -> None:
        self.parent = parent
        self.child = child
        self.memo = memo

    def names(self) -> list[str]:
        return [name for name, _ in self.parent + self.child]


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


def _cgroup_steps(spec: CommandSpec) -> tuple[list[Step], list[Step]]:
    """(parent, child) steps that put the step in its cgroup before anything can fork, and
    prove its device policy from in there."""
    limits = spec.limits
    if limits is None:
        return [], []
    if limits.join_cgroup:  # a run of a long-lived sandbox: inside the sandbox's cgroup
        return [], [("cgroup", (list(limits.join_cgroup),))]
    child: list[Step] = [("cgroup", ())]  # the procs files come from create_cgroup
    if limits.devices is not None:
        child.append(("verify_devices", (list(limits.devices),)))
    return [("create_cgroup", (limits.to_wire(),))], child


def build_plan(spec: CommandSpec, fd_map: list[list[int]], join_fd: int = -1) -> Plan:
    """fd_map holds (source fd in the spawning process, target fd in the child) pairs;
    join_fd is a pidfd of the long-lived sandbox's pid 1 a "join" step enters."""
    env = resolve_env(spec)
    parent, in_cgroup = _cgroup_steps(spec)
    steps: list[Step] = [("reset_signals", ()), *in_cgroup]
    launch = "execve"
    if spec.new_session or spec.controlling_tty:
        steps.append(("setsid", ()))
    highest = max([2, *(target for _, target in fd_map)])
    early, nofile = _split_nofile([list(r) for r in spec.rlimits or ()])
    if early:
        steps.append(("rlimits", (early, highest)))
    steps.append(("dup2", (fd_map,)))
    if spec.controlling_tty:
        # setsid above made a session without a terminal; the slave is now fd 0.
        steps.append(("tiocsctty", (0,)))
    keep = [target for _, target in fd_map] + ([join_fd] if join_fd >= 0 else [])
    steps.append(("close_fds", (keep,)))
    if spec.sandbox is not None:
        from .sandbox import sandbox_steps

        outside, inside = sandbox_steps(spec.sandbox, spec.cwd or host.cwd(),
                                        role=spec.sandbox_role, join_fd=join_fd,
                                        terminal=spec.controlling_tty, parent=parent)
        steps += outside + inside
        steps.append(("chdir", (spec.cwd or "/",)))
        names = {name for name, _ in outside}
        if "setpgid" in names:
            launch = "execve"  # the supervisor's own child, beside a native pid 1
        elif not names & {"fork_step", "fork_run", "hold"}:
            launch = "spawn_step"  # pid 1 itself spawns the step (see plan.sandbox)
    elif spec.cwd is not None:
        steps.append(("chdir", (spec.cwd,)))
    # The job's umask and nofile limit are for the step, set last: bwrap's --umask too is
    # the step's, not the mount points' and directories' it makes first.
    if spec.umask is not None:
        steps.append(("umask", (spec.umask,)))
    if nofile:
        steps.append(("rlimits", ([nofile], highest)))
    steps.append((launch, (list(spec.argv), env, search_path(env))))
    return Plan(parent, steps)


def _split_nofile(limits: list[list[int]]) -> tuple[list[list[int]], list[int] | None]:
    """(the limits set before the step's fds and sandbox are set up, the nofile limit set
    last, just before the launch). A nofile limit is the step's, not its set-up's: applied
    early, a tight one (nofile 10 with an fd at 9) would fail the copies of fds set-up
    makes above the step's own. Only raising its hard limit needs a capability the sandbox
    drops, so that part (with the soft limit at least as high as now) is done early."""
    wanted = [r for r in limits if r[0] == resource.RLIMIT_NOFILE]
    early = [r for r in limits if r[0] != resource.RLIMIT_NOFILE]
    if not wanted:
        return early, None
    which, soft, hard = wanted[-1]
    current_soft, current_hard = host.nofile()
    if _above(hard, current_hard):  # (a failure names the soft limit asked for)
        raised_soft = soft if _above(soft, current_soft) else current_soft
        early.append([which, raised_soft, hard, soft])
    return early, [which, soft, hard]


def _above(limit: int, current: int) -> bool:
    """limit > current, with RLIM_INFINITY above every number."""
    if current == resource.RLIM_INFINITY:
        return False
    return limit == resource.RLIM_INFINITY or limit > current
