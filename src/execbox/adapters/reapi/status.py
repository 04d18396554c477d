"""execbox's Result -> what REAPI reports: the gRPC status of the lease, and the messages
ExecutedActionMetadata.auxiliary_metadata carries (usage, setup failure, cgroup usage).

The mapping lives in adapters/common/status.py, shared with the Buildbarn runner (the same
usage message and the same start-failure codes); this module keeps the worker's names.
"""

from __future__ import annotations

from ..common.status import (
    INTERNAL,
    INVALID_ARGUMENT,
    cgroup_message,
    failure_code,
    failure_message,
    first_line,
    usage_message,
)

__all__ = ["INTERNAL", "INVALID_ARGUMENT", "cgroup_message", "failure_code",
           "failure_message", "first_line", "usage_message"]
