"""`execbox doctor`: can this host run everything execbox does? One line per check.

Each check returns (status, name, finding, advice) with status "ok", "note" (worth knowing,
nothing missing), "warn" (a feature is unavailable) or "fail" (execbox cannot work here).
Checks take their inputs as arguments so the failing branches can be exercised in tests.
"""

from __future__ import annotations

import errno
import os
import platform

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

Check = tuple[str, str, str, str]
# The checks whose "fail" means execbox cannot work here (exit status 2).
ESSENTIAL = frozenset({"architecture", "kernel", "pidfd"})


def check_architecture(machine: str | None = None) -> Check:
    """Raw syscalls and ioctls are numbered per architecture; execbox has a table for few."""
    from ..linux import arch

    name = arch.current() if machine is None else arch.normalize(machine)
    if arch.is_known(name):
        return ("ok", "architecture", f"{name} (syscall table known)", "")
    return ("fail", "architecture", f"unknown architecture {name}: sandbox, device programs "
            "and PTY steps cannot run", f"execbox has syscall and ioctl numbers only for "
            f"{', '.join(arch.KNOWN)}; plain steps still run")


def check_kernel(release: str | None = None) -> Check:
    release = release or platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return ("warn", "kernel", f"cannot parse version {release!r}", "")
    if (major, minor) < (5, 3):
        return ("fail", "kernel", f"Linux {release}: no pidfd_open (needs 5.3)",
                "execbox needs Linux 5.3 or newer")
    missing = [name for name, need in (("close_range", (5, 9)), ("openat2", (5, 6)),
                                       ("new mount API", (5, 2)), ("idmapped mounts", (5, 12)))
               if (major, minor) < need]
    if missing:
        return ("warn", "kernel", f"Linux {release}: lacks {', '.join(missing)}",
                "upgrade the kernel for the full sandbox")
    return ("ok", "kernel", f"Linux {release}: pidfd, close_range, openat2, new mount API, "
            "idmapped mounts", "")


def check_pidfd() -> Check:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (OSError, AttributeError) as exc:
        return ("fail", "pidfd", f"pidfd_open failed: {exc}", "execbox waits with pidfds")
    return ("ok", "pidfd", "pidfd_open works", "")


def check_kernel_features() -> Check:
    from ..linux import syscalls as sc

    problems = []
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        os.close(sc.openat2_in_root(root, ".", os.O_PATH | os.O_CLOEXEC))
    except OSError as exc:
        problems.append(f"openat2: {exc.strerror}")
    finally:
        os.close(root)
    found = "openat2 and open_tree available"
    try:
        os.close(sc.open_tree_clone("/tmp"))
    except OSError as exc:
        # An unprivileged caller may not copy a mount tree of the host's (EPERM); its
        # sandbox makes its mounts inside a user namespace of its own, where it may.
        if os.geteuid() == 0 or exc.errno != errno.EPERM:
            problems.append(f"open_tree: {exc.strerror}")
        else:
            found = "openat2 available; open_tree only in a user namespace of this user's"
    if problems:
        return ("warn", "syscalls", "; ".join(problems),
                "without them sandbox mounts cannot be resolved safely or idmapped")
    return ("ok", "syscalls", found, "")


def check_cgroups() -> Check:
    from ..cgroups.delegation import problem
    from ..cgroups.host import detect
    from ..cgroups.step import V2_CONTROLLERS, CgroupError, StepCgroup

    try:
        host = detect()
    except OSError as exc:
        return ("warn", "cgroups", f"cannot read /proc/self/cgroup: {exc}", "")
    advice = ("run execbox where it may create child cgroups (a unit or scope with "
              "Delegate=yes) to get --memory/--pids/--cpus and device rules")
    if host.mode == "v2" and host.unified is not None:
        try:
            trouble = problem(host.unified, set(V2_CONTROLLERS))
        except OSError as exc:
            trouble = f"cannot inspect {host.unified}: {exc}"
        if trouble:
            return ("warn", "cgroups", trouble, advice)
    usable = []
    for controller in ("memory", "pids", "cpu", "freezer", "devices"):
        found = host.directory_for(controller)
        if found and os.access(found[1], os.W_OK):
            usable.append(f"{controller} ({found[0]})")
    try:
        StepCgroup.create(None, None, None, host=host).remove()
    except (CgroupError, OSError) as exc:
        return ("warn", "cgroups", f"{host.mode}; cannot create a step cgroup: {exc}", advice)
    where = f"; delegated: {host.unified}" if host.mode == "v2" else ""
    return ("ok", "cgroups", f"{host.mode}; usable from here: {', '.join(usable) or 'none'}"
            f"{where}", "")


def _in_child(action: Callable[[], None]) -> str | None:
    """Run action in a forked child (namespaces must not touch us); None if it worked."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            action()
            os._exit(0)
        except BaseException as exc:
            os.write(write_end, str(exc).encode()[:500] or b"failed")
            os._exit(1)
    os.close(write_end)
    message = os.read(read_end, 1000).decode()
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return None if status == 0 else message or f"exit {status}"


def check_user_namespaces() -> Check:
    from ..linux import syscalls as sc

    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = -1
    if limit == 0:
        return ("warn", "user namespaces", "user.max_user_namespaces is 0",
                "sysctl user.max_user_namespaces=15000 to allow rootless sandboxes")
    problem = _in_child(lambda: sc.unshare(sc.CLONE_NEWUSER))
    if problem:
        return ("warn", "user namespaces", f"unshare(CLONE_NEWUSER) failed: {problem}",
                "enable user namespaces for the sandbox")
    return ("ok", "user namespaces", f"allowed (max {limit})", "")


def check_procfs() -> Check:
    """A fresh procfs mounts only when /proc is not partly hidden by over-mounts."""
    from ..linux import syscalls as sc

    def probe() -> None:
        flags = sc.CLONE_NEWNS | sc.CLONE_NEWPID
        if os.geteuid() != 0:
            flags |= sc.CLONE_NEWUSER
        sc.unshare(flags)
        if os.fork() == 0:
            try:
                sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
                sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
                os._exit(0)
            except OSError:
                os._exit(1)
        _, status = os.waitpid(-1, 0)
        if status != 0:
            raise OSError("mount proc failed")

    problem = _in_child(probe)
    if problem:
        return ("warn", "procfs", f"a fresh /proc cannot be mounted: {problem}",
                "/proc on the host may have over-mounted paths; sandboxes need a fresh one")
    return ("ok", "procfs", "a fresh procfs mounts in a new pid namespace", "")


def check_dev_char(path: str = "/dev/char") -> Check:
    if os.path.isdir(path):
        return ("ok", "/dev/char", "present", "")
    return ("note", "/dev/char", f"{path} is missing",
            "runc under systemd generates wrong device rules without it (/dev/null EPERM "
            "in containers after a systemctl daemon-reload); execbox verifies its own "
            "rules, other tools on this host may not")


def check_devpts() -> Check:
    from ..streams.pty import DEFAULT_SIZE, PtySetupError, open_pty

    try:
        open_pty(DEFAULT_SIZE).close()
    except PtySetupError as exc:
        return ("warn", "devpts", f"{exc.step} failed: {os.strerror(exc.errno)}",
                "PTY mode needs /dev/ptmx and a mounted devpts")
    return ("ok", "devpts", "pseudo-terminals can be allocated", "")


def check_noexec(paths: tuple[str, ...] | None = None) -> Check:
    paths = paths or ("/tmp", os.getcwd())
    noexec = [p for p in paths if os.path.isdir(p) and os.statvfs(p).f_flag & os.ST_NOEXEC]
    if noexec:
        return ("warn", "noexec", f"mounted noexec: {', '.join(noexec)}",
                "steps cannot run programs they build there")
    return ("ok", "noexec", f"executables can run from {', '.join(paths)}", "")


def check_self_restrictions(status_path: str = "/proc/self/status") -> Check:
    with open(status_path) as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    seccomp = fields.get("Seccomp", "0").strip()
    nnp = fields.get("NoNewPrivs", "0").strip()
    if seccomp != "0" or nnp != "0":
        return ("warn", "restrictions", f"execbox runs with seccomp={seccomp}, "
                f"no_new_privs={nnp}", "some namespace or mount operations may be refused")
    return ("ok", "restrictions", "no seccomp filter and no no_new_privs on execbox", "")


def check_device_programs() -> Check:
    from ..cgroups.host import detect

    host = detect()
    if host.unified is None:
        return ("ok", "device programs", "no cgroup2 hierarchy to inspect", "")
    try:
        from ..linux.bpf import attached_programs

        ids = attached_programs(host.unified)
    except OSError as exc:
        return ("ok", "device programs", f"not inspectable here ({exc.strerror})", "")
    if ids:
        return ("warn", "device programs", f"{len(ids)} already attached to "
                f"{host.unified}: ids {ids}", "a stricter one there overrides execbox's rules")
    return ("ok", "device programs", f"none attached to {host.unified}", "")


def check_fast_sandbox_launch(native: str | None = "", launcher: str | None = "") -> Check:
    """A root caller's sandboxed step starts fastest with a native pid 1 and the step
    launcher (linux/native_init.py, linux/launcher.py); without them Python does the same,
    slower. The arguments say why either is missing (None: it is there); by default this
    process finds out."""
    from ..linux import launcher as step_launcher
    from ..linux import native_init

    if native == "":
        native = None if native_init.available() else native_init.why_unavailable()
    if launcher == "":
        launcher = None if step_launcher.available() else step_launcher.why_unavailable()
    missing = [f"{what} ({why})" for what, why in (("native pid 1", native),
                                                  ("step launcher", launcher)) if why]
    if missing:
        return ("note", "fast sandbox launch", f"without {' and '.join(missing)}",
                "sandboxed steps run the same, set up by Python steps (slower)")
    return ("ok", "fast sandbox launch", "native pid 1 and step launcher", "")


CHECKS: tuple[Callable[[], Check], ...] = (
    check_architecture, check_kernel, check_pidfd, check_kernel_features, check_cgroups,
    check_user_namespaces, check_procfs, check_dev_char, check_devpts, check_noexec,
    check_self_restrictions, check_device_programs, check_fast_sandbox_launch)


def run_checks() -> list[Check]:
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as exc:
            results.append(("warn", check.__name__.removeprefix("check_"), f"check failed: "
                            f"{exc}", ""))
    return results


def exit_status(results: list[Check]) -> int:
    if any(status == "fail" and name in ESSENTIAL for status, name, _, _ in results):
        return 2
    return 1 if any(status in ("warn", "fail") for status, *_ in results) else 0


def main(args: list[str]) -> int:
    """`execbox doctor [--json]`; a bad argument is a usage error (exit status 2)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="execbox doctor", description="Check what this host supports, one line per "
        "check. Exit status 0: all ok; 1: a feature is unavailable; 2: execbox cannot work "
        "here (or a usage error).")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    try:
        options = parser.parse_args(args)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    results = run_checks()
    if options.json:
        import json

        print(json.dumps([{"status": s, "check": n, "finding": f, "advice": a}
                          for s, n, f, a in results], indent=1))
    else:
        for status, name, finding, advice in results:
            line = f"{status:4}  {name}: {finding}"
            print(line + (f"\n      -> {advice}" if advice else ""))
    return exit_status(results)
