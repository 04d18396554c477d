"""The native pid 1 of a root caller's sandbox (linux/native_init.py): it reaps what is
orphaned in its namespace, ends with its supervisor (even one that died before it could
say so), and the step beside it keeps every behaviour of a step below a Python pid 1."""

from __future__ import annotations

import os
import signal
import time

import pytest

import execbox
from execbox.linux import native_init, syscalls

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a root caller's sandbox (needs root)"),
    pytest.mark.skipif(not native_init.available(),
                       reason=f"no native pid 1 here: {native_init._unavailable}"),
]


def _in_new_pid_namespace(body: str) -> tuple[int, int]:
    """Run, in a child process: clone a native pid 1 into a new pid namespace, fork body
    (Python source) beside it; (exit status of the body, of pid 1 once SIGKILLed)."""
    import subprocess
    import sys

    code = f"""
import os, signal, sys, time
from execbox.linux import native_init, syscalls as sc
home = os.open("/proc/self/ns/pid", os.O_RDONLY)
sc.unshare(sc.CLONE_NEWPID)
init = native_init.clone_init()
pid = os.fork()
if pid == 0:
    try:
{chr(10).join("        " + line for line in body.splitlines())}
    finally:
        os._exit(0)
sc.setns(home, sc.CLONE_NEWPID)
_, status = os.waitpid(pid, 0)
os.kill(init, signal.SIGKILL)
_, init_status = os.waitpid(init, 0)
print(status, init_status)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    body_status, init_status = map(int, proc.stdout.split())
    return body_status, init_status


def test_it_reaps_what_is_orphaned_in_its_namespace() -> None:
    """Orphans reparent to pid 1; each must be reaped when it ends (no zombies pile up, the
    zombie wedge of moby/buildkit "fix process termination handling for runc exec")."""
    body = """
for _ in range(20):
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(0.05)
            os._exit(0)
        os._exit(0)   # its child is now pid 1's
    os.wait()
time.sleep(0.5)
with open("/proc/1/task/1/children") as f:
    children = f.read().split()
zombies = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                zombies.append(pid)
os._exit(10 + len(children) + len(zombies))
"""
    # The body's procfs is the host's: /proc/1 there is the host's init, not ours. Only
    # our own namespace's view counts, so mount one privately.
    body = ("sc.unshare(sc.CLONE_NEWNS)\nsc.mount(None, '/', None, sc.MS_REC | sc.MS_PRIVATE)"
            "\nsc.mount('proc', '/proc', 'proc')\n" + body)
    status, init_status = _in_new_pid_namespace(body)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 10, status
    assert os.WIFSIGNALED(init_status) and os.WTERMSIG(init_status) == signal.SIGKILL


def test_it_exits_at_once_if_its_supervisor_died_before_it_could_tie_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent-death signal covers a supervisor that dies after pid 1 asked for it; one
    that died before is seen through its pidfd (poll says POLLIN once it has exited)."""
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    pidfd = os.pidfd_open(gone)
    os.waitpid(gone, 0)
    loaded = native_init._loaded
    assert loaded is not None
    monkeypatch.setattr(loaded, "own_pidfd", lambda: pidfd)
    home = os.open("/proc/self/ns/pid", os.O_RDONLY)
    try:
        syscalls.unshare(syscalls.CLONE_NEWPID)
        try:
            init = native_init.clone_init()
        finally:
            syscalls.setns(home, syscalls.CLONE_NEWPID)
        deadline = time.monotonic() + 30
        done, status = os.waitpid(init, os.WNOHANG)  # no kill: it must end by itself
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
            done, status = os.waitpid(init, os.WNOHANG)
        if not done:
            os.kill(init, signal.SIGKILL)
            os.waitpid(init, 0)
            pytest.fail("pid 1 outlived its dead supervisor")
    finally:
        os.close(home)
        os.close(pidfd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 255, status


def test_a_cancelled_step_whose_tree_is_gone_does_not_wait_out_the_grace_period() -> None:
    """pid 1 never exits by itself: once it is all that is left, the cancel is over."""
    handle = execbox.start(["sleep", "100"], sandbox=execbox.SandboxSpec(), grace=120)
    handle.wait_started(timeout=30)
    began = time.monotonic()
    handle.cancel()
    result = handle.wait(timeout=150)
    assert result.signal == "SIGTERM" and result.cancelled, result
    assert time.monotonic() - began < 60, "waited for the grace period"


def test_leftovers_of_a_step_that_exits_go_with_its_pid_1(marker: str) -> None:
    """As when a Python pid 1 exits with its step: what the step left running is killed."""
    from execbox.supervise.proctree import processes_with

    result = execbox.run(["sh", "-c", f"sh -c 'sleep 300; : {marker}' & exit 5"],
                         sandbox=execbox.SandboxSpec())
    assert result.exit_code == 5, result
    assert processes_with(marker) == []


PROBE = """
import os, sys
if os.readlink("/proc/self/ns/mnt") == sys.argv[1]:
    sys.exit(3)  # not inside a sandbox: probe nothing
try:
    os.close(os.open("/proc/1/mem", os.O_RDONLY))
    print("opened")
except OSError as exc:
    print(exc.errno)
"""


@pytest.mark.parametrize("privileged", [False, True])
def test_a_step_cannot_reach_pid_1s_memory_which_is_the_supervisors(
        tmp_path: object, privileged: bool) -> None:
    """pid 1 shares the supervisor's memory and keeps its capabilities: a step, even one
    running as uid 0 (privileged=True, no user namespace), must not get at it. It has no
    capabilities, and the kernel lets no process trace one whose permitted capabilities
    are not a subset of its own."""
    import errno
    from pathlib import Path

    probe = Path(str(tmp_path)) / "probe.py"
    probe.write_text(PROBE)
    box = (execbox.SandboxSpec(uid=0, privileged=True) if privileged
           else execbox.SandboxSpec())
    result = execbox.run(["python3", "probe.py", os.readlink("/proc/self/ns/mnt")],
                         sandbox=box, cwd=str(tmp_path), stdout=execbox.CAPTURE)
    assert result.exit_code == 0, result
    assert (result.stdout or b"").strip() == str(errno.EACCES).encode(), result.stdout


def test_signals_a_step_sends_it_are_dropped_not_queued() -> None:
    """A step running as host uid 0 (privileged) may signal pid 1. Blocked, every such
    signal would be queued (a real-time one each time), charged to host root's
    RLIMIT_SIGPENDING: root's sigqueue and timer_create would fail host-wide."""
    script = (
        "import os, signal\n"
        "for _ in range(2000):\n"
        "    os.kill(1, signal.SIGRTMIN)\n"
        "    os.kill(1, signal.SIGTERM)\n"
        "pending = 0\n"
        "for line in open('/proc/1/status'):\n"
        "    if line.startswith(('SigPnd', 'ShdPnd')):\n"
        "        pending |= int(line.split()[1], 16)\n"
        "pending &= ~(1 << (signal.SIGCHLD - 1))\n"
        "os._exit(0 if pending == 0 else 3)\n")
    result = execbox.run(["python3", "-c", script],
                         sandbox=execbox.SandboxSpec(privileged=True, uid=0, gid=0))
    assert result.exit_code == 0, result


def test_ending_pid_1_reaps_the_process_beside_it_first() -> None:
    """fork_beside_init's fork may raise after it forked (a signal's handler, as the mask
    is restored): ending pid 1 must not wait for it while that child is unreaped."""
    import subprocess
    import sys

    code = """
import os, signal, time
from execbox.spawn import ahead
from execbox.linux.syscalls import block_all_signals, restore_signal_mask
class Boom(Exception): pass
def boom(*_): raise Boom()
signal.signal(signal.SIGUSR1, boom)
def fork():
    previous = block_all_signals()
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    os.kill(os.getpid(), signal.SIGUSR1)
    restore_signal_mask(previous)
    return pid
try:
    ahead.fork_beside_init(fork)
except Boom:
    print("raised")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "raised", proc


def test_pid_1s_cloned_at_the_same_moment_from_threads_each_get_their_own_arguments(
) -> None:
    """Threads of one process (a shared supervisor's) clone pid 1s at once: each must start
    with its own function and argument, though all share the process's memory (glibc's
    clone() passes both on the new stack, and a clone's first call overwrites one)."""
    import subprocess
    import sys

    code = """
import os, signal, threading, time
from execbox.linux import native_init
pids, lock = [], threading.Lock()
go = threading.Barrier(8)
checked = threading.Event()
def clone_many():
    go.wait()
    for _ in range(40):
        pid = native_init.clone_init()
        with lock:
            pids.append(pid)
    # A pid 1's parent-death signal comes when the thread that cloned it ends (as a
    # shared supervisor's worker thread outlives its step's): not before it is checked.
    checked.wait()
threads = [threading.Thread(target=clone_many) for _ in range(8)]
for t in threads: t.start()
while len(pids) < 320:
    time.sleep(0.01)
bad = []
ours = open("/proc/self/comm").read().strip()
for pid in pids:
    for _ in range(400):  # until it has named itself
        with open(f"/proc/{pid}/status", errors="replace") as f:
            status = dict(l.rstrip("\\n").split(":\\t", 1) for l in f if ":\\t" in l)
        if status["Name"] != ours:
            break
        time.sleep(0.005)
    if status["Name"] != "execbox-init" or status["SigCgt"] != "0" * 16:
        bad.append((pid, status["Name"], status["SigCgt"], status["SigBlk"]))
for pid in pids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
checked.set()
for t in threads: t.join()
print(len(pids), bad)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "320 []", proc.stdout


def test_threads_asking_at_once_whether_pid_1s_can_be_cloned_load_the_code_once() -> None:
    """The first clone of a process may come from several threads at once. A second load
    made a second ring of stacks and arg; the first, dropped, was freed under the clones
    still reading it, which then ran a garbage function in the process's memory (and at
    times crashed it). The step launcher's memfd is made once likewise."""
    import subprocess
    import sys

    code = """
import threading, time
from execbox.linux import launcher, native_init
loads, makes = [], []
real_load, real_make = native_init._load, launcher._make
def slow_load():
    loads.append(1)
    time.sleep(0.05)  # widens the window two threads can both find nothing loaded
    return real_load()
def slow_make():
    makes.append(1)
    time.sleep(0.05)
    return real_make()
native_init._load, launcher._make = slow_load, slow_make
go = threading.Barrier(8)
def ask():
    go.wait()
    native_init.available(), launcher.available()
threads = [threading.Thread(target=ask) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
# The first clones of a process open its pidfd (their way to see it gone): one, not one
# per thread that cloned first.
import os, signal
opened, real_pidfd_open = [], os.pidfd_open
def slow_pidfd_open(*args):
    opened.append(1)
    time.sleep(0.05)
    return real_pidfd_open(*args)
os.pidfd_open = slow_pidfd_open
inits, done = [], threading.Event()
def clone():
    go.wait()
    inits.append(native_init.clone_init())
    done.wait()  # (a pid 1's parent-death signal comes when the thread that cloned it ends)
threads = [threading.Thread(target=clone) for _ in range(8)]
for t in threads: t.start()
while len(inits) < 8: time.sleep(0.01)
for pid in inits:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
done.set()
for t in threads: t.join()
print(len(loads), len(makes), len(opened))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1"], proc.stdout


def test_a_forked_child_gets_a_fork_lock_unheld() -> None:
    """The native pid 1's load, the launcher's memfd and the kept plans are guarded by a
    ForkLock: a fork made while another thread holds it must not leave the child's copy
    held by a thread the child does not have."""
    import threading

    from execbox.linux.forksafe import ForkLock

    lock = ForkLock()
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(30)
    try:
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # (a held copy would wait forever)
            with lock:
                pass
            os._exit(7)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join()
    assert os.waitstatus_to_exitcode(status) == 7
    with lock:  # the parent's is free again once its holder is done
        pass
