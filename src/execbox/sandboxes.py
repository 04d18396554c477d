"""Long-lived sandboxes: several runs in the same namespaces, like `runc exec`.

The sandbox's pid 1 (an execbox init, not a user program) holds the namespaces and reaps
whatever is orphaned inside, so a cancelled run can never leave a zombie that wedges it
(seed 003). Each run is an ordinary supervised step whose child enters those namespaces.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from . import api, tree
from .errors import ExecboxError
from .execution import Execution
from .result import Result
from .sandbox import SandboxSpec
from .stdio import DEVNULL


class Sandbox:
    """with Sandbox(SandboxSpec()) as sb: sb.run([...]); sb.run([...])"""

    def __init__(self, spec: SandboxSpec | None = None, *, cwd: str | None = None) -> None:
        self.spec = spec or SandboxSpec()
        self.cwd = cwd
        self._holder: Execution | None = None
        self.init_pid: int | None = None

    def start(self) -> Sandbox:
        holder = api.start(["execbox-sandbox-init"], sandbox=self.spec, cwd=self.cwd,
                           stdout=DEVNULL, stderr=DEVNULL, stdin=DEVNULL,
                           _sandbox_extra={"hold": 1})
        relay = holder.wait_started(timeout=60)
        if relay is None:
            result = holder.wait()
            raise ExecboxError(f"the sandbox could not be set up: {result.failure}")
        self._holder = holder
        deadline = time.monotonic() + 10
        while not (found := tree.descendants(relay)):
            if time.monotonic() > deadline:
                self.close()
                raise ExecboxError("the sandbox's pid 1 did not appear")
            time.sleep(0.001)
        self.init_pid = found[0]
        return self

    def start_run(self, argv: list[str], **options: Any) -> Execution:
        """Start a command inside the sandbox; returns its handle (cancel, stream, wait)."""
        if self._holder is None or self.init_pid is None:
            raise ExecboxError("the sandbox is not running (use `with Sandbox(...)`)")
        if self.spec.root is None and "cwd" not in options and self.cwd is not None:
            options["cwd"] = self.cwd
        return api.start(argv, sandbox=self.spec, _sandbox_extra={"join": self.init_pid},
                         **options)

    def run(self, argv: list[str], **options: Any) -> Result:
        execution = self.start_run(argv, **options)
        try:
            return execution.wait()
        except BaseException:
            execution.cancel(hard=True)
            execution.wait()
            raise

    def close(self) -> Result | None:
        """Stop pid 1 (which takes everything inside with it) and reap."""
        holder, self._holder = self._holder, None
        if holder is None:
            return None
        holder.cancel()
        return holder.wait()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
