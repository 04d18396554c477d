"""Device allowlists: parse rules, program them (v1 files or a v2 BPF program), verify.

A rule is "TYPE MAJOR:MINOR ACCESS" as in runc and the v1 devices controller, e.g.
"c 1:3 rwm", "c 136:* rwm", "b *:* m". The policy is verified before a step runs, from a
process inside the step's cgroup: allowed devices open, a denied one fails (runc's
device rules after a systemd daemon-reload showed a policy can differ from the one meant).
"""

from __future__ import annotations

import errno
import os

from ..child.devices import mismatch
from ..model.devices import DEFAULT_RULES, PROBES, Rule, allowed, parse_rule

__all__ = ["DEFAULT_RULES", "PROBES", "Rule", "allowed", "generation", "mismatch",
           "parse_rule", "policy_key", "program_v1", "proven", "verify"]

# Device policies proven in force from inside a step's cgroup: (rules, cgroup version, the
# parent's state). A new step cgroup programmed with the same rules below a parent in the
# same state cannot have another policy in force, so it is not probed again.
_PROVEN: set[tuple[object, ...]] = set()


def policy_key(rules: list[str], version: str, directory: str) -> tuple[object, ...] | None:
    """What a proof of rules in the cgroup at directory holds for; None where the parent's
    state cannot be read (then every such cgroup is probed)."""
    state = generation(version, directory)
    return None if state is None else (tuple(rules), version, state)


def proven(key: tuple[object, ...] | None) -> bool:
    return key is not None and key in _PROVEN


def remember_proven(key: tuple[object, ...] | None) -> None:
    """A step's child proved the policy of key from inside its cgroup."""
    if key is not None:
        _PROVEN.add(key)


def program_v1(directory: str, rules: list[Rule]) -> None:
    """Deny everything, then allow each rule (the v1 devices controller's own model). The
    controller takes one rule per write, so one open file serves them all."""
    _write_each(f"{directory}/devices.deny", ["a"])
    _write_each(f"{directory}/devices.allow", [str(rule) for rule in rules])


def _write_each(path: str, texts: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for text in texts:
            data = text.encode()
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"{path}: short write of {text!r}")
    finally:
        os.close(fd)


def verify(procs_files: list[str], rules: list[Rule]) -> str | None:
    """mismatch() from a probe forked into the cgroup(s), for callers that are not about to
    fork a step into it anyway."""
    from ..child.process import open_join_file  # (not in the fork: no import there)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = ""
        try:
            os.close(read_end)
            for path in procs_files:
                fd, _ = open_join_file(path)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            message = mismatch(rules) or ""
            os.write(write_end, message.encode())
        except BaseException as exc:
            os.write(write_end, f"device probe failed: {exc}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        report = b""
        while chunk := os.read(read_end, 4096):
            report += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return report.decode() or None


def generation(version: str, directory: str) -> str | None:
    """What the policy in force in the step cgroup at directory depends on besides the rules
    programmed into it: on v1, the parent's own list (a child never gets more than its
    parent; a systemd daemon-reload rewrites that list); on v2, the device programs in force
    at the parent (its ancestors' included: each of them must allow a device too). None
    where it cannot be read: verify every time."""
    parent = os.path.dirname(directory)
    try:
        if version == "v1":
            from .files import read

            return read(f"{parent}/devices.list")
        from ..linux.bpf import attached_programs

        return "v2 " + " ".join(map(str, sorted(attached_programs(parent, effective=True))))
    except OSError:
        return None
