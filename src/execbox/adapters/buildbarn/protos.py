"""The one place that imports grpc and the runner protocol's generated code, so a missing
extra fails with one line that says what to install."""

from __future__ import annotations

import os

# gRPC's C core logs connection chatter to stderr at INFO; the runner logs what matters.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

try:
    import grpc
    from google.protobuf import any_pb2, empty_pb2

    from ..protos import runner_pb2, runner_pb2_grpc
except (ImportError, RuntimeError) as exc:  # RuntimeError: grpcio older than the code
    what = exc.name if isinstance(exc, ImportError) else str(exc).splitlines()[0]
    raise SystemExit(
        f"execbox runner: the buildbarn extra is missing or too old ({what}); "
        "install it with: pip install 'execbox[buildbarn]'") from None

__all__ = ["any_pb2", "empty_pb2", "grpc", "runner_pb2", "runner_pb2_grpc"]
