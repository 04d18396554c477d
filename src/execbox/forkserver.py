"""The fork server: a single-threaded helper, started once from a fresh interpreter.

It keeps a few pre-forked *standby supervisors* blocked on the shared control socket. A
caller sends one message carrying a job socket and the step's stdio fds; one standby takes
it, becomes that job's supervisor (a child subreaper that spawns, waits, cancels and reaps)
and the server forks a replacement. The server itself never holds a caller's fd, so a file
the caller is writing can never leak into a step (ETXTBSY), and a caller's result travels on
its own job socket, so the server dying loses nothing.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys

from . import tree, wire
from .linux.syscalls import set_child_subreaper, set_parent_death_signal
from .plan import build_plan
from .spec import CommandSpec
from .supervise import Supervision

STANDBY_SUPERVISORS = 2


def run_job(job: socket.socket, io_fds: list[int]) -> None:
    """Supervise one step for the caller at the other end of job."""
    request = wire.receive_one(job)
    wire.send(job, ("accepted", os.getpid()))
    spec = CommandSpec.from_wire(request["spec"])
    fd_map = [[io_fds[index], target] for index, target in request["fds"]]
    supervision = Supervision(spec, build_plan(spec, fd_map))
    pid = supervision.start()
    for fd in io_fds:
        os.close(fd)
    if pid is not None:
        wire.send(job, ("started", pid))
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

    supervision.add_reader(job.fileno(), on_message)
    result = supervision.run()
    try:
        wire.send(job, ("result", result))
    except OSError:
        pass


def _standby(control: socket.socket, taken_w: int) -> None:
    """Wait for one job, hand off, supervise it, exit. Runs in a forked child."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    set_parent_death_signal(signal.SIGKILL)  # idle standbys go when the server goes
    set_child_subreaper()
    server = os.getppid()
    if server == 1:
        os._exit(0)
    while True:
        data, fds = wire.receive_fds(control)
        if not data and not fds:
            os._exit(0)  # every caller end is closed
        if len(fds) >= 1:
            break
        for fd in fds:
            os.close(fd)
    set_parent_death_signal(0)  # a running job must outlive the server
    try:
        os.write(taken_w, b"x")
    except OSError:
        pass
    os.close(taken_w)
    control.close()
    job = socket.socket(fileno=fds[0])
    try:
        run_job(job, fds[1:])
    except BaseException:
        # Whatever went wrong here, the step must not outlive its supervisor.
        tree.kill_and_reap_all()
        raise
    finally:
        os._exit(0)


def serve(control_fd: int) -> None:
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    taken_r, taken_w = os.pipe()

    def fork_standby() -> None:
        if os.fork() == 0:
            try:
                os.close(taken_r)
                _standby(control, taken_w)
            finally:
                os._exit(0)

    for _ in range(STANDBY_SUPERVISORS):
        fork_standby()
    poller = select.poll()
    poller.register(control.fileno(), 0)  # only HUP/ERR: the caller's end closed
    poller.register(taken_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == control.fileno():
                os._exit(0)
            for _ in os.read(taken_r, 64):
                fork_standby()


def launch(control_fd: int) -> None:
    """Entry point of the helper interpreter: detach, report the server pid, serve."""
    pid = os.fork()
    if pid:
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        serve(control_fd)
    finally:
        os._exit(1)
