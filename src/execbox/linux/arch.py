"""Syscall and ioctl numbers per CPU architecture.

execbox makes a few syscalls by number (syscall(2)) and a few ioctls the os and termios
modules lack. Those numbers depend on the architecture, and a wrong one silently runs a
different syscall, so they live in one table keyed by the machine. An architecture without
a table fails at the first raw call, not at import: plain steps need none of these.
"""

from __future__ import annotations

import errno
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Literal, TypeVar

    K = TypeVar("K", bound=str)

    SyscallName = Literal["pivot_root", "capset", "bpf", "open_tree", "move_mount",
                          "openat2", "mount_setattr", "pidfd_getfd", "kcmp", "keyctl"]
    IoctlName = Literal["TIOCSPTLCK", "TIOCGPTPEER", "SIOCGIFFLAGS", "SIOCSIFFLAGS"]

KNOWN: tuple[str, ...] = ("x86_64", "aarch64")
ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}  # BSD and Debian spellings

# Syscalls added since Linux 5.1 (424 and up) got one number on all these architectures;
# the older ones were numbered separately for each.
_UNIFIED: dict[SyscallName, int] = {
    "open_tree": 428, "move_mount": 429, "openat2": 437, "pidfd_getfd": 438,
    "mount_setattr": 442}

SYSCALLS: dict[str, dict[SyscallName, int]] = {
    "x86_64": {"pivot_root": 155, "capset": 126, "bpf": 321, "kcmp": 312, "keyctl": 250,
               **_UNIFIED},
    "aarch64": {"pivot_root": 41, "capset": 91, "bpf": 280, "kcmp": 272,  # asm-generic
                "keyctl": 219, **_UNIFIED},
}

# What the step launcher (linux/launcher.c) is told to call, by number: only for the
# architectures it is built for (linux/launcher_code.py).
StepSyscallName = str
STEP_SYSCALLS: dict[str, dict[StepSyscallName, int]] = {
    "x86_64": {"close": 3, "open": 2, "fcntl": 72, "umask": 95, "chdir": 80, "dup3": 292,
               "unshare": 272, "setns": 308, "sethostname": 170, "umount2": 166,
               "pivot_root": 155, "setresuid": 117, "setresgid": 119, "prctl": 157,
               "capset": 126, "prlimit64": 302, "close_range": 436, "keyctl": 250,
               **{str(name): number for name, number in _UNIFIED.items()}},
}

# x86_64 and aarch64 take their tty ioctls from asm-generic/ioctls.h. powerpc, mips, sparc,
# alpha and parisc have their own values (and _IOW encoding), so a new architecture gets its
# own checked entry here; nothing falls back to these.
_GENERIC_TTY: dict[IoctlName, int] = {
    "TIOCSPTLCK": 0x40045431,  # _IOW('T', 0x31, int)
    "TIOCGPTPEER": 0x5441,     # _IO('T', 0x41)
}
# linux/sockios.h has no per-architecture variant for these.
_SOCKET: dict[IoctlName, int] = {"SIOCGIFFLAGS": 0x8913, "SIOCSIFFLAGS": 0x8914}

IOCTLS: dict[str, dict[IoctlName, int]] = {
    "x86_64": {**_GENERIC_TTY, **_SOCKET},
    "aarch64": {**_GENERIC_TTY, **_SOCKET},
}


class UnsupportedArchitecture(OSError):
    """A raw syscall or ioctl was needed on a machine execbox has no numbers for."""

    def __init__(self, machine: str) -> None:
        super().__init__(errno.ENOSYS, f"execbox has no syscall table for architecture "
                         f"{machine!r} (known: {', '.join(KNOWN)})")
        self.machine = machine


def normalize(machine: str) -> str:
    """The table's name for a uname machine string (amd64 -> x86_64, arm64 -> aarch64)."""
    machine = machine.strip().lower()
    return ALIASES.get(machine, machine)


_current: str | None = None


def current() -> str:
    """This process's architecture. A 32-bit process on a 64-bit kernel (i386 on x86_64,
    arm on aarch64) uses another syscall table than uname suggests, so it is named apart."""
    global _current
    if _current is None:
        name = normalize(os.uname().machine)
        _current = name if sys.maxsize > 2**32 else f"{name} (32-bit process)"
    return _current


def kernel_before(major: int, minor: int) -> bool:
    """Whether the running kernel is older than major.minor (False if uname's release cannot
    be read as numbers: a feature is then tried, not assumed missing)."""
    try:
        found = tuple(int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return found < (major, minor)


def is_known(machine: str | None = None) -> bool:
    return (current() if machine is None else normalize(machine)) in SYSCALLS


def _numbers(tables: Mapping[str, Mapping[K, int]], machine: str | None) -> Mapping[K, int]:
    arch = current() if machine is None else normalize(machine)
    numbers = tables.get(arch)
    if numbers is None:
        raise UnsupportedArchitecture(arch)
    return numbers


def syscall_number(name: SyscallName, machine: str | None = None) -> int:
    """The number to pass to syscall(2); raises UnsupportedArchitecture."""
    return _numbers(SYSCALLS, machine)[name]


def ioctl_number(name: IoctlName, machine: str | None = None) -> int:
    """The request number for ioctl(2); raises UnsupportedArchitecture."""
    return _numbers(IOCTLS, machine)[name]
