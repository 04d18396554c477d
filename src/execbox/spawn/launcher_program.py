"""The rest of a sandboxed step's plan as the step launcher's program (linux/launcher.c):
the syscalls the Python steps after the job would make, in the same order, with the same
labels and paths in a failure report.

The message: a header (magic; the count and offset of the ops; the offset of the data;
the count and offset of the pointer and of the fd relocations; where in the data the error
pipe's fd is kept), the ops (112 bytes each: a syscall number or OP_*, six arguments, for
each argument the offset of a u64 to take it from when the op runs, i.e. an earlier op's
result, four offsets its result is stored at, an errno that branches instead of failing,
the branch target, the offsets of the label and path a failure reports), the data they
point into, then the two relocation tables. Offsets inside an op are into the data. A
relocation names a u64 in the ops (or, with the top bit set, in the data): a pointer
relocation's u64 holds an offset into the data, which the launcher turns into an address;
an fd relocation's holds an index into the fds received with the message, which becomes
that fd's number.

The ready process has entered its new root ahead (child/mounts.py, enter_root_ahead), so
the host's root is gone from its view: the job's binds are mount trees copied here, in the
supervisor's own view of the host (open_tree, idmapped where the filesystem allows), sent
with the job's fds and attached by the launcher. What the Python steps decide by looking
(which directories to create inside the new root) is done here through the ready process's
/proc/PID/root: that is its own tmpfs, nothing of the host.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import stat
import struct

from ..linux import syscalls as sc
from ..linux.arch import STEP_SYSCALLS, current
from ..linux.forksafe import Recent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..plan.build import Step

MAGIC = 0x78656331
OP_JUMP, OP_EXECVP, OP_FAIL, OP_DROP_BOUNDING = -1, -2, -3, -4
ANY_ERRNO = -1
_HEADER = struct.Struct("<10I")
_OP = struct.Struct("<q6Q6I4I2i2I")
_STORES, _BRANCH = 80, 96  # offsets of those fields in an op
_IN_DATA = 1 << 31  # a relocation's field is in the data (else in the ops)
_U64 = 2**64 - 1
_REPORT, _USERNS = 4, 5  # the launcher's fds, as child/handoff.py placed them (3: socket)
_FLOOR = 6
_F_DUPFD_CLOEXEC = 1030
_CLOSE_RANGE_CLOEXEC = 4
_O_PATH, _O_DIRECTORY, _O_CLOEXEC = 0o10000000, 0o200000, 0o2000000
MAX_MESSAGE = 1 << 20  # the launcher's buffer (BUFFER_SIZE)
MAX_FDS = 64  # the fds one message carries to it (MAX_FDS there)
_MOUNT_ATTR_SIZE = 32
_OPEN_HOW_SIZE = 24
# The steps after the job that have a form here; a plan with any other gets Python steps.
STEPS = frozenset({"unshare_namespaces", "dup2", "close_fds", "umask", "rlimits",
                   "prepare_idmaps", "bind_workdir", "bind", "set_hostname", "enter_root",
                   "join_userns", "new_session_keyring", "drop_privileges", "chdir",
                   "execve"})


def _numbers() -> dict[str, int]:
    """This architecture's syscall numbers for the launcher (Unexpressible if none)."""
    numbers = STEP_SYSCALLS.get(current())
    if numbers is None:
        raise Unexpressible(f"no step launcher for {current()}")
    return numbers


class Unexpressible(Exception):
    """This plan needs the Python steps (the ready process is discarded)."""


class _Ref:
    """An argument filled in by the launcher: the result of an earlier op, or a received
    fd, or an offset into the data."""

    def __init__(self, kind: str, value: int) -> None:
        self.kind, self.value = kind, value


def result_of(op: int) -> _Ref:
    return _Ref("result", op)


def received(index: int) -> _Ref:
    return _Ref("fd", index)


class Program:
    """Ops, packed as they are added, and the data they point into."""

    def __init__(self) -> None:
        self.body = bytearray()  # the ops
        self.data = bytearray(8)  # (data offset 0 means "none" in an op's fields)
        self.ptrs: array.array[int] = array.array("I")  # fields holding data offsets
        self.fds: array.array[int] = array.array("I")  # fields holding received fds' indexes
        self._strings: dict[str | bytes, int] = {}
        self._slots: dict[int, int] = {}  # op -> data offset of its result's slot
        self._stores: dict[int, int] = {}  # op -> how many stores it has
        self.report_slot = self.u64(_REPORT)

    # -- data --------------------------------------------------------------------------
    def _align(self) -> None:
        self.data += b"\0" * (-len(self.data) % 8)

    def string(self, value: str | bytes) -> _Ref:
        at = self._strings.get(value)
        if at is None:
            raw = os.fsencode(value) if isinstance(value, str) else value
            if b"\0" in raw:
                raise Unexpressible("a NUL byte")
            at = self._strings[value] = len(self.data)
            self.data += raw + b"\0"
        return _Ref("data", at)

    def strings(self, values: list[str]) -> _Ref:
        """A NULL-terminated array of pointers to values (argv, envp): laid out at once,
        as an environment can have hundreds."""
        raws = [os.fsencode(value) for value in values]
        if any(b"\0" in raw for raw in raws):
            raise Unexpressible("a NUL byte")
        offsets = list(itertools.accumulate((len(raw) + 1 for raw in raws),
                                            initial=len(self.data)))
        self.data += b"\0".join([*raws, b""])
        self._align()
        at = len(self.data)
        self.data += struct.pack(f"<{len(raws) + 1}Q", *offsets[:-1], 0)
        self.ptrs.extend(range(_IN_DATA | at, _IN_DATA | (at + 8 * len(raws)), 8))
        return _Ref("data", at)

    def u64(self, value: int | _Ref) -> int:
        """A u64 in the data (its offset); a _Ref is filled in by the launcher."""
        self._align()
        at = len(self.data)
        if isinstance(value, int):
            self.data += struct.pack("<Q", value & _U64)
            return at
        self.data += struct.pack("<Q", value.value if value.kind != "result" else 0)
        if value.kind == "data":
            self.ptrs.append(_IN_DATA | at)
        elif value.kind == "fd":
            self.fds.append(_IN_DATA | at)
        else:
            self.store(value.value, at)
        return at

    def struct(self, *fields: int | _Ref) -> _Ref:
        """Consecutive u64 fields (mount_attr, open_how, rlimit, capset's)."""
        first = self.u64(fields[0])
        for field in fields[1:]:
            self.u64(field)
        return _Ref("data", first)

    def store(self, op: int, at: int) -> None:
        """Have op's result written at data offset at."""
        count = self._stores.get(op, 0)
        if count == 4:
            raise Unexpressible("a result stored in more than four places")
        self._stores[op] = count + 1
        struct.pack_into("<I", self.body, op * _OP.size + _STORES + 4 * count, at)

    def _slot(self, op: int) -> int:
        if op not in self._slots:
            self._slots[op] = self.u64(0)
            self.store(op, self._slots[op])
        return self._slots[op]

    # -- ops ---------------------------------------------------------------------------
    def op(self, nr: int | str, *args: int | _Ref, label: str = "", path: str = "",
           branch: tuple[int, int] = (0, -1)) -> int:
        index = len(self.body) // _OP.size
        number = _numbers()[nr] if isinstance(nr, str) else nr
        values = [0, 0, 0, 0, 0, 0]
        loads = [0, 0, 0, 0, 0, 0]
        for k, arg in enumerate(args):
            if isinstance(arg, int):
                values[k] = arg & _U64
                continue
            if arg.kind == "data":
                values[k] = arg.value
                self.ptrs.append(index * _OP.size + 8 + 8 * k)
            elif arg.kind == "fd":
                values[k] = arg.value
                self.fds.append(index * _OP.size + 8 + 8 * k)
            else:
                loads[k] = self._slot(arg.value)
        strings = self._strings
        texts = (strings.get(label) or self.string(label).value if label else 0,
                 strings.get(path) or self.string(path).value if path else 0)
        self.body += _OP.pack(number, *values, *loads, 0, 0, 0, 0, *branch, *texts)
        return index

    def branch(self, op: int, on_errno: int, target: int) -> None:
        struct.pack_into("<2i", self.body, op * _OP.size + _BRANCH, on_errno, target)

    def here(self) -> int:
        """The index the next op gets (a branch target)."""
        return len(self.body) // _OP.size

    def encode(self) -> bytes:
        """header | ops | data | pointer relocations | fd relocations"""
        ops_at = _HEADER.size
        data_at = ops_at + len(self.body)
        ptrs_at = data_at + len(self.data)
        fds_at = ptrs_at + 4 * len(self.ptrs)
        header = _HEADER.pack(MAGIC, self.here(), ops_at, data_at, len(self.ptrs), ptrs_at,
                              len(self.fds), fds_at, self.report_slot, 0)
        return b"".join((header, self.body, self.data, self.ptrs.tobytes(),
                         self.fds.tobytes()))


class _Builder:
    """One plan's program: the fds it moves, the user namespaces its binds use.

    Two passes. gather() does what looks at the host and the ready process (the mount
    trees copied, the binds' targets made in its root) and lays out the fds to send;
    emit() turns the plan into ops, from the plan and that layout alone, so a job whose
    plan differs from an earlier one's only in the supervisor's fd numbers gets the same
    message (_programs)."""

    def __init__(self, rest: list[Step], init_pid: int, idmaps: dict[str, int],
                 inside: tuple[int, int], step_userns: int) -> None:
        self.rest = rest
        self.pid = init_pid
        self.p = Program()
        targets = [t for name, args in rest if name == "dup2" for _, t in args[0]]
        self.floor = max([_FLOOR - 1, *targets]) + 1
        self.targets = set(targets)
        self.sources: list[int] = []  # the supervisor's fds, sent in this order
        self.moved: dict[int, int] = {}  # index in sources -> op whose result is its copy
        self.idmaps = idmaps  # "idmap U:G" -> supervisor fd
        self.inside = inside
        self.userns = -1  # op whose result is the step user namespace's copy
        self.step_userns = step_userns  # the supervisor's fd of it (-1: none)
        self.trees: list[int] = []  # mount trees made here (closed once sent)
        self.idmapped: list[bool] = []  # for each tree, in the binds' order
        self._binds_done = 0  # binds emitted so far

    def _source(self, fd: int) -> int:
        """fd's index among the fds sent (added at its first use)."""
        if fd not in self.sources:
            self.sources.append(fd)
        return self.sources.index(fd)

    def gather(self) -> None:
        """The fds to send, in the order the prologue names them (the job's, then each
        bind's mount tree); the trees copied and the binds' targets made."""
        for name, _ in self.rest:
            if name not in STEPS:
                raise Unexpressible(name)
        destinations: list[str] = []
        binds: list[tuple[str, str]] = []
        for name, args in self.rest:
            if name == "prepare_idmaps":
                for uid, gid in args[0]:  # made by the supervisor (or the step's own): sent
                    if (uid, gid) != self.inside and f"idmap {uid}:{gid}" not in self.idmaps:
                        raise Unexpressible(f"idmap {uid}:{gid}")
            elif name == "dup2":
                for source, _ in args[0]:
                    self._source(source)
            elif name in ("bind_workdir", "bind"):
                dest = os.path.normpath(args[0] if name == "bind_workdir" else args[2])
                if not dest.strip("/"):  # (the root was entered ahead: a tree moved
                    raise Unexpressible("a bind over the root")  # onto it is not the root)
                # Below an earlier bind, dest would be made (or found) in that bind's source,
                # on the host: the Python steps make it as they go.
                if any(os.path.commonpath([dest, made]) == made for made in destinations):
                    raise Unexpressible(f"{dest} is below another bind")
                destinations.append(dest)
                tree, idmapped = self._copy_tree(name, args)
                self.idmapped.append(idmapped)
                self._source(tree)
                binds.append((args[0], args[0]) if name == "bind_workdir"
                             else (args[1], args[2]))
        if len(self.sources) > MAX_FDS:
            raise Unexpressible("more fds than one message carries")
        for source, dest in binds:
            _prepare_target(self.pid, dest, kind_of=source)

    def key(self) -> str:
        """What emit() depends on: the plan with each job fd as its index among the fds
        sent (a bind's mount tree follows in the plan's order), the ids inside, whether
        there is a step user namespace, and which binds are idmapped."""
        index = {fd: i for i, fd in enumerate(self.sources)}
        plan = [(name, ([[index[source], target] for source, target in args[0]],))
                if name == "dup2" else (name, args) for name, args in self.rest]
        return repr((plan, self.inside, self.step_userns >= 0, self.idmapped))

    def send(self, index: int) -> _Ref:
        """The launcher's copy (above every dup2 target) of the index'th fd sent; made in
        the prologue, before a dup2 can land on the received one."""
        if index not in self.moved:
            self.moved[index] = self.p.op("fcntl", received(index), _F_DUPFD_CLOEXEC,
                                          self.floor, label="dup2")
        return result_of(self.moved[index])

    def prologue(self) -> None:
        """Every fd the program uses out of the dup2 targets' way: the error pipe, the
        step's user namespace, the job's fds and the binds' mount trees."""
        p = self.p
        moved = p.op("fcntl", _REPORT, _F_DUPFD_CLOEXEC, self.floor, label="dup2")
        p.store(moved, p.report_slot)
        p.op("close", _REPORT)
        if self.step_userns >= 0:
            self.userns = p.op("fcntl", _USERNS, _F_DUPFD_CLOEXEC, self.floor, label="dup2")
            p.op("close", _USERNS)
        for index in range(len(self.sources)):  # (gather() laid them out in this order)
            self.send(index)

    def _copy_tree(self, name: str, args: tuple[Any, ...]) -> tuple[int, bool]:
        """The host's tree at a bind's source, as the Python step would mount it: nosuid,
        nodev unless a dev-bind, read-only for a ro-bind, recursively; a read-write bind
        owned by the step's ids idmapped where the filesystem allows (EINVAL: plain)."""
        from ..child import mounts

        if name == "bind_workdir":
            kind, source, owner = "bind", args[0], (args[1] if len(args) > 1 else None)
        else:
            kind, source, owner = args[0], args[1], (args[3] if len(args) > 3 else None)
        if kind not in mounts._BIND_ATTRS:
            raise Unexpressible(kind)
        userns = self._userns_for(owner) if kind == "bind" else -1
        try:
            tree = sc.open_tree_clone(source)
        except (OSError, ValueError) as exc:  # the Python step says so, naming the source
            raise Unexpressible(str(exc)) from None
        self.trees.append(tree)
        # Copied from the host's own mount namespace, the tree would stay in the host's
        # peer groups: private, as the Python step's copy (of a namespace made private) is,
        # so no mount crosses between the host and the sandbox either way.
        private = sc.MS_PRIVATE
        try:
            if userns >= 0:
                try:
                    sc.idmap_mount(tree, userns, mounts.READ_WRITE[0], private)
                    return tree, True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            sc.set_tree_attrs_at(tree, mounts._BIND_ATTRS[kind][0], propagation=private)
        except OSError as exc:
            raise Unexpressible(str(exc)) from None
        return tree, False

    def emit(self) -> bytes:
        self.prologue()
        for name, args in self.rest:
            getattr(self, name)(*args)
        message = self.p.encode()
        if len(message) > MAX_MESSAGE:
            raise Unexpressible("too big a message")
        return message

    # -- the steps, as child/ writes them ----------------------------------------------
    def unshare_namespaces(self, flags: int) -> None:
        self.p.op("unshare", flags, label="unshare")

    def dup2(self, mapping: list[list[int]]) -> None:
        copies = [(self.send(self._source(source)), target) for source, target in mapping]
        for copy, target in copies:
            self.p.op("dup3", copy, target, 0, label="dup2")

    def close_fds(self, keep: list[int]) -> None:
        """Every fd but stdio and the kept ones is marked close-on-exec (the launcher's own
        are already): at the step's execve they are closed, as the Python step closes
        them now."""
        wanted = sorted({0, 1, 2, *keep, *self.targets})
        low = 0
        for fd in [*wanted, 2**32 - 1]:
            if fd > low:
                self.p.op("close_range", low, fd - 1, _CLOSE_RANGE_CLOEXEC, label="close_fds")
            low = fd + 1

    def umask(self, mask: int) -> None:
        self.p.op("umask", mask, label="umask")

    def rlimits(self, limits: list[list[int]], highest_fd: int = 2) -> None:
        from ..model.spec import no_room, rlimit_text

        for which, soft, hard, *asked in limits:
            path = rlimit_text(which, asked[0] if asked else soft, hard)
            problem = no_room(which, soft, highest_fd)
            if problem is not None:
                self.p.op(OP_FAIL, errno.EINVAL, label="rlimits", path=problem)
                continue
            limit = self.p.struct(soft & (2**64 - 1), hard & (2**64 - 1))
            self.p.op("prlimit64", 0, which, limit, 0, label="rlimits", path=path)

    def prepare_idmaps(self, owners: list[list[int]]) -> None:
        """Nothing to run: the user namespaces were made by the supervisor (checked by
        gather(), as what a kept message was emitted with is not looked at again)."""

    def _userns_for(self, owner: list[int] | None) -> int:
        """The supervisor's fd of the user namespace an idmapped bind owned by owner uses;
        -1 for a plain bind."""
        if owner is None:
            return -1
        if tuple(owner) == self.inside:
            return self.step_userns
        return self.idmaps.get(f"idmap {owner[0]}:{owner[1]}", -1)

    def bind_workdir(self, dest: str, owner: list[int] | None = None) -> None:
        self._attach(dest, dest, f"bind {dest} -> {dest}")

    def bind(self, kind: str, source: str, dest: str, owner: list[int] | None = None) -> None:
        self._attach(source, dest, f"{kind} {source} -> {dest}")

    def _attach(self, source: str, dest: str, label: str) -> None:
        """Attach the tree copied for this bind (prologue) at dest, resolved inside the
        new root as the Python step resolves it."""
        tree_fd = self.trees[self._binds_done]
        tree, idmapped = self.send(self._source(tree_fd)), self.idmapped[self._binds_done]
        self._binds_done += 1
        if idmapped:
            label = f"idmapped bind {source} -> {dest} (move_mount)"
        p = self.p
        root = p.op("open", p.string("/"), _O_PATH | _O_DIRECTORY | _O_CLOEXEC,
                    label=label, path=dest)
        how = p.struct(_O_PATH | _O_CLOEXEC, 0, sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS)
        target = p.op("openat2", result_of(root), p.string(dest.lstrip("/") or "."), how,
                      _OPEN_HOW_SIZE, label=label, path=dest)
        p.op("move_mount", tree, p.string(""), result_of(target), p.string(""),
             sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH, label=label, path=dest)
        for made in (root, target):
            p.op("close", result_of(made))

    def set_hostname(self, name: str) -> None:
        raw = os.fsencode(name)
        self.p.op("sethostname", self.p.string(raw), len(raw), label="sethostname")

    def enter_root(self, read_only_root: bool) -> None:
        """The root was entered ahead; what is left is making it read-only (only the tmpfs
        itself: /tmp, the working directory stay writable)."""
        if read_only_root:
            p = self.p
            root = p.op("open", p.string("/"), _O_PATH | _O_DIRECTORY | _O_CLOEXEC,
                        label="read-only /")
            p.op("mount_setattr", result_of(root), p.string(""), sc.AT_EMPTY_PATH,
                 p.struct(sc.MOUNT_ATTR_RDONLY, 0, 0, 0), _MOUNT_ATTR_SIZE,
                 label="read-only /")
            p.op("close", result_of(root))

    def join_userns(self, uid: int = -1, gid: int = -1) -> None:
        if self.userns < 0:
            return
        if uid < 0:
            uid, gid = self.inside
        p = self.p
        label = "join user namespace"
        p.op("setns", result_of(self.userns), sc.CLONE_NEWUSER, label=label)
        p.op("setresgid", gid, gid, gid, label=label)
        p.op("setresuid", uid, uid, uid, label=label)

    def new_session_keyring(self) -> None:
        """keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL); ENOSYS (no keyrings) goes on."""
        p = self.p
        p.op("keyctl", sc.KEYCTL_JOIN_SESSION_KEYRING, 0, label="session keyring",
             branch=(errno.ENOSYS, p.here() + 1))

    def drop_privileges(self) -> None:
        p = self.p
        p.op(OP_DROP_BOUNDING, sc.last_capability())  # an unknown cap fails: skipped
        p.op("prctl", sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0,
             branch=(ANY_ERRNO, p.here() + 1))
        header = p.struct(sc.LINUX_CAPABILITY_VERSION_3, 0, 0)  # u32 version, u32 pid 0
        data = p.struct(0, 0, 0)  # two (effective, permitted, inheritable) words, all 0
        p.op("capset", header, data, label="drop capabilities")
        p.op("prctl", sc.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, label="no_new_privs")

    def chdir(self, path: str) -> None:
        self.p.op("chdir", self.p.string(path), label="chdir", path=path)

    def execve(self, argv: list[str], env: list[list[str]], search: list[str]) -> None:
        from ..child.program import candidates

        p = self.p
        program = argv[0]
        environment = dict(env)
        arguments = p.strings(argv)
        variables = p.strings([f"{k}={v}" for k, v in environment.items()])
        paths = p.strings(candidates(program, search))
        p.op(OP_EXECVP, arguments, variables, paths, p.string(program),
             1 if "/" in program else 0, label="execve")


def _prepare_target(pid: int, dest: str, kind_of: str) -> None:
    """Create dest inside the ready process's root as the Python step would (a directory,
    or an empty file for the bind of a file: the host's kind_of), resolved inside that
    root. Unexpressible if it cannot (the Python steps then say why)."""
    from ..child.mounts import resolve_in

    kind = "dir" if os.path.isdir(kind_of) else "file"
    try:
        target = resolve_in(f"/proc/{pid}/root", dest, kind, "/proc/self/fd")
    except (OSError, ValueError) as exc:
        raise Unexpressible(str(exc)) from None
    try:
        is_dir = stat.S_ISDIR(os.fstat(target).st_mode)
    finally:
        os.close(target)
    if is_dir != (kind == "dir"):  # move_mount would say EINVAL; the Python step's mount
        raise Unexpressible(f"{dest} is not a {kind}")  # says which (ENOTDIR, EISDIR)


# The last few messages emitted, by what they were emitted from (_Builder.key): a worker's
# steps mostly repeat one plan, and emitting it op by op in Python is the biggest part of
# a launch's time in the supervisor. A message holds nothing of the host or of a ready
# process (gather() does what looks at them, for every job); the key holds everything
# emit() reads. Keys (a plan with its environment) or messages over 64 KiB are not kept.
_programs = Recent(entries=8, biggest=1 << 16)


def expressible(rest: list[Step]) -> bool:
    """Whether every step of rest has a form here (decided before the job's paths are
    looked at; those may still send the job to the Python steps)."""
    return all(name in STEPS for name, _ in rest)


def build(rest: list[Step], init_pid: int, idmaps: dict[str, int], inside: tuple[int, int],
          step_userns: int, memo: dict[Any, Any] | None = None
          ) -> tuple[bytes, list[int], list[int]]:
    """(the message, the supervisor's fds to send with it in the order it names them, the
    mount trees among them: the caller closes those once sent). step_userns: the
    supervisor's fd of the step's user namespace, -1 if none. memo: a kept plan's
    (Plan.memo), whose copies differ only in the job's fds: what else emit() reads
    (_Builder.key) is then the few values in this call's own key. Raises Unexpressible."""
    builder = _Builder(rest, init_pid, idmaps, inside, step_userns)
    try:
        builder.gather()
        own = ("program", inside, step_userns >= 0, tuple(builder.idmapped),
               len(builder.sources))
        message = memo.get(own) if memo is not None else None
        if not isinstance(message, bytes):
            key = builder.key()
            message = _programs.get(key)
            if not isinstance(message, bytes):
                message = builder.emit()
                _programs.put(key, message, size=max(len(key), len(message)))
            if memo is not None:
                memo[own] = message
    except ValueError as exc:  # a path or argument no bytes can stand for (a lone surrogate)
        for tree in builder.trees:
            os.close(tree)
        raise Unexpressible(str(exc)) from None
    except BaseException:
        for tree in builder.trees:
            os.close(tree)
        raise
    return message, builder.sources, builder.trees
