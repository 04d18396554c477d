"""Sandbox steps that build the new root: private mounts, a scratch root, binds resolved
inside the new root, /proc, /sys, /dev, then pivot_root into it.

Fail closed: every bind is nosuid (and nodev unless it is a dev-bind), read-only binds are
read-only down to their last submount, also on kernels without mount_setattr, and every
mount target is opened with openat2(RESOLVE_IN_ROOT), so `evil -> /` or `../..` in an input
root cannot make execbox touch the host.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from contextlib import contextmanager

from ..linux import syscalls as sc
from .context import ChildContext
from .namespaces import idmap_key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

# Everything a step needs is imported above: after pivot_root the package is out of reach.

BASE = "/tmp"  # the scratch tmpfs is mounted here, inside our private mount namespace only
NEWROOT = "/newroot"
OLDROOT = "/oldroot"
PROC_FD = OLDROOT + "/proc/self/fd"  # the host's procfs stays reachable until enter_root

# False forces the remount fallback that kernels without mount_setattr (< 5.12) take.
USE_MOUNT_SETATTR = True

READ_ONLY = (sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOSUID,
             sc.MS_RDONLY | sc.MS_NODEV | sc.MS_NOSUID)
READ_WRITE = (sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOSUID, sc.MS_NODEV | sc.MS_NOSUID)
DEVICES = (sc.MOUNT_ATTR_NOSUID, sc.MS_NOSUID)
_BIND_ATTRS = {"ro-bind": READ_ONLY, "bind": READ_WRITE, "dev-bind": DEVICES}


def prepare_base(ctx: ChildContext) -> None:
    """Private mounts, a scratch tmpfs as root, the host's root kept at /oldroot."""
    ctx.label = "mount private"
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    ctx.label = f"mount tmpfs {BASE}"
    sc.mount("tmpfs", BASE, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")
    os.mkdir(BASE + OLDROOT)
    os.mkdir(BASE + NEWROOT)
    ctx.label = "pivot_root into scratch"
    sc.pivot_root(BASE, BASE + OLDROOT)
    os.chdir("/")


def new_root(ctx: ChildContext, source: str) -> None:
    """The future / : a tmpfs, read-only at the end. An input root's top-level entries are
    bound into it read-only (symlinks copied), so mount points are made in the tmpfs and the
    input root itself is never written."""
    ctx.label = "mount tmpfs /"
    sc.mount("tmpfs", NEWROOT, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")
    if not source:
        return
    ctx.label = f"root {source}"
    ctx.path_tried = source
    host = OLDROOT + source
    for name in sorted(os.listdir(host)):
        path = f"{host}/{name}"
        if os.path.islink(path):
            os.symlink(os.readlink(path), f"{NEWROOT}/{name}")
        elif os.path.isdir(path):
            os.mkdir(f"{NEWROOT}/{name}", 0o755)
            sc.mount(path, f"{NEWROOT}/{name}", None, sc.MS_BIND | sc.MS_REC)
            set_tree_attrs(f"{NEWROOT}/{name}", READ_ONLY)
        else:
            os.close(os.open(f"{NEWROOT}/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            sc.mount(path, f"{NEWROOT}/{name}", None, sc.MS_BIND)
            set_tree_attrs(f"{NEWROOT}/{name}", READ_ONLY)


# -- attributes on a whole mount tree --------------------------------------------------
def set_tree_attrs(target: str, attrs: tuple[int, int]) -> None:
    """(MOUNT_ATTR_* bits, MS_* flags) on the mount at target and every mount below it
    (MS_NODEV/MS_NOSUID are ignored on a new bind, so they are set afterwards)."""
    if USE_MOUNT_SETATTR:
        try:
            sc.set_mount_attrs(target, attrs[0])
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
    for point in mounts_below(os.path.realpath(target)):
        remount_flags(point, attrs[1])


def mounts_below(top: str) -> list[str]:
    """top and every mount point below it, from our mountinfo, shallowest first."""
    info = OLDROOT + "/proc/self/mountinfo"
    if not os.path.exists(info):
        info = "/proc/self/mountinfo"
    with open(info) as f:
        points = [_unescape(line.split()[4]) for line in f]
    prefix = top.rstrip("/") + "/"
    below = {p for p in points if p.startswith(prefix)}
    return [top, *sorted(below, key=lambda p: (p.count("/"), p))]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def remount_flags(target: str, flags: int) -> None:
    """Remount one mount with flags added, keeping the ones a user namespace may not drop."""
    st = os.statvfs(target)
    locked = 0
    for flag, bit in ((os.ST_NOSUID, sc.MS_NOSUID), (os.ST_NODEV, sc.MS_NODEV),
                      (os.ST_NOEXEC, sc.MS_NOEXEC), (os.ST_NOATIME, 1024),
                      (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21)):
        if st.f_flag & flag:
            locked |= bit
    sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | locked | flags)


# -- targets resolved inside the new root ------------------------------------------------
def _resolve(dest: str, kind: str) -> int:
    """An O_PATH fd for dest inside the new root, creating it (a directory or an empty file)
    if missing; symlinks and '..' are resolved inside the root and can never leave it."""
    return resolve_in(NEWROOT, dest, kind)


def resolve_in(root_path: str, dest: str, kind: str, proc_fd: str = PROC_FD) -> int:
    """_resolve inside the root at root_path; proc_fd: a procfs's self/fd as the caller
    sees it (to reopen O_PATH directories; a supervisor making mount points in a ready
    sandbox's root for a job, spawn/launcher_program.py). What it makes is 0755 (a file
    0644) whatever the umask: a job's umask (umask=0o077) is for what the step writes, and
    must not leave it a working directory below a parent it may not enter."""
    root = os.open(root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if dest in _SYSTEM_MOUNT_POINTS:
            _refuse_symlink(root, dest)
        parts = [p for p in dest.split("/") if p and p != "."]
        current = os.dup(root)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            prefix = "/".join(parts[: i + 1])
            try:
                fd = sc.openat2_in_root(root, prefix, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                if part == "..":
                    raise
                with _directory(current, proc_fd) as directory:
                    file = last and kind == "file"
                    if file:
                        made = os.open(part, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC
                                       | os.O_NOFOLLOW, 0o644, dir_fd=directory)
                    else:
                        os.mkdir(part, 0o755, dir_fd=directory)
                        made = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                       | os.O_CLOEXEC, dir_fd=directory)
                    try:  # (the modes above were masked by the umask)
                        os.fchmod(made, 0o644 if file else 0o755)
                    finally:
                        os.close(made)
                fd = sc.openat2_in_root(root, prefix, os.O_PATH | os.O_CLOEXEC)
            os.close(current)
            current = fd
        return current
    finally:
        os.close(root)


# Where the sandbox's own /proc, /sys, /dev and /tmp go. An input root's entry of that name
# that is a symbolic link would have them mounted over wherever it points (proc -> bin
# would hide /bin): refused, naming the entry, instead of a puzzling failure later.
_SYSTEM_MOUNT_POINTS = frozenset({"/proc", "/sys", "/dev", "/tmp"})


def _refuse_symlink(root: int, dest: str) -> None:
    try:
        entry = sc.openat2_in_root(root, dest.lstrip("/"),
                                   os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISLNK(os.fstat(entry).st_mode):
            raise OSError(errno.ELOOP, f"{dest} is a symbolic link in the root")
    finally:
        os.close(entry)


@contextmanager
def _directory(path_fd: int, proc_fd: str = PROC_FD) -> Iterator[int]:
    """mkdirat needs a real directory fd: the O_PATH one reopened through /proc."""
    fd = os.open(f"{proc_fd}/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _mount_at(dest: str, kind: str, source: str | None, fstype: str | None, flags: int,
              data: str | None = None) -> None:
    fd = _resolve(dest, kind)
    try:
        sc.mount(source, f"{PROC_FD}/{fd}", fstype, flags, data)
    finally:
        os.close(fd)


def _attrs_at(dest: str, kind: str, attrs: tuple[int, int]) -> None:
    """set_tree_attrs on the mount now at dest (resolved inside the root)."""
    fd = _resolve(dest, kind)
    try:
        set_tree_attrs(f"{PROC_FD}/{fd}", attrs)
    finally:
        os.close(fd)


# -- binds ---------------------------------------------------------------------------------
def bind(ctx: ChildContext, kind: str, source: str, dest: str,
         owner: list[int] | None = None) -> None:
    """ro-bind, bind or dev-bind a host path (seen under /oldroot) at dest. owner: for a
    root caller's read-write bind, the (uid, gid) whose files the step gets to own, through
    an idmapped bind (see prepare_idmaps)."""
    ctx.label = f"{kind} {source} -> {dest}"
    ctx.path_tried = source
    host = OLDROOT + source
    os.lstat(host)  # a missing source is named as the source
    ctx.path_tried = dest  # from here on, failures are about the destination in the root
    target_kind = "dir" if os.path.isdir(host) else "file"
    if kind == "bind" and owner is not None and _idmapped_bind(ctx, host, dest, owner):
        return
    _mount_at(dest, target_kind, host, None, sc.MS_BIND | sc.MS_REC)
    _attrs_at(dest, target_kind, _BIND_ATTRS[kind])


def bind_workdir(ctx: ChildContext, dest: str, owner: list[int] | None = None) -> None:
    """The working directory, read-write. For a root caller whose step is mapped onto an
    unprivileged host id it is an idmapped bind (its owner's files appear as the step's),
    so the step can write there and nowhere else; otherwise a plain bind."""
    ctx.label = f"bind {dest} -> {dest}"
    ctx.path_tried = dest
    if not os.path.lexists(OLDROOT + dest):  # the step's working directory, missing:
        ctx.label = "chdir"  # said as an unsandboxed step's chdir says it
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), dest)
    if owner is not None and _idmapped_bind(ctx, OLDROOT + dest, dest, owner):
        return
    _mount_at(dest, "dir", OLDROOT + dest, None, sc.MS_BIND | sc.MS_REC)
    _attrs_at(dest, "dir", READ_WRITE)


def _idmapped_bind(ctx: ChildContext, host: str, dest: str, owner: list[int]) -> bool:
    """open_tree + mount_setattr(MOUNT_ATTR_IDMAP, nodev, nosuid) + move_mount onto dest
    resolved inside the root. False where the filesystem cannot be idmapped (EINVAL): the
    caller then makes a plain bind, which grants less, never more."""
    userns = ctx.extra.get(idmap_key(owner[0], owner[1]), -1)
    if userns < 0:
        return False
    what = f"idmapped bind {host[len(OLDROOT):]} -> {dest}"
    ctx.label = f"{what} (open_tree)"
    ctx.path_tried = host[len(OLDROOT):]
    tree = sc.open_tree_clone(host)
    ctx.path_tried = dest
    try:
        ctx.label = f"{what} (mount_setattr)"
        try:
            sc.idmap_mount(tree, userns, READ_WRITE[0])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False
        ctx.label = f"{what} (move_mount)"
        target = _resolve(dest, "dir" if os.path.isdir(host) else "file")
        try:
            sc.move_mount_to_fd(tree, target)
        finally:
            os.close(target)
    finally:
        os.close(tree)
    return True


# -- other mounts ------------------------------------------------------------------------
def tmpfs(ctx: ChildContext, dest: str, mode: str = "0755", owner: int = -1) -> None:
    """A tmpfs owned by the step's host id (owner >= 0), so the step can write to it."""
    ctx.label = f"tmpfs {dest}"
    ctx.path_tried = dest
    data = f"mode={mode}" + (f",uid={owner},gid={owner}" if owner >= 0 else "")
    _mount_at(dest, "dir", "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, data)


def make_dir(ctx: ChildContext, dest: str) -> None:
    ctx.label = f"dir {dest}"
    ctx.path_tried = dest
    os.close(_resolve(dest, "dir"))


def symlink(ctx: ChildContext, target: str, dest: str) -> None:
    ctx.label = f"symlink {target} -> {dest}"
    ctx.path_tried = dest
    parent, name = os.path.split(dest.rstrip("/"))
    fd = _resolve(parent or "/", "dir")
    try:
        with _directory(fd) as directory:
            os.symlink(target, name, dir_fd=directory)
    finally:
        os.close(fd)


PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")  # the kernel-wide knobs in /proc


def mount_proc(ctx: ChildContext) -> None:
    """A fresh procfs of the new pid namespace; the kernel-wide knobs read-only."""
    ctx.label = "mount /proc"
    _mount_at("/proc", "dir", "proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for sub in PROC_READ_ONLY:
        path = f"{NEWROOT}/proc/{sub}"
        if not os.path.exists(path):
            continue
        ctx.label = f"read-only /proc/{sub}"
        sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
        _attrs_at(f"/proc/{sub}", "dir", READ_ONLY)


def proc_of_this_pid_namespace(ctx: ChildContext) -> None:
    """A run of a long-lived sandbox, as its own pid 1: the sandbox's /proc shows the
    sandbox's pid namespace, not the run's, so `ps`, /proc/self and /proc/$$ would be
    wrong in it. A mount namespace of the run's own gets a procfs of the run's pid
    namespace, with the kernel-wide knobs read-only as in mount_proc."""
    ctx.label = "the run's own /proc"
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)  # nothing we mount reaches the box
    sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for sub in PROC_READ_ONLY:
        path = f"/proc/{sub}"
        if os.path.exists(path):
            ctx.label = f"read-only {path} (the run's own /proc)"
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            set_tree_attrs(path, READ_ONLY)


def mount_sys(ctx: ChildContext) -> None:
    """Read-only sysfs where the kernel allows a fresh one, else a read-only bind."""
    ctx.label = "mount /sys"
    flags = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    try:
        _mount_at("/sys", "dir", "sysfs", "sysfs", flags)
    except OSError:
        _mount_at("/sys", "dir", OLDROOT + "/sys", None, sc.MS_BIND | sc.MS_REC)
        _attrs_at("/sys", "dir", READ_ONLY)


DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


def mount_dev(ctx: ChildContext) -> None:
    """/dev as a tmpfs with the usual nodes (bound from the host), its own devpts, shm."""
    ctx.label = "mount /dev"
    _mount_at("/dev", "dir", "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755")
    for node in DEV_NODES:
        ctx.label = f"dev-bind /dev/{node}"
        ctx.path_tried = f"/dev/{node}"
        _mount_at(f"/dev/{node}", "file", f"{OLDROOT}/dev/{node}", None, sc.MS_BIND)
    ctx.label = "mount /dev/pts"
    _mount_at("/dev/pts", "dir", "devpts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=620")
    for target, name in (("pts/ptmx", "ptmx"), ("/proc/self/fd", "fd"),
                         ("/proc/self/fd/0", "stdin"), ("/proc/self/fd/1", "stdout"),
                         ("/proc/self/fd/2", "stderr")):
        os.symlink(target, f"{NEWROOT}/dev/{name}")
    ctx.label = "mount /dev/shm"
    _mount_at("/dev/shm", "dir", "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777")


def enter_root(ctx: ChildContext, read_only_root: bool) -> None:
    """Drop the host's root and make the new root "/" (pivot_root . . then detach)."""
    idmaps = {ctx.extra.pop(key) for key in [k for k in ctx.extra if k.startswith("idmap ")]}
    for fd in idmaps - {ctx.extra.get("userns_fd", -1)}:
        os.close(fd)  # the idmapped binds are made
    if read_only_root:
        ctx.label = "read-only /"
        fd = _resolve("/", "dir")
        try:  # only the tmpfs itself: /tmp, the working directory stay writable
            remount_flags(f"{PROC_FD}/{fd}", sc.MS_RDONLY)
        finally:
            os.close(fd)
    _pivot_into_new_root(ctx)


def enter_root_ahead(ctx: ChildContext) -> None:
    """The new root becomes "/" before the job, the host's detached: for the step launcher
    (child/handoff.py), whose job's binds come as mount trees its supervisor copied from
    its own view of the host (spawn/launcher_program.py), and which makes "/" read-only."""
    _pivot_into_new_root(ctx)


def _pivot_into_new_root(ctx: ChildContext) -> None:
    ctx.label = "detach host root"
    sc.umount2(OLDROOT, sc.MNT_DETACH)
    ctx.label = "pivot_root"
    os.chdir(NEWROOT)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
