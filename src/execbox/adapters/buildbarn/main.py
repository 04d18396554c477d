"""`execbox runner`: parse, check that execbox can run actions in the chosen mode, serve
buildbarn.runner.Runner on a UNIX socket (or TCP), and on SIGTERM/SIGINT stop gracefully:
refuse new Runs, cancel running ones (cancel signal, grace, SIGKILL to each whole tree),
wait until every tree is gone, remove the socket file. A second signal kills at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

from ...model.errors import SpecError
from ..common.commands import one_line_errors
from .config import RunnerConfig, parse_runner_args, split_host_port
from .logs import RunnerLog
from .paths import BuildDirectory

# Beyond the Runs that run or wait (at most --concurrency + --max-waiting threads): for
# CheckReadiness and for Runs refused at once because too many wait.
_SPARE_THREADS = 16


# A limit execbox itself refuses (e.g. above what this kernel allows) names the flag.
_CORE_FIELDS = {"memory": "--memory", "pids": "--pids", "grace": "--grace"}


def _enter_cgroup_leaf(config: RunnerConfig) -> None:
    """With limits on cgroup v2, the runner (an API user) leaves the delegated cgroup to
    its step cgroups (see execbox.cgroups.delegation)."""
    if config.memory is None and config.pids is None:
        return
    from ...cgroups.delegation import enter_leaf

    try:
        enter_leaf()
    except OSError as exc:
        raise SpecError("--memory" if config.memory is not None else "--pids",
                        str(exc)) from None


def check_listen(config: RunnerConfig) -> None:
    """--listen is usable (before the probe action, so a typo fails at once)."""
    from .listen import check_socket_path, check_tcp_address, claim_socket_path

    if config.socket_path is not None:
        claim_socket_path(config.socket_path)
        check_socket_path(config.socket_path)
    else:
        check_tcp_address(*split_host_port(config.listen))


def serve(config: RunnerConfig, log: RunnerLog) -> int:
    _enter_cgroup_leaf(config)
    build = BuildDirectory(config.build_directory)
    try:
        return _serve(config, log, build)
    except SpecError as exc:  # execbox's own field names -> the flags that set them
        flag = _CORE_FIELDS.get(exc.field)
        if flag is None:
            raise
        raise SpecError(flag, exc.problem) from None
    finally:
        build.close()


def _serve(config: RunnerConfig, log: RunnerLog, build: BuildDirectory) -> int:
    from .listen import SocketFile, add_port
    from .protos import grpc, runner_pb2_grpc
    from .readiness import OOM_PROBLEM, Readiness
    from .server import RunnerService

    check_listen(config)
    readiness = Readiness(config, build)
    problem = readiness.execbox_problem()
    if problem is not None:
        hint = "see `execbox doctor`" + ("; --no-sandbox runs actions unsandboxed"
                                         if config.mode != "none" else "")
        if problem.startswith(OOM_PROBLEM):
            hint = "raise --memory"
        log.event("cannot run actions", mode=config.mode, reason=problem, hint=hint)
        return 2
    service = RunnerService(config, build, readiness, log)
    # Every Run that runs or waits holds a thread (waiting is cheap: a condition, made
    # lazily); the service refuses Runs beyond that, so spare threads remain for
    # CheckReadiness however many Runs bb_worker sends.
    threads = config.concurrency + config.max_waiting + _SPARE_THREADS
    server = grpc.server(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="runner"),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                  # gRPC sets SO_REUSEPORT by default: a second runner on
                                  # the same port would bind and share it silently.
                                  ("grpc.so_reuseport", 0)])
    runner_pb2_grpc.add_RunnerServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    port = add_port(server.add_insecure_port, config.listen)
    socket_file = SocketFile(config.socket_path) if config.socket_path else None
    signals: list[int] = []
    wake = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)
        wake.set()

    try:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.start()
        if config.socket_path is not None:
            os.chmod(config.socket_path, config.socket_mode)
        where = config.listen if socket_file else f"{config.listen.rpartition(':')[0]}:{port}"
        log.event("listening", on=where, build_directory=config.build_directory,
                  mode=config.mode, concurrency=config.concurrency, pid=os.getpid())
        while not wake.wait(1.0):
            pass
        log.event("stopping", signal=signal.Signals(signals[0]).name, running=service.running)
        service.stop()
        hard = False
        while not service.wait_idle(0.1):
            if len(signals) > 1 and not hard:  # a second signal: SIGKILL the trees now
                hard = True
                service.stop(hard=True)
        server.stop(grace=1).wait()
    finally:
        if socket_file is not None:
            socket_file.remove()
    log.event("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    log = RunnerLog()
    return one_line_errors("execbox runner", lambda: serve(parse_runner_args(args), log))
