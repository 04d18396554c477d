"""One step's cgroup: limits, joining, statistics, the final kill, and removal.

Directories are named execbox-<pid>-<n> below execbox's own cgroup, so a stale one (its
creator died) can be recognised and removed at the next start without touching anyone
else's cgroups.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time

from .host import CgroupHost, detect

_COUNTER = itertools.count()
PREFIX = "execbox-"


class CgroupError(OSError):
    """A cgroup could not be created or configured; the message names the file."""


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise CgroupError(exc.errno or errno.EIO, f"{path}: {exc.strerror}") from None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class StepCgroup:
    """Create with create(); the child joins with join_paths(); close with remove()."""

    def __init__(self, dirs: dict[str, tuple[str, str]]) -> None:
        self.dirs = dirs  # controller -> (version, directory)
        self.device_program: list[int] = []

    @classmethod
    def create(cls, memory: int | None, pids: int | None, cpus: float | None,
               host: CgroupHost | None = None, devices: list[str] | None = None,
               device_mode: str = "auto", verify: bool = True) -> StepCgroup:
        host = host or detect()
        wanted = ["memory", "pids", "cpu", "cpuacct", "freezer"]
        if devices is not None:
            if device_mode == "auto":
                device_mode = "v1" if "devices" in host.v1 else "v2"
            if device_mode == "v1":
                wanted.append("devices")
            elif host.unified is None:
                raise CgroupError(errno.ENOTSUP, "devices: no cgroup2 hierarchy for a BPF "
                                                 "device program")
        dirs: dict[str, tuple[str, str]] = {}
        name = f"{PREFIX}{os.getpid()}-{next(_COUNTER)}"
        for controller in wanted:
            found = host.directory_for(controller)
            if found is None:
                continue
            version, parent = found
            directory = f"{parent}/{name}"
            if directory not in {d for _, d in dirs.values()}:
                remove_stale(parent)
                try:
                    os.mkdir(directory)
                except FileExistsError:
                    pass
                except OSError as exc:
                    cls(dirs).remove()
                    raise CgroupError(exc.errno or errno.EIO,
                                      f"cannot create {directory}: {exc.strerror}") from None
            dirs[controller] = (version, directory)
        if devices is not None and device_mode == "v2" and host.unified is not None:
            directory = f"{host.unified}/{name}"
            if directory not in {d for _, d in dirs.values()}:
                remove_stale(host.unified)
                try:
                    os.mkdir(directory)
                except OSError as exc:
                    cls(dirs).remove()
                    raise CgroupError(exc.errno or errno.EIO,
                                      f"cannot create {directory}: {exc.strerror}") from None
            dirs["devices"] = ("v2", directory)
        group = cls(dirs)
        try:
            group._limit(memory, pids, cpus)
            if devices is not None:
                group._devices(devices, verify)
        except BaseException:
            group.remove()
            raise
        return group

    def _devices(self, texts: list[str], verify: bool) -> None:
        """Program the allowlist, then prove it from inside (seed 004: never trust it).
        With verify=False the caller proves it itself (the step's child, before exec)."""
        from . import devices as dev

        rules = [dev.parse_rule(t) for t in texts]
        version, d = self.dirs["devices"]
        try:
            if version == "v1":
                dev.program_v1(d, rules)
            else:
                from ..linux import bpf

                program = bpf.load_device_program(bpf.device_program(
                    [(r.kind, r.major, r.minor, r.access) for r in rules]))
                try:
                    bpf.attach(d, program)
                    self.device_program = bpf.attached_programs(d)
                finally:
                    os.close(program)
        except OSError as exc:
            raise CgroupError(exc.errno or errno.EIO, f"devices: {exc.strerror or exc}") from None
        problem = dev.verify(self.procs_files(), rules) if verify else None
        if problem is not None:
            raise CgroupError(errno.EPERM, f"device policy not in force: {problem}")

    def _need(self, controller: str, option: str) -> tuple[str, str]:
        if controller not in self.dirs:
            raise CgroupError(errno.ENOTSUP, f"{option}: the {controller} controller is not "
                                             "available to execbox here")
        return self.dirs[controller]

    def _limit(self, memory: int | None, pids: int | None, cpus: float | None) -> None:
        if memory is not None:
            version, d = self._need("memory", "memory")
            if version == "v2":
                _write(f"{d}/memory.max", str(memory))
                if os.path.exists(f"{d}/memory.swap.max"):
                    _write(f"{d}/memory.swap.max", "0")
            else:
                _write(f"{d}/memory.limit_in_bytes", str(memory))
                if os.path.exists(f"{d}/memory.memsw.limit_in_bytes"):
                    _write(f"{d}/memory.memsw.limit_in_bytes", str(memory))
        if pids is not None:
            _, d = self._need("pids", "pids")
            _write(f"{d}/pids.max", str(pids))
        if cpus is not None:
            version, d = self._need("cpu", "cpus")
            period = 100_000
            quota = max(1000, int(cpus * period))
            if version == "v2":
                _write(f"{d}/cpu.max", f"{quota} {period}")
            else:
                _write(f"{d}/cpu.cfs_period_us", str(period))
                _write(f"{d}/cpu.cfs_quota_us", str(quota))

    def procs_files(self) -> list[str]:
        """Every cgroup.procs the step must be written into (one per distinct directory)."""
        return sorted({f"{d}/cgroup.procs" for _, d in self.dirs.values()})

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.procs_files():
            try:
                found.update(int(p) for p in _read(path).split())
            except OSError:
                continue
        return found

    def kill_all(self) -> None:
        """The final guarantee: nothing in the cgroup survives (cgroup.kill on v2, else
        freeze, SIGKILL each, thaw, until empty)."""
        for version, d in self.dirs.values():
            if version == "v2" and os.path.exists(f"{d}/cgroup.kill"):
                _write(f"{d}/cgroup.kill", "1")
        freezer = self.dirs.get("freezer")
        for _ in range(1000):
            pids = self.pids()
            if not pids:
                return
            if freezer and freezer[0] == "v1":
                _write(f"{freezer[1]}/freezer.state", "FROZEN")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if freezer and freezer[0] == "v1":
                _write(f"{freezer[1]}/freezer.state", "THAWED")
            time.sleep(0.002)

    def stats(self) -> dict[str, object]:
        """oom_killed, peak memory (bytes) and CPU time (seconds) as the cgroup saw them."""
        out: dict[str, object] = {"oom_killed": False, "cgroup_peak_memory": None,
                                  "cgroup_cpu_time": None}
        memory = self.dirs.get("memory")
        if memory is not None:
            version, d = memory
            try:
                if version == "v2":
                    events = dict(line.split() for line in
                                  _read(f"{d}/memory.events").splitlines())
                    out["oom_killed"] = int(events.get("oom_kill", 0)) > 0
                    if os.path.exists(f"{d}/memory.peak"):
                        out["cgroup_peak_memory"] = int(_read(f"{d}/memory.peak"))
                else:
                    control = dict(line.split() for line in
                                   _read(f"{d}/memory.oom_control").splitlines())
                    out["oom_killed"] = int(control.get("oom_kill", 0)) > 0
                    out["cgroup_peak_memory"] = int(_read(f"{d}/memory.max_usage_in_bytes"))
            except (OSError, ValueError):
                pass
        cpu = self.dirs.get("cpuacct") or self.dirs.get("cpu")
        if cpu is not None:
            version, d = cpu
            try:
                if version == "v2":
                    stat = dict(line.split() for line in _read(f"{d}/cpu.stat").splitlines())
                    out["cgroup_cpu_time"] = int(stat["usage_usec"]) / 1e6
                elif os.path.exists(f"{d}/cpuacct.usage"):
                    out["cgroup_cpu_time"] = int(_read(f"{d}/cpuacct.usage")) / 1e9
            except (OSError, ValueError, KeyError):
                pass
        return out

    def remove(self) -> list[str]:
        """Kill what is left and remove every directory (always; retried briefly); what
        could not be removed, described."""
        self.kill_all()
        left: list[str] = []
        for directory in sorted({d for _, d in self.dirs.values()}, reverse=True):
            for _ in range(200):
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        left.append(f"cannot remove {directory}: {exc.strerror}")
                        break
                    time.sleep(0.005)
            else:
                left.append(f"cannot remove {directory}: still busy")
        self.dirs = {}
        return left


def remove_stale(parent: str) -> None:
    """Remove execbox-<pid>-<n> cgroups whose creating process is gone and that are empty."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        creator = name[len(PREFIX):].split("-", 1)[0]
        if not creator.isdigit() or os.path.exists(f"/proc/{creator}"):
            continue
        try:
            if not _read(f"{parent}/{name}/cgroup.procs").split():
                os.rmdir(f"{parent}/{name}")
        except OSError:
            continue
