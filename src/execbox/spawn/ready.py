"""A root caller's sandbox pid 1, forked ahead by an idle supervisor for the profile of its
last sandboxed job (a zygote of one step).

Everything a step's plan does that depends on neither the job's fds nor its working
directory is done before the job exists: pid 1 is forked into its new pid namespace, joins
a step cgroup made for it (named execbox.ready-..., see cgroups/stale.py) and proves its
device policy from there (unless one programmed the same way below a parent in the same
state proved it: cgroups/devices.py), unshares its other namespaces, enters a network
namespace of its own and builds the base of the new root (scratch root, read-only host
binds, /proc, /sys, /dev, /tmp). It then waits on a socket. When a job's plan has the same
such steps (and the same limits), the supervisor renames the cgroup to a step cgroup's
name and sends pid 1 the rest of the plan and the job's fds; otherwise pid 1 is killed,
its cgroup removed, and the job launches the usual way. Every ready pid 1 serves one step:
nothing of a step is ever reused by another.

Where the last job of the profile had a rest of the plan the step launcher can carry out
(linux/launcher.py, spawn/launcher_program.py), the process beside a native pid 1 execs
into the launcher once the work ahead is done, and gets the rest as a program of syscalls.

Forked while the supervisor is idle, it holds none of a caller's fds (so it cannot keep a
file being written open: ETXTBSY) and closes the supervisor's own at once.
"""

from __future__ import annotations

import errno
import marshal
import os
import select
import signal
import socket
import time

from ..child.mounts import OLDROOT
from ..linux import syscalls as sc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from ..cgroups.step import StepCgroup
    from ..plan.build import Plan, Step

# Child steps that can run before the job is known, once their arguments are the same.
_AHEAD = frozenset({"reset_signals", "setsid", "as_init", "setpgid", "unshare_namespaces",
                    "join_netns", "prepare_base", "new_root", "bind", "symlink", "mount_proc",
                    "mount_sys", "mount_dev", "tmpfs"})
# Child steps a ready pid 1 runs first, in the cgroup made for it (see prepare()), so that
# they are not part of the rest of the plan.
_CGROUP_STEPS = frozenset({"cgroup", "verify_devices"})
BASE_END = ("tmpfs", ("/tmp", "1777"))  # the last step of every sandbox's base
# Ends a profile (profile_of) whose ready process execs into the step launcher.
LAUNCHER = ("become_launcher", ())
_SO_SNDBUFFORCE = 32


def split(child: list[Step]) -> tuple[list[Step], list[Step]] | None:
    """(steps ahead, steps after the job arrives) for a root caller's sandbox plan, or
    None if it has no ready form. The cgroup namespace is unshared after the job's cgroup is
    joined, as in the plan; the fd, umask and rlimit steps move after the base mounts, which
    do not depend on them."""
    names = [name for name, _ in child]
    first = "as_init" if "as_init" in names else "setpgid"  # a Python pid 1, or a native one
    if first not in names or BASE_END not in child:
        return None
    start, end = names.index(first), child.index(BASE_END) + 1
    before = child[:start]
    ahead = [s for s in before if s[0] in ("reset_signals", "setsid")]
    later = [s for s in before if s[0] not in ("reset_signals", "setsid")
             and s[0] not in _CGROUP_STEPS]
    base = [s for s in child[start:end] if s[0] != "prepare_idmaps"]
    idmaps = [s for s in child[start:end] if s[0] == "prepare_idmaps"]
    if any(name not in _AHEAD for name, _ in base):
        return None
    # An input root (root=DIR) is read when the root is built: a pid 1 made ahead would
    # show its entries as they were. Only the host's own paths are bound ahead.
    if any((name == "new_root" and args[0]) or (name == "bind" and args[2] == "/")
           for name, args in base):
        return None
    cgroupns: list[Step] = []
    for index, (name, args) in enumerate(base):
        if name == "unshare_namespaces" and args[0] & sc.CLONE_NEWCGROUP:
            base[index] = (name, (args[0] & ~sc.CLONE_NEWCGROUP,))
            cgroupns = [("unshare_namespaces", (sc.CLONE_NEWCGROUP,))]
    return ahead + base, cgroupns + later + idmaps + child[end:]


def split_plan(plan: Plan) -> tuple[list[Step], list[Step]] | None:
    """split(plan.child), worked out once for a kept plan's copies (Plan.memo): they
    differ only in their dup2 step, which each one's rest gets."""
    memo = plan.memo
    if memo is None:
        return split(plan.child)
    if "split" not in memo:
        names = [name for name, _ in plan.child]
        parts = split(plan.child)
        at = names.index("dup2") if "dup2" in names else -1
        where = [i for i, (name, _) in enumerate(parts[1]) if name == "dup2"] if parts else []
        memo["split"] = (parts, at, where[0] if where and at >= 0 else -1)
    parts, at, where = memo["split"]
    if parts is None or where < 0:
        return parts  # type: ignore[no-any-return]
    rest = list(parts[1])
    rest[where] = plan.child[at]
    return parts[0], rest


# Seconds a ready pid 1 may wait for a step. Its mount namespace is a copy of the host's
# mount table from when it was made (sees() checks only the job's own paths), so a step
# adopting it sees the host's other mounts as they were at most this long ago.
MAX_AGE = 30.0


class ReadyInit:
    """The supervisor's handle on one ready pid 1."""

    def __init__(self, pid: int, ahead: list[Step], userns: Any, report_fd: int,
                 status_fd: int, sock: socket.socket, cgroup: StepCgroup | None,
                 cgroup_args: Any, init: int = 0, launcher: bool = False,
                 devices_state: str | None = None) -> None:
        self.pid = pid  # the process that runs the step's plan (and is pid 1, but for...)
        self.init = init  # ...a native pid 1 beside it (linux/native_init.py), if nonzero
        self.ahead = ahead
        self.userns = userns  # the sandbox_namespaces arguments it was made with
        self.report_fd = report_fd
        self.status_fd = status_fd
        self.sock = sock
        self.cgroup = cgroup  # made ahead; pid 1 is in it and proved its device policy
        self.cgroup_args = cgroup_args  # the create_cgroup arguments it was made with
        self.devices_state = devices_state  # what its device proof (or the cache) stood on
        self.reaped: set[int] = set()  # by a step's reaper: such a pid may name another
        self.built = False  # it has said it waits for the job (wait_built)
        self.made_at = time.monotonic()
        self.launcher = launcher  # it waits in the step launcher, not in Python
        self.proving: tuple[object, ...] | None = None  # the device policy it proves ahead
        self.step_userns = -1  # for the launcher's idmapped binds: the step's user namespace

    def _close_step_userns(self) -> None:
        if self.step_userns >= 0:
            os.close(self.step_userns)
            self.step_userns = -1

    def expires_in(self) -> float:
        """Seconds until it is too old to adopt (MAX_AGE); zero or less once it is."""
        return self.made_at + MAX_AGE - time.monotonic()

    def policy_holds(self) -> bool:
        """Whether the device policy pid 1 proved still is the one in force: the parent
        cgroup's state it depends on is unchanged (see cgroups/devices.generation)."""
        if self.cgroup is None or "devices" not in self.cgroup.dirs:
            return True
        now = _devices_state(self.cgroup)
        return now is not None and now == self.devices_state

    def usable(self) -> bool:
        """Still waiting: no failure report, no exit (the report pipe turns readable)."""
        poller = select.poll()
        poller.register(self.report_fd, select.POLLIN)
        return not poller.poll(0)

    def pids(self) -> tuple[int, ...]:
        """Its processes: pid 1, and the one that waits beside a native pid 1."""
        return (self.pid, self.init) if self.init else (self.pid,)

    def alone(self) -> bool:
        """Whether its pid 1 has no child: a waiting pid 1 forks nothing before its job, so
        a child was put into its pid namespace from outside (a root step's setns there
        reparents its orphans to pid 1, out of reach of that step's kill walks, which spare
        it). Only pid 1 can gain one that way: orphans go to a namespace's init, and the
        process beside a native pid 1 forks nothing. Both are single-threaded: one read."""
        init = self.init or self.pid
        try:
            fd = os.open(f"/proc/{init}/task/{init}/children", os.O_RDONLY | os.O_CLOEXEC)
            try:  # (one read: the file is small, and any child at all answers no)
                return not os.read(fd, 64).split()
            finally:
                os.close(fd)
        except FileNotFoundError:  # CONFIG_PROC_CHILDREN off, or pid 1 is gone
            from ..supervise.proctree import children

            try:
                return os.path.exists(f"/proc/{init}") and not children(init)
            except OSError:
                return False
        except OSError:
            return False

    def wait_built(self, timeout: float, interrupt: Iterable[int] = ()) -> bool:
        """Until pid 1 waits for the job, everything ahead done (it says so on its socket):
        a job that comes while it is still being made waits for it, which costs less than
        launching without it. False if it failed or exited first, or took over timeout, or
        one of the interrupt fds turned readable first (the job's own socket: a cancel, or
        its caller gone, is served at once, not after this wait)."""
        if self.built:
            return True
        from ..child.handoff import READY

        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.report_fd, select.POLLIN)
        stops = set(interrupt)
        for fd in stops:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while not self.built:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            woken = {fd for fd, _ in poller.poll(int(left * 1000) + 1)}
            if self.report_fd in woken or woken & stops:
                return False
            if self.sock.fileno() in woken:
                try:
                    self.built = self.sock.recv(len(READY)) == READY
                except OSError:
                    return False
                if not self.built:
                    return False
        if self.proving is not None:  # everything ahead is done: its device proof passed
            from ..cgroups.devices import remember_proven

            remember_proven(self.proving)
            self.proving = None
        return True

    def sees(self, rest: list[Step]) -> bool:
        """Whether the host paths the rest of the plan binds are, as pid 1 sees them, what
        they are now: its mount namespace is a copy from when it was made, so a mount made
        since (on the working directory, say) would be missing there. The step launcher's
        binds are copied from the supervisor's own view when the job comes: always now."""
        if self.launcher:
            return True
        for name, args in rest:
            if name in ("bind_workdir", "bind"):
                path = args[0] if name == "bind_workdir" else args[1]
                try:
                    now = os.stat(path)
                    seen = os.stat(f"/proc/{self.pid}/root{OLDROOT}{path}")
                except OSError:
                    return False
                if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
                    return False
        return True

    def hand_over(self, rest: list[Step], extra: dict[str, Any], fds: list[int],
                  memo: dict[Any, Any] | None = None) -> None:
        """The rest of the plan, values for its steps, and the fds its steps name (the
        pid 1 renumbers them); to the step launcher, as its program. Raises OSError (too
        big a message) or Unexpressible (the launcher cannot carry the plan out): the job
        then launches the usual way. memo: the plan's (Plan.memo), if it is kept."""
        trees: list[int] = []
        if self.launcher:
            from .launcher_program import build

            userns = self.userns[0]
            inside = (userns[0], userns[1]) if userns is not None else (-1, -1)
            message, fds, trees = build(rest, self.pid, extra, inside, self.step_userns,
                                        memo)
        else:
            from ..child.handoff import MAX_FDS

            if len(fds) > MAX_FDS:  # more than the waiting pid 1 takes in one message
                raise OSError(errno.E2BIG, "too many fds to hand over")
            message = marshal.dumps((rest, extra, fds))
        try:
            socket.send_fds(self.sock, [message], fds)
        finally:
            for tree in trees:  # (the launcher has its own now, or never will)
                os.close(tree)
        self.sock.close()
        self._close_step_userns()

    def discard(self) -> None:
        """Kill and reap it (a job with another profile came, or the supervisor leaves)."""
        self.sock.close()
        self._close_step_userns()
        # The process beside a native pid 1 is reaped first: that pid 1 cannot finish
        # exiting while a process of its namespace is unreaped.
        ours = [pid for pid in self.pids() if pid not in self.reaped]
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in ours:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # reaped already
                pass
        os.close(self.report_fd)
        if self.status_fd >= 0:
            os.close(self.status_fd)
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None


def _devices_state(cgroup: StepCgroup | None) -> str | None:
    if cgroup is None or "devices" not in cgroup.dirs:
        return None
    from ..cgroups.devices import generation

    return generation(*cgroup.dirs["devices"])


def namespaces_of(plan: Plan) -> tuple[Any, ...] | None:
    """The arguments of the plan's sandbox_namespaces parent step, if it has one."""
    found = [args for name, args in plan.parent if name == "sandbox_namespaces"]
    return found[0] if len(found) == 1 else None


def cgroup_args_of(plan: Plan) -> tuple[Any, ...] | None:
    """The arguments of the plan's create_cgroup parent step, if it has one."""
    found = [args for name, args in plan.parent if name == "create_cgroup"]
    return found[0] if found else None


def _make_cgroup(args: tuple[Any, ...] | None) -> StepCgroup | None:
    """The step's cgroup, made ahead under a ready name; None if the plan has none.
    Raises CgroupError if it cannot be made (the job then makes its own and says why)."""
    if args is None:
        return None
    from ..cgroups.stale import new_name
    from ..cgroups.step import StepCgroup

    limits = args[0]
    return StepCgroup.create(limits["memory"], limits["pids"], limits["cpus"],
                             devices=limits["devices"], device_mode=limits["device_mode"],
                             verify=False, name=new_name(ready=True))


def profile_of(plan: Plan) -> Plan | None:
    """What prepare() needs of a plan: its parent steps and the child's up to the end of
    the base. The job's own part (its environment, which may be big) is not kept while a
    ready pid 1 is made, whose process would start as a copy of it. None: no ready form."""
    memo = plan.memo
    if memo is not None and "profile" in memo:  # (read only, by prepare())
        return memo["profile"]  # type: ignore[no-any-return]
    profile = None
    if BASE_END in plan.child:
        from ..plan.build import Plan

        base = plan.child[:plan.child.index(BASE_END) + 1]
        profile = Plan(list(plan.parent),
                       [*base, LAUNCHER] if _launcher_serves(plan) else base)
    if memo is not None:
        memo["profile"] = profile
    return profile


def _launcher_serves(plan: Plan) -> bool:
    """Whether a ready process for plan's profile should wait in the step launcher: a
    native pid 1 beside it, and a rest of the plan the launcher can carry out."""
    parts, namespaces = split_plan(plan), namespaces_of(plan)
    if parts is None or namespaces is None or not namespaces[3]:
        return False
    from ..linux import launcher
    from .launcher_program import expressible

    return expressible(parts[1]) and launcher.available()


def prepare(plan: Plan) -> ReadyInit | None:
    """Fork a ready pid 1 for plan's profile (None if the plan has no ready form). Raises
    StepFailure if a namespace cannot be made, CgroupError if the cgroup cannot; a failing
    step shows in usable()."""
    use_launcher = plan.child[-1:] == [LAUNCHER]
    parts = split(plan.child[:-1] if use_launcher else plan.child)
    namespaces = namespaces_of(plan)
    if parts is None or namespaces is None:
        return None
    userns, _, network, native = namespaces
    cgroup_args = cgroup_args_of(plan)
    cgroup = _make_cgroup(cgroup_args)
    try:
        return _fork(parts[0], userns, network, native, cgroup, cgroup_args,
                     use_launcher and native)
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        raise


def _fork(ahead_steps: list[Step], userns: Any, network: bool, native: bool,
          cgroup: StepCgroup | None, cgroup_args: Any, use_launcher: bool) -> ReadyInit:
    from .. import child
    from . import ahead
    from .fork import start_fork

    for name in child.CORE_STEPS:  # the rest of the plan arrives after pivot_root: no
        child.lookup(name)  # importing then
    child.lookup("await_job")
    fresh = ahead.launch_extras(userns, [], network)  # this pid 1's alone
    extra = {**ahead.identity_extras(userns, []), **fresh}
    if use_launcher:
        from ..linux import launcher

        extra["launcher_fd"] = launcher.program_fd()  # inherited; closed at its exec
    status_r, status_w = os.pipe() if not native else (-1, -1)  # a Python pid 1 reports
    extra["status_fd"] = status_w  # the step's status there
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if use_launcher:  # a program with a big environment is one message: room for it
        from .launcher_program import MAX_MESSAGE

        try:
            ours.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 2 * MAX_MESSAGE)
        except OSError:
            pass  # (a bigger one launches the usual way)
    # The supervisor's own fds (its control socket above all) are closed first thing; then
    # pid 1 joins the cgroup and proves its device policy from there (with the host's /dev,
    # before the root is built), all before the job.
    first, others = ahead_steps[:1], ahead_steps[1:]
    in_cgroup: list[Step] = []
    proving = None
    state = None  # the parent cgroup's device state, read once (cgroups/devices.py)
    if cgroup is not None:
        in_cgroup.append(("cgroup", (cgroup.procs_files(),)))
        rules = cgroup_args[0]["devices"]
        if rules is not None and "devices" in cgroup.dirs:
            from ..cgroups.devices import policy_key, proven

            key = policy_key(list(rules), *cgroup.dirs["devices"])
            state = None if key is None else str(key[2])
            if not proven(key):  # (as for any step's cgroup: Supervision._create_cgroup)
                in_cgroup.append(("verify_devices", (list(rules),)))
                proving = key
        elif rules is not None:
            in_cgroup.append(("verify_devices", (list(rules),)))
    wait: list[Step] = [("await_job", (theirs.fileno(),))]
    if use_launcher:  # the new root entered ahead: the job's binds come as mount trees
        wait = [("enter_root_ahead", ()), ("become_launcher", (theirs.fileno(),))]
    steps = [*first, ("close_fds", ([theirs.fileno()],)), *in_cgroup, *others, *wait]
    init = 0
    step_userns = -1
    if use_launcher and fresh.get("userns_fd", -1) >= 0:
        import fcntl

        step_userns = fcntl.fcntl(fresh["userns_fd"], fcntl.F_DUPFD_CLOEXEC, 3)
    try:
        if native:
            init, (pid, report_fd) = ahead.fork_beside_init(lambda: start_fork(steps, extra))
        else:
            pid, report_fd = ahead.fork_as_init(lambda: start_fork(steps, extra))
    except BaseException:
        if status_r >= 0:
            os.close(status_r)
        if step_userns >= 0:
            os.close(step_userns)
        ours.close()
        raise
    finally:
        if status_w >= 0:
            os.close(status_w)
        theirs.close()
        ahead.close_launch_extras(fresh)  # pid 1 has its own copies
    made = ReadyInit(pid, ahead_steps, (userns, network), report_fd, status_r, ours, cgroup,
                     cgroup_args, init, use_launcher, state)
    made.proving = proving
    made.step_userns = step_userns
    return made
