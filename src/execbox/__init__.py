"""execbox: start a build step's process and own it, and its whole tree, until it ends.

Attributes are imported lazily so that `execbox run` and the fork server only pay for
what they use.
"""

from __future__ import annotations

TYPE_CHECKING = False

__version__ = "0.1.0"

_EXPORTS = {
    "run": "api.run", "run_async": "api.run", "start": "api.run",
    "Execution": "api.execution",
    "Result": "model.result", "Failure": "model.result", "Usage": "model.result",
    "CAPTURE": "streams.stdio", "PIPE": "streams.stdio", "DEVNULL": "streams.stdio",
    "ExecboxError": "model.errors", "SpecError": "model.errors",
    "ForkServerError": "model.errors",
    "CommandSpec": "model.spec", "make_spec": "model.spec", "SandboxSpec": "model.sandbox",
    "Sandbox": "api.sandbox",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from typing import Any

    from .api.execution import Execution as Execution
    from .api.run import run as run
    from .api.run import run_async as run_async
    from .api.run import start as start
    from .api.sandbox import Sandbox as Sandbox
    from .model.errors import ExecboxError as ExecboxError
    from .model.errors import ForkServerError as ForkServerError
    from .model.errors import SpecError as SpecError
    from .model.result import Failure as Failure
    from .model.result import Result as Result
    from .model.result import Usage as Usage
    from .model.sandbox import SandboxSpec as SandboxSpec
    from .model.spec import CommandSpec as CommandSpec
    from .model.spec import make_spec as make_spec
    from .streams.stdio import CAPTURE as CAPTURE
    from .streams.stdio import DEVNULL as DEVNULL
    from .streams.stdio import PIPE as PIPE


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'execbox' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".{module_name}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value
