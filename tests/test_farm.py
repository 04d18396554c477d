"""The BuildGrid test farm itself: it starts, answers, queues work, restarts, and stops
leaving nothing behind. (The worker's end-to-end tests build on it.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from farm import (
    Farm,
    FarmError,
    ProcessRecord,
    farm_fixture,
    kill_leftovers,
    port_free,
    record,
    starttime,
)

farm = pytest.fixture(scope="module")(farm_fixture)


def test_capabilities_and_cas(farm: Farm, tmp_path: Path) -> None:
    caps = farm.capabilities()
    assert caps["executionCapabilities"]["execEnabled"], caps
    assert "SHA256" in caps["cacheCapabilities"]["digestFunctions"]

    blob = tmp_path / "blob"
    blob.write_bytes(b"execbox farm\n" * 100)
    digest = farm.cas_upload(blob)
    assert digest == f"{hashlib.sha256(blob.read_bytes()).hexdigest()}/{blob.stat().st_size}"
    back = tmp_path / "back"
    farm.cas_download(digest, back)
    assert back.read_bytes() == blob.read_bytes()


def test_job_without_bot_stays_queued_and_is_cancelled(farm: Farm, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "input.txt").write_text("hello\n")
    run = farm.submit("-p", "execbox-test-pool", "farm-selftest", "-p", "OSFamily", "linux",
                      "--output-file", "out.txt", "--", str(root),
                      "/bin/sh", "-c", "cat input.txt > out.txt")
    name = run.wait_accepted(timeout=60)
    time.sleep(1.5)  # no bot offers execbox-test-pool, so nothing can take it
    assert run.proc.poll() is None, run.stderr
    assert farm.operation(name)["metadata"]["stage"] == "QUEUED"
    assert name in [op["name"] for op in farm.operations()]

    done = run.cancel()
    assert done.returncode == 1, done
    assert starttime(run.pid) is None  # exited and reaped
    op = farm.operation(name)
    assert op["done"] and op["response"]["status"]["code"] == 1, op  # CANCELLED
    assert name not in [op["name"] for op in farm.operations()]


def test_unregistered_platform_key_is_refused(farm: Farm, tmp_path: Path) -> None:
    done = farm.execute("-p", "no-such-key", "x", "--", str(tmp_path), "/bin/true", timeout=60)
    assert done.returncode != 0
    assert "FAILED_PRECONDITION" in done.stderr and "no-such-key" in done.stderr, done.stderr


def test_restart_keeps_port_and_database(farm: Farm, tmp_path: Path) -> None:
    run = farm.submit("-p", "execbox-test-pool", "farm-restart", "--", str(tmp_path),
                      "/bin/true")
    name = run.wait_accepted(timeout=60)
    port, old_pid, postgres_pid = farm.port, farm.server_pid, farm.postgres_pid

    farm.restart_server()
    assert farm.port == port and farm.remote == f"http://127.0.0.1:{port}"
    assert farm.server_pid not in (None, old_pid)
    assert farm.postgres_pid == postgres_pid
    assert starttime(old_pid or 0) is None
    assert farm.capabilities()["executionCapabilities"]["execEnabled"]
    # The queued job is in the database, so it outlives the server.
    assert farm.operation(name)["metadata"]["stage"] == "QUEUED"
    # Its client lost the stream when the server went away.
    assert run.proc.wait(30) != 0
    farm.client("operation", "cancel", name)
    assert farm.operation(name)["done"]


def test_stop_ends_everything(farm: Farm) -> None:
    pids = [farm.server_pid, farm.postgres_pid]
    ports = [farm.port, farm.pg_port]
    assert None not in pids
    farm.stop()
    for pid in pids:
        assert starttime(pid or 0) is None, f"pid {pid} still runs"
    for port in ports:
        assert port_free(port), f"port {port} still taken"
    assert not [e for e in _recorded(farm.workdir) if e.alive()]
    farm.stop()  # idempotent


def _recorded(workdir: Path) -> list[ProcessRecord]:
    return [ProcessRecord(**json.loads(line))
            for line in (workdir / "pids").read_text().splitlines()]


def test_leftovers_are_ended_by_pid_only(tmp_path: Path) -> None:
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    other = subprocess.Popen(["sleep", "301"], start_new_session=True)
    try:
        start, other_start = starttime(leftover.pid), starttime(other.pid)
        assert start is not None and other_start is not None
        # A crashed run's process (its starter, pid 0, is gone)...
        record(tmp_path, ProcessRecord("postgres", leftover.pid, start, "sleep 300", 0, 0))
        # ...and a pid whose command line is not the recorded one: never signalled.
        record(tmp_path, ProcessRecord("buildgrid", other.pid, other_start, "bgd server",
                                       0, 0))
        assert kill_leftovers(tmp_path) == [leftover.pid]
        assert leftover.wait(10) == -signal.SIGINT
        assert other.poll() is None

        # A live process of a farm whose starter still runs is not a leftover.
        parent = os.getppid()
        record(tmp_path, ProcessRecord("postgres", other.pid, other_start, "sleep 301", parent,
                                       starttime(parent) or 0))
        with pytest.raises(FarmError, match="in use"):
            kill_leftovers(tmp_path)
    finally:
        for proc in (leftover, other):
            proc.kill()
            proc.wait()
