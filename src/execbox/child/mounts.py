"""Sandbox steps: user and other namespaces, a new root built with safe mounts, pid 1.

The child that runs these is the supervisor's direct child ("relay"). After unshare it
forks pid 1 of the new pid namespace ("init"), which builds the root and pivots into it,
then forks the step itself. The relay and init never return from their fork step: they
forward signals, reap, and exit with the step's exact status. When init exits the kernel
kills whatever is left in the namespace, so no escapee survives the step (seeds 002, 003).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import struct
import termios
import time

from ..linux import syscalls as sc
from ..linux.arch import ioctl_number
from ..linux.terminal import make_raw, set_window_size, terminal_size
from .context import ChildContext

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# Everything a step needs is imported above: after pivot_root the package is out of reach.

BASE = "/tmp"  # the scratch tmpfs is mounted here, inside our private mount namespace only
NEWROOT = "/newroot"
OLDROOT = "/oldroot"
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)
_STATUS = struct.Struct("i")
PROC_FD = OLDROOT + "/proc/self/fd"  # the host's procfs stays reachable until enter_root


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# -- identity --------------------------------------------------------------------------
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


def prepare_user_namespace(ctx: ChildContext, inside_uid: int, inside_gid: int,
                           host_uid: int, host_gid: int) -> None:
    """A root caller: make (but do not enter) a user namespace mapping the step's ids onto
    an unprivileged host id. Setup keeps real root; the step joins it at the end, and the
    working directory can be idmapped with it."""
    ctx.label = "user namespace"
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # lives only until the namespace has its maps and an fd
        try:
            os.close(ready_r)
            os.close(done_w)
            sc.unshare(sc.CLONE_NEWUSER)
            # Our pid in the procfs at hand (the host's; we are in a new pid namespace).
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
        _write(f"/proc/{seen_as}/setgroups", "deny")
        ctx.path_tried = f"/proc/{seen_as}/uid_map"
        _write(f"/proc/{seen_as}/uid_map", f"{inside_uid} {host_uid} 1\n")
        _write(f"/proc/{seen_as}/gid_map", f"{inside_gid} {host_gid} 1\n")
        ctx.extra["userns_fd"] = os.open(f"/proc/{seen_as}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        ctx.extra["inside_uid"], ctx.extra["inside_gid"] = inside_uid, inside_gid
    finally:
        os.close(done_w)  # the holder exits; the namespace lives on through the fd
        os.close(ready_r)
        os.waitpid(holder, 0)


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


def _exit_like(status: int) -> None:
    """Exit the way the step did: same code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if os.getpid() != 1:
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _forward_to(pid: int) -> Callable[[int, object], None]:
    """A handler passing the signal on; harmless once pid has already exited."""

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    return forward


def fork_relay(ctx: ChildContext) -> None:
    """Fork pid 1 of the new pid namespace; this process stays outside as its relay."""
    ctx.label = "fork init"
    status_r, status_w = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(status_r)
        ctx.extra["status_fd"] = status_w
        return
    os.close(status_w)
    os.close(ctx.error_fd)
    for sig in _FORWARDED:
        signal.signal(sig, _forward_to(init))
    while True:
        try:
            _, status = os.waitpid(init, 0)
            break
        except ChildProcessError:
            os._exit(255)
    reported = os.read(status_r, _STATUS.size)
    if len(reported) == _STATUS.size:  # init exits normally; this is the step's status
        status = _STATUS.unpack(reported)[0]
    _exit_like(status)


def fork_step(ctx: ChildContext) -> None:
    """Fork the step; this process (pid 1) forwards signals, reaps everything, and exits
    with the step's status, which takes every other process of the namespace with it."""
    ctx.label = "fork step"
    master = ctx.extra.pop("pty_master", -1)
    slave = ctx.extra.pop("pty_slave", -1)
    step = os.fork()
    if step == 0:
        os.close(ctx.extra.pop("status_fd"))
        if slave >= 0:  # the step's own terminal, from the sandbox's devpts
            ctx.label = "setsid (sandbox terminal)"
            os.close(master)
            os.setsid()
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            os.close(slave)
            ctx.label = "tiocsctty (sandbox terminal)"
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        return
    os.close(ctx.error_fd)
    status_fd = ctx.extra["status_fd"]
    for sig in _FORWARDED:
        if sig != signal.SIGWINCH or master < 0:
            signal.signal(sig, _forward_to(step))
    if master >= 0:
        os.close(slave)
        status = _relay_terminal(master, step)
    else:
        for fd in (0, 1, 2):  # a leaked copy of the output would delay its end
            os.close(fd)
        status = _reap_until(step)
    os.write(status_fd, _STATUS.pack(status))
    _exit_like(status)


def _reap_until(step: int) -> int:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(255)
        if pid == step:
            return status


def _relay_terminal(master: int, step: int) -> int:
    """Copy between the outer terminal (fds 0/1) and the sandbox terminal's master, follow
    the outer size, reap; after the step ends, drain the master until EIO (bounded)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGWINCH, lambda *_: None)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    status: int | None = None
    drain_until = 0.0
    inputs = [master, 0, wake_r]
    while True:
        if status is None:
            try:
                pid, st = os.waitpid(step, os.WNOHANG)
            except ChildProcessError:
                pid, st = step, 0
            if pid == step:
                status, drain_until = st, time.monotonic() + 2.0
        if status is not None and (master not in inputs or time.monotonic() > drain_until):
            break
        ready, _, _ = select.select(inputs, [], [], 0.1 if status is not None else 1.0)
        for fd in ready:
            if fd == wake_r:
                if signal.SIGWINCH in os.read(wake_r, 64):
                    size = terminal_size(0)
                    if size is not None:
                        set_window_size(master, size)
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                inputs.remove(fd)
                continue
            _write_all(1 if fd == master else master, data)
    while True:  # every other process of the namespace dies with us; reap what has exited
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return status


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:
            return


def open_sandbox_terminal(ctx: ChildContext) -> None:
    """A pty from the sandbox's own devpts for the step; the outer one (fd 0) becomes the
    raw transport, and the step's terminal gets its modes and size."""
    ctx.label = "pty_open_master (sandbox)"
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    ctx.label = "pty_unlockpt (sandbox)"
    fcntl.ioctl(master, ioctl_number("TIOCSPTLCK"), struct.pack("i", 0))
    ctx.label = "pty_get_slave (sandbox)"
    slave = fcntl.ioctl(master, ioctl_number("TIOCGPTPEER"),
                        os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    ctx.label = "pty_window_size (sandbox)"
    termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(0))
    size = terminal_size(0)
    if size is not None:
        set_window_size(master, size)
    make_raw(0)
    ctx.extra["pty_master"], ctx.extra["pty_slave"] = master, slave


# -- building the root -----------------------------------------------------------------
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
            _make_readonly(f"{NEWROOT}/{name}")
        else:
            os.close(os.open(f"{NEWROOT}/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            sc.mount(path, f"{NEWROOT}/{name}", None, sc.MS_BIND)
            _make_readonly(f"{NEWROOT}/{name}")


def _make_nodev(target: str) -> None:
    """nodev on a whole bound tree (MS_NODEV is ignored on a new bind)."""
    try:
        sc.set_mount_attrs(target, sc.MOUNT_ATTR_NODEV)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        _remount_flags(target, sc.MS_NODEV)


def _make_readonly(target: str) -> None:
    """Read-only and nodev, recursively (submounts too); a plain remount where the kernel
    lacks mount_setattr."""
    try:
        sc.set_mount_attrs(target, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NODEV)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        _remount_flags(target, sc.MS_RDONLY | sc.MS_NODEV)


def _resolve(dest: str, kind: str) -> int:
    """An O_PATH fd for dest inside the new root, creating it (a directory or an empty file)
    if missing; symlinks and '..' are resolved inside the root and can never leave it."""
    root = os.open(NEWROOT, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
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
                if last and kind == "file":
                    os.close(os.open(part, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC
                                     | os.O_NOFOLLOW, 0o644, dir_fd=_dirfd(current)))
                else:
                    os.mkdir(part, 0o755, dir_fd=_dirfd(current))
                fd = sc.openat2_in_root(root, prefix, os.O_PATH | os.O_CLOEXEC)
            os.close(current)
            current = fd
        return current
    finally:
        os.close(root)


def _dirfd(path_fd: int) -> int:
    """mkdirat needs a real directory fd; reopen the O_PATH one through /proc."""
    fd = os.open(f"{PROC_FD}/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _OPEN_DIRS.append(fd)
    return fd


_OPEN_DIRS: list[int] = []


def _release_dirs() -> None:
    while _OPEN_DIRS:
        os.close(_OPEN_DIRS.pop())


def _mount_at(dest: str, kind: str, source: str | None, fstype: str | None, flags: int,
              data: str | None = None) -> None:
    fd = _resolve(dest, kind)
    try:
        sc.mount(source, f"{PROC_FD}/{fd}", fstype, flags, data)
    finally:
        os.close(fd)
        _release_dirs()


def _remount_flags(target: str, flags: int) -> None:
    """Remount one mount with flags added, keeping the ones a user namespace may not drop."""
    st = os.statvfs(target)
    locked = 0
    for flag, bit in ((os.ST_NOSUID, sc.MS_NOSUID), (os.ST_NODEV, sc.MS_NODEV),
                      (os.ST_NOEXEC, sc.MS_NOEXEC), (os.ST_NOATIME, 1024),
                      (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21)):
        if st.f_flag & flag:
            locked |= bit
    sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | locked | flags)


def _remount_readonly(dest: str, recursive: bool = True) -> None:
    fd = _resolve(dest, "dir")
    try:
        target = f"{PROC_FD}/{fd}"
        if recursive:
            _make_readonly(target)
        else:
            _remount_flags(target, sc.MS_RDONLY)
    finally:
        os.close(fd)
        _release_dirs()


def bind(ctx: ChildContext, kind: str, source: str, dest: str) -> None:
    """ro-bind, bind or dev-bind a host path (seen under /oldroot) at dest."""
    ctx.label = f"{kind} {source} -> {dest}"
    ctx.path_tried = source
    host = OLDROOT + source
    target_kind = "dir" if os.path.isdir(host) else "file"
    _mount_at(dest, target_kind, host, None, sc.MS_BIND | sc.MS_REC)
    if kind == "ro-bind":
        _remount_readonly(dest)
    elif kind == "bind":  # MS_NODEV is ignored on a new bind; set it on the whole tree
        fd = _resolve(dest, target_kind)
        try:
            _make_nodev(f"{PROC_FD}/{fd}")
        finally:
            os.close(fd)
            _release_dirs()


def bind_workdir(ctx: ChildContext, dest: str, idmap: bool) -> None:
    """The working directory, read-write. For a root caller whose step is mapped onto an
    unprivileged host id it is an idmapped bind (its owner's files appear as the step's),
    so the step can write there and nowhere else; otherwise a plain bind."""
    ctx.label = f"bind {dest} -> {dest}"
    ctx.path_tried = dest
    userns = ctx.extra.get("userns_fd", -1)
    if not idmap or userns < 0:
        _mount_at(dest, "dir", OLDROOT + dest, None, sc.MS_BIND | sc.MS_REC)
        fd = _resolve(dest, "dir")
        try:
            _make_nodev(f"{PROC_FD}/{fd}")
        finally:
            os.close(fd)
            _release_dirs()
        return
    ctx.label = f"idmapped bind {dest} -> {dest} (open_tree)"
    tree = sc.open_tree_clone(OLDROOT + dest)
    try:
        ctx.label = f"idmapped bind {dest} -> {dest} (mount_setattr)"
        sc.idmap_mount(tree, userns)
        ctx.label = f"idmapped bind {dest} -> {dest} (move_mount)"
        os.close(_resolve(dest, "dir"))  # creates it inside the root
        _release_dirs()
        # The default profile's root is our own tmpfs, so the plain path is as safe here.
        sc.move_mount(tree, NEWROOT + dest)
    finally:
        os.close(tree)


def tmpfs(ctx: ChildContext, dest: str, mode: str = "0755", owner: int = -1) -> None:
    """A tmpfs owned by the step's host id (owner >= 0), so the step can write to it."""
    ctx.label = f"tmpfs {dest}"
    data = f"mode={mode}" + (f",uid={owner},gid={owner}" if owner >= 0 else "")
    _mount_at(dest, "dir", "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, data)


def make_dir(ctx: ChildContext, dest: str) -> None:
    ctx.label = f"dir {dest}"
    os.close(_resolve(dest, "dir"))
    _release_dirs()


def symlink(ctx: ChildContext, target: str, dest: str) -> None:
    ctx.label = f"symlink {target} -> {dest}"
    parent, name = os.path.split(dest.rstrip("/"))
    fd = _resolve(parent or "/", "dir")
    try:
        os.symlink(target, name, dir_fd=_dirfd(fd))
    finally:
        os.close(fd)
        _release_dirs()


def mount_proc(ctx: ChildContext) -> None:
    """A fresh procfs of the new pid namespace; the kernel-wide knobs read-only."""
    ctx.label = "mount /proc"
    _mount_at("/proc", "dir", "proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for sub in ("sys", "sysrq-trigger", "irq", "bus"):
        path = f"{NEWROOT}/proc/{sub}"
        if not os.path.exists(path):
            continue
        ctx.label = f"read-only /proc/{sub}"
        sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
        _remount_readonly(f"/proc/{sub}")


def mount_sys(ctx: ChildContext) -> None:
    """Read-only sysfs where the kernel allows a fresh one, else a read-only bind."""
    ctx.label = "mount /sys"
    flags = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    try:
        _mount_at("/sys", "dir", "sysfs", "sysfs", flags)
    except OSError:
        _mount_at("/sys", "dir", OLDROOT + "/sys", None, sc.MS_BIND | sc.MS_REC)
        _remount_readonly("/sys")


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


def enter_root(ctx: ChildContext, read_only_root: bool) -> None:
    """Drop the host's root and make the new root "/" (pivot_root . . then detach)."""
    if read_only_root:
        ctx.label = "read-only /"
        _remount_readonly("/", recursive=False)  # only the tmpfs: /tmp, cwd stay writable
    ctx.label = "detach host root"
    sc.umount2(OLDROOT, sc.MNT_DETACH)
    ctx.label = "pivot_root"
    os.chdir(NEWROOT)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def drop_privileges(ctx: ChildContext) -> None:
    """No capabilities, no way to gain any (no_new_privs), whatever the ids are."""
    ctx.label = "drop capabilities"
    sc.drop_all_capabilities()
    ctx.label = "no_new_privs"
    sc.set_no_new_privs()


# -- long-lived sandboxes ----------------------------------------------------------------
USERNS_FD_IN_INIT = 3  # where a held sandbox's pid 1 keeps the step user namespace's fd


def hold(ctx: ChildContext) -> None:
    """pid 1 of a long-lived sandbox: keep the namespaces alive and reap whatever later
    runs join them, until SIGTERM/SIGINT/SIGHUP; its exit then kills everything inside."""
    ctx.label = "hold"
    userns = ctx.extra.pop("userns_fd", -1)
    if userns >= 0:
        os.dup2(userns, USERNS_FD_IN_INIT, inheritable=False)
    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    watched = [*stops, signal.SIGCHLD]
    for sig in watched:  # handlers, or pid 1 would never see them
        signal.signal(sig, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    os.close(ctx.error_fd)  # setup is complete: the caller sees the start succeed
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    while True:
        info = signal.sigtimedwait(watched, 5.0)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if info is not None and info.si_signo in stops:
            os._exit(0)


_JOIN_ORDER = ("ipc", "uts", "net", "cgroup", "pid", "mnt")


def join_sandbox(ctx: ChildContext, init_pidfd: int, as_root: bool) -> None:
    """Enter a held sandbox's namespaces (user first when unprivileged), then fork so the
    step is inside its pid namespace; this process stays outside as the relay."""
    ctx.label = "join sandbox"
    with open(f"/proc/self/fdinfo/{init_pidfd}") as info:
        init = next(int(line.split()[1]) for line in info if line.startswith("Pid:"))
    ctx.path_tried = f"/proc/{init}/ns"
    names = _JOIN_ORDER if as_root else ("user", *_JOIN_ORDER)
    fds = [os.open(f"/proc/{init}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in names]
    if as_root:
        try:
            ctx.extra["userns_fd"] = os.open(f"/proc/{init}/fd/{USERNS_FD_IN_INIT}",
                                             os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass  # privileged sandbox: no user namespace
    try:
        for name, fd in zip(names, fds, strict=True):
            ctx.label = f"setns {name}"
            sc.setns(fd, 0)
    finally:
        for fd in fds:
            os.close(fd)
    os.chdir("/")
    fork_relay(ctx)
    ctx.extra.pop("status_fd", None)
