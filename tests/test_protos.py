"""execbox's own .proto files: generated code up to date, and Buildbarn's wire numbers."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from execbox.adapters.protos import execbox_pb2, resourceusage_pb2

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


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    """Editing a .proto without running scripts/gen-protos.sh fails here."""
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-protos.sh"), str(tmp_path)],
                   check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = sorted((tmp_path / "execbox" / "adapters" / "protos").iterdir())
    assert generated, "protoc generated nothing"
    committed = ROOT / "src" / "execbox" / "adapters" / "protos"
    for path in generated:
        assert filecmp.cmp(path, committed / path.name, shallow=False), path.name
