"""The worker's CAS client against a real BuildGrid CAS (bgd, CAS + ByteStream only, in
memory), and against an in-process proxy in front of it that misbehaves on purpose."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("buildgrid.common")

from hypothesis import given, settings
from hypothesis import strategies as st

from execbox.adapters.reapi import digests
from execbox.adapters.reapi.cas import CasClient, CasError
from execbox.adapters.reapi.digests import (
    InputError,
    digest_key,
    digest_of_bytes,
)
from execbox.adapters.reapi.protos import (
    bs_grpc,
    code_pb2,
    grpc,
    re_grpc,
    re_pb2,
)

MIB = 1 << 20

CAS_ONLY_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
storages:
  - !lru-storage &store
    size: 512MB
instances:
  - name: ""
    services:
      - !cas
        storage: *store
      - !bytestream
        storage: *store
"""


def find_bgd() -> str | None:
    candidates = [os.environ.get("EXECBOX_BGD"),
                  os.path.expanduser("~/.cache/execbox-farm/buildgrid/bin/bgd"),
                  "/tmp/bgtry/venv/bin/bgd"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def running_bgd() -> Iterator[str]:
    """A CAS-only BuildGrid server on a free loopback port; its address. Skips without bgd;
    the server is stopped by its pid (TERM, then KILL) whatever happens."""
    bgd = find_bgd()
    if bgd is None:
        pytest.skip("no BuildGrid: set EXECBOX_BGD to a bgd binary")
    workdir = Path(tempfile.mkdtemp(prefix="execbox-bgd-"))
    port = free_port()
    config = workdir / "cas.yml"
    config.write_text(CAS_ONLY_CONFIG.format(port=port))
    log = open(workdir / "bgd.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([bgd, "server", "start", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        channel = grpc.insecure_channel(address)
        try:
            stub = re_grpc.ContentAddressableStorageStub(channel)
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"bgd exited with {proc.returncode}: "
                                f"{(workdir / 'bgd.log').read_text()[-2000:]}")
                try:
                    stub.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        pytest.fail("bgd did not answer within 30 s: "
                                    f"{(workdir / 'bgd.log').read_text()[-2000:]}")
                    time.sleep(0.1)
        finally:
            channel.close()
        yield address
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def blob(seed: str, size: int) -> bytes:
    """size pseudo-random bytes, distinct per seed (distinct blobs across tests)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


# -- digests --------------------------------------------------------------------------------

@given(st.binary(max_size=3 * 1024))
@settings(max_examples=50, deadline=None)
def test_digest_of_bytes_and_of_a_file_agree(data: bytes) -> None:
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        from_file = digests.digest_of_file(f.name)
    assert from_file == digest_of_bytes(data)
    assert from_file.hash == hashlib.sha256(data).hexdigest()
    assert from_file.size_bytes == len(data)


def test_a_file_larger_than_the_read_chunk_is_hashed_whole(tmp_path: Path) -> None:
    data = blob("chunked", digests.CHUNK * 2 + 17)
    (tmp_path / "f").write_bytes(data)
    assert digests.digest_of_file(tmp_path / "f") == digest_of_bytes(data)


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=2**62))
def test_key_round_trips(seed: bytes, size: int) -> None:
    h = hashlib.sha256(seed).hexdigest()
    d = re_pb2.Digest(hash=h if size else digests.EMPTY_HASH, size_bytes=size)
    assert digest_key(d) == f"{d.hash}/{size}"
    assert digests.digest_from_key(digest_key(d)) == d


@pytest.mark.parametrize(("hash_", "size", "field"), [
    ("A" * 64, 1, "f.hash"),             # uppercase
    ("a" * 63, 1, "f.hash"),             # short
    ("g" * 64, 1, "f.hash"),             # not hex
    ("../" + "a" * 61, 1, "f.hash"),     # a path
    ("a" * 64, -1, "f.size_bytes"),
    ("a" * 64, 0, "f.hash"),             # size 0 is only the empty blob
])
def test_validation_names_the_bad_field(hash_: str, size: int, field: str) -> None:
    with pytest.raises(InputError) as caught:
        digests.validate_digest(re_pb2.Digest(hash=hash_, size_bytes=size), "f")
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)


def test_validation_accepts_real_digests() -> None:
    d = digest_of_bytes(b"x")
    assert digests.validate_digest(d, "f") is d
    assert digests.validate_digest(digest_of_bytes(b""), "f").size_bytes == 0
    with pytest.raises(InputError):
        digests.digest_from_key("abc")


def test_resource_names() -> None:
    d = digest_of_bytes(b"x")
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        assert CasClient(channel, "").read_resource(d) == f"blobs/{d.hash}/1"
        named = CasClient(channel, "main/sub")
        assert named.read_resource(d) == f"main/sub/blobs/{d.hash}/1"
        upload = named.write_resource(d).split("/")
        assert upload[:3] == ["main", "sub", "uploads"] and upload[4:] == ["blobs", d.hash, "1"]
    finally:
        channel.close()


# -- round trips ------------------------------------------------------------------------------

def test_small_blobs_round_trip_in_batches(client: CasClient) -> None:
    data = [blob(f"small-{i}", 1000 + i) for i in range(50)]
    items = [(digest_of_bytes(b), b) for b in data]
    client.max_batch_bytes = 8 * 1024  # several batches each way
    assert len(client.find_missing(d for d, _ in items)) == 50
    stats = client.upload(items)
    assert (stats.blobs, stats.uploaded) == (50, 50)
    assert client.find_missing(d for d, _ in items) == []
    again = client.upload(items)
    assert again.uploaded == 0 and again.bytes_uploaded == 0
    got = client.read_blobs(d for d, _ in items)
    assert got == {digest_key(d): b for d, b in items}


def test_the_empty_blob_is_never_sent(client: CasClient) -> None:
    empty = digest_of_bytes(b"")
    assert client.find_missing([empty]) == []
    assert client.upload([(empty, b"")]).uploaded == 0
    assert client.read_blobs([empty]) == {digest_key(empty): b""}


def test_a_large_blob_round_trips_through_bytestream(client: CasClient,
                                                     tmp_path: Path) -> None:
    data = blob("large", 12 * MIB + 123)   # more than a gRPC message may carry
    source = tmp_path / "source"
    source.write_bytes(data)
    d = digest_of_bytes(data)
    assert not client.fits_batch(d)
    stats = client.upload([(d, source)])
    assert (stats.uploaded, stats.bytes_uploaded) == (1, len(data))
    assert client.find_missing([d]) == []
    tracemalloc.start()
    try:
        client.read_to_file(d, tmp_path / "copy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "copy").read_bytes() == data
    assert peak < 5 * MIB, f"read_to_file held {peak} bytes of a {len(data)}-byte blob"
    assert client.read_blobs([d])[digest_key(d)] == data


def test_a_large_blob_uploads_from_memory_too(client: CasClient) -> None:
    data = blob("large-bytes", 4 * MIB + 1)
    d = digest_of_bytes(data)
    assert client.upload([(d, data)]).uploaded == 1
    assert client.find_missing([d]) == []


def test_a_blob_whose_bytes_do_not_match_its_digest_is_refused(client: CasClient,
                                                               tmp_path: Path) -> None:
    claimed = digest_of_bytes(b"what the digest says")
    with pytest.raises(CasError) as caught:
        client.upload([(claimed, b"something else entirely")])
    assert caught.value.code == code_pb2.INVALID_ARGUMENT
    big = blob("mismatch-big", 5 * MIB)
    (tmp_path / "big").write_bytes(big)
    big_claimed = digest_of_bytes(blob("mismatch-other", 5 * MIB))
    with pytest.raises(CasError):
        client.upload([(big_claimed, tmp_path / "big")])
    assert {digest_key(d) for d in client.find_missing([claimed, big_claimed])} == {
        digest_key(claimed), digest_key(big_claimed)}


def test_a_missing_blob_is_named(client: CasClient, tmp_path: Path) -> None:
    absent = digest_of_bytes(b"never uploaded " + os.urandom(8))
    with pytest.raises(CasError) as caught:
        client.read_blobs([absent])
    assert caught.value.code == code_pb2.NOT_FOUND
    assert caught.value.missing == (digest_key(absent),)
    assert digest_key(absent) in str(caught.value)
    big_absent = re_pb2.Digest(hash=hashlib.sha256(os.urandom(8)).hexdigest(),
                               size_bytes=6 * MIB)
    with pytest.raises(CasError) as caught:
        client.read_to_file(big_absent, tmp_path / "never")
    assert caught.value.code == code_pb2.NOT_FOUND
    assert caught.value.missing == (digest_key(big_absent),)
    assert not (tmp_path / "never").exists()


def upload_tree(client: CasClient) -> tuple[re_pb2.Digest, dict[str, re_pb2.Directory]]:
    """root/{a, sub/{b, deeper/{c}}, same/{b, deeper/{c}}} - sub and same share a Directory."""
    a, b, c = b"file a", b"file b", b"file c"
    deeper = re_pb2.Directory(files=[re_pb2.FileNode(name="c", digest=digest_of_bytes(c))])
    deeper_b = deeper.SerializeToString()
    sub = re_pb2.Directory(
        files=[re_pb2.FileNode(name="b", digest=digest_of_bytes(b))],
        directories=[re_pb2.DirectoryNode(name="deeper", digest=digest_of_bytes(deeper_b))])
    sub_b = sub.SerializeToString()
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="a", digest=digest_of_bytes(a))],
        directories=[re_pb2.DirectoryNode(name="same", digest=digest_of_bytes(sub_b)),
                     re_pb2.DirectoryNode(name="sub", digest=digest_of_bytes(sub_b))])
    root_b = root.SerializeToString()
    client.upload([(digest_of_bytes(x), x) for x in (a, b, c, deeper_b, sub_b, root_b)])
    expected = {digest_key(digest_of_bytes(x)): m
                for x, m in ((deeper_b, deeper), (sub_b, sub), (root_b, root))}
    return digest_of_bytes(root_b), expected


def test_get_tree_walks_every_directory(client: CasClient) -> None:
    root, expected = upload_tree(client)
    assert client.get_tree(root) == expected


def test_get_tree_of_a_missing_root_is_not_found(client: CasClient) -> None:
    absent = digest_of_bytes(b"no such directory " + os.urandom(8))
    with pytest.raises(CasError) as caught:
        client.get_tree(absent)
    assert caught.value.code == code_pb2.NOT_FOUND
    assert caught.value.missing == (digest_key(absent),)


def test_a_blob_that_is_not_a_directory_is_an_input_error(client: CasClient) -> None:
    junk = b"\xff\xff\xff not a protobuf"
    client.upload([(digest_of_bytes(junk), junk)])
    with pytest.raises(InputError):
        client.get_tree(digest_of_bytes(junk))


# -- a proxy that misbehaves -------------------------------------------------------------------

class Proxy(re_grpc.ContentAddressableStorageServicer, bs_grpc.ByteStreamServicer):
    """Forwards to bgd. GetTree is UNIMPLEMENTED unless `paged` (then one Directory per page);
    `corrupt` flips a byte of what reads return; `unavailable` fails that many calls first;
    `delay` sleeps before answering."""

    def __init__(self, upstream: grpc.Channel) -> None:
        self.cas = re_grpc.ContentAddressableStorageStub(upstream)
        self.bytestream = bs_grpc.ByteStreamStub(upstream)
        self.paged = False
        self.corrupt = False
        self.unavailable = 0
        self.delay = 0.0
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append(name)
            fail = self.unavailable > 0
            self.unavailable -= fail
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        time.sleep(self.delay)

    def FindMissingBlobs(self, request, context):  # type: ignore[no-untyped-def]
        self._enter("FindMissingBlobs", context)
        return self.cas.FindMissingBlobs(request)

    def BatchUpdateBlobs(self, request, context):  # type: ignore[no-untyped-def]
        self._enter("BatchUpdateBlobs", context)
        return self.cas.BatchUpdateBlobs(request)

    def BatchReadBlobs(self, request, context):  # type: ignore[no-untyped-def]
        self._enter("BatchReadBlobs", context)
        response = self.cas.BatchReadBlobs(request)
        if self.corrupt:
            for r in response.responses:
                if r.data:
                    r.data = bytes([r.data[0] ^ 1]) + r.data[1:]
        return response

    def GetTree(self, request, context):  # type: ignore[no-untyped-def]
        self._enter("GetTree", context)
        if not self.paged:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no GetTree here")
        everything = [d for r in self.cas.GetTree(re_pb2.GetTreeRequest(
            root_digest=request.root_digest)) for d in r.directories]
        index = int(request.page_token or 0)
        token = str(index + 1) if index + 1 < len(everything) else ""
        yield re_pb2.GetTreeResponse(directories=everything[index:index + 1],
                                     next_page_token=token)

    def Read(self, request, context):  # type: ignore[no-untyped-def]
        self._enter("Read", context)
        first = True
        for response in self.bytestream.Read(request):
            if self.corrupt and first and response.data:
                response.data = bytes([response.data[0] ^ 1]) + response.data[1:]
            first = False
            yield response

    def Write(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self._enter("Write", context)
        return self.bytestream.Write(request_iterator)


@pytest.fixture
def proxy(bgd: str) -> Iterator[tuple[Proxy, CasClient]]:
    upstream = grpc.insecure_channel(bgd)
    servicer = Proxy(upstream)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    re_grpc.add_ContentAddressableStorageServicer_to_server(servicer, server)
    bs_grpc.add_ByteStreamServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, CasClient(channel, "", timeout=10)
    finally:
        channel.close()
        server.stop(0)
        upstream.close()


def test_get_tree_falls_back_to_reading_directories(client: CasClient,
                                                    proxy: tuple[Proxy, CasClient]) -> None:
    servicer, through_proxy = proxy
    root, expected = upload_tree(client)
    assert through_proxy.get_tree(root) == expected
    assert servicer.calls.count("GetTree") == 1
    assert servicer.calls.count("BatchReadBlobs") == 3   # one per level


def test_get_tree_follows_page_tokens(client: CasClient,
                                      proxy: tuple[Proxy, CasClient]) -> None:
    servicer, through_proxy = proxy
    servicer.paged = True
    root, expected = upload_tree(client)
    assert through_proxy.get_tree(root) == expected
    assert servicer.calls.count("GetTree") == 3        # three Directory messages, one a page
    assert "BatchReadBlobs" not in servicer.calls


def test_corrupt_reads_are_detected(client: CasClient, proxy: tuple[Proxy, CasClient],
                                    tmp_path: Path) -> None:
    servicer, through_proxy = proxy
    small, large = blob("corrupt-small", 100), blob("corrupt-large", 2 * MIB)
    client.upload([(digest_of_bytes(small), small), (digest_of_bytes(large), large)])
    servicer.corrupt = True
    with pytest.raises(CasError) as caught:
        through_proxy.read_blobs([digest_of_bytes(small)])
    assert caught.value.code == code_pb2.DATA_LOSS
    through_proxy.max_batch_bytes = MIB    # the large one through ByteStream
    with pytest.raises(CasError) as caught:
        through_proxy.read_to_file(digest_of_bytes(large), tmp_path / "large")
    assert caught.value.code == code_pb2.DATA_LOSS
    assert not (tmp_path / "large").exists()


def test_unavailable_is_retried_then_reported(client: CasClient,
                                              proxy: tuple[Proxy, CasClient]) -> None:
    servicer, through_proxy = proxy
    through_proxy.backoff = 0.01
    data = blob("retried", 10)
    client.upload([(digest_of_bytes(data), data)])
    servicer.unavailable = 2
    assert through_proxy.read_blobs([digest_of_bytes(data)]) == {
        digest_key(digest_of_bytes(data)): data}
    servicer.unavailable = 10
    with pytest.raises(CasError) as caught:
        through_proxy.read_blobs([digest_of_bytes(data)])
    assert caught.value.code == code_pb2.UNAVAILABLE


def test_every_call_has_a_deadline(proxy: tuple[Proxy, CasClient]) -> None:
    servicer, through_proxy = proxy
    servicer.delay = 3
    through_proxy.timeout = 0.3
    started = time.monotonic()
    with pytest.raises(CasError) as caught:
        through_proxy.find_missing([digest_of_bytes(b"slow")])
    assert caught.value.code == code_pb2.DEADLINE_EXCEEDED
    servicer.paged = True
    with pytest.raises(CasError) as caught:
        through_proxy.get_tree(digest_of_bytes(b"slow"))
    assert caught.value.code == code_pb2.DEADLINE_EXCEEDED
    assert servicer.calls == ["FindMissingBlobs", "GetTree"]  # no fallback after a timeout
    assert time.monotonic() - started < 2
