"""Python API: run, start/stream/cancel/wait, asyncio, stdio kinds, leaks, fork server."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import execbox
from conftest import children_of, open_fds, processes_with, thread_count, zombies_of
from execbox.server.client import default_server


def test_run_returns_result_with_usage() -> None:
    result = execbox.run(["sh", "-c", "echo out; echo err >&2; exit 4"],
                         stdout=execbox.CAPTURE, stderr=execbox.CAPTURE)
    assert result.exit_code == 4 and not result.ok
    assert result.stdout == b"out\n" and result.stderr == b"err\n"
    assert result.signal is None and result.failure is None
    assert result.usage.wall_time > 0 and result.usage.maximum_resident_set_size > 0
    assert result.pid is not None


def test_env_none_inherits_and_dict_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECBOX_TEST_VALUE", "inherited")
    inherited = execbox.run(["sh", "-c", "echo $EXECBOX_TEST_VALUE"], stdout=execbox.CAPTURE)
    assert inherited.stdout == b"inherited\n"
    exact = execbox.run(["/usr/bin/env"], env={"ONLY": "this"}, stdout=execbox.CAPTURE)
    assert exact.stdout == b"ONLY=this\n"


def test_the_callers_environment_is_decoded_again_only_once_it_changed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """env=None copies os.environ at each launch; the copy is made again only when the
    environment changed since the last one (os.environ's bytes compared), and each
    launch gets a copy of its own. A changed environment is the step's at once."""
    from execbox.model import options

    options._callers_environment()
    from conftest import calls_to

    reads = calls_to(monkeypatch, type(os.environ), "__getitem__")
    first = options._callers_environment()
    assert reads == [] and first == dict(os.environ)  # unchanged: nothing decoded again
    reads.clear()
    first["EXECBOX_TEST_MINE"] = "x"  # the launch's own copy
    assert "EXECBOX_TEST_MINE" not in options._callers_environment()
    monkeypatch.setenv("EXECBOX_TEST_VALUE", "first")
    assert options._callers_environment()["EXECBOX_TEST_VALUE"] == "first" and reads
    monkeypatch.undo()
    # Decoded from the one copy compared: a change made and undone by another thread while
    # it decodes is not kept as the environment's.
    real_fsdecode = os.fsdecode
    raced: list[bool] = []

    def racing(value: bytes) -> str:
        if not raced:
            raced.append(True)
            os.environ["EXECBOX_TEST_RACE"] = "1"
            del os.environ["EXECBOX_TEST_RACE"]
        return real_fsdecode(value)

    monkeypatch.setenv("EXECBOX_TEST_VALUE", "second")
    monkeypatch.setattr(os, "fsdecode", racing)
    decoded = options._callers_environment()
    monkeypatch.setattr(os, "fsdecode", real_fsdecode)
    assert raced and decoded["EXECBOX_TEST_VALUE"] == "second"
    assert "EXECBOX_TEST_RACE" not in decoded
    assert "EXECBOX_TEST_RACE" not in options._callers_environment()
    monkeypatch.undo()
    for value in ("one", "two"):
        monkeypatch.setenv("EXECBOX_TEST_VALUE", value)
        seen = execbox.run(["sh", "-c", "echo $EXECBOX_TEST_VALUE"], stdout=execbox.CAPTURE)
        assert seen.stdout == f"{value}\n".encode()


def test_path_search_uses_the_steps_path(tmp_path: Path) -> None:
    tool = tmp_path / "my-tool"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(0o755)
    result = execbox.run(["my-tool"], env={"PATH": f"/nonexistent:{tmp_path}"},
                         stdout=execbox.CAPTURE)
    assert result.stdout == b"found\n"


def test_cwd(tmp_path: Path) -> None:
    result = execbox.run(["pwd"], cwd=tmp_path, stdout=execbox.CAPTURE)
    assert result.stdout.decode().strip() == str(tmp_path) if result.stdout else False


def test_stdout_kinds(tmp_path: Path) -> None:
    path = tmp_path / "by-path"
    execbox.run(["echo", "path"], stdout=path)
    assert path.read_text() == "path\n"
    with open(tmp_path / "by-file", "w") as f:
        f.write("first\n")
        execbox.run(["echo", "file"], stdout=f)
    assert (tmp_path / "by-file").read_text() == "first\nfile\n"
    fd = os.open(tmp_path / "by-fd", os.O_WRONLY | os.O_CREAT)
    try:
        execbox.run(["echo", "fd"], stdout=fd)
    finally:
        os.close(fd)
    assert (tmp_path / "by-fd").read_text() == "fd\n"
    chunks: list[bytes] = []
    execbox.run(["echo", "callback"], stdout=chunks.append)
    assert b"".join(chunks) == b"callback\n"
    result = execbox.run(["echo", "gone"], stdout=execbox.DEVNULL, stderr=execbox.CAPTURE)
    assert result.exit_code == 0 and result.stderr == b""


def test_stdin_from_path(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_text("piped\n")
    result = execbox.run(["cat"], stdin=source, stdout=execbox.CAPTURE)
    assert result.stdout == b"piped\n"


def test_capture_with_limit_and_timestamps() -> None:
    result = execbox.run(["sh", "-c", "seq 1 1000"], stdout=execbox.CAPTURE, output_limit=10)
    assert result.stdout is not None
    assert result.stdout.endswith(b"999\n1000\n") and b"truncated" in result.stdout
    stamped = execbox.run(["printf", "x\\ny\\n"], stdout=execbox.CAPTURE, timestamps=True)
    assert stamped.stdout is not None
    assert [line.split(b" ", 1)[1] for line in stamped.stdout.splitlines()] == [b"x", b"y"]


def test_pass_fds_reach_the_step(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        result = execbox.run(["sh", "-c", "echo via-fd >&7"], pass_fds={7: write_end})
        assert result.exit_code == 0
        os.close(write_end)
        assert os.read(read_end, 100) == b"via-fd\n"
    finally:
        os.close(read_end)


def test_only_stdio_reaches_the_step_with_50_files_open(tmp_path: Path) -> None:
    files = [open(tmp_path / f"f{i}", "w") for i in range(50)]  # noqa: SIM115
    try:
        result = execbox.run(["ls", "/proc/self/fd"], stdout=execbox.CAPTURE)
    finally:
        for f in files:
            f.close()
    assert result.stdout is not None
    assert sorted(int(x) for x in result.stdout.split()) == [0, 1, 2, 3]


def test_failure_fields() -> None:
    result = execbox.run(["/nonexistent/prog"])
    assert result.exit_code == 127 and result.failure is not None
    assert (result.failure.step, result.failure.errno) == ("execve", "ENOENT")
    assert result.exit_status == 127 and result.pid is None


def test_spec_errors_name_the_field(tmp_path: Path) -> None:
    cases = [
        (dict(argv=[]), "argv"),
        (dict(argv="ls"), "argv"),
        (dict(argv=["ls", "a\0b"]), "argv[1]"),
        (dict(argv=["ls"], timeout=0), "timeout"),
        (dict(argv=["ls"], grace=-1), "grace"),
        (dict(argv=["ls"], env={"A=B": "x"}), "env"),
        (dict(argv=["ls"], cancel_signal="SIGNOPE"), "cancel_signal"),
        (dict(argv=["ls"], stdout=12345), "stdout"),
        (dict(argv=["ls"], stdout=tmp_path / "no" / "dir"), "stdout"),
        (dict(argv=["ls"], rlimits={"bogus": 1}), "rlimits"),
        (dict(argv=["ls"], output_limit=-5), "output_limit"),
    ]
    before = open_fds()
    for kwargs, field in cases:
        argv = kwargs.pop("argv")
        with pytest.raises(execbox.SpecError) as info:
            execbox.run(argv, **kwargs)
        assert info.value.field.startswith(field), (kwargs, info.value)
    assert open_fds() == before


def test_rlimits_apply() -> None:
    result = execbox.run(["sh", "-c", "ulimit -n"], rlimits={"nofile": 64},
                         stdout=execbox.CAPTURE)
    assert result.stdout == b"64\n"


def test_a_nofile_limit_just_above_the_highest_fd_is_the_steps_own() -> None:
    """nofile 10 leaves fd 9 room: set-up's own copies of fds (above the step's) must not
    count against it, so it is set last, before the exec."""
    read, write = os.pipe()
    os.write(write, b"nine ")
    os.close(write)
    try:
        result = execbox.run(["sh", "-c", "cat /proc/self/fd/9; ulimit -n"],
                             pass_fds={9: read}, rlimits={"nofile": (10, 10)},
                             stdout=execbox.CAPTURE)
    finally:
        os.close(read)
    assert result.exit_code == 0, result.failure
    assert result.stdout == b"nine 10\n"


def test_a_root_caller_raises_the_nofile_hard_limit_of_a_plain_step() -> None:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    if not caps & (1 << 24):
        pytest.skip("raising a hard limit needs CAP_SYS_RESOURCE, which this process lacks")
    import resource

    with open("/proc/sys/fs/nr_open") as f:
        ceiling = int(f.read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard >= ceiling:
        pytest.skip("this process's nofile hard limit is the kernel's ceiling already")
    result = execbox.run(["sh", "-c", "ulimit -Sn; ulimit -Hn"],
                         rlimits={"nofile": (soft, hard + 1)}, stdout=execbox.CAPTURE)
    assert result.exit_code == 0, result.failure
    assert result.stdout == f"{soft}\n{hard + 1}\n".encode()


def test_timeout_through_the_api(marker: str) -> None:
    started = time.monotonic()
    result = execbox.run(["sh", "-c", f'trap "" TERM; sleep 300 # {marker}'],
                         timeout=0.5, grace=0.5)
    assert result.timed_out and not result.cancelled
    assert result.signal == "SIGKILL" and result.exit_status == 124
    assert time.monotonic() - started < 5
    assert processes_with(marker) == []


def _long_step(marker: str, tmp_path: Path) -> tuple[list[str], Path]:
    ready = tmp_path / "ready"
    script = (f'setsid sh -c "sleep 300 # {marker}" & '
              f'(sleep 300 # {marker}\n) & touch {ready}; sleep 300 # {marker}')
    return ["sh", "-c", script], ready


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, "step never became ready"
        time.sleep(0.01)


def test_cancel_from_another_thread(marker: str, tmp_path: Path) -> None:
    argv, ready = _long_step(marker, tmp_path)
    execution = execbox.start(argv, grace=1)

    def cancel_when_ready() -> None:
        _wait_for(ready)
        execution.cancel()

    thread = threading.Thread(target=cancel_when_ready)
    thread.start()
    result = execution.wait(timeout=60)
    thread.join()
    assert result.cancelled and not result.timed_out
    assert result.signal == "SIGTERM"
    assert processes_with(marker) == []
    assert zombies_of(os.getpid()) == []


@pytest.mark.parametrize("sandboxed", [False, True], ids=["plain", "sandbox"])
def test_a_stopped_process_gets_the_cancel_signal_it_can_handle(tmp_path: Path,
                                                                 sandboxed: bool) -> None:
    """As timeout(1) and systemd do, SIGCONT follows the cancel signal: a stopped process
    (here the step and a child of its, each stopped by itself) handles the signal within
    the grace period instead of being SIGKILLed at its end."""
    script = ('trap "echo child >> handled; exit 0" TERM; kill -STOP $BASHPID; sleep 60')
    main = (f'trap "echo main >> handled; wait; exit 3" TERM; bash -c \'{script}\' & '
            'until [ "$(cut -d" " -f3 /proc/$!/stat)" = T ]; do sleep 0.01; done; '
            'kill -STOP $$; echo resumed')
    box = execbox.SandboxSpec() if sandboxed else None
    result = execbox.run(["bash", "-c", main], cwd=str(tmp_path), timeout=2, grace=20,
                         sandbox=box)
    assert result.timed_out and result.exit_code == 3, result
    assert sorted((tmp_path / "handled").read_text().split()) == ["child", "main"]


def test_cancel_by_asyncio_task_cancellation(marker: str, tmp_path: Path) -> None:
    argv, ready = _long_step(marker, tmp_path)

    async def main() -> None:
        task = asyncio.ensure_future(execbox.run_async(argv, grace=1))
        while not ready.exists():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert processes_with(marker) == []
    assert zombies_of(os.getpid()) == []


def test_run_async_result() -> None:
    async def main() -> list[execbox.Result]:
        return await asyncio.gather(*(
            execbox.run_async(["sh", "-c", f"echo {i}; exit {i}"], stdout=execbox.CAPTURE)
            for i in range(5)))

    results = asyncio.run(main())
    assert [r.exit_code for r in results] == list(range(5))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(5)]


def test_stream_yields_chunks_in_order() -> None:
    execution = execbox.start(["sh", "-c", "echo one; echo two >&2; echo three"],
                              stdout=execbox.PIPE, stderr=execbox.PIPE)
    chunks = list(execution.stream())
    out = b"".join(c for name, c in chunks if name == "stdout")
    err = b"".join(c for name, c in chunks if name == "stderr")
    assert out == b"one\nthree\n" and err == b"two\n"
    assert execution.wait().exit_code == 0
    assert execution.pid is not None


def test_background_processes_do_not_outlive_the_step(marker: str) -> None:
    result = execbox.run(["sh", "-c", f"(setsid sleep 300 # {marker}\n) & echo done"],
                         stdout=execbox.CAPTURE)
    assert result.stdout == b"done\n"
    assert processes_with(marker) == []


def test_thousand_runs_leak_nothing() -> None:
    execbox.run(["true"])  # the fork server is started once, outside the measurement
    fds, threads = open_fds(), thread_count()
    for _ in range(1000):
        assert execbox.run(["true"]).exit_code == 0
    assert open_fds() == fds
    assert thread_count() == threads
    assert children_of(os.getpid()) == []


def test_fork_server_is_restarted_when_killed() -> None:
    server = default_server()
    execbox.run(["true"])
    first = server.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    time.sleep(0.1)
    for _ in range(5):
        assert execbox.run(["sh", "-c", "exit 7"]).exit_code == 7
    assert server.pid != first


def test_result_survives_fork_server_death(marker: str) -> None:
    server = default_server()
    execbox.run(["true"])
    execution = execbox.start(["sh", "-c", f"sleep 1 # {marker}\nexit 5"])
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    result = execution.wait(timeout=30)
    assert result.exit_code == 5


def test_abandoned_handle_stops_its_step(marker: str) -> None:
    execution = execbox.start(["sh", "-c", f"sleep 300 # {marker}"])
    deadline = time.monotonic() + 10
    while not processes_with(marker):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    del execution
    deadline = time.monotonic() + 20
    while processes_with(marker):
        assert time.monotonic() < deadline, "abandoned step still running"
        time.sleep(0.05)


def test_stdio_of_a_file_object_without_fileno_is_rejected() -> None:
    with pytest.raises(execbox.SpecError) as info:
        execbox.run(["true"], stdout=io.BytesIO())
    assert info.value.field == "stdout"


def test_keyboard_interrupt_cancels(marker: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("needs the main thread for signals")
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            execbox.run(["sh", "-c", f"sleep 300 # {marker}"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert processes_with(marker) == []


def test_python_is_the_same_interpreter() -> None:
    result = execbox.run([sys.executable, "-c", "import sys; print(sys.version)"],
                         stdout=execbox.CAPTURE)
    assert result.stdout == (sys.version + "\n").encode()


def test_relative_and_default_cwd_follow_the_caller(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    here = execbox.run(["pwd"], stdout=execbox.CAPTURE)
    assert here.stdout == f"{tmp_path}\n".encode()
    sub = execbox.run(["pwd"], cwd="sub", stdout=execbox.CAPTURE)
    assert sub.stdout == f"{tmp_path}/sub\n".encode()
    script = tmp_path / "sub" / "build.sh"
    script.write_text("#!/bin/sh\necho built\n")
    script.chmod(0o755)
    built = execbox.run(["./build.sh"], cwd="sub", stdout=execbox.CAPTURE)
    assert built.stdout == b"built\n"


def test_fork_path_steps_report_names(tmp_path: Path) -> None:
    # rlimits force the fork path; its failures are named like the fast path's.
    missing = execbox.run(["/nonexistent/prog"], rlimits={"nofile": 256})
    assert missing.failure is not None and missing.failure.step == "execve"
    assert missing.failure.errno == "ENOENT"
    bad_dir = execbox.run(["true"], cwd=tmp_path / "nope", rlimits={"nofile": 256})
    assert bad_dir.failure is not None and bad_dir.failure.step == "chdir"
    assert bad_dir.exit_code == 125
    files = [open(tmp_path / f"f{i}", "w") for i in range(20)]  # noqa: SIM115
    try:
        listing = execbox.run(["ls", "/proc/self/fd"], rlimits={"nofile": 256},
                              stdout=execbox.CAPTURE)
    finally:
        for f in files:
            f.close()
    assert listing.stdout is not None
    assert sorted(int(x) for x in listing.stdout.split()) == [0, 1, 2, 3]


def test_subprocess_constants_are_understood() -> None:
    import subprocess

    both = execbox.run(["sh", "-c", "echo out; echo err >&2"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    assert both.stdout == b"out\nerr\n"
    quiet = execbox.run(["echo", "x"], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert quiet.exit_code == 0 and quiet.stdout is None


def test_bad_stdout_in_pty_mode_closes_only_its_own_fds() -> None:
    before = open_fds()
    for _ in range(20):
        with pytest.raises(execbox.SpecError):
            execbox.run(["true"], pty=True, stdout=-7)
    assert open_fds() == before


def test_handle_dropped_before_start_still_stops_the_step(marker: str) -> None:
    # The supervisor writes "started" to a socket whose reader is gone: it must get EPIPE
    # (not die of SIGPIPE and orphan the step) and then cancel the step.
    for _ in range(5):
        execbox.start(["sh", "-c", f"sleep 300 # {marker}"], grace=1)
    deadline = time.monotonic() + 30
    gone_since = None  # a step may start only after an early look found none: none for 1 s
    while gone_since is None or time.monotonic() - gone_since < 1.0:
        assert time.monotonic() < deadline, "a dropped handle left its step running"
        if processes_with(marker):
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        time.sleep(0.05)


def test_killed_idle_supervisors_are_replaced() -> None:
    server = default_server()
    execbox.run(["true"])
    assert server.pid is not None
    idle = [pid for pid, state in children_of(server.pid) if state != "Z"]
    assert idle
    for pid in idle:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    execution = execbox.start(["sh", "-c", "exit 4"])
    assert execution.wait(timeout=30).exit_code == 4
