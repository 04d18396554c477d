"""`execbox doctor` (truthful here, every failing branch forced) and `execbox selftest`."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from execbox.tools import doctor


def test_doctor_on_this_host_is_consistent() -> None:
    proc = run_cli("doctor", "--json")
    checks = json.loads(proc.stdout)
    names = {c["check"] for c in checks}
    assert names >= doctor.ESSENTIAL  # every essential name is a real check
    assert {"architecture", "kernel", "pidfd", "cgroups", "user namespaces", "procfs",
            "/dev/char", "devpts", "noexec", "restrictions", "device programs",
            "syscalls"} <= names
    statuses = {c["status"] for c in checks}
    assert proc.returncode == (2 if "fail" in statuses else 1 if "warn" in statuses else 0)
    by_name = {c["check"]: c for c in checks}
    assert by_name["pidfd"]["status"] == "ok"
    assert by_name["/dev/char"]["status"] == ("ok" if os.path.isdir("/dev/char") else "note")
    text = run_cli("doctor")
    assert b"kernel:" in text.stdout and text.returncode == proc.returncode


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
    for word in ("ETXTBSY", "PTY", "escapees", "leak", "device", "sandbox"):
        assert word in names
    assert all(b["failures"] == 0 for b in batteries)
    assert sum(b["runs"] for b in batteries) > 50


def test_pidfd_syscalls_and_device_program_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    with monkeypatch.context() as patch:
        patch.setattr(doctor.os, "pidfd_open", refuse)
        assert doctor.check_pidfd()[0] == "fail"
    from execbox.linux import bpf, syscalls

    with monkeypatch.context() as patch:
        patch.setattr(syscalls, "openat2_in_root", refuse)
        status, _, finding, _ = doctor.check_kernel_features()
        assert status == "warn" and "openat2" in finding
    with monkeypatch.context() as patch:
        patch.setattr(bpf, "attached_programs", lambda path: [41, 42])
        status, _, finding, _ = doctor.check_device_programs()
        from execbox.cgroups.host import detect

        if detect().unified is not None:
            assert status == "warn" and "41" in finding
