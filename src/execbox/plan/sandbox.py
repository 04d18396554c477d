"""The plan steps that build a sandbox (SandboxSpec is in model/sandbox.py).

A sandbox is not a second engine: it is more named steps in the same plan, run by the same
spawn path, so failures are reported the same way ("bind /usr -> /usr", "mount /proc").
"""

from __future__ import annotations

import os

from .. import child as _steps
from ..linux import native_init
from ..linux import syscalls as sc
from ..model.sandbox import DEFAULT_HOST_PATHS, UNPRIVILEGED_HOST_ID, SandboxSpec
from . import host

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .build import Step

# Loaded in the supervisor, before any fork: the child must not import after pivot_root.
_steps.lookup("fork_relay")
sc.last_capability()  # read once here, so that no step reads it between fork and exec

_NAMESPACES = (sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS
               | sc.CLONE_NEWCGROUP)


def sandbox_steps(box: SandboxSpec, cwd: str, role: str = "new", join_fd: int = -1,
                  terminal: bool = False,
                  parent: list[Step] | None = None) -> tuple[list[Step], list[Step]]:
    """(steps for the relay and pid 1, steps for the step process after pivot_root); the
    supervisor's own steps, if any, are appended to parent.

    role "new": a sandbox for this step alone; "hold": its pid 1 keeps it alive instead of
    running a step (Sandbox.start); "join": a run of such a sandbox, entered through
    join_fd, a pidfd of its pid 1 valid in the spawning process (Sandbox.run).
    """
    euid, egid = os.geteuid(), os.getegid()
    inside_uid = euid if box.uid is None else box.uid
    inside_gid = egid if box.gid is None else box.gid
    step_userns = euid == 0 and not box.privileged  # root: the step is mapped onto nobody
    supervisor = os.getpid()  # the plan is built by the process that forks the relay
    if role == "join":
        if join_fd < 0:
            raise ValueError("a join needs the sandbox's pid 1 as a pidfd")
        outside: list[Step] = [("join_sandbox", (join_fd, euid != 0, step_userns)),
                               ("fork_run", (supervisor,))]
        if terminal:
            outside.append(("open_sandbox_terminal", ()))
        outside.append(("fork_step", ()))
        inside: list[Step] = [("join_userns", (inside_uid, inside_gid))] if step_userns else []
        return outside, [*_keyring(), *inside, ("drop_privileges", ())]
    steps: list[Step] = []
    inside = []
    # A root caller's step gets namespaces its supervisor made ahead (spawn/ahead.py) and
    # is forked as pid 1 directly; an unprivileged caller's child makes its own, in the
    # user namespace it makes first, and forks pid 1 below a relay.
    prepared = euid == 0 and role == "new"
    premade_net = prepared and not box.share_net
    # pid 1 a native one (linux/native_init.py) and the step the supervisor's own child in
    # its namespace; a terminal's pid 1 relays it, so it stays a Python one.
    native = prepared and not terminal and native_init.available()
    flags = _NAMESPACES | (0 if box.share_net or premade_net else sc.CLONE_NEWNET)
    if euid != 0:
        steps.append(("userns", (inside_uid, inside_gid, euid, egid)))
    if prepared:
        flags &= ~sc.CLONE_NEWPID
        steps += [("setpgid" if native else "as_init", ()), ("unshare_namespaces", (flags,))]
        if premade_net:
            steps.append(("join_netns", ()))
    else:
        steps += [("unshare_namespaces", (flags,)), ("fork_relay", (supervisor,))]
    workdir_owner: list[int] | None = None
    bind_owners: dict[str, list[int] | None] = {}
    userns: list[int] | None = None
    idmaps: list[list[int]] = []
    if step_userns:
        ids = (inside_uid, inside_gid, UNPRIVILEGED_HOST_ID, UNPRIVILEGED_HOST_ID)
        if prepared:
            userns = list(ids)
        else:
            steps.append(("prepare_userns", ids))
        inside.append(("join_userns", ()))
        # Read-write binds are idmapped so that their owner appears as the step (unless
        # idmap=False: then the files' modes decide, as for any unprivileged user).
        if box.bind_workdir and box.idmap:
            workdir_owner = host.owner(cwd)
        for kind, source, _ in box.binds:
            if kind == "bind" and box.idmap and host.isdir(source):
                bind_owners[source] = host.owner(source)
        owners = {tuple(o) for o in [workdir_owner, *bind_owners.values()] if o is not None}
        if owners:  # made by the child, or (prepared) made ahead and only checked there
            steps.append(("prepare_idmaps", ([list(o) for o in sorted(owners)],)))
        idmaps = [list(o) for o in sorted(owners)]
    if prepared:
        parent = [] if parent is None else parent
        parent.append(("sandbox_namespaces", (userns, idmaps, premade_net, native)))
    if box.root_writable:
        # The input root itself over the scratch root, read-write and never idmapped; the
        # mounts below then make their mount points in it, as the setup's own user.
        steps += [("prepare_base", ()), ("new_root", ("",)),
                  ("bind", ("bind", box.root, "/", None))]
    else:
        steps += [("prepare_base", ()), ("new_root", (box.root or "",))]
    if box.root is None:
        for path in DEFAULT_HOST_PATHS:
            if host.islink(path):
                steps.append(("symlink", (host.readlink(path), path)))
            elif host.isdir(path):
                steps.append(("bind", ("ro-bind", path, path)))
    steps += [("mount_proc", ()), ("mount_sys", ()), ("mount_dev", ()),
              ("tmpfs", ("/tmp", "1777"))]
    if box.bind_workdir:
        steps.append(("bind_workdir", (cwd, workdir_owner)))
    for kind, source, dest in box.binds:
        owner = bind_owners.get(source) if kind == "bind" else None
        steps.append(("bind", (kind, source, dest, owner)))
    owner_id = UNPRIVILEGED_HOST_ID if step_userns else -1
    steps += [("tmpfs", (dest, "0755", owner_id)) for dest in box.tmpfs]
    steps += [("make_dir", (dest,)) for dest in box.dirs]
    steps += [("symlink", link) for link in box.symlinks]
    steps.append(("set_hostname", (box.hostname,)))
    if not box.share_net and not premade_net:
        steps.append(("loopback_up", ()))
    steps.append(("enter_root", (not box.root_writable,)))
    if role == "hold":
        steps.append(("hold", ()))
    elif prepared and not terminal:
        # The process that set the sandbox up takes the step's identity and execs it
        # (native: build_plan ends the plan with execve), or, a Python pid 1, posix_spawns
        # it (spawn_step): no Python process between pid 1 and the step's exec.
        return [*steps, *_keyring(), *inside, ("drop_privileges", ())], []
    else:
        if terminal:
            steps.append(("open_sandbox_terminal", ()))
        steps.append(("fork_step", ()))
    return steps, [*_keyring(), *inside, ("drop_privileges", ())]


def _keyring() -> list[Step]:
    """The step's own session keyring (as runc gives each container), where keyrings can
    be used at all. Made before the step joins its user namespace: a root caller's steps
    all run as one host uid, whose small key quota (maxkeys) their keyrings would share;
    the step still possesses it."""
    return [("new_session_keyring", ())] if sc.keyrings_usable() else []
