"""Plans kept per request, so that a supervisor sent the same step again does not plan it
again.

A supervisor is sent the same request over and over (a build farm worker's actions of one
kind, a CI agent's steps in one checkout). A plan is a function of the request's bytes,
of the process that builds it, and of what building it read of the host (plan/host.py).
The last few plans are kept with those reads, and one is used again only while every read
still gives the answer it gave: it is then the plan building would give now. The job's
own fds are all that differs from job to job; they are put in afresh, into a copy of the
kept steps of the job's own: one made ahead while the supervisor was idle (make_spare), or
else made then.
"""

from __future__ import annotations

import marshal
import os

from ..linux.forksafe import Recent
from ..model.spec import CommandSpec
from . import host
from .build import Plan, build_plan

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .build import Step

KEEP = 8  # plans
MAX_REQUEST = 64 * 1024  # bytes of a request whose plan is kept


class Kept:
    """A plan kept for one request's bytes: plan() gives a copy with a job's fds in it."""

    __slots__ = ("memo", "process", "reads", "request", "spare", "spec", "steps")

    def __init__(self, process: tuple[int, int, int], request: dict[str, Any],
                 spec: CommandSpec, steps: bytes, reads: list[host.Read]) -> None:
        self.process = process
        self.request = request
        self.spec = spec  # (immutable)
        self.steps = steps  # marshal of (parent, child): each use gets its own copy
        self.reads = reads
        self.memo: dict[Any, Any] = {}  # what is derived from the plan (Plan.memo)
        self.spare: list[tuple[list[Step], list[Step]]] = []  # a copy made ahead, or none

    def plan(self, fd_map: list[list[int]]) -> Plan:
        _used[:] = [self]
        try:
            parent, child = self.spare.pop()  # (one pop: each copy goes to one job)
        except IndexError:
            parent, child = marshal.loads(self.steps)
        return Plan(parent, [("dup2", (fd_map,)) if name == "dup2" else (name, args)
                             for name, args in child], self.memo)


_used: list[Kept] = []  # the kept plan last used, for make_spare
os.register_at_fork(after_in_child=_used.clear)


def make_spare() -> None:
    """Copy the steps of the kept plan used last for its next job, ahead of it: for a
    supervisor with nothing else to do (decoding them is a tenth of a millisecond taken
    from a launch)."""
    for kept in _used:
        if not kept.spare:
            kept.spare.append(marshal.loads(kept.steps))


_kept = Recent(entries=KEEP, biggest=MAX_REQUEST)  # by the request's bytes


def _process() -> tuple[int, int, int]:
    return os.getpid(), os.geteuid(), os.getegid()


def kept_plan(data: bytes) -> Kept | None:
    """The plan kept for the request whose bytes are data, if building would still give
    it."""
    kept = _kept.get(data)
    if not isinstance(kept, Kept) or kept.process != _process() \
            or not host.still_true(kept.reads):
        return None
    return kept


def plan_and_keep(data: bytes, request: dict[str, Any], spec: CommandSpec,
                  fd_map: list[list[int]], join_fd: int = -1) -> Plan:
    """build_plan, keeping the plan for the request's bytes where it can be used again: not
    a join's (its fd is the job's own in more than dup2), not one that takes the
    supervisor's environment, not a big request's."""
    keep = join_fd < 0 and spec.env is not None and len(data) <= MAX_REQUEST
    if not keep:
        return build_plan(spec, fd_map, join_fd)
    reads = host.start_recording()
    try:
        plan = build_plan(spec, fd_map, join_fd)
    finally:
        host.stop_recording()
    try:
        steps = marshal.dumps((plan.parent, plan.child))
    except ValueError:  # (a value marshal cannot carry: not kept)
        return plan
    _kept.put(data, Kept(_process(), request, spec, steps, reads), size=len(data))
    return plan
