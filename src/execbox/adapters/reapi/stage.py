"""Input roots: read the Directory tree, check every name and symlink in it, fetch what the
local cache lacks, then build the tree under the action's directory with hardlinks from the
cache. Also the output paths' parent directories, which REAPI has the worker create.

Staged files are hardlinks of the cache's read-only files (0444, or 0555 if executable):
staging costs one link(2) per file, and an action cannot write into the cache through them:
opening one for writing fails with EACCES, and a tool that wants to change an input must
replace it, which only changes the action's own directory entry. (Root, or the cache's
owner, could chmod the shared inode first: only actions that run under another id get
links; the others get copies, with copy=True.)

Nothing here follows a symlink: directories are created and entered with O_NOFOLLOW
relative to their parent's fd, so a symlink in the tree never redirects staging. By default
symlinks whose target is absolute or climbs (lexically) above the input root are refused as
a policy; that check is hygiene, not what keeps the worker safe (never following is)."""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .cache import LocalCas
from .cas import CasClient
from .digests import Digest, InputError, digest_key, validate_digest
from .protos import re_pb2

__all__ = ["InputError", "StagePlan", "StageStats", "materialize", "output_paths",
           "plan_input_root", "prepare_outputs", "resolve_output_path", "stage_input_root"]

#: upper bound on the files + directories + symlinks of one input root: a Directory DAG that
#: reuses subdirectories can describe far more paths than it has messages
MAX_ENTRIES = 2_000_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class StageStats:
    files: int = 0
    directories: int = 0      # including the input root itself
    symlinks: int = 0
    bytes_fetched: int = 0
    cache_hits: int = 0       # distinct (blob, executable) pairs found in the cache
    cache_misses: int = 0     # ... fetched (or made from the other variant, or empty)
    seconds: float = 0.0      # the whole staging
    fetch_seconds: float = 0.0  # tree + blobs
    link_seconds: float = 0.0   # building the directory


@dataclass
class _PlannedDir:
    depth: int                                   # the input root is 0
    name: str                                    # "" for the input root
    files: list[tuple[str, str]] = field(default_factory=list)     # (name, cache path)
    symlinks: list[tuple[str, str]] = field(default_factory=list)  # (name, target)


@dataclass
class StagePlan:
    """The tree as an ordered list of directories (depth-first, parents first) with what
    each holds, and the cache files it needs."""
    dirs: list[_PlannedDir]
    wanted: dict[tuple[str, bool], Digest]       # (hash/size, executable) -> digest
    sources: dict[str, tuple[Digest, bool]]      # cache path -> what it holds
    files: int = 0
    symlinks: int = 0


def _check_name(name: str, where: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InputError(where, f"{name!r} is not a valid file name (empty, '.', '..', or "
                                "containing '/' or NUL)")


def _climb(target: str) -> int:
    """How many levels above the symlink's directory its target reaches, read lexically."""
    depth = lowest = 0
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            lowest = min(lowest, depth)
        elif part not in ("", "."):
            depth += 1
    return -lowest


def _check_directory(directory: re_pb2.Directory, where: str,
                     allow_escaping_symlinks: bool) -> int:
    """Names, digests and symlink targets of one Directory; the deepest climb of its
    symlinks (0 when escaping symlinks are allowed)."""
    seen: set[str] = set()
    names = (("files", [n.name for n in directory.files]),
             ("directories", [n.name for n in directory.directories]),
             ("symlinks", [n.name for n in directory.symlinks]))
    for kind, kind_names in names:
        for i, name in enumerate(kind_names):
            _check_name(name, f"{where}{kind}[{i}].name")
            if name in seen:
                raise InputError(f"{where}{kind}[{i}].name",
                                 f"{name!r} appears twice in the directory")
            seen.add(name)
    for i, file_node in enumerate(directory.files):
        validate_digest(file_node.digest, f"{where}files[{i}].digest")
    climb = 0
    for i, link in enumerate(directory.symlinks):
        target = link.target
        if not target or "\0" in target:
            raise InputError(f"{where}symlinks[{i}].target",
                             f"{target!r} is not a valid symlink target (empty or NUL)")
        if allow_escaping_symlinks:
            continue
        if target.startswith("/"):
            raise InputError(f"{where}symlinks[{i}].target",
                             f"{target!r} is absolute; this worker only stages symlinks that "
                             "stay inside the input root")
        climb = max(climb, _climb(target))
    return climb


def _check_size(tree: dict[str, re_pb2.Directory], root: str, max_entries: int) -> None:
    """Refuse a tree with more than max_entries entries before expanding it: entries are
    counted once per distinct Directory and multiplied by its uses, so a small DAG that
    names one subdirectory many times costs its size in messages, not in paths."""
    sizes: dict[str, int] = {}
    expanding: set[str] = set()  # the path from the root to the top of the stack
    stack = [root]
    while stack:
        key = stack[-1]
        directory = tree.get(key)
        if directory is None or key in sizes:
            stack.pop()  # a missing Directory is reported, with its path, while planning
            continue
        children = [digest_key(d.digest) for d in directory.directories]
        pending = [c for c in children
                   if c not in sizes and c in tree and c not in expanding]
        if pending and key not in expanding:
            expanding.add(key)
            stack.extend(pending)
            continue
        stack.pop()
        expanding.discard(key)
        size = 1 + len(directory.files) + len(directory.symlinks)
        size += sum(sizes.get(c, 1) for c in children)
        if size > max_entries:
            raise InputError("input_root_digest", f"the input root has more than "
                             f"{max_entries} entries")
        sizes[key] = size


def plan_input_root(tree: dict[str, re_pb2.Directory], root: Digest, cache: LocalCas, *,
                    allow_escaping_symlinks: bool = False,
                    max_entries: int = MAX_ENTRIES) -> StagePlan:
    """Check the whole tree (InputError naming the bad field) and lay it out for
    materialize()."""
    _check_size(tree, digest_key(root), max_entries)
    plan = StagePlan(dirs=[], wanted={}, sources={})
    checked: dict[str, int] = {}   # Directory key -> deepest symlink climb
    entries = 0
    # (key, depth, name, path) depth-first, parents before children
    stack: list[tuple[str, int, str, str]] = [(digest_key(root), 0, "", "")]
    while stack:
        k, depth, name, path = stack.pop()
        directory = tree.get(k)
        where = f"input_root{'/' if path else ''}{path} "
        if directory is None:
            raise InputError(where.rstrip(), f"Directory {k} is not in the tree")
        climb = checked.get(k)
        if climb is None:
            climb = checked[k] = _check_directory(directory, where, allow_escaping_symlinks)
        if climb > depth:
            raise InputError(f"{where}symlinks", f"a symlink target climbs {climb} levels "
                             f"above {path or 'the input root'}, out of the input root")
        entries += 1 + len(directory.files) + len(directory.symlinks)
        if entries > max_entries:
            raise InputError("input_root_digest", f"the input root has more than "
                             f"{max_entries} entries")
        planned = _PlannedDir(depth, name)
        for node in directory.files:
            source = cache.object_path(node.digest.hash, node.is_executable)
            planned.files.append((node.name, source))
            if source not in plan.sources:
                plan.sources[source] = (node.digest, node.is_executable)
                plan.wanted[(digest_key(node.digest), node.is_executable)] = node.digest
        planned.symlinks = [(s.name, s.target) for s in directory.symlinks]
        plan.files += len(planned.files)
        plan.symlinks += len(planned.symlinks)
        plan.dirs.append(planned)
        for sub in reversed(directory.directories):
            stack.append((digest_key(sub.digest), depth + 1, sub.name,
                          f"{path}/{sub.name}" if path else sub.name))
    return plan


def _copy_into(source: str, name: str, dir_fd: int) -> None:
    """Fallback when a hardlink is impossible (another filesystem, too many links)."""
    mode = os.stat(source).st_mode & 0o777
    with open(source, "rb") as src:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            os.fchmod(dst.fileno(), mode)


def _copy_link(source: str, name: str, *, dst_dir_fd: int, follow_symlinks: bool) -> None:
    _copy_into(source, name, dst_dir_fd)


def materialize(plan: StagePlan, dest: str | Path, cache: LocalCas, client: CasClient, *,
                copy: bool = False) -> None:
    """Build the planned tree in dest (created if missing; must not already hold the names):
    one mkdir per directory, one link (or, with copy, one copy) per file, one symlink per
    symlink."""
    os.makedirs(dest, exist_ok=True)
    stack = [os.open(dest, _DIR_FLAGS)]
    link = _copy_link if copy else os.link
    symlink, mkdir, open_ = os.symlink, os.mkdir, os.open
    try:
        for planned in plan.dirs:
            if planned.depth:
                while len(stack) > planned.depth:
                    os.close(stack.pop())
                parent = stack[-1]
                mkdir(planned.name, 0o755, dir_fd=parent)
                stack.append(open_(planned.name, _DIR_FLAGS, dir_fd=parent))
            fd = stack[-1]
            for name, source in planned.files:
                try:
                    link(source, name, dst_dir_fd=fd, follow_symlinks=False)
                except OSError as exc:
                    _link_failed(exc, source, name, fd, plan, cache, client)
            for name, target in planned.symlinks:
                symlink(target, name, dir_fd=fd)
    finally:
        for fd in stack:
            os.close(fd)


def _link_failed(exc: OSError, source: str, name: str, dir_fd: int, plan: StagePlan,
                 cache: LocalCas, client: CasClient) -> None:
    if exc.errno == errno.ENOENT and source in plan.sources:
        # another worker process evicted the blob since it was ensured: fetch it again
        for _ in range(3):
            cache.ensure([plan.sources[source]], client)
            try:
                os.link(source, name, dst_dir_fd=dir_fd, follow_symlinks=False)
                return
            except FileNotFoundError:
                continue
        raise exc
    if exc.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM):
        _copy_into(source, name, dir_fd)
        return
    raise exc


def stage_input_root(cache: LocalCas, client: CasClient, root_digest: Digest, dest: str | Path,
                     *, allow_escaping_symlinks: bool = False,
                     max_entries: int = MAX_ENTRIES, copy: bool = False) -> StageStats:
    """Make dest the input root `root_digest` describes (see the module docstring). Raises
    InputError for a malformed tree, CasError when the CAS fails or lacks a blob."""
    started = time.monotonic()
    validate_digest(root_digest, "input_root_digest")
    tree = client.get_tree(root_digest)
    plan = plan_input_root(tree, root_digest, cache,
                           allow_escaping_symlinks=allow_escaping_symlinks,
                           max_entries=max_entries)
    with cache.lease([(d, x) for (_, x), d in plan.wanted.items()], client) as ensured:
        fetched = time.monotonic()
        materialize(plan, dest, cache, client, copy=copy)
    done = time.monotonic()
    return StageStats(files=plan.files, directories=len(plan.dirs), symlinks=plan.symlinks,
                      bytes_fetched=ensured.bytes_fetched, cache_hits=ensured.hits,
                      cache_misses=ensured.misses + ensured.copies, seconds=done - started,
                      fetch_seconds=fetched - started, link_seconds=done - fetched)


# -- outputs -------------------------------------------------------------------------------

def _normal_output(path: str) -> str:
    """An output path without empty or "." components ("d/" -> "d"): the form it is
    reported back in."""
    if path.startswith("/"):
        return path  # refused by resolve_output_path, naming the path as given
    return "/".join(part for part in path.split("/") if part not in ("", "."))


def output_paths(command: re_pb2.Command) -> list[tuple[str, str, str]]:
    """(field, path, kind) of every declared output, paths normalised; kind is "any" for
    output_paths (REAPI 2.1, which supersedes the others when set), else "file" or
    "directory"."""
    if command.output_paths:
        return [(f"output_paths[{i}]", _normal_output(p), "any")
                for i, p in enumerate(command.output_paths)]
    return ([(f"output_files[{i}]", _normal_output(p), "file")
             for i, p in enumerate(command.output_files)]
            + [(f"output_directories[{i}]", _normal_output(p), "directory")
               for i, p in enumerate(command.output_directories)])


def resolve_output_path(working_directory: str, path: str, field: str) -> list[str]:
    """The components, relative to the input root, of an output path (relative to the
    working directory); InputError when it is absolute, holds NUL or leaves the root."""
    if path.startswith("/") or "\0" in path:
        raise InputError(field, f"{path!r} must be a relative path without NUL")
    parts: list[str] = []
    for part in [*working_directory.split("/"), *path.split("/")]:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InputError(field, f"{path!r} leaves the input root")
            parts.pop()
        else:
            parts.append(part)
    return parts


def _check_working_directory(working_directory: str) -> list[str]:
    if working_directory.startswith("/") or "\0" in working_directory:
        raise InputError("working_directory", f"{working_directory!r} must be a relative path")
    return resolve_output_path(working_directory, "", "working_directory")


def _make_dirs(root_fd: int, parts: Iterable[str], field: str) -> None:
    """mkdir -p below root_fd without following symlinks: a component that exists as a
    symlink or a file is an InputError."""
    fd = os.dup(root_fd)
    done: list[str] = []
    try:
        for part in parts:
            done.append(part)
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InputError(field, f"{'/'.join(done)!r} is a symlink or a file in "
                                     "the input root, not a directory") from None
                raise
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def check_outputs(command: re_pb2.Command,
                  working_directory: str) -> list[tuple[str, list[str], str]]:
    """(field, components relative to the input root, kind) of every output; InputError
    for a path that is bad, or declared twice (in one field or in both output_files and
    output_directories: the result could not say which it is)."""
    _check_working_directory(working_directory)
    resolved = [(f, resolve_output_path(working_directory, p, f), kind)
                for f, p, kind in output_paths(command)]
    first: dict[tuple[str, ...], str] = {}
    for f, parts, kind in resolved:
        if not parts and kind == "file":
            raise InputError(f, "an output file needs a path")
        earlier = first.setdefault(tuple(parts), f)
        if earlier != f:
            raise InputError(f, f"{'/'.join(parts) or '.'!r} is also declared as {earlier}")
    return resolved


def prepare_outputs(command: re_pb2.Command, root: str | Path,
                    working_directory: str) -> list[str]:
    """Check every output path and create its parent directories; the outputs' paths
    relative to the input root. Like bb_worker, the working directory is not created for
    its own sake (REAPI: it must exist in the input tree); only as an output's parent."""
    wd = _check_working_directory(working_directory)
    resolved = check_outputs(command, working_directory)
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        for f, parts, _ in resolved:
            _make_dirs(root_fd, parts[:-1], f)
        _check_is_directory(root_fd, wd)
    finally:
        os.close(root_fd)
    return ["/".join(parts) for _, parts, _ in resolved]


def _check_is_directory(root_fd: int, parts: list[str]) -> None:
    """The working directory exists below root_fd as a real directory (never through a
    symlink); InputError naming working_directory otherwise."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    raise
                raise InputError("working_directory", f"{'/'.join(parts[:i + 1])!r} is not a "
                                 "directory in the input root (REAPI: the working directory "
                                 "must exist in the input tree)") from None
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
