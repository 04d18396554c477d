"""Bad input is refused clearly (one line, the right option, no traceback, nothing run), and
failures come with the hint that explains them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

import execbox
from conftest import CLI, DriftRecorder, open_fds, processes_with, run_cli


def _userns_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-U", "true"], capture_output=True, check=False).returncode == 0


needs_userns = pytest.mark.skipif(not _userns_works(),
                                  reason="user namespaces are not available here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _no_traceback(proc: subprocess.CompletedProcess[bytes]) -> str:
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    return stderr


def _execbox_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("execbox")]


# -- a FIFO nobody reads --------------------------------------------------------------------

def test_stdout_fifo_without_reader_times_out(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    started = time.monotonic()
    try:
        proc = run_cli("run", "--timeout", "1", "--stdout", str(fifo), "--", "true",
                       timeout=30, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"execbox run --timeout 1 still blocked on the FIFO after "
                    f"{time.monotonic() - started:.0f} s")
    stderr = _no_traceback(proc)
    assert proc.returncode == 124, (proc.returncode, stderr)
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_stdout_fifo_without_reader_ends_on_sigint(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*CLI, "run", "--stdout", str(fifo), "--", "true"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("execbox run blocked on a FIFO did not end within 10 s of SIGINT")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stderr = err.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert proc.returncode != 0


# -- asyncio --------------------------------------------------------------------------------

def test_run_async_wait_for_timeout_cancels_the_step(marker: str) -> None:
    async def main() -> None:
        await asyncio.wait_for(execbox.run_async(
            ["bash", "-c", f"exec -a {marker} sleep 100"]), 1)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 2
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert processes_with(marker) == []


FD_KEEPER = textwrap.dedent("""
    import socket, sys, time
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sys.argv[1])
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
    msg, fds, flags, addr = socket.recv_fds(conn, 16, 4)
    print("got", len(fds), flush=True)
    time.sleep(60)
""")

FD_SENDER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    socket.send_fds(s, [b"x"], [1])
    s.close()
""")


def test_run_async_returns_when_stdout_was_handed_outside_the_tree(tmp_path: Path) -> None:
    path = str(tmp_path / "keeper.sock")
    keeper = subprocess.Popen([sys.executable, "-c", FD_KEEPER, path], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    bound = threading.Timer(0, lambda: None)
    try:
        assert keeper.stdout is not None and keeper.stdout.readline() == b"ready\n"

        async def main() -> execbox.Result:
            return await asyncio.wait_for(execbox.run_async(
                [sys.executable, "-c", FD_SENDER, path], stdout=execbox.CAPTURE), 20)

        # If run_async never returns, wait_for cannot end it either (its cancel waits for the
        # handle); killing the keeper after 25 s bounds this test.
        bound = threading.Timer(25, keeper.kill)
        bound.start()
        try:
            result = asyncio.run(main())
        except TimeoutError:
            pytest.fail("run_async never returned: the step's stdout is held open by a "
                        "process outside its tree")
        assert keeper.stdout.readline() == b"got 1\n"  # the fd really was handed over
        assert result.exit_code == 0 and result.failure is None, result
    finally:
        bound.cancel()
        keeper.kill()
        keeper.wait()


# -- few file descriptors -------------------------------------------------------------------

def _lowest_nofile_python_starts_with() -> int:
    for n in range(3, 25):
        proc = subprocess.run(["sh", "-c", f"ulimit -n {n}; exec {sys.executable} -c pass"],
                              capture_output=True, check=False)
        if proc.returncode == 0:
            return n
    pytest.skip("python does not start with 24 file descriptors")


@pytest.mark.parametrize("opts", [["--output-limit", "10"], ["--timestamps"], ["--pty"],
                                  ["--stdout", "FILE"]], ids=lambda o: o[0].lstrip("-"))
def test_few_file_descriptors_never_a_traceback(opts: list[str], tmp_path: Path) -> None:
    opts = [str(tmp_path / "out") if o == "FILE" else o for o in opts]
    command = " ".join([sys.executable, "-m", "execbox", "run", *opts, "--", "true"])
    bad = []
    for n in range(_lowest_nofile_python_starts_with(), 25):
        proc = subprocess.run(["sh", "-c", f"ulimit -n {n}; exec {command}"],
                              capture_output=True, check=False, timeout=60)
        stderr = proc.stderr.decode(errors="replace")
        if "Traceback" in stderr or proc.returncode not in (0, 125):
            last = stderr.strip().splitlines()[-1:] or [""]
            bad.append(f"ulimit -n {n}: status {proc.returncode}: {last[0]}")
    assert bad == []


# -- bad options ----------------------------------------------------------------------------

def test_pty_size_with_a_non_ascii_digit() -> None:
    proc = run_cli("run", "--pty", "--pty-size", "\u00b2x80", "--", "true")
    stderr = _no_traceback(proc)
    assert proc.returncode == 125 and "--pty-size" in stderr, (proc.returncode, stderr)


def test_unsetenv_with_an_equals_sign() -> None:
    proc = run_cli("run", "--unsetenv", "A=B", "--", "true")
    stderr = _no_traceback(proc)
    assert proc.returncode == 125 and "--unsetenv" in stderr, (proc.returncode, stderr)


def test_result_path_that_is_a_directory_is_refused_before_the_step_runs(
        tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.mkdir()
    sentinel = tmp_path / "SENTINEL"
    proc = run_cli("run", "--result", str(target), "--", "sh", "-c", f"touch {sentinel}")
    stderr = _no_traceback(proc)
    assert proc.returncode == 125 and "--result" in stderr, (proc.returncode, stderr)
    assert not sentinel.exists(), "the step ran although its result could not be written"


def test_pids_out_of_range_is_not_a_permission_problem() -> None:
    proc = run_cli("run", "--pids", "9223372036854775808", "--", "true")
    stderr = _no_traceback(proc)
    assert proc.returncode == 125, stderr
    assert "range" in stderr.lower(), stderr
    assert "write access" not in stderr and "permission" not in stderr.lower(), stderr


# -- the Python API's SpecErrors ------------------------------------------------------------

SPEC_ERROR_CASES: list[tuple[str, dict[str, object], str]] = [
    ("stdout-nul", {"stdout": "a\0b"}, "stdout"),
    ("cancel-signal-none", {"cancel_signal": None}, "cancel_signal"),
    ("cancel-signal-float", {"cancel_signal": 1.5}, "cancel_signal"),
    ("cwd-int", {"cwd": 5}, "cwd"),
    ("pty-size-one", {"pty": True, "pty_size": (1,)}, "pty_size"),
    ("pty-size-str", {"pty": True, "pty_size": ("a", "b")}, "pty_size"),
    ("env-list", {"env": ["A=B"]}, "env"),
]


@pytest.mark.parametrize(("kwargs", "field"), [c[1:] for c in SPEC_ERROR_CASES],
                         ids=[c[0] for c in SPEC_ERROR_CASES])
def test_more_spec_errors_name_the_field(kwargs: dict[str, object], field: str,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.chdir(tmp_path)
    before = open_fds()
    with pytest.raises(execbox.SpecError) as info:
        execbox.run(["true"], **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field, info.value
    assert str(info.value).startswith(field)
    assert open_fds() == before
    assert os.listdir(tmp_path) == []


def test_rlimit_nofile_zero_fails_in_the_rlimits_step() -> None:
    result = execbox.run(["true"], rlimits={"nofile": 0})
    assert result.exit_code == 125 and result.failure is not None, result
    assert result.failure.step == "rlimits", result.failure


# -- hints ----------------------------------------------------------------------------------

def test_crlf_shebang_is_explained(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh\r\necho hi\r\n")
    script.chmod(0o755)
    proc = run_cli("run", "./script", cwd=tmp_path)
    stderr = _no_traceback(proc)
    assert proc.returncode in (126, 127), stderr
    assert "carriage return" in stderr.lower() or "crlf" in stderr.lower(), stderr
    assert "/bin/sh, which does not exist" not in stderr.replace("\r", ""), stderr


@needs_userns
def test_pty_in_sandbox_without_devpts_does_not_blame_the_workdir(tmp_path: Path) -> None:
    proc = run_cli("run", "--pty", "--sandbox", "--tmpfs", "/dev/pts", "--", "true",
                   cwd=tmp_path)
    stderr = _no_traceback(proc)
    assert proc.returncode == 125, stderr
    assert "/dev/pts" in stderr or "ptmx" in stderr, stderr
    assert str(tmp_path) not in stderr, stderr


@needs_userns
def test_bind_failure_names_the_path_it_failed_on(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    proc = run_cli("run", "--sandbox", "--bind", str(source), "/../../../etc/x", "--", "true",
                   cwd=tmp_path)
    stderr = _no_traceback(proc)
    assert proc.returncode == 125, stderr
    assert not Path("/etc/x").exists()
    # The read-only /etc of the new root is where it failed; the source is fine.
    detail = stderr.replace(f"{source} -> /etc/x", "")
    assert "/etc/x" in detail, stderr
    assert f"file system: {source}" not in stderr, stderr


def test_oom_kill_is_reported_in_one_line(tmp_path: Path) -> None:
    probe = execbox.run(["true"], memory="64M")
    if probe.exit_code != 0:
        pytest.skip(f"no usable memory cgroup here: {probe.failure}")
    proc = run_cli("run", "--memory", "64M", "--", "python3", "-c",
                   "x = bytearray(256 << 20)")
    stderr = _no_traceback(proc)
    assert proc.returncode == 137, stderr
    lines = _execbox_lines(stderr)
    assert len(lines) == 1, stderr
    line = lines[0].lower()
    assert "oom" in line or "out of memory" in line, line
    assert "64m" in line or "67108864" in line, line
    assert "peak" in line, line


@needs_root
@needs_userns
def test_device_drift_report_lists_only_what_is_denied(tmp_path: Path) -> None:
    with open("/proc/self/cgroup") as f:
        if not any(":devices:" in line for line in f):
            pytest.skip("no v1 devices controller")
    on_drift = DriftRecorder()
    reported, seen = on_drift.reported, on_drift.seen

    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path), device_mode="v1",
                         watch_interval=0.2, on_drift=on_drift) as sb:
        ok = sb.run(["sh", "-c", "echo > /dev/null && echo fine"], stdout=execbox.CAPTURE)
        assert ok.stdout == b"fine\n", ok.failure
        with open(f"{sb.cgroup_dirs['devices']}/devices.deny", "w") as f:
            f.write("c 1:3 rwm")
        assert seen.wait(10), "the watchdog did not notice"
    report = reported[0]
    assert "/dev/null" in report, report
    for device in ("/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/ptmx"):
        assert device not in report, f"{device} is reported as denied: {report}"


@needs_userns
def test_api_pty_auto_falls_back_like_the_cli(tmp_path: Path) -> None:
    # Inside the sandbox /dev/pts is an empty tmpfs, so the terminal cannot be set up there.
    script = "test -t 1 && echo tty || echo pipe"
    result_file = tmp_path / "r.json"
    cli = run_cli("run", "--pty=auto", "--sandbox", "--tmpfs", "/dev/pts", "--result",
                  str(result_file), "--", "sh", "-c", script, cwd=tmp_path)
    assert cli.returncode == 0 and cli.stdout == b"pipe\n", cli.stderr  # the CLI falls back
    result = execbox.run(["sh", "-c", script], pty="auto", stdout=execbox.CAPTURE,
                         sandbox=execbox.SandboxSpec(tmpfs=["/dev/pts"]), cwd=tmp_path)
    assert result.exit_code == 0 and result.failure is None, result
    assert result.stdout == b"pipe\n", result
    assert result.pty_fallback is not None and "pty_open_master" in result.pty_fallback


# -- read-write binds as root ---------------------------------------------------------------

@needs_root
@needs_userns
def test_rw_bind_as_root_is_writable_as_the_directory_owner() -> None:
    work = tempfile.mkdtemp()
    try:
        proc = run_cli("run", "--bind", work, work, "--chdir", work, "--", "sh", "-c",
                       "echo hi > made && cat made")
        stderr = _no_traceback(proc)
        assert proc.returncode == 0, stderr
        assert proc.stdout == b"hi\n"
        made = Path(work) / "made"
        assert made.stat().st_uid == os.stat(work).st_uid == 0
    finally:
        shutil.rmtree(work)


@needs_root
@needs_userns
def test_rw_bind_as_root_that_is_not_the_workdir(tmp_path: Path) -> None:
    data = tempfile.mkdtemp()
    try:
        proc = run_cli("run", "--bind", data, "/data", "--", "sh", "-c", "echo x > /data/f",
                       cwd=tmp_path)
        stderr = _no_traceback(proc)
        assert proc.returncode == 0, stderr
        written = Path(data) / "f"
        assert written.read_text() == "x\n"
        assert written.stat().st_uid == os.stat(data).st_uid
    finally:
        shutil.rmtree(data)


def test_api_stdout_fifo_without_reader_is_covered_by_the_timeout(tmp_path: Path) -> None:
    """The caller never blocks opening a FIFO nobody reads; the step's timeout applies."""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    result = execbox.run(["sh", "-c", "head -c 1000000 /dev/zero"], stdout=str(fifo),
                         timeout=1, grace=0.2)
    assert result.timed_out and result.exit_code != 0


def test_api_output_cap_is_reported_in_the_result() -> None:
    result = execbox.run(["sh", "-c", "seq 1 1000"], stdout=execbox.CAPTURE, output_limit=10)
    assert result.output_dropped["stdout"] > 3000
    assert result.stdout is not None and result.stdout.endswith(b"1000\n")
    assert result.to_dict()["output_dropped"] == result.output_dropped


# -- what a new user runs into ------------------------------------------------------------

def test_cli_with_stdout_or_stderr_closed_runs_the_step(tmp_path: Path) -> None:
    for n, redirect in enumerate((">&-", "2>&-", "<&-")):
        ran = tmp_path / f"ran{n}"
        proc = subprocess.run(["sh", "-c", f'"$@" run -- touch {ran} {redirect}', "sh", *CLI],
                              capture_output=True, check=False, timeout=60)
        assert proc.returncode == 0, (redirect, proc)
        assert b"Traceback" not in proc.stderr
        assert ran.exists(), redirect


def test_a_missing_working_directory_is_said_alike_with_and_without_a_sandbox(
        tmp_path: Path) -> None:
    """Not as a failing bind the user never asked for: the working directory is missing,
    sandbox or not (twice: a root caller's later launches take another path)."""
    missing = str(tmp_path / "gone")
    for box in (None, execbox.SandboxSpec(), execbox.SandboxSpec()):
        result = execbox.run(["true"], cwd=missing, sandbox=box)
        assert result.exit_code == 125 and result.failure is not None, result
        assert result.failure.step == "chdir" and result.failure.errno == "ENOENT", result
        assert result.failure.hint == f"the working directory {missing} does not exist"


def test_plain_execve_reports_the_kernels_errno_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "loopa").symlink_to(tmp_path / "loopb")
    (tmp_path / "loopb").symlink_to(tmp_path / "loopa")
    for argv, code, words in (
            (["/etc/passwd/x"], "ENOTDIR", "is not a directory"),
            ([str(tmp_path / "loopa")], "ELOOP", "loop of symbolic links")):
        for options in ({}, {"rlimits": {"core": 0}}):  # posix_spawn, then the fork path
            result = execbox.run(argv, **options)
            assert result.failure is not None, (argv, options)
            assert result.failure.step == "execve" and result.failure.errno == code, result
            assert words in result.failure.hint, result.failure


def test_exec_format_hints_name_the_real_cause(tmp_path: Path) -> None:
    plain = tmp_path / "plain.sh"
    plain.write_text("echo hi\n")
    chain = tmp_path / "chain"
    chain.write_text(f"#!{plain}\n")
    elf = tmp_path / "elf"
    elf.write_bytes(b"\x7fELF\x02\x01" + b"\0" * 58)
    for path in (plain, chain, elf):
        path.chmod(0o755)
    hints = {path.name: execbox.run([str(path)]).failure for path in (plain, chain, elf)}
    for failure in hints.values():
        assert failure is not None and failure.errno == "ENOEXEC", hints
    assert "scripts need a #! line" in hints["plain.sh"].hint  # type: ignore[union-attr]
    assert f"#! interpreter {plain}" in hints["chain"].hint  # type: ignore[union-attr]
    assert "ELF file" in hints["elf"].hint  # type: ignore[union-attr]


def test_one_too_long_argument_is_not_blamed_on_arg_max() -> None:
    result = execbox.run(["true"], env={"PATH": os.environ["PATH"], "BIG": "a" * 200_000})
    assert result.failure is not None and result.failure.errno == "E2BIG", result
    assert "MAX_ARG_STRLEN" in result.failure.hint


def test_an_rlimit_above_the_kernels_ceiling_is_eperm_naming_nr_open() -> None:
    with open("/proc/sys/fs/nr_open") as f:
        ceiling = int(f.read())
    result = execbox.run(["true"], rlimits={"nofile": ceiling + 1})
    assert result.failure is not None, result
    assert result.failure.step == "rlimits" and result.failure.errno == "EPERM", result
    assert "ValueError" not in result.failure.message
    assert "fs.nr_open" in result.failure.hint


@pytest.mark.parametrize("sandboxed", [False, True])
def test_a_nofile_limit_that_cannot_be_raised_is_named_as_asked(sandboxed: bool) -> None:
    """The failure names the soft limit the job asked for (not one execbox set on the way),
    and infinity as "unlimited", never as -1 or as leaving no room for an fd."""
    import resource

    if sandboxed and os.geteuid() != 0:
        pytest.skip("the case where the raise comes first is a root caller's")
    with open("/proc/sys/fs/nr_open") as f:
        ceiling = int(f.read())
    options = {"sandbox": execbox.SandboxSpec()} if sandboxed else {}
    for limit, named in (((100, ceiling + 1), f"nofile 100:{ceiling + 1}"),
                         ((10, resource.RLIM_INFINITY), "nofile 10:unlimited")):
        for _ in range(3 if sandboxed else 1):  # (afresh, then from a sandbox made ahead)
            result = execbox.run(["true"], rlimits={"nofile": limit},
                                 **options)  # type: ignore[arg-type]
            assert result.failure is not None, result
            assert (result.failure.step, result.failure.errno) == ("rlimits", "EPERM"), result
            assert result.failure.message.endswith(named), result.failure
            assert "fs.nr_open" in result.failure.hint


def test_a_result_file_that_cannot_be_written_keeps_the_steps_status(tmp_path: Path) -> None:
    proc = run_cli("run", "--result", "/dev/full", "--", "sh", "-c", "exit 3")
    stderr = _no_traceback(proc)
    assert proc.returncode == 3, proc
    assert "--result" in stderr and "/dev/full" in stderr, stderr


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"pass_fds": {10**9: 2}}, "pass_fds[1000000000]"),
    ({"pass_fds": 5}, "pass_fds"),
    ({"rlimits": [1]}, "rlimits"),
    ({"cpus": 10_000.0}, "cpus"),
    ({"cpus": "x"}, "cpus"),
    ({"device_mode": "xx"}, "device_mode"),
])
def test_api_misuse_is_a_spec_error_naming_the_field(kwargs: dict[str, object],
                                                     field: str) -> None:
    with pytest.raises(execbox.SpecError) as caught:
        execbox.run(["true"], **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field, caught.value


def test_closed_file_object_and_no_pass_fds() -> None:
    closed = open(os.devnull, "w")  # noqa: SIM115
    closed.close()
    with pytest.raises(execbox.SpecError, match="closed"):
        execbox.run(["true"], stdout=closed)
    assert execbox.run(["true"], pass_fds=None).exit_code == 0  # type: ignore[arg-type]


def test_an_unknown_keyword_is_named_without_internal_names() -> None:
    with pytest.raises(TypeError) as caught:
        execbox.run(["true"], bogus=1)
    assert "'bogus'" in str(caught.value) and "make_spec" not in str(caught.value)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tmpfs": "/work"}, "sandbox.tmpfs"),
    ({"ro_binds": "/usr"}, "sandbox.ro_binds"),
    ({"share_net": "no"}, "sandbox.share_net"),
    ({"idmap": 0}, "sandbox.idmap"),
])
def test_sandbox_spec_misuse_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(execbox.SpecError) as caught:
        execbox.SandboxSpec(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field, caught.value


def test_sandbox_host_paths_may_be_relative_as_in_bubblewrap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rootfs").mkdir()
    monkeypatch.chdir(tmp_path)
    box = execbox.SandboxSpec("rootfs", ro_binds=[("rootfs", "/x")])
    assert box.root == str(tmp_path / "rootfs")
    assert box.binds == (("ro-bind", str(tmp_path / "rootfs"), "/x"),)
    with pytest.raises(execbox.SpecError, match="absolute"):
        execbox.SandboxSpec(ro_binds=[("/usr", "relative")])


@pytest.mark.parametrize("cwd", ["/etc", "/usr/share", "/root", "/var", "/var/lib", "/tmp",
                                 "/var/tmp", "/var/log"])
def test_a_system_directory_is_never_the_sandboxs_writable_workdir(cwd: str) -> None:
    from execbox.model.options import build_spec

    with pytest.raises(execbox.SpecError) as caught:
        build_spec(["true"], sandbox=execbox.SandboxSpec(), cwd=cwd)
    assert caught.value.field == "cwd" and "writable" in str(caught.value)
    build_spec(["true"], sandbox=execbox.SandboxSpec(bind_workdir=False), cwd=cwd)


def test_a_shared_world_writable_directory_is_never_the_sandboxs_writable_workdir(
        tmp_path: Path) -> None:
    """Wherever it is (/run/lock, /var/crash, a team's scratch directory): a sticky
    directory every user may write in is shared, and the step of a root caller would own
    it; a project directory below it is fine."""
    from execbox.model.options import build_spec

    shared = tmp_path / "scratch"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(execbox.SpecError) as caught:
        build_spec(["true"], sandbox=execbox.SandboxSpec(), cwd=str(shared))
    assert caught.value.field == "cwd" and "writable" in str(caught.value)
    (shared / "project").mkdir()
    build_spec(["true"], sandbox=execbox.SandboxSpec(), cwd=str(shared / "project"))


def test_sandbox_object_misuse_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(execbox.SpecError):
        execbox.Sandbox("x")  # type: ignore[arg-type]
    sandbox = execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path))
    with pytest.raises(TypeError, match="Sandbox's own"):
        sandbox.run(["true"], sandbox=execbox.SandboxSpec())


def test_a_tmpfs_that_would_hide_the_root_or_the_workdir_is_refused_by_name(
        tmp_path: Path) -> None:
    from execbox.model.options import build_spec

    with pytest.raises(execbox.SpecError) as caught:
        execbox.SandboxSpec(tmpfs=["/scratch", "/"])
    assert caught.value.field == "sandbox.tmpfs[1]" and "every other mount" in str(caught.value)
    workdir = tmp_path / "project"
    workdir.mkdir()
    with pytest.raises(execbox.SpecError) as caught:
        build_spec(["true"], sandbox=execbox.SandboxSpec(tmpfs=[str(tmp_path)]), cwd=workdir)
    assert caught.value.field == "sandbox.tmpfs[0]" and "hide the working directory" in str(
        caught.value)
    # On the working directory itself it would hide all of it as well.
    with pytest.raises(execbox.SpecError) as caught:
        build_spec(["true"], sandbox=execbox.SandboxSpec(tmpfs=["/x", str(workdir)]),
                   cwd=workdir)
    assert caught.value.field == "sandbox.tmpfs[1]" and "hide the working directory" in str(
        caught.value)
    # Beside it, or below it, a tmpfs hides nothing of the working directory itself.
    for fine in (str(tmp_path / "other"), str(workdir / "scratch")):
        build_spec(["true"], sandbox=execbox.SandboxSpec(tmpfs=[fine]), cwd=workdir)
    proc = run_cli("run", "--sandbox", "--tmpfs", str(tmp_path), "--chdir", str(workdir),
                   "--", "true")
    assert proc.returncode == 125
    assert _no_traceback(proc).startswith("execbox run: error: --tmpfs #1: a tmpfs on ")


@needs_root
def test_a_device_bound_in_that_the_device_rules_refuse_is_named_with_the_rule_to_add(
        tmp_path: Path) -> None:
    """A root caller's sandbox allows runc's device list: a --dev-bind of another device
    would fail inside with a bare EPERM from the cgroup."""
    from execbox.model.options import build_spec

    if not os.path.exists("/dev/kmsg"):
        pytest.skip("no /dev/kmsg (c 1:11) here")
    box = execbox.SandboxSpec(dev_binds=[("/dev/null", "/dev/null"), ("/dev/kmsg", "/dev/k")])
    with pytest.raises(execbox.SpecError) as caught:
        build_spec(["true"], sandbox=box, cwd=tmp_path)
    assert caught.value.field == "sandbox.dev_binds[1].source"
    assert "'c 1:11 rwm'" in str(caught.value)
    build_spec(["true"], sandbox=box, cwd=tmp_path, devices=["c 1:3 rwm", "c 1:11 r"])
    proc = run_cli("run", "--sandbox", "--dev-bind", "/dev/kmsg", "/dev/k", "--chdir",
                   str(tmp_path), "--", "true")
    assert proc.returncode == 125
    assert _no_traceback(proc).startswith("execbox run: error: --dev-bind #1 source: "
                                          "/dev/kmsg is device c 1:11")
    proc = run_cli("run", "--sandbox", "--device", "c 1:11 r", "--dev-bind", "/dev/kmsg",
                   "/dev/k", "--chdir", str(tmp_path), "--", "test", "-c", "/dev/k")
    assert proc.returncode == 0, proc.stderr


@needs_userns
def test_a_sandboxed_workdir_hidden_by_a_bind_is_not_said_to_be_missing_on_the_host(
        tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    workdir = tmp_path / "project"
    workdir.mkdir()
    result = execbox.run(["pwd"], cwd=workdir, sandbox=execbox.SandboxSpec(
        ro_binds=[(str(tmp_path / "empty"), str(tmp_path))]))
    assert result.failure is not None and result.failure.step == "chdir", result
    assert "does not exist" not in result.failure.hint
    assert result.failure.hint.startswith(f"there is no {workdir} inside the sandbox: the "
                                          "host's directory is bound there, then hidden")
    result = execbox.run(["pwd"], cwd="/nowhere", sandbox=execbox.SandboxSpec(
        bind_workdir=False))
    assert result.failure is not None and result.failure.hint == \
        "there is no /nowhere inside the sandbox", result.failure
