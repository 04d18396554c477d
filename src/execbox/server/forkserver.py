"""The fork server: a single-threaded helper, started once from a fresh interpreter.

It keeps a pool of pre-forked *supervisors* waiting on the shared control socket. A caller
sends one message carrying a job socket and the step's stdio fds; an idle supervisor takes
it, runs the job (spawn, wait, cancel, reap; it is a child subreaper) and goes back to the
pool. The server only forks when fewer than two supervisors are idle. The server itself
never holds a caller's fd, so a file the caller is writing can never leak into a step
(ETXTBSY), and a caller's result travels on its own job socket, so the server dying loses
nothing.
"""

from __future__ import annotations

import fcntl
import gc
import marshal
import math
import os
import select
import signal
import socket
import struct
import sys
import time

from ..linux.syscalls import set_child_subreaper, set_parent_death_signal
from ..model import wire
from ..model.spec import CommandSpec
from ..plan.build import Plan, build_plan
from ..plan.kept import kept_plan, make_spare, plan_and_keep
from ..spawn import ahead, ready
from ..spawn.failure import StepFailure
from ..spawn.ready import ReadyInit
from ..spawn.ready import namespaces_of as ready_namespaces_of
from ..spawn.ready import profile_of as ready_profile_of
from ..supervise import proctree
from ..supervise.reaper import Reaper
from ..supervise.supervision import Supervision

TYPE_CHECKING = False  # typing costs start-up time; annotations are strings
if TYPE_CHECKING:
    from typing import NoReturn

MIN_IDLE_SUPERVISORS = 2
IDLE_EXIT_SECONDS = 30.0
LEFT_BEHIND_WAIT = 1.0  # seconds an exiting supervisor waits for a step cgroup to go
LEFT_BEHIND_RECHECK = 1.0  # seconds between an idle supervisor's tries

# Events on the server's event pipe: a kind byte and the supervisor's pid.
_TOOK_JOB, _IDLE_AGAIN = b"t", b"i"
_EVENT = struct.Struct("<ci")


def _tell(events: int, kind: bytes) -> None:
    os.write(events, _EVENT.pack(kind, os.getpid()))


def run_job(job: socket.socket, io_fds: list[int], ready: ReadyInit | None = None,
            scoped: bool = False) -> tuple[Plan | None, ReadyInit | None]:
    """Supervise one step for the caller at the other end of job; the plan it ran, and the
    ready pid 1 if it is kept. ready: a pid 1 made ahead, which the step adopts if its plan
    fits; a step that is no root sandbox (it never could) leaves it for a later one, any
    other discards it. scoped: in a shared supervisor (server/shared.py), beside other
    jobs; a step that needs a process of its own (no native pid 1) is forked one."""
    try:
        return _take(job, io_fds, ready, scoped)
    except BaseException:
        close_each(io_fds)  # (a shared supervisor lives on: nothing of the job may stay)
        raise


def _take(job: socket.socket, io_fds: list[int], ready: ReadyInit | None, scoped: bool
          ) -> tuple[Plan | None, ReadyInit | None]:
    try:
        data = wire.receive_frame(job)
        gone = select.poll()
        gone.register(job.fileno(), select.POLLRDHUP)
        if gone.poll(0):  # the caller dropped the handle before a supervisor got here
            close_each(io_fds)
            if ready is not None:
                ready.discard()
            return None, None
        try:
            # From here on the step may start: a caller that sees this supervisor die must
            # report that, never submit the job again (it could run twice).
            wire.send(job, ("taken", os.getpid()))
        except OSError:
            pass  # the caller is gone; the step is cancelled as soon as it is watched
        kept = kept_plan(data)
        request = marshal.loads(data) if kept is None else kept.request
        spec = CommandSpec.from_wire(request["spec"]) if kept is None else kept.spec
        fd_map = [[io_fds[index], target] for index, target in request["fds"]]
        join = request.get("join_fd")
        join_fd = -1
        if join is not None:  # above every target, so the child's dup2 cannot clobber it
            floor = max([2, *(target for _, target in request["fds"])]) + 1
            join_fd = fcntl.fcntl(io_fds[join], fcntl.F_DUPFD_CLOEXEC, floor)
            io_fds.append(join_fd)  # closed with the others once the step has started
        plan = plan_and_keep(data, request, spec, fd_map, join_fd) if kept is None \
            else kept.plan(fd_map)
    except BaseException:
        if ready is not None:
            ready.discard()
        raise
    if scoped and not runs_scoped(plan):
        if ready is not None:
            ready.discard()
        _run_apart(job, io_fds, spec, fd_map, join_fd)
        return None, None
    return _supervise(job, io_fds, spec, plan, ready, scoped)


def runs_scoped(plan: Plan) -> bool:
    """Whether the step can be supervised beside others in one process: alone in a pid
    namespace whose pid 1 is a native one, so nothing of it is ever orphaned to us."""
    namespaces = ready_namespaces_of(plan)
    return namespaces is not None and bool(namespaces[3])


def _run_apart(job: socket.socket, io_fds: list[int], spec: CommandSpec,
               fd_map: list[list[int]], join_fd: int) -> None:
    """Supervise the job in a process forked for it alone, a child subreaper, as an
    unshared supervisor would; wait for that process."""
    pid = os.fork()
    if pid == 0:
        try:
            set_child_subreaper()
            _stuck.clear()  # the shared supervisor's children, not ours
            from ..child.context import ChildContext
            from ..child.fds import close_other_fds

            close_other_fds(ChildContext(-1), [job.fileno(), *io_fds])  # others' jobs' ends
            _supervise(job, io_fds, spec, build_plan(spec, fd_map, join_fd), None, False)
        except BaseException:
            import traceback

            log("a supervisor failed; its step is killed:\n" + traceback.format_exc())
            Reaper().kill_and_reap_all()
        finally:
            os._exit(0)
    close_each(io_fds)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):  # killed: its step cgroup has no owner left
        try:
            from ..cgroups.step import remove_stale_of

            remove_stale_of(pid)
        except OSError:
            pass


def close_each(fds: list[int]) -> None:
    """Close the job's fds, once: in a shared supervisor a number closed twice could be
    another job's by then."""
    while fds:
        os.close(fds.pop())


def _supervise(job: socket.socket, io_fds: list[int], spec: CommandSpec, plan: Plan,
               ready: ReadyInit | None, scoped: bool
               ) -> tuple[Plan | None, ReadyInit | None]:
    kept: ReadyInit | None = None
    if ready is not None and ready_namespaces_of(plan) is None:
        kept, ready = ready, None  # a plain step: the ready pid 1 waits for the next one
    spared = set() if scoped else set(_stuck)  # an earlier step's unkillable children
    if kept is not None:
        spared.update(kept.pids())
    supervision = Supervision(spec, plan, ready, defer_teardown=True,
                              spared=frozenset(spared), scoped=scoped)
    reader = wire.FrameReader()

    def on_message(fd: int) -> None:
        try:
            data = job.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:  # the caller is gone: nobody will read the result, stop the step
            supervision.remove_reader(fd)
            supervision.cancel()
            return
        for message in reader.feed(data):
            if message[0] == "cancel":
                supervision.cancel(hard=bool(message[1]))

    supervision.add_reader(job.fileno(), on_message)  # cancel works during setup too
    try:
        return _follow(job, io_fds, supervision, kept, plan)
    except BaseException:
        if scoped:  # the process goes on, beside other jobs: this step must not (an
            supervision.kill_everything()  # unshared supervisor kills all below it)
            if supervision.ready is not None:  # (not taken yet)
                supervision.ready.discard()
        raise
    finally:
        supervision.release()
        supervision.remove_reader(job.fileno())  # (a cycle through on_message: freed now)
        _keep_stuck(supervision)


def _keep_stuck(supervision: Supervision) -> None:
    """Children that survived every kill stay ours (subreaper): a later step must neither
    wait for them again nor report them as its own. Only our children: their pids cannot
    be reused before we reap them."""
    _stuck.difference_update(supervision.spared_reaped())  # died at last, reaped here
    reaper = supervision.reaper
    if reaper.scope is not None:  # the step's own children no kill ended
        _stuck.update(reaper.scope)
    elif reaper.unkillable:  # (rare: no /proc read on the usual path)
        _stuck.update(set(reaper.unkillable) & set(proctree.own_children()))


def _follow(job: socket.socket, io_fds: list[int], supervision: Supervision,
            kept: ReadyInit | None, plan: Plan) -> tuple[Plan | None, ReadyInit | None]:
    """Start the step, say so, wait for its Result and send it."""
    try:
        pid = supervision.start()
    finally:
        close_each(io_fds)
    try:
        wire.send(job, ("started", pid, os.getpid()))
    except OSError:  # the caller is gone; on_message sees EOF and cancels the step
        pass
    result = supervision.run()  # (kills the tree itself if it fails)
    if kept is not None and set(kept.pids()) & supervision.spared_reaped():
        kept.reaped.update(supervision.spared_reaped())  # died during the step, reaped
        kept.discard()
        kept = None
    elif kept is not None and not kept.alone():
        # A root step entered its pid namespace (setns) and left a process there, which
        # the step's kill walks, sparing pid 1 and all below it, never reached: it goes
        # with pid 1, before the Result says the step's tree is gone.
        kept.discard()
        kept = None
    try:
        wire.send(job, ("result", result.to_dict()))
    except OSError:
        pass
    return ready_profile_of(plan), kept  # (_supervise releases what the step kept)


_stuck: set[int] = set()  # this supervisor's children that no kill could end


def has_stuck() -> bool:
    return bool(_stuck)


def reap_stuck() -> None:
    """Reap the stuck children that have died at last."""
    for pid in list(_stuck):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _stuck.discard(pid)


def ready_for(profile: Plan | None) -> ReadyInit | None:
    """A pid 1 made ahead for the profile of the sandboxed step just run (see
    spawn/ready.py, profile_of); None for other steps, or if it cannot be made now."""
    if profile is None:
        return None
    try:
        return ready.prepare(profile)
    except (OSError, StepFailure):
        return None  # the next such step launches the usual way and reports what fails


def _supervisor(control: socket.socket, events: int, server: int) -> None:
    """Serve jobs one at a time until idle for long or the server is gone. Runs forked.

    It is a child subreaper, so everything a step starts comes back to it to be reaped;
    between jobs it holds only the control socket and the event pipe.
    """
    from ..cgroups.step import retry_left_behind  # (preloaded)

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    set_child_subreaper()
    with open("/proc/self/comm", "w") as comm:
        comm.write(SUPERVISOR_NAME)
    home = os.getcwd()
    mask = os.umask(0o022)
    os.umask(mask)
    waiter = select.poll()
    waiter.register(control.fileno(), select.POLLIN)
    prepared: ReadyInit | None = None

    def leave() -> NoReturn:
        if prepared is not None:
            prepared.discard()  # kills it and removes its cgroup
        retry_left_behind(LEFT_BEHIND_WAIT)  # else they go as stale: we are their creator
        os._exit(0)  # the server sees the exit through its pidfd

    idle_since = time.monotonic()  # a wake-up for a job another supervisor took, or for
    while True:                    # a ready pid 1 grown too old, does not restart the clock
        set_parent_death_signal(signal.SIGKILL)  # idle supervisors go with the server
        if os.getppid() != server:
            leave()
        wait = idle_since + IDLE_EXIT_SECONDS - time.monotonic()
        reap_stuck()
        if _stuck or not retry_left_behind():
            wait = min(wait, LEFT_BEHIND_RECHECK)  # until it dies and its cgroup can go
        if prepared is not None and prepared.expires_in() <= 0:
            prepared.discard()  # its copy of the host's mounts is too old to hand a step
            prepared = None
        elif prepared is not None:
            wait = min(wait, prepared.expires_in())
        if wait <= 0:
            leave()
        ready_fd = prepared.report_fd if prepared is not None else -1
        if ready_fd >= 0:  # readable if the ready pid 1 dies or a step of its fails
            waiter.register(ready_fd, select.POLLIN)
        woken = waiter.poll(math.ceil(wait * 1000))
        if ready_fd >= 0:
            waiter.unregister(ready_fd)
        if not woken:
            continue  # too old a ready pid 1, or idle for long: both seen above
        if prepared is not None and any(fd == ready_fd for fd, _ in woken):
            prepared.discard()  # reaped, its cgroup removed; the next job launches the
            prepared = None  # usual way (and says what fails, if something does)
            if not any(fd == control.fileno() for fd, _ in woken):
                continue
        try:
            data, fds = wire.receive_fds(control, block=False)
        except BlockingIOError:
            continue  # another supervisor took it
        if not data and not fds:
            leave()  # every caller end is closed
        if not fds:
            continue
        set_parent_death_signal(0)  # a running job must outlive the server
        _tell(events, _TOOK_JOB)
        job = socket.socket(fileno=fds[0])
        try:
            plan, prepared = run_job(job, fds[1:], prepared)  # adopted, discarded or kept
        except BaseException:
            # Whatever went wrong here, the step must not outlive its supervisor.
            import traceback

            log("a supervisor failed; its step is killed:\n" + traceback.format_exc())
            Reaper().kill_and_reap_all()
            os._exit(1)
        finally:
            job.close()
        os.chdir(home)
        os.umask(mask)
        idle_since = time.monotonic()
        if os.getppid() != server:
            leave()  # with a ready pid 1 kept by a plain job: it and its cgroup go now
        # A step cgroup that would not go (a process slow to die) is not stale while we
        # live: it is tried again while we wait for jobs, not only before our next cgroup,
        # which may never come.
        if prepared is None:
            prepared = ready_for(plan)
        if prepared is None:
            ahead.refill()
        _tell(events, _IDLE_AGAIN)
        make_spare()


_ORPHAN_SWEEP_INTERVAL = 0.005
_ORPHAN_SWEEP_LIMIT = 2.0


def kill_orphans(supervisors: set[int]) -> None:
    """A supervisor died with its step running: the step's processes reparented to us (we
    are a child subreaper). SIGKILL every process below us that no live supervisor owns,
    until none is left (killed parents hand their children to us too)."""
    deadline = time.monotonic() + _ORPHAN_SWEEP_LIMIT
    while time.monotonic() < deadline:
        strays = [p for p in proctree.children() if p not in supervisors]
        if not strays:
            return
        for stray in strays:
            proctree.signal_all([stray, *proctree.descendants(stray)], signal.SIGKILL)
        time.sleep(_ORPHAN_SWEEP_INTERVAL)


def _supervisor_died(pid: int, supervisors: set[int]) -> None:
    """Clean up after a supervisor that is gone: its step's processes and its cgroups."""
    kill_orphans(supervisors)
    try:
        from ..cgroups.step import remove_stale_of

        remove_stale_of(pid)
    except (OSError, ImportError):
        pass


def _preload() -> None:
    """Import everything a supervisor runs before forking any, so that they all share one
    copy instead of importing their own, and freeze it: the garbage collector then never
    walks (and so never copies) those pages in a supervisor or a step's pid 1."""
    from .. import child
    from ..cgroups import step  # noqa: F401
    from ..linux import native_init
    from ..plan import sandbox  # noqa: F401  (registers the sandbox steps)
    from ..spawn import fork  # noqa: F401

    for name in child.CORE_STEPS:
        child.lookup(name)
    native_init.available()  # its code mapped once, for every supervisor
    gc.freeze()


def serve(control_fd: int, shared_fd: int) -> None:
    """Keep supervisors for the caller's jobs: MIN_IDLE_SUPERVISORS idle ones, each for
    one job at a time, on control; and, from the first job on shared, SHARED_SUPERVISORS
    that take many at once (server/shared.py)."""
    from .shared import SHARED_SUPERVISORS, serve_shared

    control = socket.socket(fileno=control_fd)
    shared_control = socket.socket(fileno=shared_fd)
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors and orphans: reaped by the kernel
    set_child_subreaper()  # a killed supervisor's step comes to us, to be killed
    # Steps must not inherit ignored signals from whoever started us (the reset_signals step
    # resets everything anyway). SIGPIPE/SIGXFSZ stay ignored: a supervisor writing to a
    # vanished caller must get EPIPE, not die and orphan the step.
    keep = (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ)
    for sig in signal.valid_signals():
        if sig not in keep:
            try:
                if signal.getsignal(sig) == signal.SIG_IGN:
                    signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                continue
    events_r, events_w = os.pipe()
    server = os.getpid()
    poller = select.poll()
    poller.register(control.fileno(), 0)  # only HUP/ERR: the caller's end closed
    poller.register(events_r, select.POLLIN)
    idle: set[int] = set()  # pids of supervisors waiting for a job
    shared: set[int] = set()  # pids of shared supervisors
    watched: dict[int, int] = {}  # pidfd -> supervisor pid (exits are noticed, whatever kills)

    def fork_supervisor(for_shared: bool = False) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(events_r)
                if for_shared:
                    control.close()
                    os.close(events_w)
                    try:
                        serve_shared(shared_control, server)
                    except BaseException:
                        import traceback

                        log("a shared supervisor failed; its steps are killed:\n"
                            + traceback.format_exc())
                        raise
                else:
                    shared_control.close()
                    _supervisor(control, events_w, server)
            finally:
                os._exit(0)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        watched[pidfd] = pid
        poller.register(pidfd, select.POLLIN)
        (shared if for_shared else idle).add(pid)

    def watch_shared_jobs() -> None:
        """A shared job waiting wakes us only while shared supervisors are missing."""
        missing = len(shared) < SHARED_SUPERVISORS
        poller.modify(shared_control.fileno(), select.POLLIN if missing else 0)

    poller.register(shared_control.fileno(), select.POLLIN)

    buffer = b""
    while True:
        while len(idle) < MIN_IDLE_SUPERVISORS:
            fork_supervisor()
        for fd, what in poller.poll():
            if fd == control.fileno():  # the caller is gone; running jobs finish alone
                os._exit(0)  # (idle supervisors follow; the anchor removes what they held)
            if fd == shared_control.fileno():
                if what & (select.POLLHUP | select.POLLERR):
                    os._exit(0)
                fork_supervisor(for_shared=True)  # a shared job waits; it takes it
                watch_shared_jobs()
                continue
            if fd in watched:  # a supervisor exited (idle timeout, or killed)
                poller.unregister(fd)
                os.close(fd)
                pid = watched.pop(fd)
                idle.discard(pid)
                if pid in shared:
                    shared.discard(pid)
                    watch_shared_jobs()
                # It may have had a job (its "took a job" event can still be unread).
                _supervisor_died(pid, set(watched.values()))
                continue
            buffer += os.read(events_r, 4096)
            while len(buffer) >= _EVENT.size:
                kind, pid = _EVENT.unpack_from(buffer)
                buffer = buffer[_EVENT.size:]
                if kind == _TOOK_JOB:
                    idle.discard(pid)
                elif kind == _IDLE_AGAIN and pid in watched.values():
                    idle.add(pid)


SUPERVISOR_NAME = "execbox-super"  # a supervisor's comm: what the anchor must not kill


def log_path() -> str:
    """Where the fork server and its supervisors write what goes wrong: $EXECBOX_LOG, else
    $XDG_STATE_HOME/execbox/fork-server.log (~/.local/state/execbox/fork-server.log)."""
    explicit = os.environ.get("EXECBOX_LOG")
    if explicit:
        return explicit
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "execbox", "fork-server.log")


def _open_log() -> int:
    path = log_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


def log(message: str) -> None:
    """One line in the log (fd 2 of the server and its supervisors)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    try:
        os.write(2, f"{stamp} pid {os.getpid()}: {message}\n".encode(errors="replace"))
    except OSError:
        pass


def _anchor(server: int) -> None:
    """The server's parent, a child subreaper holding nothing: a running step survives the
    server (and its supervisor) being killed only up to here, where it is killed. It
    leaves supervisors with jobs alone (killing only the server must not stop a step) and
    exits when nothing is left below it."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.waitpid(server, 0)
    session = os.getsid(0)
    while True:
        strays = []
        below = proctree.children()
        for pid in below:
            if not _is_supervisor(pid, session):
                strays += [pid, *proctree.descendants(pid)]
        if strays:
            log(f"the fork server is gone; killing orphaned step processes {strays}")
            proctree.signal_all(strays, signal.SIGKILL)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                _remove_stale_cgroups()
                os._exit(0)
        time.sleep(_ANCHOR_SWEEP_INTERVAL)


def _is_supervisor(pid: int, session: int) -> bool:
    """A supervisor has our session (a step always starts one of its own, and nothing can
    join ours) as well as its name, which any process can give itself."""
    try:
        same_session = os.getsid(pid) == session
    except OSError:
        return False
    return same_session and proctree.comm_of(pid) == SUPERVISOR_NAME


def _remove_stale_cgroups() -> None:
    """Last thing the anchor does: the cgroups of supervisors that died with the server
    (an idle one's ready pid 1 cgroup) have no owner left to remove them."""
    try:
        from ..cgroups.step import remove_stale_of

        remove_stale_of(None)
    except (OSError, ImportError):
        pass


_ANCHOR_SWEEP_INTERVAL = 0.05


def launch(control_fd: int, shared_fd: int) -> None:
    """Entry point of the helper interpreter: detach (report the server's pid, and whether
    it takes jobs on shared_fd, and exit), leaving the anchor and, below it, the server."""
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        sys.stdout.write(os.read(ready_r, 32).decode() + "\n")
        sys.stdout.flush()
        os._exit(0)
    os.close(ready_r)
    from ..linux import native_init

    # Jobs can share a supervisor only where their pid 1 is a native one (shared.py); the
    # code is mapped here once, for the server and every supervisor.
    shares = os.geteuid() == 0 and native_init.available()
    null, errors = os.open(os.devnull, os.O_RDWR), _open_log()
    for fd, source in ((0, null), (1, null), (2, errors)):
        os.dup2(source, fd)
    os.close(null)
    os.close(errors)
    set_child_subreaper()
    server = os.fork()
    if server == 0:
        os.close(ready_w)
        try:
            serve(control_fd, shared_fd)
        except BaseException as exc:
            log(f"the fork server failed: {exc!r}")
        finally:
            os._exit(1)
    os.write(ready_w, f"{server} {int(shares)}".encode())
    os.close(ready_w)
    os.close(control_fd)
    os.close(shared_fd)
    _anchor(server)
