"""Turn (step, errno, path) into a message a person can act on, plus exit-status mapping."""

from __future__ import annotations

import errno
import os

from ..child import exec_hint
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


def _execve_hint(code: int, path: str) -> str:
    """The host's view, for a step that shares it (a plain step); a sandboxed step's hint
    comes from the step's side (child/exec_hint.py)."""
    if code == errno.ETXTBSY:
        from ..supervise.proctree import writers_of

        holders = writers_of(path)
        if holders:
            named = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders)
            return f"{path} is still open for writing by {named}"
        return f"{path} was open for writing while execve ran (the writer has since closed it)"
    return exec_hint.explain(code, path)


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


def describe(step: str, code: int, path: str, hint: str | None = None) -> Failure:
    """The failure fields of a Result: step, errno name, message, hint. hint: what the
    step's side found already (an execve seen from inside a sandbox); None to look here."""
    message = f"{step}: {os.strerror(code)}" + (f": {path}" if path else "")
    return Failure(step, errno_name(code), message,
                   _hint(step, code, path) if hint is None else hint)


def _hint(step: str, code: int, path: str) -> str:
    if step == "execve":
        hint = _execve_hint(code, path)
    elif step == "chdir":
        hint = {errno.ENOENT: f"the working directory {path} does not exist",
                errno.ENOTDIR: f"{path} is not a directory",
                errno.EACCES: f"the step may not enter {path}"}.get(code, "")
    elif step in ("fork", "pid 1") and code in (errno.EAGAIN, errno.ENOMEM):
        hint = ("no process could be made for the step: a limit on processes was reached "
                "(a pids cgroup's pids.max, RLIMIT_NPROC, kernel.pid_max or threads-max), "
                "or memory ran short")
    elif step == "session keyring" and code == errno.EDQUOT:
        hint = ("the step's own session keyring could not be made: the key quota of the "
                "user execbox runs as (/proc/sys/kernel/keys/maxkeys and maxbytes, or "
                "root_maxkeys) is used up by that user's other keys")
    elif step == "dup2":
        hint = ("the step's stdio and pass_fds could not be put in place: a target fd at or "
                "above the step's open-file limit (RLIMIT_NOFILE), or a source fd closed")
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
    elif step in ("mount /proc", "mount /sys", "mount /dev", "tmpfs /tmp") and \
            code == errno.ELOOP:
        where = step.rsplit(" ", 1)[1]
        hint = (f"{where} in the sandbox's root is a symbolic link; the sandbox's own {where} "
                "is mounted only on a directory there (or where nothing is), never where a "
                "link points")
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
    elif step == "rlimits" and code == errno.EPERM and path.startswith("nofile "):
        hint = ("a hard limit can only be raised by a privileged process, and no process "
                f"may have more open files than fs.nr_open ({_nr_open()})")
    elif step == "rlimits" and code == errno.EPERM:
        hint = "a hard limit can only be raised by a privileged process"
    elif step == "rlimits":
        hint = "the limit is invalid or too small for the step to start"
    else:
        hint = ""
    return hint


def _nr_open() -> str:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
