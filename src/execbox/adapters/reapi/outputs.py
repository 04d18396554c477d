"""An action's outputs into the CAS and the ActionResult: files as OutputFile, directories as
a Tree (plus, when asked, every Directory), symlinks as symlinks.

Reading never follows a symlink: every path is walked from the input root one component at
a time with O_NOFOLLOW, so an action that replaced an output (or a parent of one) with a
symlink to /etc gets that symlink reported, never the file it points to. An output whose
parent is not a real directory is treated as absent, like a missing output. Files are
hashed through the fd that proved them regular files; the upload opens them again by path
(O_NOFOLLOW), which assumes, as the worker guarantees, that the action's processes are gone
(a file changed in between is refused by the CAS: its hash no longer matches)."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .cas import Blob, CasClient, UploadStats
from .digests import Digest, digest_key, digest_of_bytes, digest_of_fd
from .protos import re_pb2
from .stage import output_paths, resolve_output_path

__all__ = ["DIRECTORY_ONLY", "INLINE_LIMIT", "TREE_AND_DIRECTORY", "TREE_ONLY",
           "CollectedOutputs", "OutputError", "collect_outputs", "upload_std_stream"]

# Command.OutputDirectoryFormat (REAPI 2.3); older protos lack the field, which means TREE_ONLY
TREE_ONLY, DIRECTORY_ONLY, TREE_AND_DIRECTORY = 0, 1, 2
#: stdout/stderr up to this size are also returned inline
INLINE_LIMIT = 64 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# fields newer than some protos this package may meet; set only when present
_TOPOLOGICAL = "is_topologically_sorted"
_ROOT_DIRECTORY = "root_directory_digest"
_FORMAT = "output_directory_format"


class OutputError(Exception):
    """An output does not match its declaration (an output file that is a directory, an
    output directory that is a file) or cannot be described (a name that is not UTF-8):
    REAPI answers FAILED_PRECONDITION."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class CollectedOutputs:
    files: list[re_pb2.OutputFile] = field(default_factory=list)
    directories: list[re_pb2.OutputDirectory] = field(default_factory=list)
    symlinks: list[re_pb2.OutputSymlink] = field(default_factory=list)       # output_paths
    file_symlinks: list[re_pb2.OutputSymlink] = field(default_factory=list)  # output_files
    directory_symlinks: list[re_pb2.OutputSymlink] = field(default_factory=list)
    stats: UploadStats = field(default_factory=UploadStats)

    def fill(self, result: re_pb2.ActionResult) -> None:
        result.output_files.extend(self.files)
        result.output_directories.extend(self.directories)
        result.output_symlinks.extend(self.symlinks)
        result.output_file_symlinks.extend(self.file_symlinks)
        result.output_directory_symlinks.extend(self.directory_symlinks)


def _has_field(message: type[object], name: str) -> bool:
    descriptor = getattr(message, "DESCRIPTOR", None)
    return descriptor is not None and name in descriptor.fields_by_name


def shown(text: str) -> str:
    """A path as a person can read it: itself when it is UTF-8, else the repr of its bytes
    (never the surrogate escapes Python decodes such names into)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return repr(text.encode("utf-8", "surrogateescape"))
    return text


def _utf8(name: str, where: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(shown(where), f"{shown(name)} is not a UTF-8 name; REAPI cannot "
                                        "carry it") from None
    return name


class _Collector:
    def __init__(self, root: Path, directory_format: int) -> None:
        self.root = root
        self.directory_format = directory_format
        self.blobs: list[Blob] = []

    def file_node(self, dir_fd: int, name: str, path: str) -> re_pb2.FileNode | None:
        """A regular file's node (digest streamed), or None if it is not one any more."""
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                return None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            digest = digest_of_fd(fd)
        finally:
            os.close(fd)
        self.blobs.append((digest, self.root / path))
        return re_pb2.FileNode(name=name, digest=digest,
                               is_executable=bool(st.st_mode & stat.S_IXUSR))

    def tree(self, dir_fd: int, path: str) -> tuple[re_pb2.Directory, list[re_pb2.Directory]]:
        """The directory below dir_fd (which this takes) as a Tree's root and its children:
        deduplicated, parents before children. Iterative, so depth is no recursion limit."""
        # a frame: fd, root-relative path, name in its parent, files, symlinks, subdir
        # names still to visit, directory nodes done
        frames: list[_Frame] = [_Frame(dir_fd, path, "")]
        self.scan(frames[0])
        post_order: dict[str, re_pb2.Directory] = {}
        while True:
            top = frames[-1]
            if top.pending:
                name = top.pending.pop()
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=top.fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        continue
                    raise
                frame = _Frame(fd, f"{top.path}/{name}" if top.path else name, name)
                frames.append(frame)
                self.scan(frame)
                continue
            frames.pop()
            os.close(top.fd)
            directory = re_pb2.Directory(
                files=sorted(top.files, key=lambda n: n.name),
                directories=sorted(top.dirs, key=lambda n: n.name),
                symlinks=sorted(top.symlinks, key=lambda n: n.name))
            if not frames:
                children = list(reversed(post_order.values()))
                return directory, children
            data = directory.SerializeToString(deterministic=True)
            digest = digest_of_bytes(data)
            post_order.setdefault(digest_key(digest), directory)
            frames[-1].dirs.append(re_pb2.DirectoryNode(name=top.name, digest=digest))

    def scan(self, frame: _Frame) -> None:
        with os.scandir(frame.fd) as entries:
            for entry in entries:
                name = _utf8(entry.name, f"{frame.path}/{entry.name}")
                path = f"{frame.path}/{name}" if frame.path else name
                if entry.is_symlink():
                    frame.symlinks.append(re_pb2.SymlinkNode(
                        name=name, target=_utf8(os.readlink(name, dir_fd=frame.fd), path)))
                elif entry.is_dir(follow_symlinks=False):
                    frame.pending.append(name)
                elif entry.is_file(follow_symlinks=False):
                    node = self.file_node(frame.fd, name, path)
                    if node is not None:
                        frame.files.append(node)
                # sockets, fifos, devices: REAPI has no node for them

    def directory(self, dir_fd: int, path: str, declared: str) -> re_pb2.OutputDirectory:
        root, children = self.tree(dir_fd, path)
        output = re_pb2.OutputDirectory(path=declared)
        want_directories = self.directory_format in (DIRECTORY_ONLY, TREE_AND_DIRECTORY)
        can_say_root = _has_field(re_pb2.OutputDirectory, _ROOT_DIRECTORY)
        if want_directories:
            for directory in (root, *children):
                data = directory.SerializeToString(deterministic=True)
                self.blobs.append((digest_of_bytes(data), data))
            if can_say_root:
                root_digest = digest_of_bytes(root.SerializeToString(deterministic=True))
                getattr(output, _ROOT_DIRECTORY).CopyFrom(root_digest)
        if not (self.directory_format == DIRECTORY_ONLY and can_say_root):
            tree = re_pb2.Tree(root=root, children=children)
            data = tree.SerializeToString(deterministic=True)
            tree_digest = digest_of_bytes(data)
            self.blobs.append((tree_digest, data))
            output.tree_digest.CopyFrom(tree_digest)
            if _has_field(re_pb2.OutputDirectory, _TOPOLOGICAL):
                setattr(output, _TOPOLOGICAL, True)
        return output


@dataclass
class _Frame:
    fd: int
    path: str
    name: str
    files: list[re_pb2.FileNode] = field(default_factory=list)
    symlinks: list[re_pb2.SymlinkNode] = field(default_factory=list)
    dirs: list[re_pb2.DirectoryNode] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


def _open_parent(root_fd: int, parts: list[str]) -> int | None:
    """The directory holding an output, reached without following symlinks; None when a
    component is missing or is not a real directory."""
    fd = os.dup(root_fd)
    for part in parts:
        try:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return None
            raise
        os.close(fd)
        fd = child
    return fd


def _directory_format(command: re_pb2.Command) -> int:
    value = getattr(command, _FORMAT, TREE_ONLY) if _has_field(re_pb2.Command, _FORMAT) else 0
    return int(value)


def collect_outputs(command: re_pb2.Command, root: str | Path, working_directory: str,
                    cas_client: CasClient, into: re_pb2.ActionResult | None = None, *,
                    output_directory_format: int | None = None) -> CollectedOutputs:
    """Find every declared output under root (the input root), upload what the CAS lacks,
    and return the result entries (also added to `into` when given). Missing outputs are
    absent from the result. output_directory_format defaults to the command's (TREE_ONLY
    when its proto has none). An output that does not match its declaration raises
    OutputError after every other output was uploaded and added to `into`."""
    root = Path(root)
    fmt = _directory_format(command) if output_directory_format is None \
        else output_directory_format
    collector = _Collector(root, fmt)
    out = CollectedOutputs()
    error: OutputError | None = None
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        for where, declared, kind in output_paths(command):
            parts = resolve_output_path(working_directory, declared, where)
            parent = _open_parent(root_fd, parts[:-1])
            if parent is None:
                continue
            try:
                _collect_one(collector, out, parent, parts, where, declared, kind)
            except OutputError as exc:
                error = error or exc  # like bb_worker: the others are still reported
            finally:
                os.close(parent)
    finally:
        os.close(root_fd)
    out.stats = cas_client.upload(collector.blobs)
    if into is not None:
        out.fill(into)
    if error is not None:
        raise error
    return out


def _collect_one(collector: _Collector, out: CollectedOutputs, parent: int, parts: list[str],
                 where: str, declared: str, kind: str) -> None:
    path = "/".join(parts)
    if not parts:  # the working directory (or input root) itself
        if kind == "file":
            raise OutputError(where, "an output file needs a path")
        out.directories.append(collector.directory(os.dup(parent), path, declared))
        return
    name = parts[-1]
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        target = _utf8(os.readlink(name, dir_fd=parent), where)
        link = re_pb2.OutputSymlink(path=declared, target=target)
        {"any": out.symlinks, "file": out.file_symlinks,
         "directory": out.directory_symlinks}[kind].append(link)
    elif stat.S_ISREG(st.st_mode):
        if kind == "directory":
            raise OutputError(where, f"{declared!r} is a file, not a directory")
        node = collector.file_node(parent, name, path)
        if node is not None:
            out.files.append(re_pb2.OutputFile(path=declared, digest=node.digest,
                                               is_executable=node.is_executable))
    elif stat.S_ISDIR(st.st_mode):
        if kind == "file":
            raise OutputError(where, f"{declared!r} is a directory, not a file")
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return
            raise
        out.directories.append(collector.directory(fd, path, declared))


def upload_std_stream(cas_client: CasClient, path: str | Path, *,
                      inline_limit: int = INLINE_LIMIT) -> tuple[Digest, bytes]:
    """Upload a captured stdout/stderr file; its digest, and its bytes when they are at most
    inline_limit (else b"")."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size <= inline_limit:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            digest = digest_of_bytes(data)
            cas_client.upload([(digest, data)])
            return digest, data
        digest = digest_of_fd(fd)
    finally:
        os.close(fd)
    cas_client.upload([(digest, Path(path))])
    return digest, b""
