"""The step's last sandbox step: no capabilities and no way to gain any."""

from __future__ import annotations

from ..linux import syscalls as sc
from .context import ChildContext


def drop_privileges(ctx: ChildContext) -> None:
    """No capabilities, no way to gain any (no_new_privs), whatever the ids are."""
    ctx.label = "drop capabilities"
    sc.drop_all_capabilities()
    ctx.label = "no_new_privs"
    sc.set_no_new_privs()


def new_session_keyring(ctx: ChildContext) -> None:
    """The step's own, empty session keyring: the caller's keys (a CI agent's, joined by
    pam_keyinit or systemd) and those an earlier step added are not the step's to read,
    and no step can leave one for a later step there."""
    ctx.label = "session keyring"
    sc.join_new_session_keyring()
