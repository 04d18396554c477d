"""cgroup v2 delegation: get controllers enabled for the step cgroups below our own.

On cgroup v2 a child cgroup only has memory.max, pids.max or cpu.max when its parent lists
the controller in cgroup.subtree_control, and the kernel refuses that while the parent
itself has member processes (the "no internal processes" rule; the root cgroup is exempt).
execbox is such a member of its own cgroup, so when a needed controller is not enabled yet
it moves itself, and the processes connected to it in that cgroup (its parent, children,
siblings: one process family), into a leaf child, LEAF, and then enables the controllers.
A member process outside that family is someone else's: execbox never moves it and fails
with a message saying the cgroup is not delegated to it.

See the kernel's Documentation/admin-guide/cgroup-v2.rst ("No Internal Process Constraint",
"Delegation") and systemd's "Control Group APIs and Delegation" (Delegate=yes).
"""

from __future__ import annotations

import errno
import os

from ..supervise.proctree import stat_fields
from .files import CgroupError, errno_name, not_delegated, read, write

LEAF = "execbox-leaf"
# Processes may be forked into our cgroup between reading cgroup.procs and enabling the
# controllers (EBUSY); each attempt moves the newcomers of our family first.
ENABLE_ATTEMPTS = 5
FOREIGN_ADVICE = ("; a program using execbox's Python API there calls "
                  "execbox.cgroups.delegation.enter_leaf() at start")


def base_of(directory: str) -> str:
    """The delegated cgroup: our own, or its parent when we already moved into LEAF."""
    if os.path.basename(directory) == LEAF:
        return os.path.dirname(directory)
    return directory


def is_root(directory: str) -> bool:
    """The real root cgroup has no cgroup.type; it may have members and enabled controllers."""
    return not os.path.exists(f"{directory}/cgroup.type")


def members(directory: str) -> set[int]:
    return {int(p) for p in read(f"{directory}/cgroup.procs").split()}


def enabled(directory: str) -> set[str]:
    return set(read(f"{directory}/cgroup.subtree_control").split())


def family(inside: set[int], me: int) -> set[int]:
    """The processes in inside connected to me through parent links that stay inside."""
    parent = {}
    for pid in inside:
        fields = stat_fields(str(pid))
        if fields is not None:
            parent[pid] = int(fields[1])
    linked: dict[int, set[int]] = {pid: set() for pid in parent}
    for pid, ppid in parent.items():
        if ppid in linked:
            linked[pid].add(ppid)
            linked[ppid].add(pid)
    found, todo = {me}, [me]
    while todo:
        for other in linked.get(todo.pop(), set()) - found:
            found.add(other)
            todo.append(other)
    return found


def split_members(directory: str, me: int | None = None) -> tuple[set[int], list[int]]:
    """(members of our process family, other live members) of directory."""
    me = os.getpid() if me is None else me
    inside = members(directory)
    ours = family(inside, me) & inside
    others = sorted(p for p in inside - ours if os.path.exists(f"/proc/{p}"))
    return ours, others


def _describe(pids: list[int]) -> str:
    shown = []
    for pid in pids[:5]:
        try:
            shown.append(f"{pid} ({read(f'/proc/{pid}/comm').strip()})")
        except OSError:
            shown.append(str(pid))
    return ", ".join(shown) + (f" and {len(pids) - 5} more" if len(pids) > 5 else "")


def move_family_to_leaf(base: str) -> None:
    """Move our process family out of base into base/LEAF; refuse if others are there."""
    ours, others = split_members(base)
    if others:
        raise CgroupError(errno.EBUSY, not_delegated(
            base, f"has foreign processes: {_describe(others)}") + FOREIGN_ADVICE)
    leaf = _make_leaf(base)
    for pid in sorted(ours):
        try:
            write(f"{leaf}/cgroup.procs", str(pid), owner=base)
        except CgroupError as exc:
            if exc.errno != errno.ESRCH:  # it exited meanwhile
                raise


def enable(base: str, controllers: set[str]) -> None:
    """Enable controllers for base's children, moving our family into LEAF if needed."""
    for attempt in range(ENABLE_ATTEMPTS):
        missing = controllers - enabled(base)
        if not missing:
            return
        if not is_root(base) and members(base):
            move_family_to_leaf(base)
        line = " ".join(f"+{c}" for c in sorted(missing))
        try:
            write(f"{base}/cgroup.subtree_control", line, owner=base)
            return
        except CgroupError as exc:
            if exc.errno != errno.EBUSY or attempt == ENABLE_ATTEMPTS - 1:
                raise


def enable_if_free(base: str, controllers: set[str]) -> None:
    """Enable controllers only where no process has to move (for optional statistics)."""
    missing = controllers - enabled(base)
    if not missing or (not is_root(base) and members(base)):
        return
    try:
        write(f"{base}/cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing)),
              owner=base)
    except CgroupError:
        pass


def problem(base: str, controllers: set[str]) -> str | None:
    """Why execbox could not use controllers below base (None if it could), without
    changing anything: for `execbox doctor`."""
    available = set(read(f"{base}/cgroup.controllers").split())
    absent = sorted(controllers - available)
    if absent:
        return not_delegated(base, f"{', '.join(absent)} not in its cgroup.controllers")
    for name in ("cgroup.subtree_control", "cgroup.procs"):
        if not os.access(f"{base}/{name}", os.W_OK):
            return not_delegated(base, f"cannot write {name}: EACCES")
    if not os.access(base, os.W_OK):
        return not_delegated(base, "cannot create child cgroups: EACCES")
    if controllers - enabled(base) and not is_root(base):
        _, others = split_members(base)
        if others:
            return not_delegated(base, f"has foreign processes: {_describe(others)}")
    return None


def own_cgroup2(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
                ) -> str | None:
    """Our cgroup2 directory on a pure cgroup v2 host (None on v1 and hybrid hosts)."""
    if not os.path.exists(f"{root}/cgroup.controllers"):
        return None
    for line in read(proc_cgroup).splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            return root + path.rstrip("/")
    return None


def enter_leaf() -> str | None:
    """Move the calling process (only it) into <own cgroup>/LEAF; returns the leaf, or None
    where nothing has to move (not pure v2, already in the leaf, or the root cgroup).

    A program embedding execbox's Python API in a delegated cgroup calls this once at
    start, before its first run: the fork server it then starts lives in the leaf, so the
    program is not a foreign process in the cgroup execbox manages."""
    own = own_cgroup2()
    if own is None or os.path.basename(own) == LEAF or is_root(own):
        return None
    leaf = _make_leaf(own)
    write(f"{leaf}/cgroup.procs", str(os.getpid()), owner=own)
    return leaf


def _make_leaf(base: str) -> str:
    """<base>/execbox-leaf, made if missing; not being allowed to is "not delegated"."""
    leaf = f"{base}/{LEAF}"
    try:
        os.mkdir(leaf)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CgroupError(exc.errno or errno.EIO, not_delegated(
            base, f"cannot create {LEAF}: {errno_name(exc.errno)}")) from None
    return leaf
