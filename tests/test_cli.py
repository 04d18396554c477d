"""`execbox run`: exit statuses, result file, failures with hints, options, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI, processes_with, run_cli, zombies_of


def test_exit_code_and_result_file(tmp_path: Path) -> None:
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--result", str(result_file), "--", "sh", "-c", "exit 3")
    assert proc.returncode == 3
    data = json.loads(result_file.read_text())
    assert data["exit_code"] == 3
    assert data["signal"] is None and data["failure"] is None
    assert data["timed_out"] is False and data["cancelled"] is False
    for key in ("user_time", "system_time", "maximum_resident_set_size", "page_reclaims",
                "page_faults", "swaps", "block_input_operations", "block_output_operations",
                "messages_sent", "messages_received", "signals_received",
                "voluntary_context_switches", "involuntary_context_switches",
                "termination_signal", "wall_time"):
        assert key in data["usage"], key
    assert data["usage"]["wall_time"] > 0


def test_not_found_is_127_with_execve_enoent(tmp_path: Path) -> None:
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--result", str(result_file), "--", "/nonexistent/prog")
    assert proc.returncode == 127
    failure = json.loads(result_file.read_text())["failure"]
    assert failure["step"] == "execve" and failure["errno"] == "ENOENT"
    assert b"/nonexistent/prog" in proc.stderr


def test_command_not_in_path_is_127(tmp_path: Path) -> None:
    proc = run_cli("run", "--", "no-such-command-execbox")
    assert proc.returncode == 127
    assert b"PATH" in proc.stderr


def test_no_execute_bit_is_126_eacces(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--result", str(result_file), "--", str(script))
    assert proc.returncode == 126
    failure = json.loads(result_file.read_text())["failure"]
    assert failure["step"] == "execve" and failure["errno"] == "EACCES"
    assert "execute bit" in failure["hint"]


def test_missing_shebang_interpreter_is_named_in_hint(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/nonexistent/interp -x\necho hi\n")
    script.chmod(0o755)
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--result", str(result_file), "--", str(script))
    assert proc.returncode == 127
    failure = json.loads(result_file.read_text())["failure"]
    assert failure["errno"] == "ENOENT"
    assert "/nonexistent/interp" in failure["hint"] and "#!" in failure["hint"]


def test_unknown_format_is_126_enoexec(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x00\x01\x02 not a program")
    blob.chmod(0o755)
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--result", str(result_file), "--", str(blob))
    assert proc.returncode == 126
    assert json.loads(result_file.read_text())["failure"]["errno"] == "ENOEXEC"


def test_bad_chdir_is_a_setup_failure_125(tmp_path: Path) -> None:
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--chdir", str(tmp_path / "missing"), "--result", str(result_file),
                   "--", "true")
    assert proc.returncode == 125
    failure = json.loads(result_file.read_text())["failure"]
    assert failure["step"] == "chdir" and failure["errno"] == "ENOENT"
    assert "does not exist" in failure["hint"]


def test_killed_by_signal_is_128_plus_n(tmp_path: Path) -> None:
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--result", str(result_file), "--", "sh", "-c", "kill -KILL $$")
    assert proc.returncode == 128 + 9
    data = json.loads(result_file.read_text())
    assert data["signal"] == "SIGKILL" and data["signal_number"] == 9
    assert data["usage"]["termination_signal"] == "KILL"  # Buildbarn's POSIXResourceUsage form


def test_only_stdio_reaches_the_step(tmp_path: Path) -> None:
    files = [open(tmp_path / f"f{i}", "w") for i in range(50)]  # noqa: SIM115
    try:
        fds = [f.fileno() for f in files]
        proc = run_cli("run", "--", "ls", "/proc/self/fd", pass_fds=fds)
    finally:
        for f in files:
            f.close()
    assert proc.returncode == 0, proc.stderr
    assert sorted(int(x) for x in proc.stdout.split()) == [0, 1, 2, 3]


def test_environment_options_apply_in_order() -> None:
    proc = run_cli("run", "--clearenv", "--setenv", "A", "1", "--setenv", "B", "two words",
                   "--setenv", "C", "3", "--unsetenv", "C", "--", "/usr/bin/env")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.decode().splitlines()) == ["A=1", "B=two words"]


def test_chdir(tmp_path: Path) -> None:
    proc = run_cli("run", "--chdir", str(tmp_path), "--", "pwd")
    assert proc.stdout.decode().strip() == str(tmp_path)


def test_stdout_and_stderr_files(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    proc = run_cli("run", "--stdout", str(out), "--stderr", str(err), "--",
                   "sh", "-c", "echo to-out; echo to-err >&2")
    assert proc.returncode == 0
    assert out.read_text() == "to-out\n" and err.read_text() == "to-err\n"
    assert proc.stdout == b""


def test_output_limit_keeps_tail_and_marks_cut(tmp_path: Path) -> None:
    out = tmp_path / "out"
    program = ("import sys\n"
               "for i in range(10 * 1024):\n"
               "    sys.stdout.write(f'{i:09d}' + 'x' * 1014 + '\\n')\n")
    proc = run_cli("run", "--output-limit", "1048576", "--stdout", str(out), "--",
                   "python3", "-c", program)
    assert proc.returncode == 0, proc.stderr
    full = b"".join(f"{i:09d}".encode() + b"x" * 1014 + b"\n" for i in range(10 * 1024))
    assert len(full) == 10 * 1024 * 1024
    data = out.read_bytes()
    marker_line, _, kept = data.partition(b"\n")
    assert b"truncated" in marker_line and str(len(full) - 1048576).encode() in marker_line
    assert kept == full[-1048576:]


def test_timestamps_prefix_each_line() -> None:
    proc = run_cli("run", "--timestamps", "--", "printf", "a\\nb\\n")
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["a", "b"], strict=True):
        stamp, _, rest = line.partition(" ")
        assert rest == text and stamp.endswith("Z") and "T" in stamp


def test_timeout_kills_setsid_escapee(tmp_path: Path, marker: str) -> None:
    result_file = tmp_path / "r.json"
    script = f'setsid sh -c "trap \\"\\" TERM; sleep 300 # {marker}" & sleep 300 # {marker}'
    started = time.monotonic()
    proc = run_cli("run", "--timeout", "1", "--grace", "1", "--result", str(result_file),
                   "--", "sh", "-c", script)
    elapsed = time.monotonic() - started
    assert proc.returncode == 124
    assert elapsed < 5
    assert json.loads(result_file.read_text())["timed_out"] is True
    assert processes_with(marker) == []
    assert zombies_of(os.getpid()) == []


def test_double_fork_escapee_is_killed_when_main_exits(marker: str) -> None:
    proc = run_cli("run", "--", "sh", "-c", f"(sleep 300 # {marker}\n) & exit 0")
    assert proc.returncode == 0
    assert processes_with(marker) == []


@pytest.mark.parametrize("copying", [["--timestamps"], ["--pty"]], ids=["timestamps", "pty"])
def test_a_reader_that_goes_ends_the_step_as_a_pipe_would(copying: list[str],
                                                          marker: str) -> None:
    """Where execbox copies the step's output itself, a reader that goes away (`| head`)
    reaches the step as it would through a pipe: its next write gets SIGPIPE (or, on a
    terminal, a hangup), instead of running on unread forever. (--output-limit keeps the
    tail of the output for the step's end, as `tail -c` would: nothing reaches a reader
    before then.)"""
    pipeline = (f"{' '.join(CLI)} run {' '.join(copying)} -- sh -c "
                f"'exec yes {marker}' | head -n 1")
    proc = subprocess.Popen(["sh", "-c", pipeline], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)
        pytest.fail("the step ran on after its reader had gone")
    assert out.strip().endswith(marker.encode()), out
    assert b"Traceback" not in err and b"output dropped" not in err, err
    assert processes_with(marker) == []


def test_the_step_gets_the_environment_execbox_was_started_with() -> None:
    """Python in the C locale adds LC_CTYPE=C.UTF-8 to its own environment (PEP 538): not
    the user's, so not the step's, as with bwrap or env(1); one the user set stays."""
    bare = subprocess.run(["env", "-i", *CLI, "run", "--", "/usr/bin/env"],
                          capture_output=True, check=False, timeout=60)
    assert bare.returncode == 0 and bare.stdout == b"", bare
    given = subprocess.run(["env", "-i", "LC_CTYPE=C.UTF-8", "X=1", *CLI, "run", "--",
                            "/usr/bin/env"], capture_output=True, check=False, timeout=60)
    assert sorted(given.stdout.split()) == [b"LC_CTYPE=C.UTF-8", b"X=1"], given
    for value in ("C", "POSIX"):  # (coerced as well, from a value the user set)
        plain = subprocess.run(["env", "-i", f"LC_CTYPE={value}", *CLI, "run", "--",
                                "/usr/bin/env"], capture_output=True, check=False, timeout=60)
        assert plain.stdout.split() == [f"LC_CTYPE={value}".encode()], plain


def test_sigterm_is_forwarded_as_cancel(tmp_path: Path, marker: str) -> None:
    result_file = tmp_path / "r.json"
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*CLI, "run", "--grace", "1", "--result", str(result_file), "--", "sh", "-c",
         f'trap "" TERM; touch {ready}; sleep 300 # {marker}'],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    data = json.loads(result_file.read_text())
    assert data["cancelled"] is True and data["timed_out"] is False
    assert proc.returncode == data["exit_code"] != 0
    assert processes_with(marker) == []


def test_usage_errors_name_the_field() -> None:
    proc = run_cli("run", "--timeout", "soon", "--", "true")
    assert proc.returncode == 125 and b"--timeout" in proc.stderr
    proc = run_cli("run", "--cancel-signal", "NOPE", "--", "true")
    assert proc.returncode == 125 and b"--cancel-signal" in proc.stderr
    proc = run_cli("run", "--bogus", "--", "true")
    assert proc.returncode == 125 and b"--bogus" in proc.stderr
    proc = run_cli("run")
    assert proc.returncode == 125 and b"no command" in proc.stderr
    proc = run_cli("run", "--timeout", "-1", "--", "true")
    assert proc.returncode == 125 and b"timeout" in proc.stderr


def test_help_and_version() -> None:
    assert b"--output-limit" in run_cli("run", "--help").stdout
    assert run_cli("version").stdout.startswith(b"execbox ")
    proc = run_cli("version", "extra")
    assert proc.returncode == 2 and proc.stderr == b"execbox version: takes no arguments, " \
        b"got 'extra'\n" and not proc.stdout


def test_a_timeout_says_so_on_stderr_besides_the_status() -> None:
    """124 alone does not tell a CI log reader the step was stopped by --timeout."""
    proc = run_cli("run", "--timeout", "0.3", "--", "sleep", "30")
    assert proc.returncode == 124
    assert proc.stderr == b"execbox: the step timed out after --timeout 0.3 s and was " \
        b"cancelled (killed by SIGTERM)\n"
    proc = run_cli("run", "--timeout", "0.3", "--", "sh", "-c",
                   "trap 'exit 3' TERM; sleep 30 & wait")
    assert proc.returncode == 124 and proc.stderr.endswith(b"was cancelled (exit 3)\n")
    assert run_cli("run", "--timeout", "30", "--", "true").stderr == b""


def test_relative_result_path_with_chdir(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    proc = run_cli("run", "--chdir", str(tmp_path / "work"), "--result", "r.json", "--",
                   "true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 0


def test_option_values_after_equals() -> None:
    proc = run_cli("run", "--clearenv", "--setenv=A", "1", "--timeout=30", "--",
                   "/usr/bin/env")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"A=1\n"
    proc = run_cli("run", "--timestamps=no", "--", "true")
    assert proc.returncode == 125 and b"takes no value" in proc.stderr


def test_timeout_holds_while_the_reader_stalls_after_one_page() -> None:
    script = (f"{' '.join(CLI)} run --timeout 2 --grace 0.5 --timestamps -- yes; "
              "echo rc=$? >&2")
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", f"{{ {script}; }} | {{ head -c 4096 >/dev/null; "
                           "sleep 8; }"], capture_output=True, timeout=60, check=False)
    assert b"rc=124" in proc.stderr
    assert time.monotonic() - started < 15


def test_timeout_holds_while_nobody_reads_the_output() -> None:
    # execbox's stdout is a pipe nobody reads: the pump blocks, the timeout must still fire.
    script = (f"{' '.join(CLI)} run --timeout 2 --grace 0.5 --timestamps -- yes; "
              "echo rc=$? >&2")
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", f"{{ {script}; }} | sleep 8"], capture_output=True,
                          timeout=60, check=False)
    assert b"rc=124" in proc.stderr
    assert time.monotonic() - started < 15


def test_cli_errors_name_the_option_not_the_api_field() -> None:
    for args, expected in (
            (["--chdir", ""], "error: working directory (--chdir): must not be empty"),
            (["--ro-bind", "/usr", "rel"], "error: --ro-bind #1 destination: must be absolute"
             .replace("must be absolute", "must be an absolute path")),
            (["--tmpfs", "/t", "--tmpfs", "rel"], "error: --tmpfs #2: must be an absolute"),
            (["--setenv", "A"], "error: --setenv needs 2 arguments before --"),
            (["--pty-size", "10x20"], "error: --pty-size: needs --pty"),
            (["--pty-raw"], "error: --pty-raw: needs --pty")):
        proc = run_cli("run", *args, "--", "true")
        assert proc.returncode == 125, (args, proc)
        assert expected in proc.stderr.decode(), (args, proc.stderr)


def test_output_limit_takes_a_size_as_memory_does(tmp_path: Path) -> None:
    proc = run_cli("run", "--output-limit", "1K", "--", "sh", "-c", "head -c 5000 /dev/zero")
    assert proc.returncode == 0, proc
    assert 1024 <= len(proc.stdout) < 5000, len(proc.stdout)
