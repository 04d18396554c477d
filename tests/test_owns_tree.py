"""execbox owns the whole tree even when the process owning it is killed.

Every step here builds the same tree: a plain background child, a child that setsid()s and
ignores SIGTERM, a double-forked child (reparented away from the shell at once) and the
main process. Each of these ends in `exec -a MARK sleep 1000`, so every process of the tree
has the marker as argv[0] (a `# MARK` comment would not reach sleep's argv).

The checks also require that the tree's processes were reaped: a zombie whose parent is
anything but pid 1 (a surviving supervisor or reaper that stopped reaping) is a failure.
Zombies of pid 1 are left to it (on the development machine it reaps only every second or
so).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import execbox
from conftest import CLI, processes_with

TREE_PROCESSES = 4  # background, setsid + TERM-ignoring, double-forked, main


def tree_script(mark: str) -> str:
    leaf = f"exec -a {mark} sleep 1000"
    return (f"bash -c '{leaf}' &\n"
            f"setsid bash -c 'trap \"\" TERM; {leaf}' &\n"
            f"(bash -c '{leaf}' &)\n"
            f"bash -c '{leaf}'\n")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of pid, or None if it has no /proc entry."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def ppid_of(pid: int) -> int:
    stat = _stat(pid)
    assert stat is not None, f"process {pid} is gone"
    return stat[1]


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid:
                found.append(int(entry))
    return found


def leaves(mark: str) -> dict[int, int]:
    """pid -> start time of the processes whose argv[0] is exactly mark."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0 == mark.encode():
            stat = _stat(int(entry))
            if stat is not None:
                found[int(entry)] = stat[2]
    return found


def wait_for_tree(mark: str, count: int = TREE_PROCESSES, timeout: float = 20) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        found = leaves(mark)
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"the tree never formed: {found}"
        time.sleep(0.02)


def remaining(tracked: dict[int, int]) -> tuple[list[int], list[int]]:
    """(alive, zombie not left to pid 1) among tracked pids (pid reuse is told apart by the
    start time)."""
    alive, zombies = [], []
    for pid, started in tracked.items():
        stat = _stat(pid)
        if stat is None or stat[2] != started:
            continue
        if stat[0] != "Z":
            alive.append(pid)
        elif stat[1] != 1:
            zombies.append(pid)
    return alive, zombies


def assert_tree_gone(mark: str, tracked: dict[int, int], within: float = 2.0,
                     label: str = "") -> None:
    """Poll up to `within` seconds: no process with mark, none of tracked alive or zombie."""
    deadline = time.monotonic() + within
    while True:
        left = processes_with(mark)
        alive, zombies = remaining(tracked)
        if not left and not alive and not zombies:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    survivors = sorted(set(left + alive))
    assert not survivors, f"{label}processes of the tree survived: {survivors}"
    assert not zombies, f"{label}processes of the tree were left unreaped (zombies): {zombies}"


def kill_pids(pids: Iterator[int] | list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _userns_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-U", "true"], capture_output=True, check=False).returncode == 0


def _pids_cgroup_works() -> bool:
    try:
        return execbox.run(["true"], pids=10).exit_code == 0
    except execbox.ExecboxError:
        return False


def our_execbox_cgroups() -> set[str]:
    """execbox-* cgroups directly below this process's own cgroups (every hierarchy)."""
    found: set[str] = set()
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.rstrip("/")
        if controllers:
            names = [controllers, *(c.removeprefix("name=") for c in controllers.split(","))]
            bases = [f"/sys/fs/cgroup/{name}" for name in names]
        else:
            bases = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        for base in bases:
            directory = base + path
            try:
                entries = os.listdir(directory)
            except OSError:
                continue
            found |= {os.path.realpath(f"{directory}/{n}") for n in entries
                      if n.startswith("execbox-")}
    return found


# -- 1. `execbox run` itself SIGKILLed ------------------------------------------------------

CLI_MODES = {
    "plain": [],
    "pty": ["--pty"],
    "sandbox": ["--sandbox"],
    "pids": ["--pids", "100"],
}


def _cli_tree(mode: str, marker: str, cwd: Path,
              stderr: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """`execbox run` in one of CLI_MODES running tree_script(marker), in a session of its
    own."""
    return subprocess.Popen([*CLI, "run", *CLI_MODES[mode], "--", "sh", "-c",
                             tree_script(marker)],
                            cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def _end_cli(proc: subprocess.Popen[bytes], tracked: dict[int, int], marker: str) -> None:
    """Whatever a failed test left: the CLI, and every process of the tree."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    kill_pids(list(tracked))
    kill_pids(processes_with(marker))


@pytest.mark.parametrize("mode", list(CLI_MODES))
def test_cli_killed_leaves_no_process_of_the_tree(mode: str, marker: str,
                                                  tmp_path: Path) -> None:
    if mode == "sandbox" and not _userns_works():
        pytest.skip("user namespaces are not available here")
    if mode == "pids" and not _pids_cgroup_works():
        pytest.skip("no writable pids cgroup here")
    before = our_execbox_cgroups() if mode == "pids" else set()
    proc = _cli_tree(mode, marker, tmp_path)
    tracked: dict[int, int] = {}
    try:
        tracked = wait_for_tree(marker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert_tree_gone(marker, tracked)
        if mode == "pids":
            after_next = subprocess.run([*CLI, "run", "--pids", "100", "--", "true"],
                                        capture_output=True, timeout=60, check=False)
            assert after_next.returncode == 0, after_next.stderr
            left = our_execbox_cgroups() - before
            assert not left, f"the killed run's cgroups were not removed: {sorted(left)}"
    finally:
        _end_cli(proc, tracked, marker)


@pytest.mark.parametrize("mode", ["pids", "sandbox"])
def test_cli_supervisor_killed_leaves_no_cgroup_of_it(mode: str, marker: str,
                                                      tmp_path: Path) -> None:
    """`execbox run`'s supervisor SIGKILLed alone: the process the user started kills the
    step's tree and removes the cgroups that supervisor made, as the fork server does for
    the API's; not left for the next run's stale sweep."""
    if mode == "sandbox" and (not _userns_works() or os.geteuid() != 0):
        pytest.skip("a root caller's sandbox (with its cgroup) is not available here")
    if mode == "pids" and not _pids_cgroup_works():
        pytest.skip("no writable pids cgroup here")
    from conftest import children_of, session_cgroups
    from execbox.cgroups.stale import creator_of

    proc = _cli_tree(mode, marker, tmp_path, stderr=subprocess.PIPE)
    tracked: dict[int, int] = {}
    try:
        tracked = wait_for_tree(marker)
        supervisors = [pid for pid, _ in children_of(proc.pid)]
        assert len(supervisors) == 1, supervisors
        supervisor = supervisors[0]

        def made_by_it() -> list[str]:
            return [path for path in session_cgroups()
                    if (creator_of(os.path.basename(path)) or (0,))[0] == supervisor]

        assert made_by_it(), "the step had no cgroup of its supervisor's"
        os.kill(supervisor, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 125 and b"was killed by SIGKILL" in stderr, stderr
        assert_tree_gone(marker, tracked)
        assert made_by_it() == []
    finally:
        _end_cli(proc, tracked, marker)


# -- 2. API: a step's supervisor killed -----------------------------------------------------

def _start_tree(mark: str) -> tuple[execbox.Execution, dict[int, int]]:
    handle = execbox.start(["sh", "-c", tree_script(mark)])
    tracked = wait_for_tree(mark)
    assert handle.wait_started(timeout=30) is not None
    return handle, tracked


def _assert_supervisor_killed(result: execbox.Result) -> None:
    assert result.failure is not None, result
    assert result.failure.step == "supervise", result.failure
    assert "killed" in result.failure.message.lower(), result.failure
    # The job was taken: when is known (an action's start and end timestamps come from
    # here), never left out as if the step had not been tried.
    assert result.started_at is not None and result.ended_at is not None, result
    assert time.time() - 120 < result.started_at <= result.ended_at <= time.time()


def test_killed_supervisor_is_reported_and_its_tree_is_gone(marker: str) -> None:
    handle, tracked = _start_tree(marker)
    try:
        assert handle.pid is not None
        supervisor = ppid_of(handle.pid)
        assert supervisor != os.getpid()
        os.kill(supervisor, signal.SIGKILL)
        result = handle.wait(timeout=30)
        assert_tree_gone(marker, tracked)
        _assert_supervisor_killed(result)
    finally:
        kill_pids(list(tracked))
        kill_pids(processes_with(marker))
    assert execbox.run(["true"]).exit_code == 0


def test_16_killed_supervisors_from_4_threads(marker: str) -> None:
    handles: list[tuple[execbox.Execution, str]] = []
    lock = threading.Lock()
    all_started = threading.Barrier(5)
    supervisors_killed = threading.Event()
    results: list[execbox.Result | BaseException] = []

    def worker(n: int) -> None:
        mine = []
        try:
            for i in range(4):
                mark = f"{marker}-{n}-{i}"
                mine.append((execbox.start(["sh", "-c", tree_script(mark)]), mark))
            for handle, _ in mine:
                handle.wait_started(timeout=30)
            with lock:
                handles.extend(mine)
        finally:
            all_started.wait(timeout=60)
        supervisors_killed.wait(timeout=60)
        for handle, _ in mine:
            try:
                result: execbox.Result | BaseException = handle.wait(timeout=30)
            except BaseException as exc:  # reported by the main thread
                result = exc
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    tracked: dict[int, int] = {}
    try:
        for thread in threads:
            thread.start()
        all_started.wait(timeout=60)
        assert len(handles) == 16
        for _, mark in handles:
            tracked |= wait_for_tree(mark)
        supervisors = {ppid_of(handle.pid) for handle, _ in handles if handle.pid is not None}
        assert len(supervisors) == 16 and os.getpid() not in supervisors
        kill_pids(list(supervisors))
        supervisors_killed.set()
        for thread in threads:
            thread.join(timeout=60)
        assert len(results) == 16, results
        assert_tree_gone(marker, tracked)
        for result in results:
            assert isinstance(result, execbox.Result), result
            _assert_supervisor_killed(result)
    finally:
        supervisors_killed.set()
        kill_pids(list(tracked))
        kill_pids(processes_with(marker))
        for thread in threads:
            thread.join(timeout=60)
    assert execbox.run(["true"]).exit_code == 0


# -- 3. API: the fork server killed ---------------------------------------------------------

def test_fork_server_and_all_supervisors_killed(marker: str) -> None:
    started = [_start_tree(f"{marker}-{i}") for i in range(2)]
    tracked: dict[int, int] = {}
    for _, found in started:
        tracked |= found
    try:
        first = started[0][0]
        assert first.pid is not None
        server = ppid_of(ppid_of(first.pid))
        assert server not in (1, os.getpid())
        supervisors = children(server)
        for handle, _ in started:
            assert handle.pid is not None and ppid_of(handle.pid) in supervisors
        kill_pids([server, *supervisors])
        results = [handle.wait(timeout=30) for handle, _ in started]
        assert_tree_gone(marker, tracked)
        for result in results:
            _assert_supervisor_killed(result)
    finally:
        kill_pids(list(tracked))
        kill_pids(processes_with(marker))
    assert execbox.run(["true"]).exit_code == 0


@pytest.mark.parametrize("killed", ["supervisor", "supervisor, server and anchor",
                                    "all at once"])
def test_a_lost_supervisors_result_says_who_still_cleans_up(killed: str,
                                                           marker: str) -> None:
    """The Result of a step whose supervisor was killed names the step's pid and says
    truthfully which process still kills what the supervisor left: the fork server, or
    none when its anchor is gone too."""
    from execbox.server.client import ForkServer

    server = ForkServer()
    handle = execbox.start(["sh", "-c", f"sleep 60 # {marker}"], server=server)
    try:
        assert handle.wait_started(timeout=30) is not None and handle.pid is not None
        assert server.pid is not None and handle.supervisor_pid is not None
        anchor = ppid_of(server.pid)
        assert anchor not in (1, os.getpid())
        if killed == "all at once":  # (the supervisor's death may be seen first)
            kill_pids([handle.supervisor_pid, server.pid, anchor])
        elif killed != "supervisor":
            helpers = [os.pidfd_open(pid) for pid in (server.pid, anchor)]
            kill_pids([server.pid, anchor])
            for pidfd in helpers:
                select.select([pidfd], [], [], 30)
                os.close(pidfd)
        kill_pids([handle.supervisor_pid])
        result = handle.wait(timeout=30)
        assert result.failure is not None and result.pid == handle.pid, result
        if killed == "supervisor":
            assert "the fork server process kills what it left" in result.failure.hint
        else:
            assert "the fork server and its anchor process are gone too" in \
                result.failure.hint, result.failure.hint
        assert_tree_gone(marker, {}, within=10)  # (the caller killed the step itself)
    finally:
        kill_pids(processes_with(marker))
        server.close()


def test_fork_server_killed_alone_the_running_step_finishes() -> None:
    handle = execbox.start(["sh", "-c", "sleep 1; exit 3"])
    try:
        pid = handle.wait_started(timeout=30)
        assert pid is not None
        server = ppid_of(ppid_of(pid))
        assert server not in (1, os.getpid())
        os.kill(server, signal.SIGKILL)
        result = handle.wait(timeout=30)
    finally:
        handle.cancel(hard=True)
    assert result.exit_code == 3 and result.failure is None, result
    assert execbox.run(["true"]).exit_code == 0


# -- 4. A long-lived sandbox ----------------------------------------------------------------

needs_userns = pytest.mark.skipif(not _userns_works(),
                                  reason="user namespaces are not available here")


@needs_userns
def test_long_lived_sandbox_20_runs_leave_nothing_behind(marker: str, tmp_path: Path) -> None:
    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path)) as sb:
        for i in range(20):
            mark = f"{marker}-run{i}"
            kind = ("exit", "timeout", "cancel")[i % 3]
            tracked: dict[int, int] = {}
            try:
                if kind == "exit":  # the main process exits; the rest must go with it
                    script = tree_script(mark).replace(
                        f"bash -c 'exec -a {mark} sleep 1000'\n",
                        f"bash -c 'exec -a {mark} sleep 1000' &\n", 1)
                    # The main process ends once the test has seen the whole tree.
                    release = tmp_path / f"release-{i}"
                    script += f"until [ -e {release} ]; do sleep 0.02; done\n"
                    handle = sb.start_run(["sh", "-c", script], timeout=30)
                    tracked = wait_for_tree(mark)
                    release.touch()
                    result = handle.wait(timeout=30)
                    assert result.exit_code == 0 and not result.timed_out, result
                elif kind == "timeout":
                    handle = sb.start_run(["sh", "-c", tree_script(mark)], timeout=0.5,
                                          grace=0.2)
                    deadline = time.monotonic() + 0.4
                    while len(tracked) < TREE_PROCESSES and time.monotonic() < deadline:
                        tracked = leaves(mark)
                        time.sleep(0.01)
                    result = handle.wait(timeout=30)
                    assert result.timed_out, result
                else:
                    handle = sb.start_run(["sh", "-c", tree_script(mark)])
                    tracked = wait_for_tree(mark)
                    handle.cancel()
                    result = handle.wait(timeout=30)
                    assert result.cancelled, result
                assert_tree_gone(mark, tracked, label=f"run {i} ({kind}): ")
            finally:
                kill_pids(list(tracked))
                kill_pids(processes_with(mark))
            after = sb.run(["true"], timeout=30)
            assert after.exit_code == 0 and after.failure is None, (i, kind, after)


@needs_userns
def test_long_lived_sandbox_pty_run_gets_a_terminal(tmp_path: Path) -> None:
    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path)) as sb:
        result = sb.run(["tty"], pty=True, stdout=execbox.CAPTURE, timeout=30)
    assert result.stdout is not None
    assert result.exit_code == 0 and result.stdout.startswith(b"/dev/pts/"), result


def _v1_freezer() -> bool:
    from execbox.cgroups.host import detect

    return "freezer" in detect().v1


_FORK_CHAIN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
new_session = sys.argv[2] == "setsid"
end = time.time() + 20
while time.time() < end:  # {marker}: each generation forks the next, then exits
    if os.fork():
        os._exit(0)
    if new_session:
        os.setsid()
open(sys.argv[1], "w").write("survived")
"""


def _end_chain(marker: str) -> None:
    """Stop a fork chain this test left (each member a copy with the marker in its argv):
    its groups first, then what is left, until nothing shows the marker."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = processes_with(marker)
        if not left:
            return
        for pid in left:
            try:
                os.killpg(os.getpgid(pid), signal.SIGSTOP)
            except OSError:
                pass
        kill_pids(left)
        for pid in left:
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("how", ["same group", "setsid"])
def test_a_fork_chain_does_not_outrun_the_final_kill(how: str, marker: str,
                                                     tmp_path: Path) -> None:
    """A plain step (no cgroup to freeze) whose processes each fork the next and exit, so
    that the one alive is never the one a kill was aimed at: the kill walk still ends it
    (a group kill is atomic against fork; a new session each time is outrun by the walk
    over this supervisor's own children, where each orphan lands), or says it could not,
    and nothing survives the Result unreported."""
    survived = tmp_path / "survived"
    chain = _FORK_CHAIN.replace("{marker}", marker)
    try:
        result = execbox.run(["python3", "-c", chain, str(survived), how], timeout=60)
        if result.cleanup_errors or result.unkillable:  # said so: the caller knows
            return
        time.sleep(0.5)
        assert processes_with(marker) == [], "the chain outran the kill, unreported"
    finally:
        _end_chain(marker)
    assert not survived.exists()


@pytest.mark.skipif(os.geteuid() != 0 or not _v1_freezer(),
                    reason="needs root and the v1 freezer (a process no SIGKILL ends)")
def test_a_process_no_kill_ends_is_not_blamed_on_the_next_steps(marker: str) -> None:
    """A step leaves a process that survives every kill (frozen in a freezer cgroup it made
    below its own, as a process stuck in the kernel would). It is that step's report; it
    stays its supervisor's child, and a later step on that supervisor must neither wait for
    it again nor report it as its own."""
    script = ("d=/sys/fs/cgroup/freezer$(grep ':freezer:' /proc/self/cgroup | cut -d: -f3)/"
              f"frozen && mkdir $d && {{ sh -c 'sleep 1000; : {marker}' & }} && "
              "echo $! > $d/cgroup.procs && echo FROZEN > $d/freezer.state && echo $d")
    first = execbox.start(["bash", "-c", script], memory="64M", stdout=execbox.CAPTURE)
    result = first.wait(timeout=120)
    frozen_dir = (result.stdout or b"").decode().strip()
    supervisor = first.supervisor_pid
    try:
        assert frozen_dir.endswith("/frozen"), result
        assert processes_with(marker) and result.unkillable, result  # its own step's report
        on_same = 0
        for _ in range(100):  # until a later step has run on that supervisor
            later = execbox.start(["/bin/true"], pids=16)
            outcome = later.wait(timeout=120)
            assert outcome.exit_code == 0 and not outcome.unkillable, outcome
            on_same += later.supervisor_pid == supervisor
            if on_same:
                break
            time.sleep(0.05)  # idle supervisors race for each job
        assert on_same, "no later step ran on the step's supervisor"
    finally:
        if os.path.isdir(frozen_dir):
            Path(frozen_dir, "freezer.state").write_text("THAWED")  # its SIGKILL lands now
    # Its supervisor, idle, reaps it once it dies and removes the step's cgroup.
    step_cgroup = os.path.dirname(frozen_dir)
    deadline = time.monotonic() + 30
    while (processes_with(marker) or os.path.isdir(step_cgroup)) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []
    assert not os.path.isdir(step_cgroup), f"{step_cgroup} was left behind"


@needs_userns
def test_a_run_of_a_long_lived_sandbox_has_the_proc_of_its_own_pid_namespace(
        tmp_path: Path) -> None:
    """Each run has a pid namespace of its own: /proc must be that namespace's, or ps,
    /proc/self and /proc/$$ name other processes (or none)."""
    script = ('test -d /proc/$$ || echo self-differs; '
              'test "$(cat /proc/$$/comm)" = sh || echo comm-differs; '
              'ls /proc | grep -c "^[0-9]"; '
              '(echo 1 > /proc/sys/kernel/hostname) 2>/dev/null && echo sys-writable; true')
    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path)) as sb:
        first = sb.run(["sh", "-c", f"echo kept > /tmp/file; {script}"],
                       stdout=execbox.CAPTURE, timeout=30)
        second = sb.run(["sh", "-c", "cat /tmp/file; exec sh -c " + repr(script)],
                        stdout=execbox.CAPTURE, timeout=30)
    for result in (first, second):
        assert result.exit_code == 0, result
    assert first.stdout is not None and second.stdout is not None
    # sh, its subshell running ls and grep... but none of the sandbox's own processes.
    assert first.stdout.split()[0].isdigit() and int(first.stdout.split()[0]) <= 4, first
    assert second.stdout.split()[0] == b"kept", second  # files still shared between runs
    assert b"differs" not in first.stdout + second.stdout
    assert b"sys-writable" not in first.stdout + second.stdout


@pytest.mark.parametrize("sandboxed", [False, True])
def test_a_supervisor_killed_while_it_sets_the_step_up_never_runs_it_twice(
        sandboxed: bool, tmp_path: Path) -> None:
    """The job was taken: the step may have started, so a dead supervisor must be reported,
    never the job sent to another one. Held open for writing, the program keeps the
    supervisor retrying its exec (ETXTBSY) for about 2 s: the supervisor is killed then."""
    if sandboxed and not _userns_works():
        pytest.skip("user namespaces are not available here")
    program = tmp_path / "step.sh"
    log = tmp_path / "ran"
    program.write_text(f"#!/bin/sh\necho ran >> {log}\n")
    program.chmod(0o755)
    writer = open(program, "a")  # noqa: SIM115 (held until the supervisor is killed)
    try:
        options = {"sandbox": execbox.SandboxSpec(), "cwd": str(tmp_path)} if sandboxed else {}
        handle = execbox.start([str(program)], **options)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while handle.supervisor_pid is None and time.monotonic() < deadline:
            try:
                handle.wait(timeout=0.05)
            except TimeoutError:
                pass
        assert handle.supervisor_pid is not None, "the supervisor never said it took the job"
        assert handle.pid is None  # still retrying the exec
        os.kill(handle.supervisor_pid, signal.SIGKILL)
        result = handle.wait(timeout=30)
        deadline = time.monotonic() + 10  # its children die with it (parent-death signal)
        while _stat(handle.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        writer.close()  # a job sent again would now run
    finally:
        writer.close()
    _assert_supervisor_killed(result)
    assert "was not run again" in result.failure.message  # type: ignore[union-attr]
    time.sleep(0.5)
    assert not log.exists(), log.read_text()


def test_a_step_process_named_like_a_supervisor_does_not_survive_the_server(
        marker: str) -> None:
    """The anchor spares supervisors when the server is gone; a step's process can give
    itself their name, but not their session."""
    from execbox.server.client import ForkServer
    from execbox.supervise.proctree import comm_of

    server = ForkServer()
    script = ("(setsid bash -c 'printf execbox-super > /proc/$$/comm; trap \"\" TERM; "
              f"while :; do sleep 0.2; done' {marker} &); exec sleep 1000")
    handle = execbox.start(["sh", "-c", script], server=server)
    try:
        assert handle.wait_started(timeout=30) is not None
        def impostors_now() -> list[int]:
            """The bash that renamed itself: its sh and setsid have the marker only until
            they exec (and no process shows it while its exec copies its arguments)."""
            return [pid for pid in processes_with(marker) if comm_of(pid) == "execbox-super"]

        deadline = time.monotonic() + 10
        impostors = impostors_now()
        while not impostors and time.monotonic() < deadline:
            time.sleep(0.02)
            impostors = impostors_now()
        assert impostors, ("the step's process never started; below the supervisor: "
                           + _tree_of(handle.supervisor_pid)
                           + (f"; result: {handle.wait(timeout=0.5)}" if handle.done else ""))
        assert server.pid is not None and handle.supervisor_pid is not None
        kill_pids([server.pid, handle.supervisor_pid])
        handle.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(_stat(pid) for pid in impostors) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in impostors if _stat(pid)], "the impostor survived"
    finally:
        kill_pids(processes_with(marker))
        server.close()


def _tree_of(pid: int | None) -> str:
    """Each process below pid with its command line, for a failure's message."""
    from execbox.supervise.proctree import command_of, descendants

    if pid is None:
        return "(no supervisor)"
    return ", ".join(f"{child}: {command_of(child)}" for child in descendants(pid)) or "nothing"

