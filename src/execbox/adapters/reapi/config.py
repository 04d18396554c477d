"""`execbox worker` options: flags, each also readable from an EXECBOX_WORKER_* variable,
validated into one frozen WorkerConfig (every error names its flag)."""

from __future__ import annotations

import argparse
import math
import os
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...model.errors import SpecError
from ...model.spec import parse_size
from ..common.commands import OneLineParser

# The REAPI platform lexicon's names for the machine's instruction set.
_ISA = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "arm-a64", "arm64": "arm-a64",
        "i686": "x86-32", "i386": "x86-32", "armv7l": "arm-a32", "riscv64": "riscv64",
        "ppc64le": "ppc64le", "s390x": "s390x"}

# Where every action sees its input root: a fixed path, so absolute paths in outputs do not
# depend on the worker or its staging directory.
DEFAULT_INPUT_ROOT_PATH = "/execbox/root"


def machine_isa() -> str:
    machine = platform.machine()
    return _ISA.get(machine, machine)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; built by parse_worker_args."""

    remote: str
    instance: str
    cas: str
    bot_id: str
    capacity: int
    properties: tuple[tuple[str, str], ...]
    cache_dir: Path
    cache_size: int
    build_dir: Path
    max_timeout: float | None
    sandbox: bool
    memory: int | None
    pids: int | None
    metrics_port: int | None
    metrics_address: str
    log_format: str
    input_root_path: str
    input_root_as_root: bool
    grace: float
    poll_interval: float
    session_timeout: float


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "execbox-worker"


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    def default(name: str, fallback: str | None = None) -> str | None:
        return env.get("EXECBOX_WORKER_" + name.upper().replace("-", "_"), fallback)

    p = OneLineParser(
        prog="execbox worker",
        description="A Remote Execution API worker for BuildGrid: takes leases over the "
                    "Remote Workers API and runs every action through execbox, in a sandbox.",
        epilog="Every flag can also be given as EXECBOX_WORKER_<FLAG> (e.g. "
               "EXECBOX_WORKER_REMOTE=http://127.0.0.1:50051).")
    p.add_argument("--remote", default=default("remote"),
                   help="the Bots service, e.g. http://127.0.0.1:50051 (required)")
    p.add_argument("--instance", default=default("instance", ""), help="instance name")
    p.add_argument("--cas", default=default("cas"),
                   help="CAS/ByteStream endpoint (default: --remote)")
    p.add_argument("--bot-id", default=default("bot-id"),
                   help="bot id (default: HOST:BUILD_DIR, so a restarted worker replaces "
                        "its own old session at once)")
    p.add_argument("--capacity", default=default("capacity"),
                   help="leases run at once (default: the number of cores)")
    p.add_argument("--property", action="append", default=None, metavar="KEY=VALUE",
                   help="a platform property to advertise; repeatable (default OSFamily=linux, "
                        "ISA from the machine, network=on)")
    p.add_argument("--cache-dir", default=default("cache-dir"),
                   help="local CAS cache (default ~/.cache/execbox-worker/cas)")
    p.add_argument("--cache-size", default=default("cache-size", "10G"),
                   help="cache size bound, bytes or with K/M/G (default 10G)")
    p.add_argument("--build-dir", default=default("build-dir"),
                   help="where actions are staged (default ~/.cache/execbox-worker/build)")
    p.add_argument("--max-timeout", default=default("max-timeout"),
                   help="cap on any action's timeout, seconds (default: none)")
    p.add_argument("--no-sandbox", action="store_true",
                   default=default("no-sandbox", "") in ("1", "true", "yes", "on"),
                   help="run actions without a sandbox (hosts that cannot sandbox: see "
                        "`execbox doctor`)")
    p.add_argument("--memory", default=default("memory"), help="memory limit per action")
    p.add_argument("--pids", default=default("pids"), help="process limit per action")
    p.add_argument("--metrics-port", default=default("metrics-port"),
                   help="serve Prometheus metrics on this port (127.0.0.1; HOST:PORT to choose)")
    p.add_argument("--log-format", default=default("log-format", "text"),
                   choices=("text", "json"), help="one line per lease, as text or JSON")
    p.add_argument("--input-root-path", default=default("input-root-path",
                                                        DEFAULT_INPUT_ROOT_PATH),
                   help=f"where actions see their input root (default {DEFAULT_INPUT_ROOT_PATH})")
    p.add_argument("--input-root-as-root", action="store_true",
                   default=default("input-root-as-root", "") in ("1", "true", "yes", "on"),
                   help="the input root is the action's / (BuildStream sysroots; like "
                        "buildbox-run's chroot), with a fresh /proc, /sys, minimal /dev and "
                        "tmpfs /tmp added; no host toolchain")
    p.add_argument("--grace", default=default("grace", "5"),
                   help="seconds between the cancel signal and SIGKILL (default 5)")
    p.add_argument("--poll-interval", default=default("poll-interval", "1"),
                   help="seconds between session updates while actions run (default 1)")
    p.add_argument("--session-timeout", default=default("session-timeout", "30"),
                   help="gRPC deadline of an idle session's long poll (default 30)")
    return p


def _number(text: str | None, flag: str, kind: type = float, minimum: float = 0) -> float:
    if text is None:
        raise SpecError(flag, "is required")
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise SpecError(flag, f"expected a number, got {text!r}") from None
    if not math.isfinite(value):  # nan passes every comparison, inf never ends a wait
        raise SpecError(flag, f"expected a finite number, got {text!r}")
    if value < minimum:
        raise SpecError(flag, f"must be at least {minimum}, got {text!r}")
    return float(value) if kind is float else value


def _endpoint(text: str, flag: str) -> str:
    for scheme in ("http://", "grpc://", "https://", "grpcs://", "unix:"):
        if text.startswith(scheme):
            rest = text[len(scheme):]
            if (rest and "/" not in rest.rstrip("/")) or (scheme == "unix:" and rest):
                return text.rstrip("/")
            break
    else:
        if ":" in text and "/" not in text:
            return "http://" + text
    raise SpecError(flag, f"expected http://HOST:PORT, https://HOST:PORT or unix:PATH, "
                          f"got {text!r}")


def _properties(given: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for item in given or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError("--property", f"expected KEY=VALUE, got {item!r}")
        pairs.append((key, value))
    keys = {k for k, _ in pairs}
    defaults = [("OSFamily", "linux"), ("ISA", machine_isa()), ("network", "on")]
    return tuple([*[(k, v) for k, v in defaults if k not in keys], *pairs])


def parse_worker_args(argv: Sequence[str],
                      env: Mapping[str, str] | None = None) -> WorkerConfig:
    """argv (after `worker`) -> WorkerConfig; raises SpecError naming the flag."""
    env = os.environ if env is None else env
    parser = _parser(env)
    args = parser.parse_args(list(argv))
    if not args.remote:
        raise SpecError("--remote", "is required (the BuildGrid server, e.g. "
                                    "http://127.0.0.1:50051)")
    remote = _endpoint(args.remote, "--remote")
    cas = _endpoint(args.cas, "--cas") if args.cas else remote
    state = _default_state_dir()
    build_dir = Path(args.build_dir or state / "build").absolute()
    cache_dir = Path(args.cache_dir or state / "cas").absolute()
    if cache_dir == build_dir:
        raise SpecError("--cache-dir", "must differ from --build-dir")
    capacity = int(_number(args.capacity or str(os.cpu_count() or 1), "--capacity", int, 1))
    cache_size = parse_size(args.cache_size, "--cache-size")
    metrics_port, metrics_address = None, "127.0.0.1"
    if args.metrics_port:
        host, _, port = args.metrics_port.rpartition(":")
        metrics_port = int(_number(port, "--metrics-port", int, 0))
        if metrics_port > 65535:
            raise SpecError("--metrics-port", f"expected a port in 0..65535, got {port!r}")
        metrics_address = host.strip("[]") or metrics_address
    memory = parse_size(args.memory, "--memory") if args.memory else None
    pids = int(_number(args.pids, "--pids", int, 1)) if args.pids else None
    max_timeout = _number(args.max_timeout, "--max-timeout", float, 0.001) \
        if args.max_timeout else None
    input_root_path = os.path.normpath(args.input_root_path)
    if not input_root_path.startswith("/") or input_root_path == "/":
        raise SpecError("--input-root-path", f"expected an absolute path other than /, got "
                                             f"{args.input_root_path!r}")
    if any(input_root_path == p or input_root_path.startswith(p + "/")
           for p in ("/proc", "/sys", "/dev", "/tmp", "/usr", "/bin", "/sbin", "/lib",
                     "/lib32", "/lib64", "/libx32", "/etc")):
        raise SpecError("--input-root-path", f"{input_root_path} is taken by the sandbox's "
                                             "own mounts; choose a path of its own")
    return WorkerConfig(
        remote=remote, instance=args.instance or "", cas=cas,
        bot_id=args.bot_id or f"{socket.gethostname()}:{build_dir}",
        capacity=capacity, properties=_properties(args.property),
        cache_dir=cache_dir, cache_size=cache_size, build_dir=build_dir,
        max_timeout=max_timeout, sandbox=not args.no_sandbox, memory=memory, pids=pids,
        metrics_port=metrics_port, metrics_address=metrics_address,
        log_format=args.log_format,
        input_root_path=input_root_path,
        input_root_as_root=bool(args.input_root_as_root),
        grace=_number(args.grace, "--grace"),
        poll_interval=_number(args.poll_interval, "--poll-interval", float, 0.05),
        session_timeout=_number(args.session_timeout, "--session-timeout", float, 5))
