"""The same named steps carried out by posix_spawn (vfork speed) when a plan allows it.

posix_spawn can reset signals, start a session, dup2 and exec. chdir and umask are applied to
the spawning process itself, which is fine because that process exists only to run this
step (a supervisor or the CLI). Any other step (rlimits, and the terminal, namespace and
mount steps of later features) makes the plan go through fork and Python in the child.
"""

from __future__ import annotations

import errno
import os
import signal

from ..child.program import candidates

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..plan.build import Step

EXPRESSIBLE = frozenset({"reset_signals", "setsid", "dup2", "close_fds", "chdir", "umask",
                         "execve"})
_ALL_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


class NotExpressible(Exception):
    """The plan needs the fork path."""


def _mark_others_cloexec(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:
                continue


def posix_spawn_plan(plan: list[Step]) -> int:
    """Spawn with posix_spawn; raises NotExpressible or StepFailure (via the caller)."""
    from .failure import StepFailure

    if any(name not in EXPRESSIBLE for name, _ in plan):
        raise NotExpressible
    kwargs: dict[str, object] = {}
    actions: list[tuple[int, int, int]] = []
    targets: set[int] = set()
    program: tuple[list[str], list[list[str]], list[str]] | None = None
    for name, args in plan:
        if name == "reset_signals":
            kwargs["setsigdef"] = _ALL_SIGNALS
            kwargs["setsigmask"] = ()
        elif name == "setsid":
            kwargs["setsid"] = True
        elif name == "umask":
            os.umask(args[0])
        elif name == "dup2":
            mapping = args[0]
            targets = {target for _, target in mapping}
            if any(src in targets and src != target for src, target in mapping):
                raise NotExpressible  # overlapping sources and targets need staging
            actions = [(os.POSIX_SPAWN_DUP2, src, target) for src, target in mapping]
        elif name == "close_fds":
            _mark_others_cloexec(targets | set(args[0]))
        elif name == "chdir":
            try:
                os.chdir(args[0])
            except OSError as exc:
                raise StepFailure("chdir", exc.errno or errno.EIO, args[0]) from None
        elif name == "execve":
            program = args
    assert program is not None, "a plan ends with execve"
    argv, env_pairs, search = program
    env = dict(env_pairs)
    denied: str | None = None
    for path in candidates(argv[0], search):
        try:
            return os.posix_spawn(path, argv, env, file_actions=actions, **kwargs)  # type: ignore[arg-type]
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.EAGAIN:  # its clone, refused: a limit on processes
                raise StepFailure("fork", code, "") from None
            if code in (errno.EBADF, errno.EMFILE):  # a file action (execve has no fds)
                raise StepFailure("dup2", code, "") from None
            if code in (errno.ENOENT, errno.ENOTDIR) and "/" not in argv[0]:
                continue
            if code == errno.EACCES and "/" not in argv[0]:
                denied = path
                continue
            raise StepFailure("execve", code, path) from None  # (the kernel's own errno)
    if denied is not None:
        raise StepFailure("execve", errno.EACCES, denied)
    raise StepFailure("execve", errno.ENOENT, argv[0])
