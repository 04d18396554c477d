"""`execbox worker` pieces that need no server: options, status mapping, build directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from execbox.adapters.protos import execbox_pb2, resourceusage_pb2
from execbox.adapters.reapi import status
from execbox.adapters.reapi.config import DEFAULT_INPUT_ROOT_PATH, parse_worker_args
from execbox.adapters.reapi.protos import code_pb2
from execbox.adapters.reapi.workspace import BuildDirInUse, Workspace
from execbox.model.errors import SpecError
from execbox.model.result import Failure, Result, Usage

ROOT = Path(__file__).resolve().parent.parent


def _worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bin" / "execbox"), "worker", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_defaults_advertise_the_platform_and_capacity_is_the_cores() -> None:
    config = parse_worker_args(["--remote", "127.0.0.1:50051"], env={})
    assert config.remote == "http://127.0.0.1:50051" and config.cas == config.remote
    assert config.capacity == (os.cpu_count() or 1)
    props = dict(config.properties)
    assert props["OSFamily"] == "linux" and props["network"] == "on"
    assert props["ISA"] in ("x86-64", "arm-a64") or props["ISA"]
    assert config.input_root_path == DEFAULT_INPUT_ROOT_PATH
    assert config.sandbox and config.bot_id.endswith(str(config.build_dir))


def test_environment_variables_stand_in_for_flags() -> None:
    config = parse_worker_args([], env={"EXECBOX_WORKER_REMOTE": "http://h:1",
                                        "EXECBOX_WORKER_CAPACITY": "3",
                                        "EXECBOX_WORKER_NO_SANDBOX": "1"})
    assert (config.remote, config.capacity, config.sandbox) == ("http://h:1", 3, False)


@pytest.mark.parametrize(("args", "flag"), [
    ([], "--remote"),
    (["--remote", "ftp://x"], "--remote"),
    (["--remote", "h:1", "--capacity", "0"], "--capacity"),
    (["--remote", "h:1", "--capacity", "many"], "--capacity"),
    (["--remote", "h:1", "--property", "novalue"], "--property"),
    (["--remote", "h:1", "--cache-size", "lots"], "--cache-size"),
    (["--remote", "h:1", "--input-root-path", "/usr/x"], "--input-root-path"),
    (["--remote", "h:1", "--input-root-path", "rel"], "--input-root-path"),
    (["--remote", "h:1", "--log-format", "xml"], "--log-format"),
    (["--remote", "h:1", "--metrics-port", "99999"], "--metrics-port"),
    (["--remote", "h:1", "--no-such-flag"], "arguments"),
])
def test_bad_options_name_the_flag(args: list[str], flag: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_worker_args(args, env={})
    assert info.value.field == flag


def test_the_command_line_says_one_line_not_a_traceback() -> None:
    out = _worker("--remote", "h:1", "--capacity", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == "execbox worker: --capacity: must be at least 1, got '0'"
    assert "Traceback" not in out.stderr


def test_start_failures_map_like_buildbarn() -> None:
    bad = Failure("execve", "ENOENT", "execve: No such file or directory: cc", "")
    assert status.failure_code(bad) == code_pb2.INVALID_ARGUMENT
    for errno_name in ("EACCES", "ENOEXEC", "EISDIR"):
        assert status.failure_code(Failure("execve", errno_name, "m")) == \
            code_pb2.INVALID_ARGUMENT
    assert status.failure_code(Failure("chdir", "ENOENT", "m")) == code_pb2.INVALID_ARGUMENT
    assert status.failure_code(Failure("mount /proc", "EPERM", "m")) == code_pb2.INTERNAL
    assert status.failure_code(Failure("execve", "ENOMEM", "m")) == code_pb2.INTERNAL


def test_usage_and_failure_records_carry_every_field() -> None:
    usage = Usage(user_time=1.5, system_time=0.25, maximum_resident_set_size=4096,
                  page_faults=3, voluntary_context_switches=7, termination_signal="KILL",
                  cgroup_peak_memory=1 << 20, cgroup_cpu_time=0.5)
    message = status.usage_message(usage)
    assert message.user_time.ToNanoseconds() == 1_500_000_000
    assert message.system_time.ToNanoseconds() == 250_000_000
    assert (message.maximum_resident_set_size, message.page_faults,
            message.voluntary_context_switches, message.termination_signal) == \
        (4096, 3, 7, "KILL")
    again = resourceusage_pb2.POSIXResourceUsage.FromString(message.SerializeToString())
    assert again == message
    cgroup = status.cgroup_message(Result(0, usage=usage, oom_killed=True), 64 << 20)
    assert cgroup == execbox_pb2.CgroupUsage(memory_peak_bytes=1 << 20, cpu_usage_usec=500_000,
                                             memory_limit_bytes=64 << 20, oom_killed=True)
    assert status.cgroup_message(Result(0), None) is None
    record = status.failure_message(Failure("execve", "ENOENT", "execve: nope", "install it"))
    assert (record.step, record.errno_name, record.errno_number, record.hint) == \
        ("execve", "ENOENT", 2, "install it")


def test_a_crashed_workers_build_directory_is_removed_by_the_next(tmp_path: Path) -> None:
    build = tmp_path / "build"
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from execbox.adapters.reapi.workspace import BuildDirInUse, Workspace
        ws = Workspace(Path({str(build)!r}), sandboxed=False)
        action = ws.new_action()
        (action.root / "sub").mkdir()
        (action.root / "sub" / "f").write_text("x")
        os.chmod(action.root / "sub", 0)
        print(ws.path, flush=True)
        time.sleep(60)
    """)
    crashed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert crashed.stdout is not None
        left = Path(crashed.stdout.readline().strip())
        assert left.is_dir()
        # One worker per build directory: a second one is refused, naming the first.
        with pytest.raises(BuildDirInUse, match=f"in use by another execbox worker "
                                                f"\\(pid {crashed.pid}\\)"):
            Workspace(build, sandboxed=False)
        assert left.is_dir()
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(timeout=30)
        restarted = Workspace(build, sandboxed=False)
        assert restarted.removed_stale == [left.name]
        assert not left.exists()
        action = restarted.new_action()
        assert action.root.is_dir()
        action.close()
        assert not action.path.exists()
        restarted.close()
        assert [p.name for p in build.iterdir()] == [".lock"]
    finally:
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait(timeout=30)


class _BrokenCas:
    """A CAS that fails the way a real one does when it is away or lacks a blob."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def read_blobs(self, digests: object) -> dict[str, bytes]:
        raise self.error


def _runner(tmp_path: Path, cas: object) -> Any:
    from execbox.adapters.reapi.action import ActionRunner
    from execbox.adapters.reapi.cache import LocalCas

    config = parse_worker_args(["--remote", "h:1", "--build-dir", str(tmp_path / "b"),
                                "--cache-dir", str(tmp_path / "c")], env={})
    workspace = Workspace(config.build_dir, sandboxed=False)
    return ActionRunner(config, cas, LocalCas(config.cache_dir, 1 << 20), workspace)  # type: ignore[arg-type]


def _lease() -> Any:
    from execbox.adapters.reapi.digests import digest_of_bytes
    from execbox.adapters.reapi.protos import bots_pb2, re_pb2

    lease = bots_pb2.Lease(id="/job", state=bots_pb2.ACTIVE)
    lease.payload.Pack(re_pb2.Action(command_digest=digest_of_bytes(b"command"),
                                     input_root_digest=digest_of_bytes(b"root")))
    return lease


def test_a_cas_that_is_away_makes_the_lease_unavailable_so_buildgrid_retries(
        tmp_path: Path) -> None:
    from execbox.adapters.reapi.action import RunningLease
    from execbox.adapters.reapi.cas import CasError

    runner = _runner(tmp_path, _BrokenCas(CasError("BatchReadBlobs: UNAVAILABLE: down",
                                                   code_pb2.UNAVAILABLE)))
    outcome = runner.run(_lease(), RunningLease("/job"))
    assert outcome.code == code_pb2.UNAVAILABLE
    assert outcome.message == "CAS: BatchReadBlobs: UNAVAILABLE: down"
    lease = outcome.lease()
    assert lease.status.code == code_pb2.UNAVAILABLE and lease.state == 4  # COMPLETED
    [worker_dir] = (tmp_path / "b").glob("worker-*")
    assert [p.name for p in worker_dir.iterdir()] == ["lock"]  # no action directory left


def test_a_blob_missing_from_the_cas_is_failed_precondition_naming_it(tmp_path: Path) -> None:
    from buildgrid.common.protos.google.rpc import error_details_pb2

    from execbox.adapters.reapi.action import RunningLease
    from execbox.adapters.reapi.cas import CasError

    key = "ab" * 32 + "/7"
    runner = _runner(tmp_path, _BrokenCas(CasError("missing", code_pb2.NOT_FOUND,
                                                   missing=[key])))
    status_message = runner.run(_lease(), RunningLease("/job")).status()
    assert status_message.code == code_pb2.FAILED_PRECONDITION
    failure = error_details_pb2.PreconditionFailure()
    assert status_message.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [("MISSING", f"blobs/{key}")]


def test_log_lines_are_one_line_text_or_json() -> None:
    import io
    import json as json_module

    from execbox.adapters.reapi.logs import WorkerLog

    text = io.StringIO()
    WorkerLog("text", text).event("lease", action="ab/1", exit=0, fetch=0.0123,
                                  message="two words", skipped=None)
    assert text.getvalue() == ('execbox worker: lease action=ab/1 exit=0 fetch=0.012 '
                               'message="two words"\n')
    js = io.StringIO()
    WorkerLog("json", js).event("lease", action="ab/1", exit=0)
    record = json_module.loads(js.getvalue())
    assert (record["event"], record["action"], record["exit"]) == ("lease", "ab/1", 0)


def test_a_build_directory_with_other_files_keeps_them_and_its_mode(tmp_path: Path) -> None:
    build = tmp_path / "shared"
    (build / "worker-notes").mkdir(parents=True)
    (build / "worker-notes" / "todo.txt").write_text("hi")
    (build / "worker-12345").mkdir()           # a worker's name, but no lock: not provably
    (build / "worker-12345" / "mine").write_text("keep")
    (build / "worker-99999").mkdir()           # empty: a crash before the lock was made
    os.chmod(build, 0o1777)
    workspace = Workspace(build, sandboxed=False)
    try:
        assert workspace.removed_stale == ["worker-99999"]
        assert (build / "worker-notes" / "todo.txt").read_text() == "hi"
        assert (build / "worker-12345" / "mine").read_text() == "keep"
        assert os.stat(build).st_mode & 0o7777 == 0o1777
    finally:
        workspace.close()
    fresh = tmp_path / "fresh" / "build"
    Workspace(fresh, sandboxed=False).close()
    assert os.stat(fresh).st_mode & 0o777 == 0o711  # the worker made it: its mode


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root")
def test_another_users_plants_in_a_shared_build_directory_are_never_touched(
        tmp_path: Path) -> None:
    """A world-writable build directory: a .lock symlinked at a file elsewhere is refused
    (never truncated), and another user's worker-<n> with an unheld lock is not removed."""
    build = tmp_path / "shared"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (build / "worker-4242").mkdir(parents=True)
    (build / "worker-4242" / "lock").write_text("")
    (build / "worker-4242" / "data").write_text("theirs")
    for path in (build / "worker-4242", build / "worker-4242" / "lock"):
        os.chown(path, 65534, 65534)
    os.chmod(build, 0o1777)
    (build / ".lock").symlink_to(victim)
    with pytest.raises(OSError):
        Workspace(build, sandboxed=False)
    assert victim.read_text() == "precious"
    (build / ".lock").unlink()
    workspace = Workspace(build, sandboxed=False)
    try:
        assert workspace.removed_stale == []
        assert (build / "worker-4242" / "data").read_text() == "theirs"
    finally:
        workspace.close()


def test_removing_a_tree_never_follows_a_swapped_in_symlink(tmp_path: Path) -> None:
    """An action's leftovers made unwritable, one directory a symlink to the outside: the
    removal opens up only what is below it, through fds, and the outside keeps its mode."""
    from execbox.adapters.reapi.workspace import remove_tree

    outside = tmp_path / "outside"
    outside.mkdir(mode=0o500)
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "link").symlink_to(outside)
    os.chmod(tree / "a" / "b", 0)
    os.chmod(tree / "a", 0o500)
    remove_tree(tree)
    assert not tree.exists()
    assert os.stat(outside).st_mode & 0o777 == 0o500


@pytest.mark.parametrize("flag", ["--grace", "--max-timeout", "--poll-interval",
                                  "--session-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_durations_must_be_finite(flag: str, value: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_worker_args(["--remote", "h:1", f"{flag}={value}"], env={})
    assert info.value.field == flag
    assert "finite" in str(info.value)


def test_a_memory_limit_no_action_can_run_under_is_refused_at_start(tmp_path: Path) -> None:
    from conftest import cgroups_writable

    if not cgroups_writable():
        pytest.skip("needs cgroups execbox can write")
    out = _worker("--remote", "http://127.0.0.1:1", "--memory", "1", "--no-sandbox",
                  "--build-dir", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c"))
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("execbox worker: --memory: a probe action cannot run under")
    assert not (tmp_path / "b").exists()  # refused before anything was made


class _FixedRunner:
    """Stands in for ActionRunner: every lease ends with the outcome it is given."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def run(self, lease: Any, running: Any, queued: Any = None) -> Any:
        return self.make(lease)


def _session(tmp_path: Path, make: Any) -> tuple[Any, Any, Any]:
    import io

    from execbox.adapters.reapi.logs import WorkerLog
    from execbox.adapters.reapi.metrics import WorkerMetrics
    from execbox.adapters.reapi.protos import grpc
    from execbox.adapters.reapi.session import BotSessionLoop

    config = parse_worker_args(["--remote", "h:1", "--build-dir", str(tmp_path / "b")],
                               env={})
    stream = io.StringIO()
    loop = BotSessionLoop(config, grpc.insecure_channel("127.0.0.1:1"),
                          _FixedRunner(make), WorkerMetrics(), WorkerLog("json", stream))
    return loop, loop.metrics, stream


def _run_lease(loop: Any, lease_id: str) -> None:
    """One lease through the session's thread body, as if BuildGrid had assigned it."""
    import threading

    from execbox.adapters.reapi.action import RunningLease
    from execbox.adapters.reapi.session import _Lease

    lease = _lease()
    lease.id = lease_id
    running = RunningLease(lease_id)
    loop._leases[lease_id] = _Lease(running, threading.current_thread())
    if loop.state == "stopping":
        running.cancel()
    loop._work(lease, running)


def test_cancelled_and_handed_back_leases_have_their_own_code_and_outcome(
        tmp_path: Path) -> None:
    import json as json_module

    from execbox.adapters.reapi.action import LeaseOutcome

    loop, metrics, stream = _session(tmp_path, lambda lease: LeaseOutcome(
        lease.id, cancelled=True))
    _run_lease(loop, "/cancelled")
    loop.state = "stopping"
    _run_lease(loop, "/stopped")
    sample = metrics.registry.get_sample_value
    assert sample("execbox_worker_leases_total", {"outcome": "cancelled",
                                                  "code": "CANCELLED"}) == 1
    assert sample("execbox_worker_leases_total", {"outcome": "cancelled", "code": "OK"}) is None
    assert sample("execbox_worker_leases_total", {"outcome": "handed_back",
                                                  "code": "UNAVAILABLE"}) == 1
    events = [json_module.loads(line) for line in stream.getvalue().splitlines()]
    started = [e for e in events if e["event"] == "lease started"]
    assert [e["lease"] for e in started] == ["/cancelled", "/stopped"]
    from execbox.adapters.reapi.digests import digest_key, digest_of_bytes

    action = digest_key(digest_of_bytes(_lease().payload.value))
    assert [e["action"] for e in started] == [action, action]
    ended = {e["lease"]: e for e in events if e["event"] == "lease"}
    assert (ended["/cancelled"]["outcome"], ended["/cancelled"]["status"]) == \
        ("cancelled", "CANCELLED")
    assert (ended["/stopped"]["outcome"], ended["/stopped"]["status"]) == \
        ("handed_back", "UNAVAILABLE")
