"""`execbox run [OPTIONS] -- CMD [ARGS...]`.

The CLI is single-threaded, so it is its own fork server: it forks the step directly and
supervises it in-process (no second interpreter), and it imports only what a run needs.
"""

from __future__ import annotations

import os
import signal
import sys

from ..model.errors import SpecError
from ..report.diagnose import EXIT_SETUP_FAILED

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from typing import Any

USAGE = """\
usage: execbox run [OPTIONS] [--] CMD [ARGS...]

Run CMD as a build step: new session, only stdio inherited, the whole process tree
cancelled on timeout or signal and reaped before exit.

options:
  --chdir DIR             run in DIR
  --setenv VAR VALUE      set VAR (options apply in order)
  --unsetenv VAR          remove VAR
  --clearenv              start from an empty environment
  --timeout SECONDS       cancel the step after SECONDS (exit status 124)
  --grace SECONDS         wait this long after the cancel signal before SIGKILL (10)
  --cancel-signal SIG     signal sent to the tree on timeout or cancel (TERM)
  --stdout FILE           write the step's stdout to FILE
  --stderr FILE           write the step's stderr to FILE
  --output-limit BYTES    keep only the last BYTES of each stream, marking the cut
  --timestamps            prefix every output line with a UTC timestamp
  --result FILE           write the Result as one JSON object to FILE
  --pty[=auto]            give the step a new terminal (auto: fall back to pipes if the
                          terminal cannot be set up); --no-pty is the default
  --pty-size ROWSxCOLS    terminal size (default: this terminal's, else 24x80)
  --pty-term TERM         TERM for the step (default xterm-256color)
  --pty-raw               raw mode before the step starts (no LF -> CRLF)

limits (a cgroup per step, below execbox's own cgroup):
  --memory SIZE           memory limit (64M, 1G, bytes); the result says oom_killed
  --pids N                at most N processes
  --cpus FLOAT            CPU quota in cores
  --device RULE           allow a device ("c 10:200 rwm") on top of runc's default list;
                          the policy is verified from inside the step's cgroup before it runs

sandbox (bubblewrap-like; any of these turns it on):
  --sandbox               default profile: read-only host /usr /bin /sbin /lib* /etc, fresh
                          /proc, minimal /dev, tmpfs /tmp, the working directory read-write
  --root DIR              use DIR as the (read-only) input root instead
  --ro-bind SRC DEST, --bind SRC DEST, --dev-bind SRC DEST
  --tmpfs DEST, --dir DEST, --symlink TARGET DEST
  --hostname NAME         (default execbox)
  --share-net             keep the host's network (default: only lo)
  --uid N, --gid N        ids inside the sandbox
  --privileged            as root with --uid 0: no user namespace (capabilities still dropped)
  -h, --help              show this help

exit status: the step's; 128+N if signal N killed it; 124 timeout; 125 a setup step
failed (or bad usage); 126 found but not executable; 127 not found.
"""

TOP_USAGE = """\
usage: execbox COMMAND ...

commands:
  run       run a build step (execbox run --help)
  doctor    check what this host supports (--json)
  selftest  prove execbox works here: stress batteries (--seconds N, --json)
  version   print the version
"""


class UsageError(Exception):
    pass


def parse_run_args(args: list[str]) -> dict[str, Any]:
    """Parse `run` options by hand: argparse costs more start-up time than a step."""
    opts: dict[str, Any] = {"env_ops": [], "timestamps": False}
    values = {"--chdir": "chdir", "--timeout": "timeout", "--grace": "grace",
              "--cancel-signal": "cancel_signal", "--stdout": "stdout", "--stderr": "stderr",
              "--output-limit": "output_limit", "--result": "result",
              "--pty-size": "pty_size", "--pty-term": "pty_term",
              "--memory": "memory", "--pids": "pids", "--cpus": "cpus"}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, inline = arg.partition("=")

        def value(count: int = 1, name: str = name, eq: str = eq,
                  inline: str = inline) -> list[str]:
            nonlocal i
            if eq:  # --opt=A [B]: the text after '=' is the first value
                if i + count - 1 >= len(args):
                    raise UsageError(f"{name} needs {count} arguments")
                taken = [inline, *args[i + 1:i + count]]
                i += count
                return taken
            if i + count >= len(args):
                raise UsageError(f"{name} needs {count} argument{'s' if count > 1 else ''}")
            taken = args[i + 1:i + 1 + count]
            i += 1 + count
            return taken

        flags = ("-h", "--help", "--clearenv", "--timestamps", "--no-pty", "--pty-raw",
                 "--sandbox", "--share-net", "--privileged")
        if eq and name in flags:
            raise UsageError(f"{name} takes no value (got {arg!r})")
        if name in ("-h", "--help"):
            opts["help"] = True
            i += 1
        elif name in values:
            opts[values[name]] = value()[0]
        elif name == "--setenv":
            opts["env_ops"].append(("set", *value(2)))
        elif name == "--unsetenv":
            opts["env_ops"].append(("unset", value()[0]))
        elif name == "--clearenv":
            opts["env_ops"].append(("clear",))
            i += 1
        elif name == "--timestamps":
            opts["timestamps"] = True
            i += 1
        elif name == "--pty":
            opts["pty"] = inline if eq else True
            i += 1
        elif name == "--no-pty":
            opts["pty"] = False
            i += 1
        elif name == "--pty-raw":
            opts["pty_raw"] = True
            i += 1
        elif name in ("--sandbox", "--share-net", "--privileged"):
            opts[name[2:].replace("-", "_")] = True
            opts["sandbox"] = True
            i += 1
        elif name in ("--ro-bind", "--bind", "--dev-bind", "--symlink"):
            opts.setdefault(name[2:], []).append(tuple(value(2)))
            opts["sandbox"] = True
        elif name == "--device":
            opts.setdefault("device", []).append(value()[0])
        elif name in ("--tmpfs", "--dir", "--root", "--hostname", "--uid", "--gid"):
            text = value()[0]
            if name in ("--tmpfs", "--dir"):
                opts.setdefault(name[2:], []).append(text)
            else:
                opts[name[2:]] = text
            opts["sandbox"] = True
        else:
            raise UsageError(f"unknown option {arg}")
    opts["argv"] = args[i:]
    if not opts["argv"] and not opts.get("help"):
        raise UsageError("no command given (execbox run [OPTIONS] -- CMD [ARGS...])")
    return opts


def _number(text: str | None, field: str, kind: type = float) -> Any:
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        raise SpecError(field, f"expected a number, got {text!r}") from None


def _devices(opts: dict[str, Any]) -> list[str] | None:
    """--device RULE adds to runc's default allowlist; a sandbox as root gets the default."""
    extra = opts.get("device", [])
    if not extra and not (opts.get("sandbox") and os.geteuid() == 0):
        return None
    from ..cgroups.devices import DEFAULT_RULES, parse_rule

    for rule in extra:
        parse_rule(rule, "--device")  # errors name the option, not a list index
    return [*DEFAULT_RULES, *extra]


def _sandbox(opts: dict[str, Any]) -> Any:
    """A SandboxSpec from the sandbox options, or None when none was given."""
    if not opts.get("sandbox"):
        return None
    from ..model.sandbox import SandboxSpec, check_workdir

    box = SandboxSpec(
        opts.get("root"),
        ro_binds=opts.get("ro-bind", []), binds=opts.get("bind", []),
        dev_binds=opts.get("dev-bind", []), tmpfs=opts.get("tmpfs", []),
        dirs=opts.get("dir", []), symlinks=opts.get("symlink", []),
        hostname=opts.get("hostname", "execbox"), share_net=bool(opts.get("share_net")),
        uid=_number(opts.get("uid"), "--uid", int), gid=_number(opts.get("gid"), "--gid", int),
        privileged=bool(opts.get("privileged")))
    if not opts.get("root"):
        opts["chdir"] = check_workdir(box, opts.get("chdir") or os.getcwd())
    return box


def _environment(ops: list[tuple[str, ...]], term: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if term is not None:  # pty mode: a default the options below may still override
        env["TERM"] = term
    for op in ops:
        if op[0] == "clear":
            env.clear()
        elif op[0] == "unset":
            env.pop(op[1], None)
        else:
            if not op[1] or "=" in op[1]:
                raise SpecError("--setenv", f"invalid variable name {op[1]!r}")
            env[op[1]] = op[2]
    return env


def _ensure_std_fds() -> None:
    """A closed 0/1/2 would be reused by the next open() and confuse every step."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def run_command(opts: dict[str, Any]) -> int:
    from ..model.spec import make_spec

    pty: bool | str = opts.get("pty", False)
    if isinstance(pty, str):
        from ..api.run import pty_mode

        pty = pty_mode(pty)
    pty_size = None
    if opts.get("pty_size") is not None:
        from ..streams.pty import parse_size

        pty_size = parse_size(opts["pty_size"], "--pty-size")
    sandbox = _sandbox(opts)
    term = None
    if pty:
        term = opts.get("pty_term") or "xterm-256color"
    spec = make_spec(
        opts["argv"],
        cwd=opts.get("chdir"),
        env=_environment(opts["env_ops"], term),
        controlling_tty=bool(pty),
        memory=opts.get("memory"),
        pids=_number(opts.get("pids"), "--pids", int),
        cpus=_number(opts.get("cpus"), "--cpus"),
        devices=_devices(opts),
        cgroup_optional=sandbox is not None,
        sandbox=None if sandbox is None else sandbox.to_wire(),
        timeout=_number(opts.get("timeout"), "--timeout"),
        grace=_number(opts.get("grace", "10"), "--grace"),
        cancel_signal=opts.get("cancel_signal", "TERM"),
    )
    limit = _number(opts.get("output_limit"), "--output-limit", int)
    if opts.get("chdir") and not opts.get("root"):
        opts["chdir"] = os.path.abspath(opts["chdir"])  # steps may chdir this very process
    if opts.get("result"):  # a --chdir step may move this process before it is written
        opts["result"] = os.path.abspath(opts["result"])
    if limit is not None and limit < 0:
        raise SpecError("--output-limit", "must be >= 0")
    from .runner import run_in_process

    result = run_in_process(spec, stdout=opts.get("stdout"), stderr=opts.get("stderr"),
                            output_limit=limit, timestamps=opts["timestamps"], pty=pty,
                            pty_size=pty_size, pty_raw=bool(opts.get("pty_raw")))
    if result.get("failure"):
        failure = result["failure"]
        hint = f" ({failure['hint']})" if failure["hint"] else ""
        sys.stderr.write(f"execbox: {failure['message']} [{failure['errno']}]{hint}\n")
    if opts.get("result"):
        import json

        try:
            with open(opts["result"], "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
        except OSError as exc:
            sys.stderr.write(f"execbox: --result: cannot write {opts['result']}: "
                             f"{exc.strerror}\n")
            return EXIT_SETUP_FAILED
    if result["timed_out"]:
        return 124
    return int(result["exit_code"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    _ensure_std_fds()
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(TOP_USAGE)
        return 0 if args else 2
    if args[0] in ("version", "--version"):
        from .. import __version__

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
    try:
        opts = parse_run_args(args[1:])
        if opts.get("help"):
            sys.stdout.write(USAGE)
            return 0
        return run_command(opts)
    except (UsageError, SpecError) as exc:
        sys.stderr.write(f"execbox run: error: {exc}\n")
        return EXIT_SETUP_FAILED


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
