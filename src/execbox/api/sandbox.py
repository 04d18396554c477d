"""Long-lived sandboxes: several runs in the same namespaces, like `runc exec`.

The sandbox's pid 1 (an execbox init, not a user program) holds the namespaces and reaps
whatever is orphaned inside, so a cancelled run can never leave a zombie that wedges it
(seed 003). Each run is an ordinary supervised step whose child enters those namespaces and
the sandbox's cgroup. As root the sandbox gets runc's device allowlist, and a watchdog
notices when the policy in force drifts from it (seed 004: a daemon-reload rewrote it).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ..model.errors import ExecboxError
from ..model.result import Failure, Result
from ..model.sandbox import SandboxSpec
from ..streams.stdio import CAPTURE, DEVNULL
from ..supervise import proctree as tree
from . import run as api
from .execution import Execution

PROBE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                 "/dev/ptmx")


def _cgroup_dirs(pid: int) -> dict[str, str]:
    """controller (or "unified") -> directory of the execbox step cgroup pid is in."""
    from ..cgroups.host import ROOT

    dirs = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if not os.path.basename(path).startswith("execbox-"):
                continue
            if hierarchy == "0":
                base = f"{ROOT}/unified" if os.path.isdir(f"{ROOT}/unified") else ROOT
                dirs["unified"] = base + path
            else:
                for controller in controllers.split(","):
                    candidate = f"{ROOT}/{controller}{path}"
                    if os.path.isdir(candidate):
                        dirs[controller] = candidate
    return dirs


class Sandbox:
    """with Sandbox(SandboxSpec()) as sb: sb.run([...]); sb.run([...])"""

    def __init__(self, spec: SandboxSpec | None = None, *, cwd: str | None = None,
                 devices: list[str] | None = None, device_mode: str = "auto",
                 watch_interval: float = 1.0,
                 on_drift: Callable[[str], object] | None = None) -> None:
        self.spec = spec or SandboxSpec()
        self.cwd = cwd
        if devices is None and os.geteuid() == 0:
            from ..cgroups.devices import DEFAULT_RULES

            devices = list(DEFAULT_RULES)
        self.devices = devices
        self.device_mode = device_mode
        self.watch_interval = watch_interval
        self.on_drift = on_drift
        self.drift: str | None = None
        self.cgroup_dirs: dict[str, str] = {}
        self._expected: dict[str, object] = {}
        self._holder: Execution | None = None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.init_pid: int | None = None
        self._init_pidfd = -1

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Sandbox:
        holder = api.start(["execbox-sandbox-init"], sandbox=self.spec, cwd=self.cwd,
                           stdout=DEVNULL, stderr=DEVNULL, stdin=DEVNULL,
                           devices=self.devices, device_mode=self.device_mode,
                           _sandbox_role="hold")
        try:
            relay = holder.wait_started(timeout=60)
            if relay is None:
                result = holder.wait()
                raise ExecboxError(f"the sandbox could not be set up: {result.failure}")
            self._holder = holder
            deadline = time.monotonic() + 10
            while not (found := tree.descendants(relay)):
                if time.monotonic() > deadline:
                    raise ExecboxError("the sandbox's pid 1 did not appear")
                time.sleep(0.001)
            self.init_pid = found[0]
            self._init_pidfd = os.pidfd_open(self.init_pid)
            self.cgroup_dirs = _cgroup_dirs(relay)
            self._expected = self._policy()
        except BaseException:
            self._holder = None
            holder.cancel(hard=True)  # nothing of a half-made sandbox stays behind
            holder.wait()
            raise
        if self.devices is not None and self.watch_interval > 0:
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name="execbox-device-watchdog")
            self._watchdog.start()
        return self

    def close(self) -> Result | None:
        """Stop pid 1 (which takes everything inside with it) and reap."""
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        holder, self._holder = self._holder, None
        if holder is None:
            return None
        holder.cancel()
        try:
            return holder.wait()
        finally:
            if self._init_pidfd >= 0:
                os.close(self._init_pidfd)
                self._init_pidfd = -1

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # -- runs ------------------------------------------------------------------------------
    def _procs_files(self) -> list[str]:
        return sorted({f"{d}/cgroup.procs" for d in self.cgroup_dirs.values()})

    def start_run(self, argv: list[str], **options: Any) -> Execution:
        """Start a command inside the sandbox; returns its handle (cancel, stream, wait)."""
        if self._holder is None or self.init_pid is None:
            raise ExecboxError("the sandbox is not running (use `with Sandbox(...)`)")
        if self.spec.root is None and "cwd" not in options and self.cwd is not None:
            options["cwd"] = self.cwd
        return api.start(argv, sandbox=self.spec, _sandbox_role="join",
                         _join_pidfd=self._init_pidfd,
                         join_cgroup=self._procs_files() or None, **options)

    def run(self, argv: list[str], **options: Any) -> Result:
        """Run a command to completion inside the sandbox. If the device policy drifted,
        the run does not start and the Result says what changed."""
        if self.drift is None and self.devices is not None:
            self._check()
        if self.drift is not None:
            return Result(exit_code=125, failure=Failure(
                "devices", "EPERM", f"device policy drifted: {self.drift}",
                "something changed this sandbox's device rules after it started; recreate "
                "the sandbox and find what rewrites cgroup device policy (e.g. a "
                "systemctl daemon-reload)"))
        return self.start_run(argv, **options).wait_or_cancel()

    # -- device drift ----------------------------------------------------------------------
    def _policy(self) -> dict[str, object]:
        """What is in force now: v1 rules and/or the v2 device programs attached."""
        state: dict[str, object] = {}
        if "devices" in self.cgroup_dirs:
            with open(f"{self.cgroup_dirs['devices']}/devices.list") as f:
                state["v1"] = f.read().split("\n")
        if "unified" in self.cgroup_dirs:
            from ..linux.bpf import attached_programs

            try:
                state["v2"] = attached_programs(self.cgroup_dirs["unified"])
            except OSError:
                pass
        return state

    def _denied_now(self) -> list[str]:
        """Devices that should open but no longer do, probed from inside the cgroup."""
        script = " ".join(f"(exec 3<{d}) 2>/dev/null || echo {d};" for d in PROBE_DEVICES
                          if os.path.exists(d))
        probe = api.run(["sh", "-c", script], join_cgroup=self._procs_files(),
                        stdout=CAPTURE, stderr=DEVNULL)
        return (probe.stdout or b"").decode().split()

    def _check(self) -> None:
        try:
            now = self._policy()
        except OSError:
            return
        if now == self._expected:
            return
        reasons = []
        old_v2 = self._expected.get("v2")
        new_v2 = now.get("v2")
        if isinstance(old_v2, list) and isinstance(new_v2, list) and new_v2 != old_v2:
            added = [p for p in new_v2 if p not in old_v2]
            if added:
                reasons.append(f"a second device program, id {', '.join(map(str, added))}, "
                               f"was attached to {self.cgroup_dirs['unified']}")
            else:
                reasons.append(f"device programs on {self.cgroup_dirs['unified']} changed "
                               f"from {old_v2} to {new_v2}")
        if now.get("v1") != self._expected.get("v1"):
            reasons.append(f"the rules in {self.cgroup_dirs['devices']}/devices.list changed")
        denied = [d for d in self._denied_now() if self.devices is not None]
        if denied:
            reasons.append(f"it denies {', '.join(denied)}")
        self.drift = "; ".join(reasons)
        if self.on_drift is not None:
            self.on_drift(self.drift)

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval):
            if self.drift is None:
                self._check()
