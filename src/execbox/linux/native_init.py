"""A sandbox's pid 1 with no interpreter in it: a few dozen bytes of machine code, run by a
clone of the supervisor that shares its memory (CLONE_VM), so it costs no pages of its own.

A pid namespace needs a pid 1 that reaps what is orphaned inside and whose death ends
everything inside. Nothing else: the step can be the supervisor's own child in that
namespace (the supervisor forks it after the clone, before it points its children's pid
namespace back), so the supervisor waits for it, signals it and learns its exact status
itself. A Python pid 1 doing the same costs one more process with about 2 MB of copied
pages per step, and its fork and its exit are on every launch's path.

What the code does, as the x86-64 assembly it was made from says (arg in %rdi):

    mov %rdi,%rbx
    rt_sigprocmask(SIG_SETMASK, arg, NULL, 8) every signal blocked, glibc's own two too
    rt_sigaction(sig, arg+40, NULL, 8)        for sig 1..64: SIG_DFL (the clone copied the
                                              supervisor's handlers)
    rt_sigprocmask(SIG_SETMASK, arg+24, ...)  only SIGCHLD stays blocked
    prctl(PR_SET_PDEATHSIG, SIGKILL)          die with the supervisor
    prctl(PR_SET_NAME, arg+8)                 "execbox-init" in ps
    poll(arg+32, 1, 0)                        the supervisor's pidfd: gone already?
    testw $0x39, arg+38 ; jnz out             (POLLIN|ERR|HUP|NVAL) then exit(255)
    close_range(0, ~0, 0)                     hold none of the supervisor's files
  loop:
    wait4(-1, NULL, __WALL, NULL)             reap; a child or EINTR: again
    cmp $-ECHILD,%rax ; jne loop
    rt_sigtimedwait(arg+24, NULL, NULL, 8)    none: sleep until SIGCHLD (it is blocked,
    jmp loop                                  so one that comes meanwhile stays pending)
  out:
    exit(255)

Every signal is blocked in it from the clone on, by the supervisor and then by its first
instruction for the two that glibc never blocks (a handler of the supervisor's must never
run there, on its few bytes of stack), until every disposition is SIG_DFL again.
Then only SIGCHLD stays blocked (for sigtimedwait): a namespace's init drops every other
signal with the default action (the kernel's SIGNAL_UNKILLABLE rule), whoever sends it. A
blocked signal is never dropped but queued: with all of them blocked, a step running as
host uid 0 (SandboxSpec(privileged=True)) could queue real-time signals on pid 1 by the
hundred thousand, and they count against host root's RLIMIT_SIGPENDING (every root
process's sigqueue and timer_create then fail with EAGAIN). SIGKILL, from the supervisor
or the parent-death signal, is its only end.

Architectures without code here keep a Python pid 1 (child/init.py), as does a host where
the code cannot be mapped executable, or any caller with EXECBOX_NATIVE_INIT=off in its
environment (a way out, should a kernel ever treat this pid 1 differently).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import signal

from .arch import current, kernel_before
from .forksafe import ForkLock
from .syscalls import _lib, block_all_signals, restore_signal_mask

# Assembled with GNU as from the listing above (objcopy -O binary -j .text).
_CODE = {
    "x86_64": bytes.fromhex(
        "4889fbbf020000004889de31d241ba08000000b80e0000000f0541bc010000004489e7488d732831"
        "d241ba08000000b80d0000000f0541ffc44183fc4076e1bf02000000488d731831d241ba08000000"
        "b80e0000000f05bf01000000be09000000b89d0000000f05bf0f000000488d7308b89d0000000f05"
        "488d7b20be0100000031d2b8070000000f0566f743263900754331ffbeffffffff31d2b8b4010000"
        "0f05bfffffffff31f6ba000000404531d2b83d0000000f054883f8f675e4488d7b1831f631d241ba"
        "08000000b8800000000f05ebcdbfff000000b83c0000000f05"),
}
NAME = b"execbox-init"
# Each clone gets the next slot of a ring of small stacks. glibc's clone() writes the
# function and its argument on the new stack before the syscall and the child pops them
# and pushes a return address in their place (the code itself uses no stack): two clones
# made at once (threads of a shared supervisor) on one stack could hand the second a
# return address as its argument. A slot comes round again only after _STACK_SLOTS more
# clones, long after its pid 1 made those three moves.
_STACK_SLOT = 64
_STACK_SLOTS = 1024
CLONE_VM = 0x00000100
_PROT_READ, _PROT_WRITE, _PROT_EXEC = 1, 2, 4
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_POLLIN = 0x1


class _Arg(ctypes.Structure):
    """What the code reads at arg: offsets 0 (mask), 8 (name), 24 (sigset), 32 (pollfd),
    40 (a struct sigaction of zeros: SIG_DFL)."""

    _fields_ = [("mask", ctypes.c_uint64), ("name", ctypes.c_char * 16),
                ("sigset", ctypes.c_uint64), ("fd", ctypes.c_int32),
                ("events", ctypes.c_int16), ("revents", ctypes.c_int16),
                ("default_action", ctypes.c_uint64 * 4)]


class _Loaded:
    """The code mapped executable, the ring of stacks and one arg for every clone of this
    process (a clone writes only poll's revents there, the same for all), and the pidfd of
    the process that clones (a supervisor opens its own at its first clone; the fork
    server, which only loads the code, opens none for its forks to inherit)."""

    def __init__(self, entry: int) -> None:
        self.entry = entry
        self.stacks = ctypes.create_string_buffer(_STACK_SLOT * (_STACK_SLOTS + 1))
        self.slots = itertools.count()  # (next() is atomic under the interpreter lock)
        self.arg = _Arg(mask=(1 << 64) - 1, name=NAME, sigset=1 << (signal.SIGCHLD - 1),
                        events=_POLLIN)
        self.pidfd_of = 0
        self.pidfd = -1

    def next_top(self) -> int:
        """The top of the next stack slot (16-byte aligned, as the ABI wants)."""
        base = (ctypes.addressof(self.stacks) + _STACK_SLOT - 1) & ~(_STACK_SLOT - 1)
        return base + (next(self.slots) % _STACK_SLOTS + 1) * _STACK_SLOT

    def own_pidfd(self) -> int:
        if self.pidfd_of != os.getpid():
            with _loading:  # (threads cloning their first at once open one, not one each)
                if self.pidfd_of != os.getpid():
                    self.pidfd = os.pidfd_open(os.getpid())  # close-on-exec
                    self.pidfd_of = os.getpid()
        return self.pidfd


_loaded: _Loaded | None = None
_unavailable: str | None = None
# Threads of a shared supervisor may ask at once. Two loads would make two rings and two
# args, and the one the global drops would be freed under the clones still reading it
# (they popped a garbage function and argument, and ran it in the supervisor's memory).
_loading = ForkLock()


def _load() -> _Loaded:
    libc = _lib()
    code = _CODE.get(current())
    if code is None:
        raise OSError(errno.ENOSYS, f"no native pid 1 for {current()}")
    if kernel_before(5, 9):
        raise OSError(errno.ENOSYS, "close_range needs Linux 5.9")
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    page = libc.mmap(None, 4096, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS,
                     -1, 0)
    if page in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    ctypes.memmove(page, code, len(code))
    # Never writable and executable at once; a policy that forbids executable anonymous
    # memory (SELinux execmem) fails here, and the Python pid 1 serves.
    if int(libc.mprotect(ctypes.c_void_p(page), ctypes.c_size_t(4096),
                         ctypes.c_int(_PROT_READ | _PROT_EXEC))) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    return _Loaded(page)


def available() -> bool:
    """Whether this process can clone native pid 1s (tried once per process tree)."""
    global _loaded, _unavailable
    if _loaded is None and _unavailable is None:
        with _loading:
            if _loaded is None and _unavailable is None:
                if os.environ.get("EXECBOX_NATIVE_INIT") == "off":
                    _unavailable = "EXECBOX_NATIVE_INIT=off"
                    return False
                try:
                    _loaded = _load()
                except (OSError, AttributeError) as exc:
                    _unavailable = str(exc)
    return _loaded is not None


def why_unavailable() -> str | None:
    """Why available() said no (None if it did not, or was not asked)."""
    return _unavailable


def clone_init() -> int:
    """A native pid 1: call after unshare(CLONE_NEWPID) (its first child is the new
    namespace's pid 1). Its exit signal is SIGCHLD, so it is reaped like any child."""
    if not available():
        raise OSError(errno.ENOSYS, f"native pid 1: {_unavailable}")
    assert _loaded is not None
    libc = _lib()
    _loaded.arg.fd = _loaded.own_pidfd()
    previous = block_all_signals()  # the clone starts with this mask and keeps it
    try:
        pid = int(libc.clone(ctypes.c_void_p(_loaded.entry), ctypes.c_void_p(_loaded.next_top()),
                             ctypes.c_int(CLONE_VM | signal.SIGCHLD),
                             ctypes.byref(_loaded.arg)))
        err = ctypes.get_errno()
    finally:
        restore_signal_mask(previous)
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid
