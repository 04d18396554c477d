"""What building a plan reads of the host, through one door, so that it can be recorded.

A plan is a function of the request and of the few host facts read here (the owner of a
directory to idmap, which of the host's top directories are symlinks, the nofile limit,
the supervisor's working directory). plan/kept.py keeps plans by request and uses a kept
one only while every one of these reads still gives the answer it gave.
"""

from __future__ import annotations

import os
import resource
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Read = tuple[str, tuple[Any, ...], Any]  # (kind, arguments, answer)

_recording = threading.local()  # (a shared supervisor plans on several threads)


def _owner(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_uid, st.st_gid]


def _nofile() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


_KINDS: dict[str, Callable[..., Any]] = {
    "owner": _owner, "isdir": os.path.isdir, "islink": os.path.islink,
    "readlink": os.readlink, "nofile": _nofile, "cwd": os.getcwd,
}


def _read(kind: str, *args: Any) -> Any:
    answer = _KINDS[kind](*args)
    log: list[Read] | None = getattr(_recording, "log", None)
    if log is not None:
        log.append((kind, args, answer))
    return answer


def owner(path: str) -> list[int] | None:
    """[uid, gid] of path, None if it cannot be stat'ed."""
    return _read("owner", path)  # type: ignore[no-any-return]


def isdir(path: str) -> bool:
    return _read("isdir", path)  # type: ignore[no-any-return]


def islink(path: str) -> bool:
    return _read("islink", path)  # type: ignore[no-any-return]


def readlink(path: str) -> str:
    """Raises OSError (then nothing is recorded: a plan that fails is not kept)."""
    return _read("readlink", path)  # type: ignore[no-any-return]


def nofile() -> tuple[int, int]:
    """This process's (soft, hard) RLIMIT_NOFILE."""
    return _read("nofile")  # type: ignore[no-any-return]


def cwd() -> str:
    return _read("cwd")  # type: ignore[no-any-return]


def start_recording() -> list[Read]:
    """Record this thread's reads into the list returned, until stop_recording()."""
    log: list[Read] = []
    _recording.log = log
    return log


def stop_recording() -> None:
    _recording.log = None


def still_true(log: list[Read]) -> bool:
    """Whether every read recorded in log gives the same answer now."""
    for kind, args, answer in log:
        try:
            if _KINDS[kind](*args) != answer:
                return False
        except OSError:
            return False
    return True
