"""ctypes wrappers for prctl and friends; everything else uses the os module."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

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


def prctl(option: int, arg2: int = 0) -> int:
    """Call prctl(2) with one argument; raises OSError on failure."""
    rc = int(_lib().prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)))
    _check(0 if rc >= 0 else rc, f"prctl({option})")
    return rc


def set_child_subreaper(enabled: bool = True) -> None:
    """Make orphaned descendants reparent to this process instead of init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1 if enabled else 0)


def is_child_subreaper() -> bool:
    value = ctypes.c_int(0)
    rc = int(_lib().prctl(ctypes.c_int(PR_GET_CHILD_SUBREAPER), ctypes.byref(value),
                          ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)))
    _check(rc, "prctl(PR_GET_CHILD_SUBREAPER)")
    return bool(value.value)


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send signum when the parent thread exits (0 clears it)."""
    prctl(PR_SET_PDEATHSIG, signum)
