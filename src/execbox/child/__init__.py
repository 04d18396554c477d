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
    "cgroup": process.join_cgroups,
    "umask": process.set_umask,
    "rlimits": process.set_rlimits,
    "dup2": fds.dup2_all,
    "tiocsctty": session.set_controlling_tty,
    "close_fds": fds.close_other_fds,
    "chdir": process.change_dir,
    "execve": program.execve,
}


def _register_sandbox_steps() -> None:
    from . import devices
    from . import mounts as sandbox

    STEPS.setdefault("verify_devices", devices.verify_devices)

    aliases = {"userns": "user_namespace", "prepare_userns": "prepare_user_namespace",
               "join_userns": "join_user_namespace"}
    for alias, name in aliases.items():
        STEPS.setdefault(alias, getattr(sandbox, name))
    for name in ("unshare_namespaces", "fork_relay", "prepare_base",
                 "new_root", "bind", "bind_workdir", "tmpfs", "make_dir", "symlink",
                 "mount_proc", "mount_sys", "mount_dev", "set_hostname", "loopback_up",
                 "enter_root", "fork_step", "drop_privileges", "hold", "join_sandbox",
                 "open_sandbox_terminal"):
        STEPS.setdefault(name, getattr(sandbox, name))


def lookup(name: str) -> StepFunction:
    if name not in STEPS:
        _register_sandbox_steps()  # imported on first use: unsandboxed runs never pay for it
    return STEPS[name]


def register(name: str, function: StepFunction) -> None:
    """Add a step kind; later features (pty, sandbox) register theirs here."""
    if name in STEPS and STEPS[name] is not function:
        raise ValueError(f"step {name!r} is already registered")
    STEPS[name] = function




__all__ = ["STEPS", "lookup", "register"]
