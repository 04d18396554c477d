"""Runs of long-lived sandboxes own their trees; sandboxes fail closed; parent death.

Every probe of something the sandbox forbids first checks, inside the step, that its mount
namespace differs from the host's and exits 99 otherwise, so it can never change the host.
Tests that mount something outside a sandbox do it inside `unshare -m`, after checking that
the mount namespace there is not the host's.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import execbox
from conftest import DriftRecorder, processes_with, run_cli

HOST_MNT = os.readlink("/proc/self/ns/mnt")
GUARD = f'[ "$(readlink /proc/self/ns/mnt)" != "{HOST_MNT}" ] || exit 99; '
SRC = str(Path(__file__).resolve().parent.parent / "src")


def _userns_works() -> bool:
    return subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(shutil.which("unshare") is None or not _userns_works(),
                                reason="user namespaces are not available here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _wait_gone(*markers: str, within: float = 2.0) -> list[int]:
    """Poll until no process carries any marker; what is left after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        left = [pid for m in markers for pid in processes_with(m)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def _escapees(token: str, duration: int) -> str:
    """Shell that leaves a setsid'd child, a TERM-ignoring one and a double-forked one, each
    an sh carrying token in its argv over a `sleep <duration>` (unique per run)."""
    body = f"sleep {duration}; : {token}"
    return (f"setsid sh -c '{body}' & "
            f"sh -c 'trap \"\" TERM; {body}' & "
            f"sh -c '(sh -c \"{body}\" &); : {token}' & ")


def test_each_run_owns_its_tree(tmp_path: Path) -> None:
    """20 runs ending by exit, timeout and cancel: after each, nothing it started is left
    (within 2 s), and the sandbox still runs commands."""
    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path)) as sb:
        for i in range(20):
            mode = ("exit", "timeout", "cancel")[i % 3]
            token = f"execbox-run-{uuid.uuid4().hex}"
            duration = random.randrange(400000, 499999)
            ready = tmp_path / f"ready-{i}"
            script = GUARD + _escapees(token, duration) + f"touch {ready.name}; "
            script += "exit 0" if mode == "exit" else f"sleep {duration}"
            if mode == "cancel":
                handle = sb.start_run(["sh", "-c", script], grace=0.2)
                deadline = time.monotonic() + 30
                while not ready.exists():
                    assert time.monotonic() < deadline, "the run did not start"
                    time.sleep(0.01)
                handle.cancel()
                result = handle.wait(timeout=30)
                assert result.cancelled
            elif mode == "timeout":
                result = sb.run(["sh", "-c", script], timeout=0.5, grace=0.2)
                assert result.timed_out and ready.exists(), result
            else:
                result = sb.run(["sh", "-c", script])
                assert result.exit_code == 0, (result.exit_code, result.failure)
            left = _wait_gone(token, f"sleep\0{duration}\0")
            assert left == [], f"run {i} ({mode}) left {left}"
            assert sb.run(["true"]).exit_code == 0


def test_a_cancelled_run_gets_its_grace_period(tmp_path: Path) -> None:
    """The cancel signal reaches every process of the run (also the setsid'd ones), which
    may use the grace period to finish; SIGKILL only after it."""
    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path)) as sb:
        handle = sb.start_run(["sh", "-c", GUARD + "setsid sh -c 'trap \"echo cleaned > "
                               "done; exit 0\" TERM; touch ready; while :; do sleep 0.05; "
                               "done' & wait"], grace=5)
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        handle.cancel()
        assert handle.wait(timeout=30).cancelled
        assert (tmp_path / "done").read_text() == "cleaned\n"


def test_pty_run_has_a_controlling_terminal(tmp_path: Path) -> None:
    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path)) as sb:
        result = sb.run(["tty"], pty=True, stdout=execbox.CAPTURE, timeout=60)
        assert result.exit_code == 0, (result.stdout, result.failure)
        assert re.fullmatch(rb"/dev/pts/\d+\r?\n", result.stdout or b""), result.stdout
        job = sb.run(["sh", "-c", "exec 3</dev/tty && echo has-ctty"], pty=True,
                     stdout=execbox.CAPTURE, timeout=60)
        assert b"has-ctty" in (job.stdout or b"")


def test_supervisor_killed_takes_the_whole_sandbox(tmp_path: Path) -> None:
    """SIGKILL the step's supervisor: relay, pid 1 and so every process inside die."""
    token = f"execbox-orphan-{uuid.uuid4().hex}"
    duration = random.randrange(400000, 499999)
    handle = execbox.start(["sh", "-c", GUARD + _escapees(token, duration)
                            + f"touch ready; sleep {duration}; : {token}"],
                           sandbox=execbox.SandboxSpec(), cwd=str(tmp_path))
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    relay = handle.wait_started(timeout=30)
    assert relay is not None
    with open(f"/proc/{relay}/stat", "rb") as f:
        data = f.read()
    supervisor = int(data[data.rfind(b")") + 2:].split()[1])
    assert supervisor != os.getpid()
    os.kill(supervisor, signal.SIGKILL)
    assert _wait_gone(token, f"sleep\0{duration}\0") == []
    handle.wait(timeout=30)


def test_a_long_lived_sandbox_dies_with_its_holders_supervisor(tmp_path: Path) -> None:
    sb = execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path)).start()
    try:
        init = sb.init_pid
        assert init is not None
        with open(f"/proc/{init}/stat", "rb") as f:
            relay = int(f.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{relay}/stat", "rb") as f:
            supervisor = int(f.read().rsplit(b")", 1)[1].split()[1])
        assert supervisor != os.getpid()
        os.kill(supervisor, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while os.path.exists(f"/proc/{init}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{init}")
    finally:
        sb.close()


# -- fail closed ---------------------------------------------------------------------------
def _in_private_mount_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """Run Python in `unshare -m` (plus a user namespace when not root); the script starts
    by refusing to go on in the host's mount namespace."""
    prefix = ["unshare", "-m", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix = ["unshare", "-Urm", "--propagation", "private"]
    guard = (f"import os, sys\nif os.readlink('/proc/self/ns/mnt') == {HOST_MNT!r}:\n"
             "    sys.exit(99)\n")
    return subprocess.run([*prefix, sys.executable, "-c", guard + textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": SRC})


def test_read_only_fallback_covers_every_submount(tmp_path: Path) -> None:
    """Without mount_setattr the read-only remount walks mountinfo: a submount of a
    read-only bind is read-only (and nosuid) too."""
    proc = _in_private_mount_namespace(f"""
        import errno
        from execbox.child import mounts
        from execbox.linux import syscalls as sc
        base = {str(tmp_path)!r}
        os.makedirs(base + "/src/sub")
        os.makedirs(base + "/target")
        sc.mount("tmpfs", base + "/src/sub", "tmpfs", 0, "mode=0755")
        sc.mount(base + "/src", base + "/target", None, sc.MS_BIND | sc.MS_REC)
        mounts.USE_MOUNT_SETATTR = False
        mounts.set_tree_attrs(base + "/target", mounts.READ_ONLY)
        for path in (base + "/target", base + "/target/sub"):
            flags = os.statvfs(path).f_flag
            print(path[len(base):], bool(flags & os.ST_RDONLY), bool(flags & os.ST_NOSUID))
        try:
            open(base + "/target/sub/x", "w")
            print("written")
        except OSError as exc:
            print(errno.errorcode[exc.errno])
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n") == ["/target True True", "/target/sub True True",
                                       "EROFS", ""]


def test_ro_bind_with_a_submount_is_read_only_end_to_end(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    proc = _in_private_mount_namespace(f"""
        import subprocess
        from execbox.linux import syscalls as sc
        sc.mount("tmpfs", {str(source / "sub")!r}, "tmpfs", 0, "mode=0777")
        step = {GUARD!r} + "(echo x > /src/sub/f) 2>/dev/null && echo written || echo denied"
        run = subprocess.run([sys.executable, "-m", "execbox", "run", "--ro-bind",
                              {str(source)!r}, "/src", "--chdir", {str(work)!r}, "--",
                              "sh", "-c", step], capture_output=True, text=True)
        print(run.returncode, run.stdout.strip(), run.stderr.strip())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0 denied", proc.stdout


def test_binds_are_nosuid(tmp_path: Path) -> None:
    for name in ("ro", "rw", "dev"):
        (tmp_path / name).mkdir()
        suid = tmp_path / name / "suid"
        suid.write_text("#!/bin/sh\n")
        suid.chmod(0o4755)
    box = execbox.SandboxSpec(ro_binds=[(str(tmp_path / "ro"), "/suid-ro")],
                              binds=[(str(tmp_path / "rw"), "/suid-rw")],
                              dev_binds=[(str(tmp_path / "dev"), "/suid-dev")])
    work = tmp_path / "work"
    work.mkdir()
    result = execbox.run(["sh", "-c", GUARD + "cat /proc/self/mountinfo"], sandbox=box,
                         cwd=work, stdout=execbox.CAPTURE, timeout=60)
    assert result.exit_code == 0, result.failure
    options = {line.split()[4]: line.split()[5].split(",")
               for line in (result.stdout or b"").decode().splitlines()}
    for point in ("/suid-ro", "/suid-rw", "/suid-dev", str(work)):
        assert "nosuid" in options[point], (point, options[point])
    assert "ro" in options["/suid-ro"] and "nodev" in options["/suid-rw"]


def test_a_missing_step_user_namespace_is_a_named_failure() -> None:
    """join_sandbox never takes a missing fd 3 for "privileged": it fails the step."""
    script = textwrap.dedent("""
        import errno, os, subprocess
        from execbox.child.context import ChildContext
        from execbox.child.namespaces import join_sandbox
        for fd3 in ("none", "file"):
            extra = {}
            if fd3 == "file":
                extra = {"pass_fds": (3,), "stdin": subprocess.DEVNULL}
                os.dup2(os.open("/dev/null", os.O_RDONLY), 3, inheritable=True)
            sleeper = subprocess.Popen(["sleep", "30"], **extra)
            pidfd = os.pidfd_open(sleeper.pid)
            ctx = ChildContext(-1)
            try:
                join_sandbox(ctx, pidfd, False, True)
                print("joined")
            except OSError as exc:
                print(errno.errorcode[exc.errno], ctx.label)
            finally:
                sleeper.kill()
                sleeper.wait()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    label = "join sandbox: step user namespace (pid 1's fd 3)"
    assert proc.stdout.splitlines() == [f"EBADF {label}", f"EBADF {label}"]


def test_runs_enter_the_sandbox_through_a_pidfd_of_its_pid_1(tmp_path: Path) -> None:
    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path)) as sb:
        pidfd = sb._init_pidfd
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            pid = [line.split()[1] for line in f if line.startswith("Pid:")]
        assert pid == [str(sb.init_pid)]
        assert sb.run(["true"]).exit_code == 0
    assert sb._init_pidfd == -1


# -- read-write binds as root --------------------------------------------------------------
@needs_root
def test_read_write_binds_work_as_root(tmp_path: Path) -> None:
    """mktemp -d dirs (root-owned, 0700): as the working directory and at /data; what the
    step creates is owned by the directory's owner on the host."""
    work = Path(tempfile.mkdtemp(prefix="execbox-bind-"))
    data = Path(tempfile.mkdtemp(prefix="execbox-data-"))
    other = Path(tempfile.mkdtemp(prefix="execbox-other-"))
    os.chown(other, 4321, 4322)
    try:
        proc = run_cli("run", "--bind", str(work), str(work), "--chdir", str(work), "--",
                       "sh", "-c", GUARD + "touch made && echo ok")
        assert proc.returncode == 0 and proc.stdout == b"ok\n", proc.stderr
        assert (os.stat(work / "made").st_uid, os.stat(work / "made").st_gid) == (0, 0)
        proc = run_cli("run", "--bind", str(data), "/data", "--bind", str(other), "/other",
                       "--chdir", str(tmp_path), "--", "sh", "-c",
                       GUARD + "touch /data/x /other/y && echo ok")
        assert proc.returncode == 0 and proc.stdout == b"ok\n", proc.stderr
        assert os.stat(data / "x").st_uid == 0
        assert (os.stat(other / "y").st_uid, os.stat(other / "y").st_gid) == (4321, 4322)
        make = run_cli("run", "--bind", str(work), str(work), "--chdir", str(work), "--",
                       "sh", "-c", GUARD + "printf 'all:\\n\\ttouch built\\n' > Makefile "
                       "&& make -s")
        assert make.returncode == 0, make.stderr
        assert (work / "built").exists()
    finally:
        for path in (work, data, other):
            shutil.rmtree(path)


# -- device drift ---------------------------------------------------------------------------
@needs_root
def test_device_drift_report_names_exactly_what_changed(tmp_path: Path) -> None:
    if not os.path.isdir("/sys/fs/cgroup/devices"):
        pytest.skip("no v1 devices controller")
    from execbox.cgroups.devices import DEFAULT_RULES

    on_drift = DriftRecorder()
    reported, seen = on_drift.reported, on_drift.seen

    with execbox.Sandbox(execbox.SandboxSpec(), cwd=str(tmp_path), devices=list(DEFAULT_RULES),
                         device_mode="v1", watch_interval=0.2, on_drift=on_drift) as sb:
        assert sb.run(["true"]).exit_code == 0
        with open(f"{sb.cgroup_dirs['devices']}/devices.deny", "w") as f:
            f.write("c 1:3 rwm")
        assert seen.wait(20), "the watchdog did not notice"
        report = reported[0]
        assert "devices.list lost 'c 1:3 rwm'" in report, report
        assert "it denies /dev/null" in report, report
        for device in ("/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/ptmx"):
            assert device not in report, report
        after = sb.run(["true"])
        assert after.exit_code == 125 and after.failure is not None
        assert after.failure.step == "devices" and "/dev/null" in after.failure.message


# -- layout ---------------------------------------------------------------------------------
SANDBOX_CHILD_MODULES = ("namespaces", "mounts", "init", "console", "privileges")


def test_sandbox_child_steps_import_only_the_syscall_layer_and_the_model() -> None:
    child = Path(SRC) / "execbox" / "child"
    for name in SANDBOX_CHILD_MODULES:
        text = (child / f"{name}.py").read_text()
        relative = re.findall(r"^\s*from (\.+[\w.]*) import", text, re.M)
        for module in relative:
            assert module.startswith(("..linux", "..model", ".")) and not module.startswith(
                ("..streams", "..cgroups", "..supervise", "..api")), (name, module)
            if module.startswith(".") and not module.startswith(".."):
                assert module[1:].split(".")[0] in (*SANDBOX_CHILD_MODULES, "context",
                                                         "process"), module


def test_unsandboxed_runs_never_import_the_sandbox_steps() -> None:
    script = ("import sys, execbox\n"
              "r = execbox.run(['true'])\n"
              "assert r.exit_code == 0\n"
              "from execbox import child\n"
              "child.lookup('execve')\n"
              "print(sorted(m for m in sys.modules if m.startswith('execbox.child.')))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    loaded = {m.rsplit(".", 1)[1] for m in eval(proc.stdout)}
    assert not loaded & set(SANDBOX_CHILD_MODULES), loaded


def test_a_pty_steps_leftovers_do_not_keep_it_going(tmp_path: Path) -> None:
    """A sandboxed terminal step's pid 1 relays the terminal until it is drained: a
    leftover that holds the terminal (and ignores TERM and HUP) must die when the step
    ends, as without a terminal, not keep the drain, and so the step, going."""
    script = ("(setsid sh -c 'trap \"\" TERM HUP; touch ready; sleep 0.6; touch late; "
              "while :; do echo d; sleep 0.2; done' &); "
              "while [ ! -e ready ]; do sleep 0.01; done; echo main; exit 7")
    result = execbox.run(["sh", "-c", GUARD + script], sandbox=execbox.SandboxSpec(),
                         pty=True, cwd=str(tmp_path), stdout=execbox.CAPTURE, timeout=30)
    assert result.exit_code == 7, result
    time.sleep(1.0)
    assert not (tmp_path / "late").exists(), "the leftover outlived the step"


def test_a_sandbox_objects_cgroup_is_optional_as_any_sandboxed_jobs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived Sandbox asks for what its caller asked for (no device rules: the
    default), so its cgroup is as optional as any sandboxed job's; it was made a must by
    passing the default rules as if they had been asked for."""
    from execbox.api import sandbox as sandbox_module
    from execbox.model.options import build_spec

    asked: dict[str, object] = {}

    def start(argv: list[str], **options: object) -> None:
        asked.update(options)
        raise RuntimeError("not started")

    monkeypatch.setattr(sandbox_module.api, "start", start)
    with pytest.raises(RuntimeError):
        execbox.Sandbox(execbox.SandboxSpec()).start()
    passed = {k: asked[k] for k in ("devices", "device_mode")}
    held = build_spec(["x"], sandbox=execbox.SandboxSpec(), **passed)  # type: ignore[arg-type]
    plain = build_spec(["x"], sandbox=execbox.SandboxSpec())
    assert held.limits == plain.limits

