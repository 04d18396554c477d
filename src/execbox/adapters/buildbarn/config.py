"""`execbox runner` options, validated into one frozen RunnerConfig; every error is one line
that names its flag (argparse's own usage-and-exit is replaced by a SpecError)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ...model.errors import SpecError
from ...model.spec import MAX_PIDS, parse_size
from ..common.commands import OneLineParser

# Where the default sandbox shows each action its input root: one fixed path, so absolute
# paths an action writes into its outputs do not depend on which build directory
# subdirectory bb_worker staged it in (the same choice as `execbox worker`).
DEFAULT_INPUT_ROOT_PATH = "/execbox/root"

# Paths the sandbox fills itself: the input root cannot be shown there.
_TAKEN = ("/proc", "/sys", "/dev", "/tmp", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
          "/libx32", "/etc")

MODES = ("sandbox", "input-root-as-root", "none")
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, NUL included


@dataclass(frozen=True)
class RunnerConfig:
    """Everything the runner needs; built by parse_runner_args."""

    listen: str  # "unix:/abs/path" or "HOST:PORT", as grpc takes it
    socket_path: str | None  # the UNIX socket's path, when listening on one
    socket_mode: int  # its permissions: bb_worker usually runs as another user
    build_directory: str  # real path
    mode: str  # one of MODES
    input_root_path: str
    readiness_paths: tuple[str, ...]
    concurrency: int
    max_waiting: int  # Runs that may wait for a slot; beyond, RESOURCE_EXHAUSTED
    memory: int | None
    pids: int | None
    grace: float
    network: bool


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="execbox runner",
        description="A drop-in for Buildbarn's bb_runner: serves buildbarn.runner.Runner "
                    "and runs every action through execbox (fresh /proc, minimal /dev, "
                    "per-action namespaces, whole-tree kill on cancel).")
    p.add_argument("--listen", help="unix:/path/runner.sock or HOST:PORT (required)")
    p.add_argument("--socket-mode", default="0666",
                   help="permissions of the UNIX socket (octal, default 0666: bb_worker "
                        "usually runs as another user; guard it with its directory's "
                        "permissions, or use e.g. 0660 with a shared group)")
    p.add_argument("--build-directory", help="the build directory bb_worker shares with the "
                                             "runner; request paths are relative to it "
                                             "(required)")
    p.add_argument("--input-root-as-root", action="store_true",
                   help="the input root is the action's / (bb_runner's chroot_into_input_"
                        "root), with a fresh /proc, read-only /sys and a minimal /dev")
    p.add_argument("--input-root-path", default=DEFAULT_INPUT_ROOT_PATH,
                   help="where the default sandbox shows the input root (default "
                        f"{DEFAULT_INPUT_ROOT_PATH})")
    p.add_argument("--readiness-path", action="append", default=[], metavar="PATH",
                   help="CheckReadiness fails while PATH does not exist; repeatable")
    p.add_argument("--concurrency", default="64",
                   help="actions run at once; more wait for a slot (default 64; bb_worker "
                        "limits its own concurrency)")
    p.add_argument("--max-waiting", default="256",
                   help="Runs that may wait for a slot beyond --concurrency (default 256); "
                        "more are refused with RESOURCE_EXHAUSTED, so that waiting Runs "
                        "never take every server thread from CheckReadiness")
    p.add_argument("--memory", help="memory limit per action (bytes or with K/M/G)")
    p.add_argument("--pids", help="process limit per action")
    p.add_argument("--grace", default="1",
                   help="seconds between the cancel signal (TERM) and SIGKILL when a Run is "
                        "cancelled (default 1: bb_worker removes the action's directory as "
                        "soon as its call returns)")
    p.add_argument("--network", action="store_true",
                   help="sandboxed actions share the host's network (default: only their "
                        "own loopback)")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run actions without a sandbox (still a whole-tree kill); for hosts "
                        "that cannot sandbox, see `execbox doctor`")
    return p


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except (TypeError, ValueError):
        mode = -1
    if not 0 <= mode <= 0o777:
        raise SpecError("--socket-mode", f"expected an octal mode such as 0660, got {text!r}")
    return mode


def _number(text: str, flag: str, kind: type, minimum: float) -> float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise SpecError(flag, f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise SpecError(flag, f"must be a finite number >= {minimum}, got {text!r}")
    return float(value)


def _pids(text: str) -> int:
    pids = int(_number(text, "--pids", int, 1))
    if pids > MAX_PIDS:
        raise SpecError("--pids", f"{pids} is more than the kernel's limit of {MAX_PIDS} "
                                  "processes")
    return pids


def _listen(text: str | None) -> tuple[str, str | None]:
    """--listen -> (grpc address, UNIX socket path or None)."""
    if not text:
        raise SpecError("--listen", "is required (unix:/path/runner.sock or HOST:PORT)")
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if path.startswith("//"):  # unix:///abs/path, as grpc also spells it
            path = path[2:]
        if not path or "\0" in path:
            raise SpecError("--listen", f"expected unix:/path/runner.sock, got {text!r}")
        path = os.path.abspath(path)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise SpecError("--listen", f"{path} is longer than a UNIX socket path may be "
                                        f"({_UNIX_PATH_MAX} bytes)")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            problem = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise SpecError("--listen", f"{parent} {problem}")
        return f"unix:{path}", path
    _check_host(split_host_port(text)[0])
    return text, None


def split_host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host without brackets, port), the port in range."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SpecError("--listen", f"expected unix:/path/runner.sock or HOST:PORT, got "
                                    f"{text!r}")
    if int(port) > 65535:
        raise SpecError("--listen", f"port {port} is out of range (0 to 65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise SpecError("--listen", f"an IPv6 address goes in brackets, e.g. [{host}]:{port}")
    return host, int(port)


def _check_host(host: str) -> None:
    """An IP literal must be one; anything else is a host name, resolved at bind."""
    looks_numeric = ":" in host or all(c.isdigit() or c == "." for c in host)
    if not looks_numeric:
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SpecError("--listen", f"{host} is not a valid IP address") from None


def _build_directory(text: str | None) -> str:
    if not text:
        raise SpecError("--build-directory", "is required (the build directory bb_worker "
                                             "shares with the runner)")
    real = os.path.realpath(text)
    if not os.path.isdir(real):
        raise SpecError("--build-directory", f"{text} is not a directory")
    if real == "/":
        raise SpecError("--build-directory", "must not be / (actions would see the host)")
    return real


def _input_root_path(text: str) -> str:
    path = os.path.normpath(text)
    if not path.startswith("/") or path == "/":
        raise SpecError("--input-root-path", f"expected an absolute path other than /, got "
                                             f"{text!r}")
    if any(path == p or path.startswith(p + "/") for p in _TAKEN):
        raise SpecError("--input-root-path", f"{path} is taken by the sandbox's own mounts; "
                                             "choose a path of its own")
    return path


def parse_runner_args(argv: Sequence[str]) -> RunnerConfig:
    """argv (after `runner`) -> RunnerConfig; raises SpecError naming the flag."""
    args = _parser().parse_args(list(argv))
    listen, socket_path = _listen(args.listen)
    if args.no_sandbox and args.input_root_as_root:
        raise SpecError("--input-root-as-root", "needs the sandbox (not with --no-sandbox)")
    mode = "none" if args.no_sandbox else (
        "input-root-as-root" if args.input_root_as_root else "sandbox")
    if args.input_root_path != DEFAULT_INPUT_ROOT_PATH and mode != "sandbox":
        raise SpecError("--input-root-path", "applies to the default sandbox only (not with "
                                             "--input-root-as-root or --no-sandbox)")
    for path in args.readiness_path:
        if not path or "\0" in path:
            raise SpecError("--readiness-path", f"expected a path, got {path!r}")
    return RunnerConfig(
        listen=listen, socket_path=socket_path, socket_mode=_mode(args.socket_mode),
        build_directory=_build_directory(args.build_directory), mode=mode,
        input_root_path=_input_root_path(args.input_root_path),
        readiness_paths=tuple(os.path.abspath(p) for p in args.readiness_path),
        concurrency=int(_number(args.concurrency, "--concurrency", int, 1)),
        max_waiting=int(_number(args.max_waiting, "--max-waiting", int, 0)),
        memory=parse_size(args.memory, "--memory") if args.memory else None,
        pids=_pids(args.pids) if args.pids else None,
        grace=_number(args.grace, "--grace", float, 0),
        network=bool(args.network))
