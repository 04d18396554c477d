"""`execbox doctor` (truthful here, every failing branch forced) and `execbox selftest`."""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cgroups_writable, run_cli
from execbox.tools import doctor

CHECK_NAMES = ("architecture", "kernel", "pidfd", "syscalls", "cgroups", "user namespaces",
               "procfs", "/dev/char", "devpts", "noexec", "restrictions", "device programs",
               "fast sandbox launch")


def _userns_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-U", "true"], capture_output=True, check=False).returncode == 0


def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


def _openpty_works() -> bool:
    try:
        master, slave = os.openpty()
    except OSError:
        return False
    os.close(master)
    os.close(slave)
    return True


def test_doctor_on_this_host_matches_facts_found_without_it() -> None:
    proc = run_cli("doctor", "--json")
    checks = json.loads(proc.stdout)
    assert [c["check"] for c in checks] == list(CHECK_NAMES)
    assert set(CHECK_NAMES) >= doctor.ESSENTIAL  # every essential name is a real check
    assert all(c["status"] in ("ok", "note", "warn", "fail") for c in checks)
    by_name = {c["check"]: c["status"] for c in checks}
    # What this host is, found here and not by asking doctor.
    machine = platform.machine()
    assert by_name["architecture"] == ("ok" if machine in ("x86_64", "aarch64") else "fail")
    release = tuple(int(x) for x in re.findall(r"\d+", platform.release())[:2])
    assert by_name["kernel"] == ("ok" if release >= (5, 12) else "warn" if release >= (5, 3)
                                 else "fail")
    assert by_name["pidfd"] == ("ok" if _pidfd_works() else "fail")
    assert by_name["/dev/char"] == ("ok" if os.path.isdir("/dev/char") else "note")
    assert by_name["user namespaces"] == ("ok" if _userns_works() else "warn")
    assert by_name["devpts"] == ("ok" if _openpty_works() else "warn")
    if cgroups_writable():  # not the converse: a v2 delegation problem is also a warning
        assert by_name["cgroups"] == "ok"
    # Exit status 2 exactly when something essential is missing, else "all ok" (0) or "a
    # feature is unavailable" (1).
    essential_missing = (machine not in ("x86_64", "aarch64") or release < (5, 3)
                         or not _pidfd_works())
    assert proc.returncode in ((2,) if essential_missing else (0, 1)), proc.stderr
    text = run_cli("doctor")
    assert text.returncode == proc.returncode
    lines = text.stdout.decode().splitlines()
    for name in CHECK_NAMES:
        assert [line for line in lines if re.match(rf"(ok|note|warn|fail) +{re.escape(name)}: ",
                                                   line)], (name, lines)
    assert b"Traceback" not in text.stderr + proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to drop to nobody with setpriv")
def test_doctor_does_not_warn_an_unprivileged_user_of_a_syscall_its_sandbox_never_needs(
        ) -> None:
    """open_tree of a host mount tree needs privilege a plain user lacks (EPERM); that
    user's sandbox makes its mounts in a user namespace of its own and never needs it."""
    src = str(Path(doctor.__file__).resolve().parent.parent.parent)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "env", f"PYTHONPATH={src}", "HOME=/tmp", "/usr/bin/python3", "-m",
                           "execbox", "doctor"], capture_output=True, text=True, cwd="/tmp",
                          timeout=120, check=False)
    line = next(line for line in proc.stdout.splitlines() if "syscalls:" in line)
    assert line.startswith("ok"), proc.stdout


@pytest.mark.parametrize("command", [("doctor", "--bogus"), ("doctor", "json"),
                                     ("selftest", "--seconds"), ("selftest", "--seconds", "x"),
                                     ("selftest", "--seconds", "0"),
                                     ("selftest", "--seconds", "nan"), ("selftest", "--fast")])
def test_bad_arguments_are_usage_errors(command: tuple[str, ...]) -> None:
    proc = run_cli(*command)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == b""
    assert proc.stderr.startswith(f"usage: execbox {command[0]}".encode()), proc.stderr
    assert b"error:" in proc.stderr and b"Traceback" not in proc.stderr


def test_help_describes_the_options() -> None:
    for command, option in (("doctor", b"--json"), ("selftest", b"--seconds N")):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0 and option in proc.stdout, proc.stderr


def test_kernel_branches() -> None:
    assert doctor.check_kernel("4.19.0-amd64")[0] == "fail"
    status, _, finding, _ = doctor.check_kernel("5.8.0")
    assert status == "warn" and "close_range" in finding and "idmapped" in finding
    assert doctor.check_kernel("6.1.0")[0] == "ok"
    assert doctor.check_kernel("weird")[0] == "warn"


def test_dev_char_and_noexec_branches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert doctor.check_dev_char(str(tmp_path / "missing"))[0] == "note"
    (tmp_path / "char").mkdir()
    assert doctor.check_dev_char(str(tmp_path / "char"))[0] == "ok"

    class Flags:
        f_flag = os.ST_NOEXEC

    monkeypatch.setattr(doctor.os, "statvfs", lambda path: Flags())
    status, _, finding, _ = doctor.check_noexec((str(tmp_path),))
    assert status == "warn" and str(tmp_path) in finding


def test_restrictions_branch(tmp_path: Path) -> None:
    status_file = tmp_path / "status"
    status_file.write_text("Name:\tx\nNoNewPrivs:\t1\nSeccomp:\t2\n")
    status, _, finding, _ = doctor.check_self_restrictions(str(status_file))
    assert status == "warn" and "seccomp=2" in finding
    status_file.write_text("NoNewPrivs:\t0\nSeccomp:\t0\n")
    assert doctor.check_self_restrictions(str(status_file))[0] == "ok"


def test_namespace_procfs_devpts_cgroup_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_in_child", lambda action: "Operation not permitted")
    assert doctor.check_user_namespaces()[0] == "warn"
    status, _, _, advice = doctor.check_procfs()
    assert status == "warn" and "over-mounted" in advice

    from execbox.cgroups import step
    from execbox.streams import pty

    def no_pty(*args: object, **kwargs: object) -> None:
        raise pty.PtySetupError("pty_open_master", errno.ENOENT)

    def no_cgroup(*args: object, **kwargs: object) -> None:
        raise step.CgroupError(errno.EACCES, "cannot create")

    monkeypatch.setattr(pty, "open_pty", no_pty)
    assert doctor.check_devpts()[0] == "warn"
    monkeypatch.setattr(step.StepCgroup, "create", no_cgroup)
    assert doctor.check_cgroups()[0] == "warn"


def test_fast_sandbox_launch_branches() -> None:
    assert doctor.check_fast_sandbox_launch(None, None)[0] == "ok"
    status, _, finding, advice = doctor.check_fast_sandbox_launch(
        None, "EXECBOX_STEP_LAUNCHER=off")
    assert status == "note" and "step launcher (EXECBOX_STEP_LAUNCHER=off)" in finding
    assert "slower" in advice
    status, _, finding, _ = doctor.check_fast_sandbox_launch("no native pid 1 for arm", None)
    assert status == "note" and finding.startswith("without native pid 1")
    proc = run_cli("doctor", "--json", env={**os.environ, "EXECBOX_STEP_LAUNCHER": "off"})
    found = {c["check"]: c for c in json.loads(proc.stdout)}["fast sandbox launch"]
    assert found["status"] == "note" and "EXECBOX_STEP_LAUNCHER=off" in found["finding"]


def test_exit_status_levels() -> None:
    ok = ("ok", "kernel", "", "")
    assert doctor.exit_status([ok, ("note", "/dev/char", "", "")]) == 0
    assert doctor.exit_status([ok, ("warn", "cgroups", "", "")]) == 1
    assert doctor.exit_status([("fail", "pidfd", "", ""), ok]) == 2
    assert doctor.exit_status([("fail", "cgroups", "", ""), ok]) == 1  # not essential


def test_architecture_branches() -> None:
    assert doctor.check_architecture("amd64") == (
        "ok", "architecture", "x86_64 (syscall table known)", "")
    assert doctor.check_architecture("aarch64")[0] == "ok"
    result = doctor.check_architecture("riscv64")
    status, _, finding, advice = result
    assert status == "fail" and "unknown architecture riscv64" in finding
    assert "x86_64, aarch64" in advice
    assert doctor.exit_status([("ok", "kernel", "", ""), result]) == 2


def test_selftest_short_run_passes() -> None:
    proc = run_cli("selftest", "--seconds", "6", "--json", timeout=120)
    batteries = json.loads(proc.stdout)
    assert proc.returncode == 0, batteries
    names = " ".join(b["battery"] for b in batteries)
    for word in ("ETXTBSY", "PTY", "escapees", "leak", "device", "sandbox", "killed"):
        assert word in names
    assert all(b["failures"] == 0 for b in batteries), batteries
    assert sum(b["runs"] for b in batteries) > 50
    # A battery that can run on this host must have run: a skip here hides a failure.
    notes = {b["battery"]: b["note"] for b in batteries}
    sandbox = _userns_works()  # the sandbox makes a user namespace, for root too
    cgroups = cgroups_writable()
    skipped = {name for name, note in notes.items() if "skipped" in note}
    expected = ({"device allow/deny"} if not cgroups else set()) | (
        {"sandbox escape attempts", SANDBOX_RATE} if not sandbox else set())
    assert skipped == expected, notes
    killed = notes["execbox killed mid-step"]
    assert "plain x" in killed and "--pty x" in killed, killed
    assert ("--sandbox x" in killed) == sandbox, killed
    assert ("--pids 100 x" in killed) == cgroups, killed
    assert all(b["runs"] > 0 for b in batteries if b["battery"] not in skipped), batteries


SANDBOX_RATE = "sandbox launches of /bin/true, 1 at a time"


def test_selftest_reports_the_sandbox_launch_rate() -> None:
    if not _userns_works():
        pytest.skip("no user namespaces here: the row is skipped (checked above)")
    proc = run_cli("selftest", "--seconds", "2", "--json", timeout=120)
    rows = {b["battery"]: b for b in json.loads(proc.stdout)}
    row = rows[SANDBOX_RATE]
    assert row["failures"] == 0 and row["runs"] > 0, row
    assert row["rate"] > 0 and "skipped" not in row["note"], row
    assert all(b["rate"] >= 0 for b in rows.values()), rows
    text = run_cli("selftest", "--seconds", "2")
    assert text.returncode == 0, text.stdout
    lines = [line.removeprefix(SANDBOX_RATE).split()
             for line in text.stdout.decode().splitlines() if line.startswith(SANDBOX_RATE)]
    assert len(lines) == 1, text.stdout
    runs, failures, rate = lines[0][:3]
    assert int(runs) > 0 and int(failures) == 0 and float(rate) > 0, lines


def test_pidfd_and_syscalls_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    with monkeypatch.context() as patch:
        patch.setattr(doctor.os, "pidfd_open", refuse)
        assert doctor.check_pidfd()[0] == "fail"
    from execbox.linux import syscalls

    with monkeypatch.context() as patch:
        patch.setattr(syscalls, "openat2_in_root", refuse)
        status, _, finding, _ = doctor.check_kernel_features()
        assert status == "warn" and "openat2" in finding


def test_device_program_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    from execbox.cgroups.host import detect
    from execbox.linux import bpf

    unified = detect().unified
    if unified is None:
        pytest.skip("no cgroup2 hierarchy here: check_device_programs has nothing to inspect")
    monkeypatch.setattr(bpf, "attached_programs", lambda path: [41, 42])
    status, _, finding, _ = doctor.check_device_programs()
    assert status == "warn" and finding == f"2 already attached to {unified}: ids [41, 42]"


def test_a_selftest_killed_by_sigkill_leaves_its_work_directory_only_until_the_next(
        tmp_path: Path) -> None:
    """A SIGKILL skips the selftest's own cleanup; the next selftest removes what it left
    (and nothing of a selftest still running, or of anything else)."""
    import signal
    import time

    from execbox.tools.selftest import WORKDIR_PREFIX, make_workdir

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.Popen([sys.executable, "-m", "execbox",
                               "selftest", "--seconds", "60"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(f"{WORKDIR_PREFIX}*")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    left = list(tmp_path.glob(f"{WORKDIR_PREFIX}*"))
    assert len(left) == 1 and left[0].name.startswith(f"{WORKDIR_PREFIX}{killed.pid}-"), left
    running = Path(make_workdir(str(tmp_path)))  # as this process's own selftest would
    assert running.name.startswith(f"{WORKDIR_PREFIX}{os.getpid()}-")
    other = tmp_path / f"{WORKDIR_PREFIX}notes"
    other.mkdir()
    again = Path(make_workdir(str(tmp_path)))
    assert not left[0].exists(), "the killed selftest's directory stayed"
    assert running.is_dir() and again.is_dir() and other.is_dir()
    assert oct(running.stat().st_mode & 0o777) == "0o755"  # (steps of other users read it)
