"""`execbox COMMAND ...`: dispatch, and `execbox run` from options to exit status.

`execbox run` is single-threaded, so it spawns and supervises the step itself (no fork
server, no second interpreter) and imports only what a run needs.
"""

from __future__ import annotations

import os
import sys

from ..model.errors import SpecError
from ..model.exits import EXIT_SETUP_FAILED
from .options import USAGE, UsageError, parse_run_args

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..model.result import Result
    from ..model.spec import CommandSpec

TOP_USAGE = """\
usage: execbox COMMAND ...

commands:
  run       run a build step (execbox run --help)
  doctor    check what this host supports (--json)
  selftest  prove execbox works here: stress batteries (--seconds N, --json)
  worker    a REAPI worker for BuildGrid (execbox worker --help; needs execbox[reapi])
  runner    a drop-in for Buildbarn's bb_runner (execbox runner --help; execbox[buildbarn])
  version   print the version
"""


def _number(text: str | None, field: str, kind: type = float) -> Any:
    if text is None:
        return None
    try:
        return kind(text)
    except (ValueError, OverflowError):
        raise SpecError(field, f"expected a number, got {text!r}") from None


def _sandbox(opts: dict[str, Any]) -> Any:
    """A SandboxSpec from the sandbox options, or None when none was given."""
    if not opts.get("sandbox"):
        return None
    from ..model.sandbox import SandboxSpec

    return SandboxSpec(
        opts.get("root"),
        ro_binds=opts.get("ro-bind", []), binds=opts.get("bind", []),
        dev_binds=opts.get("dev-bind", []), tmpfs=opts.get("tmpfs", []),
        dirs=opts.get("dir", []), symlinks=opts.get("symlink", []),
        hostname=opts.get("hostname", "execbox"), share_net=bool(opts.get("share_net")),
        uid=_number(opts.get("uid"), "--uid", int), gid=_number(opts.get("gid"), "--gid", int),
        privileged=bool(opts.get("privileged")))


def _environment(ops: list[tuple[str, ...]]) -> tuple[dict[str, str], bool]:
    """The environment after --setenv/--unsetenv/--clearenv in order, and whether they set
    TERM themselves."""
    env = dict(os.environ)
    term_given = False
    for op in ops:
        if op[0] == "clear":
            env.clear()
            continue
        field = "--setenv" if op[0] == "set" else "--unsetenv"
        if not op[1] or "=" in op[1] or "\0" in op[1]:
            raise SpecError(field, f"invalid variable name {op[1]!r}")
        if op[0] == "unset":
            env.pop(op[1], None)
        else:
            env[op[1]] = op[2]
        term_given = term_given or op[1] == "TERM"
    return env, term_given


def _result_file(path: str | None) -> int:
    """Open --result before the step runs, so a bad path costs no step."""
    if path is None:
        return -1
    if os.path.isdir(path):
        raise SpecError("--result", f"{path} is a directory")
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise SpecError("--result", f"cannot write {path}: {exc.strerror}") from None


def _report(result: Result, spec: CommandSpec) -> None:
    failure = result.failure
    if failure is not None:
        hint = f" ({failure.hint})" if failure.hint else ""
        sys.stderr.write(f"execbox: {failure.message} [{failure.errno}]{hint}\n")
    elif result.timed_out:  # the status alone (124) does not say what ended the step
        how = f"killed by {result.signal}" if result.signal else f"exit {result.exit_code}"
        sys.stderr.write(f"execbox: the step timed out after --timeout {spec.timeout:g} s and "
                         f"was cancelled ({how})\n")
    memory = None if spec.limits is None else spec.limits.memory
    if result.oom_killed:
        peak = result.usage.cgroup_peak_memory
        sys.stderr.write(f"execbox: the step was killed by the OOM killer: out of memory "
                         f"under --memory {memory} bytes (peak {peak} bytes)\n")
    for problem in result.cleanup_errors:
        sys.stderr.write(f"execbox: cleanup: {problem}\n")


def run_command(opts: dict[str, Any]) -> int:
    from ..model.options import build_spec, pty_mode

    pty = pty_mode(opts.get("pty", False), "--pty")
    pty_size = None
    if opts.get("pty_size") is not None:
        from ..streams.pty import parse_size

        pty_size = parse_size(opts["pty_size"], "--pty-size")
    env, term_given = _environment(opts["env_ops"])
    limit = None
    if opts.get("output_limit") is not None:
        from ..model.spec import parse_size as parse_bytes

        limit = parse_bytes(opts["output_limit"], "--output-limit")  # 1048576, 1M, 64K...
    for needs_pty in ("pty_size", "pty_raw"):
        if opts.get(needs_pty) and not pty:
            raise SpecError("--" + needs_pty.replace("_", "-"), "needs --pty")
    sandbox = _sandbox(opts)
    spec = build_spec(
        opts["argv"], cwd=opts.get("chdir"), env=env, pty=pty, pty_term=opts.get("pty_term"),
        term_given=term_given, memory=opts.get("memory"),
        pids=_number(opts.get("pids"), "--pids", int), cpus=_number(opts.get("cpus"), "--cpus"),
        extra_devices=_devices(opts.get("device", [])), sandbox=sandbox,
        timeout=_number(opts.get("timeout"), "--timeout"),
        grace=_number(opts.get("grace", "10"), "--grace"),
        cancel_signal=opts.get("cancel_signal", "TERM"))
    result_fd = _result_file(opts.get("result"))

    def supervise() -> int:
        """In the supervisor process: run the step, report, write the result file."""
        from .runner import run_in_process

        result = run_in_process(
            spec, stdout=opts.get("stdout"), stderr=opts.get("stderr"), output_limit=limit,
            timestamps=opts["timestamps"], pty=pty, pty_size=pty_size,
            pty_raw=bool(opts.get("pty_raw")))
        _report(result, spec)
        if result_fd >= 0:
            try:
                _write_result(result_fd, result)
            except OSError as exc:  # the step ran: its own status stays the exit status
                sys.stderr.write(f"execbox run: error: --result: cannot write "
                                 f"{opts.get('result')}: {exc.strerror or exc}\n")
        return result.exit_status

    try:
        from .guard import supervised_elsewhere

        return supervised_elsewhere(lambda: _run_guarded(supervise))
    finally:
        if result_fd >= 0:
            os.close(result_fd)


def _devices(extra: list[str]) -> list[str]:
    if not extra:
        return extra
    from ..model.devices import parse_rule

    for rule in extra:
        parse_rule(rule, "--device")  # errors name the option, not a list index
    return extra


def _write_result(fd: int, result: Result) -> None:
    import json
    import stat

    if stat.S_ISREG(os.fstat(fd).st_mode):  # (a FIFO or a device is written as it is)
        os.ftruncate(fd, 0)
    data = (json.dumps(result.to_dict(), indent=1) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _ensure_std_fds() -> None:
    """A closed 0/1/2 would be reused by the next open() and confuse every step."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # Python started with it closed
            setattr(sys, name, open(fd, mode, closefd=False,  # noqa: SIM115 (kept open)
                                    errors="backslashreplace"))


_CLI_NAMES = {"cwd": "working directory (--chdir)", "cancel_signal": "--cancel-signal",
              "ro_binds": "--ro-bind", "binds": "--bind", "dev_binds": "--dev-bind",
              "tmpfs": "--tmpfs", "dirs": "--dir", "symlinks": "--symlink"}


def cli_field(field: str) -> str:
    """A spec field as the option that sets it: cwd -> --chdir, sandbox.ro_binds[0].source
    -> --ro-bind #1 source; fields already named as options stay as they are."""
    import re

    if field.startswith("-"):
        return field
    found = re.fullmatch(r"(?:sandbox\.)?([a-z_]+)(?:\[(\d+)\])?(?:\.(\w+))?", field)
    if found is None:
        return field
    name, index, part = found.groups()
    option = _CLI_NAMES.get(name, "--" + name.replace("_", "-"))
    return option + (f" #{int(index) + 1}" if index else "") + (f" {part}" if part else "")


def _run_guarded(work: Callable[[], int]) -> int:
    """work() with every error a one-line message and status 125, never a traceback."""
    try:
        return work()
    except SpecError as exc:
        sys.stderr.write(f"execbox run: error: {cli_field(exc.field)}: {exc.problem}\n")
    except UsageError as exc:
        sys.stderr.write(f"execbox run: error: {exc}\n")
    except KeyboardInterrupt:
        sys.stderr.write("execbox run: interrupted before the step started\n")
    except OSError as exc:  # out of fds or memory, say
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"execbox run: error: {exc.strerror or exc}{where}\n")
    return EXIT_SETUP_FAILED


def _run(args: list[str]) -> int:
    def parse_and_run() -> int:
        opts = parse_run_args(args)
        if opts.get("help"):
            sys.stdout.write(USAGE)
            return 0
        return run_command(opts)

    return _run_guarded(parse_and_run)


def _undo_locale_coercion() -> None:
    """Python started in the C locale sets LC_CTYPE=C.UTF-8 in its own environment (PEP
    538); that is this interpreter's, not the user's: a step of `execbox run` gets the
    environment execbox was started with, as under bwrap or env(1). What the process was
    exec'd with is in /proc/self/environ."""
    if "LC_CTYPE" not in os.environ:
        return
    try:
        with open("/proc/self/environ", "rb") as f:
            initial = f.read().split(b"\0")
    except OSError:
        return
    given = [entry[len(b"LC_CTYPE="):] for entry in initial if entry.startswith(b"LC_CTYPE=")]
    if not given:
        del os.environ["LC_CTYPE"]
    else:  # (LC_CTYPE=C or POSIX is coerced too)
        os.environb[b"LC_CTYPE"] = given[-1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if argv is None:
        _undo_locale_coercion()
    try:
        _ensure_std_fds()
    except OSError as exc:
        sys.stderr.write(f"execbox: error: {exc.strerror}\n")
        return EXIT_SETUP_FAILED
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(TOP_USAGE)
        return 0 if args else 2
    if args[0] in ("version", "--version"):
        from .. import __version__

        if args[1:]:
            sys.stderr.write(f"execbox {args[0]}: takes no arguments, got {args[1]!r}\n")
            return 2
        print(f"execbox {__version__}")
        return 0
    if args[0] == "doctor":
        from ..tools.doctor import main as doctor

        return doctor(args[1:])
    if args[0] == "selftest":
        from ..tools.selftest import main as selftest

        return selftest(args[1:])
    if args[0] != "run":
        sys.stderr.write(f"execbox: unknown command {args[0]!r}\n{TOP_USAGE}")
        return 2
    return _run(args[1:])
