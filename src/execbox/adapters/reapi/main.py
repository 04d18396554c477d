"""`execbox worker`: parse, check the host, open the cache and build directory, serve
metrics, and run the bot session until SIGINT (drain) or SIGTERM (cancel and report)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TypeVar

from ...model.errors import SpecError
from ...model.result import Result
from ..common.commands import one_line_errors
from .cache import LocalCas
from .cas import CasClient
from .config import WorkerConfig, parse_worker_args
from .logs import WorkerLog
from .metrics import WorkerMetrics
from .protos import grpc
from .session import BotSessionLoop
from .status import first_line
from .workspace import BuildDirInUse, Workspace

# Long polls and large blobs: the defaults of 4 MiB and no keepalive are too small.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                    ("grpc.keepalive_time_ms", 30_000),
                    ("grpc.enable_retries", 1)]


def open_channel(url: str) -> grpc.Channel:
    """http://, grpc:// -> insecure; https://, grpcs:// -> TLS with the system roots."""
    for scheme in ("https://", "grpcs://"):
        if url.startswith(scheme):
            return grpc.secure_channel(url[len(scheme):], grpc.ssl_channel_credentials(),
                                       options=_CHANNEL_OPTIONS)
    target = url
    for scheme in ("http://", "grpc://"):
        target = target.removeprefix(scheme)
    return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)


def _probe(sandboxed: bool, **limits: int) -> Result:
    """/bin/true run as an action would be."""
    from ...api.run import run
    from ...model.sandbox import SandboxSpec
    from ...streams.stdio import DEVNULL

    options: dict[str, object] = {"sandbox": SandboxSpec(bind_workdir=False)} if sandboxed \
        else {}
    return run(["/bin/true"], cwd="/", env={"PATH": "/usr/bin:/bin"}, stdin=DEVNULL,
               stdout=DEVNULL, stderr=DEVNULL, timeout=60, **options, **limits)


def _said(result: Result, what: str) -> str | None:
    if result.failure is not None:
        return result.failure.message
    return None if result.exit_code == 0 else f"{what} exited {result.exit_code}"


def sandbox_problem() -> str | None:
    """Why this host cannot run a sandboxed step (execbox's own first error line), found by
    running one; None when it can."""
    return _said(_probe(True), "a sandboxed /bin/true")


def check_limits(config: WorkerConfig) -> None:
    """--memory and --pids, probed like the Buildbarn runner does: a limit too small for
    /bin/true would fail every action (killed, yet reported with status OK), and where
    the bound lies depends on the kernel and the sandbox, so no fixed floor would do."""
    limits = {k: v for k, v in (("memory", config.memory), ("pids", config.pids))
              if v is not None}
    if not limits:
        return
    result = _probe(config.sandbox, **limits)
    problem = _said(result, "/bin/true")
    if problem is None:
        return
    flag = "--memory" if config.memory is not None and (
        result.oom_killed or result.failure is not None or config.pids is None) else "--pids"
    raise SpecError(flag, f"a probe action cannot run under --memory/--pids "
                          f"({', '.join(f'{k}={v}' for k, v in limits.items())}): "
                          f"{first_line(problem)}")


def serve(config: WorkerConfig, log: WorkerLog) -> int:
    if config.sandbox:
        problem = sandbox_problem()
        if problem is not None:
            log.event("cannot sandbox", reason=problem,
                      hint="see `execbox doctor`; --no-sandbox runs actions unsandboxed")
            return 2
    check_limits(config)
    metrics = WorkerMetrics()
    if config.metrics_port is not None:
        try:
            metrics.serve(config.metrics_port, config.metrics_address)
        except OSError as exc:
            raise SpecError("--metrics-port", f"cannot listen on {config.metrics_address}:"
                                              f"{config.metrics_port}: {exc.strerror}") from None
    cache = _open("--cache-dir", lambda: LocalCas(config.cache_dir, config.cache_size))
    try:
        workspace = _open("--build-dir", lambda: Workspace(config.build_dir, config.sandbox))
    except BaseException:
        cache.close()
        raise
    channel = cas_channel = None
    try:
        if workspace.removed_stale:
            log.event("removed what a crashed worker left",
                      dirs=",".join(workspace.removed_stale))
        channel = open_channel(config.remote)
        cas_channel = channel if config.cas == config.remote else open_channel(config.cas)
        from .action import ActionRunner

        runner = ActionRunner(config, CasClient(cas_channel, config.instance), cache,
                              workspace)
        loop = BotSessionLoop(config, channel, runner, metrics, log)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if signum == signal.SIGINT:
                loop.drain()
            else:
                loop.stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        log.event("started", remote=config.remote, instance=config.instance or None,
                  bot_id=config.bot_id, capacity=config.capacity,
                  sandbox="on" if config.sandbox else "off", pid=os.getpid())
        return loop.run()
    finally:
        workspace.close()
        cache.close()
        for open_channel_ in {id(c): c for c in (channel, cas_channel) if c}.values():
            open_channel_.close()


T = TypeVar("T")


def _open(flag: str, make: Callable[[], T]) -> T:
    """A directory the worker needs, or a one-line error naming its flag."""
    try:
        return make()
    except BuildDirInUse as exc:
        raise SpecError(flag, str(exc)) from None
    except FileExistsError as exc:  # (something that is no directory is in the way)
        raise SpecError(flag, f"{exc.filename} exists and is not a directory") from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise SpecError(flag, f"{exc.strerror or exc}{where}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    json_logs = "--log-format=json" in args or (
        "--log-format" in args[:-1] and args[args.index("--log-format") + 1] == "json")
    log = WorkerLog("json" if json_logs else "text")
    return one_line_errors("execbox worker", lambda: serve(parse_worker_args(args), log))
