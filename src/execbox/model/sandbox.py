"""SandboxSpec: what a sandboxed step may see, validated and frozen; and how a step relates
to a long-lived sandbox (its role)."""

from __future__ import annotations

import os

from .errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# A step's relation to a sandbox: "new" builds one for this step alone, "hold" builds one
# whose pid 1 keeps it alive for later runs (Sandbox.start), "join" enters such a sandbox.
SANDBOX_ROLES = ("new", "hold", "join")

DEFAULT_HOST_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
UNPRIVILEGED_HOST_ID = 65534  # what a root caller's sandbox is mapped onto ("nobody")


def step_host_id(sandboxed: bool) -> int | None:
    """The host id a step runs as when it is not the caller's: a root caller's sandboxed
    step's (files made for it, such as its stdout, must be its own); None otherwise."""
    return UNPRIVILEGED_HOST_ID if sandboxed and os.geteuid() == 0 else None


def _host(value: object, field: str) -> str:
    """A path on the host: relative to the current directory, as bubblewrap takes it."""
    if isinstance(value, str | bytes | os.PathLike):
        text = os.fsdecode(os.fspath(value))
        if text and "\0" not in text and not text.startswith("/"):
            value = os.path.abspath(text)
    return os.path.realpath(_abs(value, field))


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
    # normpath keeps a leading "//" (POSIX leaves its meaning to the system; on Linux it is
    # "/"): one spelling per path, so that checks such as "a bind over /" see it.
    return "/" + os.path.normpath(value).lstrip("/")


class SandboxSpec:
    """What a sandboxed step sees. SandboxSpec() is the default profile: read-only host
    /usr, /bin, /sbin, /lib*, /etc, fresh /proc, minimal /dev, tmpfs /tmp, and the working
    directory read-write. root=DIR uses DIR (read-only) as the input root instead.

    bind_workdir=False leaves the working directory unbound: cwd is then a path inside the
    sandbox, reached through binds (a build farm worker binds each action's input root at
    one fixed path, so absolute paths in outputs do not depend on where it was staged).

    root_writable=True makes root=DIR itself the read-write root (a chroot with a fresh
    /proc, /sys, /dev and /tmp, like Buildbarn's chroot into the input root): missing mount
    points for those are created in DIR, and DIR is bound as it is, never idmapped.

    idmap=False keeps a root caller's read-write binds and working directory plain binds:
    the step (host id 65534) then writes only where the files' modes let that id write, so
    files its binds share with others (a worker's hardlinked input cache, owned by the bind's
    owner) never become the step's to chmod or write."""

    __slots__ = ("bind_workdir", "binds", "dirs", "gid", "hostname", "idmap", "privileged",
                 "root", "root_writable", "share_net", "symlinks", "tmpfs", "uid")

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 ro_binds: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                 binds: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                 dev_binds: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                 tmpfs: list[str] | tuple[str, ...] = (),
                 dirs: list[str] | tuple[str, ...] = (),
                 symlinks: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                 hostname: str = "execbox", share_net: bool = False,
                 uid: int | None = None, gid: int | None = None,
                 privileged: bool = False, bind_workdir: bool = True,
                 root_writable: bool = False, idmap: bool = True) -> None:
        # Host-side paths are resolved here: inside the sandbox setup the host's root is at
        # /oldroot, where an absolute symlink would point somewhere else.
        self.root = None if root is None else _host(root, "sandbox.root")
        entries: list[tuple[str, str, str]] = []
        for kind, pairs in (("ro-bind", ro_binds), ("bind", binds), ("dev-bind", dev_binds)):
            for i, pair in enumerate(_listed(pairs, f"sandbox.{kind.replace('-', '_')}s")):
                field = f"sandbox.{kind.replace('-', '_')}s[{i}]"
                if not isinstance(pair, tuple | list) or len(pair) != 2:
                    raise SpecError(field, "expected a (source, destination) pair")
                entries.append((kind, _host(pair[0], field + ".source"),
                                _abs(pair[1], field + ".destination")))
        self.binds = tuple(entries)
        self.tmpfs = tuple(_abs(d, f"sandbox.tmpfs[{i}]")
                           for i, d in enumerate(_listed(tmpfs, "sandbox.tmpfs")))
        if "/" in self.tmpfs:
            raise SpecError(f"sandbox.tmpfs[{self.tmpfs.index('/')}]",
                            "a tmpfs on / would hide every other mount of the sandbox (its "
                            "root is a fresh one already): leave it out")
        self.dirs = tuple(_abs(d, f"sandbox.dirs[{i}]")
                          for i, d in enumerate(_listed(dirs, "sandbox.dirs")))
        links = []
        for i, pair in enumerate(_listed(symlinks, "sandbox.symlinks")):
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
        for field, flag in (("share_net", share_net), ("privileged", privileged),
                            ("bind_workdir", bind_workdir), ("root_writable", root_writable),
                            ("idmap", idmap)):
            if not isinstance(flag, bool):
                raise SpecError(f"sandbox.{field}", f"expected True or False, got {flag!r}")
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
        self.bind_workdir = bool(bind_workdir) and self.root is None
        if root_writable and self.root is None:
            raise SpecError("sandbox.root_writable", "needs root=DIR (the directory to make "
                                                     "the read-write root)")
        if root_writable and _exposes_host(self.root or ""):
            raise SpecError("sandbox.root", f"{self.root} would expose the host's / or its "
                                            "kernel interfaces read-write")
        self.root_writable = bool(root_writable)
        self.idmap = bool(idmap)

    @property
    def cwd_inside(self) -> bool:
        """Whether the step's cwd names a path inside the sandbox (not a host directory)."""
        return not self.bind_workdir

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


def _listed(value: Any, field: str) -> list[Any] | tuple[Any, ...]:
    """A list or tuple as it is; a single string is refused, not walked letter by letter."""
    if not isinstance(value, list | tuple):
        raise SpecError(field, f"expected a list, got {type(value).__name__}")
    return value


def _exposes_host(real: str) -> bool:
    """/ or a kernel interface: never bound read-write into a sandbox."""
    return real == "/" or any(real == p or real.startswith(p + "/")
                              for p in ("/proc", "/sys", "/dev"))


def check_workdir(box: SandboxSpec, cwd: str) -> str:
    """The host directory the default profile binds read-write; never / (that would lay
    the whole host over the new root)."""
    real = os.path.realpath(cwd)
    if box.bind_workdir and _exposes_host(real):
        raise SpecError("cwd", f"the sandbox binds the working directory read-write; {real} "
                               "would expose the host's / or its kernel interfaces: run from "
                               "a project directory")
    system = next((p for p in DEFAULT_HOST_PATHS if real == p or real.startswith(p + "/")),
                  real if real in _SHARED_DIRECTORIES or _world_writable(real) else None)
    if box.bind_workdir and system is not None:
        shown = " (the sandbox shows it read-only otherwise)" if system in DEFAULT_HOST_PATHS \
            else ""
        raise SpecError("cwd", f"the sandbox binds the working directory read-write, which "
                               f"would make the host's {real} writable by the step{shown}: "
                               "run from a project directory")
    for index, dest in enumerate(box.tmpfs if box.bind_workdir else ()):
        if real == dest or real.startswith(dest.rstrip("/") + "/"):
            raise SpecError(f"sandbox.tmpfs[{index}]",
                            f"a tmpfs on {dest} would hide the working directory {real}, "
                            "which the sandbox binds there: mount it elsewhere, or run "
                            "from another directory")
    return real


def _world_writable(path: str) -> bool:
    """A directory every user may write in (sticky, as /tmp, /run/lock, /var/crash): a
    shared one, whoever made it, never a project's."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & stat.S_IWOTH) and bool(mode & stat.S_ISVTX)


def check_device_binds(box: SandboxSpec, rules: list[str] | None) -> None:
    """A device bound into the sandbox must be one its device rules let the step open: else
    the step's open() fails with a bare EPERM from the cgroup, far from the cause."""
    sources = [source for kind, source, _ in box.binds if kind == "dev-bind"]
    if rules is None or not sources:
        return
    import stat

    from .devices import allowed, parse_rule

    parsed = [parse_rule(rule) for rule in rules]
    for index, source in enumerate(sources):
        try:
            mode = os.stat(source)
        except OSError:
            continue  # the bind step says what is wrong with it
        if not (stat.S_ISCHR(mode.st_mode) or stat.S_ISBLK(mode.st_mode)):
            continue
        node = "c" if stat.S_ISCHR(mode.st_mode) else "b"
        major, minor = os.major(mode.st_rdev), os.minor(mode.st_rdev)
        if not any(allowed(parsed, node, major, minor, access) for access in "rw"):
            raise SpecError(f"sandbox.dev_binds[{index}].source",
                            f"{source} is device {node} {major}:{minor}, which the sandbox's "
                            f"device rules do not let the step open: allow it with the rule "
                            f"'{node} {major}:{minor} rwm' (--device, or devices=[...])")


# Directories of the whole host (every user's, the package manager's, the system's logs
# and spools): never a step's read-write working directory, though a project directory below
# them can be. The world-writable ones are here too: bound for a root caller's step, the
# step would own the host's sticky /tmp (and so could remove every user's files there).
_SHARED_DIRECTORIES = frozenset({"/var", "/root", "/home", "/boot", "/opt", "/srv", "/run",
                                 "/mnt", "/media", "/tmp", "/var/tmp", "/dev/shm", "/var/lib",
                                 "/var/log", "/var/cache", "/var/spool", "/var/mail",
                                 "/var/backups", "/var/local", "/var/opt", "/var/www"})
