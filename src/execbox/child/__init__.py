"""Child-side setup steps, run in order between fork and exec.

Each step is a plain function ``step(ctx, *args)`` registered under a stable name. A plan is
a list of ``(name, args)`` pairs, so it can cross a socket and be extended by later features
(terminal, namespaces, mounts) without touching the runner.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Callable

    StepFunction = Callable[..., None]

# The core steps by name -> (module, function); imported on first lookup, so a plan that
# posix_spawn carries out never imports them.
_CORE = {
    "reset_signals": ("process", "reset_signals"),
    "setsid": ("process", "setsid"),
    "setpgid": ("process", "own_process_group"),
    "cgroup": ("process", "join_cgroups"),
    "umask": ("process", "set_umask"),
    "rlimits": ("process", "set_rlimits"),
    "dup2": ("fds", "dup2_all"),
    "tiocsctty": ("session", "set_controlling_tty"),
    "close_fds": ("fds", "close_other_fds"),
    "chdir": ("process", "change_dir"),
    "execve": ("program", "execve"),
    "explain_exec": ("program", "explain_exec"),
    "verify_devices": ("devices", "verify_devices"),
}
CORE_STEPS = tuple(_CORE)
STEPS: dict[str, StepFunction] = {}


def _register_sandbox_steps() -> None:
    """Every sandbox family at once: a step may run after pivot_root or setns into another
    mount namespace, where the package can no longer be imported."""
    from . import console, handoff, init, mounts, namespaces, privileges

    families = {
        namespaces: ("user_namespace", "prepare_user_namespace", "join_user_namespace",
                     "prepare_idmaps", "unshare_namespaces", "join_sandbox", "set_hostname",
                     "loopback_up"),
        mounts: ("prepare_base", "new_root", "bind", "bind_workdir", "tmpfs", "make_dir",
                 "symlink", "mount_proc", "mount_sys", "mount_dev", "enter_root",
                 "enter_root_ahead"),
        init: ("as_init", "fork_relay", "fork_run", "fork_step", "spawn_step", "hold"),
        console: ("open_sandbox_terminal",),
        privileges: ("drop_privileges", "new_session_keyring"),
        handoff: ("await_job", "become_launcher"),
    }
    for module, names in families.items():
        for name in names:
            STEPS.setdefault(name, getattr(module, name))
    aliases: dict[str, StepFunction] = {"userns": namespaces.user_namespace,
                                        "prepare_userns": namespaces.prepare_user_namespace,
                                        "join_userns": namespaces.join_user_namespace,
                                        "join_netns": namespaces.join_network_namespace}
    for alias, function in aliases.items():
        STEPS.setdefault(alias, function)


def lookup(name: str) -> StepFunction:
    """The step called name; families other than the core ones are imported on first use
    (the supervisor looks them up before it forks, so the child never imports)."""
    if name not in STEPS and name in _CORE:
        import importlib

        module, function = _CORE[name]
        STEPS[name] = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    if name not in STEPS:
        _register_sandbox_steps()  # unsandboxed runs never pay for it
    return STEPS[name]


def register(name: str, function: StepFunction) -> None:
    """Add a step kind; later features (pty, sandbox) register theirs here."""
    if name in STEPS and STEPS[name] is not function:
        raise ValueError(f"step {name!r} is already registered")
    STEPS[name] = function


__all__ = ["CORE_STEPS", "STEPS", "lookup", "register"]
