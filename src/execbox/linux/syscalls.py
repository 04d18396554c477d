"""ctypes wrappers for prctl and friends; everything else uses the os module."""

from __future__ import annotations

import ctypes
import errno
import os

from .arch import syscall_number

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .arch import SyscallName

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def raw_syscall(name: SyscallName, *args: object) -> int:
    """syscall(2) by name, with this architecture's number (UnsupportedArchitecture if none);
    returns the raw result, -1 with errno set on failure."""
    return int(_lib().syscall(ctypes.c_long(syscall_number(name)), *args))


def prctl(option: int, arg2: int = 0) -> int:
    """Call prctl(2) with one argument; raises OSError on failure."""
    rc = int(_lib().prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)))
    _check(0 if rc >= 0 else rc, f"prctl({option})")
    return rc


def set_child_subreaper(enabled: bool = True) -> None:
    """Make orphaned descendants reparent to this process instead of init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1 if enabled else 0)


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send signum when the parent thread exits (0 clears it)."""
    prctl(PR_SET_PDEATHSIG, signum)


# -- namespaces, mounts, capabilities (used by the sandbox steps) -----------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Capability sets are two 32-bit words (version 3), so no capability number exceeds 63.
# Dropping one the kernel does not know fails with EINVAL and is skipped.
CAP_LAST_POSSIBLE = 63

OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOVE_MOUNT_T_EMPTY_PATH = 0x00000040
MOUNT_ATTR_IDMAP = 0x00100000


def _path(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    _check(int(_lib().unshare(ctypes.c_int(flags))), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    rc = int(_lib().mount(_path(source), _path(target), _path(fstype), ctypes.c_ulong(flags),
                          _path(data)))
    _check(rc, f"mount {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(int(_lib().umount2(_path(target), ctypes.c_int(flags))), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    rc = raw_syscall("pivot_root", _path(new_root), _path(put_old))
    _check(rc, "pivot_root")


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


_cap_last: int | None = None


def last_capability() -> int:
    """The highest capability this kernel knows; read once per process, and inherited by
    its forks (a sandboxed step's pid 1 calls drop_all_capabilities between fork and exec,
    where opening a file costs more than the whole drop)."""
    global _cap_last
    if _cap_last is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                _cap_last = int(f.read())
        except (OSError, ValueError):
            _cap_last = CAP_LAST_POSSIBLE
    return _cap_last


def drop_all_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets."""
    call = _lib().prctl
    for cap in range(last_capability() + 1):  # an unknown cap fails (EINVAL): skipped
        call(PR_CAPBSET_DROP, cap, 0, 0, 0)
    call(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)  # 0: this thread
    data = (ctypes.c_uint32 * 6)()  # two (effective, permitted, inheritable) words, all 0
    _check(raw_syscall("capset", header, data), "capset")


KEYCTL_GET_KEYRING_ID, KEYCTL_JOIN_SESSION_KEYRING = 0, 1
KEY_SPEC_SESSION_KEYRING = -3
_keyrings: list[bool] = []


def keyrings_usable() -> bool:
    """Whether this process may use keyctl(2) at all (asked once): not where the kernel
    has no keyrings (ENOSYS) or a seccomp filter refuses the call (Docker's default
    profile: EPERM), which every process below this one inherits, so a step could not
    reach a keyring either."""
    if not _keyrings:
        rc = raw_syscall("keyctl", ctypes.c_int(KEYCTL_GET_KEYRING_ID),
                         ctypes.c_int(KEY_SPEC_SESSION_KEYRING), ctypes.c_int(0))
        _keyrings.append(rc >= 0 or ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM,
                                                                   errno.EACCES))
    return _keyrings[0]


def join_new_session_keyring() -> bool:
    """A new, empty session keyring for this process (keyctl(2) with no name), as runc
    gives each container: the caller's session keyring, and the keys an earlier step left
    in it, are out of reach. False where the kernel has no keyrings (ENOSYS)."""
    rc = raw_syscall("keyctl", ctypes.c_int(KEYCTL_JOIN_SESSION_KEYRING), ctypes.c_char_p(None))
    if rc < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            return False
        raise OSError(err, f"keyctl(KEYCTL_JOIN_SESSION_KEYRING): {os.strerror(err)}")
    return True


CGROUP_SUPER_MAGIC = 0x27E0EB  # cgroup v1's filesystem (statfs f_type)


def look_up(*names: str) -> None:
    """Look names up in libc now: ctypes keeps what it found, so a forked child calling
    them never runs the dynamic linker's lookup (and its lock, which another thread of the
    parent may have held at the fork)."""
    libc = _lib()
    for name in names:
        getattr(libc, name)


def filesystem_type(fd: int) -> int:
    """fstatfs(2)'s f_type for fd (the first field of struct statfs on every Linux
    architecture); raises OSError."""
    buffer = ctypes.create_string_buffer(256)  # (struct statfs: 120 bytes on 64-bit)
    _check(int(_lib().fstatfs(ctypes.c_int(fd), buffer)), "fstatfs")
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount tree at path (for an idmapped bind)."""
    fd = raw_syscall("open_tree", ctypes.c_int(AT_FDCWD), _path(path),
                     ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE))
    if fd < 0:
        _check(fd, f"open_tree {path}")
    return fd


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def idmap_mount(tree_fd: int, userns_fd: int, attrs: int = 0, propagation: int = 0) -> None:
    """Give a detached mount tree the id mapping of the user namespace userns_fd (and the
    further MOUNT_ATTR_* attrs), recursively."""
    set_tree_attrs_at(tree_fd, MOUNT_ATTR_IDMAP | attrs, userns_fd, propagation)


def set_tree_attrs_at(tree_fd: int, attrs: int, userns_fd: int = 0,
                      propagation: int = 0) -> None:
    """mount_setattr on the mount tree tree_fd names (an open_tree fd), recursively;
    propagation: MS_PRIVATE and the like, 0 to leave it."""
    attr = _MountAttr(attrs, 0, propagation, userns_fd)
    rc = raw_syscall("mount_setattr", ctypes.c_int(tree_fd), b"",
                     ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE), ctypes.byref(attr),
                     ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(rc, "mount_setattr(MOUNT_ATTR_IDMAP)" if attrs & MOUNT_ATTR_IDMAP
           else "mount_setattr")


def move_mount(tree_fd: int, target: str) -> None:
    rc = raw_syscall("move_mount", ctypes.c_int(tree_fd), b"", ctypes.c_int(AT_FDCWD),
                     _path(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    _check(rc, f"move_mount {target}")


def move_mount_to_fd(tree_fd: int, target_fd: int) -> None:
    """Attach a detached mount on the inode target_fd (an O_PATH fd) names: no path is
    looked up again, so nothing can be swapped in between."""
    rc = raw_syscall("move_mount", ctypes.c_int(tree_fd), b"", ctypes.c_int(target_fd), b"",
                     ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
    _check(rc, "move_mount")


RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2_in_root(root_fd: int, path: str, flags: int) -> int:
    """Open path as if root_fd were "/": symlinks and ".." cannot leave it."""
    how = _OpenHow(flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = raw_syscall("openat2", ctypes.c_int(root_fd), _path(path), ctypes.byref(how),
                     ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        _check(fd, f"openat2 {path}")
    return fd


def setns(fd: int, nstype: int) -> None:
    """Enter a namespace fd, or (a pidfd, Linux >= 5.8) several of a process's at once."""
    _check(int(_lib().setns(ctypes.c_int(fd), ctypes.c_int(nstype))), "setns")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A close-on-exec duplicate of another process's fd, found through its pidfd (no
    /proc/<pid>/fd path, which could name another process once the pid is reused)."""
    fd = raw_syscall("pidfd_getfd", ctypes.c_int(pidfd), ctypes.c_int(target_fd),
                     ctypes.c_uint(0))
    if fd < 0:
        _check(fd, f"pidfd_getfd {target_fd}")
    return fd


MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

IFF_UP = 0x1  # linux/if.h, for SIOCSIFFLAGS


def set_mount_attrs(path: str, attrs: int, recursive: bool = True) -> None:
    """mount_setattr: set attributes on the mount at path and, recursively, its submounts."""
    attr = _MountAttr(attrs, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    rc = raw_syscall("mount_setattr", ctypes.c_int(AT_FDCWD), _path(path),
                     ctypes.c_uint(flags), ctypes.byref(attr),
                     ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(rc, f"mount_setattr {path}")


# -- signal masks and namespace holders without a fork --------------------------------
SIG_SETMASK = 2
_SIGSET_BYTES = 128  # glibc's sigset_t (1024 bits): more than any kernel mask


def block_all_signals() -> ctypes.Array[ctypes.c_char]:
    """Block every signal in this thread; returns the previous mask for
    restore_signal_mask. signal.pthread_sigmask does the same but turns each of the 64
    numbers into an enum both ways, which costs more than the fork it guards."""
    full = ctypes.create_string_buffer(b"\xff" * _SIGSET_BYTES, _SIGSET_BYTES)
    previous = ctypes.create_string_buffer(_SIGSET_BYTES)
    rc = int(_lib().pthread_sigmask(ctypes.c_int(SIG_SETMASK), full, previous))
    if rc != 0:
        raise OSError(rc, f"pthread_sigmask: {os.strerror(rc)}")
    return previous


def restore_signal_mask(previous: ctypes.Array[ctypes.c_char]) -> None:
    rc = int(_lib().pthread_sigmask(ctypes.c_int(SIG_SETMASK), previous, None))
    if rc != 0:
        raise OSError(rc, f"pthread_sigmask: {os.strerror(rc)}")


CLONE_VM = 0x00000100
WAIT_ALL = 0x40000000  # __WALL: wait for a child whatever its exit signal
_HOLDER_STACK = 16384


def clone_exiting(flags: int) -> int:
    """A child in new namespaces (flags: CLONE_NEW*) that exits at once; its pid.

    The child shares this process's memory (CLONE_VM) and runs nothing but libc's getpid,
    on a stack of its own, with every signal blocked: no page table is copied and no
    Python runs in it. Until reap_clone(pid) it stays a zombie, whose /proc/PID/ns links
    and id maps still reach the namespaces it made (its credentials live until it is
    reaped); it has no exit signal, so SIGCHLD being ignored cannot reap it early."""
    libc = _lib()
    stack = ctypes.create_string_buffer(_HOLDER_STACK)  # kept until the child is reaped
    top = (ctypes.addressof(stack) + _HOLDER_STACK - 64) & ~15
    entry = ctypes.cast(libc.getpid, ctypes.c_void_p)
    # Held from before the clone: an exception on the way out (a signal handler's, run
    # once the mask is restored) must not free the stack while the child may run on it.
    key = -ctypes.addressof(stack)  # no pid
    _holder_stacks[key] = stack
    pid = -1
    try:
        previous = block_all_signals()
        try:
            pid = int(libc.clone(entry, ctypes.c_void_p(top),
                                 ctypes.c_int(flags | CLONE_VM), None))
            err = ctypes.get_errno()
        finally:
            restore_signal_mask(previous)
    except BaseException:
        if pid > 0:  # reaped here: nobody else can (a child with no exit signal)
            _holder_stacks[pid] = _holder_stacks.pop(key)
            reap_clone(pid)
        raise  # (with no pid to reap, the stack stays held: the child may exist)
    if pid < 0:
        del _holder_stacks[key]
        raise OSError(err, f"clone: {os.strerror(err)}")
    _holder_stacks[pid] = _holder_stacks.pop(key)
    return pid


_holder_stacks: dict[int, ctypes.Array[ctypes.c_char]] = {}


KCMP_VM = 1


def same_memory(pid: int, other: int) -> bool:
    """Whether two processes share one address space (a CLONE_VM clone and its parent):
    their memory must then be counted once."""
    rc = raw_syscall("kcmp", ctypes.c_int(pid), ctypes.c_int(other), ctypes.c_int(KCMP_VM),
                     ctypes.c_ulong(0), ctypes.c_ulong(0))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"kcmp: {os.strerror(err)}")
    return rc == 0


def reap_clone(pid: int) -> None:
    """Reap a clone_exiting child (it has exited, or is about to)."""
    try:
        os.waitpid(pid, WAIT_ALL)
    except ChildProcessError:
        pass
    _holder_stacks.pop(pid, None)


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_malloc_arena() -> None:
    """Have glibc's malloc keep one arena for every thread (where it is glibc). Threads
    that allocate only while holding Python's interpreter lock gain nothing from an arena
    each, and each would keep the memory one job freed for the rest of the process's life."""
    try:
        _lib().mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(1))
    except AttributeError:  # not glibc
        pass


def trim_malloc() -> None:
    """Give the memory malloc holds free back to the kernel (glibc's malloc_trim)."""
    try:
        _lib().malloc_trim(ctypes.c_size_t(0))
    except AttributeError:
        pass
