"""Sandboxed steps: namespaces, the new root, pid 1, least privilege, containment, leaks.

Every probe of something the sandbox forbids first checks, inside the step, that its mount
namespace differs from the host's and exits 99 otherwise, so it can never change the host.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import execbox
from conftest import children_of, open_fds, processes_with, run_cli, zombies_of

HOST_MNT = os.readlink("/proc/self/ns/mnt")
GUARD = f'[ "$(readlink /proc/self/ns/mnt)" != "{HOST_MNT}" ] || exit 99; '


def _userns_works() -> bool:
    return subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode == 0


# Only what needs namespaces is skipped without them: spec validation always runs.
needs_userns = pytest.mark.skipif(shutil.which("unshare") is None or not _userns_works(),
                                  reason="user namespaces are not available here")


def sandboxed(script: str, **kwargs: object) -> execbox.Result:
    box = kwargs.pop("sandbox", None) or execbox.SandboxSpec()
    kwargs.setdefault("timeout", 60)
    return execbox.run(["sh", "-c", GUARD + script], sandbox=box, stdout=execbox.CAPTURE,
                       stderr=execbox.CAPTURE, **kwargs)  # type: ignore[arg-type]


def lines(result: execbox.Result) -> list[str]:
    assert result.exit_code == 0, (result.exit_code, result.failure, result.stderr)
    assert result.stdout is not None
    return result.stdout.decode().splitlines()


@needs_userns
def test_default_profile_basics(tmp_path: Path) -> None:
    out = lines(sandboxed(
        "readlink /proc/self/exe; hostname; ls /sys/class/net; "
        "cat /sys/class/net/lo/operstate /sys/class/net/lo/flags; ls -A /dev | tr '\\n' ' '; "
        "echo; ps -eo pid=,comm= | wc -l; ps -o pid= -p 1 | tr -d ' '",
        cwd=tmp_path))
    assert out[0] == "/usr/bin/readlink"
    assert out[1] == "execbox"
    assert out[2] == "lo"
    assert int(out[4], 16) & 0x1, "lo is not up"
    assert out[5].split() == sorted(["fd", "full", "null", "ptmx", "pts", "random", "shm",
                                     "stderr", "stdin", "stdout", "tty", "urandom", "zero"])
    assert int(out[6]) <= 4  # init, sh, ps (and wc): nothing of the host
    assert out[7] == "1"


@needs_userns
def test_a_tight_umask_is_the_steps_and_not_its_mount_points(tmp_path: Path) -> None:
    """umask=0o077 shapes what the step writes; the directories made in the sandbox's root
    to mount its working directory on stay 0755, so the step can still reach it (bwrap's
    --umask is the step's too). Three runs: the first launches afresh, the next ones from
    a sandbox made ahead."""
    workdir = tmp_path / "deep" / "work"
    workdir.mkdir(parents=True)
    for _ in range(3):
        out = lines(sandboxed("touch made; stat -c %a made ..; rm made", cwd=workdir,
                              umask=0o077))
        assert out == ["600", "755"], out


@needs_userns
def test_processes_are_only_the_sandboxes(tmp_path: Path) -> None:
    out = lines(sandboxed("ps -eo pid=,args=", cwd=tmp_path))
    pids = sorted(int(line.split()[0]) for line in out)
    assert pids[0] == 1 and len(pids) <= 3


@needs_userns
def test_hostname_option_and_devices(tmp_path: Path) -> None:
    box = execbox.SandboxSpec(hostname="builder-7")
    out = lines(sandboxed(
        "hostname; head -c 4 /dev/zero | od -An -tx1; head -c 8 /dev/urandom | wc -c; "
        "echo x > /dev/null && echo null-ok", sandbox=box, cwd=tmp_path))
    assert out == ["builder-7", " 00 00 00 00", "8", "null-ok"]


@needs_userns
def test_writes_only_in_workdir_and_tmp(tmp_path: Path) -> None:
    result = sandboxed(
        "touch here && echo cwd-ok; touch /tmp/t && echo tmp-ok; "
        "for p in /usr/x /etc/x /x /proc/sys/kernel/hostname /sys/x /home; do "
        "  ( echo x > $p ) 2>/dev/null && echo WROTE-$p; done; "
        "cat /etc/shadow >/dev/null 2>&1 && echo READ-SHADOW; true", cwd=tmp_path)
    out = lines(result)
    assert out == ["cwd-ok", "tmp-ok"]
    assert (tmp_path / "here").exists()
    assert (tmp_path / "here").stat().st_uid == os.geteuid()


@needs_userns
def test_pty_uses_the_sandboxes_own_devpts(tmp_path: Path) -> None:
    result = execbox.run(["sh", "-c", GUARD + "echo via-tty > /dev/tty; test -t 0 && "
                          "test -t 1 && echo isatty; tty; ls /dev/pts | tr '\\n' ' '; echo; "
                          "stty size; printf 'a\\nb\\n'"],
                         sandbox=execbox.SandboxSpec(), pty=True, pty_size=(31, 91),
                         stdout=execbox.CAPTURE, cwd=tmp_path, timeout=60)
    assert result.exit_code == 0, result.failure
    assert result.stdout is not None
    out = result.stdout.split(b"\r\n")
    assert out[:3] == [b"via-tty", b"isatty", b"/dev/pts/0"]
    assert out[3].split() == [b"0", b"ptmx"]
    assert out[4:7] == [b"31 91", b"a", b"b"]  # one CRLF translation, not two


@needs_userns
def test_input_root_with_binds(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "data.txt").write_text("from the input root\n")
    binds = [(p, p) for p in ("/usr", "/etc") if os.path.isdir(p)]
    links = [(os.readlink(p), p) for p in ("/bin", "/lib", "/lib64", "/sbin")
             if os.path.islink(p)]
    binds += [(p, p) for p in ("/bin", "/lib", "/lib64", "/sbin")
              if os.path.isdir(p) and not os.path.islink(p)]
    box = execbox.SandboxSpec(root, ro_binds=binds, symlinks=links, tmpfs=["/scratch"],
                              dirs=["/made"], hostname="rooted")
    out = lines(sandboxed("cat /data.txt; hostname; pwd; touch /scratch/x && echo scratch-ok;"
                          " test -d /made && echo dir-ok; touch /data.txt 2>/dev/null "
                          "|| echo root-read-only; readlink /proc/self/exe", sandbox=box))
    assert out == ["from the input root", "rooted", "/", "scratch-ok", "dir-ok",
                   "root-read-only", "/usr/bin/readlink"]


@needs_userns
def test_cli_sandbox_and_failure_naming(tmp_path: Path) -> None:
    proc = run_cli("run", "--sandbox", "--hostname", "cli-box", "--", "hostname",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"cli-box\n"
    result_file = tmp_path / "r.json"
    proc = run_cli("run", "--ro-bind", str(tmp_path / "missing"), "/x", "--result",
                   str(result_file), "--", "true", cwd=tmp_path)
    assert proc.returncode == 125
    import json

    failure = json.loads(result_file.read_text())["failure"]
    assert failure["step"] == f"ro-bind {tmp_path}/missing -> /x"
    assert failure["errno"] == "ENOENT" and "does not exist" in failure["hint"]


@needs_userns
def test_real_tools(tmp_path: Path) -> None:
    script = (
        "python3 -c 'import sys; print(sys.version_info[0])'; bash -c 'echo bash-ok'; "
        "git init -q repo && cd repo && git -c user.name=t -c user.email=t@e "
        "commit -q --allow-empty -m init && git log --oneline | wc -l && cd ..; "
        "printf '#include <stdio.h>\\nint main(void){puts(\"gcc-ok\");return 0;}\\n' > m.c; "
        "gcc -o m m.c && ./m")
    assert lines(sandboxed(script, cwd=tmp_path, env={"PATH": "/usr/bin:/bin",
                                                       "HOME": str(tmp_path)}))[:4] == [
        "3", "bash-ok", "1", "gcc-ok"]


@needs_userns
@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK installed")
def test_javac_needs_proc_self_exe(tmp_path: Path) -> None:
    (tmp_path / "Hello.java").write_text(
        'public class Hello { public static void main(String[] a) '
        '{ System.out.println("java-ok"); } }\n')
    out = lines(sandboxed("javac Hello.java && java -cp . Hello", cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}))
    assert out[-1] == "java-ok"


@needs_userns
@pytest.mark.skipif(shutil.which("rustc") is None, reason="no Rust toolchain installed")
def test_rustc_in_sandbox(tmp_path: Path) -> None:
    found = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, check=False)
    if found.returncode != 0:
        pytest.skip("rustc does not work on the host")
    sysroot = found.stdout.decode().strip()
    rustc = f"{sysroot}/bin/rustc"  # the real compiler, not a rustup proxy
    box = execbox.SandboxSpec(ro_binds=[(sysroot, sysroot)])
    (tmp_path / "m.rs").write_text('fn main() { println!("rust-ok"); }\n')
    out = lines(sandboxed(f"{rustc} -o m m.rs && ./m", sandbox=box, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}))
    assert out[-1] == "rust-ok"


@needs_userns
def test_crafted_root_cannot_escape(tmp_path: Path) -> None:
    canary_dir = tmp_path / "host"
    canary_dir.mkdir()
    canary = canary_dir / "canary"
    canary.write_text("untouched\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "evil").symlink_to("/")
    (root / "up").symlink_to("../../../../../../..")
    (root / "host").symlink_to(str(canary_dir))
    made = "/../../../.." + str(canary_dir) + "/made"
    attempts = [  # each with the step that sets it up
        (execbox.SandboxSpec(root, tmpfs=["/evil" + str(canary_dir)]),
         f"tmpfs /evil{canary_dir}"),
        (execbox.SandboxSpec(root, tmpfs=["/up" + str(canary_dir)]), f"tmpfs /up{canary_dir}"),
        (execbox.SandboxSpec(root, tmpfs=["/host"]), "tmpfs /host"),
        (execbox.SandboxSpec(root, dirs=[made]), f"dir {made}"),
        (execbox.SandboxSpec(root, ro_binds=[("/usr", "/evil" + str(canary))]),
         f"ro-bind /usr -> /evil{canary}"),
        (execbox.SandboxSpec(root, symlinks=[("/", "/host/link")]), "symlink / -> /host/link"),
    ]
    before = Path("/proc/self/mountinfo").read_text()
    for box, step in attempts:
        result = execbox.run(["/usr/bin/true"], sandbox=box, timeout=60)
        # Either that very step refused the path (125), or it was kept inside the crafted
        # root: setup completed and execve found no /usr/bin/true in that empty root (127).
        # Anything else (a namespace that could not be made, true running on the host's
        # root) means the attempt proved nothing.
        assert result.failure is not None, result
        assert (result.exit_code, result.failure.step) in ((125, step), (127, "execve")), (
            result.exit_code, result.failure)
        assert canary.read_text() == "untouched\n"
        assert sorted(p.name for p in canary_dir.iterdir()) == ["canary"]
    assert Path("/proc/self/mountinfo").read_text() == before


@needs_userns
def test_timeout_kills_escapees_in_the_sandbox(tmp_path: Path, marker: str) -> None:
    started = time.monotonic()
    result = sandboxed(f"setsid sleep 300 & sleep 300 # {marker}", cwd=tmp_path,
                       timeout=1, grace=1)
    assert result.timed_out
    assert time.monotonic() - started < 10
    time.sleep(0.1)
    assert processes_with(marker) == []
    assert zombies_of(os.getpid()) == []


@needs_userns
def test_background_processes_die_with_the_step(tmp_path: Path, marker: str) -> None:
    result = sandboxed(f"(sleep 300 # {marker}\n) & echo started", cwd=tmp_path)
    assert lines(result) == ["started"]
    assert processes_with(marker) == []


@needs_userns
def test_thousand_runs_leave_the_host_unchanged(tmp_path: Path) -> None:
    execbox.run(["true"], sandbox=execbox.SandboxSpec(), cwd=tmp_path)
    mounts = Path("/proc/self/mountinfo").read_text()
    fds = open_fds()
    for _ in range(1000):
        result = execbox.run(["/bin/true"], sandbox=execbox.SandboxSpec(), cwd=tmp_path)
        assert result.exit_code == 0, result.failure
    assert Path("/proc/self/mountinfo").read_text() == mounts
    assert open_fds() == fds
    assert children_of(os.getpid()) == []


_KEYS_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
ADD_KEY, KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
SESSION, SEARCH = -3, 10
libc.syscall.restype = ctypes.c_long

def search(name):
    found = libc.syscall(KEYCTL, SEARCH, ctypes.c_long(SESSION), b"user", name.encode(), 0)
    return "found" if found >= 0 else os.strerror(ctypes.get_errno())

print(" ".join(f"{name}:{search(name)}" for name in sys.argv[2:]))
if sys.argv[1]:
    added = libc.syscall(ADD_KEY, b"user", sys.argv[1].encode(), b"data", 4,
                         ctypes.c_long(SESSION))
    assert added >= 0, os.strerror(ctypes.get_errno())
"""


@needs_userns
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="probe's numbers")
def test_a_sandboxed_step_has_a_session_keyring_of_its_own(tmp_path: Path) -> None:
    """As runc joins a new session keyring for each container: neither the caller's keys
    (a CI agent's session keyring holds its credentials) nor those an earlier step added
    are a step's to find. Several runs: a root caller's first and later launches take
    different paths."""
    probe = tmp_path / "keys.py"
    probe.write_text(_KEYS_PROBE)
    runs = []
    for index in range(4):
        runs.append(["python3", str(probe), f"planted-{index}", "caller-secret",
                     *(f"planted-{before}" for before in range(index))])
    script = textwrap.dedent(f"""
        import ctypes, json, os, subprocess, sys
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        ADD_KEY, KEYCTL = {{"x86_64": (248, 250), "aarch64": (217, 219)}}[os.uname().machine]
        # A session keyring of this process's own (the test's is left alone), with a key.
        assert libc.syscall(KEYCTL, 1, b"execbox-test-session") >= 0
        assert libc.syscall(ADD_KEY, b"user", b"caller-secret", b"s3cret", 6,
                            ctypes.c_long(-3)) >= 0
        sys.path.insert(0, {str(Path(execbox.__file__).resolve().parent.parent)!r})
        import execbox
        seen = subprocess.run([sys.executable, {str(probe)!r}, "", "caller-secret"],
                              capture_output=True, text=True).stdout.strip()
        out = [seen]
        for argv in {runs!r}:
            r = execbox.run(argv, sandbox=execbox.SandboxSpec(), cwd={str(tmp_path)!r},
                            stdout=execbox.CAPTURE, stderr=execbox.CAPTURE, timeout=60)
            out.append(r.stdout.decode().strip() or repr((r.failure, r.stderr)))
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    seen, *steps = json.loads(proc.stdout)
    assert seen == "caller-secret:found"  # (the probe finds what is there)
    for index, line in enumerate(steps):
        expected = ["caller-secret:Required key not available",
                    *(f"planted-{before}:Required key not available" for before in range(index))]
        assert line == " ".join(expected), (index, line)
    from execbox.report.diagnose import describe

    quota = describe("session keyring", errno.EDQUOT, "")  # (other users' keys fill it)
    assert quota.errno == "EDQUOT" and "maxkeys" in quota.hint


_NO_KEYCTL = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
# seccomp: keyctl (250) fails with EPERM, as under Docker's default profile; all else runs.
program = b"".join(struct.pack("<HBBI", *op) for op in (
    (0x20, 0, 0, 0), (0x15, 0, 1, 250), (0x06, 0, 0, 0x00050000 | 1), (0x06, 0, 0, 0x7fff0000)))
buffer = ctypes.create_string_buffer(program)
fprog = struct.pack("<HxxxxxxQ", 4, ctypes.addressof(buffer))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # no_new_privs
assert libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0, ctypes.get_errno()
"""


@needs_userns
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter's syscall number")
def test_a_sandbox_runs_where_a_seccomp_filter_refuses_keyrings(tmp_path: Path) -> None:
    """Under a seccomp filter that refuses keyctl (Docker's default profile), which every
    step inherits, no step can reach a keyring: sandboxed steps run, without a keyring
    of their own, instead of failing to make one."""
    script = _NO_KEYCTL + textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(execbox.__file__).resolve().parent.parent)!r})
        import execbox
        for _ in range(3):
            r = execbox.run(["true"], sandbox=execbox.SandboxSpec(), cwd={str(tmp_path)!r},
                            timeout=60)
            print(r.exit_code, r.failure)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["0 None"] * 3, proc.stdout


@needs_userns
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to drop to nobody with setpriv")
def test_core_checks_as_an_unprivileged_user() -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="execbox-nobody-", dir="/tmp"))
    base.chmod(0o755)
    work = base / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    try:
        _check_as_nobody(work)
    finally:
        shutil.rmtree(base)


def _check_as_nobody(work: Path) -> None:
    src = str(Path(execbox.__file__).resolve().parent.parent)
    probe = (
        "import sys; sys.path.insert(0, {!r}); import execbox\n"
        "r = execbox.run(['sh', '-c', {!r}], sandbox=execbox.SandboxSpec(), cwd={!r},\n"
        "                stdout=execbox.CAPTURE, stderr=execbox.CAPTURE, timeout=60)\n"
        "print(r.exit_code, r.failure); sys.stdout.write(r.stdout.decode())\n"
    ).format(src, GUARD + "id -u; hostname; ls /sys/class/net; touch here && echo cwd-ok; "
         "(echo x > /usr/x) 2>/dev/null || echo usr-ro; readlink /proc/self/exe; "
         "ps -o pid= -p 1 | tr -d ' '", str(work))
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "/usr/bin/python3", "-c", probe], capture_output=True,
                          timeout=120, cwd=str(work), check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode().splitlines()
    assert out == ["0 None", "65534", "execbox", "lo", "cwd-ok", "usr-ro",
                   "/usr/bin/readlink", "1"]


@needs_userns
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to drop to nobody with setpriv")
def test_an_unprivileged_sandboxed_steps_limits_hold_or_fail_the_step() -> None:
    """A sandboxed step's own cgroup is optional (an extra kill guarantee) only where the
    job asked for no limits: asked-for limits that cannot be set fail the step, as they
    fail an unsandboxed one, and are never silently dropped."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="execbox-nobody-", dir="/tmp"))
    base.chmod(0o755)
    work = base / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    src = str(Path(execbox.__file__).resolve().parent.parent)
    probe = (
        f"import sys; sys.path.insert(0, {src!r}); import execbox\n"
        "for box in (None, execbox.SandboxSpec()):\n"
        "    r = execbox.run(['sh', '-c', 'for i in 1 2 3 4 5 6; do sleep 1 & done; wait'],\n"
        f"                    sandbox=box, cwd={str(work)!r}, pids=3, timeout=60)\n"
        "    print(r.exit_code, r.failure and r.failure.step)\n"
    )
    try:
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "/usr/bin/python3", "-c", probe], capture_output=True,
                              timeout=120, cwd=str(work), check=False)
    finally:
        shutil.rmtree(base)
    assert proc.returncode == 0, proc.stderr.decode()
    plain, sandboxed = proc.stdout.decode().splitlines()
    assert plain != "0 None" and sandboxed != "0 None", (plain, sandboxed)
    if plain == "125 cgroup":  # no cgroup of its own for this user here: the same failure
        assert sandboxed == "125 cgroup"


fuzz_paths = st.text(alphabet="/.a-\0 é", max_size=12)


@pytest.fixture(scope="module")
def fuzz_home() -> Iterator[Path]:
    """A working directory for fuzzed runs and, beside it, a host directory with a canary."""
    home = Path(tempfile.mkdtemp(prefix="execbox-fuzz-"))
    (home / "work").mkdir()
    (home / "host").mkdir()
    (home / "host" / "canary").write_text("untouched\n")
    yield home
    shutil.rmtree(home)


fuzz_specs = (st.lists(fuzz_paths, max_size=3),
              st.lists(st.tuples(st.sampled_from(["/usr", "/etc/hostname", "/nonexistent",
                                                  "HOST"]), fuzz_paths), max_size=2),
              st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
              st.text(max_size=70), st.one_of(st.none(), st.integers(-5, 5)))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(*fuzz_specs)
def test_fuzzed_specs_are_rejected_naming_the_field(fuzz_home: Path, paths: list[str],
                                                    binds: list[tuple[str, str]],
                                                    env: dict[str, str], hostname: str,
                                                    uid: int | None) -> None:
    """Validation alone, so it runs where namespaces are unavailable: a spec is refused with
    a sandbox.* or env field, or accepted as it was given."""
    binds = [(str(fuzz_home / "host") if src == "HOST" else src, dest) for src, dest in binds]
    try:
        box = execbox.SandboxSpec(tmpfs=paths, ro_binds=binds, hostname=hostname or "x",
                                  uid=uid)
        spec = execbox.make_spec(["/bin/true"], sandbox=box, cwd=fuzz_home / "work", env=env)
    except execbox.SpecError as exc:
        assert exc.field.startswith(("sandbox.", "env")), exc
        assert str(exc)
        return
    assert spec.sandbox is not None and spec.sandbox.hostname == (hostname or "x")
    accepted = [*spec.sandbox.tmpfs, *(dest for _, _, dest in spec.sandbox.binds)]
    assert len(accepted) == len(paths) + len(binds)
    assert all(p.startswith("/") and "\0" not in p for p in accepted), accepted


@needs_userns
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(*fuzz_specs)
def test_fuzzed_specs_are_rejected_clearly_or_run(fuzz_home: Path, paths: list[str],
                                                  binds: list[tuple[str, str]],
                                                  env: dict[str, str], hostname: str,
                                                  uid: int | None) -> None:
    canary = fuzz_home / "host" / "canary"
    binds = [(str(fuzz_home / "host") if src == "HOST" else src, dest) for src, dest in binds]
    try:
        box = execbox.SandboxSpec(tmpfs=paths, ro_binds=binds, hostname=hostname or "x",
                                  uid=uid)
        result = execbox.run(["/bin/true"], sandbox=box, cwd=fuzz_home / "work", env=env,
                             timeout=60)
    except execbox.SpecError as exc:
        assert exc.field.startswith(("sandbox.", "env")), exc
        return
    assert result.exit_code in (0, 125), result
    if result.exit_code == 125:
        assert result.failure is not None and result.failure.step
    assert canary.read_text() == "untouched\n"
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary"]


def test_spec_errors_name_sandbox_fields() -> None:
    for kwargs, field in [({"root": ""}, "sandbox.root"),
                          ({"ro_binds": [("/usr",)]}, "sandbox.ro_binds[0]"),
                          ({"binds": [("/usr", "rel")]}, "sandbox.binds[0].destination"),
                          ({"hostname": "a/b"}, "sandbox.hostname"),
                          ({"uid": -1}, "sandbox.uid")]:
        with pytest.raises(execbox.SpecError) as info:
            execbox.SandboxSpec(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(execbox.SpecError) as info:
        execbox.run(["true"], sandbox="yes")  # type: ignore[arg-type]
    assert info.value.field == "sandbox"


@needs_userns
def test_long_lived_sandbox_runs_cancel_and_close(tmp_path: Path, marker: str) -> None:
    with execbox.Sandbox(execbox.SandboxSpec(hostname="kept"), cwd=str(tmp_path)) as sb:
        first = sb.run(["sh", "-c", GUARD + "hostname; echo one > state"],
                       stdout=execbox.CAPTURE)
        assert first.stdout == b"kept\n"
        second = sb.run(["sh", "-c", GUARD + "cat state; ps -eo pid= | wc -l"],
                        stdout=execbox.CAPTURE)
        assert second.stdout is not None and second.stdout.splitlines()[0] == b"one"
        ready = tmp_path / "ready"
        handle = sb.start_run(["sh", "-c", GUARD + f"(sleep 300 # {marker}\n) & "
                               f"(setsid sleep 300 # {marker}\n) & touch ready; "
                               f"sleep 300 # {marker}"], grace=0.5)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        handle.cancel()
        cancelled = handle.wait(timeout=30)
        assert cancelled.cancelled
        # The run had its own pid namespace: what it started (setsid too) ended with it,
        # nothing is left for the sandbox's pid 1, and the sandbox keeps working.
        deadline = time.monotonic() + 2
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert processes_with(marker) == []
        after = sb.run(["sh", "-c", GUARD + "ps -eo stat= | grep -c Z || true"],
                       stdout=execbox.CAPTURE)
        assert after.exit_code == 0 and after.stdout == b"0\n"
        init = sb.init_pid
        assert init is not None
    assert processes_with(marker) == []
    assert not os.path.exists(f"/proc/{init}")
    assert zombies_of(os.getpid()) == []


def _rooted_box(tmp_path: Path) -> execbox.SandboxSpec:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    binds = [(p, p) for p in ("/usr", "/etc") if os.path.isdir(p)]
    binds += [(p, p) for p in ("/bin", "/lib", "/lib64", "/sbin")
              if os.path.isdir(p) and not os.path.islink(p)]
    links = [(os.readlink(p), p) for p in ("/bin", "/lib", "/lib64", "/sbin")
             if os.path.islink(p)]
    return execbox.SandboxSpec(root, ro_binds=binds, symlinks=links, tmpfs=["/work"])


@needs_userns
@pytest.mark.parametrize("profile", ["default", "root"])
def test_core_checks_in_both_profiles(tmp_path: Path, profile: str) -> None:
    box = execbox.SandboxSpec() if profile == "default" else _rooted_box(tmp_path)
    cwd = str(tmp_path) if profile == "default" else "/work"
    out = lines(sandboxed(
        "readlink /proc/self/exe; ps -o pid= -p 1 | tr -d ' '; ps -eo pid= | wc -l; "
        "ls /sys/class/net; ls -A /dev | wc -l; touch ok && echo work-ok; "
        "(echo x > /x) 2>/dev/null || echo root-ro; grep -E '^(CapEff|NoNewPrivs)' "
        "/proc/self/status | tr -s '\\t' ' '", sandbox=box, cwd=cwd))
    assert out[0] == "/usr/bin/readlink" and out[1] == "1" and int(out[2]) <= 4
    assert out[3:] == ["lo", "13", "work-ok", "root-ro", "CapEff: 0000000000000000",
                       "NoNewPrivs: 1"]


@needs_userns
@pytest.mark.skipif(os.geteuid() != 0, reason="privileged sandboxes are for a root caller")
def test_privileged_sandbox_still_has_no_capabilities(tmp_path: Path) -> None:
    box = execbox.SandboxSpec(uid=0, privileged=True)
    out = lines(sandboxed("id -u; cat /proc/self/uid_map | tr -s ' '; grep -E "
                          "'^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status | tr -s '\\t' ' '",
                          sandbox=box, cwd=tmp_path))
    assert out == ["0", " 0 0 4294967295", "CapEff: 0000000000000000",
                   "CapBnd: 0000000000000000", "NoNewPrivs: 1"]


@needs_userns
def test_init_passes_the_steps_status_through(tmp_path: Path) -> None:
    assert sandboxed("exit 7", cwd=tmp_path).exit_code == 7
    killed = sandboxed("kill -KILL $$", cwd=tmp_path)
    assert killed.signal == "SIGKILL" and killed.exit_code == 137
    termed = sandboxed("kill -TERM $$", cwd=tmp_path)
    assert termed.signal == "SIGTERM"


def test_working_directory_slash_is_refused() -> None:
    for bad in ("/", "/proc", "/dev", "/sys/fs"):
        with pytest.raises(execbox.SpecError) as info:
            execbox.run(["true"], sandbox=execbox.SandboxSpec(), cwd=bad)
        assert info.value.field == "cwd"
    proc = run_cli("run", "--sandbox", "--", "true", cwd="/")
    assert proc.returncode == 125 and b"working directory" in proc.stderr


@needs_userns
def test_input_root_is_never_written(tmp_path: Path) -> None:
    box = _rooted_box(tmp_path)
    root = Path(box.root or "")
    before = sorted(p.name for p in root.iterdir())
    extra = execbox.SandboxSpec(str(root), ro_binds=[(s, d) for _, s, d in box.binds],
                                symlinks=list(box.symlinks), tmpfs=["/work"],
                                dirs=["/made"])
    result = sandboxed("touch /work/x && test -d /made && echo ok", sandbox=extra, cwd="/work")
    assert lines(result) == ["ok"]
    assert sorted(p.name for p in root.iterdir()) == before


@needs_userns
def test_bind_is_nodev_and_symlinked_sources_resolve(tmp_path: Path) -> None:
    # The source is a relative symlink: bound unresolved it would point at /target.txt in
    # the sandbox, which does not exist; resolved on the host, /linked is the file itself.
    (tmp_path / "target.txt").write_text("resolved\n")
    (tmp_path / "link").symlink_to("target.txt")
    box = execbox.SandboxSpec(binds=[("/dev", "/hostdev")],
                              ro_binds=[(str(tmp_path / "link"), "/linked")])
    out = lines(sandboxed("(exec 3</hostdev/null) 2>/dev/null && echo OPENED || echo nodev; "
                          "test -L /linked && echo LINK; cat /linked", sandbox=box,
                          cwd=tmp_path))
    assert out == ["nodev", "resolved"]


def _start_failure(argv: list[str], box: execbox.SandboxSpec, cwd: str) -> dict[str, str]:
    result = execbox.run(argv, sandbox=box, cwd=cwd, timeout=60)
    assert result.failure is not None, result
    return {"errno": result.failure.errno, "hint": result.failure.hint}


@needs_userns
def test_exec_hints_are_the_steps_view_not_the_hosts(tmp_path: Path) -> None:
    """A program the step cannot see is explained as missing, whatever the host has at
    that path: the host file's #! line (a secret, here) never reaches the hint, and a FIFO
    there is never opened (that would hang the supervisor)."""
    hidden = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp is the sandbox's own tmpfs
    try:
        secret = hidden / "secret.sh"
        secret.write_text("#!/SECRET-TOKEN-abc123\n")
        secret.chmod(0o600)
        os.mkfifo(hidden / "fifo")
        box = execbox.SandboxSpec()
        for program in (secret, hidden / "fifo"):
            failure = _start_failure([str(program)], box, str(tmp_path))
            assert failure == {"errno": "ENOENT", "hint": f"{program} does not exist"}
    finally:
        shutil.rmtree(hidden)


@needs_userns
def test_exec_hints_look_at_the_working_directory_the_step_has(tmp_path: Path) -> None:
    """The working directory bound at another path (as a build farm worker binds its input
    root): relative programs are judged where the step stands, not in the caller's cwd."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "noexec").write_text("echo hi\n")
    (work / "adir").mkdir()
    (work / "old.sh").write_text("#!/usr/bin/python2.4\n")
    (work / "old.sh").chmod(0o755)
    (work / "dangling").symlink_to("/nowhere/at/all")
    work.chmod(0o777)
    box = execbox.SandboxSpec(binds=[(str(work), "/work")], bind_workdir=False)
    expected = {
        "./noexec": ("EACCES", "./noexec lacks the execute bit (mode 0644); chmod +x it"),
        "./adir": ("EACCES", "./adir is a directory"),
        "./old.sh": ("ENOENT", "the #! line of ./old.sh names the interpreter "
                               "/usr/bin/python2.4, which does not exist"),
        "./dangling": ("ENOENT", "./dangling is a dangling symbolic link"),
    }
    for program, (code, hint) in expected.items():
        assert _start_failure([program], box, "/work") == {"errno": code, "hint": hint}


@needs_userns
@pytest.mark.parametrize("entry,target", [("proc", "bin"), ("tmp", "/"), ("dev", "/"),
                                          ("sys", "etc")])
def test_a_symlinked_system_mount_point_in_the_root_is_refused(tmp_path: Path, entry: str,
                                                               target: str) -> None:
    """An input root whose proc, sys, dev or tmp is a symbolic link: the sandbox's own mount
    would land wherever it points (over /bin, or over the whole root); refused, named."""
    root = tmp_path / "root"
    for directory in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / entry).rmdir()
    (root / entry).symlink_to(target)
    box = execbox.SandboxSpec(root, root_writable=True)
    result = execbox.run(["/bin/true"], sandbox=box, timeout=60)
    assert result.failure is not None, result
    step = "tmpfs /tmp" if entry == "tmp" else f"mount /{entry}"
    assert (result.failure.step, result.failure.errno) == (step, "ELOOP")
    assert f"/{entry} in the sandbox's root is a symbolic link" in result.failure.hint
    assert (root / entry).is_symlink() and os.listdir(root / "bin") == []
