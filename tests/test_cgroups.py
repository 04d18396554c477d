"""Per-step cgroups: memory and pids limits, OOM reporting, the final kill, cleanup."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

import execbox
from conftest import (
    DriftRecorder,
    cgroups_writable,
    describe_step_cgroup,
    processes_with,
    run_cli,
    session_cgroups,
)
from execbox.cgroups.host import detect
from execbox.cgroups.step import PREFIX, StepCgroup

# Only what needs a cgroup is skipped without one: limit and rule validation always runs.
needs_cgroup = pytest.mark.skipif(not cgroups_writable(), reason="no writable pids cgroup here")


def _ours() -> list[str]:
    """execbox cgroups below this process's own cgroups, for every controller (not another
    execbox user's on the same host)."""
    return [describe_step_cgroup(path) for path in session_cgroups()]


@needs_cgroup
def test_memory_limit_reports_oom(tmp_path: Path) -> None:
    if detect().directory_for("memory") is None:
        pytest.skip("no memory controller available")
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--memory", "64M", "--result", str(result_file), "--", "python3",
                   "-c", "x = bytearray(256 * 1024 * 1024); print('survived')")
    data = json.loads(result_file.read_text())
    assert proc.returncode == 137 and b"survived" not in proc.stdout
    assert data["oom_killed"] is True and data["signal"] == "SIGKILL"
    assert data["usage"]["cgroup_peak_memory"] <= 64 * 1024 * 1024
    assert _ours() == []


@needs_cgroup
def test_within_limits_is_not_oom() -> None:
    result = execbox.run(["python3", "-c", "x = bytearray(8 << 20)"], memory="128M", pids=64)
    assert result.exit_code == 0 and not result.oom_killed
    assert result.usage.cgroup_cpu_time is not None and result.usage.cgroup_cpu_time > 0


@needs_cgroup
def test_pids_limit_stops_a_fork_bomb(marker: str) -> None:
    result = execbox.run(["sh", "-c", f"bomb() {{ bomb | bomb & }}; bomb; sleep 1 # {marker}"],
                         pids=32, timeout=20, grace=0.5, stderr=execbox.CAPTURE)
    assert not result.timed_out
    assert result.stderr is not None and b"fork" in result.stderr.lower()  # the limit held
    assert processes_with(marker) == []
    assert _ours() == []


@needs_cgroup
def test_sandboxed_step_with_limits(tmp_path: Path) -> None:
    result = execbox.run(["sh", "-c", "cat /proc/self/cgroup | head -3"],
                         sandbox=execbox.SandboxSpec(), pids=50, cwd=tmp_path,
                         stdout=execbox.CAPTURE)
    assert result.exit_code == 0, result.failure
    assert result.stdout is not None and b":/" in result.stdout  # its own cgroup namespace


@needs_cgroup
def test_thousand_limited_steps_leave_no_cgroup() -> None:
    for _ in range(1000):
        assert execbox.run(["true"], pids=16).exit_code == 0
    assert _ours() == []


@needs_cgroup
def test_stale_cgroups_are_removed_at_next_start() -> None:
    host = detect()
    found = host.directory_for("pids")
    assert found is not None
    stale = f"{found[1]}/{PREFIX}999999999-0"  # no such creator pid
    os.mkdir(stale)
    StepCgroup.create(None, 8, None).remove()
    assert not os.path.exists(stale)


def test_bad_limits_name_the_field() -> None:
    for kwargs, field in [({"memory": "lots"}, "memory"), ({"pids": 0}, "pids"),
                          ({"cpus": -1}, "cpus")]:
        with pytest.raises(execbox.SpecError) as info:
            execbox.run(["true"], **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
    proc = run_cli("run", "--memory", "12Q", "--", "true")
    assert proc.returncode == 125 and b"memory" in proc.stderr


@needs_cgroup
@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_device_allowlist_is_enforced(mode: str) -> None:
    host = detect()
    if mode == "v1" and "devices" not in host.v1:
        pytest.skip("no v1 devices controller")
    if mode == "v2" and host.unified is None:
        pytest.skip("no cgroup2 hierarchy")
    result = execbox.run(["sh", "-c", "echo > /dev/null && echo null-ok; "
                          "head -c1 /dev/zero > /dev/null 2>/tmp/execbox-zero-$$ "
                          "|| cat /tmp/execbox-zero-$$; rm -f /tmp/execbox-zero-$$"],
                         devices=["c 1:3 rwm"], device_mode=mode, stdout=execbox.CAPTURE)
    assert result.exit_code == 0, result.failure
    assert result.stdout is not None
    out = result.stdout.decode()
    assert out.startswith("null-ok\n") and "Operation not permitted" in out
    assert _ours() == []


@needs_cgroup
def test_default_rules_allow_the_usual_devices() -> None:
    from execbox.cgroups.devices import DEFAULT_RULES

    result = execbox.run(["sh", "-c", "head -c4 /dev/urandom | wc -c; head -c2 /dev/zero | "
                          "wc -c; echo > /dev/full 2>/dev/null || echo full-enospc"],
                         devices=list(DEFAULT_RULES), stdout=execbox.CAPTURE)
    assert result.exit_code == 0, result.failure
    assert result.stdout == b"4\n2\nfull-enospc\n"


@needs_cgroup
def test_policy_that_is_not_in_force_is_a_setup_failure(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from execbox.cgroups import devices

    if "devices" not in detect().v1:
        pytest.skip("no v1 devices controller")
    monkeypatch.setattr(devices, "program_v1", lambda directory, rules: None)  # a no-op
    from execbox.cgroups.step import CgroupError

    with pytest.raises(CgroupError) as info:
        StepCgroup.create(None, None, None, devices=["c 1:3 rwm"], device_mode="v1")
    assert "/dev/zero (c 1:5) is denied but opened" in str(info.value)
    assert _ours() == []


@needs_cgroup
def test_cli_device_option_and_bad_rule(tmp_path: Path) -> None:
    proc = run_cli("run", "--device", "c 1:11 r", "--", "sh", "-c", "echo ok > /dev/null")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", "--device", "x 1:3 rwm", "--", "true")
    assert proc.returncode == 125 and b"device" in proc.stderr


@needs_cgroup
@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_device_policy_drift_is_reported(mode: str, tmp_path: Path) -> None:
    host = detect()
    if os.geteuid() != 0 or (mode == "v1" and "devices" not in host.v1) or (
            mode == "v2" and host.unified is None):
        pytest.skip(f"needs root and {mode} device control")

    from execbox.cgroups.devices import DEFAULT_RULES
    from execbox.linux import bpf

    on_drift = DriftRecorder()
    reported, seen = on_drift.reported, on_drift.seen

    box = execbox.SandboxSpec()
    with execbox.Sandbox(box, cwd=str(tmp_path), devices=list(DEFAULT_RULES),
                         device_mode=mode, watch_interval=0.2, on_drift=on_drift) as sb:
        ok = sb.run(["sh", "-c", "echo > /dev/null && echo fine"], stdout=execbox.CAPTURE)
        assert ok.stdout == b"fine\n", ok.failure
        if mode == "v2":
            stricter = bpf.load_device_program(bpf.device_program([("c", 1, 5, "rwm")]))
            bpf.attach(sb.cgroup_dirs["unified"], stricter)
            os.close(stricter)
            new_id = max(bpf.attached_programs(sb.cgroup_dirs["unified"]))
        else:
            with open(f"{sb.cgroup_dirs['devices']}/devices.deny", "w") as f:
                f.write("c 1:3 rwm")
        assert seen.wait(10), "the watchdog did not notice"
        assert "/dev/null" in reported[0]
        if mode == "v2":
            assert f"id {new_id}" in reported[0]
        after = sb.run(["sh", "-c", "echo > /dev/null"])
        assert after.exit_code == 125 and after.failure is not None
        assert after.failure.step == "devices" and "/dev/null" in after.failure.message
    assert _ours() == []


@needs_cgroup
@pytest.mark.skipif(os.geteuid() != 0, reason="default device rules apply to a root caller")
def test_sandbox_gets_the_default_device_rules(tmp_path: Path) -> None:
    host_mnt = os.readlink("/proc/self/ns/mnt")
    guard = f'[ "$(readlink /proc/self/ns/mnt)" != "{host_mnt}" ] || exit 99; '
    # A bind of the node itself is refused up front (the rules do not allow it), so the
    # host's whole /dev is bound, which is never checked node by node: the cgroup refuses.
    box = execbox.SandboxSpec(dev_binds=[("/dev", "/hostdev")])
    result = execbox.run(["sh", "-c", guard + "echo > /dev/null && echo null-ok; "
                          "test -c /hostdev/kmsg || echo no-node; "
                          "(exec 3</hostdev/kmsg) 2>/dev/null || echo kmsg-denied"],
                         sandbox=box, cwd=tmp_path, stdout=execbox.CAPTURE, timeout=60)
    assert result.exit_code == 0, result.failure
    assert result.stdout == b"null-ok\nkmsg-denied\n"
    assert _ours() == []


@needs_cgroup
def test_step_refuses_to_run_when_the_policy_is_not_in_force() -> None:
    if "devices" not in detect().v1:
        pytest.skip("no v1 devices controller")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import json
        from execbox.cgroups import devices
        from execbox.plan.build import build_plan
        from execbox.model.spec import make_spec
        from execbox.supervise.supervision import Supervision

        devices.program_v1 = lambda directory, rules: None  # the rules silently not applied
        spec = make_spec(["/bin/true"], env={}, devices=["c 1:3 rwm"], device_mode="v1")
        supervision = Supervision(spec, build_plan(spec, [[0, 0], [1, 1], [2, 2]]))
        supervision.start()
        print(json.dumps(supervision.run().to_dict()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["exit_code"] == 125 and result["failure"]["step"] == "devices"
    assert "/dev/zero (c 1:5) is denied but opened" in result["failure"]["message"]
    assert _ours() == []


def test_device_rules_are_validated() -> None:
    for rule in ("a 1:3 r", "c 4096:1 r", "c 1:1048576 r", "c 1:3 rx", "z 1:3 r", "c ²:1 r",
                 "c " + "9" * 5000 + ":1 r"):
        with pytest.raises(execbox.SpecError):
            execbox.run(["true"], devices=[rule])
    proc = run_cli("run", "--device", "c 99999:1 r", "--", "true")
    assert proc.returncode == 125 and b"--device" in proc.stderr


@needs_cgroup
def test_out_of_range_limit_is_not_called_a_delegation_problem() -> None:
    from execbox.cgroups.step import CgroupError

    with pytest.raises(CgroupError) as info:
        StepCgroup.create(None, 2**63, None)
    assert info.value.errno in (errno.ERANGE, errno.EINVAL)
    assert "out of range" in str(info.value) and "not delegated" not in str(info.value)
    proc = run_cli("run", "--pids", str(2**63), "--", "true")
    assert proc.returncode == 125 and b"out of range" in proc.stderr
    assert _ours() == []


def test_stale_names_survive_pid_reuse() -> None:
    from execbox.cgroups.stale import is_stale, new_name, start_time

    mine = start_time(os.getpid())
    assert mine is not None and not is_stale(new_name())
    assert is_stale(f"{PREFIX}{os.getpid()}-{mine + 1}-0")  # same pid, another process
    assert is_stale(f"{PREFIX}999999999-{mine}-0")
    assert not is_stale(f"{PREFIX}leaf") and not is_stale("user.slice")


@needs_cgroup
def test_stale_cgroup_processes_are_killed(marker: str) -> None:
    """Every execbox process SIGKILLed mid-step (the guard and its supervisor at once): the
    next start kills what they left and removes the cgroup."""
    import signal
    import subprocess
    import time

    from conftest import CLI
    from execbox.cgroups.step import remove_stale_of

    cli = subprocess.Popen([*CLI, "run", "--pids", "16", "--", "sh", "-c",
                            f"(setsid sleep 600 &); sleep 600 # {marker}"])
    deadline = time.monotonic() + 30
    while not (_ours() and processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _ours() and processes_with(marker)
    from execbox.supervise.proctree import children

    (supervisor,) = children(cli.pid)
    execbox_processes = {cli.pid, supervisor}  # their argv holds the marker too
    until = time.monotonic() + 60
    while not (tree := [p for p in processes_with(marker) if p not in execbox_processes]):
        assert time.monotonic() < until, "the step never started"
        time.sleep(0.02)
    for pid in (cli.pid, supervisor):  # stopped first, so neither can clean up
        os.kill(pid, signal.SIGSTOP)
    for pid in (cli.pid, supervisor):
        os.kill(pid, signal.SIGKILL)
    cli.wait()
    _reap(supervisor)
    left = [pid for pid in tree if os.path.exists(f"/proc/{pid}")]
    assert left  # still running inside the stale cgroup: nothing of execbox cleaned up
    try:
        problems = remove_stale_of(supervisor)  # kills what is inside, then removes it
        until = time.monotonic() + 30
        while problems and time.monotonic() < until:  # busy until init reaps the killed
            time.sleep(0.1)
            problems = remove_stale_of(supervisor)
        assert problems == []
        assert processes_with(marker) == [] and _ours() == []
    finally:
        for pid in tree:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


@needs_cgroup
def test_remove_reports_nothing_when_all_is_well() -> None:
    group = StepCgroup.create(None, 8, None)
    assert group.kill_all() == set()
    assert group.remove() == []



@needs_cgroup
def test_remove_empty_removes_only_what_holds_no_process() -> None:
    """remove_empty relies on the kernel's rmdir refusing a cgroup with a process in it:
    with one inside, every directory stays (kill_all and remove then take them); empty,
    all go."""
    import subprocess

    group = StepCgroup.create(None, 8, None)
    directories = group.directories()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for path in group.procs_files():
            Path(path).write_text(str(sleeper.pid))
        assert group.remove_empty() is False
        assert group.directories() == directories
        assert all(os.path.isdir(d) for d in directories)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert group.remove_empty() is True
    assert group.directories() == []
    assert not any(os.path.exists(d) for d in directories)
    assert _ours() == []

@needs_cgroup
def test_a_step_cgroup_that_would_not_go_is_retried_by_its_creator() -> None:
    """A removal that fails (a process still inside) leaves the cgroup to its creator, which
    is alive, so no stale sweep takes it: retry_left_behind must (a long-lived supervisor
    calls it between jobs and before it exits)."""
    import subprocess

    from execbox.cgroups import step

    group = StepCgroup.create(None, 8, None)
    procs = group.procs_files()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for path in procs:
            Path(path).write_text(str(sleeper.pid))
        directories = group.directories()
        # survivors=set(): as after a kill that already ran; the sleeper is not killed here.
        left = group.remove(survivors=set(), timeout=0.2)
        assert left and all(os.path.isdir(d) for d in directories)
        assert step.retry_left_behind() is False  # still busy: kept for the next try
        assert _ours() != []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert step.retry_left_behind(timeout=10) is True
    assert not any(os.path.exists(d) for d in directories)
    assert _ours() == []


def _reap(pid: int) -> None:
    """Wait until pid is dead: reaped here when it came to us, else gone or a zombie."""
    try:
        os.waitpid(pid, 0)
        return
    except ChildProcessError:
        pass
    until = time.monotonic() + 30
    while time.monotonic() < until:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                if stat.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return
        except OSError:
            return
        time.sleep(0.02)


@needs_cgroup
def test_device_verification_is_cached_per_policy_and_parent_state() -> None:
    """A policy proven in force is not probed again for the next step cgroup programmed
    the same way below a parent in the same state; a changed parent (a systemd
    daemon-reload rewriting its list) or another policy is probed again."""
    if "devices" not in detect().v1:
        pytest.skip("no v1 devices controller")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import json
        from execbox.cgroups import devices
        from execbox.plan.build import build_plan
        from execbox.model.spec import make_spec
        from execbox.supervise.supervision import Supervision

        states = iter(["gen-1", "gen-1", "gen-2", "gen-2", "gen-2"])
        devices.generation = lambda version, directory: next(states)
        probed = []
        for rules in (["c 1:3 rwm"], ["c 1:3 rwm"], ["c 1:3 rwm"], ["c 1:3 rwm"],
                      ["c 1:3 rwm", "c 1:5 rwm"]):
            spec = make_spec(["/bin/true"], env={}, devices=rules, device_mode="v1")
            supervision = Supervision(spec, build_plan(spec, [[0, 0], [1, 1], [2, 2]]))
            supervision.start()
            assert supervision.run().exit_code == 0
            probed.append("verify_devices" in [name for name, _ in supervision.plan.child])
        print(json.dumps(probed))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == [True, False, True, False, True]
    assert _ours() == []


@needs_cgroup
def test_a_sandbox_made_ahead_uses_the_same_device_proof_cache(tmp_path: Path) -> None:
    """A ready pid 1 (spawn/ready.py) proves its cgroup's device policy only where no cgroup
    programmed the same way below a parent in the same state has; a proof it makes counts
    for the next, and a changed parent state is proven again."""
    if "devices" not in detect().v1 or os.geteuid() != 0:
        pytest.skip("needs a root caller's sandbox and a v1 devices controller")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import json
        from execbox.cgroups import devices
        from execbox.model.options import build_spec
        from execbox.model.sandbox import SandboxSpec
        from execbox.plan.build import build_plan
        from execbox.spawn import ready

        state = ["gen-1"]
        devices.generation = lambda version, directory: state[0]
        spec = build_spec(["/bin/true"], sandbox=SandboxSpec(), cwd=WORKDIR)
        profile = ready.profile_of(build_plan(spec, [[1, 1], [2, 2]]))
        probed = []
        for generation in ("gen-1", "gen-1", "gen-2", "gen-2"):
            state[0] = generation
            made = ready.prepare(profile)
            probed.append(made.proving is not None)
            assert made.wait_built(30)
            made.discard()
        print(json.dumps(probed))
    """).replace("WORKDIR", repr(str(tmp_path)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == [True, False, True, False]
    assert _ours() == []


def _own_directory(root: str, controller: str | None) -> str | None:
    """This process's cgroup directory in the hierarchy of controller (None: cgroup2)."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or controller in controllers.split(","):
            directory = f"{root}{path}".rstrip("/")
            return directory if os.path.isdir(directory) else None
    return None


def test_a_forked_child_joins_a_v1_cgroup_through_its_tasks_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread group's move takes the kernel's global threadgroup lock, whose first writer
    after a quiet spell waits out an RCU grace period (8 to 15 ms on small machines); a
    forked child (one thread) moving itself through a v1 tasks file does not. cgroup2 has
    no tasks file, and a file named tasks that is no cgroup's is never opened for it:
    cgroup.procs serves. (Files are only opened here, never written.)"""
    from execbox.child.process import open_join_file

    notes = tmp_path / "tasks"  # a user's file beside a join_cgroup path that is no cgroup
    notes.write_text("my notes")
    cases = [(tmp_path / "cgroup.procs", tmp_path / "cgroup.procs")]
    (tmp_path / "cgroup.procs").write_text("")
    v1 = _own_directory("/sys/fs/cgroup/pids", "pids")
    if v1 is not None and os.path.exists(f"{v1}/tasks"):
        cases.append((Path(v1) / "cgroup.procs", Path(v1) / "tasks"))
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        v2 = _own_directory(root, None)
        if v2 is not None and os.path.exists(f"{v2}/cgroup.controllers"):
            cases.append((Path(v2) / "cgroup.procs", Path(v2) / "cgroup.procs"))
            break
    if v1 is None and len(cases) == 1:
        pytest.skip("no cgroup hierarchy of this process to open")
    for procs, joined in cases:
        fd, path = open_join_file(str(procs))
        try:
            assert path == str(joined) and os.readlink(f"/proc/self/fd/{fd}") == str(joined)
        finally:
            os.close(fd)
    assert notes.read_text() == "my notes"
    if v1 is not None and os.path.exists(f"{v1}/tasks"):
        real_open = os.open

        def refusing_tasks(path: str, flags: int, mode: int = 0o777) -> int:
            if path == f"{v1}/tasks":  # a v1 delegation that chowned only cgroup.procs
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_open(path, flags, mode)

        monkeypatch.setattr(os, "open", refusing_tasks)
        fd, path = open_join_file(f"{v1}/cgroup.procs")
        os.close(fd)
        assert path == f"{v1}/cgroup.procs"


def test_a_join_cgroup_path_that_is_no_cgroup_fails_and_touches_nothing(tmp_path: Path
                                                                      ) -> None:
    """join_cgroup names a cgroup.procs to join: a directory that is no cgroup, even with a
    file named tasks in it, fails the step's cgroup step and leaves that file alone."""
    notes = tmp_path / "tasks"
    notes.write_text("my notes")
    result = execbox.run(["/bin/true"], join_cgroup=[f"{tmp_path}/cgroup.procs"])
    assert result.exit_code == 125 and result.failure is not None
    assert result.failure.step == "cgroup" and result.failure.errno == "ENOENT"
    assert f"{tmp_path}/cgroup.procs" in result.failure.message
    assert notes.read_text() == "my notes"


@needs_cgroup
@pytest.mark.parametrize("sandboxed", [False, True])
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no /usr/bin/python3")
def test_every_thread_of_a_limited_step_is_in_its_cgroup(tmp_path: Path, sandboxed: bool
                                                         ) -> None:
    """Joined thread by thread on v1: the step's process and the threads it starts are all
    in the step's cgroup in every hierarchy."""
    code = ("import os, threading; e = threading.Event(); "
            "ts = [threading.Thread(target=e.wait) for _ in range(3)]; [t.start() for t in ts]; "
            "tasks = os.listdir('/proc/self/task'); "
            "views = {open(f'/proc/self/task/{t}/cgroup').read() for t in tasks}; "
            "e.set(); print(len(views), len(tasks))")
    options: dict[str, object] = {"pids": 40, "stdout": execbox.CAPTURE}
    if sandboxed:
        options.update(sandbox=execbox.SandboxSpec(), cwd=tmp_path)
    result = execbox.run(["/usr/bin/python3", "-c", code], **options)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.failure
    assert result.stdout is not None and result.stdout.split() == [b"1", b"4"]


@needs_cgroup
def test_v1_device_rules_go_in_one_write_each_on_one_open_file(monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The v1 devices controller takes a rule per write: the whole allowlist is in force
    after one open of devices.allow, in order, and the parsed rules are reused."""
    from conftest import calls_to
    from execbox.cgroups import step
    from execbox.model import devices

    if "devices" not in detect().v1:
        pytest.skip("no v1 devices controller")
    rules = ["c 1:3 rwm", "c 1:5 rw", "c 136:* rwm", "b 8:* m"]
    step._parsed.cache_clear()
    opened = calls_to(monkeypatch, os, "open")
    parsed = calls_to(monkeypatch, devices, "parse_rule")
    for _ in range(2):
        opened.clear()
        group = StepCgroup.create(None, None, None, devices=rules, device_mode="v1",
                                  verify=False)
        directory = group.dirs["devices"][1]
        try:
            listed = Path(f"{directory}/devices.list").read_text().split("\n")
        finally:
            group.remove()
        assert [line for line in listed if line] == rules
        assert [args[0] for args in opened if str(args[0]).endswith("devices.allow")] \
            == [f"{directory}/devices.allow"]
    assert [args[0] for args in parsed] == rules  # parsed for the first cgroup only


def test_where_the_hierarchies_are_is_worked_out_once_per_cgroup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """detect() works out the mounts once for the cgroup this process is in, and again
    for another (a process moved elsewhere); what a cgroup2 parent offers is read each
    time, as it changes when the cgroup above enables a controller."""
    from conftest import calls_to
    from execbox.cgroups import host
    from execbox.linux.forksafe import Recent

    monkeypatch.setattr(host, "_layouts", Recent(entries=8, biggest=1 << 16))
    worked_out = calls_to(monkeypatch, host, "_layout")
    reads = calls_to(monkeypatch, host, "_read")
    first, again = detect(), detect()
    assert len(worked_out) == 1
    assert (first.mode, first.v1, first.unified) == (again.mode, again.v1, again.unified)
    assert first.v1 is not again.v1  # each caller's own
    offers = [args for args in reads if str(args[0]).endswith("/cgroup.controllers")]
    assert len(offers) == (2 if first.unified is not None else 0)
    real = Path("/proc/self/cgroup").read_text()
    moved = "".join(f"{line}/elsewhere\n" for line in real.splitlines())
    monkeypatch.setattr(host, "_read", lambda path: moved if path == "/proc/self/cgroup"
                        else Path(path).read_text())
    elsewhere = detect()
    assert len(worked_out) == 2
    assert all(path.endswith("/elsewhere") for path in elsewhere.v1.values())
    assert elsewhere.v1 or elsewhere.unified  # (a host with no hierarchy at all has neither)
    if first.unified is not None:
        assert elsewhere.unified is not None and elsewhere.unified.endswith("/elsewhere")
