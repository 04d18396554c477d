"""Interactive PTY use, driven through a private tmux server: typed commands, job control,
a full-screen program, resizing, and the outer terminal back in cooked mode afterwards."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import processes_with

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed "
                                "(scripts/setup.sh installs it when run as root)")
EXECBOX = f"{shlex.quote(sys.executable)} -m execbox run --pty --setenv PS1 'ready> ' --"


class Tmux:
    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __call__(self, *args: str) -> str:
        assert TMUX is not None
        proc = subprocess.run([TMUX, "-S", str(self.socket), "-f", "/dev/null", *args],
                              capture_output=True, check=True, timeout=30)
        return proc.stdout.decode(errors="replace")

    def start(self, command: str, cols: int = 100, rows: int = 30) -> None:
        self("new-session", "-d", "-x", str(cols), "-y", str(rows), command)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-J")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared; screen:\n{screen}")
            time.sleep(0.05)

    def keys(self, *keys: str) -> None:
        self("send-keys", *keys)

    def wait_for_size(self, rows: int, cols: int, timeout: float = 10) -> None:
        """Ask the shell in the pane for its size until it is rows x cols: a resize reaches
        the step asynchronously, so one look after a fixed pause can come too early."""
        deadline = time.monotonic() + timeout
        while True:
            self.keys("clear; stty size", "Enter")
            answer_by = min(time.monotonic() + 1, deadline)
            while True:
                screen = self.screen()
                if f"{rows} {cols}" in screen:
                    return
                if time.monotonic() > answer_by:
                    break
                time.sleep(0.1)
            if time.monotonic() > deadline:
                raise AssertionError(f"the step never saw {rows}x{cols}; screen:\n{screen}")


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    server = Tmux(tmp_path / "tmux.sock")
    yield server
    try:
        server("kill-server")
    except subprocess.SubprocessError:
        pass


def _then_report(step: str, tmp_path: Path) -> str:
    """Run step in the pane, then record the outer terminal's modes and stay open."""
    stty = tmp_path / "stty-after"
    return (f"sh -c {shlex.quote(f'{step}; echo EXITED $?; stty -a > {stty}; sleep 300')}")


def _modes_after(tmp_path: Path) -> list[str]:
    """The outer terminal's `stty -a` words, as recorded once the step ended."""
    deadline = time.monotonic() + 10
    stty = tmp_path / "stty-after"
    while not stty.exists() or not stty.read_text():
        assert time.monotonic() < deadline, "the terminal's modes were never recorded"
        time.sleep(0.05)
    return stty.read_text().split()


def test_interactive_shell_with_job_control(tmux: Tmux, tmp_path: Path) -> None:
    tmux.start(_then_report(f"{EXECBOX} bash --norc --noprofile -i", tmp_path))
    tmux.wait_for("ready> ")
    tmux.keys("echo $((6 * 7))", "Enter")
    tmux.wait_for("42")
    tmux.keys("sleep 300 &", "Enter")
    tmux.keys("jobs", "Enter")
    tmux.wait_for("Running")
    tmux.keys("kill %1; wait; echo killed-$?", "Enter")
    tmux.wait_for("killed-")
    tmux.keys("exit", "Enter")
    tmux.wait_for("EXITED 0")
    modes = _modes_after(tmp_path)
    assert "icanon" in modes and "echo" in modes and "isig" in modes
    assert "-icanon" not in modes and "-echo" not in modes


def test_full_screen_program(tmux: Tmux, tmp_path: Path) -> None:
    text = tmp_path / "rows.txt"
    text.write_text("".join(f"row {i}\n" for i in range(1, 201)))
    tmux.start(_then_report(f"{EXECBOX} less {shlex.quote(str(text))}", tmp_path))
    screen = tmux.wait_for("row 1")
    assert "row 200" not in screen
    tmux.keys("G")
    tmux.wait_for("row 200")
    tmux.keys("q")
    tmux.wait_for("EXITED 0")


def test_resizing_reaches_the_step(tmux: Tmux, tmp_path: Path) -> None:
    tmux.start(_then_report(f"{EXECBOX} bash --norc --noprofile -i", tmp_path),
               cols=100, rows=30)
    tmux.wait_for("ready> ")
    tmux.keys("stty size", "Enter")
    tmux.wait_for("30 100")
    tmux("resize-window", "-x", "120", "-y", "40")
    tmux.wait_for_size(40, 120)
    tmux.keys("exit", "Enter")
    tmux.wait_for("EXITED 0")


def _parent(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2:].split()[1])


def test_terminal_restored_when_execbox_is_signalled(tmux: Tmux, tmp_path: Path) -> None:
    marker = f"signalled-{tmp_path.name}"
    step = (f"{shlex.quote(sys.executable)} -m execbox run --pty --grace 0.5 "
            f"--setenv PS1 'ready> ' --setenv MARK {marker} -- bash --norc --noprofile -i")
    tmux.start(_then_report(step, tmp_path))
    tmux.wait_for("ready> ")
    ours = [p for p in processes_with(marker)
            if b"-m\x00execbox" in Path(f"/proc/{p}/cmdline").read_bytes()]
    # `execbox run` (the guard the user started) and the supervisor it forked.
    (pid,) = [p for p in ours if _parent(p) not in ours]
    os.kill(pid, signal.SIGTERM)
    tmux.wait_for("EXITED")
    modes = _modes_after(tmp_path)
    assert "icanon" in modes and "echo" in modes and "-icanon" not in modes


def test_interactive_shell_inside_a_sandbox(tmux: Tmux, tmp_path: Path) -> None:
    step = (f"{shlex.quote(sys.executable)} -m execbox run --pty --sandbox "
            f"--setenv PS1 'boxed> ' -- bash --norc --noprofile -i")
    tmux.start(_then_report(step, tmp_path), cols=100, rows=30)
    tmux.wait_for("boxed> ")
    tmux.keys("echo $((7 * 6)); hostname; tty", "Enter")
    tmux.wait_for("/dev/pts/0")
    assert "42" in tmux.screen() and "execbox" in tmux.screen()
    tmux("resize-window", "-x", "110", "-y", "35")
    tmux.wait_for_size(35, 110)
    tmux.keys("exit", "Enter")
    tmux.wait_for("EXITED 0")
