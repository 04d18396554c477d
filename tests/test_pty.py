"""PTY mode: a real controlling terminal, never stolen, output through the same sinks."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import pytest

import execbox
from conftest import CLI, fd_targets, processes_with, run_cli, zombies_of
from execbox.api import run as execbox_api
from execbox.streams.pty import PtySetupError
from execbox.supervise.proctree import sessions_on_terminal


def _pty_fds() -> set[str]:
    return {f"{fd}->{target}" for fd, target in fd_targets().items()
            if target.startswith("/dev/pts/") or target == "/dev/ptmx"}


def test_cli_pty_stdio_are_terminals() -> None:
    proc = run_cli("run", "--pty", "--", sys.executable, "-c",
                   "import os; print(all(os.isatty(f) for f in (0, 1, 2)), os.ttyname(0))")
    assert proc.returncode == 0, proc.stderr
    answer, path = proc.stdout.decode().split()
    assert answer == "True" and path.startswith("/dev/pts/")


def test_step_is_its_own_session_on_the_pty() -> None:
    proc = run_cli("run", "--pty", "--", "sh", "-c", "ps -o sid=,tty= -p $$; echo $$; tty")
    sid_line, pid_line, tty_line = proc.stdout.decode().splitlines()
    sid, tty = sid_line.split()
    assert sid == pid_line.strip()
    assert tty_line.strip() == f"/dev/{tty}"


def test_size_term_and_dev_tty() -> None:
    proc = run_cli("run", "--pty", "--pty-size", "33x101", "--", "sh", "-c",
                   "stty size; echo $TERM; echo via-dev-tty > /dev/tty")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["33 101", "xterm-256color", "via-dev-tty"]
    other = run_cli("run", "--pty", "--pty-term", "vt100", "--", "sh", "-c", "echo $TERM")
    assert other.stdout.decode().strip() == "vt100"


def test_cooked_and_raw_line_endings() -> None:
    cooked = run_cli("run", "--pty", "--", "printf", "a\\nb\\n")
    assert cooked.stdout == b"a\r\nb\r\n"
    raw = run_cli("run", "--pty", "--pty-raw", "--", "printf", "a\\nb\\n")
    assert raw.stdout == b"a\nb\n"


def test_bad_pty_size_names_the_option() -> None:
    proc = run_cli("run", "--pty", "--pty-size", "big", "--", "true")
    assert proc.returncode == 125 and b"--pty-size" in proc.stderr


def test_api_pty_capture_with_cap_and_timestamps() -> None:
    result = execbox.run(["sh", "-c", "for i in $(seq 1 2000); do echo line$i; done"],
                         pty=True, pty_raw=True, stdout=execbox.CAPTURE, output_limit=100)
    assert result.exit_code == 0 and result.stdout is not None
    assert result.stdout.endswith(b"line1999\nline2000\n") and b"truncated" in result.stdout
    stamped = execbox.run(["printf", "x\\ny\\n"], pty=True, pty_raw=True,
                          stdout=execbox.CAPTURE, timestamps=True)
    assert stamped.stdout is not None
    assert [line.split(b" ", 1)[1] for line in stamped.stdout.splitlines()] == [b"x", b"y"]


def test_all_output_is_drained_after_exit() -> None:
    size = 3 * 1024 * 1024
    result = execbox.run([sys.executable, "-c", f"import os; os.write(1, b'x' * {size})"],
                         pty=True, pty_raw=True, stdout=execbox.CAPTURE)
    assert result.exit_code == 0 and result.stdout == b"x" * size


def test_pty_timeout_leaves_no_process_or_pty_fd(marker: str) -> None:
    before = _pty_fds()
    result = execbox.run(["sh", "-c", f'trap "" TERM HUP; sleep 300 # {marker}'], pty=True,
                         timeout=0.5, grace=0.5, stdout=execbox.DEVNULL)
    assert result.timed_out
    assert processes_with(marker) == []
    assert _pty_fds() == before
    assert zombies_of(os.getpid()) == []
    cli = run_cli("run", "--pty", "--timeout", "0.5", "--grace", "0.5", "--", "sh", "-c",
                  f'trap "" TERM HUP; sleep 300 # {marker}')
    assert cli.returncode == 124
    assert processes_with(marker) == []


def test_pty_requires_merged_stdio() -> None:
    with pytest.raises(execbox.SpecError) as info:
        execbox.run(["true"], pty=True, stderr=execbox.CAPTURE)
    assert info.value.field == "stderr"
    with pytest.raises(execbox.SpecError) as info:
        execbox.run(["true"], pty="sometimes")
    assert info.value.field == "pty"


def test_auto_falls_back_to_pipes_when_setup_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise PtySetupError("pty_open_master", errno.ENOSPC)

    monkeypatch.setattr(execbox_api, "open_pty", broken)
    result = execbox.run(["sh", "-c", "test -t 1 && echo tty || echo pipe"], pty="auto",
                         stdout=execbox.CAPTURE)
    assert result.stdout == b"pipe\n"
    assert result.pty_fallback is not None and "pty_open_master" in result.pty_fallback
    strict = execbox.run(["true"], pty=True)
    assert strict.exit_code == 125 and strict.failure is not None
    assert strict.failure.step == "pty_open_master" and strict.failure.errno == "ENOSPC"


HOLDER = textwrap.dedent("""
    import fcntl, os, sys, termios, time
    slave = int(sys.argv[1])
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    print("ready", flush=True)
    time.sleep(300)
""")


def _session_holding(path: str) -> subprocess.Popen[bytes]:
    """A process in its own session whose controlling terminal is path's pty."""
    slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(slave)],
                                  pass_fds=[slave], stdout=subprocess.PIPE)
    finally:
        os.close(slave)
    assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
    return holder


def _controlling_tty_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rfind(b")") + 2:].split()[4])


def test_terminal_held_by_another_session_is_reported_not_stolen() -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    holder = _session_holding(path)
    try:
        assert [sid for sid, _ in sessions_on_terminal(os.stat(path).st_rdev)] == [holder.pid]
        probe = textwrap.dedent(f"""
            import json, os, sys
            from execbox.report.diagnose import describe
            from execbox.spawn.failure import StepFailure
            from execbox.spawn.fork import fork_spawn
            slave = os.open({path!r}, os.O_RDWR | os.O_NOCTTY)
            plan = [("setsid", ()), ("dup2", ([[slave, 0]],)), ("tiocsctty", (0,)),
                    ("execve", (["/bin/true"], [], []))]
            try:
                fork_spawn(plan)
                print(json.dumps(None))
            except StepFailure as exc:
                print(json.dumps(describe(exc.step, exc.errno, exc.path).to_dict()))
        """)
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True)
        import json

        failure = json.loads(out.stdout)
        assert failure["step"] == "tiocsctty" and failure["errno"] == "EPERM"
        assert f"session {holder.pid}" in failure["hint"]
        assert _controlling_tty_of(holder.pid) == os.stat(path).st_rdev
    finally:
        holder.kill()
        holder.wait()
        os.close(master)


def _pty_starts(count: int, threads: int) -> list[str]:
    failures: list[str] = []
    lock = threading.Lock()
    remaining = [count]

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            result = execbox.run(["/bin/true"], pty=True, stdout=execbox.DEVNULL)
            if result.exit_code != 0 or result.failure is not None:
                with lock:
                    failures.append(f"{result.exit_code} {result.failure}")

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return failures


def test_pty_stress_8_threads_20_seconds() -> None:
    before = _pty_fds()
    failures: list[str] = []
    starts = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        failures += _pty_starts(400, 8)
        starts += 400
    assert failures == [], f"{len(failures)} of {starts} PTY starts failed: {failures[:3]}"
    # Thousands of starts later, nothing of them is left in this process.
    assert _pty_fds() == before, f"{starts} PTY starts leaked terminal fds"
    assert zombies_of(os.getpid()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="stealing a terminal is only possible as root")
def test_10k_pty_starts_never_steal_a_held_terminal() -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    holder = _session_holding(path)
    try:
        rdev = os.stat(path).st_rdev
        assert _controlling_tty_of(holder.pid) == rdev
        assert _pty_starts(10_000, 8) == []
        assert _controlling_tty_of(holder.pid) == rdev
    finally:
        holder.kill()
        holder.wait()
        os.close(master)


def test_ioctl_constants_match_the_kernel() -> None:
    # TIOCGPTPEER is not exported by termios; a wrong value would make every start fail.
    master, slave = os.openpty()
    try:
        from execbox.linux.arch import ioctl_number

        peer = fcntl.ioctl(master, ioctl_number("TIOCGPTPEER"), os.O_RDWR | os.O_NOCTTY)
        assert os.ttyname(peer) == os.ttyname(slave)
        os.close(peer)
        assert termios.TIOCSCTTY == 0x540E
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a private mount namespace")
def test_cli_auto_falls_back_when_the_pty_cannot_be_set_up(tmp_path: Path) -> None:
    # In a private mount namespace /dev/ptmx is replaced by /dev/null: opening it works,
    # unlockpt fails. The bind mount vanishes with the namespace.
    result_file = tmp_path / "r.json"
    execbox_cmd = " ".join(shlex.quote(a) for a in [
        sys.executable, "-m", "execbox", "run", "--pty=auto", "--result", str(result_file),
        "--", "sh", "-c", "test -t 1 && echo tty || echo pipe"])
    script = f"mount --bind /dev/null /dev/ptmx && {execbox_cmd}"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"pipe\n"
    data = json.loads(result_file.read_text())
    assert data["pty_fallback"] and "pty_unlockpt" in data["pty_fallback"]
    strict = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script.replace("--pty=auto", "--pty")],
                            capture_output=True, check=False, timeout=60)
    assert strict.returncode == 125 and b"pty_unlockpt" in strict.stderr


@pytest.mark.parametrize("mode", [[], ["--sandbox"]], ids=["plain", "sandbox"])
def test_a_raw_terminal_gets_piped_input_without_an_end_of_file_character(
        mode: list[str]) -> None:
    """A step that makes its terminal raw reads piped input as it is: there every byte is
    data, so no end-of-file character is added at its end (script(1) adds none either)."""
    step = ("import os, sys, time, tty; tty.setraw(0); time.sleep(2); "
            "sys.stdout.write(repr(os.read(0, 100)))")
    cli = " ".join([*CLI, "run", "--pty", *mode, "--timeout", "30", "--", "python3", "-c",
                    f'"{step}"'])
    proc = subprocess.run(["sh", "-c", f"(sleep 1; printf abc) | {cli}"], capture_output=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc
    assert proc.stdout == b"b'abc'", proc.stdout


@pytest.mark.parametrize("mode", [[], ["--sandbox"]], ids=["plain", "sandbox"])
def test_piped_input_reaches_a_pty_step_and_its_end_ends_the_step(mode: list[str]) -> None:
    """As script(1): input that is no terminal goes to the step's terminal, is not echoed
    back, and its end is the terminal's end-of-file, so a reader of its input ends. In a
    sandbox the step's terminal is relayed through one the sandbox's pid 1 keeps raw: the
    end-of-file character goes through it to the step's."""
    proc = run_cli("run", "--pty", *mode, "--timeout", "20", "--", "sh", "-c",
                   'read x; echo "got [$x]"; cat', input=b"hello\nrest", timeout=60)
    assert proc.returncode == 0, proc
    assert proc.stdout.replace(b"\r\n", b"\n") == b"got [hello]\nrest", proc.stdout
    empty = run_cli("run", "--pty", *mode, "--timeout", "20", "--", "cat",
                    stdin=subprocess.DEVNULL)
    assert empty.returncode == 0 and empty.stdout == b"", empty
