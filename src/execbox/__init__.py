"""execbox: start a build step's process and own it, and its whole tree, until it ends.

Attributes are imported lazily so that `execbox run` and the fork server only pay for
what they use.
"""

from __future__ import annotations

TYPE_CHECKING = False

__version__ = "0.1.0"

_EXPORTS = {
    "run": "api", "run_async": "api", "start": "api",
    "Execution": "execution",
    "Result": "result", "Failure": "result", "Usage": "result",
    "CAPTURE": "stdio", "PIPE": "stdio", "DEVNULL": "stdio",
    "ExecboxError": "errors", "SpecError": "errors", "ForkServerError": "errors",
    "CommandSpec": "spec", "make_spec": "spec", "SandboxSpec": "sandbox",
    "Sandbox": "sandboxes",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from typing import Any

    from .api import run as run
    from .api import run_async as run_async
    from .api import start as start
    from .errors import ExecboxError as ExecboxError
    from .errors import ForkServerError as ForkServerError
    from .errors import SpecError as SpecError
    from .execution import Execution as Execution
    from .result import Failure as Failure
    from .result import Result as Result
    from .result import Usage as Usage
    from .sandbox import SandboxSpec as SandboxSpec
    from .sandboxes import Sandbox as Sandbox
    from .spec import CommandSpec as CommandSpec
    from .spec import make_spec as make_spec
    from .stdio import CAPTURE as CAPTURE
    from .stdio import DEVNULL as DEVNULL
    from .stdio import PIPE as PIPE


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'execbox' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".{module_name}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value
