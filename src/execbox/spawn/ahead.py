"""Namespaces a root caller's sandbox gets before its step needs them, in the supervisor.

- The user namespaces of idmapped binds are made once per mapping and kept: they are a
  mount's idmapping only, no process enters them. The step's own user namespace is made for
  each step (a user namespace has its own user keyrings), by a ready pid 1's supervisor
  while idle where it can (spawn/ready.py).
- Network namespaces are made ahead, with lo up, while the supervisor is idle, and each is
  used by exactly one step: two steps in one network namespace could talk over abstract
  UNIX sockets and loopback ports.
- The step's pid 1 is the supervisor's own child (no relay process in between): the
  supervisor points its children's pid namespace at a new one for one fork, then back.
  Where a native pid 1 serves (linux/native_init.py), the step is forked there too, as
  the supervisor's own child beside it.

Only for a root caller: an unprivileged caller's namespaces must belong to the user
namespace its child makes first, so it cannot take them from here.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager

from ..linux import syscalls as sc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, TypeVar

    T = TypeVar("T")

_owner = 0  # the process the cached descriptors belong to (a fork must not share them)
_user_namespaces: dict[tuple[str, str], int] = {}
_ready_networks: list[int] = []
_networks_wanted = False
_own: dict[str, int] = {}


def _mine() -> None:
    """Forget descriptors inherited from another process (they are that one's to use)."""
    global _owner, _networks_wanted
    if _owner != os.getpid():
        _owner = os.getpid()
        _user_namespaces.clear()
        _ready_networks.clear()
        _own.clear()
        _networks_wanted = False


def _own_namespace(kind: str) -> int:
    if kind not in _own:
        _own[kind] = os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    return _own[kind]


def remember_home() -> None:
    """Keep this process's own pid and network namespaces now, before threads that move
    their own for a moment (server/shared.py) could be asked which they are."""
    _mine()
    for kind in ("pid", "net"):
        _own_namespace(kind)


def user_namespace(uid_map: str, gid_map: str) -> int:
    """A user namespace with these maps (kept open; the caller must not close it)."""
    _mine()
    key = (uid_map, gid_map)
    if key not in _user_namespaces:
        from ..child.context import ChildContext
        from ..child.namespaces import make_user_namespace

        made = make_user_namespace(ChildContext(-1), uid_map, gid_map)
        if _user_namespaces.setdefault(key, made) != made:  # another thread's came first
            os.close(made)
    return _user_namespaces[key]


def _new_network_namespace() -> int:
    """unshare into a new network namespace, bring lo up, keep an fd, come back."""
    from ..child.context import ChildContext
    from ..child.namespaces import loopback_up

    home = _own_namespace("net")
    sc.unshare(sc.CLONE_NEWNET)
    try:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            loopback_up(ChildContext(-1))
        except BaseException:
            os.close(fd)
            raise
    finally:
        try:
            sc.setns(home, sc.CLONE_NEWNET)
        except OSError:
            os._exit(70)  # never run another step in a borrowed network namespace
    return fd


def network_namespace() -> int:
    """A network namespace no step has used (the caller owns and closes the fd)."""
    global _networks_wanted
    _mine()
    _networks_wanted = True
    try:
        return _ready_networks.pop()
    except IndexError:  # none ready (or another thread took the last)
        return _new_network_namespace()


def refill() -> None:
    """Off the launch path (an idle supervisor): have one network namespace ready, if this
    process has launched sandboxes that needed one."""
    _mine()
    if _networks_wanted and not _ready_networks:
        try:
            _ready_networks.append(_new_network_namespace())
        except OSError:
            pass  # the next launch makes its own and reports what fails


def identity_extras(userns: list[int] | None, idmaps: list[list[int]]) -> dict[str, Any]:
    """What the child's steps take from ctx.extra that can be kept across steps: the ids the
    step user namespace maps, and one user namespace per idmapped bind owner (a mount's
    idmapping only: no process ever enters those). Raises StepFailure naming the one that
    could not be made."""
    from ..child.namespaces import idmap_key, idmap_lines
    from .failure import StepFailure

    extra: dict[str, Any] = {}
    if userns is None:
        return extra
    inside_uid, inside_gid, host_uid, host_gid = userns
    extra["inside_uid"], extra["inside_gid"] = inside_uid, inside_gid
    extra["host_id"] = host_uid
    for uid, gid in idmaps:
        if (uid, gid) == (inside_uid, inside_gid):
            continue  # the step's own user namespace serves (see launch_extras)
        try:
            extra[idmap_key(uid, gid)] = user_namespace(idmap_lines(uid, host_uid),
                                                        idmap_lines(gid, host_gid))
        except OSError as exc:
            raise StepFailure(f"user namespace for idmapped binds owned by {uid}:{gid}",
                              exc.errno or errno.EIO, "") from None
    return extra


def launch_extras(userns: list[int] | None, idmaps: list[list[int]],
                  network: bool) -> dict[str, Any]:
    """The namespaces one step alone gets (the caller closes the fds once it has forked):
    its own user namespace (a user namespace has its own user keyrings, so steps must not
    share one) and a network namespace no step has used. Raises StepFailure."""
    from ..child.context import ChildContext
    from ..child.namespaces import idmap_key, make_user_namespace
    from .failure import StepFailure

    extra: dict[str, Any] = {}
    step = "user namespace"
    try:
        if userns is not None:
            inside_uid, inside_gid, host_uid, host_gid = userns
            extra["userns_fd"] = make_user_namespace(
                ChildContext(-1), f"{inside_uid} {host_uid} 1\n", f"{inside_gid} {host_gid} 1\n")
            if [inside_uid, inside_gid] in idmaps:
                extra[idmap_key(inside_uid, inside_gid)] = extra["userns_fd"]
        if network:
            step = "network namespace"
            extra["netns_fd"] = network_namespace()
    except OSError as exc:
        close_launch_extras(extra)
        raise StepFailure(step, exc.errno or errno.EIO, "") from None
    return extra


def close_launch_extras(extra: dict[str, Any]) -> None:
    """Close the fds launch_extras made (once the child that uses them is forked)."""
    for fd in {extra.get("userns_fd", -1), extra.get("netns_fd", -1)}:
        if fd >= 0:
            os.close(fd)


@contextmanager
def _children_in_a_new_pid_namespace() -> Iterator[None]:
    """Point this process's children's pid namespace at a new one (the next child is its
    pid 1), and back to our own after; raises StepFailure if it cannot be made."""
    from .failure import StepFailure

    _mine()
    home = _own_namespace("pid")
    try:
        sc.unshare(sc.CLONE_NEWPID)
    except OSError as exc:
        raise StepFailure("unshare", exc.errno or errno.EIO, "pid namespace") from None
    try:
        yield
    finally:
        try:
            sc.setns(home, sc.CLONE_NEWPID)
        except OSError:
            os._exit(70)  # later forks would land in the step's pid namespace


def fork_as_init(fork: Callable[[], T]) -> T:
    """Call fork (which forks once) so that its child is pid 1 of a new pid namespace."""
    with _children_in_a_new_pid_namespace():
        return fork()


def fork_beside_init(fork: Callable[[], T]) -> tuple[int, T]:
    """A native pid 1 of a new pid namespace (linux/native_init.py), then fork (which forks
    once) with its child in that namespace beside it: (pid 1's pid, fork's result). Forks
    land there while pid 1 lives, so the step is this process's own child."""
    from ..linux.native_init import clone_init
    from .failure import StepFailure

    with _children_in_a_new_pid_namespace():
        try:
            init = clone_init()
        except OSError as exc:
            raise StepFailure("pid 1", exc.errno or errno.EIO, "native pid 1") from None
        try:
            return init, fork()
        except BaseException:
            end_init(init)
            raise


def end_init(init: int) -> None:
    """SIGKILL a native pid 1 (and so everything in its namespace) and reap it. pid 1
    cannot finish exiting while a process of its namespace is unreaped, so this process's
    own children there (a step forked beside it, whose pid an exception may have lost) are
    reaped first: waiting for pid 1 alone would wait forever."""
    import signal

    from ..supervise.proctree import own_children

    try:
        ns = os.stat(f"/proc/{init}/ns/pid")  # before the kill: pid 1 is our unreaped child
    except OSError:
        ns = None
    try:
        os.kill(init, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if ns is not None:
        for child in own_children():
            if child == init:
                continue
            try:
                theirs = os.stat(f"/proc/{child}/ns/pid")
            except OSError:
                continue
            if (theirs.st_dev, theirs.st_ino) == (ns.st_dev, ns.st_ino):
                try:
                    os.waitpid(child, 0)  # SIGKILLed by pid 1's exit
                except ChildProcessError:
                    pass
    try:
        os.waitpid(init, 0)
    except ChildProcessError:
        pass
