"""Long-lived sandboxes: several runs in the same namespaces, like `runc exec`.

The sandbox's pid 1 (an execbox init, not a user program) holds the namespaces. It is found
once, as the child of the holder's relay, through a pidfd opened right then, and every run
enters it through that pidfd: a pid could name another process by the time a run starts.
Each run gets its own pid namespace nested in the sandbox's, so whatever a run starts ends
with it (exit, timeout or cancel) and the sandbox stays usable: the process leak behind
moby/buildkit's "fix process termination handling for runc exec".

As root the sandbox gets runc's device allowlist, and a watchdog notices when the policy in
force drifts from it (a systemd daemon-reload can rewrite it under a running container),
naming the rule that changed and the devices it now refuses.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ..model.errors import ExecboxError, SpecError
from ..model.exits import EXIT_SETUP_FAILED
from ..model.options import default_devices
from ..model.result import Failure, Result
from ..model.sandbox import SandboxSpec
from ..streams.stdio import CAPTURE, DEVNULL
from . import run as api
from .execution import Execution

PROBE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                 "/dev/ptmx")
# Run inside the sandbox's cgroup: prints each device that opens. It needs no device
# itself (a shell probe's own 2>/dev/null fails once /dev/null is denied).
_PROBE = ("import os, sys\n"
          "for path in sys.argv[1:]:\n"
          "    try:\n"
          "        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))\n"
          "    except OSError:\n"
          "        continue\n"
          "    print(path)\n")


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


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rfind(b")") + 2:].split()[1])


def _children_of(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(int(p)) == pid]


def open_init(relay: int, timeout: float = 10.0) -> tuple[int, int]:
    """(pid, pidfd) of the sandbox's pid 1: the only child of the holder's relay. The pid
    is checked again after pidfd_open, so the pidfd names that child and not a process
    that got its number in between; the relay is held by a pidfd meanwhile, so it is the
    relay we were told about."""
    relay_fd = os.pidfd_open(relay)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if select.select([relay_fd], [], [], 0)[0]:
                raise ExecboxError("the sandbox's relay exited during start")
            for pid in _children_of(relay):
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                if _parent_of(pid) == relay and not select.select([pidfd], [], [], 0)[0]:
                    return pid, pidfd
                os.close(pidfd)
            if time.monotonic() > deadline:
                raise ExecboxError("the sandbox's pid 1 did not appear")
            time.sleep(0.001)
    finally:
        os.close(relay_fd)


class Sandbox:
    """with Sandbox(SandboxSpec()) as sb: sb.run([...]); sb.run([...])"""

    def __init__(self, spec: SandboxSpec | None = None, *, cwd: str | None = None,
                 devices: list[str] | None = None, device_mode: str = "auto",
                 watch_interval: float = 1.0,
                 on_drift: Callable[[str], object] | None = None) -> None:
        if spec is not None and not isinstance(spec, SandboxSpec):
            raise SpecError("sandbox", f"expected a SandboxSpec, got {type(spec).__name__}")
        self.spec = spec or SandboxSpec()
        self.cwd = cwd
        # The same default as every other front end: runc's list for a root caller. The
        # job is given what the caller gave (None: the default), so that the sandbox's
        # cgroup stays optional, as any sandboxed job's, unless rules were asked for.
        self._asked_devices = devices
        self.devices = default_devices(devices, [], sandbox=True, joining=False)
        self.device_mode = device_mode
        self.watch_interval = watch_interval
        self.on_drift = on_drift
        self.drift: str | None = None
        self.cgroup_dirs: dict[str, str] = {}
        self._expected: dict[str, list[Any]] = {}
        self._opened: set[str] = set()
        self._holder: Execution | None = None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.init_pid: int | None = None
        self._init_pidfd = -1

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Sandbox:
        holder = api.start(["execbox-sandbox-init"], sandbox=self.spec, cwd=self.cwd,
                           stdout=DEVNULL, stderr=DEVNULL, stdin=DEVNULL,
                           devices=self._asked_devices, device_mode=self.device_mode,
                           _sandbox_role="hold")
        try:
            relay = holder.wait_started(timeout=60)
            if relay is None:
                result = holder.wait()
                raise ExecboxError(f"the sandbox could not be set up: {result.failure}")
            self._holder = holder
            self.init_pid, self._init_pidfd = open_init(relay)
            self.cgroup_dirs = _cgroup_dirs(relay)
            self._expected = self._policy()
            if self.devices is not None and self.cgroup_dirs:
                self._opened = self._devices_that_open()
        except BaseException:
            self._holder = None
            self._close_pidfd()
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
            self._close_pidfd()

    def _close_pidfd(self) -> None:
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
        """Start a command inside the sandbox, in a pid namespace of its own: when it ends
        (exit, timeout, cancel), everything it started ends too. Returns its handle."""
        if "sandbox" in options:
            raise TypeError("a run of a Sandbox takes the Sandbox's own SandboxSpec; give "
                            "sandbox= to Sandbox(...), or use execbox.run for a step of its "
                            "own sandbox")
        if self._holder is None or self._init_pidfd < 0:
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
            return Result(exit_code=EXIT_SETUP_FAILED, failure=Failure(
                "devices", "EPERM", f"device policy drifted: {self.drift}",
                "something changed this sandbox's device rules after it started; recreate "
                "the sandbox and find what rewrites cgroup device policy (e.g. a "
                "systemctl daemon-reload)"))
        return self.start_run(argv, **options).wait_or_cancel()

    # -- device drift ----------------------------------------------------------------------
    def _policy(self) -> dict[str, list[Any]]:
        """What is in force now: v1 rules and/or the v2 device programs attached."""
        state: dict[str, list[Any]] = {}
        if "devices" in self.cgroup_dirs:
            with open(f"{self.cgroup_dirs['devices']}/devices.list") as f:
                state["v1"] = [line for line in f.read().split("\n") if line]
        if "unified" in self.cgroup_dirs:
            from ..linux.bpf import attached_programs

            try:
                state["v2"] = list(attached_programs(self.cgroup_dirs["unified"]))
            except OSError:
                pass
        return state

    def _devices_that_open(self) -> set[str]:
        """The probe devices that open from inside the sandbox's cgroup, now."""
        paths = [d for d in PROBE_DEVICES if os.path.exists(d)]
        probe = api.run([sys.executable, "-I", "-S", "-c", _PROBE, *paths],
                        join_cgroup=self._procs_files(), stdin=DEVNULL, stdout=CAPTURE,
                        stderr=DEVNULL, timeout=60)
        return set((probe.stdout or b"").decode().split())

    def _changes(self, now: dict[str, list[Any]]) -> list[str]:
        """The exact rule changes: v1 entries lost and gained, v2 programs added, removed."""
        reasons = []
        old_v1, new_v1 = self._expected.get("v1"), now.get("v1")
        if old_v1 is not None and new_v1 is not None:
            where = f"{self.cgroup_dirs['devices']}/devices.list"
            lost = [rule for rule in old_v1 if rule not in new_v1]
            gained = [rule for rule in new_v1 if rule not in old_v1]
            if lost:
                reasons.append(f"{where} lost {', '.join(repr(r) for r in lost)}")
            if gained:
                reasons.append(f"{where} gained {', '.join(repr(r) for r in gained)}")
        old_v2, new_v2 = self._expected.get("v2"), now.get("v2")
        if old_v2 is not None and new_v2 is not None:
            where = self.cgroup_dirs["unified"]
            added = [p for p in new_v2 if p not in old_v2]
            removed = [p for p in old_v2 if p not in new_v2]
            if added:
                reasons.append(f"a second device program, id {', '.join(map(str, added))}, "
                               f"was attached to {where}")
            if removed:
                reasons.append(f"device program id {', '.join(map(str, removed))} was "
                               f"detached from {where}")
        return reasons

    def _check(self) -> None:
        try:
            now = self._policy()
        except OSError:
            return
        if now == self._expected:
            return
        reasons = self._changes(now) or ["the device policy in force changed"]
        denied = sorted(self._opened - self._devices_that_open())
        if denied:
            reasons.append(f"it denies {', '.join(denied)}")
        self.drift = "; ".join(reasons)
        if self.on_drift is not None:
            self.on_drift(self.drift)

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval):
            if self.drift is None:
                self._check()
