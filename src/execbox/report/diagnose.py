"""Turn (step, errno, path) into a message a person can act on, plus exit-status mapping."""

from __future__ import annotations

import errno
import os
import stat

from ..model.exits import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SETUP_FAILED
from ..model.result import Failure


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"E{code}")


def exit_status_for_failure(step: str, code: int) -> int:
    """125 for setup steps; for execve 127 when not found and 126 otherwise (as env(1))."""
    if step != "execve":
        return EXIT_SETUP_FAILED
    if code in (errno.ENOENT, errno.ENOTDIR):
        return EXIT_NOT_FOUND
    return EXIT_CANNOT_EXECUTE


def _read_head(path: str, size: int = 512) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return None


def _shebang_interpreter(head: bytes) -> str | None:
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
    try:
        with open(path, "rb") as f:
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                entry = table[i * phentsize:(i + 1) * phentsize]
                if int.from_bytes(entry[0:4], "little") == 3:  # PT_INTERP
                    offset = int.from_bytes(entry[8:16], "little")
                    size = int.from_bytes(entry[32:40], "little")
                    f.seek(offset)
                    return os.fsdecode(f.read(size).rstrip(b"\0"))
    except (OSError, ValueError):
        return None
    return None


def _execve_hint(code: int, path: str) -> str:
    if code == errno.ENOENT:
        if "/" not in path:
            return f"{path!r} was not found in any directory of the step's PATH"
        if not os.path.lexists(path):
            return f"{path} does not exist"
        head = _read_head(path) or b""
        interpreter = _shebang_interpreter(head)
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
        if os.path.islink(path) and not os.path.exists(path):
            return f"{path} is a dangling symbolic link"
        return f"{path} exists but something it needs to start is missing"
    if code == errno.EACCES:
        try:
            st = os.stat(path)
        except OSError:
            return f"a directory on the way to {path} is not searchable"
        if stat.S_ISDIR(st.st_mode):
            return f"{path} is a directory"
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file"
        if not st.st_mode & 0o111:
            mode = stat.S_IMODE(st.st_mode)
            return f"{path} lacks the execute bit (mode {mode:04o}); chmod +x it"
        interpreter = _shebang_interpreter(_read_head(path) or b"")
        if interpreter:
            return f"the #! interpreter {interpreter} of {path} cannot be executed"
        return f"{path} is on a noexec mount or the caller may not execute it"
    if code == errno.ENOEXEC:
        return f"{path} is not in a format the kernel can run; scripts need a #! line"
    if code == errno.ETXTBSY:
        from ..supervise.proctree import writers_of

        holders = writers_of(path)
        if holders:
            named = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders)
            return f"{path} is still open for writing by {named}"
        return f"{path} was open for writing while execve ran (the writer has since closed it)"
    if code == errno.E2BIG:
        return "the arguments and environment exceed the kernel's limit (ARG_MAX)"
    return ""


def _ctty_hint(code: int, path: str) -> str:
    if code != errno.EPERM:
        return f"could not make {path} the controlling terminal"
    from ..supervise.proctree import sessions_on_terminal

    try:
        holders = sessions_on_terminal(os.stat(path).st_rdev)
    except OSError:
        holders = []
    if holders:
        named = ", ".join(f"session {sid} ({cmd})" for sid, cmd in holders)
        return f"{path} is already the controlling terminal of {named}; it was not stolen"
    return (f"{path} belongs to another session or this one already has a terminal; "
            "it was not stolen")


def _pty_hint(step: str, code: int) -> str:
    from ..linux import arch

    if code == errno.ENOSYS and not arch.is_known():  # the ioctl number was not known
        return str(arch.UnsupportedArchitecture(arch.current()).strerror)
    return f"could not set up a pseudo-terminal ({step}); is /dev/pts mounted?"


def describe(step: str, code: int, path: str) -> Failure:
    """The failure fields of a Result: step, errno name, message, hint."""
    message = f"{step}: {os.strerror(code)}" + (f": {path}" if path else "")
    if step == "execve":
        hint = _execve_hint(code, path)
    elif step == "chdir":
        hint = {errno.ENOENT: f"the working directory {path} does not exist",
                errno.ENOTDIR: f"{path} is not a directory",
                errno.EACCES: f"the step may not enter {path}"}.get(code, "")
    elif step == "tiocsctty":
        hint = _ctty_hint(code, path)
    elif step.startswith("pty_") and step.endswith("(sandbox)"):
        hint = ("the sandbox's /dev/pts has no devpts of its own (a --tmpfs or bind over "
                "/dev/pts hides it), so no terminal can be opened there")
    elif step.startswith("pty_"):
        hint = _pty_hint(step, code)
    elif step.split(" ", 1)[0] in ("ro-bind", "bind", "dev-bind", "idmapped") and \
            code == errno.ENOENT:
        hint = f"the source {path} does not exist on the host"
    elif step.split(" ", 1)[0] in ("ro-bind", "bind", "dev-bind", "idmapped") and \
            code == errno.EROFS:
        hint = (f"the destination {path} would have to be made inside a read-only part of "
                "the sandbox's root; put it below a --tmpfs or --dir, or bind onto a path "
                "that exists")
    elif step == "mount /proc" and code in (errno.EPERM, errno.EACCES):
        hint = ("procfs cannot be mounted here: /proc on the host may have over-mounted "
                "paths, or this kernel forbids a new procfs in a user namespace")
    elif step in ("user namespace", "join user namespace"):
        hint = ("user namespaces are unavailable or exhausted "
                "(see user.max_user_namespaces and kernel.unprivileged_userns_clone)")
    elif step == "unshare":
        hint = "the kernel refused new namespaces (are they enabled, and is this allowed here?)"
    elif step == "devices":
        hint = ("the device allowlist execbox programmed is not what the kernel enforces; "
                "another device program or rule on this cgroup may be stricter")
    elif step == "cgroup":
        hint = ("execbox creates cgroups only below its own cgroup; that needs write access "
                "there and the controller enabled for it")
    elif step == "rlimits" and code == errno.EPERM:
        hint = "a hard limit can only be raised by a privileged process"
    elif step == "rlimits":
        hint = "the limit is invalid or too small for the step to start"
    else:
        hint = ""
    return Failure(step, errno_name(code), message, hint)
