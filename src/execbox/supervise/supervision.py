"""Own one step from spawn to the last reaped descendant: wait, time out, cancel, kill, reap.

Runs in a process that is a child subreaper (a fork-server supervisor or the CLI's
supervisor), so processes that setsid or double-fork still come back to it; or, scoped, on
a thread of a shared supervisor, for a step whose every process stays in its own pid
namespace below a native pid 1 (server/shared.py). It
is never part of the tree it signals, so cancelling a step cannot kill the reaper (the
BuildKit runc-exec fix, moby/buildkit "fix process termination handling for runc exec").
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import time

from ..model.result import Failure, Result
from ..model.signals import signal_name
from ..report.diagnose import describe, exit_status_for_failure
from ..spawn.failure import ETXTBSY_ATTEMPTS, StepFailure, failure_from
from ..spawn.posix import NotExpressible, posix_spawn_plan
from . import proctree
from .reaper import Reaper

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..cgroups.step import StepCgroup
    from ..model.spec import CommandSpec
    from ..plan.build import Plan
    from ..spawn.ready import ReadyInit

_ORPHAN_REAP_INTERVAL = 1.0
_KILL_SWEEP_INTERVAL = 0.05
# How long a job waits for a ready pid 1 still being made (a launch without it costs more).
_READY_WAIT = 1.0


class Supervision:
    """One step's lifetime. Call start(), then run(); cancel() may be called from readers.

    With defer_teardown, a sandbox's mount namespace is kept open from its start until
    release(), called once the Result is delivered (no process is left in it by then):
    freeing a mount tree waits for an RCU grace period, no longer part of the caller's wait.

    With scoped, this process may supervise other steps at the same time, from other
    threads (a native pid 1's sandboxes, server/shared.py): only the processes this one
    forks, and what is below them, are waited for, signalled and killed (see Reaper)."""

    def __init__(self, spec: CommandSpec, plan: Plan, ready: ReadyInit | None = None,
                 defer_teardown: bool = False, spared: frozenset[int] = frozenset(),
                 scoped: bool = False) -> None:
        self.spec = spec
        self._scope: set[int] | None = set() if scoped else None
        self._spared = spared  # our children that are not the step's (see Reaper)
        self._defer_teardown = defer_teardown
        self._kept_namespaces: list[int] = []
        self.plan = plan
        self.ready = ready  # a ready pid 1 the plan may adopt (spawn/ready.py)
        self._skipped_namespaces: tuple[Any, ...] | None = None
        self.pid: int | None = None
        self.failure: Failure | None = None
        self.failure_exit = 0
        self.timed_out = False
        self.cancelled = False
        self._readers: dict[int, Callable[[int], None]] = {}
        self._poller = select.poll()
        self._kill_at: float | None = None
        self._started = 0.0
        self._started_at = 0.0
        self._deadline: float | None = None
        self.reaper = Reaper(spared=spared, scope=self._scope)
        self.cgroup: StepCgroup | None = None
        self._child_extra: dict[str, Any] = {}
        self._as_init = False  # the child is pid 1 of a new pid namespace (spawn/ahead.py)
        self._init = 0  # or the child is beside this native pid 1 (linux/native_init.py)
        self._namespaces: tuple[Any, ...] = (None, [], False, False)  # sandbox_namespaces
        self._status_fd = -1  # where that pid 1 reports the step's own wait status
        self._cgroup_survivors: set[int] | None = None  # the final cgroup kill's, once run
        self._cgroup_final: dict[str, Any] | None = None  # its statistics, read once empty
        self._verifying: tuple[Any, ...] | None = None  # a device policy the child proves
        self._ready_named = False  # the cgroup still has its ready pid 1's name

    # -- setup -------------------------------------------------------------------------
    def start(self) -> int | None:
        """Run the parent-side steps, spawn the child; its pid, or None if a step failed.

        Readers added before start() (cancel requests, signals) are served while the child
        runs its setup steps, and the timeout already applies, so a hanging setup step can
        still be cancelled. ETXTBSY gets a bounded, backed-off retry (a writer fd leaked by
        other code in the spawning process; golang/go#22315).
        """
        self._started = time.monotonic()
        self._started_at = time.time()
        if self.spec.timeout is not None:
            self._deadline = self._started + self.spec.timeout
        adopt = self._adoptable()
        for name, args in self.plan.parent:
            if adopt is not None and name == "sandbox_namespaces":
                self._skipped_namespaces = args  # the ready pid 1 has them
                continue
            if adopt is not None and name == "create_cgroup":
                self._take_cgroup(adopt[0])  # made ahead, pid 1 in it, policy proven
                continue
            if not _PARENT_STEPS[name](self, *args):
                if adopt is not None:
                    adopt[0].discard()
                return None
        delay = 0.001
        for attempt in range(ETXTBSY_ATTEMPTS):
            try:
                if adopt is not None:
                    ready, rest = adopt
                    adopt = None
                    pid = self._adopt(ready, rest)
                    if pid is None:
                        return None
                    self.pid = pid
                else:
                    self.pid = self._spawn_fresh()
                if self._verifying is not None and self.pid is not None:  # proven
                    from ..cgroups.devices import remember_proven

                    remember_proven(self._verifying)
                if self._defer_teardown and self._as_init and self.pid is not None:
                    self._keep_namespace(self.pid, "mnt")  # pid 1's, now set up
                return self.pid
            except StepFailure as exc:
                if exc.errno == errno.ETXTBSY and attempt < ETXTBSY_ATTEMPTS - 1:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                self.pid = None
                self._fail(exc.step, exc.errno, exc.path, exc.hint)
                return None
        return None

    def _fail(self, step: str, code: int, detail: str, hint: str | None = None) -> None:
        sandboxed = self.spec.sandbox is not None or self.spec.sandbox_role != "new"
        box = self.spec.sandbox
        if hint is None and step == "execve" and sandboxed:
            # The host's file of that name is not the step's: never look at it.
            hint = f"{detail} was open for writing" if code == errno.ETXTBSY else ""
        if hint is None and step == "chdir" and sandboxed and code == errno.ENOENT:
            hint = f"there is no {detail} inside the sandbox"
            if box is not None and box.bind_workdir and not os.path.lexists(detail):
                hint = f"the working directory {detail} does not exist"  # (on the host)
            elif box is not None and box.bind_workdir and os.path.isdir(detail):
                hint += (": the host's directory is bound there, then hidden by a mount "
                         "over one of its parents (a bind or --tmpfs)")
        self.failure = describe(step, code, detail, hint)
        self.failure_exit = exit_status_for_failure(step, code)

    def _adoptable(self) -> tuple[ReadyInit, list[Any]] | None:
        """The ready pid 1 and the rest of this plan for it, if it was made for a plan with
        the same steps ahead; else it is discarded."""
        ready, self.ready = self.ready, None
        if ready is None:
            return None
        from ..spawn.ready import cgroup_args_of, namespaces_of, split_plan

        parts, namespaces = split_plan(self.plan), namespaces_of(self.plan)
        wait = _READY_WAIT  # for a ready pid 1 still being made, within the step's timeout
        if self._deadline is not None:
            wait = max(0.0, min(wait, self._deadline - time.monotonic()))
        if (parts is None or namespaces is None or parts[0] != ready.ahead
                or (namespaces[0], namespaces[2]) != ready.userns
                or cgroup_args_of(self.plan) != ready.cgroup_args or ready.expires_in() <= 0
                or not ready.usable()
                or not ready.wait_built(wait, interrupt=self._readers)
                or not ready.alone() or not ready.policy_holds()
                or not ready.sees(parts[1])):
            ready.discard()
            return None
        return ready, parts[1]

    def _take_cgroup(self, ready: ReadyInit) -> None:
        """The ready pid 1's cgroup becomes the step's. It gets a step cgroup's name once
        the step has started (run()): renaming each hierarchy's directory is not part of
        the launch's wait."""
        self.cgroup, ready.cgroup = ready.cgroup, None
        if self.cgroup is not None:
            self._ready_named = True
            self._child_extra["cgroup_procs"] = self.cgroup.procs_files()  # for a retry

    def _adopt(self, ready: ReadyInit, rest: list[Any]) -> int | None:
        """Hand the ready pid 1 (in the step's cgroup already) the rest of the plan, with
        the job's fds and idmapped binds' user namespaces; then wait for its exec."""
        from ..spawn import ahead
        from ..spawn.ready import namespaces_of

        namespaces = namespaces_of(self.plan)
        assert namespaces is not None  # checked by _adoptable
        try:
            extra = ahead.identity_extras(namespaces[0], namespaces[1])
        except StepFailure as exc:
            ready.discard()
            self._fail(exc.step, exc.errno, exc.path)
            return None
        idmaps = {k: v for k, v in extra.items() if k.startswith("idmap ")}
        fds = sorted({*idmaps.values(), *(source for name, args in rest if name == "dup2"
                                          for source, _ in args[0])})
        self._as_init = True
        self._status_fd = ready.status_fd
        from ..spawn.launcher_program import Unexpressible

        try:
            ready.hand_over(rest, idmaps, fds, self.plan.memo)
        except (OSError, Unexpressible):  # too big a message (a huge environment), or a
            self._status_fd = -1  # plan the step launcher cannot carry out: launch the
            ready.discard()  # usual way
            return self._spawn_fresh()
        self._init = ready.init
        self.pid = ready.pid
        self._own(ready.pids())
        try:
            return self._await_exec(ready.pid, ready.report_fd)
        except StepFailure as exc:
            if not ready.launcher or exc.step != "execve" or exc.errno == errno.ETXTBSY:
                raise
            return self._explain_exec(exc)

    def _explain_exec(self, failure: StepFailure) -> int | None:
        """The step launcher's execve failed: the Python steps stand where it stood and
        fail the same way, to say why in the step's own view (child/exec_hint.py). They
        never run the step (explain_exec takes execve's place)."""
        from ..plan.build import Plan

        child = [("explain_exec", (failure.errno, failure.path)) if name == "execve"
                 else (name, args) for name, args in self.plan.child]
        self.plan = Plan(self.plan.parent, child)
        return self._spawn_fresh()

    def _spawn_fresh(self) -> int | None:
        """_spawn_once, after the namespaces a ready pid 1 would have brought."""
        if self._skipped_namespaces is not None:
            skipped, self._skipped_namespaces = self._skipped_namespaces, None
            if not self._sandbox_namespaces(*skipped):
                return None
        return self._spawn_once()

    def _spawn_once(self) -> int:
        try:
            return posix_spawn_plan(self.plan.child)
        except NotExpressible:
            pass
        from ..spawn.fork import start_fork  # the steps' registry: only the fork path needs it

        if self._as_init:
            pid, report_fd = self._fork_as_init(start_fork)
        else:
            pid, report_fd = start_fork(self.plan.child, self._child_extra)
        self._own((pid, self._init) if self._init else (pid,))
        return self._await_exec(pid, report_fd)

    def _own(self, pids: tuple[int, ...]) -> None:
        """Our children that make up the step (scoped: nothing else is ours to touch)."""
        if self._scope is not None:
            self._scope.update(pids)

    def _await_exec(self, pid: int, report_fd: int) -> int:
        """Serve readers and clocks until the child execs (its report pipe reaches EOF) or
        reports the step that failed."""
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
            self._end_init()
            if self._scope is not None:
                self._scope.clear()  # both reaped: their pids may name others' now
            raise failure_from(b"".join(chunks))
        if (self._as_init and not self._init and self._kill_at is not None
                and time.monotonic() < self._kill_at):
            # Cancelled (or timed out) while pid 1 was being set up: a namespace's init
            # drops a signal it has no handler for yet (blocked, it is dropped when
            # unblocked), so say it again now that its handlers forward it to the step.
            self._send_cancel_signal()
        return pid

    def _fork_as_init(self, start_fork: Callable[..., tuple[int, int]]) -> tuple[int, int]:
        """start_fork with the child as pid 1 of a new pid namespace, in a user and a network
        namespace made for it alone; it reports the step's wait status on a pipe (it cannot
        die of a signal itself)."""
        from ..spawn import ahead

        if self._status_fd >= 0:  # an earlier attempt's (ETXTBSY retry)
            os.close(self._status_fd)
            self._status_fd = -1
        userns, idmaps, network, native = self._namespaces
        fresh = ahead.launch_extras(userns, idmaps, network)  # each attempt its own
        status_w = -1
        if not native:
            self._status_fd, status_w = os.pipe()
        self._child_extra.update(fresh, status_fd=status_w)
        try:
            if native:
                self._init, forked = ahead.fork_beside_init(
                    lambda: start_fork(self.plan.child, self._child_extra))
                return forked
            return ahead.fork_as_init(lambda: start_fork(self.plan.child, self._child_extra))
        finally:
            if status_w >= 0:
                os.close(status_w)
            ahead.close_launch_extras(fresh)  # the child has its own copies
            for key in fresh:
                self._child_extra.pop(key, None)

    def _sandbox_namespaces(self, userns: list[int] | None, idmaps: list[list[int]],
                            network: bool, native: bool) -> bool:
        """Parent step of a root caller's sandbox: the step's ids and the idmapped binds'
        user namespaces (kept per mapping); pid 1 is forked straight from here, in
        namespaces made for it (_fork_as_init), or (native) cloned, and the step forked
        beside it."""
        from ..spawn import ahead

        try:
            self._child_extra.update(ahead.identity_extras(userns, idmaps))
        except StepFailure as exc:
            self._fail(exc.step, exc.errno, exc.path)
            return False
        self._namespaces = (userns, idmaps, network, native)
        self._as_init = True
        return True

    def _create_cgroup(self, limits: dict[str, Any]) -> bool:
        """Parent step: the step's own cgroup, limits and device rules programmed; the
        child's "cgroup" step joins it and "verify_devices" proves the rules in force."""
        from ..cgroups.step import CgroupError, StepCgroup

        try:
            self.cgroup = StepCgroup.create(limits["memory"], limits["pids"], limits["cpus"],
                                            devices=limits["devices"],
                                            device_mode=limits["device_mode"], verify=False)
        except CgroupError as exc:
            about_devices = "device" in str(exc.strerror)
            if limits["optional"] and not about_devices:
                # A sandbox's extra kill guarantee, where cgroups are writable.
                self.plan.child = [s for s in self.plan.child if s[0] != "cgroup"]
                self.plan.memo = None  # (no longer the kept plan's)
                return True
            self._fail("devices" if about_devices else "cgroup", exc.errno or errno.EIO,
                       str(exc.strerror or exc))
            return False
        self._child_extra["cgroup_procs"] = self.cgroup.procs_files()
        if limits["devices"] is not None:
            from ..cgroups.devices import policy_key, proven

            key = policy_key(limits["devices"], *self.cgroup.dirs["devices"])
            if proven(key):
                # Proven from inside a cgroup programmed the same way below a parent in
                # the same state: the policy in force cannot differ.
                self.plan.child = [s for s in self.plan.child if s[0] != "verify_devices"]
                self.plan.memo = None  # (no longer the kept plan's)
            else:
                self._verifying = key
            from .. import child

            child.lookup("verify_devices")  # imported here, not in the forked child
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
            self._send_cancel_signal()
            self._kill_at = now + self.spec.grace
        if hard:
            self._kill_at = now

    def _send_cancel_signal(self) -> None:
        """The cancel signal, then SIGCONT as timeout(1) and systemd send it: a stopped
        process handles the signal now instead of being SIGKILLed after the grace period."""
        self._signal_tree(self.spec.cancel_signal)
        if self.spec.cancel_signal not in (signal.SIGKILL, signal.SIGCONT):
            self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, sig: int) -> None:
        if self.pid is not None and self.pid not in self.reaper.statuses:  # (reaped: its
            # number may name another step's process group by now)
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        proctree.signal_all(self.reaper.tree(), sig)

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

    def run(self) -> Result:
        """Wait for the step and its whole tree; return its Result."""
        if self.pid is None:
            return self._result(None)
        if self._ready_named and self.cgroup is not None:
            from ..cgroups.stale import new_name

            self._ready_named = False
            self.cgroup.rename(new_name())
        pid = self.pid
        pidfd = os.pidfd_open(pid)
        watched = (pid, self._init) if self._init else (pid,)
        reaper = self.reaper = Reaper(watched, self._spared - self.reaper.spared_reaped,
                                      self._scope, frozenset(watched[1:]))

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
            while (self._kill_at is not None and reaper.reap_ready()
                   and not self._only_init_left()):
                now = time.monotonic()
                if now >= self._kill_at:
                    break
                self._poll(min(self._kill_at - now, 0.01))
            # As a pid 1 exits with its step, the rest go now; then the cgroup, which can
            # kill what signals cannot reach (nothing is left to kill once pid 1 is gone).
            emptied = self._end_init(wait=False)
            if self.cgroup is not None and not (emptied and self._cgroup_gone()):
                self._cgroup_survivors = self.cgroup.kill_all()
            reaper.kill_and_reap_all()
        except BaseException:
            # Whatever failed (an output sink, say), the tree and its cgroup do not outlive us.
            self.kill_everything()
            raise
        finally:
            self.remove_reader(pidfd)
            os.close(pidfd)
        return self._result(self._step_status(reaper.statuses[pid]))

    def _only_init_left(self) -> bool:
        """Whether a native pid 1 is all that is left of the step's tree (it reaps, but
        never exits by itself)."""
        if not self._init:
            return False
        try:
            ours = (set(proctree.own_children()) - self.reaper.sparing
                    if self._scope is None else self._scope)
            return ours == {self._init} and not proctree.own_children(self._init)
        except OSError:
            return False

    def _end_init(self, wait: bool = True) -> bool:
        """SIGKILL a native pid 1, which ends everything in its namespace. wait: reap it
        too (only once the process beside it is reaped: pid 1 cannot finish exiting
        before every process of its namespace is); else wait at most a moment for its
        exit, which the reaper then takes. True if there was one and it is gone: then so
        is every process of its namespace (the kernel's pid 1 exit waits for them)."""
        init, self._init = self._init, 0
        if not init:
            return False
        if init in self.reaper.statuses:  # (reaped: the pid may be another's by now)
            return True
        from ..spawn.ahead import end_init

        if wait:
            end_init(init)
            return True
        try:
            pidfd = os.pidfd_open(init)
        except ProcessLookupError:
            return False
        try:
            os.kill(init, signal.SIGKILL)
            gone = select.poll()
            gone.register(pidfd, select.POLLIN)
            return bool(gone.poll(100))
        finally:
            os.close(pidfd)

    def _cgroup_gone(self) -> bool:
        """For a step whose pid namespace has ended: its cgroup's final statistics, then
        its directories removed, with no kill walk first (rmdir refuses a cgroup that
        still holds a process or a child cgroup, so a removal proves it empty). False if
        some directory stays (a process put there from outside): the usual kill and
        removal then take it, and the statistics are read again after that kill."""
        assert self.cgroup is not None
        self._cgroup_final = self.cgroup.stats()
        if not self.cgroup.remove_empty():
            return False
        self.cgroup = None
        return True

    def _keep_namespace(self, pid: int, kind: str) -> None:
        try:  # pid is our unreaped child: the path cannot name another process
            self._kept_namespaces.append(os.open(f"/proc/{pid}/ns/{kind}",
                                                 os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            pass  # already gone: it was torn down on the way, as without deferral

    def spared_reaped(self) -> frozenset[int]:
        """Spared children that died during this step and were reaped here."""
        return self._spared - self.reaper.sparing

    def release(self) -> None:
        """Let the kernel free what start() kept (see the class docstring)."""
        while self._kept_namespaces:
            os.close(self._kept_namespaces.pop())

    def _step_status(self, status: int) -> int:
        """The step's own wait status where its pid 1 (our child) reported it."""
        if self._status_fd < 0:
            return status
        try:
            reported = os.read(self._status_fd, 4)
        finally:
            os.close(self._status_fd)
            self._status_fd = -1
        return int.from_bytes(reported, sys.byteorder, signed=True) if len(reported) == 4 \
            else status

    def kill_everything(self) -> None:
        """SIGKILL the whole tree (and its cgroup) now and reap it; for emergencies."""
        self._signal_tree(signal.SIGKILL)
        self.reaper.kill_and_reap_all()
        self._finish_cgroup()

    def _finish_cgroup(self) -> tuple[dict[str, Any], list[str]]:
        """Final kill through the cgroup, its statistics, and its removal (always)."""
        final = self._cgroup_final
        if self.cgroup is None:
            return dict(final or {}), []
        problems: list[str] = []
        survivors = self._cgroup_survivors
        try:
            if survivors is None:
                survivors = self.cgroup.kill_all()
                self.reaper.kill_and_reap_all()
            stats = self.cgroup.stats()
            if final is not None:  # read before a removal that went only part of the way:
                for key, value in final.items():  # what went with a directory since
                    if stats.get(key) is None:
                        stats[key] = value
                stats["oom_killed"] = bool(stats.get("oom_killed") or final.get("oom_killed"))
            return dict(stats), problems
        finally:
            left = self.cgroup.remove(survivors)
            if left:
                problems.extend(left)
            self.cgroup = None

    def _result(self, status: int | None) -> Result:
        if self._status_fd >= 0:  # the step never ran
            os.close(self._status_fd)
            self._status_fd = -1
        cgroup, problems = self._finish_cgroup()
        ended = time.monotonic()
        number: int | None = None
        if status is None:
            exit_code = self.failure_exit
        elif os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            exit_code = 128 + number
        else:
            exit_code = os.waitstatus_to_exitcode(status)
        name = None if number is None else signal_name(number)
        if self.reaper.unkillable:
            problems.append("processes survived every kill: "
                            + ", ".join(map(str, self.reaper.unkillable)))
        return Result(
            exit_code=exit_code, signal=name, signal_number=number,
            timed_out=self.timed_out, cancelled=self.cancelled, failure=self.failure,
            pid=self.pid, started_at=self._started_at,
            ended_at=self._started_at + (ended - self._started),
            usage=self.reaper.usage(ended - self._started, name,
                                    cgroup.get("cgroup_cpu_time"),
                                    cgroup.get("cgroup_peak_memory")),
            oom_killed=bool(cgroup.get("oom_killed")), unkillable=self.reaper.unkillable,
            cleanup_errors=problems)


def _create_cgroup(supervision: Supervision, limits: dict[str, Any]) -> bool:
    return supervision._create_cgroup(limits)


# Parent-side steps by name: each returns False when it failed (and set the failure).
def _sandbox_namespaces(supervision: Supervision, *args: Any) -> bool:
    return supervision._sandbox_namespaces(*args)


_PARENT_STEPS: dict[str, Callable[..., bool]] = {"create_cgroup": _create_cgroup,
                                                 "sandbox_namespaces": _sandbox_namespaces}
