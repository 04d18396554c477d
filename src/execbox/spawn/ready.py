"""A root caller's sandbox pid 1, forked ahead by an idle supervisor for the profile of its
last sandboxed job (a zygote of one step).

Everything a step's plan does that depends on neither the job's fds, its working
directory nor its cgroup is done before the job exists: pid 1 is forked into its new pid
namespace, unshares its other namespaces, enters a network namespace of its own and builds
the base of the new root (scratch root, read-only host binds, /proc, /sys, /dev, /tmp). It
then waits on a socket. When a job's plan has the same such steps, the supervisor moves
pid 1 into the job's cgroup and sends it the rest of the plan and the job's fds; otherwise
pid 1 is killed and the job launches the usual way. Every ready pid 1 serves one step:
nothing of a step is ever reused by another.

Forked while the supervisor is idle, it holds none of a caller's fds (so it cannot keep a
file being written open: ETXTBSY) and closes the supervisor's own at once.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import socket

from ..child.mounts import OLDROOT
from ..linux import syscalls as sc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..plan.build import Plan, Step

# Child steps that can run before the job is known, once their arguments are the same.
_AHEAD = frozenset({"reset_signals", "setsid", "as_init", "unshare_namespaces", "join_netns",
                    "prepare_base", "new_root", "bind", "symlink", "mount_proc", "mount_sys",
                    "mount_dev", "tmpfs"})
# Child steps the supervisor does itself for a ready pid 1 (it joins it to the cgroup and
# proves the device policy from there).
_BY_SUPERVISOR = frozenset({"cgroup", "verify_devices"})
BASE_END = ("tmpfs", ("/tmp", "1777"))  # the last step of every sandbox's base


def split(child: list[Step]) -> tuple[list[Step], list[Step]] | None:
    """(steps ahead, steps after the job arrives) for a root caller's sandbox plan, or
    None if it has no ready form. The cgroup namespace is unshared after the job's cgroup is
    joined, as in the plan; the fd, umask and rlimit steps move after the base mounts, which
    do not depend on them."""
    names = [name for name, _ in child]
    if "as_init" not in names or BASE_END not in child:
        return None
    start, end = names.index("as_init"), child.index(BASE_END) + 1
    before = child[:start]
    ahead = [s for s in before if s[0] in ("reset_signals", "setsid")]
    later = [s for s in before if s[0] not in ("reset_signals", "setsid")
             and s[0] not in _BY_SUPERVISOR]
    base = [s for s in child[start:end] if s[0] != "prepare_idmaps"]
    idmaps = [s for s in child[start:end] if s[0] == "prepare_idmaps"]
    if any(name not in _AHEAD for name, _ in base):
        return None
    cgroupns: list[Step] = []
    for index, (name, args) in enumerate(base):
        if name == "unshare_namespaces" and args[0] & sc.CLONE_NEWCGROUP:
            base[index] = (name, (args[0] & ~sc.CLONE_NEWCGROUP,))
            cgroupns = [("unshare_namespaces", (sc.CLONE_NEWCGROUP,))]
    return ahead + base, cgroupns + later + idmaps + child[end:]


class ReadyInit:
    """The supervisor's handle on one ready pid 1."""

    def __init__(self, pid: int, ahead: list[Step], userns: Any, report_fd: int,
                 status_fd: int, sock: socket.socket) -> None:
        self.pid = pid
        self.ahead = ahead
        self.userns = userns  # the sandbox_namespaces arguments it was made with
        self.report_fd = report_fd
        self.status_fd = status_fd
        self.sock = sock

    def usable(self) -> bool:
        """Still waiting: no failure report, no exit (the report pipe turns readable)."""
        poller = select.poll()
        poller.register(self.report_fd, select.POLLIN)
        return not poller.poll(0)

    def sees(self, rest: list[Step]) -> bool:
        """Whether the host paths the rest of the plan binds are, as pid 1 sees them, what
        they are now: its mount namespace is a copy from when it was made, so a mount made
        since (on the working directory, say) would be missing there."""
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

    def hand_over(self, rest: list[Step], extra: dict[str, Any], fds: list[int]) -> None:
        """The rest of the plan, values for its steps, and the fds its steps name (the
        pid 1 renumbers them)."""
        message = marshal.dumps((rest, extra, fds))
        socket.send_fds(self.sock, [message], fds)
        self.sock.close()

    def discard(self) -> None:
        """Kill and reap it (a job with another profile came, or the supervisor leaves)."""
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.report_fd)
        os.close(self.status_fd)


def namespaces_of(plan: Plan) -> tuple[Any, ...] | None:
    """The arguments of the plan's sandbox_namespaces parent step, if it has one."""
    found = [args for name, args in plan.parent if name == "sandbox_namespaces"]
    return found[0] if len(found) == 1 else None


def prepare(plan: Plan) -> ReadyInit | None:
    """Fork a ready pid 1 for plan's profile (None if the plan has no ready form). Raises
    StepFailure if a namespace cannot be made; a failing step shows in usable()."""
    from .. import child
    from . import ahead
    from .fork import start_fork

    parts, namespaces = split(plan.child), namespaces_of(plan)
    if parts is None or namespaces is None:
        return None
    userns, _, network = namespaces
    for name in child.CORE_STEPS:  # the rest of the plan arrives after pivot_root: no
        child.lookup(name)  # importing then
    child.lookup("await_job")
    extra = ahead.step_extras(userns, [], network)
    status_r, status_w = os.pipe()
    extra["status_fd"] = status_w
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The supervisor's own fds (its control socket above all) are closed first thing.
    first, others = parts[0][:1], parts[0][1:]
    steps = [*first, ("close_fds", ([theirs.fileno()],)), *others,
             ("await_job", (theirs.fileno(),))]
    try:
        pid, report_fd = ahead.fork_as_init(lambda: start_fork(steps, extra))
    except BaseException:
        os.close(status_r)
        ours.close()
        raise
    finally:
        os.close(status_w)
        theirs.close()
        if extra.get("netns_fd", -1) >= 0:
            os.close(extra["netns_fd"])
    return ReadyInit(pid, parts[0], (userns, network), report_fd, status_r, ours)
