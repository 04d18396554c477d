"""Child-side proof that the device policy in force is the one programmed (runc's device
rules after a systemd daemon-reload showed a policy can be rewritten under a running
container: never trust it, open the devices)."""

from __future__ import annotations

import errno
import os

from ..model.devices import PROBES, Rule, allowed, parse_rule
from .context import ChildContext


def mismatch(rules: list[Rule]) -> str | None:
    """From the calling process (already in the cgroup): None if the policy in force is the
    one in rules, else what differs ("/dev/null (c 1:3) is allowed but open failed: EPERM")."""
    for path, kind, major, minor in PROBES:
        if not os.path.exists(path):
            continue
        want = allowed(rules, kind, major, minor, "r")
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC))
            opened, why = True, ""
        except OSError as exc:
            opened, why = False, errno.errorcode.get(exc.errno or 0, str(exc.errno))
            if exc.errno not in (errno.EPERM, errno.EACCES):
                continue  # not the device policy (e.g. no such device)
        if want and not opened:
            return f"{path} ({kind} {major}:{minor}) is allowed but open failed: {why}"
        if not want and opened:
            return f"{path} ({kind} {major}:{minor}) is denied but opened"
    return None


def verify_devices(ctx: ChildContext, rules: list[str]) -> None:
    """Prove, from inside the step's cgroup, that the device policy is the one programmed."""
    problem = mismatch([parse_rule(rule) for rule in rules])
    if problem is not None:
        ctx.label = "devices"
        ctx.path_tried = f"device policy not in force: {problem}"
        raise PermissionError(errno.EPERM, problem)
