"""cgroup v2 limits, statistics, the final kill, device programs and delegation errors, on a
pure cgroup v2 kernel. Run inside the VM by scripts/vm-cgroup-v2.sh and skipped elsewhere:
these tests make cgroups at the top of the hierarchy and move processes between them,
which is only acceptable on a throw-away machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import execbox
from conftest import CLI, DriftRecorder, describe_step_cgroup, processes_with, run_cli
from execbox.cgroups import delegation
from execbox.cgroups.host import detect
from execbox.cgroups.stale import creator_of, kill_and_remove
from execbox.cgroups.step import CgroupError, StepCgroup

V2 = "/sys/fs/cgroup"
MB = 1024 * 1024
IN_VM = os.environ.get("EXECBOX_IN_VM") == "1"
PURE_V2 = os.path.exists(f"{V2}/cgroup.controllers")

pytestmark = pytest.mark.skipif(
    not (IN_VM and PURE_V2 and os.geteuid() == 0),
    reason="needs the cgroup v2 VM (scripts/vm-cgroup-v2.sh): "
    + ("not a pure cgroup v2 host" if not PURE_V2 else "EXECBOX_IN_VM is not set"))


@pytest.fixture(scope="module", autouse=True)
def _in_leaf() -> None:
    """Like a program embedding execbox in a delegated cgroup: leave it for the leaf, so
    the fork server starts there and pytest is not a foreign process."""
    if IN_VM and PURE_V2:
        delegation.enter_leaf()


@pytest.fixture
def scratch_cgroups() -> Iterator[list[str]]:
    """Top-level cgroups a test makes (append their paths); emptied and removed after."""
    made: list[str] = []
    yield made
    for path in reversed(made):
        if os.path.isdir(path):
            assert kill_and_remove(path) == []


def _join_as(cgroup: str, uid: int | None = None) -> None:
    """preexec_fn: enter cgroup, then become uid (before exec, as a unit's process would)."""
    with open(f"{cgroup}/cgroup.procs", "w") as f:
        f.write("0")
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)


def _ours() -> list[str]:
    base = detect().unified
    assert base is not None
    return [describe_step_cgroup(f"{base}/{n}") for n in os.listdir(base)
            if creator_of(n) is not None]


def _cli_in(cgroup: str, *args: str, uid: int | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """execbox run started directly in cgroup (optionally as uid), like a unit's process."""
    return subprocess.run([*CLI, "run", *args], capture_output=True, timeout=timeout,
                          check=False, preexec_fn=lambda: _join_as(cgroup, uid))


def _mkcg(made: list[str], path: str) -> str:
    os.mkdir(path)
    made.append(path)
    return path


def test_host_is_pure_v2_and_we_are_delegated() -> None:
    host = detect()
    assert host.mode == "v2" and host.unified == f"{V2}/test-delegated"
    assert {"memory", "pids", "cpu"} <= host.unified_controllers
    assert delegation.problem(host.unified, {"memory", "pids", "cpu"}) is None


def test_memory_limit_oom_kills_and_reports(tmp_path: Path) -> None:
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--memory", "64M", "--result", str(result_file), "--", "python3",
                   "-c", "x = bytearray(256 * 1024 * 1024); print('survived')")
    data = json.loads(result_file.read_text())
    assert proc.returncode == 137 and b"survived" not in proc.stdout, proc.stderr
    assert data["oom_killed"] is True and data["signal"] == "SIGKILL"
    peak = data["usage"]["cgroup_peak_memory"]
    assert peak is not None and 8 * MB < peak <= 64 * MB
    assert _ours() == []


def test_peak_memory_and_cpu_time_are_reported() -> None:
    result = execbox.run(["python3", "-c", "x = bytearray(48 << 20); x[::4096] = b'1' * "
                          "len(x[::4096])"], memory="256M", pids=64)
    assert result.exit_code == 0 and not result.oom_killed, result.failure
    peak = result.usage.cgroup_peak_memory
    assert peak is not None and 48 * MB <= peak <= 256 * MB
    assert result.usage.cgroup_cpu_time is not None and result.usage.cgroup_cpu_time > 0


def test_pids_limit_stops_a_fork_bomb(marker: str) -> None:
    result = execbox.run(["sh", "-c", f"bomb() {{ bomb | bomb & }}; bomb; sleep 1 # {marker}"],
                         pids=32, timeout=60, grace=0.5, stderr=execbox.CAPTURE)
    assert not result.timed_out
    assert result.stderr is not None and b"fork" in result.stderr.lower()
    assert processes_with(marker) == []
    assert _ours() == []


def test_cpu_quota_throttles() -> None:
    """A busy loop of 3 s wall time under 0.2 CPUs gets about 0.6 s of CPU; generous bound."""
    busy = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass"
    result = execbox.run(["python3", "-c", busy], cpus=0.2)
    assert result.exit_code == 0, result.failure
    cpu = result.usage.cgroup_cpu_time
    assert cpu is not None and cpu < 0.6 * result.usage.wall_time, (cpu, result.usage)


def test_cgroup_kill_ends_escaped_term_ignoring_processes(marker: str) -> None:
    """setsid + double fork + SIGTERM ignored: only the cgroup still knows them."""
    group = StepCgroup.create(None, 64, None)
    try:
        procs = group.procs_files()[0]
        script = (f"trap '' TERM; (setsid sh -c \"trap '' TERM; sleep 600 # {marker}\" &) ; "
                  f"sleep 600 # {marker}")
        child = subprocess.Popen(
            ["sh", "-c", script], preexec_fn=lambda: Path(procs).write_text("0"))
        # Emulated, on a loaded host, starting (and dying) can take far longer than on
        # hardware: the kill is what is tested here, not its speed.
        # One look is asserted on: the escaped one is read mid-exec now and then (setsid,
        # then sh), when its command line cannot be read.
        began = time.monotonic()
        found = processes_with(marker)
        while len(found) < 2 and time.monotonic() < began + 120:
            time.sleep(0.05)
            found = processes_with(marker)
        assert len(found) >= 2, (
            f"after {time.monotonic() - began:.0f} s: {_in_cgroup(procs)}")
        assert group.kill_all(timeout=60) == set()
        child.wait(60)
        deadline = time.monotonic() + 60
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)  # the escaped one is reaped by whoever it was reparented to
        assert processes_with(marker) == []
        assert group.remove(timeout=60) == []
    finally:  # a failure above must not leave it, nor what is in it, to fail later tests
        group.kill_all(timeout=60)
        group.remove(timeout=60)
    assert _ours() == []


def _in_cgroup(procs: str) -> list[str]:
    """The command lines of the processes in a cgroup, for a failure's message."""
    from execbox.supervise.proctree import command_of

    try:
        pids = Path(procs).read_text().split()
    except OSError as exc:
        return [str(exc)]
    return [f"{pid}: {command_of(pid)}" for pid in pids]


def test_timeout_kills_the_tree_through_the_cgroup(marker: str) -> None:
    script = (f"trap '' TERM; (setsid sh -c \"trap '' TERM; sleep 600 # {marker}\" &); "
              f"sleep 600 # {marker}")
    result = execbox.run(["sh", "-c", script], pids=64, timeout=2, grace=0.5)
    assert result.timed_out
    assert processes_with(marker) == []
    assert _ours() == []


@pytest.mark.parametrize("rules,null_ok", [(["c 1:3 rwm"], True), (["c 1:5 rwm"], False)])
def test_bpf_device_program_allows_and_denies(rules: list[str], null_ok: bool) -> None:
    result = execbox.run(["sh", "-c", "echo > /dev/null && echo null-ok || echo null-denied"],
                         devices=rules, device_mode="v2", stdout=execbox.CAPTURE)
    assert result.exit_code == 0, result.failure
    assert result.stdout == (b"null-ok\n" if null_ok else b"null-denied\n")
    assert _ours() == []


def test_a_second_device_program_is_detected(tmp_path: Path) -> None:

    from execbox.cgroups.devices import DEFAULT_RULES
    from execbox.linux import bpf

    on_drift = DriftRecorder()
    reported, seen = on_drift.reported, on_drift.seen

    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path), devices=list(DEFAULT_RULES),
                         device_mode="v2", watch_interval=0.2, on_drift=on_drift) as sb:
        ok = sb.run(["sh", "-c", "echo > /dev/null && echo fine"], stdout=execbox.CAPTURE)
        assert ok.stdout == b"fine\n", ok.failure
        stricter = bpf.load_device_program(bpf.device_program([("c", 1, 5, "rwm")]))
        bpf.attach(sb.cgroup_dirs["unified"], stricter)
        os.close(stricter)
        new_id = max(bpf.attached_programs(sb.cgroup_dirs["unified"]))
        assert seen.wait(30), "the watchdog did not notice"
        assert "/dev/null" in reported[0] and f"id {new_id}" in reported[0]
    assert _ours() == []


def test_cli_moves_itself_into_a_leaf_to_enable_controllers(scratch_cgroups: list[str]
                                                            ) -> None:
    """A unit with Delegate=yes: execbox (and its parent shell, same family) are the only
    members, so both move into the leaf and the controllers get enabled."""
    unit = _mkcg(scratch_cgroups, f"{V2}/test-unit")
    exe = " ".join(CLI)
    proc = _cli_in(unit, "--", "sh", "-c", f"{exe} run --pids 16 --memory 64M -- "
                   "cat /proc/self/cgroup")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("0::/test-unit/execbox-")
    assert {"memory", "pids"} <= set(Path(f"{unit}/cgroup.subtree_control").read_text().split())
    assert Path(f"{unit}/cgroup.procs").read_text() == ""
    assert [n for n in os.listdir(unit) if os.path.isdir(f"{unit}/{n}")] == ["execbox-leaf"]


def test_foreign_processes_are_not_moved(scratch_cgroups: list[str]) -> None:
    unit = _mkcg(scratch_cgroups, f"{V2}/test-foreign")
    other = subprocess.Popen(["sleep", "600"],
                             preexec_fn=lambda: _join_as(unit))
    try:
        proc = _cli_in(unit, "--pids", "16", "--", "true")
        message = proc.stderr.decode()
        assert proc.returncode == 125, message
        assert f"cgroup v2: {unit} is not delegated to execbox" in message
        assert f"has foreign processes: {other.pid} (sleep)" in message
        assert "Delegate=yes" in message
        assert str(other.pid) in Path(f"{unit}/cgroup.procs").read_text()  # not moved
    finally:
        other.kill()
        other.wait()


def test_unwritable_subtree_control_is_not_delegated(scratch_cgroups: list[str]) -> None:
    """Delegated by halves: the directory and cgroup.procs are nobody's, subtree_control
    is not, so the controllers cannot be enabled."""
    unit = _mkcg(scratch_cgroups, f"{V2}/test-halfdelegated")
    for name in ("", "/cgroup.procs"):
        os.chown(f"{unit}{name}", 65534, 65534)
    os.chmod(f"{unit}/cgroup.procs", 0o664)
    proc = _cli_in(unit, "--pids", "16", "--", "true", uid=65534)
    message = proc.stderr.decode()
    assert proc.returncode == 125, message
    assert (f"cgroup v2: {unit} is not delegated to execbox (cannot write "
            "cgroup.subtree_control: EACCES)") in message
    assert "Delegate=yes" in message


def test_controller_missing_from_the_parent(scratch_cgroups: list[str]) -> None:
    outer = _mkcg(scratch_cgroups, f"{V2}/test-outer")
    inner = _mkcg(scratch_cgroups, f"{outer}/inner")  # outer enables nothing for it
    proc = _cli_in(inner, "--pids", "16", "--", "true")
    message = proc.stderr.decode()
    assert proc.returncode == 125, message
    assert f"{inner} is not delegated to execbox (pids not in its cgroup.controllers)" in message


def test_value_out_of_range_is_not_a_delegation_problem() -> None:
    with pytest.raises(CgroupError) as info:
        StepCgroup.create(None, 2**63, None)
    assert "out of range" in str(info.value) and "not delegated" not in str(info.value)
    assert _ours() == []


def test_doctor_reports_delegation(scratch_cgroups: list[str]) -> None:
    from execbox.tools.doctor import check_cgroups

    status, _, finding, _ = check_cgroups()
    assert status == "ok", finding
    unit = _mkcg(scratch_cgroups, f"{V2}/test-doctor")
    code = "from execbox.tools.doctor import check_cgroups; print(check_cgroups())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False,
                          env=env, timeout=60, preexec_fn=lambda: _join_as(unit, 65534))
    assert proc.returncode == 0, proc.stderr.decode()
    assert "'warn'" in proc.stdout.decode()
    assert f"{unit} is not delegated to execbox" in proc.stdout.decode()


def test_sandboxed_steps_from_a_ready_pid_1(tmp_path: Path) -> None:
    """A root caller's sandboxed steps of one profile: after the first, each may start from
    a pid 1 made ahead in a cgroup made ahead (cgroup2 cannot rename it to a step cgroup's
    name); limits, statistics and the device program hold either way, and no step cgroup
    is left behind."""
    box = execbox.SandboxSpec()
    tick = os.sysconf("SC_CLK_TCK")
    adopted = 0
    for _ in range(6):
        time.sleep(0.2)  # the supervisor makes the next pid 1 once idle
        with open("/proc/uptime") as f:
            submitted = float(f.read().split()[0])
        result = execbox.run(["sh", "-c", "echo > /dev/null && cat /proc/1/stat"], sandbox=box,
                             cwd=str(tmp_path), memory="64M", stdout=execbox.CAPTURE)
        assert result.exit_code == 0, result.failure
        assert result.usage.cgroup_peak_memory, result.usage
        stat = (result.stdout or b"").split(b")")[1].split()
        adopted += int(stat[19]) / tick < submitted - 0.01
    assert adopted >= 1, "no step started from a ready pid 1"
    assert _ours() == []
