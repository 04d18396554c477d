"""The worker's local CAS cache: fetch, variants, eviction, crashes, threads and processes
sharing one directory. Blobs come from a real BuildGrid CAS."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("buildgrid.common")

from execbox.adapters.reapi.cache import LocalCas
from execbox.adapters.reapi.cas import CasClient, CasError
from execbox.adapters.reapi.digests import Digest, digest_of_bytes
from execbox.adapters.reapi.protos import bs_grpc, code_pb2, grpc, re_grpc
from test_reapi_cas import Proxy, blob

KIB = 1024


def uploaded(client: CasClient, prefix: str, sizes: list[int]) -> list[tuple[Digest, bytes]]:
    items = [(digest_of_bytes(b), b) for b in (blob(f"{prefix}-{i}", n)
                                              for i, n in enumerate(sizes))]
    client.upload(items)
    return items


def on_disk(cache: LocalCas) -> int:
    return sum(p.stat().st_size for p in (cache.directory / "objects").rglob("*")
               if p.is_file())


def test_ensure_fetches_once_then_hits(client: CasClient, tmp_path: Path) -> None:
    items = uploaded(client, "once", [10, 1000, 70 * KIB, 0])
    items.append((digest_of_bytes(b""), b""))
    with LocalCas(tmp_path / "cache", 10 * 1024 * KIB, fsync=True) as cache:
        stats = cache.ensure([(d, False) for d, _ in items], client)
        assert (stats.files, stats.hits, stats.misses) == (4, 0, 3)   # the empty blob is local
        assert stats.bytes_fetched == 10 + 1000 + 70 * KIB
        for d, data in items:
            path = cache.path_for(d, False)
            assert path.read_bytes() == data
            assert stat.S_IMODE(path.stat().st_mode) == 0o444
        again = cache.ensure([(d, False) for d, _ in items], client)
        assert (again.hits, again.misses, again.bytes_fetched) == (4, 0, 0)


def test_executable_and_plain_variants_are_separate_files(client: CasClient,
                                                          tmp_path: Path) -> None:
    [(d, data)] = uploaded(client, "variants", [5000])
    with LocalCas(tmp_path / "cache", 1024 * KIB) as cache:
        stats = cache.ensure([(d, True), (d, False)], client)
        assert stats.misses == 2 and stats.bytes_fetched == 5000   # fetched once
        plain, executable = cache.path_for(d, False), cache.path_for(d, True)
        assert plain != executable
        assert plain.stat().st_ino != executable.stat().st_ino
        assert stat.S_IMODE(plain.stat().st_mode) == 0o444
        assert stat.S_IMODE(executable.stat().st_mode) == 0o555
        assert plain.read_bytes() == executable.read_bytes() == data
        assert plain.parent.parent.name == "r" and executable.parent.parent.name == "x"
        # the other variant of a cached blob is copied, not fetched
        [(d2, _)] = uploaded(client, "variants-2", [300])
        cache.ensure([(d2, False)], client)
        copied = cache.ensure([(d2, True)], client)
        assert (copied.copies, copied.misses, copied.bytes_fetched) == (1, 0, 0)


def test_large_blobs_are_streamed_into_the_cache(client: CasClient, tmp_path: Path) -> None:
    items = uploaded(client, "streamed", [200 * KIB, 300 * KIB])
    client.max_batch_bytes = 64 * KIB    # both too large for a batch
    with LocalCas(tmp_path / "cache", 10 * 1024 * KIB) as cache:
        stats = cache.ensure([(d, False) for d, _ in items], client)
        assert stats.bytes_fetched == 500 * KIB
        for d, data in items:
            assert cache.path_for(d, False).read_bytes() == data
        assert not list((cache.directory / "tmp").rglob("*/*"))  # no temp file left behind


def test_a_missing_blob_leaves_nothing_behind(client: CasClient, tmp_path: Path) -> None:
    absent = digest_of_bytes(b"not in the CAS " + os.urandom(8))
    with LocalCas(tmp_path / "cache", 1024 * KIB) as cache:
        with pytest.raises(CasError) as caught:
            cache.ensure([(absent, False)], client)
        assert caught.value.code == code_pb2.NOT_FOUND
        assert not cache.path_for(absent, False).exists()
        assert on_disk(cache) == 0


def test_corrupt_blobs_never_enter_the_cache(bgd: str, client: CasClient,
                                             tmp_path: Path) -> None:
    items = uploaded(client, "corrupt", [500, 300 * KIB])
    upstream = grpc.insecure_channel(bgd)
    servicer = Proxy(upstream)
    servicer.corrupt = True
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    re_grpc.add_ContentAddressableStorageServicer_to_server(servicer, server)
    bs_grpc.add_ByteStreamServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        corrupting = CasClient(channel, "", max_batch_bytes=64 * KIB)  # the large one streamed
        with LocalCas(tmp_path / "cache", 10 * 1024 * KIB) as cache:
            for d, _ in items:
                with pytest.raises(CasError) as caught:
                    cache.ensure([(d, False)], corrupting)
                assert caught.value.code == code_pb2.DATA_LOSS
            assert on_disk(cache) == 0
            assert not list((cache.directory / "tmp").rglob("*/*"))
    finally:
        channel.close()
        server.stop(0)
        upstream.close()


def test_eviction_keeps_the_bound_and_drops_the_least_recently_used(
        client: CasClient, tmp_path: Path) -> None:
    a, b, c, d = uploaded(client, "lru", [30 * KIB] * 4)
    with LocalCas(tmp_path / "cache", 100 * KIB, touch_after=0) as cache:
        for item in (a, b, c):
            cache.ensure([(item[0], False)], client)
            time.sleep(0.02)   # mtimes a tick apart
        cache.ensure([(a[0], False)], client)   # a is now the most recently used
        time.sleep(0.02)
        cache.ensure([(d[0], False)], client)   # 120 KiB > 100 KiB: evict
        assert on_disk(cache) <= 100 * KIB
        assert cache.total_bytes() == on_disk(cache)
        assert not cache.path_for(b[0], False).exists()
        for kept in (a, c, d):
            assert cache.path_for(kept[0], False).read_bytes() == kept[1]


def test_many_blobs_never_exceed_the_bound(client: CasClient, tmp_path: Path) -> None:
    items = uploaded(client, "bound", [random.Random(i).randint(1, 20 * KIB)
                                       for i in range(120)])
    limit = 150 * KIB
    with LocalCas(tmp_path / "cache", limit) as cache:
        for start in range(0, len(items), 10):
            cache.ensure([(d, start % 20 == 0) for d, _ in items[start:start + 10]], client)
            assert on_disk(cache) <= limit
        # and a reopened cache recounts what is there
    with LocalCas(tmp_path / "cache", limit) as reopened:
        assert reopened.total_bytes() == on_disk(reopened) <= limit


def test_a_blob_larger_than_the_bound_is_evicted_once_the_lease_ends(
        client: CasClient, tmp_path: Path) -> None:
    [(small, _), (large, _)] = uploaded(client, "over", [10 * KIB, 300 * KIB])
    with LocalCas(tmp_path / "cache", 100 * KIB) as cache:
        cache.ensure([(small, False)], client)
        with cache.lease([(large, False)], client):
            assert cache.path_for(large, False).exists()  # pinned while it is staged
        # the bound holds between leases, not only after the next insert
        assert on_disk(cache) <= 100 * KIB
        assert cache.total_bytes() == on_disk(cache)
        assert not cache.path_for(large, False).exists()


CRASH = """
import os, sys
from execbox.adapters.reapi.cache import LocalCas
cache = LocalCas(sys.argv[1], 1 << 20)
with open(cache._temp(), "wb") as f:
    f.write(b"half a blob")
print(cache._tmp, flush=True)
os._exit(0)
"""


def test_a_crash_mid_write_leaves_only_temp_files_which_the_next_open_removes(
        tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    with LocalCas(directory, 1 << 20) as alive:
        out = subprocess.run([sys.executable, "-c", CRASH, str(directory)], check=True,
                             capture_output=True, text=True)
        left = Path(out.stdout.strip())
        assert left.is_dir() and [p.name for p in left.iterdir()] == ["0"]
        assert not any(p.is_file() for p in (directory / "objects").rglob("*"))
        with LocalCas(directory, 1 << 20):
            assert not left.exists()            # the dead process's temp dir is gone
            assert alive._tmp.is_dir()          # the live one's is kept
        assert alive._tmp.is_dir()
    assert not alive._tmp.exists()              # close removes its own


def test_concurrent_leases_in_threads_keep_their_files(client: CasClient,
                                                       tmp_path: Path) -> None:
    items = uploaded(client, "threads", [random.Random(i).randint(1, 8 * KIB)
                                         for i in range(200)])
    errors: list[BaseException] = []
    with LocalCas(tmp_path / "cache", 200 * KIB) as cache:   # a fraction of the 800 KiB

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(6):
                    chosen = rng.sample(items, 20)
                    wanted = [(d, rng.random() < 0.3) for d, _ in chosen]
                    with cache.lease(wanted, client):
                        # pinned: other threads' evictions must not touch these
                        for (d, executable), (_, data) in zip(wanted, chosen, strict=True):
                            path = cache.path_for(d, executable)
                            assert hashlib.sha256(path.read_bytes()).hexdigest() == d.hash
                            assert hashlib.sha256(data).hexdigest() == d.hash
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert on_disk(cache) <= 200 * KIB
        assert not list((cache.directory / "tmp").rglob("*/*"))


SHARED_USE = """
import hashlib, random


def use(cache, client, items, seed):
    \"\"\"What staging does: lease, then read each file; another process may have evicted
    one in between (pins are per process), and then it is ensured again. The retries.\"\"\"
    rng = random.Random(seed)
    retries = 0
    for _ in range(15):
        wanted = [(d, rng.random() < 0.5) for d in rng.sample(items, 20)]
        with cache.lease(wanted, client):
            for d, x in wanted:
                for _ in range(5):
                    try:
                        with open(cache.path_for(d, x), "rb") as f:
                            assert hashlib.sha256(f.read()).hexdigest() == d.hash
                        break
                    except FileNotFoundError:
                        retries += 1
                        cache.ensure([(d, x)], client)
                else:
                    raise AssertionError("evicted five times in a row")
    return retries
"""

OTHER_PROCESS = SHARED_USE + """
import sys
from execbox.adapters.reapi.cache import LocalCas
from execbox.adapters.reapi.cas import CasClient
from execbox.adapters.reapi.digests import digest_from_key
from execbox.adapters.reapi.protos import grpc
directory, address, keys, limit = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
client = CasClient(grpc.insecure_channel(address), "")
with LocalCas(directory, int(limit)) as cache:
    retries = use(cache, client, [digest_from_key(k) for k in keys], 7)
print("ok", file=sys.stdout)
print("retries", retries, file=sys.stderr)
"""


def test_two_caches_and_another_process_share_one_directory(bgd: str, client: CasClient,
                                                            tmp_path: Path) -> None:
    items = uploaded(client, "shared", [random.Random(i).randint(1, 6 * KIB)
                                        for i in range(150)])
    directory, limit = tmp_path / "cache", 150 * KIB
    keys = ",".join(f"{d.hash}/{d.size_bytes}" for d, _ in items)
    other = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, str(directory), bgd, keys,
                              str(limit)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    namespace: dict[str, Any] = {}
    exec(SHARED_USE, namespace)
    try:
        first, second = LocalCas(directory, limit), LocalCas(directory, limit)
        errors: list[BaseException] = []

        def run(cache: LocalCas, seed: int) -> None:
            try:
                namespace["use"](cache, client, [d for d, _ in items], seed)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c, i)) for i, c in
                   enumerate((first, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out, err = other.communicate(timeout=60)
        assert other.returncode == 0 and out.strip() == "ok", err
        assert not errors, errors
        # whatever is in the cache is intact, and within the bound after the last eviction
        for path in (directory / "objects").rglob("*"):
            if path.is_file():
                assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        assert on_disk(first) <= limit + 20 * 6 * KIB   # + at most one unaccounted lease
        first.close()
        second.close()
        assert not list((directory / "tmp").iterdir())
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
