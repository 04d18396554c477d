"""`execbox runner`, end to end: the real process (bin/execbox runner) on a UNIX socket in
tmp_path, driven with the generated gRPC stub, the client bb_worker is. Each server is
stopped by its pid in a finally (SIGTERM, wait, SIGKILL).

Request directories are made as bb_worker makes them: world-writable, so that a root runner's
actions (host id 65534) can write there and nowhere else. Every probe of something a sandbox
forbids first checks, inside the action, that its mount namespace differs from the host's
and exits 99 otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from conftest import cgroups_writable
from execbox.adapters.protos import execbox_pb2, resourceusage_pb2, runner_pb2, runner_pb2_grpc
from execbox.supervise.proctree import processes_with

ROOT = Path(__file__).resolve().parent.parent
EXECBOX = [sys.executable, str(ROOT / "bin" / "execbox")]
HOST_MNT = os.readlink("/proc/self/ns/mnt")
GUARD = f'[ "$(readlink /proc/self/ns/mnt)" != "{HOST_MNT}" ] || exit 99; '
PATH = "/usr/bin:/bin"
GRACE = 1.0
# Two processes that ignore TERM, with a marker made inside the sandbox (it is in no client
# argv): the tree only ends with SIGKILL after the grace.
STUBBORN = ("trap '' TERM; m=xb-$(cat /proc/sys/kernel/random/uuid); echo $m; "
            "sh -c \"trap '' TERM; sleep 300; echo $m\" & "
            "sh -c \"trap '' TERM; sleep 300; echo $m\" & wait")
Code = grpc.StatusCode


def _userns_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-U", "true"], capture_output=True, check=False).returncode == 0


needs_userns = pytest.mark.skipif(not _userns_works(),
                                  reason="user namespaces are not available here")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="a root runner's actions run as host id 65534; as another "
                              "user they run as that user, who owns the test's files")


def wait_until(check: Callable[[], object], seconds: float, what: str) -> float:
    """Poll check until it is true; returns the time it took."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - began


class Action:
    """An action's directory below the build directory, laid out as bb_worker lays it."""

    def __init__(self, build: Path, name: str) -> None:
        self.name = name
        self.dir = build / name
        self.root, self.tmp, self.logs = (self.dir / "root", self.dir / "tmp",
                                          self.dir / "server_logs")
        for directory in (self.dir, self.root, self.tmp, self.logs):
            directory.mkdir(parents=True)
            directory.chmod(0o777)

    def request(self, argv: list[str], env: dict[str, str] | None = None,
                **fields: str) -> runner_pb2.RunRequest:
        values = {"input_root_directory": f"{self.name}/root",
                  "temporary_directory": f"{self.name}/tmp",
                  "stdout_path": f"{self.name}/stdout", "stderr_path": f"{self.name}/stderr",
                  "server_logs_directory": f"{self.name}/server_logs", **fields}
        return runner_pb2.RunRequest(arguments=argv,
                                     environment_variables=env or {"PATH": PATH}, **values)

    def stdout(self) -> str:
        return (self.dir / "stdout").read_text()

    def stderr(self) -> str:
        return (self.dir / "stderr").read_text()


class Runner:
    """One `execbox runner` process and a stub talking to it."""

    def __init__(self, base: Path, *flags: str) -> None:
        self.base = base
        self.build = base / "build"
        self.build.mkdir(parents=True)
        self.socket = base / "runner.sock"
        self.log_path = base / "runner.log"
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> Runner:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*EXECBOX, "runner", "--listen", f"unix:{self.socket}", "--build-directory",
                 str(self.build), *self.flags],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc
        wait_until(lambda: "listening" in self.log() or proc.poll() is not None, 60,
                   "the runner starts")
        assert proc.poll() is None, self.log()
        self.channel = grpc.insecure_channel(f"unix:{self.socket}")
        return self

    @property
    def stub(self) -> runner_pb2_grpc.RunnerStub:
        return runner_pb2_grpc.RunnerStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def action(self) -> Action:
        return Action(self.build, uuid.uuid4().hex[:12])

    def run(self, request: runner_pb2.RunRequest) -> runner_pb2.RunResponse:
        return self.stub.Run(request, timeout=60)

    def refused(self, request: runner_pb2.RunRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.stub.Run(request, timeout=60)
        return info.value


def _serve(tmp_path_factory: pytest.TempPathFactory, name: str,
           *flags: str) -> Iterator[Runner]:
    runner = Runner(tmp_path_factory.mktemp(name), *flags)
    try:
        yield runner.start()
    finally:
        runner.stop()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """The default mode: host toolchain read-only, input root at /execbox/root."""
    if not _userns_works():
        pytest.skip("user namespaces are not available here")
    yield from _serve(tmp_path_factory, "sandboxed", "--concurrency", "2", "--grace",
                      str(GRACE))


@pytest.fixture(scope="module")
def rooted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    if not _userns_works():
        pytest.skip("user namespaces are not available here")
    flag = tmp_path_factory.getbasetemp() / "runner-ready-flag"
    yield from _serve(tmp_path_factory, "rooted", "--input-root-as-root", "--readiness-path",
                      str(flag), "--grace", str(GRACE))


LIMITED = cgroups_writable()
MEMORY_LIMIT = 256 << 20


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """--no-sandbox, one action at a time, and per-action limits where cgroups allow."""
    limits = ["--pids", "40", "--memory", str(MEMORY_LIMIT)] if LIMITED else []
    yield from _serve(tmp_path_factory, "plain", "--no-sandbox", "--concurrency", "1",
                      "--grace", str(GRACE), *limits)


def _usage(response: runner_pb2.RunResponse) -> resourceusage_pb2.POSIXResourceUsage:
    usage = resourceusage_pb2.POSIXResourceUsage()
    assert response.resource_usage[0].Unpack(usage)
    for extra in response.resource_usage[1:]:
        assert extra.Is(execbox_pb2.CgroupUsage.DESCRIPTOR), extra.type_url
    return usage


def _minimal_root(root: Path,
                  programs: tuple[str, ...] = ("sh", "cat", "readlink", "mkdir")) -> None:
    """An input root that is a whole (tiny) system: a few host programs and their
    libraries, found with ldd, copied to the same paths."""
    def copy(source: str, dest: str) -> None:
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(source), target)

    for program in programs:
        found = shutil.which(program)
        assert found, program
        copy(found, f"/bin/{program}")
        listed = subprocess.run(["ldd", found], capture_output=True, text=True, check=False)
        for line in listed.stdout.splitlines():
            words = line.split()
            library = words[2] if "=>" in words and len(words) > 2 else words[0]
            if library.startswith("/"):
                copy(library, library)


# -- validation ----------------------------------------------------------------------------
def test_every_path_error_names_its_field(runner: Runner) -> None:
    action = runner.action()
    cases = [("input_root_directory", "/etc"), ("input_root_directory", "../outside"),
             ("input_root_directory", f"{action.name}/../../outside"),
             ("working_directory", "/usr"), ("working_directory", "sub/../../.."),
             ("stdout_path", "/tmp/stdout"), ("stdout_path", "../stdout"),
             ("stderr_path", "/dev/null"), ("stderr_path", "a/../../stderr"),
             ("temporary_directory", "/tmp"), ("temporary_directory", ".."),
             ("server_logs_directory", "/var/log"), ("server_logs_directory", "x/../../y")]
    for field, bad in cases:
        request = action.request(["/bin/true"])
        setattr(request, field, bad)
        error = runner.refused(request)
        assert error.code() == Code.INVALID_ARGUMENT, (field, bad, error.details())
        assert error.details().startswith(f"{field}: "), (field, bad, error.details())
    # Nothing was created for a request that had a bad field.
    assert not (action.dir / "stdout").exists() and not (action.dir / "stderr").exists()
    for request, field in [(action.request([]), "arguments"),
                           (action.request(["true"], input_root_directory=""),
                            "input_root_directory"),
                           (action.request(["true"], input_root_directory="no/such"),
                            "input_root_directory"),
                           (action.request(["true"], temporary_directory=f"{action.name}/x"),
                            "temporary_directory"),
                           (action.request(["true"], {"PATH": PATH, "A=B": "c"}),
                            "environment_variables")]:
        error = runner.refused(request)
        assert error.code() == Code.INVALID_ARGUMENT, error.details()
        assert error.details().startswith(field), error.details()


def test_output_files_never_follow_a_symlink_out_of_the_build_directory(
        runner: Runner, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("keep\n")
    (runner.build / "evil").symlink_to(outside)
    action = runner.action()
    (action.dir / "link").symlink_to(outside / "target")
    for field, path, problem in [("stdout_path", "evil/stdout", "evil is a symlink"),
                                 ("stderr_path", f"{action.name}/link", "link is a symlink"),
                                 ("input_root_directory", "evil", "evil is a symlink"),
                                 ("server_logs_directory", "evil", "evil is a symlink")]:
        error = runner.refused(action.request(["/bin/true"], **{field: path}))
        assert error.code() == Code.INVALID_ARGUMENT
        assert error.details().startswith(f"{field}: ") and problem in error.details()
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_text() == "keep\n"
    # An existing regular file is emptied and reused; one with another hard link is not.
    (action.dir / "stdout").write_text("old and long\n")
    assert runner.run(action.request(["echo", "new"])).exit_code == 0
    assert action.stdout() == "new\n"
    os.link(action.dir / "stdout", tmp_path / "second-name")
    error = runner.refused(action.request(["echo", "again"]))
    assert error.code() == Code.INVALID_ARGUMENT and "hard links" in error.details()
    assert (tmp_path / "second-name").read_text() == "new\n"


# -- running -------------------------------------------------------------------------------
def test_outputs_exact_environment_tmp_and_input_root(runner: Runner) -> None:
    action = runner.action()
    env = {"PATH": PATH, "WITH_SPACES": "a b  c", "EMPTY": "", "UNICODE": "grüße"}
    script = ("echo to-out; echo to-err >&2; tr '\\0' '\\n' < /proc/$$/environ; "
              "echo made > /tmp/made; echo kept > result.txt; echo \"cwd=$PWD\"")
    response = runner.run(action.request(["sh", "-c", script], env))
    assert response.exit_code == 0, action.stderr()
    lines = action.stdout().splitlines()
    assert lines[0] == "to-out" and lines[-1] == "cwd=/execbox/root"
    assert sorted(lines[1:-1]) == sorted([f"{k}={v}" for k, v in env.items()] + ["TMPDIR=/tmp"])
    assert action.stderr() == "to-err\n"
    assert (action.tmp / "made").read_text() == "made\n"  # the temporary directory is /tmp
    assert (action.root / "result.txt").read_text() == "kept\n"
    usage = _usage(response)
    assert usage.maximum_resident_set_size > 0 and usage.termination_signal == ""


def test_the_program_is_looked_up_in_the_actions_own_path_from_its_working_directory(
        runner: Runner) -> None:
    action = runner.action()
    tool = action.root / "sub" / "bin" / "tool"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho \"tool ran in $PWD\"\n")
    tool.chmod(0o755)
    response = runner.run(action.request(["tool"], {"PATH": f"bin:{PATH}"},
                                         working_directory="sub"))
    assert response.exit_code == 0, action.stderr()
    assert action.stdout() == "tool ran in /execbox/root/sub\n"
    error = runner.refused(action.request(["tool"], {"PATH": PATH}, working_directory="sub"))
    assert error.code() == Code.INVALID_ARGUMENT and error.details().startswith("execve")


def test_without_a_path_in_the_request_a_bare_program_is_not_found_as_with_bb_runner(
        runner: Runner, rooted: Runner) -> None:
    """bb_runner searches only the request's PATH, with no default; in its chroot mode
    /usr/bin/env's execvp falls back to /bin:/usr/bin, and so does --input-root-as-root."""
    for env in ({"HOME": "/"}, {"PATH": ""}):
        error = runner.refused(runner.action().request(["true"], env))
        assert error.code() == Code.INVALID_ARGUMENT, error.details()
        assert error.details().startswith("arguments[0]: cannot find 'true'")
    action = runner.action()
    assert runner.run(action.request(["/bin/sh", "-c", "echo ok"], {"HOME": "/"})).exit_code == 0
    action = rooted.action()
    _minimal_root(action.root)
    response = rooted.run(action.request(["sh", "-c", "echo ok"], {"HOME": "/"}))
    assert response.exit_code == 0 and action.stdout() == "ok\n", action.stderr()


def test_exit_codes_and_termination_signals_as_bb_runner_reports_them(runner: Runner) -> None:
    for script, code, killed_by in [("exit 7", 7, ""), ("exit 0", 0, ""),
                                    ("kill -KILL $$", -1, "KILL"),
                                    ("kill -TERM $$", -1, "TERM"), ("exit 137", 137, "")]:
        response = runner.run(runner.action().request(["sh", "-c", script]))
        assert response.exit_code == code, script
        assert _usage(response).termination_signal == killed_by, script


def test_setup_failures_map_to_codes_like_bb_runner(runner: Runner) -> None:
    cases = [(["no-such-program"], "", "execve"), (["./data.txt"], "", "execve"),
             (["./garbage"], "", "execve"), (["./directory"], "", "execve"),
             (["/bin/true"], "no/such/dir", "chdir")]
    for argv, wd, step in cases:
        action = runner.action()
        (action.root / "data.txt").write_text("not a program\n")
        (action.root / "garbage").write_bytes(b"\x7fELF\x02\x01\x01garbage")
        (action.root / "garbage").chmod(0o755)
        (action.root / "directory").mkdir()
        error = runner.refused(action.request(argv, working_directory=wd))
        assert error.code() == Code.INVALID_ARGUMENT, (argv, error.details())
        assert error.details().startswith(step) and "\n" not in error.details(), argv
        record = json.loads((action.logs / "execbox-result.json").read_text())
        assert record["failure"]["step"] == step


def test_a_server_log_that_cannot_be_written_is_logged_readably(runner: Runner) -> None:
    action = runner.action()
    (action.logs / "execbox-result.json").write_text("bb_worker's own\n")
    error = runner.refused(action.request(["no-such-program"]))
    assert error.code() == Code.INVALID_ARGUMENT
    line = [line for line in runner.log().splitlines() if "server log" in line][-1]
    assert f"{action.name}/server_logs/execbox-result.json already exists" in line, line
    assert "Errno" not in line
    assert (action.logs / "execbox-result.json").read_text() == "bb_worker's own\n"


def test_status_mapping_of_other_setup_failures() -> None:
    from execbox.adapters.buildbarn.response import error_status, exit_code
    from execbox.model.result import Failure, Result

    internal = Result(125, failure=Failure("mount /proc", "EPERM", "mount /proc: denied\nmore"))
    assert error_status(internal) == (Code.INTERNAL, "mount /proc: denied")
    missing = Result(127, failure=Failure("execve", "ENOENT", "execve: not found"))
    assert error_status(missing) == (Code.INVALID_ARGUMENT, "execve: not found")
    assert error_status(Result(1, unkillable=[42])) == (
        Code.INTERNAL, "processes of the action survived SIGKILL: 42")
    assert exit_code(Result(137, signal="SIGKILL", signal_number=9)) == -1
    assert exit_code(Result(137)) == 137


# -- cancellation --------------------------------------------------------------------------
def _start_stubborn(runner: Runner, timeout: float | None) -> tuple[grpc.Future, str]:
    action = runner.action()
    future = runner.stub.Run.future(action.request(["sh", "-c", STUBBORN]), timeout=timeout)
    wait_until(lambda: (action.dir / "stdout").exists() and action.stdout().strip(), 30,
               "the action prints its marker")
    marker = action.stdout().strip()
    wait_until(lambda: len(processes_with(marker)) == 2, 30, "both children run")
    return future, marker


@needs_userns
@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancelling_the_call_kills_the_whole_tree(runner: Runner, how: str) -> None:
    ended = runner.log().count("cancelled=")
    deadline = 3.0
    began = time.monotonic()
    future, marker = _start_stubborn(runner, deadline if how == "deadline" else None)
    if how == "cancel":
        began = time.monotonic()
        assert future.cancel()
    with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
        future.result(timeout=60)
    # The Run returns (its handler logs "run ended") only once nothing of the action is left.
    wait_until(lambda: runner.log().count("cancelled=") > ended, 30, "Run returns")
    assert processes_with(marker) == [], "Run returned before the tree was gone"
    limit = (deadline if how == "deadline" else 0) + GRACE + 2
    assert time.monotonic() - began < limit, runner.log()
    reason = "deadline passed" if how == "deadline" else "client cancelled"
    assert reason in [line for line in runner.log().splitlines() if "cancelled=" in line][-1]


# -- readiness -----------------------------------------------------------------------------
def test_check_readiness(runner: Runner, rooted: Runner, tmp_path_factory:
                         pytest.TempPathFactory) -> None:
    for server in (runner, rooted):
        (server.build / "check_readiness").mkdir(exist_ok=True)
    request = runner_pb2.CheckReadinessRequest
    assert runner.stub.CheckReadiness(request(path="check_readiness"), timeout=60) is not None
    with pytest.raises(grpc.RpcError) as info:
        runner.stub.CheckReadiness(request(path="1/check_readiness"), timeout=60)
    assert info.value.code() == Code.UNAVAILABLE and "does not exist" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        runner.stub.CheckReadiness(request(path="../check_readiness"), timeout=60)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert info.value.details().startswith("path: ")
    # A --readiness-path that is missing makes the runner unavailable until it exists.
    flag = tmp_path_factory.getbasetemp() / "runner-ready-flag"
    with pytest.raises(grpc.RpcError) as info:
        rooted.stub.CheckReadiness(request(path="check_readiness"), timeout=60)
    assert info.value.code() == Code.UNAVAILABLE and str(flag) in info.value.details()
    flag.write_text("")
    assert rooted.stub.CheckReadiness(request(path="check_readiness"), timeout=60) is not None


def test_a_removed_or_replaced_build_directory_is_said_so_at_once(tmp_path: Path) -> None:
    server = Runner(tmp_path, "--no-sandbox")
    ready = runner_pb2.CheckReadinessRequest
    try:
        server.start()
        assert server.stub.CheckReadiness(ready(), timeout=30) is not None  # probe cached
        server.build.rename(tmp_path / "old-build")
        with pytest.raises(grpc.RpcError) as info:
            server.stub.CheckReadiness(ready(), timeout=30)
        assert info.value.code() == Code.UNAVAILABLE
        assert f"the build directory {server.build} was removed" in info.value.details()
        server.build.mkdir()  # bb_worker made it again: the runner holds the old one
        action = server.action()
        for call in (lambda: server.stub.CheckReadiness(ready(path=action.name), timeout=30),
                     lambda: server.run(action.request(["true"]))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == Code.UNAVAILABLE
            assert "was replaced by another directory since the runner started; restart " \
                   "the runner" in info.value.details()
    finally:
        server.stop()


def test_the_probe_says_why_execbox_cannot_run_an_action(tmp_path: Path) -> None:
    from execbox.adapters.buildbarn.config import parse_runner_args
    from execbox.adapters.buildbarn.readiness import probe

    config = parse_runner_args(["--listen", "127.0.0.1:0", "--build-directory",
                                str(tmp_path), "--no-sandbox"])
    assert probe(config) is None
    tmp_path.rmdir()
    problem = probe(config)
    assert problem is not None and "No such file or directory" in problem


# -- concurrency ---------------------------------------------------------------------------
@needs_userns
def test_parallel_runs_each_have_their_own_sandbox(runner: Runner) -> None:
    actions = [runner.action(), runner.action()]
    script = GUARD + ("touch started; while [ ! -e go ]; do sleep 0.02; done; echo $$; "
                      "for p in /proc/[0-9]*; do echo \"${p#/proc/} $(tr '\\0' ' ' "
                      "< $p/cmdline)\"; done")
    futures = [runner.stub.Run.future(a.request(["sh", "-c", script, a.name]), timeout=60)
               for a in actions]
    # Both run at once (concurrency 2): each has started before either may go on.
    wait_until(lambda: all((a.root / "started").exists() for a in actions), 30, "both start")
    for a in actions:
        (a.root / "go").touch()
    for a, future, other in zip(actions, futures, reversed(actions), strict=True):
        assert future.result().exit_code == 0, a.stderr()
        lines = a.stdout().splitlines()
        assert int(lines[0]) <= 3  # the action's shell: a low pid of its own namespace
        assert len(lines[1:]) <= 4, lines  # its init, itself, the listing: nothing else
        assert any(a.name in line for line in lines[1:])
        assert not any(other.name in line for line in lines[1:]), lines


def test_runs_beyond_the_concurrency_wait_for_a_slot(plain: Runner) -> None:
    first, second, dropped = plain.action(), plain.action(), plain.action()
    blocking = first.request(["sh", "-c", "touch started; while [ ! -e go ]; do sleep 0.02; "
                                          "done"])
    running = plain.stub.Run.future(blocking, timeout=60)
    wait_until(lambda: (first.root / "started").exists(), 30, "the first run starts")
    waiting = plain.stub.Run.future(second.request(["sh", "-c", "touch ran"]), timeout=60)
    cancelled = plain.stub.Run.future(dropped.request(["sh", "-c", "touch ran"]), timeout=60)
    time.sleep(0.5)
    assert not waiting.done() and not (second.root / "ran").exists()
    assert cancelled.cancel()  # cancelled while waiting for its slot: it never runs
    (first.root / "go").touch()
    assert running.result().exit_code == 0
    assert waiting.result().exit_code == 0 and (second.root / "ran").exists()
    time.sleep(0.3)
    assert not (dropped.root / "ran").exists()


def test_check_readiness_is_answered_however_many_runs_wait(tmp_path: Path) -> None:
    """Waiting Runs hold at most --max-waiting threads; more are refused at once, and
    CheckReadiness always finds a thread: 80 Runs are more than the server's whole pool
    (concurrency + max-waiting + 16 = 47 threads), which waiting Runs would otherwise fill."""
    server = Runner(tmp_path, "--no-sandbox", "--concurrency", "1", "--max-waiting", "30")
    go = tmp_path / "go"
    blocking = ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done"]
    futures: list[grpc.Future] = []
    try:
        server.start()
        actions = [server.action() for _ in range(80)]
        futures = [server.stub.Run.future(a.request(blocking), timeout=120) for a in actions]
        wait_until(lambda: sum(f.done() for f in futures) >= 49, 30, "the surplus is refused")
        ready = server.stub.CheckReadiness(runner_pb2.CheckReadinessRequest(), timeout=5)
        assert ready is not None
        refused = [f for f in futures if f.done()]
        assert len(refused) == 49, [f.exception() for f in refused]
        for future in refused:
            assert future.code() == Code.RESOURCE_EXHAUSTED, future.details()
            assert "--max-waiting" in future.details()
        go.touch()
        results = [f.result(timeout=60) for f in futures if f not in refused]
        assert [r.exit_code for r in results] == [0] * 31
    finally:
        for future in futures:
            future.cancel()
        server.stop()


# -- the modes -----------------------------------------------------------------------------
@needs_userns
def test_input_root_as_root_has_proc_dev_and_a_writable_root(rooted: Runner) -> None:
    action = rooted.action()
    _minimal_root(action.root)
    (action.root / "work").mkdir(mode=0o777)
    (action.root / "work").chmod(0o777)
    script = GUARD + (
        "[ -r /proc/self/status ] && echo proc; read pid rest < /proc/self/stat; "
        "[ \"$pid\" -le 5 ] && echo low-pid; [ -c /dev/null ] && echo > /dev/null && "
        "echo dev-null; [ -d /dev/fd ] && [ -e /dev/stdin ] && echo dev-fd; "
        "echo top > /written && mkdir /made && echo root-writable; "
        "echo here > here && echo workdir-writable; echo t > /tmp/t && echo tmp; "
        "(echo x > /sys/x) 2>/dev/null || echo sys-read-only; echo \"$PWD $TMPDIR\"")
    response = rooted.run(action.request(["sh", "-c", script], {"PATH": "/bin"},
                                         working_directory="work"))
    assert response.exit_code == 0, action.stdout() + action.stderr()
    assert action.stdout().splitlines() == [
        "proc", "low-pid", "dev-null", "dev-fd", "root-writable", "workdir-writable", "tmp",
        "sys-read-only", "/work /tmp"]
    assert (action.root / "written").read_text() == "top\n" and (action.root / "made").is_dir()
    assert (action.root / "work" / "here").exists() and (action.tmp / "t").exists()
    error = rooted.refused(action.request(["/bin/true"]))  # this root has no /bin/true
    assert error.code() == Code.INVALID_ARGUMENT and error.details().startswith("execve")


def _link_tree(source: Path, dest: Path) -> None:
    """dest as a hard-linked copy of source (symlinks as they are); set-id programs are
    left out, so no set-id hard link of a host program ever exists in a test directory."""
    for top, directories, files in os.walk(source):
        here = dest / Path(top).relative_to(source)
        here.mkdir(parents=True, exist_ok=True)
        for name in directories + files:
            path = Path(top) / name
            found = path.lstat()
            if stat.S_ISLNK(found.st_mode):
                (here / name).symlink_to(os.readlink(path))
            elif stat.S_ISREG(found.st_mode) and not found.st_mode & (stat.S_ISUID |
                                                                        stat.S_ISGID):
                os.link(path, here / name)
        directories[:] = [d for d in directories if not (Path(top) / d).is_symlink()]


def _toolchain_root(root: Path) -> None:
    """An input root holding the host's C toolchain (gcc, as, ld, headers, libraries) at
    the host's paths, hard-linked, as an input root of a real build would hold its own."""
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True,
                               check=True).stdout.strip()
    for part in ("usr/bin", "usr/include", "usr/lib/gcc", f"usr/lib/{multiarch}", "usr/lib64",
                 "usr/libexec/gcc"):
        if os.path.isdir(f"/{part}"):
            _link_tree(Path(f"/{part}"), root / part)
    for top in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{top}"):
            (root / top).symlink_to(os.readlink(f"/{top}"))
        elif os.path.isdir(f"/{top}"):
            _link_tree(Path(f"/{top}"), root / top)


@needs_userns
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (scripts/test.sh installs "
                                                        "it as root)")
def test_a_c_build_in_an_input_root_as_root(rooted: Runner) -> None:
    """bb-remote-execution#115: gcc finds its own programs through /proc/self/exe, which a
    chroot into the input root without /proc breaks; here the root gets a fresh /proc."""
    action = rooted.action()
    if os.stat("/usr").st_dev != os.stat(action.root).st_dev:
        pytest.skip("the toolchain is hard-linked into the input root: /usr and the test's "
                    "directory must be on one filesystem")
    _toolchain_root(action.root)
    (action.root / "work").mkdir(mode=0o777)
    (action.root / "work").chmod(0o777)
    (action.root / "work" / "answer.c").write_text(
        "#include <stdio.h>\nint main(void) { printf(\"built\\n\"); return 42; }\n")
    script = "gcc -o answer answer.c && ./answer; echo $?; readlink /proc/self/exe"
    response = rooted.run(action.request(["sh", "-c", script], {"PATH": "/usr/bin:/bin"},
                                         working_directory="work"))
    assert response.exit_code == 0, action.stdout() + action.stderr()
    assert action.stdout().splitlines() == ["built", "42", "/usr/bin/readlink"], \
        action.stderr()
    assert (action.root / "work" / "answer").is_file()


@needs_userns
@needs_root
def test_a_root_runners_action_cannot_touch_what_bb_worker_made_read_only(
        runner: Runner) -> None:
    action = runner.action()
    (action.root / "input.txt").write_text("cached\n")
    (action.root / "input.txt").chmod(0o444)
    (action.root / "closed").mkdir(mode=0o755)
    script = GUARD + ("id -u; chmod u+w input.txt 2>/dev/null || echo no-chmod; "
                      "(echo x > input.txt) 2>/dev/null || echo no-write; "
                      "(echo x > closed/f) 2>/dev/null || echo closed-dir; "
                      "echo out > out && echo out-ok")
    response = runner.run(action.request(["sh", "-c", script]))
    assert response.exit_code == 0, action.stderr()
    assert action.stdout().splitlines() == ["0", "no-chmod", "no-write", "closed-dir",
                                            "out-ok"]
    assert (action.root / "input.txt").read_text() == "cached\n"
    assert stat.S_IMODE((action.root / "input.txt").stat().st_mode) == 0o444
    assert (action.root / "out").stat().st_uid == 65534  # written as nobody, as by bb_runner


@needs_userns
@needs_root
def test_a_root_runners_action_can_reopen_its_stdout_and_stderr(runner: Runner,
                                                                rooted: Runner) -> None:
    """The output files are the action's (host id 65534), as bb_runner's are its user's."""
    script = "echo one > /dev/stdout; echo two > /dev/stderr; echo four"
    for server in (runner, rooted):
        action = server.action()
        _minimal_root(action.root)
        response = server.run(action.request(["sh", "-c", script], {"PATH": "/bin"}))
        assert response.exit_code == 0, action.stderr()
        assert (action.stdout(), action.stderr()) == ("one\nfour\n", "two\n")
        assert (action.dir / "stdout").stat().st_uid == 65534


def test_no_sandbox_runs_on_the_host_with_a_whole_tree_kill(plain: Runner) -> None:
    action = plain.action()
    script = "pwd; echo $TMPDIR; readlink /proc/self/ns/mnt; kill -KILL $$"
    response = plain.run(action.request(["sh", "-c", script], working_directory="."))
    assert response.exit_code == -1 and _usage(response).termination_signal == "KILL"
    assert action.stdout().splitlines() == [str(action.root.resolve()),
                                            str(action.tmp.resolve()), HOST_MNT]
    ended = plain.log().count("cancelled=")
    future, marker = _start_stubborn(plain, None)
    began = time.monotonic()
    future.cancel()
    wait_until(lambda: plain.log().count("cancelled=") > ended, GRACE + 2, "Run returns")
    assert processes_with(marker) == [] and time.monotonic() - began < GRACE + 2


@pytest.mark.skipif(not LIMITED, reason="execbox cannot create cgroups here (see "
                                         "`execbox doctor`)")
def test_per_action_limits_and_cgroup_usage(plain: Runner) -> None:
    action = plain.action()
    script = "i=0; while [ $i -lt 60 ]; do sleep 5 & i=$((i+1)); echo $i > started; done"
    response = plain.run(action.request(["sh", "-c", script]))
    assert response.exit_code == 2 and "fork" in action.stderr()  # dash: a failed fork
    started = int((action.root / "started").read_text())
    assert 0 < started < 40  # --pids 40 for the whole action
    assert len(response.resource_usage) == 2
    cgroup = execbox_pb2.CgroupUsage()
    assert response.resource_usage[1].Unpack(cgroup)
    assert cgroup.memory_limit_bytes == MEMORY_LIMIT and not cgroup.oom_killed
    assert cgroup.memory_peak_bytes > 0
    assert "oom_killed" not in plain.log().splitlines()[-1]
    # One long line held whole by tail: more than the limit, so the OOM killer ends it.
    hog = plain.action()
    response = plain.run(hog.request(["sh", "-c", f"head -c {2 * MEMORY_LIMIT} /dev/zero | "
                                                  "tail > /dev/null"]))
    assert response.resource_usage[1].Unpack(cgroup) and cgroup.oom_killed
    assert "oom_killed=true" in plain.log().splitlines()[-1], plain.log()


# -- the command line ----------------------------------------------------------------------
def test_bad_flags_are_one_line_naming_the_flag(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from execbox.adapters.buildbarn.main import main

    good = ["--listen", f"unix:{tmp_path}/r.sock", "--build-directory", str(tmp_path)]
    cases = [([], "--listen"), (["--listen", f"unix:{tmp_path}/r.sock"], "--build-directory"),
             (["--listen", "1234", "--build-directory", str(tmp_path)], "--listen"),
             (["--listen", "unix:/no/such/dir/r.sock", "--build-directory", str(tmp_path)],
              "--listen"),
             (["--listen", f"unix:{tmp_path}/r.sock", "--build-directory", "/no/such"],
              "--build-directory"),
             ([*good, "--concurrency", "0"], "--concurrency"),
             ([*good, "--concurrency", "many"], "--concurrency"),
             ([*good, "--grace", "-1"], "--grace"), ([*good, "--grace", "nan"], "--grace"),
             ([*good, "--memory", "lots"], "--memory"), ([*good, "--pids", "0"], "--pids"),
             ([*good, "--frobnicate"], "--frobnicate"), ([*good, "--listen"], "--listen"),
             ([*good, "--input-root-as-root", "--no-sandbox"], "--input-root-as-root"),
             ([*good, "--input-root-path", "/usr/root"], "--input-root-path"),
             ([*good, "--pids", "99999999999"], "--pids: 99999999999 is more than")]
    for argv, flag in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("execbox runner: "), (argv, err)
        assert flag in err, (argv, err)
    # As a process: one line, no traceback; a live runner's socket is not taken over.
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live.sock"))
    live.listen()
    try:
        directory = ["--build-directory", str(tmp_path), "--no-sandbox"]
        cases = [(["--bogus"], "--bogus"),
                 (["--listen", f"unix:{tmp_path}/live.sock"], "another process listens"),
                 (["--listen", "256.1.1.1:0"], "256.1.1.1 is not a valid IP address"),
                 (["--listen", "bogus.invalid:1234"], "cannot resolve bogus.invalid"),
                 (["--listen", "127.0.0.1:70000"], "port 70000 is out of range"),
                 (["--listen", "unix:/proc/s.sock"], "/proc must be a writable directory")]
        if LIMITED:
            cases.append((["--listen", f"unix:{tmp_path}/r.sock", "--memory", "1"],
                          "the OOM killer ended a probe action"))
        for argv, expected in cases:
            proc = subprocess.run([*EXECBOX, "runner", *argv, *directory], capture_output=True,
                                  text=True, timeout=60, check=False)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
            assert expected in proc.stderr and "Traceback" not in proc.stderr
    finally:
        live.close()


def test_a_bind_that_fails_in_grpc_is_one_line_with_grpcs_reason(
        capfd: pytest.CaptureFixture[str]) -> None:
    """Taken between our check and gRPC's bind: gRPC's log line becomes our reason."""
    from execbox.adapters.buildbarn.listen import add_port
    from execbox.model.errors import SpecError

    def failing(address: str) -> int:
        os.write(2, b"E1124 00:00:00.0 1 add_port.cc:83] Failed to add port to server: "
                    b"Error in bind: Address already in use\n")
        raise RuntimeError(f"Failed to bind to address {address}; set GRPC_VERBOSITY=debug")

    with pytest.raises(SpecError) as info:
        add_port(failing, "127.0.0.1:1")
    assert str(info.value) == ("--listen: cannot listen on 127.0.0.1:1: Error in bind: "
                               "Address already in use")
    assert capfd.readouterr().err == ""
    assert add_port(lambda address: 42, "127.0.0.1:0") == 42


def test_a_tcp_port_another_runner_listens_on_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "first.log"
    command = [*EXECBOX, "runner", "--build-directory", str(tmp_path), "--no-sandbox",
               "--listen"]
    with open(log, "wb") as out:
        first = subprocess.Popen([*command, "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "listening" in log.read_text() or first.poll() is not None, 60,
                   "the first runner starts")
        port = int(log.read_text().split(" on=127.0.0.1:")[1].split()[0])
        # Not even a socket that asks for SO_REUSEPORT may share the runner's port.
        sharing = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with sharing, pytest.raises(OSError) as info:
            sharing.bind(("127.0.0.1", port))
        assert info.value.errno == errno.EADDRINUSE
        second = subprocess.run([*command, f"127.0.0.1:{port}"], capture_output=True,
                                text=True, timeout=60, check=False)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert "another process listens on 127.0.0.1 port" in second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(30)


def test_sigterm_cancels_running_actions_and_removes_the_socket(tmp_path: Path) -> None:
    server = Runner(tmp_path, "--no-sandbox", "--grace", str(GRACE))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # left by a killed runner
    stale.bind(str(server.socket))
    stale.close()
    try:
        server.start()
        future, marker = _start_stubborn(server, None)
        assert server.proc is not None
        began = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=30)
        assert info.value.code() == Code.UNAVAILABLE, info.value.details()
        assert processes_with(marker) == []
        assert time.monotonic() - began < GRACE + 2
        assert server.proc.wait(30) == 0, server.log()
        assert not server.socket.exists()
        assert server.log().splitlines()[-1] == "execbox runner: stopped"
    finally:
        server.stop()


# -- the core options the runner needs (SandboxSpec root_writable, idmap) -------------------
def test_root_writable_and_idmap_are_validated() -> None:
    import execbox

    with pytest.raises(execbox.SpecError) as info:
        execbox.SandboxSpec(root_writable=True)
    assert info.value.field == "sandbox.root_writable"
    for host in ("/", "/proc", "/sys/fs", "/dev"):
        with pytest.raises(execbox.SpecError) as info:
            execbox.SandboxSpec(host, root_writable=True)
        assert info.value.field == "sandbox.root", host
    box = execbox.SandboxSpec("/srv", root_writable=True, idmap=False)
    assert box.root_writable and not box.idmap and box.cwd_inside
    again = execbox.SandboxSpec.from_wire(box.to_wire())  # crosses to the supervisor
    assert again.root_writable and not again.idmap
    assert execbox.SandboxSpec().idmap and not execbox.SandboxSpec().root_writable


def test_root_writable_binds_the_root_itself_and_leaves_it_writable() -> None:
    import execbox
    from execbox.plan.sandbox import sandbox_steps

    outside, _ = sandbox_steps(execbox.SandboxSpec("/srv", root_writable=True), "/")
    steps = [(name, args) for name, args in outside
             if name in ("new_root", "bind", "enter_root")]
    assert steps == [("new_root", ("",)), ("bind", ("bind", "/srv", "/", None)),
                     ("enter_root", (False,))]
    outside, _ = sandbox_steps(execbox.SandboxSpec("/srv"), "/")
    assert ("new_root", ("/srv",)) in outside and ("enter_root", (True,)) in outside


@needs_root
def test_idmap_false_keeps_a_root_callers_binds_plain() -> None:
    import execbox
    from execbox.plan.sandbox import sandbox_steps

    for idmap, owner in ((True, [0, 0]), (False, None)):
        box = execbox.SandboxSpec(binds=[("/srv", "/work")], bind_workdir=False, idmap=idmap)
        outside, _ = sandbox_steps(box, "/work")
        assert ("bind", ("bind", "/srv", "/work", owner)) in outside
        assert any(name == "prepare_idmaps" for name, _ in outside) == idmap


@needs_userns
def test_a_writable_root_through_the_api(tmp_path: Path) -> None:
    import execbox

    root = tmp_path / "root"
    _minimal_root(root)
    root.chmod(0o777)
    box = execbox.SandboxSpec(root, root_writable=True, idmap=False)
    result = execbox.run(["/bin/sh", "-c", GUARD + "echo made > /made; cat /made"],
                         sandbox=box, cwd="/", env={"PATH": "/bin"}, stdout=execbox.CAPTURE,
                         stderr=execbox.CAPTURE, timeout=60)
    assert result.exit_code == 0, (result.failure, result.stderr)
    assert result.stdout == b"made\n" and (root / "made").read_text() == "made\n"
    assert {"dev", "proc", "sys", "tmp"} <= {p.name for p in root.iterdir()}  # mount points


def test_the_socket_is_open_to_bb_worker_running_as_another_user(runner: Runner) -> None:
    """bb_worker usually runs as its own user: the socket is 0666 (--socket-mode)."""
    import stat as stat_module

    assert stat_module.S_IMODE(os.stat(runner.socket).st_mode) == 0o666


def test_an_input_root_whose_proc_is_a_symlink_is_the_requests_fault() -> None:
    from execbox.adapters.common.status import INVALID_ARGUMENT, failure_code
    from execbox.model.result import Failure

    for step, errno_name in (("mount /proc", "ELOOP"), ("tmpfs /tmp", "ELOOP"),
                             ("mount /sys", "ENOTDIR"), ("mount /dev", "EEXIST")):
        assert failure_code(Failure(step, errno_name, "m")) == INVALID_ARGUMENT
    assert failure_code(Failure("mount /proc", "EPERM", "m")) != INVALID_ARGUMENT


def test_the_readme_sections_and_their_links() -> None:
    """The README's two sections the runner answers to, with links that resolve."""
    import re

    readme = (ROOT / "README.md").read_text()
    for title in ("Use execbox with Buildbarn", "Call execbox from any language"):
        section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        assert "unix:" in section and "runner.proto" in readme, title
        for target in re.findall(r"\]\(([^)#:]+)(?:#([^)]+))?\)", section):
            path, anchor = target
            assert (ROOT / path).exists(), path
            if anchor:
                headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
                slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                         for h in headings}
                assert anchor in slugs, (path, anchor)
    assert "endpoint: { address: 'unix:///worker/runner' }" in readme


@needs_userns
def test_a_short_load_battery_answers_right_and_leaves_nothing(tmp_path: Path) -> None:
    """The short version of bench/runner_load.py (scripts/runner-load.sh runs 5,000): Runs
    at concurrency 16, a tenth cancelled at random moments, every response checked; no
    process, runner fd, mount or cgroup of any action left."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "runner_load.py"), "--runs",
                           "160", "--concurrency", "16", "--cancel", "0.1"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.stdout, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 0, report
    assert report["cancelled"] > 0 and report["exit"] > 0 and report["signal"] > 0, report
    assert report["cancelled"] + report["exit"] + report["signal"] == 160, report


def test_a_missing_or_blocked_directory_is_named_as_it_is(tmp_path: Path) -> None:
    missing = subprocess.run([*EXECBOX, "runner", "--build-directory", str(tmp_path),
                              "--listen", f"unix:{tmp_path}/none/runner.sock"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and f"{tmp_path}/none does not exist" in missing.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    worker = subprocess.run([*EXECBOX, "worker", "--build-dir", str(blocker), "--remote",
                             "127.0.0.1:1"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert worker.returncode != 0, worker
    assert f"--build-dir: {blocker} exists and is not a directory" in worker.stderr, worker
