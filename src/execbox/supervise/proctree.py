"""The one process-tree scanner: every /proc walk execbox makes (descendants to signal,
marked processes, sessions holding a terminal, writers of a file) goes through here."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator


def _pids() -> Iterator[str]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield entry


def command_of(pid: int | str) -> str:
    """The command line of pid, space-joined ("?" when it is gone or has none)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return " ".join(os.fsdecode(a) for a in raw.split(b"\0") if a) or "?"


def comm_of(pid: int | str) -> str:
    """The command name of pid ("" when it is gone)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode(errors="replace")  # any bytes a process set
    except OSError:
        return ""


def parent_of(pid: int | str) -> int | None:
    """The parent pid of pid (None when it is gone)."""
    return _parent_of(str(pid))


def stat_fields(pid: str) -> list[bytes] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, tty_nr, ...
    (comm may hold spaces or parentheses, so split after its last ')')."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def _parent_of(pid: str) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def processes_with(marker: str) -> list[int]:
    """Pids (other than ours) whose argv contains marker; zombies have no argv."""
    found = []
    needle = marker.encode()
    for entry in _pids():
        if int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def children(parent: int | None = None) -> list[int]:
    """The direct children of parent (default: this process)."""
    parent = os.getpid() if parent is None else parent
    return [int(entry) for entry in _pids() if _parent_of(entry) == parent]


def own_children(pid: int | None = None) -> list[int]:
    """The direct children (zombies included) of this process, or of pid, from
    /proc/PID/task/*/children when the kernel has it (no walk of every process), else as
    children() finds them."""
    where = "self" if pid is None else str(pid)
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{where}/task"):
            with open(f"/proc/{where}/task/{task}/children", "rb") as f:
                found += [int(child) for child in f.read().split()]
    except FileNotFoundError:  # CONFIG_PROC_CHILDREN is off, or pid is gone
        return children(pid)
    return found


def descendants(root: int | None = None, skip: frozenset[int] = frozenset()) -> list[int]:
    """All live (or zombie) processes below root, found by ppid links in /proc; those in
    skip and everything below them are left out."""
    return below((os.getpid() if root is None else root,), skip)


def below(roots: Iterable[int], skip: frozenset[int] = frozenset()) -> list[int]:
    """descendants() of several roots, from one walk of /proc."""
    children: dict[int, list[int]] = {}
    for entry in _pids():
        ppid = _parent_of(entry)
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    queue = [pid for root in roots for pid in children.get(root, ()) if pid not in skip]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(child for child in children.get(pid, ()) if child not in skip)
    return found


def signal_all(pids: list[int], sig: int) -> set[int]:
    """Signal each pid; returns the ones we may not signal (e.g. a setuid program)."""
    refused = set()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        except PermissionError:
            refused.add(pid)
    return refused


def sessions_on_terminal(rdev: int) -> list[tuple[int, str]]:
    """(session leader pid, command) of sessions whose controlling terminal is rdev."""
    leaders = []
    for entry in _pids():
        fields = stat_fields(entry)
        if fields is None:
            continue
        session, tty_nr = int(fields[3]), int(fields[4])
        if tty_nr == rdev and session == int(entry):
            leaders.append((session, command_of(entry)))
    return leaders


def writers_of(path: str) -> list[tuple[int, str]]:
    """(pid, command) of every process holding path open for writing."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    holders: list[tuple[int, str]] = []
    for entry in _pids():
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
                if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
                    continue
                with open(f"/proc/{entry}/fdinfo/{fd}") as info:
                    flags = next(int(line.split()[1], 8) for line in info
                                 if line.startswith("flags:"))
            except (OSError, StopIteration, ValueError):
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                holders.append((int(entry), command_of(entry)))
                break
    return holders
