"""Find, signal and reap every descendant of this process (which is a child subreaper)."""

from __future__ import annotations

import os
import time


def _parent_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may hold spaces or parentheses: the fields after the last ')' are fixed.
    fields = data[data.rfind(b")") + 2:].split(b" ", 2)
    return int(fields[1])


def descendants(root: int | None = None) -> list[int]:
    """All live (or zombie) processes below root, found by ppid links in /proc."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        ppid = _parent_of(entry)
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    queue = list(children.get(root, ()))
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue


def reap_ready(on_exit: dict[int, int] | None = None) -> bool:
    """Reap every exited child without blocking; False once no children exist at all.

    Exit statuses of pids present in on_exit are stored there.
    """
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        except InterruptedError:
            continue
        if pid == 0:
            return True
        if on_exit is not None and pid in on_exit:
            on_exit[pid] = status


def kill_and_reap_all(on_exit: dict[int, int] | None = None) -> None:
    """SIGKILL the whole tree until nothing is left, then reap every zombie.

    Processes forked while we sweep are caught by the next sweep; orphans of killed
    processes reparent to us (the subreaper) and are reaped here.
    """
    import signal

    delay = 0.0005
    while reap_ready(on_exit):
        signal_all(descendants(), signal.SIGKILL)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
