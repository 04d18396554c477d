"""A RunRequest -> what execbox runs: argv, the exact environment, the working directory,
the sandbox for the runner's mode, and the opened stdout/stderr files.

Modes (docs/buildbarn-runner.md explains the choice):
- sandbox (default): the host toolchain read-only, the input root read-write at one fixed
  path (--input-root-path, /execbox/root), the temporary directory as /tmp.
- input-root-as-root: the input root is / (bb_runner's chroot_into_input_root), read-write,
  with a fresh /proc, read-only /sys, a minimal /dev; the temporary directory as /tmp.
- none: the host as it is, the input root at its own path, TMPDIR the temporary directory.

Read-write binds are plain (SandboxSpec idmap=False): a root runner's action runs as host id
65534 and writes where bb_worker's modes let it (its directories are world-writable, its
cached input files read-only and not the action's), as with bb_runner as a separate user.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from ...model.sandbox import SandboxSpec, step_host_id
from ...streams.stdio import DEVNULL
from .config import RunnerConfig
from .paths import BuildDirectory, RequestError, relative_parts
from .protos import runner_pb2

# execbox's own field names -> the request's, so a SpecError names what the client sent.
_FIELDS = {"argv": "arguments", "env": "environment_variables"}


def request_field(spec_field: str) -> str:
    """'argv[0]' -> 'arguments[0]', 'env[...]' -> 'environment_variables[...]'."""
    for ours, theirs in _FIELDS.items():
        if spec_field.startswith(ours):
            return theirs + spec_field[len(ours):]
    return spec_field


@dataclass
class PreparedAction:
    """Everything execbox.start needs for one Run; close() releases the output fds."""

    argv: list[str]
    options: dict[str, Any]
    server_logs: tuple[str, ...] | None = None
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def _optional(value: str, name: str) -> tuple[str, ...] | None:
    return relative_parts(value, name) if value else None


def action_owner(config: RunnerConfig) -> int | None:
    """The host id a sandboxed action of a root runner runs as, else None (ours)."""
    return step_host_id(config.mode != "none")


def _check_program(program: str, env: dict[str, str], config: RunnerConfig) -> None:
    """bb_runner searches only the request's PATH for a program without a slash: none, no
    search (it falls back to no default). With --input-root-as-root it runs
    `/usr/bin/env -- ARGS` in the chroot, whose execvp has a default (/bin:/usr/bin), as
    execbox has: that mode keeps it."""
    if "/" in program or env.get("PATH") or config.mode == "input-root-as-root":
        return
    raise RequestError("arguments[0]", f"cannot find {program!r}: environment_variables has "
                                       "no PATH to search, and there is no default PATH "
                                       "(as with bb_runner)")


def prepare(request: runner_pb2.RunRequest, config: RunnerConfig,
            build: BuildDirectory) -> PreparedAction:
    """Validate every field (RequestError names it), resolve the directories below the
    build directory, create the output files, and choose the sandbox."""
    if not request.arguments:
        raise RequestError("arguments", "must not be empty (the program, then its arguments)")
    # Every path is checked on its own before anything is opened or created.
    root_parts = relative_parts(request.input_root_directory, "input_root_directory")
    wd_parts = relative_parts(request.working_directory, "working_directory", "the input root")
    tmp_parts = _optional(request.temporary_directory, "temporary_directory")
    logs_parts = _optional(request.server_logs_directory, "server_logs_directory")
    out_parts = _optional(request.stdout_path, "stdout_path")
    err_parts = _optional(request.stderr_path, "stderr_path")

    root = build.directory(root_parts, "input_root_directory")
    tmp = build.directory(tmp_parts, "temporary_directory") if tmp_parts is not None else None
    if logs_parts is not None:
        build.directory(logs_parts, "server_logs_directory")
    env = dict(request.environment_variables)
    _check_program(request.arguments[0], env, config)
    wd = "/".join(wd_parts)
    options: dict[str, Any] = {"env": env, "grace": config.grace}
    if config.memory is not None:
        options["memory"] = config.memory
    if config.pids is not None:
        options["pids"] = config.pids
    tmp_bind = [(tmp, "/tmp")] if tmp is not None else []
    if config.mode == "none":
        options["cwd"] = os.path.join(root, wd) if wd else root
        if tmp is not None:
            env["TMPDIR"] = tmp  # bb_runner's TMPDIR: the temporary directory itself
    elif config.mode == "sandbox":
        options["sandbox"] = SandboxSpec(
            binds=[*tmp_bind, (root, config.input_root_path)], bind_workdir=False,
            share_net=config.network, idmap=False)
        options["cwd"] = posixpath.join(config.input_root_path, wd)
    else:
        options["sandbox"] = SandboxSpec(root, root_writable=True, binds=tmp_bind,
                                         bind_workdir=False, share_net=config.network,
                                         idmap=False)
        options["cwd"] = "/" + wd
    if tmp is not None and config.mode != "none":
        env["TMPDIR"] = "/tmp"  # where the sandbox shows the temporary directory

    action = PreparedAction(list(request.arguments), options, logs_parts)
    owner = action_owner(config)
    try:
        options["stdout"] = DEVNULL
        options["stderr"] = DEVNULL
        if out_parts is not None:
            options["stdout"] = build.create_file(out_parts, "stdout_path", owner)
            action.fds.append(options["stdout"])
        if err_parts is not None and err_parts == out_parts:
            options["stderr"] = options["stdout"]  # one file, both streams appending
        elif err_parts is not None:
            options["stderr"] = build.create_file(err_parts, "stderr_path", owner)
            action.fds.append(options["stderr"])
    except BaseException:
        action.close()
        raise
    return action
