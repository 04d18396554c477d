"""How a root caller's sandboxed step is launched: namespaces made ahead by the supervisor
(user namespaces kept per mapping, network namespaces made ahead and used once), pid 1
forked straight from the supervisor. Steps of one profile still share nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import execbox
from conftest import cgroups_writable, fd_targets, session_cgroups
from execbox.supervise.proctree import processes_with

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the prepared launch is a root "
                                "caller's; unprivileged sandboxes make their own namespaces")

KINDS = ("user", "pid", "mnt", "ipc", "uts", "net")

# Reports its namespaces, then: "serve" binds an abstract UNIX socket and waits for a
# connection from inside its own sandbox; "probe" tries to reach that socket.
PROBE = r"""
import json, os, socket, sys, time
role, name = sys.argv[1], "\0" + sys.argv[2]
ns = {k: os.readlink(f"/proc/self/ns/{k}") for k in ("user", "pid", "mnt", "ipc", "uts", "net")}
if role == "serve":
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen()
    own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    own.connect(name)  # reachable from its own namespace: the probe below means something
    open("/tmp/ready", "w").close()
    print(json.dumps({"ns": ns, "self_connect": True}), flush=True)
    time.sleep(float(sys.argv[3]))
else:
    try:
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(name)
        reached = True
    except OSError:
        reached = False
    print(json.dumps({"ns": ns, "reached": reached}), flush=True)
"""


def _host_namespaces() -> dict[str, str]:
    return {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in KINDS}


def test_same_profile_steps_share_no_namespace_and_no_abstract_socket(
        marker: str, tmp_path: Path) -> None:
    box = execbox.SandboxSpec()
    name = f"execbox-{marker}"
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    serving = execbox.start(["python3", str(script), "serve", name, "8", marker],
                            sandbox=box, cwd=str(tmp_path), stdout=execbox.CAPTURE)
    try:
        deadline = time.monotonic() + 30
        while not processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # bound and listening (it binds before anything else)
        probe = execbox.run(["python3", str(script), "probe", name], sandbox=box,
                            cwd=str(tmp_path), stdout=execbox.CAPTURE)
        assert probe.exit_code == 0, probe
        probed = json.loads(probe.stdout or b"")
        assert probed["reached"] is False, "a step reached another step's abstract socket"
    finally:
        serving.cancel()
    served_result = serving.wait(timeout=30)
    served = json.loads((served_result.stdout or b"").splitlines()[0])
    assert served["self_connect"] is True
    host = _host_namespaces()
    for kind in KINDS:
        assert served["ns"][kind] != probed["ns"][kind], f"both steps share their {kind} ns"
        assert host[kind] not in (served["ns"][kind], probed["ns"][kind]), kind


def _exec_done(marker: str) -> bool:
    """Whether the step's `exec -a MARKER sleep` has happened (bash's own command line
    holds the marker too, until that exec replaces it)."""
    from execbox.supervise.proctree import comm_of

    return any(comm_of(pid) == "sleep" for pid in processes_with(marker))


def _start_sandboxed(script: str, marker: str) -> tuple[execbox.Execution, int, int]:
    """A sandboxed step running script (whose processes carry marker): its handle, its
    pid 1 and that pid 1's parent, the supervisor."""
    began = time.monotonic()
    handle = execbox.start(["bash", "-c", script], sandbox=execbox.SandboxSpec())
    handle.wait_started(timeout=30)
    started = time.monotonic() - began
    deadline = time.monotonic() + 30
    while not _exec_done(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.pid is not None and _exec_done(marker), (
        f"pid {handle.pid}, reported after {started:.1f} s; no marker after "
        f"{time.monotonic() - began:.1f} s")
    with open(f"/proc/{handle.pid}/stat") as f:
        supervisor = int(f.read().rsplit(")", 1)[1].split()[1])
    return handle, handle.pid, supervisor


def test_a_killed_supervisor_takes_the_sandboxed_tree_with_it(marker: str) -> None:
    """The supervisor made the step's namespaces and forked its pid 1: once it is
    SIGKILLed, pid 1 follows (parent-death signal), and with it the whole pid namespace."""
    handle, init, supervisor = _start_sandboxed(
        f"sleep 1000 & sleep 1000 & exec -a {marker} sleep 1000", marker)
    os.kill(supervisor, signal.SIGKILL)
    result = handle.wait(timeout=30)
    assert result.failure is not None and result.failure.step == "supervise", result
    deadline = time.monotonic() + 5
    while (processes_with(marker) or os.path.exists(f"/proc/{init}")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(marker) and not os.path.exists(f"/proc/{init}")
    assert execbox.run(["true"], sandbox=execbox.SandboxSpec()).exit_code == 0


def test_pid_1_dies_with_its_supervisor_when_nothing_else_would_kill_it(marker: str) -> None:
    """With the fork server gone, a killed supervisor's pid 1 reparents to the anchor, which
    spares execbox's own processes: only pid 1's parent-death signal ends it (and with it
    the step). pid 1 takes the step's ids before it spawns the step, and the kernel clears
    that signal on such a change, so it must be set again."""
    from execbox.server.client import default_server

    handle, init, supervisor = _start_sandboxed(f"exec -a {marker} sleep 1000", marker)
    server = default_server().pid
    assert server is not None and server != supervisor
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{server}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker), "the step must survive its fork server"
    os.kill(supervisor, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (processes_with(marker) or os.path.exists(f"/proc/{init}")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(marker) and not os.path.exists(f"/proc/{init}")
    handle.wait(timeout=30)
    assert execbox.run(["true"], sandbox=execbox.SandboxSpec()).exit_code == 0


def _nspid(pid: int) -> list[str]:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1:] for line in f if line.startswith("NSpid:"))


def test_pid_1_is_the_supervisors_own_child(marker: str) -> None:
    """No Python process between the supervisor and the step. Where a native pid 1 serves
    (linux/native_init.py), the step is the supervisor's own child, pid 2 of its
    namespace, beside that pid 1, also the supervisor's child and sharing its memory;
    else supervisor -> Python pid 1 -> step."""
    from execbox.linux import native_init
    from execbox.supervise.proctree import comm_of, own_children, parent_of

    handle = execbox.start(["bash", "-c", f"exec -a {marker} sleep 1000"],
                           sandbox=execbox.SandboxSpec())
    handle.wait_started(timeout=30)
    try:
        deadline = time.monotonic() + 30
        while not _exec_done(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        (step,) = processes_with(marker)
        assert handle.pid is not None
        if native_init.available():
            assert step == handle.pid
            supervisor = parent_of(step)
            assert supervisor is not None and comm_of(supervisor) == "execbox-super"
            (init,) = [pid for pid in own_children(supervisor) if pid != step]
            assert _nspid(init)[-1] == "1" and _nspid(step)[-1] == "2"
            assert os.readlink(f"/proc/{init}/ns/pid") == os.readlink(f"/proc/{step}/ns/pid")
            assert comm_of(init) == "execbox-init"  # told apart from supervisors in ps
            assert os.listdir(f"/proc/{init}/fd") == []  # holds none of the job's files
            with open(f"/proc/{init}/status") as f:  # only SIGKILL (and SIGSTOP) reach it:
                status = dict(line.split(":", 1) for line in f)  # default actions, which
            # a namespace's init drops; only SIGCHLD blocked (for sigtimedwait), and shown
            # unblocked while it sleeps there. A blocked signal would be queued, not dropped.
            assert int(status["SigCgt"], 16) == 0 and int(status["SigIgn"], 16) == 0
            assert int(status["SigBlk"], 16) & ~(1 << (signal.SIGCHLD - 1)) == 0
        else:
            assert parent_of(step) == handle.pid
            assert _nspid(handle.pid)[-1] == "1"
            assert comm_of(handle.pid) == "execbox-init"
    finally:
        handle.cancel()
        handle.wait(timeout=30)


def test_network_namespaces_made_ahead_are_each_used_once() -> None:
    """Run in a child process: namespaces are made in (and for) the calling process."""
    import subprocess
    import sys

    code = r"""
import os
from execbox.spawn import ahead
first, second = ahead.network_namespace(), ahead.network_namespace()
ahead.refill()
ready = ahead._ready_networks[0]
ids = [os.fstat(fd).st_ino for fd in (first, second, ready)]
assert len(set(ids)) == 3, ids
assert ahead.network_namespace() == ready and not ahead._ready_networks
assert os.readlink("/proc/self/ns/net") != "net:[%d]" % ids[0]  # came back home
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_signals_and_exit_status_still_reach_the_caller(tmp_path: Path) -> None:
    """pid 1 reports the step's own wait status (it cannot die of a signal itself)."""
    box = execbox.SandboxSpec()
    assert execbox.run(["sh", "-c", "exit 7"], sandbox=box).exit_code == 7
    killed = execbox.run(["sh", "-c", "kill -USR1 $$"], sandbox=box)
    assert killed.signal == "SIGUSR1" and killed.exit_code == 128 + signal.SIGUSR1
    timed = execbox.run(["sh", "-c", "sleep 100"], sandbox=box, timeout=0.5, grace=1)
    assert timed.timed_out and timed.signal == "SIGTERM"


# -- a pid 1 made ahead ("ready"), in the process that supervises -------------------------

READY_SCRIPT = r"""
import json, os, sys
from execbox.model.options import build_spec
from execbox.model.sandbox import SandboxSpec
from execbox.plan.build import build_plan
from execbox.spawn import ready
from execbox.supervise.supervision import Supervision

def plan_for(argv, cwd, **box):
    spec = build_spec(argv, sandbox=SandboxSpec(**box), cwd=cwd)
    return spec, build_plan(spec, [[1, 1], [2, 2]])

def run(argv, cwd, prepared, **box):
    spec, plan = plan_for(argv, cwd, **box)
    supervision = Supervision(spec, plan, prepared)
    pid = supervision.start()
    result = supervision.run()
    return pid, result

mode, cwd = sys.argv[1], sys.argv[2]
_, template = plan_for(["true"], cwd)
prepared = ready.prepare(template)
assert prepared is not None
# Until its base is built (/tmp, the last of it, mounted) pid 1 is still being made.
import time
base = f"/proc/{prepared.pid}/root/newroot"
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        if os.stat(base + "/tmp").st_dev != os.stat(base).st_dev:
            break
    except OSError:
        pass
    time.sleep(0.01)
report = {"ready": prepared.pid}
if mode == "same":
    pid, result = run(["sh", "-c", "test -f here && exit 5"], cwd, prepared)
elif mode == "policy-changed":  # the parent cgroup's device state moved since pid 1's proof
    from execbox.cgroups import devices
    devices.generation = lambda version, directory: "another state"
    pid, result = run(["sh", "-c", "test -f here && exit 5"], cwd, prepared)
elif mode == "other-profile":
    pid, result = run(["sh", "-c", "test -f here && exit 5"], cwd, prepared, share_net=True)
elif mode == "names":  # the cgroup's names when the step has started, and its renames
    from execbox.cgroups.step import StepCgroup
    renamed = []
    real_rename = StepCgroup.rename
    def rename(self, name):
        renamed.append(name)
        return real_rename(self, name)
    StepCgroup.rename = rename
    spec, plan = plan_for(["true"], cwd)
    supervision = Supervision(spec, plan, prepared)
    pid = supervision.start()
    report["at_start"] = [os.path.basename(d) for d in supervision.cgroup.directories()]
    report["renamed_at_start"] = list(renamed)
    result = supervision.run()
    report["renamed"] = renamed
else:  # a mount on the working directory made after pid 1 was
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(b"tmpfs", cwd.encode(), b"tmpfs", 0, b"mode=0755") == 0
    open(os.path.join(cwd, "here"), "w").close()
    pid, result = run(["sh", "-c", "test -f here && exit 5"], cwd, prepared)
report.update(pid=pid, exit=result.exit_code, failure=str(result.failure),
              ready_alive=os.path.exists(f"/proc/{prepared.pid}"))
print(json.dumps(report))
"""


def _ready_run(mode: str, cwd: Path) -> dict[str, object]:
    import subprocess
    import sys

    command = [sys.executable, "-c", READY_SCRIPT, mode, str(cwd)]
    if mode == "new-mount":  # the mount stays in a mount namespace of the test's own
        command = ["unshare", "--mount", "--propagation", "private", *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_a_ready_pid_1_runs_the_next_step_of_its_profile(tmp_path: Path) -> None:
    (tmp_path / "here").touch()
    report = _ready_run("same", tmp_path)
    assert report["pid"] == report["ready"], report
    assert report["exit"] == 5, report  # the working directory was bound: the file is there


@pytest.mark.skipif(not cgroups_writable(), reason="no writable cgroups here")
def test_an_adopted_cgroup_is_renamed_once_its_step_has_started(tmp_path: Path) -> None:
    """Renaming each hierarchy's directory of the ready pid 1's cgroup to a step cgroup's
    name is not part of the launch: it comes after the step has started."""
    from execbox.cgroups.stale import PREFIX, READY_PREFIX

    report = _ready_run("names", tmp_path)
    assert report["pid"] == report["ready"] and report["exit"] == 0, report
    at_start = report["at_start"]
    assert at_start and all(name.startswith(READY_PREFIX) for name in at_start), report
    assert report["renamed_at_start"] == [], report
    renamed = report["renamed"]
    assert isinstance(renamed, list) and len(renamed) == 1 and renamed[0].startswith(PREFIX)


def test_a_step_of_another_profile_discards_the_ready_pid_1(tmp_path: Path) -> None:
    (tmp_path / "here").touch()
    report = _ready_run("other-profile", tmp_path)
    assert report["pid"] != report["ready"] and not report["ready_alive"], report
    assert report["exit"] == 5, report


def test_a_ready_pid_1_whose_device_proof_is_out_of_date_is_not_used(tmp_path: Path
                                                                       ) -> None:
    """pid 1 proved its cgroup's device policy when it was made; if what that policy depends
    on (the parent cgroup's device list or programs) changed since, it is not used."""
    from conftest import cgroups_writable

    if not cgroups_writable():
        pytest.skip("no writable cgroups here: no device policy to prove")
    (tmp_path / "here").touch()
    report = _ready_run("policy-changed", tmp_path)
    assert report["pid"] != report["ready"] and not report["ready_alive"], report
    assert report["exit"] == 5, report


def test_a_mount_made_after_the_ready_pid_1_is_not_missed(tmp_path: Path) -> None:
    """pid 1's mount namespace is a copy from when it was made: a tmpfs mounted on the
    working directory since then is not there, so that pid 1 is not used."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private mount namespace")
    report = _ready_run("new-mount", tmp_path)
    assert report["pid"] != report["ready"] and not report["ready_alive"], report
    assert report["exit"] == 5, report  # the step saw the new tmpfs and the file in it


def test_only_host_paths_are_bound_ahead(tmp_path: Path) -> None:
    """An input root is read when the root is built, so a pid 1 made ahead would show its
    entries as they were then: such profiles launch the usual way."""
    from execbox.model.options import build_spec
    from execbox.plan.build import build_plan
    from execbox.spawn.ready import split

    def plan_of(box: execbox.SandboxSpec) -> list[tuple[str, tuple[object, ...]]]:
        spec = build_spec(["true"], sandbox=box, cwd=str(tmp_path))
        return build_plan(spec, [[1, 1]]).child

    assert split(plan_of(execbox.SandboxSpec())) is not None
    assert split(plan_of(execbox.SandboxSpec(str(tmp_path)))) is None
    assert split(plan_of(execbox.SandboxSpec(str(tmp_path), root_writable=True,
                                             idmap=False))) is None


def _ready_cgroups() -> set[str]:
    from conftest import session_cgroups

    return set(session_cgroups(ready=True))


def test_a_ready_cgroup_is_removed_when_its_caller_goes() -> None:
    """The cgroup an idle supervisor made ahead for its ready pid 1 is not a step's: it goes
    with that pid 1 when the caller (and so the fork server) goes."""
    import subprocess
    import sys

    from conftest import cgroups_writable

    if not cgroups_writable():
        pytest.skip("no writable cgroups here")
    code = ("import execbox, time\n"
            "for _ in range(3):\n"
            "    assert execbox.run(['true'], sandbox=execbox.SandboxSpec()).exit_code == 0\n"
            "time.sleep(0.5)\n"
            "from execbox.cgroups.host import detect\n"
            "from execbox.cgroups.stale import READY_PREFIX\n"
            "import os\n"
            "host = detect()\n"
            "parents = set(host.v1.values()) | ({host.unified} if host.unified else set())\n"
            "print(any(n.startswith(READY_PREFIX) for p in parents for n in os.listdir(p)))\n")
    before = _ready_cgroups()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True", "no ready cgroup was made while it ran"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _ready_cgroups() - before:
        time.sleep(0.05)
    assert not _ready_cgroups() - before, _ready_cgroups() - before


def test_a_killed_idle_supervisors_ready_cgroup_is_removed() -> None:
    from conftest import cgroups_writable
    from execbox.server.client import default_server
    from execbox.supervise.proctree import comm_of, descendants

    if not cgroups_writable():
        pytest.skip("no writable cgroups here")
    before = _ready_cgroups()
    for _ in range(3):
        assert execbox.run(["true"], sandbox=execbox.SandboxSpec()).exit_code == 0
    deadline = time.monotonic() + 10
    while not _ready_cgroups() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    made = _ready_cgroups() - before
    assert made, "no supervisor made a ready pid 1's cgroup"
    server = default_server().pid
    assert server is not None
    owners = {int(os.path.basename(d).split("-")[1]) for d in made}
    supervisors = {p for p in descendants(server) if comm_of(p) == "execbox-super"}
    assert owners & supervisors, (owners, supervisors)
    for supervisor in owners & supervisors:
        os.kill(supervisor, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {d for d in _ready_cgroups() - before
                                           if int(os.path.basename(d).split("-")[1]) in owners}:
        time.sleep(0.05)
    assert not {d for d in _ready_cgroups() - before
                if int(os.path.basename(d).split("-")[1]) in owners}
    assert execbox.run(["true"], sandbox=execbox.SandboxSpec()).exit_code == 0


def test_a_job_too_big_to_hand_over_launches_the_usual_way() -> None:
    """The rest of the plan goes to a ready pid 1 in one message; an environment of half a
    megabyte does not fit in one, and the step still runs, with all of it."""
    box = execbox.SandboxSpec()
    for _ in range(3):  # the supervisors now have ready pid 1s
        assert execbox.run(["true"], sandbox=box).exit_code == 0
    env = {"PATH": "/usr/bin:/bin", **{f"BIG{i}": "x" * 100_000 for i in range(5)}}
    result = execbox.run(["sh", "-c", "echo ${#BIG0} ${#BIG4}"], sandbox=box, env=env,
                         stdout=execbox.CAPTURE)
    assert result.exit_code == 0, result.failure
    assert result.stdout == b"100000 100000\n"


def test_a_killed_ready_pid_1_is_survived() -> None:
    """The pid 1 an idle supervisor made ahead (the zygote of its next step) may die while it
    waits: the next step launches the usual way, and its cgroup does not stay behind."""
    from execbox.server.client import default_server
    from execbox.supervise.proctree import descendants

    box = execbox.SandboxSpec()
    before = _ready_cgroups()
    for _ in range(3):
        assert execbox.run(["true"], sandbox=box).exit_code == 0
    server = default_server().pid
    assert server is not None

    def ready_inits() -> list[int]:
        found = []
        for pid in descendants(server):
            try:
                with open(f"/proc/{pid}/status") as f:
                    nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
            except (OSError, StopIteration):
                continue
            if len(nspid) > 1 and nspid[-1] == "1":
                found.append(pid)
        return found

    deadline = time.monotonic() + 10
    while not ready_inits() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = ready_inits()
    assert killed, "no idle supervisor holds a ready pid 1"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    # Each supervisor notices at once: it reaps its pid 1 and removes that pid 1's cgroup.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in killed):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{p}") for p in killed), "a killed pid 1 not reaped"
    # (it removes the cgroup after reaping: give it the time the removal takes)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _empty_new(_ready_cgroups() - before):
        time.sleep(0.05)
    assert not _empty_new(_ready_cgroups() - before), "an empty ready cgroup"
    for _ in range(4):
        result = execbox.run(["sh", "-c", "echo ok"], sandbox=box, stdout=execbox.CAPTURE)
        assert result.exit_code == 0 and result.stdout == b"ok\n", result.failure


def _empty_new(cgroups: set[str]) -> set[str]:
    return {d for d in cgroups if not _procs(d)}


def _procs(directory: str) -> list[str]:
    try:
        with open(f"{directory}/cgroup.procs") as f:
            return f.read().split()
    except OSError:
        return []


def _mount_namespaces_held() -> set[str]:
    return {target for target in fd_targets().values() if target.startswith("mnt:[")}


def _processes_in(namespace: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                found.append(int(entry))
        except OSError:
            continue
    return found


def test_a_sandboxs_mount_namespace_is_freed_only_after_its_result(tmp_path: Path) -> None:
    """The supervisor keeps the finished sandbox's mount namespace (no process left in it)
    until the Result is sent, so the caller does not wait for the kernel to free the mount
    tree; release() then frees it, and nothing else is kept."""
    from execbox.model.options import build_spec
    from execbox.plan.build import build_plan
    from execbox.supervise.supervision import Supervision

    spec = build_spec(["sleep", "0.2"], sandbox=execbox.SandboxSpec(), cwd=str(tmp_path))
    before = _mount_namespaces_held()
    supervision = Supervision(spec, build_plan(spec, [[1, 1], [2, 2]]),
                              defer_teardown=True)
    assert supervision.start() is not None, supervision.failure
    result = supervision.run()
    assert result.exit_code == 0, result.failure
    kept = _mount_namespaces_held() - before
    assert len(kept) == 1 and kept != {os.readlink("/proc/self/ns/mnt")}
    assert not _processes_in(kept.pop())
    supervision.release()
    assert _mount_namespaces_held() == before



@pytest.mark.skipif(not cgroups_writable(), reason="no writable pids cgroup here")
def test_a_native_pid_1s_cgroup_goes_without_a_kill_walk_once_pid_1_has_ended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A native pid 1's exit ends every process of its namespace, so the step cgroup is
    empty then: its statistics are read and its directories removed with no kill walk
    (the kernel's rmdir refuses a cgroup that is not empty). An orphan left running by
    the step goes all the same, and nothing of the cgroup stays."""
    from execbox.cgroups.step import StepCgroup
    from execbox.linux import native_init
    from execbox.model.options import build_spec
    from execbox.plan.build import build_plan
    from execbox.supervise.supervision import Supervision

    if not native_init.available():
        pytest.skip("no native pid 1 here")
    walks: list[str] = []
    kill_all = StepCgroup.kill_all

    def counted(self: StepCgroup, *args: object, **kwargs: object) -> set[int]:
        walks.extend(self.directories())
        return kill_all(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StepCgroup, "kill_all", counted)
    before = session_cgroups()
    spec = build_spec(["/bin/sh", "-c", "sleep 30 & sleep 30 & echo $! > pid"],
                      sandbox=execbox.SandboxSpec(), cwd=str(tmp_path), pids=64)
    supervision = Supervision(spec, build_plan(spec, [[1, 1], [2, 2]]), scoped=True)
    assert supervision.start() is not None, supervision.failure
    assert supervision.cgroup is not None
    directories = supervision.cgroup.directories()
    result = supervision.run()
    assert result.exit_code == 0, result.failure
    assert not result.cleanup_errors and not result.unkillable
    assert result.usage.cgroup_cpu_time is not None and result.usage.cgroup_cpu_time > 0
    assert walks == []
    assert not any(os.path.exists(d) for d in directories)
    assert session_cgroups() == before



@pytest.mark.skipif(not cgroups_writable(), reason="no writable pids cgroup here")
def test_a_cgroup_that_outlives_its_pid_1_is_killed_and_its_statistics_read_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process put into one of the step cgroup's directories from outside keeps that
    directory when pid 1 has ended: the usual kill takes it, and the statistics are read
    again after that kill (a directory removed before keeps what was read before)."""
    import subprocess

    from execbox.cgroups.step import StepCgroup
    from execbox.linux import native_init
    from execbox.model.options import build_spec
    from execbox.plan.build import build_plan
    from execbox.supervise.supervision import Supervision

    if not native_init.available():
        pytest.skip("no native pid 1 here")
    readings: list[dict[str, object]] = []
    stats = StepCgroup.stats

    def counted(self: StepCgroup) -> dict[str, object]:
        reading = stats(self)
        reading["cgroup_cpu_time"] = float(len(readings) + 1)  # which reading it was
        readings.append(reading)
        return reading

    monkeypatch.setattr(StepCgroup, "stats", counted)
    spec = build_spec(["sleep", "0.3"], sandbox=execbox.SandboxSpec(), cwd=str(tmp_path),
                      pids=64)
    supervision = Supervision(spec, build_plan(spec, [[1, 1], [2, 2]]), scoped=True)
    assert supervision.start() is not None, supervision.failure
    assert supervision.cgroup is not None
    directories = supervision.cgroup.directories()
    intruder = subprocess.Popen(["sleep", "60"])
    try:
        with open(f"{directories[0]}/cgroup.procs", "w") as procs:
            procs.write(str(intruder.pid))
        result = supervision.run()
        assert intruder.wait(timeout=10) == -9
    finally:
        if intruder.poll() is None:
            intruder.kill()
            intruder.wait()
    assert result.exit_code == 0, result.failure
    assert not result.cleanup_errors
    assert len(readings) == 2 and result.usage.cgroup_cpu_time == 2.0
    assert not any(os.path.exists(d) for d in directories)


# Acts as an idle supervisor (a child subreaper holding a ready pid 1) and runs jobs through
# the fork server's own run_job.
MIXED_SCRIPT = r"""
import json, os, signal, socket, sys
from execbox.linux.syscalls import set_child_subreaper
from execbox.model import wire
from execbox.model.options import build_spec
from execbox.model.sandbox import SandboxSpec
from execbox.plan.build import build_plan
from execbox.server.forkserver import run_job
from execbox.spawn import ready
from execbox.supervise.proctree import processes_with

signal.signal(signal.SIGCHLD, signal.SIG_DFL)
set_child_subreaper()
mode, cwd, marker = sys.argv[1], sys.argv[2], sys.argv[3]

def job(argv, prepared, **options):
    spec = build_spec(argv, cwd=cwd, **options)
    ours, theirs = socket.socketpair()
    wire.send(ours, {"spec": spec.to_wire(), "fds": [[0, 1], [1, 2]]})
    null = os.open(os.devnull, os.O_RDWR)
    _, kept = run_job(theirs, [null, os.dup(null)], prepared)
    theirs.close()
    ours.shutdown(socket.SHUT_WR)
    reader, data = wire.FrameReader(), b""
    while chunk := ours.recv(65536):
        data += chunk
    messages = dict((m[0], m[1:]) for m in reader.feed(data))
    return messages["started"][0], messages["result"][0], kept

box = SandboxSpec()
template = build_plan(build_spec(["true"], sandbox=box, cwd=cwd), [[1, 1], [2, 2]])
prepared = ready.prepare(template)
report = {"ready": prepared.pid}
if mode == "kept":
    # A plain step that leaves an orphan behind: the end-of-step kill walk must pass the
    # ready pid 1 by, and must not wait for it either. (The ready pid 1, a fork of this
    # script, has the marker in its command line too.)
    _, plain, kept = job(["sh", "-c", f"setsid sh -c 'sleep 300; : {marker}' & exit 3"],
                         prepared)
    report.update(plain_exit=plain["exit_code"], unkillable=plain["unkillable"],
                  kept=kept is prepared, alive=os.path.exists(f"/proc/{prepared.pid}"),
                  usable=kept is not None and kept.usable(),
                  orphans=[p for p in processes_with(marker) if p not in prepared.pids()])
    pid, boxed, _ = job(["sh", "-c", "exit 4"], kept, sandbox=box)
    report.update(sandboxed_pid=pid, sandboxed_exit=boxed["exit_code"])
elif mode == "old":
    # Its mount namespace is a copy of the host's from when it was made: past MAX_AGE it
    # is not handed a step, which launches the usual way.
    prepared.made_at -= ready.MAX_AGE + 1
    pid, boxed, _ = job(["sh", "-c", "exit 4"], prepared, sandbox=box)
    report.update(sandboxed_pid=pid, sandboxed_exit=boxed["exit_code"],
                  alive=os.path.exists(f"/proc/{prepared.pid}"))
elif mode == "planted":
    # A root plain step enters the kept pid 1's pid namespace and leaves a process there:
    # reparented to that pid 1, below which the step's kill walks never go.
    plant = (f"nsenter -t {prepared.pid} -p -- sh -c \"sh -c 'sleep 300; : {marker}' & "
             "exit 0\"; exit 3")
    _, plain, kept = job(["sh", "-c", plant], prepared)
    report.update(plain_exit=plain["exit_code"], kept=kept is not None,
                  orphans=[p for p in processes_with(marker) if p not in prepared.pids()],
                  alive=os.path.exists(f"/proc/{prepared.pid}"))
else:  # the ready pid 1 dies while a plain step runs; the step's reaper reaps it
    signalled, real_kill = [], os.kill
    def watching_kill(pid, sig):  # its pid may name another process by then
        if pid == prepared.pid:
            signalled.append(sig)
        real_kill(pid, sig)
    os.kill = watching_kill
    _, plain, kept = job(["sh", "-c", f"kill -9 {prepared.pid}; sleep 0.2; exit 3"],
                         prepared)
    report.update(plain_exit=plain["exit_code"], kept=kept is not None,
                  reaped=prepared.pid in prepared.reaped, unkillable=plain["unkillable"],
                  signalled=signalled,
                  cgroup_left=prepared.cgroup is not None,
                  init_left=bool(prepared.init) and os.path.exists(f"/proc/{prepared.init}"))
print(json.dumps(report))
"""


def _mixed_run(mode: str, cwd: Path, marker: str) -> dict[str, object]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MIXED_SCRIPT, mode, str(cwd), marker],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_a_plain_step_leaves_the_ready_pid_1_for_the_next_sandboxed_step(
        tmp_path: Path, marker: str) -> None:
    report = _mixed_run("kept", tmp_path, marker)
    assert report["plain_exit"] == 3 and report["unkillable"] == [], report
    assert report["orphans"] == [], report  # the plain step's own orphan was killed
    assert report["kept"] and report["alive"] and report["usable"], report
    assert report["sandboxed_pid"] == report["ready"], report  # adopted after all
    assert report["sandboxed_exit"] == 4, report


def test_a_process_a_plain_step_plants_in_a_kept_pid_1s_namespace_goes_with_it(
        tmp_path: Path, marker: str) -> None:
    """A root plain step can setns into the pid namespace of the ready pid 1 its supervisor
    keeps: what it leaves there must not outlive the step, nor be adopted by the next
    sandboxed step (whose pid 1 that is)."""
    if shutil.which("nsenter") is None:
        pytest.skip("needs nsenter (util-linux)")
    report = _mixed_run("planted", tmp_path, marker)
    assert report["plain_exit"] == 3, report
    assert report["orphans"] == [], report  # gone before the Result
    assert not report["kept"] and not report["alive"], report


def test_a_ready_pid_1_too_old_to_trust_its_view_of_the_host_is_not_adopted(
        tmp_path: Path, marker: str) -> None:
    report = _mixed_run("old", tmp_path, marker)
    assert report["sandboxed_exit"] == 4, report
    assert report["sandboxed_pid"] != report["ready"] and not report["alive"], report


def test_a_ready_pid_1_that_dies_during_a_plain_step_is_forgotten_not_signalled(
        tmp_path: Path, marker: str) -> None:
    report = _mixed_run("dies", tmp_path, marker)
    assert report["plain_exit"] == 3 and report["unkillable"] == [], report
    assert not report["kept"] and report["reaped"] and report["signalled"] == [], report
    assert not report["cgroup_left"], report  # its cgroup went with it
    assert not report["init_left"], report  # and a native pid 1 beside it


def test_a_timeout_during_pid_1s_setup_still_ends_the_step_with_the_cancel_signal(
        tmp_path: Path) -> None:
    """A timeout (or cancel) that fires while a sandbox's pid 1 is being set up: its signal
    reaches pid 1 before pid 1 has handlers, and a namespace's init drops a signal it has
    no handler for. It must still end the step with SIGTERM, not wait for the grace's
    SIGKILL."""
    for _ in range(20):
        result = execbox.run(["sleep", "30"], sandbox=execbox.SandboxSpec(), cwd=tmp_path,
                             timeout=0.001, grace=10)
        assert result.timed_out, result
        assert result.signal == "SIGTERM" and result.exit_code == 143, result


def test_the_python_pid_1_serves_where_no_native_one_can() -> None:
    """Where linux/native_init.py has no code (or cannot map it), a Python pid 1 serves:
    this file's and the sandbox tests run again on that path."""
    import subprocess
    import sys

    if os.environ.get("EXECBOX_NATIVE_INIT") == "off":
        pytest.skip("this is that run")
    here = Path(__file__).resolve().parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(here / "test_sandbox_launch.py"), str(here / "test_sandbox.py"),
         "-k", "not thousand_runs"],
        env={**os.environ, "EXECBOX_NATIVE_INIT": "off"}, capture_output=True, text=True,
        timeout=600, check=False, cwd=here.parent)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
