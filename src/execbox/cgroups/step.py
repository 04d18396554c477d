"""One step's cgroup: limits, joining, statistics, the final kill, and removal.

Directories are named execbox-<pid>-<start time>-<n> below execbox's own cgroup (see
stale.py), so a stale one (its creator died) can be recognised, emptied and removed at the
next start without touching anyone else's cgroups. On cgroup v2 the controllers are first
enabled for our cgroup's children (see delegation.py).
"""

from __future__ import annotations

import errno
import functools
import os
import time

from . import delegation, stale
from .files import CgroupError, read, write
from .host import CgroupHost, detect
from .stale import PREFIX

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..model.devices import Rule

__all__ = ["PREFIX", "CgroupError", "StepCgroup", "remove_stale", "remove_stale_of"]

# controller -> the option that needs it, for the cgroup v2 controllers execbox enables
V2_CONTROLLERS = {"memory": "memory", "pids": "pids", "cpu": "cpus"}
CPU_PERIOD_US = 100_000
CPU_MIN_QUOTA_US = 1000


class StepCgroup:
    """Create with create(); the child joins with join_paths(); close with remove()."""

    def __init__(self, dirs: dict[str, tuple[str, str]]) -> None:
        self.dirs = dirs  # controller -> (version, directory)
        self.device_program: list[int] = []
        self.stale_leftovers: list[str] = []  # what stale cleanup could not remove

    @classmethod
    def create(cls, memory: int | None, pids: int | None, cpus: float | None,
               host: CgroupHost | None = None, devices: list[str] | None = None,
               device_mode: str = "auto", verify: bool = True,
               name: str | None = None) -> StepCgroup:
        retry_left_behind()
        host = host or detect()
        # memory and cpuacct for the Result's statistics, freezer for the final kill; pids
        # and cpu only for their limits: on v1 each is one more directory to make, join
        # (an RCU grace period), rename and remove on every launch.
        wanted = ["memory", *(["pids"] if pids is not None else []),
                  *(["cpu"] if cpus is not None else []), "cpuacct", "freezer"]
        if devices is not None:
            if device_mode == "auto":
                device_mode = "v1" if "devices" in host.v1 else "v2"
            if device_mode == "v1":
                wanted.append("devices")
            elif host.unified is None:
                raise CgroupError(errno.ENOTSUP, "devices: no cgroup2 hierarchy for a BPF "
                                                 "device program")
        if host.mode == "v2" and host.unified is not None:
            _enable_v2(host, memory, pids, cpus)
        group = cls({})
        name = name or stale.new_name()
        known: dict[tuple[int, int | None], bool] = {}  # creators' liveness, for all parents
        try:
            for controller in wanted:
                found = host.directory_for(controller)
                if found is not None:
                    group._make(controller, found[0], found[1], name, known)
            if devices is not None and device_mode == "v2" and host.unified is not None:
                group._make("devices", "v2", host.unified, name, known)
            group._limit(memory, pids, cpus)
            if devices is not None:
                group._devices(devices, verify)
        except BaseException:
            group.remove()
            raise
        return group

    def _make(self, controller: str, version: str, parent: str, name: str,
              known: dict[tuple[int, int | None], bool]) -> None:
        """Create parent/name (once per directory, after removing stale siblings)."""
        directory = f"{parent}/{name}"
        if directory not in {d for _, d in self.dirs.values()}:
            self.stale_leftovers += stale.remove_stale(parent, known=known)
            try:
                os.mkdir(directory)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _create_error(parent, directory, exc) from None
        self.dirs[controller] = (version, directory)

    def _devices(self, texts: list[str], verify: bool) -> None:
        """Program the allowlist, then prove it from inside: runc's device rules after a
        systemd daemon-reload showed a programmed policy need not be the one in force.
        With verify=False the caller proves it itself (the step's child, before exec)."""
        from . import devices as dev

        rules = list(_parsed(tuple(texts)))
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
            self._limit_memory(memory)
        if pids is not None:
            _, d = self._need("pids", "pids")
            write(f"{d}/pids.max", str(pids))
        if cpus is not None:
            self._limit_cpu(cpus)

    def _limit_memory(self, memory: int) -> None:
        """No swap either, so the limit is a limit and not a slowdown."""
        version, d = self._need("memory", "memory")
        if version == "v2":
            write(f"{d}/memory.max", str(memory))
            if os.path.exists(f"{d}/memory.swap.max"):
                write(f"{d}/memory.swap.max", "0")
        else:
            write(f"{d}/memory.limit_in_bytes", str(memory))
            if os.path.exists(f"{d}/memory.memsw.limit_in_bytes"):
                write(f"{d}/memory.memsw.limit_in_bytes", str(memory))

    def _limit_cpu(self, cpus: float) -> None:
        version, d = self._need("cpu", "cpus")
        quota = max(CPU_MIN_QUOTA_US, int(cpus * CPU_PERIOD_US))
        if version == "v2":
            write(f"{d}/cpu.max", f"{quota} {CPU_PERIOD_US}")
        else:
            write(f"{d}/cpu.cfs_period_us", str(CPU_PERIOD_US))
            write(f"{d}/cpu.cfs_quota_us", str(quota))

    def rename(self, name: str) -> None:
        """Give every directory a new name in the same parent (cgroup v1 only: cgroup2 has
        no rename, and there the old name stays, which stale cleanup knows too)."""
        renamed: dict[str, str] = {}
        for directory in self.directories():
            if self.dirs_version(directory) != "v1":
                continue
            target = f"{os.path.dirname(directory)}/{name}"
            try:
                os.rename(directory, target)
            except OSError:
                continue
            renamed[directory] = target
        self.dirs = {c: (v, renamed.get(d, d)) for c, (v, d) in self.dirs.items()}

    def dirs_version(self, directory: str) -> str:
        return next(v for v, d in self.dirs.values() if d == directory)

    def procs_files(self) -> list[str]:
        """Every cgroup.procs the step must be written into (one per distinct directory)."""
        return sorted({f"{d}/cgroup.procs" for _, d in self.dirs.values()})

    def directories(self) -> list[str]:
        return sorted({d for _, d in self.dirs.values()})

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.directories():
            found |= stale.procs(d)
        return found

    def kill_all(self, timeout: float = stale.KILL_TIMEOUT) -> set[int]:
        """The final guarantee: nothing in the cgroup survives (cgroup.kill on v2, else
        freeze, SIGKILL each, thaw, until empty). Returns the pids that did survive timeout
        seconds."""
        freezer = self.dirs.get("freezer")
        # On v1 every hierarchy holds the same processes: kill through the freezer one.
        tops = [freezer[1]] if freezer and freezer[0] == "v1" else self.directories()
        return stale.empty(tops, timeout)

    def stats(self) -> dict[str, object]:
        """oom_killed, peak memory (bytes) and CPU time (seconds) as the cgroup saw them."""
        out: dict[str, object] = {"oom_killed": False, "cgroup_peak_memory": None,
                                  "cgroup_cpu_time": None}
        memory = self.dirs.get("memory")
        if memory is not None:
            try:
                out.update(_memory_stats(*memory))
            except (OSError, ValueError):
                pass
        cpu = self.dirs.get("cpuacct") or self.dirs.get("cpu") or self._any_v2()
        if cpu is not None:
            try:
                out["cgroup_cpu_time"] = _cpu_time(*cpu)
            except (OSError, ValueError, KeyError):
                pass
        return out

    def _any_v2(self) -> tuple[str, str] | None:
        """cpu.stat's usage_usec is in every cgroup2 directory, cpu controller or not."""
        for version, d in self.dirs.values():
            if version == "v2" and os.path.exists(f"{d}/cpu.stat"):
                return version, d
        return None

    def remove_empty(self) -> bool:
        """Remove each directory the kernel lets go (no process, no child cgroup in it);
        True once all are gone. The others stay, for kill_all and remove."""
        gone: set[str] = set()
        for directory in reversed(self.directories()):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            gone.add(directory)
        self.dirs = {c: (v, d) for c, (v, d) in self.dirs.items() if d not in gone}
        return not self.dirs

    def remove(self, survivors: set[int] | None = None,
               timeout: float = stale.RMDIR_TIMEOUT) -> list[str]:
        """Kill what is left and remove every directory. Returns what was left behind
        (surviving pids, directories that would not go), as sentences; empty when all is
        well. Never raises for a failed removal, so callers can report it. survivors: what
        the caller's own kill_all just returned (nothing can join a cgroup but through
        execbox, and a kill that ran out of time once is not waited for again); None to
        kill here. timeout: how long, for all directories together, to wait for a busy one."""
        left: list[str] = []
        try:
            if survivors is None:
                survivors = self.kill_all()
        except OSError as exc:
            survivors, left = self.pids(), [f"kill failed: {exc}"]
        if survivors:
            left.append(f"processes survived SIGKILL in {', '.join(self.directories())}: "
                        f"{', '.join(map(str, sorted(survivors)))}")
        deadline = time.monotonic() + timeout
        for directory in reversed(self.directories()):
            problem = stale.rmdir_tree(directory, max(0.0, deadline - time.monotonic()))
            if problem:
                left.append(problem)
                _LEFT_BEHIND.append(directory)  # tried again: see retry_left_behind
        self.dirs = {}
        return left


@functools.lru_cache(maxsize=16)
def _parsed(texts: tuple[str, ...]) -> tuple[Rule, ...]:
    """A device policy's rules, parsed once: a supervisor programs the same policy into
    the cgroup of every sandbox it makes (nothing changes a Rule once made)."""
    from ..model.devices import parse_rule

    return tuple(parse_rule(text) for text in texts)


def _memory_stats(version: str, d: str) -> dict[str, object]:
    if version == "v2":
        events = dict(line.split() for line in read(f"{d}/memory.events").splitlines())
        out: dict[str, object] = {"oom_killed": int(events.get("oom_kill", 0)) > 0}
        if os.path.exists(f"{d}/memory.peak"):
            out["cgroup_peak_memory"] = int(read(f"{d}/memory.peak"))
        return out
    control = dict(line.split() for line in read(f"{d}/memory.oom_control").splitlines())
    return {"oom_killed": int(control.get("oom_kill", 0)) > 0,
            "cgroup_peak_memory": int(read(f"{d}/memory.max_usage_in_bytes"))}


def _cpu_time(version: str, d: str) -> float | None:
    if version == "v2":
        stat = dict(line.split() for line in read(f"{d}/cpu.stat").splitlines())
        return int(stat["usage_usec"]) / 1e6
    if os.path.exists(f"{d}/cpuacct.usage"):
        return int(read(f"{d}/cpuacct.usage")) / 1e9
    return None


def _create_error(parent: str, directory: str, exc: OSError) -> CgroupError:
    from .files import ACCESS_ERRNOS, errno_name, not_delegated

    code = exc.errno or errno.EIO
    if code in ACCESS_ERRNOS:
        return CgroupError(code, not_delegated(
            parent, f"cannot create {os.path.basename(directory)}: {errno_name(code)}"))
    return CgroupError(code, f"cannot create {directory}: {exc.strerror}")


def _enable_v2(host: CgroupHost, memory: int | None, pids: int | None,
               cpus: float | None) -> None:
    """Enable the controllers the limits need for our children (moving into the leaf if
    we must), and the others only where that costs no move (they add statistics)."""
    from .files import not_delegated

    base = host.unified
    assert base is not None
    asked = {"memory": memory, "pids": pids, "cpu": cpus}
    needed = {c for c, value in asked.items() if value is not None}
    absent = sorted(c for c in needed if c not in host.unified_controllers)
    if absent:
        options = ", ".join(V2_CONTROLLERS[c] for c in absent)
        raise CgroupError(errno.ENOTSUP, f"{options}: " + not_delegated(
            base, f"{', '.join(absent)} not in its cgroup.controllers"))
    if needed:
        delegation.enable(base, needed)
    delegation.enable_if_free(base, set(V2_CONTROLLERS) & host.unified_controllers)


def remove_stale(parent: str) -> list[str]:
    """Kill and remove the step cgroups below parent whose creator is gone."""
    return stale.remove_stale(parent)


def remove_stale_of(creator_pid: int | None, host: CgroupHost | None = None) -> list[str]:
    """Kill and remove the step cgroups of creator_pid (None: of any creator), once it is
    gone (for a fork server that has reaped a supervisor): call it after reaping, since a
    zombie still counts as alive. Returns what could not be cleaned up."""
    host = host or detect()
    parents = set(host.v1.values()) | ({host.unified} if host.unified else set())
    left = []
    for parent in sorted(parents):
        left += stale.remove_stale(parent, creator=creator_pid)
    return left


# Step cgroups this process could not remove (still busy). They are not stale while this
# process lives, so it retries them itself: before its next step's cgroup, and (a long-lived
# supervisor) between jobs and before it exits.
_LEFT_BEHIND: list[str] = []


def retry_left_behind(timeout: float = 0.0) -> bool:
    """Try again to remove what an earlier removal left; True when nothing is left."""
    for directory in list(_LEFT_BEHIND):
        if stale.rmdir_tree(directory, timeout=timeout) is None:
            try:
                _LEFT_BEHIND.remove(directory)
            except ValueError:  # another thread of a shared supervisor's removed it
                pass
    return not _LEFT_BEHIND
