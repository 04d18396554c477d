"""SandboxSpec (what the step may see) and the plan steps that build it.

A sandbox is not a second engine: it is more named steps in the same plan, run by the same
spawn path, so failures are reported the same way ("bind /usr -> /usr", "mount /proc").
"""

from __future__ import annotations

import os

from ..child import mounts as _sandbox_steps  # noqa: F401 - loaded once, before any fork
from ..linux import syscalls as sc
from ..model.errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .build import Step

BIND_KINDS = ("ro-bind", "bind", "dev-bind")
DEFAULT_HOST_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
UNPRIVILEGED_HOST_ID = 65534  # what a root caller's sandbox is mapped onto ("nobody")


def _abs(value: object, field: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, str) or not value:
        raise SpecError(field, f"expected a non-empty path, got {value!r}")
    if "\0" in value:
        raise SpecError(field, "must not contain a NUL byte")
    if not value.startswith("/"):
        raise SpecError(field, f"must be an absolute path, got {value!r}")
    return os.path.normpath(value)


class SandboxSpec:
    """What a sandboxed step sees. SandboxSpec() is the default profile: read-only host
    /usr, /bin, /sbin, /lib*, /etc, fresh /proc, minimal /dev, tmpfs /tmp, and the working
    directory read-write. root=DIR uses DIR (read-only) as the input root instead."""

    __slots__ = ("binds", "dirs", "gid", "hostname", "privileged", "root", "share_net",
                 "symlinks", "tmpfs", "uid")

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 ro_binds: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                 binds: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                 dev_binds: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                 tmpfs: list[str] | tuple[str, ...] = (),
                 dirs: list[str] | tuple[str, ...] = (),
                 symlinks: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                 hostname: str = "execbox", share_net: bool = False,
                 uid: int | None = None, gid: int | None = None,
                 privileged: bool = False) -> None:
        # Host-side paths are resolved here: inside the sandbox setup the host's root is at
        # /oldroot, where an absolute symlink would point somewhere else.
        self.root = None if root is None else os.path.realpath(_abs(root, "sandbox.root"))
        entries: list[tuple[str, str, str]] = []
        for kind, pairs in (("ro-bind", ro_binds), ("bind", binds), ("dev-bind", dev_binds)):
            for i, pair in enumerate(pairs):
                field = f"sandbox.{kind.replace('-', '_')}s[{i}]"
                if not isinstance(pair, tuple | list) or len(pair) != 2:
                    raise SpecError(field, "expected a (source, destination) pair")
                entries.append((kind, os.path.realpath(_abs(pair[0], field + ".source")),
                                _abs(pair[1], field + ".destination")))
        self.binds = tuple(entries)
        self.tmpfs = tuple(_abs(d, f"sandbox.tmpfs[{i}]") for i, d in enumerate(tmpfs))
        self.dirs = tuple(_abs(d, f"sandbox.dirs[{i}]") for i, d in enumerate(dirs))
        links = []
        for i, pair in enumerate(symlinks):
            field = f"sandbox.symlinks[{i}]"
            if not isinstance(pair, tuple | list) or len(pair) != 2 or not pair[0]:
                raise SpecError(field, "expected a (target, destination) pair")
            if "\0" in str(pair[0]):
                raise SpecError(field, "target must not contain a NUL byte")
            links.append((str(pair[0]), _abs(pair[1], field + ".destination")))
        self.symlinks = tuple(links)
        if (not isinstance(hostname, str) or not 0 < len(hostname) <= 64
                or any(c in hostname for c in "/\0 ")):
            raise SpecError("sandbox.hostname", f"expected 1-64 characters without '/', "
                                                f"spaces or NUL, got {hostname!r}")
        self.hostname = hostname
        self.share_net = bool(share_net)
        for field, value in (("sandbox.uid", uid), ("sandbox.gid", gid)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < 2**32 - 1):
                raise SpecError(field, f"expected an id in 0..4294967294, got {value!r}")
        self.uid = uid
        self.gid = gid
        if privileged and (os.geteuid() != 0 or (uid or 0) != 0):
            raise SpecError("sandbox.privileged", "only for a root caller with uid 0")
        self.privileged = bool(privileged)

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SandboxSpec:
        spec = cls.__new__(cls)
        for name in cls.__slots__:
            value = data[name]
            setattr(spec, name, tuple(tuple(v) if isinstance(v, list) else v for v in value)
                    if isinstance(value, list) else value)  # extra keys: hold, join
        return spec

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"SandboxSpec({fields})"


def check_workdir(box: SandboxSpec, cwd: str) -> str:
    """The host directory the default profile binds read-write; never / (that would lay
    the whole host over the new root)."""
    real = os.path.realpath(cwd)
    if box.root is None and (real == "/" or any(real == p or real.startswith(p + "/")
                                                for p in ("/proc", "/sys", "/dev"))):
        raise SpecError("cwd", f"the sandbox binds the working directory read-write; {real} "
                               "would expose the host's / or its kernel interfaces: run from "
                               "a project directory")
    return real


def sandbox_steps(box: SandboxSpec, cwd: str, hold: bool = False, join: int = 0,
                  terminal: bool = False) -> tuple[list[Step], list[Step]]:
    """(steps for the relay and init, steps for the step process after pivot_root).

    hold: the sandbox's pid 1 keeps it alive instead of running a step (Sandbox.start);
    join: the pid of such a pid 1, whose namespaces the step enters (Sandbox.run).
    """
    euid, egid = os.geteuid(), os.getegid()
    inside_uid = euid if box.uid is None else box.uid
    inside_gid = egid if box.gid is None else box.gid
    if join:
        as_root = euid == 0 and not box.privileged
        return ([("join_sandbox", (join, euid == 0))],
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


