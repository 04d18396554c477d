"""The sandbox's processes that are not the step: the relay, pid 1, and a long-lived
sandbox's `hold`.

The relay is the supervisor's child; it stays in the host's pid namespace, forwards signals
and exits with the step's exact status. pid 1 (an execbox init) forks the step, forwards
signals, reaps every orphan and reports the step's status through a pipe (pid 1 cannot
re-raise a signal on itself). When pid 1 exits the kernel kills whatever is left in its
namespace, so nothing a step started survives it.

A run of a long-lived sandbox gets the same: its own pid namespace nested in the sandbox's,
with its own pid 1, so exit, timeout and cancel end everything that run started and leave
the sandbox usable (the process leak of moby/buildkit's "fix process termination handling
for runc exec").

Every link is tied to its parent with PR_SET_PDEATHSIG(SIGKILL), so a SIGKILLed supervisor
takes the relay, pid 1 and so the whole namespace with it.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import struct

from ..linux import syscalls as sc
from ..model.signals import forward_to
from .console import attach_step_terminal, relay_terminal
from .context import ChildContext
from .namespaces import USERNS_FD_IN_INIT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)
# Signals that end a run: pid 1 passes these to every process of its namespace too, so a
# cancel reaches what the step setsid'd or double-forked away (kill(-1) from pid 1 reaches
# all of its namespace but itself).
_CANCELS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})
_STATUS = struct.Struct("i")
_ALL_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
_PARENT_GONE = 255
INIT_NAME = "execbox-init"  # a sandbox pid 1's comm


def exit_like(status: int) -> None:
    """Exit the way the step did: same code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if os.getpid() != 1:
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def die_with_parent(parent: int) -> None:
    """SIGKILL when the parent dies; if it already has (we were reparented), go now."""
    sc.set_parent_death_signal(signal.SIGKILL)
    if parent and os.getppid() != parent:
        os._exit(_PARENT_GONE)


def tied_fork() -> int:
    """fork; the child gets SIGKILL when this process dies. Across a pid namespace the child
    sees no parent pid, so it learns whether we died before its prctl from a pipe only we
    hold open."""
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        sc.set_parent_death_signal(signal.SIGKILL)
        parent_gone = bool(select.select([alive_r], [], [], 0)[0])  # EOF
        os.close(alive_r)
        if parent_gone:
            os._exit(_PARENT_GONE)
        return 0
    os.close(alive_r)
    _TIES.append(alive_w)  # open until this process exits (close-on-exec for the step)
    return pid


_TIES: list[int] = []




def _relay(child: int, status_r: int) -> None:
    """Forward signals to child, wait for it, exit with the step's status (from status_r,
    where pid 1 reports it, else the child's own)."""
    for sig in _FORWARDED:
        signal.signal(sig, forward_to(child))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            os._exit(255)
    if status_r >= 0:
        reported = os.read(status_r, _STATUS.size)
        if len(reported) == _STATUS.size:  # pid 1 exited normally; this is the step's status
            status = _STATUS.unpack(reported)[0]
    exit_like(status)


def fork_relay(ctx: ChildContext, parent: int = 0) -> None:
    """Fork pid 1 of the new pid namespace; this process stays outside as its relay.
    parent: the supervisor's pid (the relay dies with it)."""
    ctx.label = "fork init"
    die_with_parent(parent)
    status_r, status_w = os.pipe()
    init = tied_fork()
    if init == 0:
        os.close(status_r)
        ctx.extra["status_fd"] = status_w
        return
    os.close(status_w)
    os.close(ctx.error_fd)
    _relay(init, status_r)


def as_init(ctx: ChildContext) -> None:
    """pid 1 forked straight by the supervisor (spawn/ahead.py): die with it, and until
    the step exists, end at once on a cancel signal, reporting it as the step's fate (pid 1
    ignores a signal it has no handler for, even SIGTERM)."""
    ctx.label = "pid 1"
    _die_with_supervisor(ctx)
    with open("/proc/self/comm", "w") as comm:  # in ps, apart from its supervisor
        comm.write(INIT_NAME)

    def cancelled(signum: int, frame: object) -> None:
        # The status pipe's number is looked up now: dup2 may have moved it since.
        os.write(ctx.extra["status_fd"], _STATUS.pack(signum))  # wait status: killed by it
        os._exit(128 + signum)

    for sig in _CANCELS:
        signal.signal(sig, cancelled)


def _die_with_supervisor(ctx: ChildContext) -> None:
    """PR_SET_PDEATHSIG(SIGKILL), and go now if the supervisor is gone already. Across a
    pid namespace there is no parent pid to check: the error pipe's read end is the
    supervisor's, so POLLERR on our end means it is gone."""
    sc.set_parent_death_signal(signal.SIGKILL)
    alive = select.poll()
    alive.register(ctx.error_fd, select.POLLOUT)
    if any(event & select.POLLERR for _, event in alive.poll(0)):
        os._exit(_PARENT_GONE)


def fork_run(ctx: ChildContext, parent: int = 0) -> None:
    """A run of a long-lived sandbox (after join_sandbox): fork into the sandbox's pid
    namespace, and from there into a new one nested in it, whose pid 1 this becomes.

    unshare(CLONE_NEWPID) fails with EINVAL right after setns into a pid namespace, so a
    process already inside (the "waiter") does it. Relay and waiter forward signals; pid 1
    reports the step's status straight to the relay."""
    ctx.label = "fork into sandbox"
    die_with_parent(parent)
    status_r, status_w = os.pipe()
    waiter = tied_fork()
    if waiter:
        os.close(status_w)
        os.close(ctx.error_fd)
        _relay(waiter, status_r)
    os.close(status_r)
    ctx.label = "unshare pid (the run's own namespace)"
    sc.unshare(sc.CLONE_NEWPID)
    ctx.label = "fork the run's init"
    init = tied_fork()
    if init:
        os.close(status_w)
        os.close(ctx.error_fd)
        _relay(init, -1)
    ctx.extra["status_fd"] = status_w
    from .mounts import proc_of_this_pid_namespace

    proc_of_this_pid_namespace(ctx)


def fork_step(ctx: ChildContext) -> None:
    """pid 1: fork the step, forward signals, reap everything, exit with the step's status
    (which takes every other process of the namespace with it)."""
    ctx.label = "fork step"
    master = ctx.extra.pop("pty_master", -1)
    slave = ctx.extra.pop("pty_slave", -1)
    step = os.fork()
    if step == 0:
        os.close(ctx.extra.pop("status_fd"))
        if slave >= 0:  # the step's own terminal, from the sandbox's devpts
            attach_step_terminal(ctx, master, slave)
        else:
            os.setpgid(0, 0)  # one group pid 1 can signal
        return
    os.close(ctx.error_fd)
    _be_init(ctx, step, master, slave)


def spawn_step(ctx: ChildContext, argv: list[str], env: list[list[str]],
               search: list[str]) -> None:
    """pid 1, already in the step's user namespace with the step's ids and no capabilities
    (the steps before this one did that to pid 1 itself): posix_spawn the step (vfork speed,
    no Python between fork and exec) into its own process group with default signals, then
    stay its init as fork_step does. An exec failure is reported as the step's."""
    # Taking the step's ids cleared the parent-death signal (the kernel does so on every
    # change of credentials): set it again, or pid 1 would outlive a killed supervisor.
    _die_with_supervisor(ctx)
    ctx.label = "execve"
    environment = dict(env)
    denied = ""
    step = 0
    program = argv[0]  # execvp's search, as child/program.py does it for execve
    for path in [program] if "/" in program else [os.path.join(d or ".", program)
                                                   for d in search]:
        ctx.path_tried = path
        try:
            step = os.posix_spawn(path, argv, environment, setpgroup=0,
                                  setsigdef=_ALL_SIGNALS, setsigmask=())
            break
        except OSError as exc:
            if "/" not in program and exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            if "/" not in program and exc.errno == errno.EACCES:
                denied = path
                continue
            raise
    if not step:
        ctx.path_tried = denied or program
        raise OSError(errno.EACCES if denied else errno.ENOENT, ctx.path_tried)
    os.close(ctx.error_fd)  # the step has exec'd: its supervisor sees it start
    _be_init(ctx, step, -1, -1)


def _be_init(ctx: ChildContext, step: int, master: int, slave: int) -> None:
    """The rest of pid 1's life: forward signals, relay the terminal or just reap, report
    the step's status, exit (which ends every other process of the namespace)."""
    status_fd = ctx.extra["status_fd"]
    cancelled = [False]
    for sig in _FORWARDED:
        if sig != signal.SIGWINCH or master < 0:
            signal.signal(sig, _forward_from_init(step, sig in _CANCELS, cancelled))
    if master >= 0:
        os.close(slave)

        def step_ended() -> None:
            """The step's own output is in the terminal already; the rest of its tree must
            not keep the drain (and so the step) going: it dies now, as it would with us,
            unless a cancel gives it the rest of the grace period."""
            if not cancelled[0]:
                try:
                    os.kill(-1, signal.SIGKILL)  # (pid 1: all of the namespace but us)
                except ProcessLookupError:
                    pass

        status = relay_terminal(master, step, step_ended)
    else:
        for fd in (0, 1, 2):  # a leaked copy of the output would delay its end
            os.close(fd)
        status = _reap_until(step)
    os.write(status_fd, _STATUS.pack(status))
    if cancelled[0]:
        # As for a plain step: while cancelling, the rest of the tree gets the remainder of
        # the grace period (the supervisor SIGKILLs everything after it); otherwise
        # leftovers die at once, with us.
        _reap_all()
    exit_like(status)


def _forward_from_init(step: int, cancel: bool,
                       cancelled: list[bool]) -> Callable[[int, object], None]:
    def forward(signum: int, frame: object) -> None:
        try:
            os.killpg(step, signum)
        except ProcessLookupError:  # not yet (or no longer) its own group
            try:
                os.kill(step, signum)
            except ProcessLookupError:
                pass
        if cancel:
            cancelled[0] = True
            try:
                os.kill(-1, signum)
            except ProcessLookupError:
                pass

    return forward


def _reap_until(step: int) -> int:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(255)
        if pid == step:
            return status


def _reap_all() -> None:
    """Until no process is left: every process of the namespace descends from pid 1."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def hold(ctx: ChildContext) -> None:
    """pid 1 of a long-lived sandbox: keep the namespaces alive and reap whatever is
    orphaned inside, until SIGTERM/SIGINT/SIGHUP; its exit then kills everything inside.
    It keeps the step user namespace at fd 3, where runs take it with pidfd_getfd."""
    ctx.label = "hold"
    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    watched = [*stops, signal.SIGCHLD]
    for sig in watched:  # handlers, or pid 1 would never see them
        signal.signal(sig, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    os.close(ctx.extra.pop("status_fd"))  # we exit 0 on a stop; the relay takes that
    userns = ctx.extra.pop("userns_fd", -1)
    # Setup is complete: the caller sees the start succeed. Closed before the dup2 below,
    # which could otherwise land on the error pipe's number and be closed with it.
    os.close(ctx.error_fd)
    if userns >= 0 and userns != USERNS_FD_IN_INIT:
        os.dup2(userns, USERNS_FD_IN_INIT, inheritable=False)
        os.close(userns)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    while True:
        info = signal.sigtimedwait(watched, 5.0)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if info is not None and info.si_signo in stops:
            os._exit(0)
