"""Step cgroup names, emptying a cgroup, and removing the ones a dead execbox left behind.

A step cgroup is named execbox-<creator pid>-<creator start time>-<n>. The start time
(field 22 of /proc/PID/stat, in clock ticks since boot) makes the name survive pid reuse:
the cgroup is stale when no process has that pid with that start time. A creator killed
with SIGKILL mid-step leaves the step's processes inside; they are killed before the
cgroup is removed (cgroup.kill on v2, freeze, SIGKILL, thaw otherwise).
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time

from ..supervise.proctree import stat_fields
from .files import CgroupError, errno_name, read, write

PREFIX = "execbox-"
# A cgroup made ahead for a ready pid 1 (spawn/ready.py): renamed to a step cgroup's name
# when a step adopts it, removed with that pid 1 otherwise; stale like a step cgroup.
READY_PREFIX = "execbox.ready-"
STARTTIME_INDEX = 19  # field 22 of /proc/PID/stat, counted after the command name
KILL_TIMEOUT = 2.0    # seconds to wait for a killed cgroup to become empty
RMDIR_TIMEOUT = 5.0   # seconds to retry rmdir: killed orphans stay until their reaper (init) reaps
POLL_INTERVAL = 0.005

_COUNTER = itertools.count()


def start_time(pid: int, living: bool = False) -> int | None:
    """When pid started (clock ticks after boot), or None if there is no such process (or,
    with living=True, it is a zombie: it can no longer use its cgroups)."""
    fields = stat_fields(str(pid))
    if fields is None or len(fields) <= STARTTIME_INDEX:
        return None
    if living and fields[0] == b"Z":
        return None
    return int(fields[STARTTIME_INDEX])


def gone(pid: int, started: int | None) -> bool:
    """Whether the process pid that started at started (None: any time) is gone: no such
    pid, a zombie, or a later process with that number."""
    now = start_time(pid, living=True)
    return now is None or (started is not None and now != started)


def new_name(ready: bool = False) -> str:
    """A fresh step cgroup name for this process (or a ready pid 1's, see READY_PREFIX)."""
    pid = os.getpid()
    if _own_start[0] != pid or _own_start[1] is None:  # read once per process (a fork
        _own_start[:] = [pid, start_time(pid)]           # has another pid and time)
    return f"{READY_PREFIX if ready else PREFIX}{pid}-{_own_start[1]}-{next(_COUNTER)}"


_own_start: list[int | None] = [0, None]


def creator_of(name: str) -> tuple[int, int | None] | None:
    """(pid, start time) from a step cgroup name; start time None for the older
    execbox-<pid>-<n> names; None if name is not a step cgroup (e.g. the leaf)."""
    if not name.startswith(PREFIX):
        return None
    return _creator(name[len(PREFIX):])


def _any_creator(name: str) -> tuple[int, int | None] | None:
    """creator_of for step cgroups and ready ones alike."""
    if name.startswith(READY_PREFIX):
        return _creator(name[len(READY_PREFIX):])
    return creator_of(name)


def _creator(rest: str) -> tuple[int, int | None] | None:
    parts = rest.split("-")
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    if len(parts) == 3:
        return int(parts[0]), int(parts[1])
    if len(parts) == 2:
        return int(parts[0]), None
    return None


def is_stale(name: str, known: dict[tuple[int, int | None], bool] | None = None) -> bool:
    """Whether name is a step (or ready) cgroup whose creator is gone. known: answers
    already found for creators, shared by the calls of one sweep (a creator has a cgroup
    in each hierarchy, and each answer costs a read of /proc)."""
    creator = _any_creator(name)
    if creator is None:
        return False
    if known is not None and creator in known:
        return known[creator]
    answer = gone(*creator)
    if known is not None:
        known[creator] = answer
    return answer


def procs(directory: str) -> set[int]:
    try:
        return {int(p) for p in read(f"{directory}/cgroup.procs").split()}
    except (OSError, ValueError):
        return set()


def _kill_each(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _frozen_kill(directory: str, state_file: str, frozen: str, thawed: str) -> None:
    """Freeze so nothing forks between listing and killing, SIGKILL all, thaw so the
    kills are delivered."""
    write(f"{directory}/{state_file}", frozen)
    try:
        _kill_each(procs(directory))
    finally:
        write(f"{directory}/{state_file}", thawed)


def kill_once(directory: str) -> None:
    """One round of killing everything in directory (and below it on v2)."""
    if os.path.exists(f"{directory}/cgroup.kill"):
        write(f"{directory}/cgroup.kill", "1")
    elif os.path.exists(f"{directory}/freezer.state"):
        _frozen_kill(directory, "freezer.state", "FROZEN", "THAWED")
    elif os.path.exists(f"{directory}/cgroup.freeze"):
        _frozen_kill(directory, "cgroup.freeze", "1", "0")
    else:
        _kill_each(procs(directory))


def subtree(directory: str) -> list[str]:
    """directory and every cgroup below it, deepest first (the order rmdir needs)."""
    found = []
    for parent, children, _ in os.walk(directory, topdown=False):
        found += [os.path.join(parent, child) for child in children]
    return [*found, directory]


def empty(directories: list[str], timeout: float = KILL_TIMEOUT) -> set[int]:
    """Kill until no process is left in directories (and their children); returns the
    processes still there after timeout seconds (e.g. stuck in uninterruptible sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        everything = [d for top in directories for d in subtree(top)]
        left = set().union(*(procs(d) for d in everything))
        if not left or time.monotonic() >= deadline:
            return left
        for d in directories:
            try:
                kill_once(d)
            except CgroupError:
                _kill_each(left)
        time.sleep(POLL_INTERVAL)


def rmdir_tree(directory: str, timeout: float = RMDIR_TIMEOUT) -> str | None:
    """Remove directory and its child cgroups; None if done, else why not."""
    try:
        os.rmdir(directory)  # the usual case: no child cgroups, so nothing to walk
        return None
    except FileNotFoundError:
        return None
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    for d in subtree(directory):
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    return f"cannot remove {d}: {errno_name(exc.errno)}"
                time.sleep(POLL_INTERVAL)
    return None


def kill_and_remove(directory: str) -> list[str]:
    """Empty and remove one cgroup; what was left, as sentences (empty if nothing)."""
    left = []
    survivors = empty([directory])
    if survivors:
        left.append(f"{directory}: processes survived SIGKILL: "
                    f"{', '.join(map(str, sorted(survivors)))}")
    problem = rmdir_tree(directory)
    if problem:
        left.append(problem)
    return left


def remove_stale(parent: str, creator: int | None = None,
                 known: dict[tuple[int, int | None], bool] | None = None) -> list[str]:
    """Kill and remove the stale step cgroups directly below parent (only those of
    creator pid, if given); returns what could not be cleaned up. known: see is_stale."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    left = []
    for name in sorted(names):
        found = _any_creator(name)
        if found is None or (creator is not None and found[0] != creator):
            continue
        if is_stale(name, known) and os.path.isdir(f"{parent}/{name}"):
            left += kill_and_remove(f"{parent}/{name}")
    return left
