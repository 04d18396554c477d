"""execbox's own .proto files: generated code up to date, and Buildbarn's wire numbers."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from execbox.adapters.protos import execbox_pb2, resourceusage_pb2, runner_pb2

ROOT = Path(__file__).resolve().parent.parent


def _numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_posix_resource_usage_matches_buildbarns_wire_format() -> None:
    usage = resourceusage_pb2.POSIXResourceUsage
    assert usage.DESCRIPTOR.full_name == "buildbarn.resourceusage.POSIXResourceUsage"
    assert _numbers(usage) == {
        "user_time": 1, "system_time": 2, "maximum_resident_set_size": 3,
        "page_reclaims": 7, "page_faults": 8, "swaps": 9, "block_input_operations": 10,
        "block_output_operations": 11, "messages_sent": 12, "messages_received": 13,
        "signals_received": 14, "voluntary_context_switches": 15,
        "involuntary_context_switches": 16, "termination_signal": 17}
    fields = usage.DESCRIPTOR.fields_by_name
    assert fields["user_time"].message_type.full_name == "google.protobuf.Duration"
    assert fields["termination_signal"].type == fields["termination_signal"].TYPE_STRING
    assert all(fields[n].type == fields[n].TYPE_INT64 for n in _numbers(usage)
               if n not in ("user_time", "system_time", "termination_signal"))
    # Field 17 as a Buildbarn reader decodes it: tag (17 << 3 | 2) then the length.
    wire = usage(termination_signal="KILL").SerializeToString()
    assert wire == bytes([0x8A, 0x01, 4]) + b"KILL"


def test_execbox_records_keep_their_numbers() -> None:
    assert _numbers(execbox_pb2.SetupFailure) == {
        "step": 1, "errno_name": 2, "errno_number": 3, "path": 4, "message": 5, "hint": 6}
    assert _numbers(execbox_pb2.CgroupUsage) == {
        "memory_peak_bytes": 1, "cpu_usage_usec": 2, "memory_limit_bytes": 3,
        "oom_killed": 4}


def test_runner_protocol_matches_buildbarns_wire_format() -> None:
    """bb_worker calls buildbarn.runner.Runner: package, service, methods and numbers."""
    service = runner_pb2.DESCRIPTOR.services_by_name["Runner"]
    assert service.full_name == "buildbarn.runner.Runner"
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name)
               for m in service.methods}
    assert methods == {
        "CheckReadiness": ("buildbarn.runner.CheckReadinessRequest", "google.protobuf.Empty"),
        "Run": ("buildbarn.runner.RunRequest", "buildbarn.runner.RunResponse")}
    assert _numbers(runner_pb2.CheckReadinessRequest) == {"path": 1}
    assert _numbers(runner_pb2.RunRequest) == {
        "arguments": 1, "environment_variables": 2, "working_directory": 3, "stdout_path": 4,
        "stderr_path": 5, "input_root_directory": 6, "temporary_directory": 7,
        "server_logs_directory": 8}
    assert _numbers(runner_pb2.RunResponse) == {"exit_code": 1, "resource_usage": 2}
    request = runner_pb2.RunRequest.DESCRIPTOR.fields_by_name
    assert request["arguments"].is_repeated
    env = request["environment_variables"].message_type
    assert env.GetOptions().map_entry
    assert [(f.name, f.type) for f in env.fields] == [("key", 9), ("value", 9)]  # strings
    assert all(request[n].type == request[n].TYPE_STRING for n in _numbers(runner_pb2.RunRequest)
               if n != "environment_variables")
    response = runner_pb2.RunResponse.DESCRIPTOR.fields_by_name
    assert response["exit_code"].type == response["exit_code"].TYPE_INT64
    assert response["resource_usage"].message_type.full_name == "google.protobuf.Any"
    assert response["resource_usage"].is_repeated
    # -1 (a signal ended the action) as Go's proto encoder writes an int64: ten bytes.
    assert runner_pb2.RunResponse(exit_code=-1).SerializeToString() == \
        bytes([0x08]) + bytes([0xFF] * 9) + bytes([0x01])


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    """Editing a .proto without running scripts/gen-protos.sh fails here."""
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-protos.sh"), str(tmp_path)],
                   check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = sorted((tmp_path / "execbox" / "adapters" / "protos").iterdir())
    assert generated, "protoc generated nothing"
    committed = ROOT / "src" / "execbox" / "adapters" / "protos"
    for path in generated:
        assert filecmp.cmp(path, committed / path.name, shallow=False), path.name
