"""Own one step from spawn to the last reaped descendant: wait, time out, cancel, kill, reap.

Runs in a single-threaded process that is a child subreaper (a fork-server supervisor or
the CLI), so processes that setsid or double-fork still come back to it. It is never part
of the tree it signals, so cancelling a step cannot kill the reaper.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time

from . import tree
from .diagnose import describe, exit_status_for_failure
from .fastspawn import NotExpressible, posix_spawn_plan
from .signals import signal_name
from .spawn import ETXTBSY_ATTEMPTS, StepFailure, failure_from, start_fork
from .spec import CommandSpec

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .plan import Step

_ORPHAN_REAP_INTERVAL = 1.0
_KILL_SWEEP_INTERVAL = 0.05


class Supervision:
    """One step's lifetime. Call start(), then run(); cancel() may be called from readers."""

    def __init__(self, spec: CommandSpec, plan: list[Step]) -> None:
        self.spec = spec
        self.plan = plan
        self.pid: int | None = None
        self.failure: dict[str, str] | None = None
        self.failure_exit = 0
        self.timed_out = False
        self.cancelled = False
        self._readers: dict[int, Callable[[int], None]] = {}
        self._poller = select.poll()
        self._kill_at: float | None = None
        self._started = 0.0
        self._deadline: float | None = None
        self.reaper = tree.Reaper()
        self.cgroup: Any = None
        self.cgroup_leftovers: list[str] = []  # what removing the step cgroup left behind

    # -- setup -------------------------------------------------------------------------
    def start(self) -> int | None:
        """Spawn the child; returns its pid, or None when a setup step failed.

        Readers added before start() (cancel requests, signals) are served while the child
        runs its setup steps, and the timeout already applies, so a hanging setup step can
        still be cancelled. ETXTBSY gets a bounded, backed-off retry (a writer fd leaked by
        other code in the spawning process).
        """
        self._started = time.monotonic()
        if self.spec.timeout is not None:
            self._deadline = self._started + self.spec.timeout
        join = (self.spec.limits or {}).get("join_cgroup")
        if join:  # a run of a long-lived sandbox: inside the sandbox's own cgroup
            self.plan.insert(1, ("cgroup", (list(join),)))
        elif self.spec.limits is not None and not self._make_cgroup():
            return None
        delay = 0.001
        for attempt in range(ETXTBSY_ATTEMPTS):
            try:
                self.pid = self._spawn_once()
                return self.pid
            except StepFailure as exc:
                if exc.errno == errno.ETXTBSY and attempt < ETXTBSY_ATTEMPTS - 1:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                self.pid = None
                self.failure = describe(exc.step, exc.errno, exc.path)
                self.failure_exit = exit_status_for_failure(exc.step, exc.errno)
                return None
        return None

    def _spawn_once(self) -> int:
        try:
            return posix_spawn_plan(self.plan)
        except NotExpressible:
            pass
        pid, report_fd = start_fork(self.plan)
        self.pid = pid  # from here on, cancel and timeout reach the child
        chunks: list[bytes] = []
        done = [False]

        def on_report(fd: int) -> None:
            chunk = os.read(fd, 65536)
            if chunk:
                chunks.append(chunk)
            else:
                done[0] = True

        self.add_reader(report_fd, on_report)
        try:
            while not done[0]:
                now = time.monotonic()
                self._check_clocks(now)
                self._poll(self._next_wait(now))
        finally:
            self.remove_reader(report_fd)
            os.close(report_fd)
        if chunks:
            os.waitpid(pid, 0)
            raise failure_from(b"".join(chunks))
        return pid

    def _make_cgroup(self) -> bool:
        from .cgroups.step import CgroupError, StepCgroup

        limits = self.spec.limits or {}
        try:
            self.cgroup = StepCgroup.create(limits["memory"], limits["pids"], limits["cpus"],
                                            devices=limits.get("devices"),
                                            device_mode=limits.get("device_mode", "auto"),
                                            verify=False)
        except CgroupError as exc:
            if limits.get("optional") and "device" not in str(exc.strerror):
                return True  # a sandbox's extra kill guarantee, where cgroups are writable
            step = "devices" if "device" in str(exc.strerror) else "cgroup"
            self.failure = describe(step, exc.errno or 5, str(exc.strerror or exc))
            self.failure_exit = exit_status_for_failure(step, exc.errno or 5)
            return False
        # The child joins first, so everything it ever forks is inside; it then proves the
        # device policy from there before anything else runs.
        self.plan.insert(1, ("cgroup", (self.cgroup.procs_files(),)))
        if limits.get("devices") is not None:
            self.plan.insert(2, ("verify_devices", (limits["devices"],)))
        return True

    def add_reader(self, fd: int, callback: Callable[[int], None]) -> None:
        self._readers[fd] = callback
        self._poller.register(fd, select.POLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._poller.unregister(fd)

    # -- cancellation --------------------------------------------------------------------
    def cancel(self, hard: bool = False) -> None:
        """Cancel signal to the tree now, SIGKILL after the grace period (at once if hard)."""
        now = time.monotonic()
        if self._kill_at is None:
            self.cancelled = self.cancelled or not self.timed_out
            self._signal_tree(self.spec.cancel_signal)
            self._kill_at = now + self.spec.grace
        if hard:
            self._kill_at = now

    def _signal_tree(self, sig: int) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        tree.signal_all(tree.descendants(), sig)

    def output_stalled(self) -> bool:
        """Called while output cannot be delivered: keep the clocks running; True once the
        tree is being killed (then the undeliverable output may be dropped)."""
        now = time.monotonic()
        self._check_clocks(now)
        return self._kill_at is not None and now >= self._kill_at

    # -- the loop ----------------------------------------------------------------------
    def _poll(self, wait: float | None) -> None:
        timeout_ms = None if wait is None else max(0, int(wait * 1000 + 0.999))
        try:
            events = self._poller.poll(timeout_ms)
        except InterruptedError:
            return
        for fd, _ in events:
            callback = self._readers.get(fd)
            if callback is not None:
                callback(fd)

    def _next_wait(self, now: float) -> float:
        wait = _ORPHAN_REAP_INTERVAL
        if self._deadline is not None and not self.timed_out and self._kill_at is None:
            wait = min(wait, self._deadline - now)
        if self._kill_at is not None:
            wait = min(wait, max(self._kill_at - now, 0.0) if now < self._kill_at
                       else _KILL_SWEEP_INTERVAL)
        return max(wait, 0.0)

    def _check_clocks(self, now: float) -> None:
        if (self._deadline is not None and now >= self._deadline and not self.timed_out
                and self._kill_at is None):
            self.timed_out = True
            self.cancel()
        if self._kill_at is not None and now >= self._kill_at:
            self._signal_tree(signal.SIGKILL)

    def run(self) -> dict[str, Any]:
        """Wait for the step and its whole tree; return the result as a plain dict."""
        if self.pid is None:
            return self._result(None)
        pid = self.pid
        pidfd = os.pidfd_open(pid)
        reaper = self.reaper = tree.Reaper((pid,))

        def on_exit(fd: int) -> None:
            reaper.reap_ready()

        self.add_reader(pidfd, on_exit)
        try:
            next_reap = 0.0
            while pid not in reaper.statuses:
                now = time.monotonic()
                self._check_clocks(now)
                if now >= next_reap:  # orphans reparented to us; the pidfd covers the main one
                    reaper.reap_ready()
                    next_reap = now + _ORPHAN_REAP_INTERVAL
                    continue
                self._poll(min(self._next_wait(now), next_reap - now))
            # The main process is gone; during a cancel the rest get their grace period.
            while self._kill_at is not None and reaper.reap_ready():
                now = time.monotonic()
                if now >= self._kill_at:
                    break
                self._poll(min(self._kill_at - now, 0.01))
            if self.cgroup is not None:  # the cgroup can kill what signals cannot reach
                self.cgroup.kill_all()
            reaper.kill_and_reap_all()
        except BaseException:
            # Whatever failed (an output sink, say), the tree and its cgroup do not outlive us.
            self._signal_tree(signal.SIGKILL)
            reaper.kill_and_reap_all()
            self._finish_cgroup()
            raise
        finally:
            self.remove_reader(pidfd)
            os.close(pidfd)
        return self._result(reaper.statuses[pid])

    def _finish_cgroup(self) -> dict[str, Any]:
        """Final kill through the cgroup, its statistics, and its removal (always)."""
        if self.cgroup is None:
            return {"oom_killed": False, "cgroup_peak_memory": None, "cgroup_cpu_time": None}
        try:
            self.cgroup.kill_all()
            self.reaper.kill_and_reap_all()
            return dict(self.cgroup.stats())
        finally:
            self.cgroup_leftovers = self.cgroup.remove()
            self.cgroup = None

    def _result(self, status: int | None) -> dict[str, Any]:
        cgroup = self._finish_cgroup()
        ended = time.monotonic()
        sig_name: str | None = None
        if status is None:
            exit_code = self.failure_exit
        elif os.WIFSIGNALED(status):
            sig_name = signal_name(os.WTERMSIG(status))
            exit_code = 128 + os.WTERMSIG(status)
        else:
            exit_code = os.waitstatus_to_exitcode(status)
        return {
            "exit_code": exit_code,
            "signal": sig_name,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "failure": self.failure,
            "pid": self.pid,
            "usage": {**usage_dict(self.reaper, ended - self._started, sig_name),
                      "cgroup_cpu_time": cgroup["cgroup_cpu_time"],
                      "cgroup_peak_memory": cgroup["cgroup_peak_memory"]},
            "oom_killed": cgroup["oom_killed"],
            "unkillable": self.reaper.unkillable,
            "cgroup_leftovers": self.cgroup_leftovers,
        }


def usage_dict(reaper: tree.Reaper, wall_time: float,
               termination_signal: str | None) -> dict[str, Any]:
    """Usage of every process of the step, in Buildbarn's POSIXResourceUsage names."""
    t = reaper.totals
    return {
        "user_time": t["ru_utime"],
        "system_time": t["ru_stime"],
        "maximum_resident_set_size": reaper.max_rss_kib * 1024,
        "page_reclaims": int(t["ru_minflt"]),
        "page_faults": int(t["ru_majflt"]),
        "swaps": int(t["ru_nswap"]),
        "block_input_operations": int(t["ru_inblock"]),
        "block_output_operations": int(t["ru_oublock"]),
        "messages_sent": int(t["ru_msgsnd"]),
        "messages_received": int(t["ru_msgrcv"]),
        "signals_received": int(t["ru_nsignals"]),
        "voluntary_context_switches": int(t["ru_nvcsw"]),
        "involuntary_context_switches": int(t["ru_nivcsw"]),
        "termination_signal": termination_signal,
        "wall_time": wall_time,
    }
