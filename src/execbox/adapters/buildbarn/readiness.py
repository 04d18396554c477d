"""CheckReadiness: bb_worker asks before it takes work. Ready means the runner sees the
path bb_worker just created (the same build directory), every --readiness-path exists, and
execbox can run an action the way this runner runs them: a probe in the runner's own mode
writes a file into a directory of the build directory. Only the probe's success is cached
(briefly, so a worker polling often does not pay for a sandbox each time); the build
directory, the path and every --readiness-path are checked on every call."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from typing import Any

from ...api.run import run
from ...model.sandbox import DEFAULT_HOST_PATHS, SandboxSpec
from ...streams.stdio import CAPTURE, DEVNULL
from ..common.status import first_line
from .config import RunnerConfig
from .paths import BuildDirectory, relative_parts

PROBE_PREFIX = ".execbox-runner-probe-"
_PROBE_SCRIPT = "echo ok > probe"
OOM_PROBLEM = "the OOM killer ended a probe action"
_counter = itertools.count()


def _host_toolchain() -> dict[str, Any]:
    """The host's /usr, /bin, ... for a probe whose root is an empty directory."""
    binds, links = [], []
    for path in DEFAULT_HOST_PATHS:
        if os.path.islink(path):
            links.append((os.readlink(path), path))
        elif os.path.isdir(path):
            binds.append((path, path))
    return {"ro_binds": binds, "symlinks": links}


def probe(config: RunnerConfig) -> str | None:
    """Why execbox cannot run an action in this runner's mode (its first error line), or
    None when a probe action wrote its file as an action would."""
    directory = os.path.join(config.build_directory,
                             f"{PROBE_PREFIX}{os.getpid()}-{next(_counter)}")
    options: dict[str, Any] = {"env": {"PATH": "/usr/bin:/bin"}, "timeout": 60,
                               "stdin": DEVNULL, "stdout": DEVNULL, "stderr": CAPTURE}
    if config.memory is not None:
        options["memory"] = config.memory
    if config.pids is not None:
        options["pids"] = config.pids
    if config.mode == "sandbox":
        options["sandbox"] = SandboxSpec(binds=[(directory, config.input_root_path)],
                                         bind_workdir=False, idmap=False)
        options["cwd"] = config.input_root_path
    elif config.mode == "input-root-as-root":
        options["sandbox"] = SandboxSpec(directory, root_writable=True, idmap=False,
                                         **_host_toolchain())
        options["cwd"] = "/"
    else:
        options["cwd"] = directory
    try:
        os.mkdir(directory)
        os.chmod(directory, 0o777)  # like bb_worker's directories: writable by the action
        result = run(["/bin/sh", "-c", _PROBE_SCRIPT], **options)
        if result.failure is not None:
            return first_line(result.failure.message)
        if result.oom_killed and config.memory is not None:
            return (f"{OOM_PROBLEM} (`{_PROBE_SCRIPT}`): --memory {config.memory} bytes "
                    "is too small for any action")
        if result.exit_code != 0:
            said = first_line((result.stderr or b"").decode(errors="replace"))
            return f"a probe action exited {result.exit_code}" + (f": {said}" if said else "")
        with open(os.path.join(directory, "probe"), "rb") as f:
            if f.read() != b"ok\n":
                return "a probe action ran but its file in the build directory is wrong"
        return None
    except OSError as exc:
        return f"probe in the build directory: {exc.strerror or exc}: {exc.filename or ''}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Readiness:
    """The answer to CheckReadiness, shared by every call (one probe at a time)."""

    def __init__(self, config: RunnerConfig, build: BuildDirectory,
                 cache_seconds: float = 10.0) -> None:
        self.config = config
        self.build = build
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._ready_until = 0.0

    def problem(self, path: str) -> str | None:
        """Why the runner is not ready (UNAVAILABLE), or None; RequestError for a path
        that is not relative to the build directory."""
        parts = relative_parts(path, "path")
        replaced = self.build.replaced()  # never cached: it is one stat
        if replaced is not None:
            return replaced
        if path and not self.build.exists(parts, "path"):
            return (f"path {path!r} does not exist in the build directory "
                    f"{self.build.path}: bb_worker and this runner do not share it")
        for required in self.config.readiness_paths:
            try:
                os.lstat(required)
            except OSError as exc:
                return f"readiness path {required}: {exc.strerror}"
        return self.execbox_problem()

    def execbox_problem(self) -> str | None:
        with self._lock:
            if time.monotonic() < self._ready_until:
                return None
            found = probe(self.config)
            if found is None:
                self._ready_until = time.monotonic() + self.cache_seconds
            return found
