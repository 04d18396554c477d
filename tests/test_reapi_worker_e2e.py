"""`execbox worker` end to end: a real BuildGrid (on a private PostgreSQL), real clients
(`bgd execute command`, and the REAPI protos in this process for what bgd cannot ask for),
and real workers started and stopped by pid.

Each test's jobs carry their own `execbox-test-pool` platform value, so only the worker the
test means can take them. The last test checks that nothing of any action is left.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execbox.adapters.protos import execbox_pb2, resourceusage_pb2
from execbox.adapters.reapi.protos import code_pb2, re_pb2
from execbox.supervise.proctree import descendants, processes_with
from farm import Farm, farm_fixture
from reapi_client import Client

ROOT = Path(__file__).resolve().parent.parent
GRACE = 1.0

farm = pytest.fixture(scope="module")(farm_fixture)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            continue
    return alive


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _step_cgroups() -> set[str]:
    found = set()
    for base in ("/sys/fs/cgroup",):
        for directory, subdirs, _ in os.walk(base):
            for name in subdirs:
                if re.fullmatch(r"execbox-\d+-\d+-\d+", name):
                    found.add(os.path.join(directory, name))
    return found


class Worker:
    """An `execbox worker` process, started and stopped by pid."""

    def __init__(self, farm: Farm, home: Path, pool: str, *extra: str,
                 bot_id: str | None = None) -> None:
        self.farm = farm
        self.home = home
        self.pool = pool
        self.extra = extra
        self.bot_id = bot_id or f"e2e-{pool}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.log_path = home / f"worker-{pool}.log"
        self.build_dir = home / "build"
        home.mkdir(parents=True, exist_ok=True)

    def start(self) -> Worker:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [sys.executable, str(ROOT / "bin" / "execbox"), "worker",
                "--remote", self.farm.remote, "--bot-id", self.bot_id, "--capacity", "2",
                "--build-dir", str(self.build_dir), "--cache-dir", str(self.home / "cas"),
                "--property", f"execbox-test-pool={self.pool}", "--log-format", "json",
                "--grace", str(GRACE), "--poll-interval", "0.5", *self.extra]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        _wait_for(lambda: any(e["event"] == "session" for e in self.events()) or
                  self.proc is None or self.proc.poll() is not None, 60, "a bot session")
        assert self.proc.poll() is None, self.log()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, all_runs: bool = False) -> list[dict[str, Any]]:
        text = self.log()
        if not all_runs:
            text = text[getattr(self, "log_offset", 0):]
        events = []
        for line in text.splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def leases(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "lease"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="module")
def worker(farm: Farm, homes: Path) -> Iterator[Worker]:
    """The module's worker, with a pids limit (so every action has a cgroup) and metrics."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = Worker(farm, homes / "main", "main", "--pids", "512", "--metrics-port", str(port))
    started.metrics_port = port
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.fixture(scope="module")
def client(farm: Farm) -> Iterator[Client]:
    made = Client(farm.remote, farm.instance)
    try:
        yield made
    finally:
        made.close()


def _tree(tmp_path: Path, files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "input"
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _aux(result: re_pb2.ActionResult, message: Any) -> Any:
    for packed in result.execution_metadata.auxiliary_metadata:
        found = message()
        if packed.Unpack(found):
            return found
    return None


# -- the actions -------------------------------------------------------------------------

def test_an_output_file_comes_back_through_bgd_execute(farm: Farm, worker: Worker,
                                                       tmp_path: Path) -> None:
    root = _tree(tmp_path, {"in.txt": "from the input root\n"})
    run = farm.submit("-p", "execbox-test-pool", "main", "--output-file", "out.txt", "--",
                      str(root), "/bin/sh", "-c", "tr a-z A-Z < in.txt > out.txt; pwd >> out.txt")
    done = run.wait(120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = run.directory / "testing" / "out.txt"
    # The input root is at one fixed path on every worker.
    assert out.read_text() == "FROM THE INPUT ROOT\n/execbox/root\n"
    lease = worker.leases()[-1]
    assert lease["outcome"] == "success" and lease["status"] == "OK"
    assert re.fullmatch(r"[0-9a-f]{64}/\d+", lease["action"])


def test_the_readmes_bgd_example_puts_its_output_where_it_says(farm: Farm, worker: Worker,
                                                              tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    [line] = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("bgd execute")]
    argv = shlex.split(line.replace("http://127.0.0.1:PORT", farm.remote))
    assert argv[:4] == ["bgd", "execute", "--remote", farm.remote] and argv[4] == "command"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.c").write_text("int a;\nint b;\n")
    run = farm.submit("-p", "execbox-test-pool", "main", *argv[5:], cwd=tmp_path)
    done = run.wait(120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out.txt").read_text() == "2 a.c\n"
    assert not (tmp_path / "testing").exists()


def test_stdout_stderr_exit_code_and_usage(worker: Worker, client: Client,
                                           tmp_path: Path) -> None:
    action = client.action(["/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
                           _tree(tmp_path), platform={"execbox-test-pool": "main"})
    response = client.execute(action, skip_cache=True)
    assert response.status.code == code_pb2.OK, response.status
    result = response.result
    assert result.exit_code == 3
    assert client.read(result.stdout_digest) == b"to-stdout\n"
    assert client.read(result.stderr_digest) == b"to-stderr\n"
    metadata = result.execution_metadata
    assert metadata.worker == worker.bot_id
    assert metadata.execution_start_timestamp.ToNanoseconds() <= \
        metadata.execution_completed_timestamp.ToNanoseconds()
    assert metadata.input_fetch_completed_timestamp.seconds and \
        metadata.output_upload_completed_timestamp.seconds
    usage = _aux(result, resourceusage_pb2.POSIXResourceUsage)
    assert usage is not None and usage.maximum_resident_set_size > 0
    assert usage.termination_signal == ""


def test_an_output_directory_with_a_symlink_and_an_executable(worker: Worker, client: Client,
                                                              tmp_path: Path) -> None:
    script = ("mkdir -p out/sub && printf '#!/bin/sh\\necho hi\\n' > out/sub/tool && "
              "chmod +x out/sub/tool && echo data > out/data.txt && ln -s sub/tool out/link")
    action = client.action(["/bin/sh", "-c", script], _tree(tmp_path),
                           outputs=["out"], platform={"execbox-test-pool": "main"})
    response = client.execute(action, skip_cache=True)
    assert response.status.code == code_pb2.OK, response.status
    [directory] = response.result.output_directories
    assert directory.path == "out"
    tree = re_pb2.Tree.FromString(client.read(directory.tree_digest))
    top = {f.name: f for f in tree.root.files}
    assert set(top) == {"data.txt"} and not top["data.txt"].is_executable
    assert client.read(top["data.txt"].digest) == b"data\n"
    assert [(s.name, s.target) for s in tree.root.symlinks] == [("link", "sub/tool")]
    [sub] = tree.root.directories
    [child] = tree.children
    [tool] = child.files
    assert (sub.name, tool.name, tool.is_executable) == ("sub", "tool", True)
    assert client.read(tool.digest) == b"#!/bin/sh\necho hi\n"


def test_a_program_that_cannot_start_is_invalid_argument_with_execboxs_line(
        worker: Worker, client: Client, tmp_path: Path) -> None:
    action = client.action(["no-such-compiler", "-c", "x.c"], _tree(tmp_path),
                           env={"PATH": "/usr/bin:/bin"},
                           platform={"execbox-test-pool": "main"})
    response = client.execute(action, skip_cache=True)
    assert response.status.code == code_pb2.INVALID_ARGUMENT
    assert response.status.message == "execve: No such file or directory: no-such-compiler"
    failure = _aux(response.result, execbox_pb2.SetupFailure)
    assert failure is not None and (failure.step, failure.errno_name) == ("execve", "ENOENT")
    assert "PATH" in failure.hint


def test_a_timeout_is_deadline_exceeded_with_the_partial_output(worker: Worker, client: Client,
                                                                tmp_path: Path) -> None:
    script = ("echo partial; echo early > early.txt; trap '' TERM; "
              "sleep 3600.13 & wait; sleep 3600.13")
    action = client.action(["/bin/sh", "-c", script], _tree(tmp_path), outputs=["early.txt"],
                           platform={"execbox-test-pool": "main"}, timeout=2)
    started = time.monotonic()
    response = client.execute(action, skip_cache=True)
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED, response.status
    assert time.monotonic() - started < 2 + GRACE + 15
    result = response.result
    assert client.read(result.stdout_digest) == b"partial\n"
    [early] = result.output_files
    assert client.read(early.digest) == b"early\n"
    assert _alive(processes_with("3600.13")) == []


def test_a_second_identical_run_is_served_from_the_action_cache(farm: Farm, worker: Worker,
                                                                tmp_path: Path) -> None:
    root = _tree(tmp_path, {"seed": str(time.time())})
    args = ("-c", "-p", "execbox-test-pool", "main", "--output-file", "o", "--", str(root),
            "/bin/sh", "-c", "cat seed > o")
    before = len(worker.leases())
    first = farm.execute(*args, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    _wait_for(lambda: len(worker.leases()) == before + 1, 10, "the first lease")
    second = farm.submit(*args)
    assert second.wait(120).returncode == 0
    assert (second.directory / "testing" / "o").read_text() == (root / "seed").read_text()
    time.sleep(1)
    assert len(worker.leases()) == before + 1, "the second run reached the worker"


def test_network_only_with_network_on(worker: Worker, client: Client, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[bool] = []

    def accept() -> None:
        listener.settimeout(60)
        try:
            connection, _ = listener.accept()
            accepted.append(True)
            connection.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    probe = ["/usr/bin/python3", "-c",
             f"import socket; socket.create_connection(('127.0.0.1', {port}), 5)"]
    try:
        closed = client.execute(client.action(probe, _tree(tmp_path),
                                              platform={"execbox-test-pool": "main"}),
                                skip_cache=True)
        assert closed.status.code == code_pb2.OK and closed.result.exit_code != 0
        assert not accepted
        opened = client.execute(client.action(probe, _tree(tmp_path), platform={
            "execbox-test-pool": "main", "network": "on"}), skip_cache=True)
        assert opened.status.code == code_pb2.OK
        assert opened.result.exit_code == 0, client.read(opened.result.stderr_digest)
        thread.join(10)
        assert accepted == [True]
    finally:
        listener.close()


def test_cancelling_from_the_client_kills_the_whole_tree(farm: Farm, worker: Worker,
                                                        tmp_path: Path) -> None:
    # "$N.21": the marker is only in the action's own processes, not in bgd's argv.
    script = "N=3600; trap '' TERM; sleep $N.21 & sleep $N.22 & wait"
    run = farm.submit("-p", "execbox-test-pool", "main", "--", str(_tree(tmp_path)),
                      "/bin/sh", "-c", script)
    run.wait_accepted()
    _wait_for(lambda: len(_alive(processes_with("3600.2"))) == 2, 60, "the action's tree")
    cancelled_at = time.monotonic()
    run.cancel()
    _wait_for(lambda: not _alive(processes_with("3600.2")), GRACE + 2 + 1,
              "the cancelled action's tree to be gone")
    gone_after = time.monotonic() - cancelled_at
    assert gone_after <= GRACE + 2 + 1
    _wait_for(lambda: any(e["event"] == "lease cancelled" for e in worker.events()), 10,
              "the worker to log the cancellation")
    # The lease's own record comes once its tree is reaped; wait for it so that it is not
    # taken for a lease of the next test.
    _wait_for(lambda: any(e["event"] == "lease" and e.get("outcome") == "cancelled"
                          for e in worker.events()), 10, "the cancelled lease's record")
    [record] = [e for e in worker.events() if e["event"] == "lease"
                and e.get("outcome") == "cancelled"]
    assert record["status"] == "CANCELLED"
    assert any(e["event"] == "lease started" and e["lease"] == record["lease"]
               and e["action"] == record["action"] for e in worker.events())


def test_a_job_whose_platform_the_worker_lacks_is_not_taken(farm: Farm, worker: Worker,
                                                           tmp_path: Path) -> None:
    known = {None} | {e.get("lease") for e in worker.events()}
    run = farm.submit("-p", "execbox-test-pool", "elsewhere", "--", str(_tree(tmp_path)),
                      "/bin/echo", "never")
    run.wait_accepted()
    time.sleep(4)
    assert run.proc.poll() is None, "the job should still be queued"
    # A lease of an earlier test may still be logged now; only a lease never seen before
    # can be this job's.
    assert [e for e in worker.events() if e.get("lease") not in known] == []
    run.cancel()


def test_inputs_can_be_replaced_and_deleted_but_the_cache_stays_intact(
        worker: Worker, client: Client, tmp_path: Path) -> None:
    """Inputs are hardlinks of the worker's cache: `sed -i` (a new file renamed over the
    input) and rm work; writing into the shared file does not, so the next action that
    uses the same input sees it unchanged."""
    root = _tree(tmp_path, {"in.txt": "pristine\n", "d/gone.txt": "x\n"})
    changes = ("echo appended >> in.txt && exit 9; sed -i s/pristine/edited/ in.txt && "
               "cat in.txt && rm d/gone.txt && ls d | wc -l")
    first = client.execute(client.action(["/bin/sh", "-c", changes], root,
                                         platform={"execbox-test-pool": "main"}),
                           skip_cache=True)
    assert first.status.code == code_pb2.OK, first.status
    assert client.read(first.result.stdout_digest) == b"edited\n0\n"
    assert b"Permission denied" in client.read(first.result.stderr_digest)
    again = client.execute(client.action(["/bin/cat", "in.txt", "d/gone.txt"], root,
                                         platform={"execbox-test-pool": "main"}),
                           skip_cache=True)
    assert client.read(again.result.stdout_digest) == b"pristine\nx\n"


def test_a_file_name_that_is_not_utf8_fails_the_lease_not_the_worker(
        worker: Worker, client: Client, tmp_path: Path) -> None:
    make = ["/usr/bin/python3", "-c",
            "import os; os.makedirs('d'); open(b'd/\\xff\\xfe', 'w').write('x')"]
    response = client.execute(client.action(make, _tree(tmp_path), outputs=["d"],
                                            platform={"execbox-test-pool": "main"}),
                              skip_cache=True)
    assert response.status.code == code_pb2.FAILED_PRECONDITION, response.status
    assert "\\xff\\xfe" in response.status.message
    after = client.execute(client.action(["/bin/true"], _tree(tmp_path),
                                         platform={"execbox-test-pool": "main"}),
                           skip_cache=True)
    assert after.status.code == code_pb2.OK and after.result.exit_code == 0
    assert worker.proc is not None and worker.proc.poll() is None


def test_a_second_worker_on_the_same_build_directory_is_refused(farm: Farm,
                                                               worker: Worker) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "execbox"), "worker",
                          "--remote", farm.remote, "--build-dir", str(worker.build_dir),
                          "--cache-dir", str(worker.home / "cas2")],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"execbox worker: --build-dir: {worker.build_dir} is in use "
                                  f"by another execbox worker (pid {worker.pid})")


def _sysroot(tmp_path: Path) -> Path:
    """A tiny input root that is a whole system: dash and the libraries it loads."""
    root = tmp_path / "sysroot"
    listing = subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True,
                             check=True).stdout
    libraries = re.findall(r"(/\S+\.so[.\d]*)", listing)
    for source in ["/bin/dash", *libraries]:
        real = os.path.realpath(source)
        target = root / source.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(real).read_bytes())
        target.chmod(0o755)
    (root / "bin" / "sh").symlink_to("dash")
    return root


def test_input_root_as_root_with_the_platforms_unix_ids(farm: Farm, homes: Path,
                                                         client: Client,
                                                         tmp_path: Path) -> None:
    """BuildStream's way: the input root is /, with /proc, /dev and /tmp added; the action
    runs as the platform's unixUID/unixGID."""
    chroot = Worker(farm, homes / "chroot", "chroot", "--input-root-as-root")
    try:
        chroot.start()
        script = ("while read k v rest; do case $k in Uid:|Gid:) echo $k $v;; esac; "
                  "done < /proc/self/status; echo $$; [ -c /dev/null ] && echo null; "
                  "echo made > /made.txt; echo tmp > /tmp/t && echo tmp-ok; pwd")
        response = client.execute(client.action(
            ["/bin/sh", "-c", script], _sysroot(tmp_path), outputs=["made.txt"],
            env={"PATH": "/bin"},
            platform={"execbox-test-pool": "chroot", "unixUID": "1000", "unixGID": "1001"}),
            skip_cache=True)
        assert response.status.code == code_pb2.OK, response.status
        out = client.read(response.result.stdout_digest).decode().split("\n")
        assert out[:2] == ["Uid: 1000", "Gid: 1001"]
        assert int(out[2]) < 10  # its own pid namespace
        assert out[3:6] == ["null", "tmp-ok", "/"]
        [made] = response.result.output_files
        assert client.read(made.digest) == b"made\n"
    finally:
        chroot.stop()


def test_metrics_a_farm_operator_expects(worker: Worker) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics",
                                timeout=10) as page:
        text = page.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['execbox_worker_leases_total{code="OK",outcome="success"}'] >= 2
    assert values['execbox_worker_leases_total{code="DEADLINE_EXCEEDED",outcome="timeout"}'] \
        == 1
    assert values['execbox_worker_leases_total{code="INVALID_ARGUMENT",outcome="error"}'] == 1
    assert values['execbox_worker_leases_total{code="OK",outcome="nonzero_exit"}'] >= 1
    assert values["execbox_worker_running_leases"] == 0
    assert values["execbox_worker_action_duration_seconds_count"] >= 4
    assert values["execbox_worker_sandbox_launch_seconds_count"] >= 4
    assert values["execbox_worker_queue_to_start_seconds_count"] >= 4
    assert values["execbox_worker_input_fetch_bytes_total"] > 0
    # The replace-and-delete test's second action found both its files in the cache.
    hits = values["execbox_worker_cache_hits_total"]
    misses = values["execbox_worker_cache_misses_total"]
    assert hits >= 2 and misses >= 2
    assert values["execbox_worker_cache_hit_ratio"] == pytest.approx(hits / (hits + misses))


# -- lifecycle -----------------------------------------------------------------------------

def test_sigterm_cancels_running_leases_and_hands_them_back(farm: Farm, homes: Path,
                                                           tmp_path: Path) -> None:
    """Also the unsandboxed mode: the same lifecycle without a sandbox."""
    stopping = Worker(farm, homes / "term", "term", "--no-sandbox")
    successor: Worker | None = None
    try:
        stopping.start()
        run = farm.submit("-p", "execbox-test-pool", "term", "--output-file", "o", "--",
                          str(_tree(tmp_path)), "/bin/sh", "-c",
                          "N=3600; trap '' TERM; timeout -s KILL 5 sleep $N.51; echo ok > o")
        run.wait_accepted()
        _wait_for(lambda: _alive(processes_with("3600.51")), 60, "the action to run")
        assert stopping.proc is not None
        stopping.proc.send_signal(signal.SIGTERM)
        assert stopping.proc.wait(GRACE + 15) == 0
        assert not _alive(processes_with("3600.51"))
        events = stopping.events()
        assert "stopping" in [e["event"] for e in events]
        [lease] = [e for e in events if e["event"] == "lease"]
        assert lease["status"] == "UNAVAILABLE"  # BuildGrid retries it
        assert lease["outcome"] == "handed_back"
        successor = Worker(farm, homes / "term", "term", "--no-sandbox").start()
        done = run.wait(120)
        assert done.returncode == 0
        assert (run.directory / "testing" / "o").read_text() == "ok\n"
        # Unsandboxed actions get copies of their inputs: writing one spares the cache.
        client = Client(farm.remote, farm.instance)
        try:
            root = _tree(tmp_path / "copies", {"in.txt": "pristine\n"})
            platform = {"execbox-test-pool": "term"}
            wrote = client.execute(client.action(["/bin/sh", "-c", "echo more >> in.txt"],
                                                 root, platform=platform), skip_cache=True)
            assert wrote.result.exit_code == 0
            read = client.execute(client.action(["/bin/cat", "in.txt"], root,
                                                platform=platform), skip_cache=True)
            assert client.read(read.result.stdout_digest) == b"pristine\n"
        finally:
            client.close()
    finally:
        stopping.stop(signal.SIGKILL)
        if successor is not None:
            successor.stop()


def test_a_worker_killed_mid_action_is_requeued_and_a_restarted_worker_completes_it(
        farm: Farm, homes: Path, tmp_path: Path) -> None:
    first = Worker(farm, homes / "requeue", "requeue")
    restarted: Worker | None = None
    try:
        first.start()
        marker = "3600.31"
        # Both attempts run the same command: the second one, on the restarted worker,
        # ends after 6 s.
        run = farm.submit("-p", "execbox-test-pool", "requeue", "--output-file", "result",
                          "--", str(_tree(tmp_path)), "/bin/sh", "-c",
                          "N=3600; timeout 6 sleep $N.31; echo finished > result")
        run.wait_accepted()
        _wait_for(lambda: _alive(processes_with(marker)), 60, "the action to run")
        tree = descendants(first.pid)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        # execbox ends the action's tree (signal, grace, SIGKILL) when the process that
        # started it dies.
        _wait_for(lambda: not _alive(tree), 15, "the dead worker's processes to be gone")
        _wait_for(lambda: not _alive(processes_with(marker)), GRACE + 5,
                  "the dead worker's action to be gone")
        restarted = Worker(farm, homes / "requeue", "requeue").start()
        assert any(e["event"].startswith("removed what a crashed worker left")
                   for e in restarted.events())
        done = run.wait(120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (run.directory / "testing" / "result").read_text() == "finished\n"
        assert [e["outcome"] for e in restarted.leases()] == ["success"]
    finally:
        first.stop(signal.SIGKILL)
        if restarted is not None:
            restarted.stop()


def test_the_worker_reconnects_after_the_server_restarts(farm: Farm, worker: Worker,
                                                         tmp_path: Path) -> None:
    farm.restart_server()
    root = _tree(tmp_path)
    done = farm.execute("-p", "execbox-test-pool", "main", "--output-file", "o", "--",
                        str(root), "/bin/sh", "-c", "echo again > o", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert worker.proc is not None and worker.proc.poll() is None
    assert worker.leases()[-1]["outcome"] == "success"
    events = [e["event"] for e in worker.events()]
    assert "server unreachable" in events
    assert "Got goaway" not in worker.log()  # gRPC's own chatter stays out of the log


def test_sigint_drains_and_nothing_of_any_action_is_left(farm: Farm, worker: Worker,
                                                         homes: Path, tmp_path: Path) -> None:
    """Runs last: a running lease is finished (SIGINT drains), then nothing is left."""
    cgroups_before = _step_cgroups()
    run = farm.submit("-p", "execbox-test-pool", "main", "--output-file", "o", "--",
                      str(_tree(tmp_path)), "/bin/sh", "-c", "N=2; sleep $N.41; echo drained > o")
    run.wait_accepted()
    _wait_for(lambda: _alive(processes_with("2.41")), 60, "the action to run")
    tree = descendants(worker.pid)
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGINT)
    assert run.wait(60).returncode == 0
    assert (run.directory / "testing" / "o").read_text() == "drained\n"
    assert worker.proc.wait(60) == 0
    events = [e["event"] for e in worker.events()]
    assert "draining" in events and events[-1] == "stopped"
    _wait_for(lambda: not _alive(tree), 15, "the worker's processes to be gone")
    for home in homes.iterdir():
        build = home / "build"
        if build.exists():  # only the build directory's lock file stays
            assert [p.name for p in build.iterdir()] == [".lock"], f"left in {build}"
    with open("/proc/self/mountinfo") as f:
        assert str(homes) not in f.read()
    assert _step_cgroups() <= cgroups_before
