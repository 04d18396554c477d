"""Shared helpers: run the CLI, find processes by a marker, count fds/threads/children."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from execbox.supervise.proctree import processes_with

CLI = [sys.executable, "-m", "execbox"]
# Every execbox process this suite starts inherits this mark (the fork servers, their
# supervisors): a step cgroup whose living creator lacks it is another execbox user's on the
# same host, not one this suite left behind.
SESSION_MARK = "EXECBOX_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{uuid.uuid4().hex}")


def pytest_configure(config: pytest.Config) -> None:
    """A shell starts a background job with SIGINT and SIGQUIT ignored, and an ignored signal
    stays ignored across exec: a suite started that way would hand it to every program the
    tests start (a `sleep` stand-in, `bgd execute`) and they would not stop on SIGINT. Restore
    what an interactive run has."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def calls_to(monkeypatch: pytest.MonkeyPatch, owner: object, name: str
             ) -> list[tuple[object, ...]]:
    """The arguments of every call of owner.name from now on (a method's include self);
    each call still goes to the real one."""
    calls: list[tuple[object, ...]] = []
    real = getattr(owner, name)

    def recording(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


def run_cli(*args: str, timeout: float = 60,
            **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, check=False,
                          **kwargs)  # type: ignore[call-overload]


def describe_step_cgroup(path: str) -> str:
    """A leftover step cgroup, with what a failure report needs: its creator (alive, what
    it runs) and the processes still inside."""
    from execbox.cgroups.stale import creator_of
    from execbox.supervise.proctree import comm_of

    creator = creator_of(os.path.basename(path))
    who = "?"
    if creator is not None:
        comm = comm_of(creator[0])
        who = (f"pid {creator[0]}{' (this pytest)' if creator[0] == os.getpid() else ''} "
               f"{comm}" if comm else f"pid {creator[0]} gone")
    try:
        with open(f"{path}/cgroup.procs") as f:
            inside = f.read().split()
    except OSError as exc:
        inside = [f"unreadable: {exc}"]
    return f"{path} (creator {who}; inside: {inside or 'nothing'})"


def _of_this_session(pid: int) -> bool:
    """Whether pid is this process, or carries this suite's mark (a process of another
    user of the host does not; one whose environment cannot be read is taken as ours).
    /proc/PID/environ shows the environment a process was exec'd with: this process's own
    lacks the mark, which it set later for its children."""
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        return True
    return f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode() in environ


def session_cgroups(ready: bool = False) -> list[str]:
    """execbox's step cgroups (ready ones: those made ahead for a ready pid 1) below this
    process's own cgroups, in every hierarchy, but for those of another execbox user of
    the host: a cgroup whose creator is gone counts, whoever made it."""
    from execbox.cgroups.host import detect
    from execbox.cgroups.stale import PREFIX, READY_PREFIX, creator_of, gone

    host = detect()
    parents = set(host.v1.values()) | ({host.unified} if host.unified else set())
    prefix = READY_PREFIX if ready else PREFIX
    found = []
    for parent in sorted(parents):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if not name.startswith(prefix):
                continue
            creator = creator_of(PREFIX + name[len(prefix):])
            if creator is None:
                continue
            if gone(*creator) or _of_this_session(creator[0]):
                found.append(f"{parent}/{name}")
    return found


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every child of pid."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if int(fields[1]) == pid:
            out.append((int(entry), fields[0].decode()))
    return out


def zombies_of(pid: int) -> list[int]:
    return [p for p, state in children_of(pid) if state == "Z"]


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def fd_targets() -> dict[int, str]:
    """Our open fds and what each one is (a path, or a kind such as mnt:[...])."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return found


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique token to put in a step's argv; asserts no such process outlives the test."""
    token = f"execbox-marker-{uuid.uuid4().hex}"
    yield token
    leftovers = processes_with(token)
    for pid in leftovers:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not leftovers, f"processes with {token} survived: {leftovers}"


def cgroups_writable() -> bool:
    """Whether execbox can create a step cgroup (with a pids limit) from here."""
    from execbox.cgroups.step import StepCgroup

    try:
        StepCgroup.create(None, 100, None).remove()
    except OSError:
        return False
    return True


class DriftRecorder:
    """on_drift for a Sandbox: keeps every report and wakes who waits for the first."""

    def __init__(self) -> None:
        import threading

        self.reported: list[str] = []
        self.seen = threading.Event()

    def __call__(self, message: str) -> None:
        self.reported.append(message)
        self.seen.set()


# -- a CAS for the REAPI worker's CAS, cache and staging tests (a BuildGrid server, CAS only)

@pytest.fixture(scope="module")
def bgd() -> Iterator[str]:
    """The address of a CAS-only BuildGrid started for this module (stopped by pid)."""
    from test_reapi_cas import running_bgd

    with running_bgd() as address:
        yield address


@pytest.fixture
def client(bgd: str) -> Iterator[object]:
    """A CasClient on that server."""
    from execbox.adapters.reapi.cas import CasClient
    from execbox.adapters.reapi.protos import grpc

    channel = grpc.insecure_channel(bgd)
    yield CasClient(channel, "", timeout=20)
    channel.close()
