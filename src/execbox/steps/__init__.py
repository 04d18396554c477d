"""Child-side setup steps, run in order between fork and exec.

Each step is a plain function ``step(ctx, *args)`` registered under a stable name. A plan is
a list of ``(name, args)`` pairs, so it can cross a socket and be extended by later features
(terminal, namespaces, mounts) without touching the runner.
"""

from __future__ import annotations

from . import fds, process, program, session

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Callable

    StepFunction = Callable[..., None]

STEPS: dict[str, StepFunction] = {
    "reset_signals": process.reset_signals,
    "setsid": process.setsid,
    "setpgid": process.setpgid,
    "umask": process.set_umask,
    "rlimits": process.set_rlimits,
    "dup2": fds.dup2_all,
    "tiocsctty": session.set_controlling_tty,
    "close_fds": fds.close_other_fds,
    "chdir": process.change_dir,
    "execve": program.execve,
}


def register(name: str, function: StepFunction) -> None:
    """Add a step kind; later features (pty, sandbox) register theirs here."""
    if name in STEPS and STEPS[name] is not function:
        raise ValueError(f"step {name!r} is already registered")
    STEPS[name] = function


def lookup(name: str) -> StepFunction:
    return STEPS[name]


__all__ = ["STEPS", "lookup", "register"]
