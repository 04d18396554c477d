"""A real BuildGrid farm on loopback for end-to-end tests.

A private PostgreSQL cluster and one all-in-one BuildGrid server (CAS, ByteStream, Action
Cache, Execution, Operations, Bots and Capabilities on one 127.0.0.1 port), both in a work
directory, started and stopped by pid. Every process started here is recorded in WORKDIR/pids
so that the leftovers of a crashed run can be ended later, by pid, after checking that
/proc/PID still is that process.

    from farm import Farm, farm_fixture             (tests/ is on sys.path, like conftest)
    farm = pytest.fixture(scope="module")(farm_fixture)

    def test_x(farm: Farm) -> None:
        run = farm.execute("-p", "execbox-test-pool", "a", "--", str(root), "/bin/true",
                           timeout=120)

By hand (stdlib only, so BuildGrid's own Python runs it too):
    python tests/farm.py start DIR | stop DIR        (scripts/farm.sh start|stop DIR)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

REPO = Path(__file__).resolve().parent.parent
FARM_SH = REPO / "scripts" / "farm.sh"
# `scripts/farm.sh install` exits with this when a prerequisite is missing and cannot be
# installed here (no Python 3.13; no PostgreSQL 15 and not root).
PREREQUISITE_MISSING = 3

# Platform keys a job may send; any other is refused with FAILED_PRECONDITION. A job with a
# match key goes only to a bot whose first device (BotSession.worker.devices[0].properties)
# has that key and value; wildcard keys reach the worker but take no part in matching.
MATCH_KEYS = ("OSFamily", "ISA", "execbox-test-pool")
WILDCARD_KEYS = ("network", "unixUID", "unixGID")

# BuildGrid hands a bot no lease when 0.8 * min(keepalive, the bot's RPC deadline) is under its
# 3 s network timeout, so a keepalive below this makes a farm that never runs anything.
MIN_KEEPALIVE = 3.75

DB_USER = "bgd"
DB_NAME = "postgres"
POSTGRES_START_TIMEOUT = 60.0
MIGRATE_TIMEOUT = 300.0
SERVER_START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0


class FarmError(RuntimeError):
    """The farm could not be started, used or stopped."""


class FarmUnavailable(FarmError):
    """A prerequisite (Python 3.13 for BuildGrid, PostgreSQL 15) is missing."""


# --- where things are ---------------------------------------------------------------------


def farm_dir() -> Path:
    return Path(os.environ.get("EXECBOX_FARM_DIR") or Path.home() / ".cache" / "execbox-farm")


def bgd_binary() -> Path | None:
    """The bgd to use: $EXECBOX_BGD if set, else the one `scripts/farm.sh install` made."""
    configured = os.environ.get("EXECBOX_BGD")
    if configured:
        path = Path(configured)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    venv = farm_dir() / "buildgrid"
    path = venv / "bin" / "bgd"
    if (venv / ".execbox-installed").is_file() and os.access(path, os.X_OK):
        return path
    return None


def pg_bindir() -> Path:
    return Path(os.environ.get("EXECBOX_PG_BIN") or "/usr/lib/postgresql/15/bin")


def install() -> Path:
    """Run `scripts/farm.sh install` and return bgd's path."""
    proc = subprocess.run([str(FARM_SH), "install"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    message = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if proc.returncode == PREREQUISITE_MISSING:
        raise FarmUnavailable(message)
    if proc.returncode != 0:
        raise FarmError(f"scripts/farm.sh install failed:\n{proc.stderr.strip()}")
    return Path(proc.stdout.strip().splitlines()[-1])


def runs_dir() -> Path:
    """The parent of farm_fixture's work directories: private to this user, and searchable
    by the postgres user (pytest's own base directory is mode 0700)."""
    path = Path(os.environ.get("EXECBOX_FARM_RUNS")
                or Path(tempfile.gettempdir()) / f"execbox-farm-{os.geteuid()}")
    try:
        path.mkdir(mode=0o711)
    except FileExistsError:
        pass
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.geteuid():
        raise FarmError(f"{path} is not a directory owned by uid {os.geteuid()}")
    os.chmod(path, 0o711)
    return path


# --- processes, recorded by pid -----------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode().split()


def starttime(pid: int) -> int | None:
    """The start time of a live (not zombie) process, in clock ticks after boot."""
    fields = _stat_fields(pid) if pid > 0 else None
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class ProcessRecord:
    """One process started for a farm: a line of WORKDIR/pids."""

    role: str
    pid: int
    start: int  # its starttime, which tells a reused pid apart
    marker: str  # a string its command line contains
    owner: int  # the process that started it
    owner_start: int

    def alive(self) -> bool:
        return starttime(self.pid) == self.start and self.marker in cmdline(self.pid)

    def owner_alive(self) -> bool:
        return starttime(self.owner) == self.owner_start


def record(workdir: Path, entry: ProcessRecord) -> None:
    with (workdir / "pids").open("a", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.asdict(entry)) + "\n")


def records(workdir: Path) -> list[ProcessRecord]:
    try:
        lines = (workdir / "pids").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(ProcessRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # a line cut short by a crash
    return out


def _first_signal(role: str) -> signal.Signals:
    # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for its clients to leave.
    return signal.SIGINT if role == "postgres" else signal.SIGTERM


def end_recorded(entry: ProcessRecord, timeout: float = STOP_TIMEOUT) -> bool:
    """End a recorded process that is not our child: its first signal, then SIGKILL. Each
    signal goes only to a pid that still is that process. False if it was not running."""
    if not entry.alive():
        return False
    for sig, wait in ((_first_signal(entry.role), timeout), (signal.SIGKILL, 10.0)):
        if not entry.alive():
            return True
        try:
            os.kill(entry.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while entry.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    if entry.alive():
        raise FarmError(f"{entry.role} (pid {entry.pid}) survived SIGKILL")
    return True


def kill_leftovers(workdir: Path) -> list[int]:
    """End the processes recorded in workdir/pids that still run and whose starter is gone
    (a crashed or detached run); the database goes last. Returns their pids. Raises
    FarmError if a live process there belongs to a farm whose starter still runs."""
    live = [entry for entry in records(workdir) if entry.alive()]
    busy = [e for e in live if e.owner_alive() and e.owner != os.getpid()]
    if busy:
        raise FarmError(f"{workdir} is in use by a farm started by pid {busy[0].owner} "
                        f"({busy[0].role} pid {busy[0].pid} runs)")
    live.sort(key=lambda entry: entry.role == "postgres")
    return [entry.pid for entry in live if end_recorded(entry)]


def reap_runs(parent: Path) -> None:
    """Remove the run directories under parent whose starter is gone, ending their leftover
    processes first. A run directory is named run-PID-STARTTIME-*, after its starter."""
    for run in parent.glob("run-*-*-*"):
        parts = run.name.split("-")
        if not run.is_dir() or run.is_symlink() or not (parts[1] + parts[2]).isdigit():
            continue
        if starttime(int(parts[1])) == int(parts[2]):
            continue
        try:
            kill_leftovers(run)
        except FarmError:
            continue
        shutil.rmtree(run, ignore_errors=True)


def new_run_dir(parent: Path) -> Path:
    me = os.getpid()
    path = Path(tempfile.mkdtemp(prefix=f"run-{me}-{starttime(me)}-", dir=parent))
    os.chmod(path, 0o711)
    return path


def _end_child(proc: subprocess.Popen[Any], sig: signal.Signals, timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- small helpers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (as servers do, SO_REUSEADDR:
    connections left in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def speaks_http2(port: int) -> bool:
    """Whether 127.0.0.1:port answers an HTTP/2 connection preface with SETTINGS, as a
    started gRPC server does."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0")
            head = b""
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    return head[3] == 0x04


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path}: missing)"
    return f"--- {path} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


def parse_json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects in text, as `bgd operation list --json` prints them one after
    another; other lines are skipped."""
    decoder = json.JSONDecoder()
    out, pos = [], 0
    while (start := text.find("{", pos)) >= 0:
        try:
            value, pos = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


@dataclasses.dataclass(frozen=True)
class _RunAs:
    """The unprivileged user PostgreSQL runs as when we are root."""

    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def for_postgres(cls) -> _RunAs | None:
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise FarmUnavailable("PostgreSQL refuses to run as root and there is no "
                                  "'postgres' user (install postgresql-15)") from None
        return cls(entry.pw_uid, entry.pw_gid,
                   tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))

    def popen_args(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


# --- the farm -------------------------------------------------------------------------


@dataclasses.dataclass
class Execution:
    """One `bgd execute command` client running in the background. bgd prints each update
    of the operation (protobuf text; the first is its name) and, at the end, "Response status
    code: ..."; it exits 0 once the operation is done, whatever the action's exit code or
    status (a cancelled one too), 1 on SIGINT or an RPC error such as FAILED_PRECONDITION,
    255 when uploading or downloading fails."""

    proc: subprocess.Popen[bytes]
    directory: Path  # holds its stdout and stderr; its cwd unless submit() was given one
    args: list[str]
    cwd: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return (self.directory / "stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.directory / "stderr").read_text(errors="replace")

    @property
    def output_dir(self) -> Path:
        """Where bgd downloads the --output-file results (its --output-directory default)."""
        return self.cwd / "testing"

    def operation_name(self) -> str | None:
        found = re.search(r'^name: "([^"]*)"', self.stdout, re.MULTILINE)
        return found.group(1) if found else None

    def wait_accepted(self, timeout: float = 60.0) -> str:
        """Wait until the server has taken the request (bgd printed the operation's name)
        and return that name."""
        deadline = time.monotonic() + timeout
        while (name := self.operation_name()) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = ("exited with status " + str(self.proc.returncode)
                         if self.proc.returncode is not None else f"no operation in {timeout}s")
                raise FarmError(f"bgd execute {self.args}: {state}\nstdout:\n{self.stdout}\n"
                                f"stderr:\n{self.stderr}")
            time.sleep(0.1)
        return name

    def wait(self, timeout: float) -> subprocess.CompletedProcess[str]:
        """Wait for bgd to exit; on timeout cancel it (see cancel) and raise TimeoutExpired."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise subprocess.TimeoutExpired(self.proc.args, timeout, self.stdout,
                                            self.stderr) from None
        return self.completed()

    def cancel(self, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        """SIGINT: bgd sends CancelOperation (if it has printed the operation's name) and
        exits 1; SIGKILL if it has not exited after timeout."""
        _end_child(self.proc, signal.SIGINT, timeout)
        return self.completed()

    def completed(self) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(self.args, self.proc.returncode, self.stdout,
                                           self.stderr)


@dataclasses.dataclass
class Farm:
    """A started farm. Create with Farm.start(workdir); end with stop()."""

    workdir: Path
    bgd: Path
    instance: str
    port: int
    pg_port: int
    keepalive_timeout: float
    match_keys: tuple[str, ...]
    wildcard_keys: tuple[str, ...]
    _password: str
    _run_as: _RunAs | None
    _postgres: subprocess.Popen[bytes] | None = None
    _server: subprocess.Popen[bytes] | None = None
    _executions: list[Execution] = dataclasses.field(default_factory=list)

    # -- starting

    @classmethod
    def start(cls, workdir: Path, *, keepalive_timeout: float = 5.0, instance: str = "",
              bgd: Path | None = None, match_keys: Sequence[str] = MATCH_KEYS,
              wildcard_keys: Sequence[str] = WILDCARD_KEYS) -> Farm:
        """Start PostgreSQL and BuildGrid in workdir (created if needed; a previous farm's
        leftovers there are ended and its database is replaced). keepalive_timeout: seconds
        without hearing from a bot before BuildGrid drops its session and requeues its jobs."""
        if keepalive_timeout < MIN_KEEPALIVE:
            raise ValueError(f"keepalive_timeout must be >= {MIN_KEEPALIVE}: BuildGrid gives "
                             "no work to bots whose session expires sooner")
        bgd = bgd or bgd_binary()
        if bgd is None:
            raise FarmUnavailable("BuildGrid is not installed (scripts/farm.sh install)")
        if not (pg_bindir() / "initdb").is_file():
            raise FarmUnavailable(f"PostgreSQL 15 is not installed ({pg_bindir()}/initdb)")
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        kill_leftovers(workdir)
        farm = cls(workdir=workdir, bgd=bgd, instance=instance, port=0, pg_port=0,
                   keepalive_timeout=keepalive_timeout, match_keys=tuple(match_keys),
                   wildcard_keys=tuple(wildcard_keys), _password=secrets.token_hex(16),
                   _run_as=_RunAs.for_postgres())
        try:
            farm._start_postgres()
            farm._migrate()
            for attempt in range(3):
                farm.port = free_port()
                farm.config.write_text(farm._config_text())
                if farm._start_server(retry_on_port_clash=attempt < 2):
                    break
        except BaseException:
            farm.stop()
            raise
        return farm

    @property
    def remote(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def server_pid(self) -> int | None:
        return self._server.pid if self._server and self._server.poll() is None else None

    @property
    def postgres_pid(self) -> int | None:
        return self._postgres.pid if self._postgres and self._postgres.poll() is None else None

    @property
    def db_url(self) -> str:
        """The database's URL, without its password (in PGPASSWORD of bgd's environment)."""
        return f"postgresql://{DB_USER}@127.0.0.1:{self.pg_port}/{DB_NAME}"

    @property
    def config(self) -> Path:
        return self.workdir / "buildgrid.yml"

    @property
    def server_log(self) -> Path:
        return self.workdir / "logs" / "buildgrid.log"

    @property
    def postgres_log(self) -> Path:
        return self.workdir / "logs" / "postgres.log"

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.server_log, lines) + "\n" + tail(self.postgres_log, lines)

    def _spawn(self, role: str, argv: Sequence[str], *, marker: str,
               stdout: IO[bytes] | int | None, stderr: IO[bytes] | int | None,
               cwd: Path | None = None, env: dict[str, str] | None = None,
               as_postgres: bool = False) -> subprocess.Popen[bytes]:
        extra = self._run_as.popen_args() if as_postgres and self._run_as else {}
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, cwd=cwd, env=env, start_new_session=True,
                                **extra)
        me = os.getpid()
        record(self.workdir, ProcessRecord(role, proc.pid, starttime(proc.pid) or -1, marker,
                                           me, starttime(me) or -1))
        return proc

    def _log(self, name: str) -> IO[bytes]:
        (self.workdir / "logs").mkdir(exist_ok=True)
        return (self.workdir / "logs" / name).open("ab")

    def _bgd_env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self._password}

    def _start_postgres(self) -> None:
        pgdir = self.workdir / "pg"
        data = pgdir / "data"
        shutil.rmtree(pgdir, ignore_errors=True)
        pgdir.mkdir(mode=0o700)
        pwfile = pgdir / "pwfile"
        pwfile.write_text(self._password + "\n")
        pwfile.chmod(0o600)
        if self._run_as:
            # It must reach pgdir: workdir and every directory above it must be searchable.
            os.chmod(self.workdir, self.workdir.stat().st_mode | 0o001)
            for path in (pgdir, pwfile):
                os.chown(path, self._run_as.uid, self._run_as.gid)
            probe = subprocess.run(["/bin/sh", "-c", 'cd -- "$1"', "sh", str(pgdir)],
                                   capture_output=True, check=False, **self._run_as.popen_args())
            if probe.returncode != 0:
                raise FarmError(f"the postgres user cannot reach {pgdir} (a directory above "
                                "it is not searchable by others); use a work directory under "
                                "/tmp, as farm_fixture does")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        bindir = pg_bindir()
        with self._log("initdb.log") as log:
            initdb = self._spawn(
                "initdb", [str(bindir / "initdb"), "-D", str(data), "-U", DB_USER,
                           f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                           "--locale=C", "--no-sync"],
                marker=str(data), stdout=log, stderr=subprocess.STDOUT, cwd=pgdir, env=env,
                as_postgres=True)
        try:
            rc = initdb.wait(120)
        except subprocess.TimeoutExpired:
            _end_child(initdb, signal.SIGTERM, 5)
            rc = -1
        pwfile.unlink()
        if rc != 0:
            raise FarmError("initdb failed\n" + tail(self.workdir / "logs" / "initdb.log"))
        for attempt in range(3):
            self.pg_port = free_port()
            with self._log("postgres.log") as log:
                self._postgres = self._spawn(
                    "postgres",
                    [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                     "-p", str(self.pg_port), "-k", str(pgdir),
                     # A throwaway database: durability off, small.
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "shared_buffers=16MB",
                     "-c", "max_connections=50"],
                    marker=str(data), stdout=log, stderr=subprocess.STDOUT, cwd=pgdir, env=env,
                    as_postgres=True)
            if self._wait_postgres(data):
                return
            if attempt == 2 or port_free(self.pg_port):
                raise FarmError("PostgreSQL did not start\n" + tail(self.postgres_log))

    def _wait_postgres(self, data: Path) -> bool:
        """True once it accepts connections, False if it exited (its port may have been
        taken between free_port() and its bind)."""
        assert self._postgres is not None
        deadline = time.monotonic() + POSTGRES_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._postgres.poll() is not None:
                return False
            try:
                lines = (data / "postmaster.pid").read_text().splitlines()
            except OSError:
                lines = []
            # postmaster.pid: pid, data dir, start time, port, socket dir, address, shm, status
            if len(lines) >= 8 and lines[0] == str(self._postgres.pid) and \
                    lines[7].strip() == "ready":
                return True
            time.sleep(0.05)
        raise FarmError(f"PostgreSQL not ready after {POSTGRES_START_TIMEOUT}s\n"
                        + tail(self.postgres_log))

    def _migrate(self) -> None:
        with self._log("migrate.log") as log:
            proc = self._spawn("migrate", [str(self.bgd), "migrate", "apply", self.db_url],
                               marker=self.db_url, stdout=log, stderr=subprocess.STDOUT,
                               cwd=self.workdir, env=self._bgd_env())
        try:
            rc = proc.wait(MIGRATE_TIMEOUT)
        except subprocess.TimeoutExpired:
            _end_child(proc, signal.SIGTERM, 5)
            rc = -1
        if rc != 0:
            raise FarmError("bgd migrate apply failed\n" + tail(self.workdir / "logs" /
                                                                "migrate.log"))

    def _config_text(self) -> str:
        def keys(names: Sequence[str]) -> str:
            return "[" + ", ".join(json.dumps(name) for name in names) + "]"

        return f"""\
# BuildGrid server of an execbox test farm (written by tests/farm.py).
server:
  - !channel
    address: "127.0.0.1:{self.port}"
    insecure-mode: true
grpc-server-options:
  grpc.so_reuseport: 0  # a second server on this port fails instead of sharing it
authorization:
  method: none
monitoring:
  enabled: false
# Every waiting Execute stream and bot long-poll holds a thread.
thread-pool-size: 32
connections:
  - !sql-connection &sql
    connection-string: {json.dumps(self.db_url)}
    pool-size: 5
    max-overflow: 10
storages:
  - !lru-storage &cas
    size: 256M
caches:
  - !lru-action-cache &cache
    storage: *cas
    max-cached-refs: 1024
schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *cas
    action-cache: *cache
    # A bot not heard from for this long is dropped and its jobs requeued; expired sessions
    # are looked for every second.
    bot-session-keepalive-timeout: {self.keepalive_timeout}
    session-expiry-timer-interval: 1
    property-set: !dynamic-property-set
      match-property-keys: {keys(self.match_keys)}
      wildcard-property-keys: {keys(self.wildcard_keys)}
instances:
  - name: {json.dumps(self.instance)}
    services:
      - !execution
        scheduler: *scheduler
      - !action-cache
        cache: *cache
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
"""

    def _start_server(self, *, retry_on_port_clash: bool) -> bool:
        """Start bgd server on self.port and wait until it speaks gRPC. False (when
        retry_on_port_clash) if it exited because something else took the port."""
        pidfile = self.workdir / "buildgrid.pid"
        pidfile.unlink(missing_ok=True)
        with self._log("buildgrid.log") as log:
            self._server = self._spawn(
                "buildgrid", [str(self.bgd), "server", "start", "-vv", str(self.config),
                              "--pid-file", str(pidfile)],
                marker=str(self.config), stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=self._bgd_env())
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                if retry_on_port_clash and not port_free(self.port):
                    return False
                raise FarmError(f"bgd server exited with status {self._server.returncode}\n"
                                + tail(self.server_log))
            # It writes the pid file once its gRPC server has started.
            try:
                started = pidfile.read_text().strip() == str(self._server.pid)
            except OSError:
                started = False
            if started and speaks_http2(self.port):
                return True
            time.sleep(0.1)
        raise FarmError(f"bgd server not answering on {self.remote} after "
                        f"{SERVER_START_TIMEOUT}s\n" + tail(self.server_log))

    # -- using

    def restart_server(self) -> None:
        """Stop BuildGrid (by pid) and start it again on the same port and database."""
        self._stop_server()
        self._start_server(retry_on_port_clash=False)

    def client(self, group: str, *args: str, timeout: float = 60.0,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run `bgd GROUP --remote REMOTE [--instance-name I] ARGS...` (GROUP: cas,
        operation, capabilities, actioncache, ...) and return what it printed."""
        argv = [str(self.bgd), group, "--remote", self.remote, *self._instance_args(), *args]
        proc = self._spawn(f"bgd-{group}", argv, marker=self.remote, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cwd=cwd or self.workdir)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_child(proc, signal.SIGTERM, 5)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
        return subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"),
                                           err.decode(errors="replace"))

    def _instance_args(self) -> list[str]:
        return ["--instance-name", self.instance] if self.instance else []

    def _checked(self, group: str, *args: str) -> str:
        proc = self.client(group, *args)
        if proc.returncode != 0:
            raise FarmError(f"bgd {group} {' '.join(args)}: exit status {proc.returncode}\n"
                            f"{proc.stdout}{proc.stderr}")
        return proc.stdout

    def capabilities(self) -> dict[str, Any]:
        """The server's capabilities (`bgd capabilities`, JSON)."""
        result: dict[str, Any] = json.loads(self._checked("capabilities"))
        return result

    def operation(self, name: str) -> dict[str, Any]:
        """An operation as JSON, its ExecuteResponse decoded (done, response.status,
        response.result.exitCode, ...)."""
        result: dict[str, Any] = json.loads(self._checked("operation", "status", "--json", name))
        return result

    def operations(self, filter_string: str | None = None) -> list[dict[str, Any]]:
        """The operations BuildGrid lists (by default the incomplete ones)."""
        extra = ["--filter", filter_string] if filter_string else []
        return parse_json_objects(self._checked("operation", "list", "--json", *extra))

    def cas_upload(self, path: Path) -> str:
        """Upload a file to the CAS; return its digest as HASH/SIZE."""
        out = self._checked("cas", "upload-file", str(path.resolve()))
        found = re.search(r"digest=\[([0-9a-f]+/\d+)\]", out)
        if not found:
            raise FarmError(f"bgd cas upload-file printed no digest:\n{out}")
        return found.group(1)

    def cas_download(self, digest: str, dest: Path) -> None:
        self._checked("cas", "download-file", digest, str(dest.resolve()))

    def submit(self, *args: str, cwd: Path | None = None) -> Execution:
        """Start `bgd execute --remote REMOTE command ARGS...` in the background. ARGS:
        [--output-file PATH]... [-p KEY VALUE]... -- INPUT_ROOT ARGV... (INPUT_ROOT
        absolute or relative to cwd, which defaults to a new directory in the workdir)."""
        runs = self.workdir / "execute"
        runs.mkdir(exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=f"{len(self._executions):03d}-", dir=runs))
        argv = [str(self.bgd), "execute", "--remote", self.remote, *self._instance_args(),
                "command", *args]
        with (directory / "stdout").open("wb") as out, (directory / "stderr").open("wb") as err:
            proc = self._spawn("bgd-execute", argv, marker=self.remote, stdout=out,
                               stderr=err, cwd=cwd or directory)
        execution = Execution(proc, directory, argv, cwd or directory)
        self._executions.append(execution)
        return execution

    def execute(self, *args: str, timeout: float = 120.0,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """submit() and wait. On timeout the client is cancelled (SIGINT, which cancels the
        operation too) and subprocess.TimeoutExpired is raised."""
        return self.submit(*args, cwd=cwd).wait(timeout)

    # -- stopping

    def _stop_server(self) -> None:
        if self._server is not None:
            _end_child(self._server, signal.SIGTERM, STOP_TIMEOUT)

    def stop(self) -> None:
        """End the bgd clients still running, then BuildGrid, then PostgreSQL, each by its
        pid (first signal, then SIGKILL after a timeout). Removes no files. Idempotent."""
        for execution in self._executions:
            _end_child(execution.proc, signal.SIGTERM, 5.0)
        self._stop_server()
        if self._postgres is not None:
            _end_child(self._postgres, signal.SIGINT, STOP_TIMEOUT)

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- pytest -------------------------------------------------------------------------------


def _must_not_skip() -> bool:
    """Under CI as root everything the farm needs can be installed, so it must work."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") and os.geteuid() == 0


def farm_fixture(tmp_path_factory: pytest.TempPathFactory, *, keepalive_timeout: float = 5.0,
                 instance: str = "") -> Iterator[Farm]:
    """A started Farm, stopped afterwards. Use as
    `farm = pytest.fixture(scope="module")(farm_fixture)`, or with other options as
    `yield from farm_fixture(tmp_path_factory, keepalive_timeout=8)` in a fixture. Installs
    BuildGrid (and, as root, PostgreSQL) if needed; skips when a prerequisite is missing,
    except as root under CI. The work directory is under runs_dir(), linked from pytest's
    temporary directory, and removed afterwards unless EXECBOX_FARM_KEEP is set (then the
    next farm_fixture removes it)."""
    import pytest

    try:
        bgd = bgd_binary()
        if os.environ.get("EXECBOX_BGD") and bgd is None:
            raise FarmError(f"EXECBOX_BGD={os.environ['EXECBOX_BGD']} is not executable")
        if bgd is None or not (pg_bindir() / "initdb").is_file():
            bgd = install()
    except FarmUnavailable as e:
        if _must_not_skip():
            pytest.fail(f"the BuildGrid farm cannot be installed: {e}", pytrace=False)
        pytest.skip(f"BuildGrid farm unavailable: {e}")
    runs = runs_dir()
    reap_runs(runs)
    workdir = new_run_dir(runs)
    # Findable from pytest's temporary directory too.
    (tmp_path_factory.mktemp("farm") / "workdir").symlink_to(workdir)
    farm = Farm.start(workdir, bgd=bgd, keepalive_timeout=keepalive_timeout, instance=instance)
    try:
        yield farm
    finally:
        farm.stop()
        print(farm.log_tail())  # shown by pytest when a test of the module failed
        if not os.environ.get("EXECBOX_FARM_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


# --- by hand --------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: farm.py start DIR | stop DIR", file=sys.stderr)
        return 2
    workdir = Path(argv[1]).resolve()
    try:
        if argv[0] == "stop":
            ended = kill_leftovers(workdir)
            print(f"stopped pids {ended}" if ended else f"nothing running in {workdir}")
            return 0
        started = time.monotonic()
        farm = Farm.start(workdir)
    except FarmError as e:
        print(f"farm: {e}", file=sys.stderr)
        return PREREQUISITE_MISSING if isinstance(e, FarmUnavailable) else 1
    print(f"BuildGrid at {farm.remote} (instance {farm.instance!r}), started in "
          f"{time.monotonic() - started:.1f}s; server pid {farm.server_pid}, PostgreSQL pid "
          f"{farm.postgres_pid} on port {farm.pg_port}; logs in {workdir}/logs")
    print(f"try:  {farm.bgd} capabilities --remote {farm.remote}")
    print(f"stop: scripts/farm.sh stop {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
