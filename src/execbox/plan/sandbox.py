"""SandboxSpec (what the step may see) and the plan steps that build it.

A sandbox is not a second engine: it is more named steps in the same plan, run by the same
spawn path, so failures are reported the same way ("bind /usr -> /usr", "mount /proc").
"""

from __future__ import annotations

import os

from ..linux import syscalls as sc
from ..model.sandbox import DEFAULT_HOST_PATHS, UNPRIVILEGED_HOST_ID, SandboxSpec

TYPE_CHECKING = False
if TYPE_CHECKING:

    from .build import Step

def sandbox_steps(box: SandboxSpec, cwd: str, role: str = "new", join_fd: int = -1,
                  terminal: bool = False) -> tuple[list[Step], list[Step]]:
    """(steps for the relay and init, steps for the step process after pivot_root).

    role "hold": the sandbox's pid 1 keeps it alive instead of running a step
    (Sandbox.start); "join": enter such a sandbox, whose pid 1 join_fd is a pidfd of.
    """
    hold = role == "hold"
    euid, egid = os.geteuid(), os.getegid()
    inside_uid = euid if box.uid is None else box.uid
    inside_gid = egid if box.gid is None else box.gid
    if role == "join":
        if join_fd < 0:
            raise ValueError("a join needs the sandbox's pid 1 as a pidfd")
        as_root = euid == 0 and not box.privileged
        return ([("join_sandbox", (join_fd, euid == 0))],
                [("join_userns", (inside_uid, inside_gid))] if as_root else [])
    steps: list[Step] = []
    inside: list[Step] = []
    as_root = euid == 0
    idmap = False
    flags = (sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS
             | sc.CLONE_NEWCGROUP)
    if not box.share_net:
        flags |= sc.CLONE_NEWNET
    if not as_root:
        steps.append(("userns", (inside_uid, inside_gid, euid, egid)))
    steps += [("unshare_namespaces", (flags,)), ("fork_relay", ())]
    if as_root and not box.privileged:
        ids = (inside_uid, inside_gid, UNPRIVILEGED_HOST_ID, UNPRIVILEGED_HOST_ID)
        steps.append(("prepare_userns", ids))
        inside.append(("join_userns", ()))
        idmap = _owner(cwd) == (inside_uid, inside_gid)
    steps += [("prepare_base", ()), ("new_root", (box.root or "",))]
    if box.root is None:
        for path in DEFAULT_HOST_PATHS:
            if os.path.islink(path):
                steps.append(("symlink", (os.readlink(path), path)))
            elif os.path.isdir(path):
                steps.append(("bind", ("ro-bind", path, path)))
    steps += [("mount_proc", ()), ("mount_sys", ()), ("mount_dev", ()), ("tmpfs", ("/tmp",
              "1777"))]
    if box.root is None:
        steps.append(("bind_workdir", (cwd, idmap)))
    steps += [("bind", bind) for bind in box.binds]
    owner = UNPRIVILEGED_HOST_ID if as_root and not box.privileged else -1
    steps += [("tmpfs", (dest, "0755", owner)) for dest in box.tmpfs]
    steps += [("make_dir", (dest,)) for dest in box.dirs]
    steps += [("symlink", link) for link in box.symlinks]
    steps.append(("set_hostname", (box.hostname,)))
    if not box.share_net:
        steps.append(("loopback_up", ()))
    steps.append(("enter_root", (True,)))
    if terminal and not hold:
        steps.append(("open_sandbox_terminal", ()))
    steps.append(("hold", ()) if hold else ("fork_step", ()))
    return steps, [*inside, ("drop_privileges", ())]


def _owner(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_uid, st.st_gid


