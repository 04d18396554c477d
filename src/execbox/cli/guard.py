"""`execbox run` survives nothing of its own: the process the user started ("the guard")
forks the supervisor and only waits.

- The supervisor starts a session of its own, so a kill aimed at the user's process group
  (a CI agent's hard timeout) reaches the guard only; the guard forwards signals.
- The supervisor has a parent-death signal: if the guard is SIGKILLed (the OOM killer, a
  `kill -9`), the supervisor hard-cancels the step's whole tree at once.
- The guard is a child subreaper: if the supervisor itself is killed, everything it
  started reparents to the guard, which kills and reaps it and says so.
Both killed at the same instant leaves plain steps' escapees alive (a limited step's cgroup
is cleaned at the next start; a sandbox dies with its supervisor); see docs/design.md.
"""

from __future__ import annotations

import os
import signal
import sys

from ..model.exits import EXIT_SETUP_FAILED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH)


def supervised_elsewhere(work: Callable[[], int]) -> int:
    """Run work() in a forked supervisor; its exit status here (in the guard)."""
    from ..linux.syscalls import set_child_subreaper, set_parent_death_signal
    from .terminal import PARENT_DIED

    set_child_subreaper()
    saved_terminal = _terminal_modes()
    guard = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    supervisor = os.fork()
    if supervisor == 0:
        code = EXIT_SETUP_FAILED
        try:
            os.setsid()
            set_parent_death_signal(PARENT_DIED)
            if os.getppid() != guard:  # the guard died before the line above
                os._exit(code)
            code = work()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return _guard(supervisor, saved_terminal)




def _guard(supervisor: int, saved_terminal: list[Any] | None) -> int:
    from ..model.signals import forward_to

    for sig in _FORWARDED:
        signal.signal(sig, forward_to(supervisor))
    _, status = os.waitpid(supervisor, 0)  # retried after each forwarded signal
    for sig in _FORWARDED:
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    # The supervisor was killed: its step's processes came to us; kill and reap them all.
    from ..model.signals import signal_name
    from ..supervise.reaper import Reaper

    Reaper().kill_and_reap_all()
    _remove_cgroups_of(supervisor)
    _restore_terminal(saved_terminal)
    name = signal_name(os.WTERMSIG(status))
    sys.stderr.write(f"execbox: the step's supervisor (pid {supervisor}) was killed by "
                     f"{name}; execbox killed every process of the step\n")
    return EXIT_SETUP_FAILED


def _remove_cgroups_of(supervisor: int) -> None:
    """The step cgroups the killed (and reaped) supervisor made, as the fork server removes
    a killed supervisor's: not left for a later run's stale sweep."""
    from ..cgroups.step import remove_stale_of

    try:
        left = remove_stale_of(supervisor)
    except OSError as exc:
        left = [str(exc)]
    for problem in left:
        sys.stderr.write(f"execbox: cannot remove the step's cgroup: {problem}\n")


def _terminal_modes() -> list[Any] | None:
    if not os.isatty(0):
        return None
    import termios

    try:
        return list(termios.tcgetattr(0))
    except termios.error:
        return None


def _restore_terminal(saved: list[Any] | None) -> None:
    if saved is None:
        return
    import termios

    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        termios.tcsetattr(0, termios.TCSANOW, saved)
    except (termios.error, OSError):
        pass
    finally:
        signal.signal(signal.SIGTTOU, old)
