"""Why an execve failed, looked at from where the step stands.

A sandboxed step's failing child (or its pid 1, for a posix_spawn launch) computes this
itself, after pivot_root and with the step's own ids, so a hint only ever names what the
step could see and read: the supervisor may be root on the host, where the same path can
be another file (a secret's first line must not reach a client as an "interpreter"). Only
regular files are opened, without blocking, so a FIFO or a device is never opened for it.
"""

from __future__ import annotations

import errno
import os
import stat

_HEAD_SIZE = 512
_MAX_TABLE = 1 << 16  # an ELF program header table is far smaller; a crafted one is not read
_PATH_MAX = 4096


def _regular(path: str) -> os.stat_result | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found if stat.S_ISREG(found.st_mode) else None


def _read(path: str, offset: int, size: int) -> bytes:
    """size bytes at offset of path if it is a regular file; b"" otherwise."""
    if _regular(path) is None:
        return b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the stat
            return b""
        return os.pread(fd, size, offset)
    except OSError:
        return b""
    finally:
        os.close(fd)


def shebang_interpreter(head: bytes) -> str | None:
    if not head.startswith(b"#!"):
        return None
    # The kernel splits the #! line at spaces and tabs only: a CR stays in the name.
    words = [w for w in head[2:].split(b"\n", 1)[0].replace(b"\t", b" ").split(b" ") if w]
    return os.fsdecode(words[0]) if words else ""


def _elf_interpreter(head: bytes, path: str) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF file, if it has one."""
    if not head.startswith(b"\x7fELF") or len(head) < 64 or head[4] != 2 or head[5] != 1:
        return None
    phoff = int.from_bytes(head[32:40], "little")
    phentsize = int.from_bytes(head[54:56], "little")
    phnum = int.from_bytes(head[56:58], "little")
    table = _read(path, phoff, min(phentsize * phnum, _MAX_TABLE))
    for i in range(len(table) // phentsize if phentsize else 0):
        entry = table[i * phentsize:(i + 1) * phentsize]
        if int.from_bytes(entry[0:4], "little") == 3:  # PT_INTERP
            offset = int.from_bytes(entry[8:16], "little")
            size = int.from_bytes(entry[32:40], "little")
            return os.fsdecode(_read(path, offset, min(size, _PATH_MAX)).rstrip(b"\0"))
    return None


def _not_found(path: str) -> str:
    if "/" not in path:
        return f"{path!r} was not found in any directory of the step's PATH"
    if not os.path.lexists(path):
        return f"{path} does not exist"
    if os.path.islink(path) and not os.path.exists(path):
        return f"{path} is a dangling symbolic link"
    head = _read(path, 0, _HEAD_SIZE)
    interpreter = shebang_interpreter(head)
    if interpreter is not None:
        if interpreter == "":
            return f"the #! line of {path} names no interpreter"
        if interpreter.endswith("\r"):
            return (f"the #! line of {path} ends in a carriage return, so the kernel looks "
                    f"for the interpreter {interpreter!r}: the file has CRLF (Windows) "
                    "line endings; convert it (dos2unix, or sed -i 's/\\r$//')")
        return (f"the #! line of {path} names the interpreter {interpreter}, "
                "which does not exist")
    loader = _elf_interpreter(head, path)
    if loader is not None and not os.path.exists(loader):
        return f"{path} needs the ELF interpreter {loader}, which does not exist"
    return f"{path} exists but something it needs to start is missing"


def _denied(path: str) -> str:
    try:
        found = os.stat(path)
    except OSError:
        return f"a directory on the way to {path} is not searchable"
    if stat.S_ISDIR(found.st_mode):
        return f"{path} is a directory"
    if not stat.S_ISREG(found.st_mode):
        return f"{path} is not a regular file"
    if not found.st_mode & 0o111:
        mode = stat.S_IMODE(found.st_mode)
        return f"{path} lacks the execute bit (mode {mode:04o}); chmod +x it"
    interpreter = shebang_interpreter(_read(path, 0, _HEAD_SIZE))
    if interpreter:
        return f"the #! interpreter {interpreter} of {path} cannot be executed"
    return f"{path} is on a noexec mount or the step may not execute it"


def explain(code: int, path: str) -> str:
    """The hint for execve(path) failing with code; "" when there is nothing to add (or
    when looking fails: a hint must never hide the failure it explains)."""
    try:
        return _explain(code, path)
    except Exception:
        return ""


def _explain(code: int, path: str) -> str:
    if code == errno.ENOENT:
        return _not_found(path)
    if code == errno.EACCES:
        return _denied(path)
    if code == errno.ENOEXEC:
        return _not_executable(path)
    if code == errno.E2BIG:
        return ("the arguments and environment exceed one of the kernel's limits: ARG_MAX "
                "for all of them together (a quarter of the stack limit), or 128 KiB "
                "(MAX_ARG_STRLEN) for any single argument or NAME=value")
    if code == errno.ENOTDIR:
        return f"a component of {path} before its last is not a directory"
    if code == errno.ELOOP:
        return f"{path} leads into a loop of symbolic links, or through too many of them"
    return ""


def _not_executable(path: str) -> str:
    head = _read(path, 0, _HEAD_SIZE)
    interpreter = shebang_interpreter(head)
    if interpreter:
        return (f"the #! interpreter {interpreter} of {path} is not a program the kernel "
                "can run; is it a script without a #! line of its own?")
    if head.startswith(b"\x7fELF"):
        return (f"{path} is an ELF file the kernel cannot run here: built for another "
                "architecture, or damaged")
    return f"{path} is not in a format the kernel can run; scripts need a #! line"
