"""The step launcher (linux/launcher.py): a ready sandbox process execs into it ahead of the
job, and it carries out the rest of the plan as syscalls. A step launched through it must
be exactly what the Python steps make: same ids, capabilities, fds, mounts, limits,
environment, and the same failure reports with the same hints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from execbox.linux import launcher

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a root caller's sandbox (needs root)"),
]

# In a process of its own (as a supervisor): a ready process made for the job's profile,
# waiting in the launcher or in Python, then the job adopted by it.
SCRIPT = r"""
import json, os, sys, time
from execbox.model.options import build_spec
from execbox.model.sandbox import SandboxSpec
from execbox.plan.build import build_plan
from execbox.spawn import ready
from execbox.supervise.supervision import Supervision

mode, job = sys.argv[1], json.loads(sys.argv[2])
box = SandboxSpec(**job.pop("box", {}))
passed = {}
for target, text in job.pop("pass", {}).items():
    r, w = os.pipe()
    os.write(w, text.encode())
    os.close(w)
    passed[int(target)] = r
out = open(job.pop("out"), "wb")
spec = build_spec(job.pop("argv"), sandbox=box, **job)
fd_map = [[out.fileno(), 1], [out.fileno(), 2], *[[r, t] for t, r in passed.items()]]
plan = build_plan(spec, fd_map)
profile = ready.profile_of(plan)
if mode == "python" and profile.child[-1] == ready.LAUNCHER:
    profile.child.pop()
prepared = ready.prepare(profile)
assert prepared is not None and prepared.launcher == (mode == "launcher"), mode
assert prepared.wait_built(30)
rss = 0
with open(f"/proc/{prepared.pid}/status") as f:
    for line in f:
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
adopted, explained = [], []
take, explain = Supervision._adopt, Supervision._explain_exec
def adopt(self, *args):
    adopted.append(True)
    return take(self, *args)
def explain_exec(self, *args):
    explained.append(True)
    return explain(self, *args)
Supervision._adopt, Supervision._explain_exec = adopt, explain_exec
supervision = Supervision(spec, build_plan(spec, fd_map), prepared)
pid = supervision.start()
result = supervision.run()
out.close()
print(json.dumps({"adopted": bool(adopted), "ran_it": pid is not None and pid == prepared.pid,
                  "explained": bool(explained), "exit": result.exit_code,
                  "failure": None if result.failure is None else {
                      "step": result.failure.step, "errno": result.failure.errno,
                      "message": result.failure.message, "hint": result.failure.hint},
                  "rss_kb": rss}))
"""

# What a step can tell about where it stands.
PROBE = r"""
import json, os, resource, sys
status = {}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                   "NoNewPrivs", "Seccomp"):
            status[key] = value.split()
fds = {}
for fd in sorted(os.listdir("/proc/self/fd"), key=int):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{fd}").split(":[")[0]
    except OSError:
        pass
passed = {}
for fd in (3, 4, 5, 9):
    try:
        passed[fd] = os.read(fd, 100).decode()
    except OSError as exc:
        passed[fd] = exc.errno
mounts = {}
with open("/proc/self/mountinfo") as f:
    for line in f:
        fields = line.split()
        optional = fields[6:fields.index("-")]
        mounts[fields[4]] = [fields[5].split(",")[0],
                             sorted(o.split(":")[0] for o in optional)]
mask = os.umask(0)
try:
    open("written", "w").close()
    written = True
except OSError:
    written = False
try:
    open("/root-file", "w").close()
    root_written = True
except OSError:
    root_written = False
owned = os.stat("/srv/owned")
try:
    open("/srv/owned/new", "w").close()
    owned_written = os.stat("/srv/owned/new").st_uid
except OSError as exc:
    owned_written = exc.errno
with open("/opt/null", "w") as null:
    null.write("x")
made = os.stat("..").st_mode & 0o7777  # a mount point made for the working directory
print(json.dumps({"status": status, "fds": fds, "passed": passed, "cwd": os.getcwd(),
                  "made": made,
                  "host": os.uname().nodename, "umask": mask,
                  "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
                  "env": dict(os.environ), "mounts": mounts, "written": written,
                  "root_written": root_written, "argv": sys.argv[1:],
                  "owned": [owned.st_uid, owned.st_gid], "owned_written": owned_written},
                 sort_keys=True))
"""

needs_launcher = pytest.mark.skipif(not launcher.available(),
                                    reason=f"no step launcher here: {launcher.why_unavailable()}")


def _run(mode: str, job: dict[str, object], tmp: Path) -> tuple[dict[str, object], str]:
    out = tmp / f"out-{mode}"
    job = {**job, "out": str(out)}
    env = {k: v for k, v in os.environ.items() if k != "EXECBOX_STEP_LAUNCHER"}
    command = [sys.executable, "-c", SCRIPT, mode, json.dumps(job)]
    if shutil.which("unshare"):  # as on a systemd host, where the mounts are shared: in a
        # mount namespace of the test's own, nothing of it reaches the host
        command = ["unshare", "--mount", "--propagation", "shared", *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["adopted"], report  # the job went to the ready process
    return report, out.read_text()


def _both(job: dict[str, object], tmp: Path, nested: bool = False
          ) -> tuple[dict[str, object], str, dict[str, object], str]:
    """The job run through each kind of ready process, each in a working directory of its
    own (nested: with tmp/cache bound at .cache below it)."""
    reports = []
    for mode in ("launcher", "python"):
        (tmp / mode).mkdir()
        box = dict(job.get("box", {}))  # type: ignore[call-overload]
        if nested:
            (tmp / mode / ".cache").mkdir()
            box["binds"] = [(str(tmp / "cache"), str(tmp / mode / ".cache"))]
        reports.append(_run(mode, {**job, "box": box, "cwd": str(tmp / mode)}, tmp))
    (fast, fast_out), (slow, slow_out) = reports
    return fast, fast_out, slow, slow_out


@needs_launcher
def test_a_step_through_the_launcher_stands_where_a_python_steps_one_does(tmp_path: Path
                                                                          ) -> None:
    python3 = shutil.which("python3", path="/usr/bin")
    if python3 is None:
        pytest.skip("needs /usr/bin/python3 inside the sandbox for the probe")
    # fds 3, 4 and 5 are where the launcher keeps its own socket, error pipe and user
    # namespace: a job's fds must still land there.
    job = {"argv": [python3, "-I", "-S", "-c", PROBE, "an argument", "x y"],
           "env": {"A": "1", "PATH": "/usr/bin:/bin", "EMPTY": ""}, "umask": 0o044,
           "rlimits": {"nofile": (512, 1024)},
           "pass": {"3": "three", "4": "four", "5": "five", "9": "nine"},
           "box": {"ro_binds": [("/etc/hostname", "/opt/hostname")],
                   "binds": [(str(tmp_path / "owned"), "/srv/owned")],
                   "dev_binds": [("/dev/null", "/opt/null")]}}
    (tmp_path / "owned").mkdir()
    os.chown(tmp_path / "owned", 1234, 1234)  # a bind owned by another user: idmapped too
    fast, fast_out, slow, slow_out = _both(job, tmp_path)
    assert fast["exit"] == slow["exit"] == 0, (fast, slow, fast_out, slow_out)
    assert fast["ran_it"] and slow["ran_it"], (fast, slow)  # not the usual way
    def same_names(out: str, mode: str) -> dict[str, Any]:
        """The two runs' own paths (working directory, output file) named alike."""
        out = out.replace(str(tmp_path / mode), "WORKDIR").replace(f"out-{mode}", "OUT")
        return dict(json.loads(out))

    seen, expected = same_names(fast_out, "launcher"), same_names(slow_out, "python")
    assert seen["cwd"] == "WORKDIR" and seen["mounts"]["WORKDIR"][0] == "rw"
    assert seen == expected
    assert seen["passed"] == {"3": "three", "4": "four", "5": "five", "9": "nine"}
    assert seen["written"] and not seen["root_written"]
    assert seen["status"]["CapEff"] == ["0000000000000000"]
    assert seen["status"]["NoNewPrivs"] == ["1"]
    assert sorted(seen["fds"]) == ["0", "1", "2", "3", "4", "5", "9"]
    assert seen["mounts"]["/"][0] == "ro" and seen["mounts"]["/opt/hostname"][0] == "ro"
    # The binds are private copies: no mount crosses between host and sandbox.
    assert seen["mounts"]["WORKDIR"][1] == seen["mounts"]["/srv/owned"][1] == []
    assert seen["umask"] == 0o044 and seen["nofile"] == [512, 1024]
    assert seen["made"] == 0o755  # a mount point: not made with the job's umask
    assert seen["owned"] == [0, 0] and seen["owned_written"] == 0  # the step's own ids
    # What waited for the job was the launcher, not a copy of the supervisor's Python.
    assert fast["rss_kb"] < 2048 < slow["rss_kb"], (fast, slow)


@needs_launcher
@pytest.mark.parametrize("case", ["missing", "directory", "crlf", "no-file-limit"])
def test_a_failure_in_the_launcher_reads_as_the_python_steps_one(tmp_path: Path,
                                                                 case: str) -> None:
    """Same step, errno, message and hint: an execve failure is explained by the Python
    steps standing where the launcher stood (they never run the step)."""
    script = tmp_path / "crlf.sh"
    script.write_bytes(b"#!/bin/sh\r\necho ran > ran\r\n")
    script.chmod(0o755)
    jobs: dict[str, dict[str, object]] = {
        "missing": {"argv": ["no-such-command-here"]},
        "directory": {"argv": ["/tmp"]},
        "crlf": {"argv": [str(script)], "box": {"binds": [(str(tmp_path), "/w")]}},
        "no-file-limit": {"argv": ["true"], "rlimits": {"nofile": (1 << 30, 1 << 30)}},
    }
    job = {"env": {"PATH": "/usr/bin:/bin"}, **jobs[case]}
    if case == "crlf":
        job["argv"] = ["/w/crlf.sh"]
    fast, _, slow, _ = _both(job, tmp_path)
    assert fast["failure"] is not None and fast["failure"] == slow["failure"], (fast, slow)
    # the launcher ran the job; an execve failure it reported was explained by Python steps
    assert fast["explained"] == (fast["failure"]["step"] == "execve") and not slow["explained"]
    assert fast["exit"] == slow["exit"]
    assert not (tmp_path / "launcher" / "ran").exists()  # an explanation never runs it
    assert fast["failure"]["hint"], fast


def test_the_launcher_in_the_package_is_built_from_its_source(tmp_path: Path) -> None:
    """linux/launcher_code.py is what scripts/build-launcher.sh makes of launcher.c."""
    from execbox.linux import launcher_code

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc here to rebuild the launcher with")
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[0]
    if version != launcher_code.COMPILER:
        pytest.skip(f"built with {launcher_code.COMPILER}, this is {version}")
    root = Path(__file__).resolve().parent.parent
    copy = tmp_path / "repo"
    for part in ("scripts/build-launcher.sh", "src/execbox/linux/launcher.c"):
        (copy / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / part, copy / part)
    proc = subprocess.run([str(copy / "scripts/build-launcher.sh")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    built = (copy / "src/execbox/linux/launcher_code.py").read_text()
    assert built == (root / "src/execbox/linux/launcher_code.py").read_text()


@needs_launcher
@pytest.mark.parametrize("case", ["nested-bind", "many-fds"])
def test_a_job_the_launcher_cannot_carry_out_launches_the_usual_way(tmp_path: Path,
                                                                   case: str) -> None:
    """A bind below another bind (its mount point is inside the first one's source), or
    more fds than one message carries: the ready process is discarded and the step
    runs as with the Python steps, with the same outcome."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "inside").write_text("cached")
    script = ("test \"$(cat .cache/inside)\" = cached" if case == "nested-bind"
              else "ls /proc/self/fd | wc -l > count")
    job: dict[str, object] = {"argv": ["sh", "-c", script],
                              "env": {"PATH": "/usr/bin:/bin"}}
    if case == "many-fds":
        job["pass"] = {str(fd): "x" for fd in range(3, 73)}
    fast, _, slow, _ = _both(job, tmp_path, nested=case == "nested-bind")
    assert fast["exit"] == slow["exit"] == 0, (fast, slow)
    assert not fast["ran_it"] and slow["ran_it"] == (case != "many-fds"), (fast, slow)


@needs_launcher
@pytest.mark.parametrize("case", ["tight-nofile", "bind-over-root", "bind-over-root-as-//",
                                  "directory-onto-file"])
def test_the_launcher_and_the_python_steps_agree_at_the_edges(tmp_path: Path, case: str
                                                              ) -> None:
    """A nofile limit just above the step's highest fd works both ways (it is the step's
    limit, not its set-up's); a bind over / and a directory bound onto a file go the Python
    steps' way (the launcher would make another mount, or fail with another errno)."""
    (tmp_path / "tree").mkdir()
    jobs: dict[str, dict[str, object]] = {
        "tight-nofile": {"rlimits": {"nofile": (10, 10)}, "pass": {"9": "nine"}},
        "bind-over-root": {"box": {"ro_binds": [(str(tmp_path / "tree"), "/")]}},
        "bind-over-root-as-//": {"box": {"ro_binds": [(str(tmp_path / "tree"), "//")]}},
        "directory-onto-file": {"box": {"ro_binds": [(str(tmp_path / "tree"),
                                                      "/etc/hostname")]}},
    }
    # (a shell's redirection would save fds above 9; the step's user may not open the pipe)
    script = "readlink /proc/self/fd/9 | cut -c1-4; ulimit -n; ulimit -Hn"
    job = {"argv": ["sh", "-c", script], "env": {"PATH": "/usr/bin:/bin"}, **jobs[case]}
    fast, fast_out, slow, slow_out = _both(job, tmp_path)
    fast_text = json.dumps(fast["failure"]).replace(str(tmp_path / "launcher"), "WORKDIR")
    slow_text = json.dumps(slow["failure"]).replace(str(tmp_path / "python"), "WORKDIR")
    assert fast["exit"] == slow["exit"] and fast_text == slow_text, (fast, slow)
    if case == "tight-nofile":
        assert fast["exit"] == 0 and fast["ran_it"] and slow["ran_it"], (fast, slow)
        assert fast_out == slow_out == "pipe\n10\n10\n", (fast_out, slow_out)
    else:
        assert fast["failure"] is not None and not fast["ran_it"], fast
    if case == "directory-onto-file":
        assert fast["failure"]["errno"] == "ENOTDIR", fast  # type: ignore[index]


def _emitted_fresh(rest: list[Any]) -> bytes:
    from execbox.spawn import launcher_program as lp

    builder = lp._Builder(rest, os.getpid(), {}, (0, 0), -1)
    builder.gather()
    return builder.emit()


def _plan(sources: list[int], argv: list[str], env: list[list[str]]) -> list[Any]:
    return [("dup2", ([[source, target] for target, source in enumerate(sources)],)),
            ("close_fds", ([],)), ("umask", (0o22,)), ("chdir", ("/work",)),
            ("drop_privileges", ()), ("execve", (argv, env, ["/usr/bin", "/bin"]))]


def test_a_program_is_kept_only_for_the_plan_it_was_emitted_from() -> None:
    """A worker's steps mostly repeat one plan: its program is emitted once and sent again
    (launcher_program._programs). The supervisor's fd numbers of the job's fds may differ
    from job to job; everything else the program says must be the job's own."""
    from execbox.spawn import launcher_program as lp

    lp._programs.clear()
    env = [["PATH", "/usr/bin:/bin"], ["HOME", "/root"]]
    first, sent = lp.build(_plan([40, 41, 42], ["true"], env), os.getpid(), {}, (0, 0), -1)[:2]
    assert sent == [40, 41, 42]
    # The same plan on other fds: the kept message, which names fds by their order sent.
    again, sent = lp.build(_plan([50, 52, 51], ["true"], env), os.getpid(), {}, (0, 0), -1)[:2]
    assert sent == [50, 52, 51] and again is first
    assert again == _emitted_fresh(_plan([50, 52, 51], ["true"], env))
    # Anything else that differs gets a program of its own, equal to one emitted afresh.
    for other in (_plan([40, 40, 42], ["true"], env),  # one fd dup'ed twice
                  _plan([40, 41], ["true"], env),
                  _plan([40, 41, 42], ["false"], env),
                  _plan([40, 41, 42], ["true"], [*env, ["A", "1"]])):
        message = lp.build(other, os.getpid(), {}, (0, 0), -1)[0]
        assert message != first and message == _emitted_fresh(other), other
    for inside, userns in (((1000, 1000), -1), ((0, 0), 7)):
        message = lp.build(_plan([40, 41, 42], ["true"], env), os.getpid(), {}, inside,
                           userns)[0]
        fresh = lp._Builder(_plan([40, 41, 42], ["true"], env), os.getpid(), {}, inside,
                            userns)
        fresh.gather()
        assert message == fresh.emit() and (userns < 0 or message != first)
    # What is checked of the job itself is checked for every job, kept message or not.
    idmapped = [("prepare_idmaps", ([[1000, 1000]],)), *_plan([40], ["true"], env)]
    lp.build(idmapped, os.getpid(), {"idmap 1000:1000": 99}, (0, 0), -1)
    with pytest.raises(lp.Unexpressible, match="idmap 1000:1000"):
        lp.build(idmapped, os.getpid(), {}, (0, 0), -1)


def test_a_kept_plans_program_comes_from_its_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a kept plan's copies (one Plan.memo), the program is looked up by the few values
    of the job that emit() reads besides the plan (ids inside, a step user namespace or
    not, the binds' idmaps, how many fds go): no key of the whole plan is made again, and
    the message is the one emitting would give. Other ids inside are looked up anew."""
    from execbox.spawn import launcher_program as lp

    lp._programs.clear()
    from conftest import calls_to

    keys = calls_to(monkeypatch, lp._Builder, "key")
    env = [["PATH", "/usr/bin:/bin"]]
    memo: dict[Any, Any] = {}
    first = lp.build(_plan([40, 41, 42], ["true"], env), os.getpid(), {}, (0, 0), -1, memo)[0]
    assert len(keys) == 1
    again, sent = lp.build(_plan([50, 52, 51], ["true"], env), os.getpid(), {}, (0, 0), -1,
                           memo)[:2]
    assert len(keys) == 1 and again is first and sent == [50, 52, 51]
    assert again == _emitted_fresh(_plan([50, 52, 51], ["true"], env))
    lp.build(_plan([50, 52, 51], ["true"], env), os.getpid(), {}, (1000, 1000), -1, memo)
    assert len(keys) == 2 and len(memo) == 2
