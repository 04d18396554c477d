"""A CAS client for the worker: what it reads (input trees, file blobs) and what it writes
(outputs), batched to stay under gRPC message limits and streamed through ByteStream when a
blob is too large for a batch, so no blob is ever held whole in memory unless asked for.

Every RPC has a deadline (large streams get one that grows with the size). Every failure is
a CasError: the worker reports it as UNAVAILABLE so the server retries the action, except an
InputError (a malformed Directory), which retrying cannot fix."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError

from .digests import Digest, InputError, digest_key, digest_of_bytes, is_empty, validate_digest
from .protos import bs_grpc, bs_pb2, code_pb2, grpc, re_grpc, re_pb2

T = TypeVar("T")

MIB = 1 << 20
#: total blob bytes per BatchReadBlobs / BatchUpdateBlobs: gRPC's default message limit is
#: 4 MiB and the framing of each blob must fit too
DEFAULT_BATCH_BYTES = 3 * MIB + MIB // 2
#: framing counted per blob in a batch (digest, status, tags)
BLOB_OVERHEAD = 128
#: digests per FindMissingBlobs request (about 80 bytes each on the wire)
FIND_MISSING_BATCH = 10_000

#: an upload item: the blob's digest and either its bytes or the file holding them
Blob = tuple[Digest, bytes | Path]


class CasError(Exception):
    """A CAS call failed or returned something unusable. `code` is the google.rpc.Code seen
    (NOT_FOUND for a missing blob, DATA_LOSS for a corrupt one); `missing` holds the
    "hash/size" keys of blobs the CAS does not have."""

    def __init__(self, message: str, code: int = code_pb2.UNKNOWN, *,
                 missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.missing = tuple(missing)


_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


#: failures that reading directories one by one would only repeat
_TRANSIENT = frozenset({code_pb2.UNAVAILABLE, code_pb2.DEADLINE_EXCEEDED, code_pb2.CANCELLED,
                        code_pb2.RESOURCE_EXHAUSTED, code_pb2.UNAUTHENTICATED,
                        code_pb2.PERMISSION_DENIED})


def code_name(code: int) -> str:
    return _NAMES.get(code, str(code))


@dataclass
class UploadStats:
    blobs: int = 0            # distinct non-empty blobs asked for
    uploaded: int = 0         # of them, those the CAS was missing
    bytes_uploaded: int = 0
    seconds: float = 0.0


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class CasClient:
    """CAS and ByteStream calls for one instance over one channel (thread-safe: it holds no
    per-call state)."""

    def __init__(self, channel: grpc.Channel, instance: str, *, timeout: float = 60.0,
                 min_bytes_per_second: float = 1 * MIB,
                 max_batch_bytes: int = DEFAULT_BATCH_BYTES, chunk_bytes: int = 1 * MIB,
                 retries: int = 2, backoff: float = 0.2) -> None:
        self.instance = instance
        self.timeout = timeout
        self.min_bytes_per_second = min_bytes_per_second
        self.max_batch_bytes = max_batch_bytes
        self.chunk_bytes = chunk_bytes
        self.retries = retries
        self.backoff = backoff
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)

    # -- helpers ---------------------------------------------------------------------------

    def fits_batch(self, digest: Digest) -> bool:
        """Whether a blob goes through the batch calls (else through ByteStream)."""
        return digest.size_bytes + BLOB_OVERHEAD <= self.max_batch_bytes

    def _deadline(self, size: int) -> float:
        return self.timeout + size / self.min_bytes_per_second

    def _prefix(self) -> str:
        return f"{self.instance}/" if self.instance else ""

    def read_resource(self, digest: Digest) -> str:
        return f"{self._prefix()}blobs/{digest.hash}/{digest.size_bytes}"

    def write_resource(self, digest: Digest) -> str:
        return f"{self._prefix()}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), retried a few times while the server is UNAVAILABLE (every CAS call is
        idempotent); any other gRPC error becomes a CasError."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as exc:
                status = exc.code() if callable(getattr(exc, "code", None)) else None
                details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
                if status == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(self.backoff * 4 ** attempt)
                    continue
                code = status.value[0] if status is not None else code_pb2.UNKNOWN
                raise CasError(f"{what}: {code_name(code)}: {details}", code) from None
        raise AssertionError("unreachable")

    def _batches(self, blobs: Iterable[Digest]) -> Iterator[list[Digest]]:
        batch: list[Digest] = []
        total = 0
        for digest in blobs:
            size = digest.size_bytes + BLOB_OVERHEAD
            if batch and total + size > self.max_batch_bytes:
                yield batch
                batch, total = [], 0
            batch.append(digest)
            total += size
        if batch:
            yield batch

    # -- queries ---------------------------------------------------------------------------

    def find_missing(self, blobs: Iterable[Digest]) -> list[Digest]:
        """The blobs the CAS does not have (the empty blob never counts as missing)."""
        unique = list({digest_key(d): d for d in blobs if not is_empty(d)}.values())
        missing: list[Digest] = []
        for start in range(0, len(unique), FIND_MISSING_BATCH):
            request = re_pb2.FindMissingBlobsRequest(
                instance_name=self.instance, blob_digests=unique[start:start + FIND_MISSING_BATCH])
            response = self._call("FindMissingBlobs", partial(
                self._cas.FindMissingBlobs, request, timeout=self.timeout))
            missing.extend(response.missing_blob_digests)
        return missing

    # -- reads -----------------------------------------------------------------------------

    def iter_blobs(self, blobs: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        """(digest, contents) for every distinct blob, one batch in memory at a time; blobs too
        large for a batch are read through ByteStream. Every content is hash-checked; a
        malformed digest is an InputError."""
        small: list[Digest] = []
        large: list[Digest] = []
        for digest in {digest_key(validate_digest(d, "digest")): d for d in blobs}.values():
            if is_empty(digest):
                yield digest, b""
            else:
                (small if self.fits_batch(digest) else large).append(digest)
        for batch in self._batches(small):
            yield from self._batch_read(batch)
        for digest in large:
            chunks: list[bytes] = []
            self._read_stream(digest, chunks.append)
            yield digest, b"".join(chunks)

    def read_blobs(self, blobs: Iterable[Digest]) -> dict[str, bytes]:
        """"hash/size" -> contents. Meant for small blobs (Directory messages, small files)."""
        return {digest_key(d): data for d, data in self.iter_blobs(blobs)}

    def _batch_read(self, batch: list[Digest]) -> list[tuple[Digest, bytes]]:
        request = re_pb2.BatchReadBlobsRequest(instance_name=self.instance, digests=batch)
        response = self._call("BatchReadBlobs", partial(
            self._cas.BatchReadBlobs, request,
            timeout=self._deadline(sum(d.size_bytes for d in batch))))
        got = {digest_key(r.digest): r for r in response.responses}
        out: list[tuple[Digest, bytes]] = []
        missing: list[str] = []
        for digest in batch:
            k = digest_key(digest)
            r = got.get(k)
            if r is None:
                raise CasError(f"BatchReadBlobs: no response for blob {k}")
            if r.status.code == code_pb2.NOT_FOUND:
                missing.append(k)
                continue
            if r.status.code:
                raise CasError(f"BatchReadBlobs: blob {k}: {code_name(r.status.code)}: "
                               f"{r.status.message}", r.status.code)
            if digest_key(digest_of_bytes(r.data)) != k:
                raise CasError(f"BatchReadBlobs: the CAS returned data for {k} that does not "
                               "match its digest", code_pb2.DATA_LOSS)
            out.append((digest, r.data))
        if missing:
            raise CasError(f"the CAS does not have blob{'s' * (len(missing) > 1)} "
                           f"{', '.join(missing)}", code_pb2.NOT_FOUND, missing=missing)
        return out

    def _read_stream(self, digest: Digest, sink: Callable[[bytes], object]) -> None:
        """ByteStream Read into sink, resumed at the offset reached if the server goes away,
        hash and size checked as the bytes pass."""
        k = digest_key(digest)
        hasher = hashlib.sha256()
        offset = 0

        def read() -> None:
            nonlocal offset
            request = bs_pb2.ReadRequest(resource_name=self.read_resource(digest),
                                         read_offset=offset)
            for response in self._bytestream.Read(
                    request, timeout=self._deadline(digest.size_bytes - offset)):
                data = response.data
                if offset + len(data) > digest.size_bytes:
                    raise CasError(f"ByteStream Read {k}: the CAS sent more than "
                                   f"{digest.size_bytes} bytes", code_pb2.DATA_LOSS)
                hasher.update(data)
                sink(data)
                offset += len(data)
                del response, data  # not kept alive while the next chunk arrives

        try:
            self._call(f"ByteStream Read {k}", read)
        except CasError as exc:
            if exc.code == code_pb2.NOT_FOUND:
                raise CasError(f"the CAS does not have blob {k}", exc.code, missing=[k]) from None
            raise
        if offset != digest.size_bytes or hasher.hexdigest() != digest.hash:
            raise CasError(f"ByteStream Read {k}: got {offset} bytes that do not match the "
                           "digest", code_pb2.DATA_LOSS)

    def read_into(self, digest: Digest, fd: int) -> None:
        """Write the blob into an open file (at its offset), streamed and verified."""
        if not is_empty(validate_digest(digest, "digest")):
            self._read_stream(digest, lambda data: _write_all(fd, data))

    def read_to_file(self, digest: Digest, path: str | Path, *, mode: int = 0o644) -> None:
        """Stream the blob into a new file at path (replacing one there); on any failure the
        partial file is removed."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        try:
            self.read_into(digest, fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise
        os.close(fd)

    # -- writes ----------------------------------------------------------------------------

    def upload(self, items: Iterable[Blob]) -> UploadStats:
        """Make sure the CAS holds every blob: FindMissingBlobs first, then the missing small
        ones in BatchUpdateBlobs batches and the large ones through ByteStream Write, read from
        their file chunk by chunk. Files are opened without following a final symlink."""
        started = time.monotonic()
        unique: dict[str, Blob] = {}
        for digest, source in items:
            if not is_empty(digest):
                unique.setdefault(digest_key(digest), (digest, source))
        stats = UploadStats(blobs=len(unique))
        missing = self.find_missing(d for d, _ in unique.values())
        small = [d for d in missing if self.fits_batch(d)]
        for batch in self._batches(small):
            requests = [re_pb2.BatchUpdateBlobsRequest.Request(
                digest=d, data=_contents(unique[digest_key(d)][1])) for d in batch]
            self._batch_update(requests)
            stats.uploaded += len(batch)
            stats.bytes_uploaded += sum(d.size_bytes for d in batch)
        for digest in missing:
            if not self.fits_batch(digest):
                self._write_stream(digest, unique[digest_key(digest)][1])
                stats.uploaded += 1
                stats.bytes_uploaded += digest.size_bytes
        stats.seconds = time.monotonic() - started
        return stats

    def _batch_update(self, requests: list[re_pb2.BatchUpdateBlobsRequest.Request]) -> None:
        request = re_pb2.BatchUpdateBlobsRequest(instance_name=self.instance, requests=requests)
        response = self._call("BatchUpdateBlobs", partial(
            self._cas.BatchUpdateBlobs, request,
            timeout=self._deadline(sum(len(r.data) for r in requests))))
        done = {digest_key(r.digest): r.status for r in response.responses}
        for r in requests:
            k = digest_key(r.digest)
            status = done.get(k)
            if status is None:
                raise CasError(f"BatchUpdateBlobs: no response for blob {k}")
            if status.code:
                raise CasError(f"BatchUpdateBlobs: blob {k}: {code_name(status.code)}: "
                               f"{status.message}", status.code)

    def _write_stream(self, digest: Digest, source: bytes | Path) -> None:
        k = digest_key(digest)
        size = digest.size_bytes
        fd = -1 if isinstance(source, bytes) else os.open(
            source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

        def chunks(resource: str) -> Iterator[bs_pb2.WriteRequest]:
            offset = 0
            while True:
                n = min(self.chunk_bytes, size - offset)
                data = source[offset:offset + n] if isinstance(source, bytes) else os.pread(
                    fd, n, offset)
                # a file shorter than its digest says ends the stream: the CAS refuses it
                last = offset + len(data) >= size or len(data) < n
                yield bs_pb2.WriteRequest(resource_name=resource if offset == 0 else "",
                                          write_offset=offset, data=data, finish_write=last)
                offset += len(data)
                if last:
                    return

        def write() -> bs_pb2.WriteResponse:
            return self._bytestream.Write(chunks(self.write_resource(digest)),
                                          timeout=self._deadline(size))

        try:
            response = self._call(f"ByteStream Write {k}", write)
        finally:
            if fd >= 0:
                os.close(fd)
        if response.committed_size != size:
            raise CasError(f"ByteStream Write {k}: the CAS committed {response.committed_size} "
                           f"of {size} bytes", code_pb2.DATA_LOSS)

    # -- trees -----------------------------------------------------------------------------

    def get_tree(self, root: Digest) -> dict[str, re_pb2.Directory]:
        """Every Directory reachable from root, by "hash/size" key. GetTree pages come first;
        whatever they lack (or all of it, when GetTree fails: unimplemented, or a server
        that cannot parse a Directory) is read level by level with batched reads."""
        validate_digest(root, "root_digest")
        known: dict[str, re_pb2.Directory] = {}
        try:
            self._get_tree_pages(root, known)
        except CasError as exc:
            if exc.code == code_pb2.NOT_FOUND:
                k = digest_key(root)
                raise CasError(f"the CAS does not have the input root Directory {k}",
                               exc.code, missing=[k]) from None
            if exc.code in _TRANSIENT:
                raise
            # UNIMPLEMENTED, or a server that chokes on a malformed Directory (INTERNAL):
            # the direct reads below either succeed or say precisely what is wrong
            known.clear()
        tree: dict[str, re_pb2.Directory] = {}
        level = {digest_key(root): root}
        while level:
            need = [d for k, d in level.items() if k not in known]
            for digest, data in self.iter_blobs(need):
                k = digest_key(digest)
                try:
                    known[k] = re_pb2.Directory.FromString(data)
                except DecodeError:
                    raise InputError(f"Directory {k}", "is not a Directory message") from None
            below: dict[str, Digest] = {}
            for k in level:
                directory = tree[k] = known[k]
                for i, node in enumerate(directory.directories):
                    child = validate_digest(
                        node.digest, f"Directory {k} directories[{i}] ({node.name!r}).digest")
                    ck = digest_key(child)
                    if ck not in tree and ck not in level:
                        below[ck] = child
            level = below
        return tree

    def _get_tree_pages(self, root: Digest, known: dict[str, re_pb2.Directory]) -> None:
        token = ""
        seen: set[str] = set()
        while True:
            request = re_pb2.GetTreeRequest(instance_name=self.instance, root_digest=root,
                                            page_token=token)

            def page(r: re_pb2.GetTreeRequest = request) -> str:
                next_token = ""
                for response in self._cas.GetTree(r, timeout=self.timeout):
                    for directory in response.directories:
                        data = directory.SerializeToString(deterministic=True)
                        known[digest_key(digest_of_bytes(data))] = directory
                    next_token = response.next_page_token
                return next_token

            token = self._call("GetTree", page)
            if not token or token in seen:
                return
            seen.add(token)


def _contents(source: bytes | Path) -> bytes:
    if isinstance(source, bytes):
        return source
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)
