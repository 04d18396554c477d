"""Find, signal and reap every descendant of this process (which is a child subreaper)."""

from __future__ import annotations

import os
import time


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
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


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


UNKILLABLE_WAIT = 10.0
_SUMMED = ("ru_utime", "ru_stime", "ru_minflt", "ru_majflt", "ru_nswap", "ru_inblock",
           "ru_oublock", "ru_msgsnd", "ru_msgrcv", "ru_nsignals", "ru_nvcsw", "ru_nivcsw")


class Reaper:
    """Reaps children with wait4, keeping the statuses of watched pids and the summed usage
    of everything reaped (so one long-lived supervisor can account for each step apart)."""

    def __init__(self, watched: tuple[int, ...] = ()) -> None:
        self.statuses: dict[int, int] = {}
        self.watched = set(watched)
        self.totals: dict[str, float] = dict.fromkeys(_SUMMED, 0)
        self.max_rss_kib = 0
        self.unkillable: list[int] = []

    def _account(self, pid: int, status: int, usage: object) -> None:
        if pid in self.watched:
            self.statuses[pid] = status
        for name in _SUMMED:
            self.totals[name] += getattr(usage, name)
        self.max_rss_kib = max(self.max_rss_kib, getattr(usage, "ru_maxrss", 0))

    def reap_ready(self) -> bool:
        """Reap every exited child without blocking; False once no children exist at all."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            except InterruptedError:
                continue
            if pid == 0:
                return True
            self._account(pid, status, usage)

    def kill_and_reap_all(self) -> None:
        """SIGKILL the whole tree until nothing is left, then reap every zombie.

        Processes forked while we sweep are caught by the next sweep; orphans of killed
        processes reparent to us (the subreaper) and are reaped here.
        """
        delay = 0.0005
        fewest: int | None = None
        progress_at = time.monotonic()
        while self.reap_ready():
            alive = descendants()
            signal_all(alive, 9)
            if fewest is None or len(alive) < fewest:
                fewest, progress_at = len(alive), time.monotonic()
            elif time.monotonic() - progress_at > UNKILLABLE_WAIT:
                # Nothing has died for a while: processes we may not signal (setuid), stuck
                # in uninterruptible sleep, or hidden from us. Report them rather than spin.
                self.unkillable = sorted(alive)
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
