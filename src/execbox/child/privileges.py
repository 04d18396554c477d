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
