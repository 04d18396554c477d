"""The one place that imports the REAPI / Remote Workers protos (from buildgrid-common) and
grpc, so a missing extra fails with one line that says what to install."""

from __future__ import annotations

import os

# gRPC's C core logs connection events (GOAWAY on a server restart) to stderr at INFO; the
# worker logs them itself, one line each.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

try:
    import grpc
    from buildgrid.common.protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2 as re_pb2,
    )
    from buildgrid.common.protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as re_grpc,
    )
    from buildgrid.common.protos.google.bytestream import bytestream_pb2 as bs_pb2
    from buildgrid.common.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
    from buildgrid.common.protos.google.devtools.remoteworkers.v1test2 import (
        bots_pb2,
        worker_pb2,
    )
    from buildgrid.common.protos.google.devtools.remoteworkers.v1test2 import (
        bots_pb2_grpc as bots_grpc,
    )
    from buildgrid.common.protos.google.rpc import code_pb2, error_details_pb2, status_pb2
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise SystemExit(
        f"execbox worker: the REAPI extra is missing ({exc.name} cannot be imported); "
        "install it with: pip install 'execbox[reapi]'") from None

__all__ = ["bots_grpc", "bots_pb2", "bs_grpc", "bs_pb2", "code_pb2", "error_details_pb2", "grpc",
           "re_grpc", "re_pb2", "status_pb2", "worker_pb2"]
