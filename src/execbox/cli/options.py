"""`execbox run`'s options: one table, and the hand-written parser it drives (argparse
costs more start-up time than a whole step)."""

from __future__ import annotations

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

class UsageError(Exception):
    pass


# option -> (destination, how many values, kind). Kinds: "value" keeps the last value,
# "append" collects values (pairs for two), "env" records an environment operation in
# order, "flag" sets True. Options marked sandbox=True turn the sandbox on.
VALUE, APPEND, ENV, FLAG = "value", "append", "env", "flag"
OPTIONS: dict[str, tuple[str, int, str, bool]] = {
    "--chdir": ("chdir", 1, VALUE, False),
    "--timeout": ("timeout", 1, VALUE, False),
    "--grace": ("grace", 1, VALUE, False),
    "--cancel-signal": ("cancel_signal", 1, VALUE, False),
    "--stdout": ("stdout", 1, VALUE, False),
    "--stderr": ("stderr", 1, VALUE, False),
    "--output-limit": ("output_limit", 1, VALUE, False),
    "--result": ("result", 1, VALUE, False),
    "--pty-size": ("pty_size", 1, VALUE, False),
    "--pty-term": ("pty_term", 1, VALUE, False),
    "--memory": ("memory", 1, VALUE, False),
    "--pids": ("pids", 1, VALUE, False),
    "--cpus": ("cpus", 1, VALUE, False),
    "--device": ("device", 1, APPEND, False),
    "--setenv": ("set", 2, ENV, False),
    "--unsetenv": ("unset", 1, ENV, False),
    "--clearenv": ("clear", 0, ENV, False),
    "--timestamps": ("timestamps", 0, FLAG, False),
    "--no-pty": ("pty", 0, FLAG, False),
    "--pty-raw": ("pty_raw", 0, FLAG, False),
    "--sandbox": ("sandbox", 0, FLAG, True),
    "--share-net": ("share_net", 0, FLAG, True),
    "--privileged": ("privileged", 0, FLAG, True),
    "--root": ("root", 1, VALUE, True),
    "--hostname": ("hostname", 1, VALUE, True),
    "--uid": ("uid", 1, VALUE, True),
    "--gid": ("gid", 1, VALUE, True),
    "--ro-bind": ("ro-bind", 2, APPEND, True),
    "--bind": ("bind", 2, APPEND, True),
    "--dev-bind": ("dev-bind", 2, APPEND, True),
    "--symlink": ("symlink", 2, APPEND, True),
    "--tmpfs": ("tmpfs", 1, APPEND, True),
    "--dir": ("dir", 1, APPEND, True),
}


def _values(args: list[str], i: int, name: str, count: int, inline: str | None
            ) -> tuple[list[str], int]:
    """The option's values and the index after them; --opt=A [B] gives A inline."""
    if inline is not None:
        if count == 0:
            raise UsageError(f"{name} takes no value (got {name}={inline!r})")
        if i + count - 1 >= len(args):
            raise UsageError(f"{name} needs {count} arguments")
        return [inline, *args[i + 1:i + count]], i + count
    if i + count >= len(args) or "--" in args[i + 1:i + 1 + count]:
        raise UsageError(f"{name} needs {count} argument{'s' if count > 1 else ''}"
                         + (" before --" if "--" in args[i + 1:i + 1 + count] else ""))
    return args[i + 1:i + 1 + count], i + 1 + count


def parse_run_args(args: list[str]) -> dict[str, Any]:
    """Options up to the first non-option (or --) and the command after them."""
    opts: dict[str, Any] = {"env_ops": [], "timestamps": False}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, text = arg.partition("=")
        inline = text if eq else None
        if name in ("-h", "--help"):
            if inline is not None:
                raise UsageError(f"{name} takes no value (got {arg!r})")
            opts["help"] = True
            i += 1
            continue
        if name == "--pty":  # --pty or --pty=auto|yes|no
            opts["pty"] = inline if inline is not None else True
            i += 1
            continue
        if name not in OPTIONS:
            raise UsageError(f"unknown option {arg}")
        dest, count, kind, sandbox = OPTIONS[name]
        values, i = _values(args, i, name, count, inline)
        if kind == FLAG:
            opts[dest] = name != "--no-pty"
        elif kind == VALUE:
            opts[dest] = values[0]
        elif kind == ENV:
            opts["env_ops"].append((dest, *values))
        else:
            opts.setdefault(dest, []).append(tuple(values) if count == 2 else values[0])
        if sandbox:
            opts["sandbox"] = True
    opts["argv"] = args[i:]
    if not opts["argv"] and not opts.get("help"):
        raise UsageError("no command given (execbox run [OPTIONS] -- CMD [ARGS...])")
    return opts
