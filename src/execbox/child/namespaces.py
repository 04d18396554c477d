"""Sandbox steps for identity and namespaces: user namespaces (made, prepared, joined),
unshare, entering a long-lived sandbox through a pidfd, hostname, loopback.

Imports only the syscall layer and its siblings: these run between fork and exec, some after
the package is out of reach (see child/__init__.py, which loads every family at once).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from ..linux import syscalls as sc
from ..linux.arch import ioctl_number
from .context import ChildContext

# Where a held sandbox's pid 1 keeps the step user namespace's fd (see init.hold).
USERNS_FD_IN_INIT = 3


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def user_namespace(ctx: ChildContext, inside_uid: int, inside_gid: int, host_uid: int,
                   host_gid: int) -> None:
    """An unprivileged caller: a new user namespace mapping its own ids, made first so the
    other namespaces and every mount belong to it."""
    ctx.label = "user namespace"
    sc.unshare(sc.CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inside_uid} {host_uid} 1\n")
    _write("/proc/self/gid_map", f"{inside_gid} {host_gid} 1\n")
    os.setresgid(inside_gid, inside_gid, inside_gid)
    os.setresuid(inside_uid, inside_uid, inside_uid)


def make_user_namespace(ctx: ChildContext, uid_map: str, gid_map: str) -> int:
    """An fd of a new user namespace with these maps. A root caller keeps its own ids for
    the setup; only the fd enters the namespace. The namespace is made by a clone of this
    process that exits at once (sc.clone_exiting): its maps are written and its fd opened
    while it is a zombie, which costs a tenth of forking a holder."""
    if not _procfs_is_ours():  # the clone's pid would name another process there
        return _user_namespace_by_holder(ctx, uid_map, gid_map)
    try:
        holder = sc.clone_exiting(sc.CLONE_NEWUSER)
    except OSError:  # a seccomp filter may treat clone's flags apart from unshare's
        return _user_namespace_by_holder(ctx, uid_map, gid_map)
    try:
        return _map_user_namespace(ctx, str(holder), uid_map, gid_map)
    finally:
        sc.reap_clone(holder)


def _procfs_is_ours() -> bool:
    """Whether /proc is a procfs of this process's own pid namespace: NSpid lists our pid
    in each namespace from the procfs's down to ours, so once. (/proc/self being our pid
    is not enough: a pid can have the same number in a namespace and its parent.) Read
    once per process and procfs mount."""
    try:
        key = (os.getpid(), os.stat("/proc").st_dev)
        if key not in _OWN_PROCFS:
            with open("/proc/self/status", "rb") as f:
                status = f.read()
            start = status.find(b"\nNSpid:")
            line = status[start + 7:status.find(b"\n", start + 1)] if start >= 0 else b""
            _OWN_PROCFS[key] = line.split() == [str(os.getpid()).encode()]
        return _OWN_PROCFS[key]
    except OSError:
        return False  # no procfs here: the holder's way fails as it always did


_OWN_PROCFS: dict[tuple[int, int], bool] = {}
os.register_at_fork(after_in_child=_OWN_PROCFS.clear)  # a child may have our pid's number


def _map_user_namespace(ctx: ChildContext, seen_as: str, uid_map: str, gid_map: str) -> int:
    _write(f"/proc/{seen_as}/setgroups", "deny")
    ctx.path_tried = f"/proc/{seen_as}/uid_map"
    _write(f"/proc/{seen_as}/uid_map", uid_map)
    _write(f"/proc/{seen_as}/gid_map", gid_map)
    return os.open(f"/proc/{seen_as}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


def _user_namespace_by_holder(ctx: ChildContext, uid_map: str, gid_map: str) -> int:
    """make_user_namespace by a forked holder that reports its pid as the procfs at hand
    shows it, for a caller whose own pid that procfs does not show."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # lives only until the namespace has its maps and an fd
        try:
            os.close(ready_r)
            os.close(done_w)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, os.readlink("/proc/self").encode())
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        seen_as = os.read(ready_r, 32).decode()
        if not seen_as.isdigit():
            raise OSError(errno.EPERM, "user namespace")
        return _map_user_namespace(ctx, seen_as, uid_map, gid_map)
    finally:
        os.close(done_w)  # the holder exits; the namespace lives on through the fd
        os.close(ready_r)
        os.waitpid(holder, 0)


def prepare_user_namespace(ctx: ChildContext, inside_uid: int, inside_gid: int,
                           host_uid: int, host_gid: int) -> None:
    """A root caller: make (but do not enter) a user namespace mapping the step's ids onto
    an unprivileged host id. Setup keeps real root; the step joins it at the end."""
    ctx.label = "user namespace"
    ctx.extra["userns_fd"] = make_user_namespace(ctx, f"{inside_uid} {host_uid} 1\n",
                                                 f"{inside_gid} {host_gid} 1\n")
    ctx.extra["inside_uid"], ctx.extra["inside_gid"] = inside_uid, inside_gid
    ctx.extra["host_id"] = host_uid


def prepare_idmaps(ctx: ChildContext, owners: list[list[int]]) -> None:
    """For each read-write bind's owner (uid, gid), a user namespace mapping that owner onto
    the step's host id, for an idmapped bind: the directory's owner appears as the step, and
    what the step creates stays owned by the directory's owner on the host."""
    inside = (ctx.extra.get("inside_uid"), ctx.extra.get("inside_gid"))
    host = ctx.extra["host_id"]
    for uid, gid in owners:
        key = idmap_key(uid, gid)
        ctx.label = f"user namespace for idmapped binds owned by {uid}:{gid}"
        if (uid, gid) == inside:  # the step's own namespace has exactly this mapping
            ctx.extra[key] = ctx.extra["userns_fd"]
        elif key not in ctx.extra:
            ctx.extra[key] = make_user_namespace(ctx, idmap_lines(uid, host),
                                                   idmap_lines(gid, host))


# Where an idmapped bind puts every id but its owner's: far from any real id, so such files
# are nobody's the step knows (no chmod, no writing through a read-only mode) but still
# mapped, so the step may unlink or rename them in a directory it can write (an unmapped
# owner would make that EOVERFLOW: `sed -i` on an input file would fail).
_OTHERS_BASE = 1 << 31
_LAST_ID = (1 << 31) - 2


def idmap_lines(owner: int, host: int) -> str:
    """owner -> host (the step's id); every other id -> _OTHERS_BASE + id."""
    lines = [f"{owner} {host} 1"]
    if owner > 0:
        lines.append(f"0 {_OTHERS_BASE} {owner}")
    if owner < _LAST_ID:
        lines.append(f"{owner + 1} {_OTHERS_BASE + owner + 1} {_LAST_ID - owner}")
    return "\n".join(lines) + "\n"


def idmap_key(uid: int, gid: int) -> str:
    """Where prepare_idmaps leaves the user namespace fd for binds owned by uid:gid."""
    return f"idmap {uid}:{gid}"


def join_user_namespace(ctx: ChildContext, uid: int = -1, gid: int = -1) -> None:
    """The step enters the prepared user namespace and takes its ids there."""
    ctx.label = "join user namespace"
    if uid >= 0:
        ctx.extra["inside_uid"], ctx.extra["inside_gid"] = uid, gid
    fd = ctx.extra.pop("userns_fd", -1)
    if fd < 0:
        return
    sc.setns(fd, sc.CLONE_NEWUSER)
    os.close(fd)
    gid, uid = ctx.extra["inside_gid"], ctx.extra["inside_uid"]
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def unshare_namespaces(ctx: ChildContext, flags: int) -> None:
    ctx.label = "unshare"
    sc.unshare(flags)


_JOIN_FLAGS = (sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWNET | sc.CLONE_NEWCGROUP
               | sc.CLONE_NEWPID | sc.CLONE_NEWNS)


def join_sandbox(ctx: ChildContext, pidfd: int, enter_userns: bool,
                 step_userns: bool) -> None:
    """Enter a held sandbox's namespaces through a pidfd of its pid 1 (never a pid, which
    could name another process by now). enter_userns: the sandbox is an unprivileged
    caller's, in its own user namespace; step_userns: a root caller's, whose pid 1 keeps the
    step user namespace at fd 3, taken with pidfd_getfd. A missing or wrong descriptor fails
    the step: it never means "privileged"."""
    if step_userns:
        ctx.label = "join sandbox: step user namespace (pid 1's fd 3)"
        fd = sc.pidfd_getfd(pidfd, USERNS_FD_IN_INIT)
        # Still in the host's mount namespace: this procfs shows our own fds.
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("user:["):
            os.close(fd)
            ctx.path_tried = "pid 1's fd 3 is not a user namespace"
            raise OSError(errno.EBADF, ctx.path_tried)
        ctx.extra["userns_fd"] = fd
    ctx.label = "join sandbox: setns"
    sc.setns(pidfd, _JOIN_FLAGS | (sc.CLONE_NEWUSER if enter_userns else 0))
    os.close(pidfd)
    os.chdir("/")


def join_network_namespace(ctx: ChildContext) -> None:
    """Enter the network namespace the supervisor made ahead for this step alone."""
    ctx.label = "join network namespace"
    fd = ctx.extra.pop("netns_fd")
    sc.setns(fd, sc.CLONE_NEWNET)
    os.close(fd)


def set_hostname(ctx: ChildContext, name: str) -> None:
    ctx.label = "sethostname"
    socket.sethostname(name)


def loopback_up(ctx: ChildContext) -> None:
    """Bring lo up in the new network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    ctx.label = "loopback up"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        get_flags, set_flags = ioctl_number("SIOCGIFFLAGS"), ioctl_number("SIOCSIFFLAGS")
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock.fileno(), get_flags, request))[1]
        fcntl.ioctl(sock.fileno(), set_flags, struct.pack("16sH22x", b"lo", flags | sc.IFF_UP))
