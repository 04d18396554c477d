"""Device rules as runc and the v1 devices controller write them: "TYPE MAJOR:MINOR ACCESS",
e.g. "c 1:3 rwm", "c 136:* rwm", "b *:* m"; runc's default allowlist; and the host nodes
that prove a policy is in force."""

from __future__ import annotations

from .errors import SpecError

DEFAULT_RULES = ("c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                 "c 5:0 rwm", "c 5:2 rwm", "c 136:* rwm", "c *:* m", "b *:* m")
# Host nodes used to verify the policy: (path, type, major, minor).
PROBES = (("/dev/null", "c", 1, 3), ("/dev/zero", "c", 1, 5), ("/dev/full", "c", 1, 7),
          ("/dev/random", "c", 1, 8), ("/dev/urandom", "c", 1, 9), ("/dev/ptmx", "c", 5, 2),
          ("/dev/kmsg", "c", 1, 11))


class Rule:
    """kind 'c', 'b' or 'a'; major/minor None for '*'; access a subset of 'rwm'."""

    __slots__ = ("access", "kind", "major", "minor")

    def __init__(self, kind: str, major: int | None, minor: int | None, access: str) -> None:
        self.kind, self.major, self.minor, self.access = kind, major, minor, access

    def matches(self, kind: str, major: int, minor: int, access: str) -> bool:
        return ((self.kind in ("a", kind)) and self.major in (None, major)
                and self.minor in (None, minor) and all(a in self.access for a in access))

    def __str__(self) -> str:
        if self.kind == "a":
            return "a"
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.kind} {major}:{minor} {self.access}"


def parse_rule(text: str, field: str = "device") -> Rule:
    if not isinstance(text, str):
        raise SpecError(field, f"expected a rule such as 'c 1:3 rwm', got {text!r}")
    parts = text.split()
    if parts in (["a"], ["a", "*:*", "rwm"]):
        return Rule("a", None, None, "rwm")
    if parts and parts[0] == "a":
        raise SpecError(field, f"type 'a' means every device and takes no numbers, got {text!r}")
    if len(parts) != 3 or parts[0] not in ("c", "b", "a"):
        raise SpecError(field, f"expected 'TYPE MAJOR:MINOR ACCESS' (c 1:3 rwm), got {text!r}")
    numbers = parts[1].split(":")
    if len(numbers) != 2:
        raise SpecError(field, f"expected MAJOR:MINOR, got {parts[1]!r}")
    values: list[int | None] = []
    for number, limit, what in zip(numbers, (4095, 1048575), ("major", "minor"), strict=True):
        if number == "*":
            values.append(None)
        elif number.isascii() and number.isdigit() and len(number) <= 7 and int(number) <= limit:
            values.append(int(number))
        else:
            raise SpecError(field, f"{what} must be '*' or 0..{limit}, got {number!r}")
    access = parts[2]
    if not access or any(a not in "rwm" for a in access) or len(set(access)) != len(access):
        raise SpecError(field, f"access must be letters from 'rwm', got {access!r}")
    return Rule(parts[0], values[0], values[1], access)


_DEFAULTS_CANONICAL = {rule: str(parse_rule(rule)) for rule in DEFAULT_RULES}


def canonical(text: str, field: str = "device") -> str:
    """The rule as runc writes it (SpecError if it is none). runc's default allowlist,
    every sandbox's, is parsed once, here."""
    known = _DEFAULTS_CANONICAL.get(text) if isinstance(text, str) else None
    return known if known is not None else str(parse_rule(text, field))


def allowed(rules: list[Rule], kind: str, major: int, minor: int, access: str) -> bool:
    return any(rule.matches(kind, major, minor, access) for rule in rules)
