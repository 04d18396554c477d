"""One lease through ActionRunner, with a real CAS (a CAS-only BuildGrid) and real actions,
without a Bots service: what the worker reports for actions that are malformed, ask for
what the worker does not offer, or produce outputs that do not match their declaration."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("buildgrid.common")

from execbox.adapters.reapi.action import ActionRunner, LeaseOutcome, RunningLease
from execbox.adapters.reapi.cache import LocalCas
from execbox.adapters.reapi.cas import CasClient
from execbox.adapters.reapi.config import parse_worker_args
from execbox.adapters.reapi.digests import digest_of_bytes
from execbox.adapters.reapi.main import sandbox_problem
from execbox.adapters.reapi.protos import bots_pb2, code_pb2, re_pb2
from execbox.adapters.reapi.workspace import Workspace
from execbox.model.sandbox import UNPRIVILEGED_HOST_ID, step_host_id

INPUT = b"an input the cache holds\n"


@pytest.fixture(scope="module")
def sandboxed() -> None:
    if os.geteuid() != 0:
        pytest.skip("these tests run the worker as root (the farm's usual set-up)")
    problem = sandbox_problem()
    if problem is not None:
        pytest.skip(f"cannot sandbox here: {problem}")


class Harness:
    """An ActionRunner on its own cache and build directory; actions uploaded to the CAS."""

    def __init__(self, client: CasClient, home: Path, *flags: str,
                 worker_uid: int | None = None) -> None:
        self.client = client
        self.config = parse_worker_args(["--remote", "h:1", "--build-dir", str(home / "b"),
                                         "--cache-dir", str(home / "c"), *flags], env={})
        self.cache = LocalCas(self.config.cache_dir, 1 << 30)
        self.workspace = _workspace(self.config.build_dir, self.config.sandbox, worker_uid)
        self.runner = ActionRunner(self.config, client, self.cache, self.workspace)

    def close(self) -> None:
        self.workspace.close()
        self.cache.close()

    def run(self, argv: Sequence[str], *, files: dict[str, bytes] | None = None,
            wd: str = "", env: Sequence[tuple[str, str]] = (("PATH", "/usr/bin:/bin"),),
            platform: dict[str, str] | None = None, **outputs: Any) -> LeaseOutcome:
        root = re_pb2.Directory()
        blobs: list[tuple[re_pb2.Digest, bytes]] = []
        for name, data in sorted((files or {"input": INPUT}).items()):
            blobs.append((digest_of_bytes(data), data))
            root.files.add(name=name, digest=digest_of_bytes(data))
        command = re_pb2.Command(arguments=list(argv), working_directory=wd, **outputs)
        for name, value in env:
            command.environment_variables.add(name=name, value=value)
        action = re_pb2.Action(command_digest=self._put(command, blobs),
                               input_root_digest=self._put(root, blobs))
        for name, value in sorted((platform or {}).items()):
            action.platform.properties.add(name=name, value=value)
        self.client.upload(blobs)
        lease = bots_pb2.Lease(id="lease-1", state=bots_pb2.ACTIVE)
        lease.payload.Pack(action)
        return self.runner.run(lease, RunningLease(lease.id))

    @staticmethod
    def _put(message: Any, blobs: list[tuple[re_pb2.Digest, bytes]]) -> re_pb2.Digest:
        data = message.SerializeToString()
        blobs.append((digest_of_bytes(data), data))
        return digest_of_bytes(data)

    def stdout(self, outcome: LeaseOutcome) -> bytes:
        assert outcome.result is not None
        return outcome.result.stdout_raw


def _workspace(build_dir: Path, sandboxed: bool, worker_uid: int | None) -> Workspace:
    """A Workspace as a worker running as worker_uid would decide how to stage (the sandbox
    itself runs as this test's user, and the files are this test's)."""
    workspace = Workspace(build_dir, sandboxed)
    if worker_uid is not None and worker_uid != 0:
        workspace.owner = step_host_id(False)  # not root: the action is the worker's uid
        workspace.copy_inputs = True
    return workspace


@pytest.fixture
def harness(client: CasClient, tmp_path: Path, sandboxed: None) -> Iterator[Harness]:
    made = Harness(client, tmp_path)
    yield made
    made.close()


def _links(harness: Harness) -> int:
    outcome = harness.run(["/bin/sh", "-c", "stat -c %h input"])
    assert outcome.code == code_pb2.OK, outcome.message
    return int(harness.stdout(outcome))


def test_a_root_workers_inputs_are_hardlinks_of_the_cache(harness: Harness) -> None:
    assert _links(harness) >= 2


def test_a_non_root_workers_inputs_are_copies_not_links_of_the_cache(
        client: CasClient, tmp_path: Path, sandboxed: None) -> None:
    # A non-root worker's action is mapped onto the worker's own uid, which owns the cache:
    # through a hardlink it could chmod and rewrite a cached blob in place.
    # Here the sandbox still runs the action as 65534 (this test is root), so what is
    # checked is how the input was staged: a copy, not a link of the cached file.
    real = os.geteuid
    os.geteuid = lambda: 1000
    try:
        assert step_host_id(True) is None  # a non-root worker's action runs as itself
    finally:
        os.geteuid = real
    made = Harness(client, tmp_path, worker_uid=1000)
    try:
        assert _links(made) == 1
    finally:
        made.close()


def test_network_on_is_refused_by_a_worker_without_network(
        client: CasClient, tmp_path: Path, sandboxed: None) -> None:
    made = Harness(client, tmp_path, "--property", "network=off")
    try:
        outcome = made.run(["/bin/true"], platform={"network": "on"})
        assert outcome.code == code_pb2.FAILED_PRECONDITION
        assert outcome.message.startswith("platform.network: ")
        assert "network=off" in outcome.message
        assert made.run(["/bin/true"], platform={"network": "off"}).code == code_pb2.OK
    finally:
        made.close()


def test_an_output_of_the_wrong_kind_keeps_exit_code_and_streams(harness: Harness) -> None:
    outcome = harness.run(["/bin/sh", "-c", "mkdir o; echo out; echo err >&2; exit 3"],
                          output_files=["o", "fine"])
    assert outcome.code == code_pb2.FAILED_PRECONDITION
    assert outcome.message == "output_files[0]: 'o' is a directory, not a file"
    result = outcome.result
    assert result is not None
    assert (result.exit_code, result.stdout_raw, result.stderr_raw) == (3, b"out\n", b"err\n")
    assert result.stdout_digest == digest_of_bytes(b"out\n")
    assert result.execution_metadata.worker


def test_a_non_utf8_output_name_is_shown_as_bytes(harness: Harness) -> None:
    outcome = harness.run(["/bin/sh", "-c", "mkdir d && touch \"d/bad-$(printf '\\377')\""],
                          output_directories=["d"])
    assert outcome.code == code_pb2.FAILED_PRECONDITION
    assert "b'd/bad-\\xff'" in outcome.status().message
    assert "udcff" not in outcome.status().message
    assert outcome.result is not None and outcome.result.exit_code == 0


@pytest.mark.parametrize(("outputs", "field"), [
    ({"output_files": ["x"], "output_directories": ["x"]}, "output_directories[0]"),
    ({"output_files": ["x", "./x"]}, "output_files[1]"),
    ({"output_paths": ["d", "d/"]}, "output_paths[1]"),
])
def test_an_output_declared_twice_is_invalid_argument(harness: Harness, outputs: Any,
                                                      field: str) -> None:
    outcome = harness.run(["/bin/true"], **outputs)
    assert outcome.code == code_pb2.INVALID_ARGUMENT
    assert outcome.message.startswith(f"{field}: ")


def test_output_paths_are_reported_normalised(harness: Harness) -> None:
    outcome = harness.run(["/bin/sh", "-c", "mkdir d && echo x > d/f"], output_paths=["d/"])
    assert outcome.code == code_pb2.OK, outcome.message
    assert outcome.result is not None
    assert [d.path for d in outcome.result.output_directories] == ["d"]


def test_a_duplicate_environment_variable_is_invalid_argument(harness: Harness) -> None:
    outcome = harness.run(["/bin/true"], env=[("PATH", "/bin"), ("A", "1"), ("A", "2")])
    assert outcome.code == code_pb2.INVALID_ARGUMENT
    assert outcome.message == ("command.environment_variables[2].name: 'A' appears more than "
                               "once")


def test_a_working_directory_missing_from_the_input_root_is_invalid_argument(
        harness: Harness) -> None:
    outcome = harness.run(["/bin/true"], wd="nowhere")
    assert outcome.code == code_pb2.INVALID_ARGUMENT
    assert outcome.message.startswith("working_directory: 'nowhere' is not a directory")
    # as in bb_worker, an output's parent directories are created, the working directory
    # among them
    outcome = harness.run(["/bin/sh", "-c", "echo x > out"], wd="made", output_files=["out"])
    assert outcome.code == code_pb2.OK, outcome.message


def test_the_action_can_reopen_its_stdout_and_stderr(harness: Harness) -> None:
    outcome = harness.run(["/bin/sh", "-c", "echo x > /dev/stdout; echo y > /proc/self/fd/2"])
    assert outcome.code == code_pb2.OK, outcome.message
    assert outcome.result is not None
    assert (outcome.result.stdout_raw, outcome.result.stderr_raw) == (b"x\n", b"y\n")
    assert outcome.result.exit_code == 0


def test_std_stream_files_belong_to_the_actions_id(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only a root worker maps its actions onto another id")
    workspace = Workspace(tmp_path / "b", sandboxed=True)
    try:
        action = workspace.new_action()
        for stream in (action.stdout, action.stderr):
            st = stream.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == \
                (UNPRIVILEGED_HOST_ID, UNPRIVILEGED_HOST_ID, 0o600)
        action.close()
    finally:
        workspace.close()


def test_a_payload_that_does_not_decode_is_invalid_argument(harness: Harness) -> None:
    """A corrupt Action in a lease: reported as the request's fault, and the start log line
    before it (payload_digest) does not fail on it."""
    from execbox.adapters.reapi.action import payload_digest

    lease = bots_pb2.Lease(id="lease-corrupt", state=bots_pb2.ACTIVE)
    lease.payload.type_url = "type.googleapis.com/build.bazel.remote.execution.v2.Action"
    lease.payload.value = b"\xff\xff\xff"
    assert payload_digest(lease) is None
    outcome = harness.runner.run(lease, RunningLease(lease.id))
    assert outcome.code == code_pb2.INVALID_ARGUMENT, outcome.message
    assert outcome.message.startswith("lease payload: the Action does not decode")
