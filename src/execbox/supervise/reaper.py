"""Reap every descendant of this process (a child subreaper), or only a step's own (scoped),
keep their summed usage, and kill what is left until nothing is."""

from __future__ import annotations

import os
import signal
import time

from ..model.result import Usage
from .proctree import below, descendants, own_children, signal_all

UNKILLABLE_WAIT = 10.0
_SUMMED = ("ru_utime", "ru_stime", "ru_minflt", "ru_majflt", "ru_nswap", "ru_inblock",
           "ru_oublock", "ru_msgsnd", "ru_msgrcv", "ru_nsignals", "ru_nvcsw", "ru_nivcsw")


class Reaper:
    """Reaps children with wait4, keeping the statuses of watched pids and the summed usage
    of everything reaped (so one long-lived supervisor can account for each step apart).

    spared: children that are not the step's (a pid 1 made ahead for a later step): never
    signalled, not waited for, and if one dies meanwhile, noted in spared_reaped (its pid
    may then be reused: its owner must not signal it) and not counted as the step's.

    scope: where one process supervises several steps at once (each alone in a pid
    namespace, so nothing of it is orphaned to us), the step's own children, unreaped:
    only they and what is below them are waited for and killed, never another step's.
    Their owner adds each as it forks it; the reaper drops each it reaps (its pid may then
    name another step's process).

    unsized: children whose memory is ours (a native pid 1, a clone sharing this process's
    memory: its maximum resident size is this process's high-water mark, not the step's);
    their times are counted, their size is not."""

    def __init__(self, watched: tuple[int, ...] = (),
                 spared: frozenset[int] = frozenset(),
                 scope: set[int] | None = None,
                 unsized: frozenset[int] = frozenset()) -> None:
        self.scope = scope
        self.unsized = unsized
        self.statuses: dict[int, int] = {}
        self.watched = set(watched)
        self.spared = spared
        self.spared_reaped: set[int] = set()
        self.totals: dict[str, float] = dict.fromkeys(_SUMMED, 0)
        self.max_rss_kib = 0
        self.unkillable: list[int] = []

    @property
    def sparing(self) -> frozenset[int]:
        """The spared children still alive (a reaped one's pid may name another by now)."""
        return self.spared - self.spared_reaped

    def _account(self, pid: int, status: int, usage: object) -> None:
        if pid in self.sparing:
            self.spared_reaped.add(pid)
            return
        if pid in self.watched:
            self.statuses[pid] = status
        for name in _SUMMED:
            self.totals[name] += getattr(usage, name)
        if pid not in self.unsized:
            self.max_rss_kib = max(self.max_rss_kib, getattr(usage, "ru_maxrss", 0))

    def reap_ready(self) -> bool:
        """Reap every exited child without blocking; False once no children exist at all
        (spared ones aside)."""
        if self.scope is not None:
            return self._reap_scope(self.scope)
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            except InterruptedError:
                continue
            if pid == 0:
                return not self.sparing or bool(set(own_children()) - self.sparing)
            self._account(pid, status, usage)

    def _reap_scope(self, scope: set[int]) -> bool:
        left = False
        for pid in sorted(scope):
            try:
                done, status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # (never: its owner drops what it reaps itself)
                scope.discard(pid)
                continue
            except InterruptedError:
                left = True
                continue
            if done:
                scope.discard(pid)
                self._account(pid, status, usage)
            else:
                left = True
        return left

    def tree(self) -> list[int]:
        """Every process of the step's tree (spared ones aside), to be signalled."""
        if self.scope is None:
            return descendants(skip=self.sparing)
        roots = sorted(self.scope)
        return [*roots, *below(roots, self.sparing)]

    def kill_and_reap_all(self) -> None:
        """SIGKILL the whole tree until nothing is left, then reap every zombie.

        Processes forked while we sweep are caught by the next sweep; orphans of killed
        processes reparent to us (the subreaper) and are reaped here.
        """
        delay = 0.0005
        fewest: int | None = None
        progress_at = time.monotonic()
        seen: set[int] = set()
        last_alive: list[int] = []
        while self.reap_ready():
            alive = self.tree()
            signal_all(alive, signal.SIGKILL)
            self._kill_groups(alive)
            if alive:
                last_alive = alive
            if fewest is None or len(alive) < fewest:
                fewest, progress_at = len(alive), time.monotonic()
            elif time.monotonic() - progress_at > UNKILLABLE_WAIT:
                # Nothing has died for a while: processes we may not signal (setuid), stuck
                # in uninterruptible sleep, or hidden from us, or a chain of forks that
                # outruns the walk. Report them rather than spin.
                self.unkillable = sorted(alive or last_alive)
                return
            time.sleep(delay)
            # While new processes appear (forks racing the walk), walk again at once.
            delay = 0.0005 if set(alive) - seen else min(delay * 2, 0.05)
            seen.update(alive)

    def _kill_groups(self, alive: list[int]) -> None:
        """SIGKILL the process groups of the tree's processes: a kill of a group reaches
        every member atomically, a fork racing it included (the kernel retries such a
        fork), which one kill per pid does not. Never this process's own group, nor a
        spared process's."""
        if not alive:  # (the usual end of a step: nothing left to look up)
            return
        ours = {os.getpgid(0)}
        for pid in self.sparing:
            try:
                ours.add(os.getpgid(pid))
            except OSError:
                pass
        groups = set()
        for pid in alive:
            try:
                groups.add(os.getpgid(pid))
            except OSError:
                continue
        for group in groups - ours:
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass

    def usage(self, wall_time: float, signal_name: str | None,
              cgroup_cpu_time: float | None = None,
              cgroup_peak_memory: int | None = None) -> Usage:
        """Everything reaped so far, in Buildbarn's POSIXResourceUsage names (its
        termination_signal has no "SIG")."""
        t = self.totals
        return Usage(
            user_time=t["ru_utime"], system_time=t["ru_stime"],
            maximum_resident_set_size=self.max_rss_kib * 1024,
            page_reclaims=int(t["ru_minflt"]), page_faults=int(t["ru_majflt"]),
            swaps=int(t["ru_nswap"]), block_input_operations=int(t["ru_inblock"]),
            block_output_operations=int(t["ru_oublock"]), messages_sent=int(t["ru_msgsnd"]),
            messages_received=int(t["ru_msgrcv"]), signals_received=int(t["ru_nsignals"]),
            voluntary_context_switches=int(t["ru_nvcsw"]),
            involuntary_context_switches=int(t["ru_nivcsw"]),
            termination_signal=None if signal_name is None else signal_name.removeprefix("SIG"),
            wall_time=wall_time, cgroup_cpu_time=cgroup_cpu_time,
            cgroup_peak_memory=cgroup_peak_memory)
