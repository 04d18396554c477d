"""The worker's local CAS: one read-only file per blob, which input roots are hardlinked from,
so a blob used by many actions is fetched once and staged without copying.

Layout under the cache directory:

    lock                  flock'ed around accounting and eviction; holds the byte total
    objects/r/ab/<hash>   the blob, mode 0444 (non-executable inputs)
    objects/x/ab/<hash>   the blob, mode 0555 (executable inputs): the mode belongs to the
                          inode, so the two variants are two files
    tmp/<id>/             one per open LocalCas, flock'ed while it is open: blobs are written
                          there, verified, then hardlinked into objects/ (never partially)

A crash leaves only files in an unlocked tmp/<id>/, which the next open removes. Eviction
is least recently used by mtime, which a hit refreshes (at most every `touch_after`
seconds), so recency is shared by every process using the directory (staged inputs share
the inode, so their mtime is their blob's last use). Nothing this process
has pinned (leased) is evicted. Another process may evict a blob between this process's
check and its hardlink; staging sees ENOENT and asks again (`ensure` refetches). A blob
already hardlinked into an input root survives eviction: the link keeps the inode.

The files are read-only, so an action cannot write into the cache through its hardlinked
inputs; an action running as the cache's owner (or as root) could still chmod them, which
is why only a root worker's sandboxed actions (mapped onto another id) get hardlinks and
every other action gets copies (Workspace.copy_inputs)."""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .cas import CasClient
from .digests import Digest, digest_key, is_empty, validate_digest

READ_ONLY = 0o444
EXECUTABLE = 0o555
#: after an eviction the cache holds at most this share of max_bytes, so evictions (each a
#: scan of the cache) stay rare
LOW_WATER = 0.9
_TOTAL = struct.Struct("<Q")

#: (hash/size key, executable) -> digest: the files a lease asks for
Wanted = dict[tuple[str, bool], Digest]


@dataclass
class EnsureStats:
    files: int = 0          # distinct (blob, executable) pairs asked for
    hits: int = 0           # already in the cache
    misses: int = 0         # fetched from the CAS
    copies: int = 0         # made locally from the other variant of the blob
    bytes_fetched: int = 0
    seconds: float = 0.0


class LocalCas:
    """Content-addressed files under `directory`, kept under `max_bytes` (unless pinned
    files alone exceed it). Safe for threads of one process and for processes sharing the
    directory."""

    def __init__(self, directory: str | Path, max_bytes: int, *, fsync: bool = False,
                 touch_after: float = 60.0) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.touch_after = touch_after
        self._objects = str(self.directory / "objects")
        for variant in "rx":
            for i in range(256):
                os.makedirs(f"{self._objects}/{variant}/{i:02x}", exist_ok=True)
        (self.directory / "tmp").mkdir(exist_ok=True)
        self._mutex = threading.Lock()       # threads of this process, around the flock
        self._pins_lock = threading.Lock()   # pins, and eviction's unlinks
        self._pins: dict[str, int] = {}      # "r/<hash>" -> number of leases holding it
        self._names = itertools.count()
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
        self._tmp_fd = -1
        with self._locked():
            self._remove_dead_temps()
            self._tmp = self.directory / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self._tmp.mkdir(mode=0o700)
            self._tmp_fd = os.open(self._tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self._tmp_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._write_total(self._scan()[1])

    # -- public ----------------------------------------------------------------------------

    def path_for(self, digest: Digest, executable: bool) -> Path:
        return Path(self.object_path(digest.hash, executable))

    def object_path(self, hash_: str, executable: bool) -> str:
        """path_for as a plain string, for staging's hot loop."""
        return f"{self._objects}/{'x' if executable else 'r'}/{hash_[:2]}/{hash_}"

    def ensure(self, files: Iterable[tuple[Digest, bool]], client: CasClient) -> EnsureStats:
        """Make every (digest, executable) file present; nothing stays pinned afterwards."""
        with self.lease(files, client) as stats:
            return stats

    @contextmanager
    def lease(self, files: Iterable[tuple[Digest, bool]],
              client: CasClient) -> Iterator[EnsureStats]:
        """ensure(), with the files pinned until the block ends: this process will not evict
        them while they are being hardlinked."""
        wanted: Wanted = {}
        for i, (digest, executable) in enumerate(files):
            validate_digest(digest, f"files[{i}].digest")
            wanted[(digest_key(digest), executable)] = digest
        self._pin(wanted)
        try:
            yield self._ensure(wanted, client)
        finally:
            self._unpin(wanted)
            self._trim()

    def total_bytes(self) -> int:
        """The bytes in objects/, counted now (a scan)."""
        return self._scan()[1]

    def close(self) -> None:
        if self._tmp_fd >= 0:
            shutil.rmtree(self._tmp, ignore_errors=True)
            os.close(self._tmp_fd)
            self._tmp_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> LocalCas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fetching --------------------------------------------------------------------------

    def _present(self, digest: Digest, executable: bool) -> bool:
        path = self.object_path(digest.hash, executable)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if st.st_size != digest.size_bytes:
            return False  # a digest with a wrong size: let the CAS say it does not exist
        if time.time() - st.st_mtime > self.touch_after:
            try:
                os.utime(path)
            except FileNotFoundError:
                return False
        return True

    def _ensure(self, wanted: Wanted, client: CasClient) -> EnsureStats:
        started = time.monotonic()
        stats = EnsureStats(files=len(wanted))
        fetch: dict[str, tuple[Digest, set[bool]]] = {}
        added = 0
        for (k, executable), digest in wanted.items():
            if self._present(digest, executable):
                stats.hits += 1
                continue
            if is_empty(digest):
                added += self._insert_bytes(digest, executable, b"")
                stats.copies += 1
                continue
            if self._present(digest, not executable):
                try:
                    added += self._copy_variant(digest, executable)
                    stats.copies += 1
                    continue
                except FileNotFoundError:
                    pass  # evicted by another process meanwhile: fetch it
            fetch.setdefault(k, (digest, set()))[1].add(executable)
        self._account(added)
        small = [d for d, _ in fetch.values() if client.fits_batch(d)]
        for batch in _chunks(small, client.max_batch_bytes):
            added = 0
            for digest, data in client.iter_blobs(batch):
                variants = fetch[digest_key(digest)][1]
                for executable in variants:
                    added += self._insert_bytes(digest, executable, data)
                stats.misses += len(variants)
                stats.bytes_fetched += len(data)
            self._account(added)
        for digest, variants in fetch.values():
            if not client.fits_batch(digest):
                self._account(self._insert_stream(digest, variants, client))
                stats.misses += len(variants)
                stats.bytes_fetched += digest.size_bytes
        stats.seconds = time.monotonic() - started
        return stats

    def _temp(self) -> str:
        return f"{self._tmp}/{next(self._names)}"

    def _new_temp(self) -> tuple[str, int]:
        temp = self._temp()
        return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def _seal(self, fd: int, executable: bool) -> None:
        os.fchmod(fd, EXECUTABLE if executable else READ_ONLY)
        if self.fsync:
            os.fsync(fd)

    def _insert_bytes(self, digest: Digest, executable: bool, data: bytes) -> int:
        """Contents already verified (the client checks every blob it returns)."""
        temp, fd = self._new_temp()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._seal(fd, executable)
        except BaseException:
            os.unlink(temp)
            raise
        finally:
            os.close(fd)
        return self._publish(temp, digest, executable)

    def _insert_stream(self, digest: Digest, variants: set[bool], client: CasClient) -> int:
        """Stream a large blob into a temp file (the client verifies hash and size as it
        goes), copy it for a second variant, publish."""
        temp, fd = self._new_temp()
        temps = {min(variants): temp}
        try:
            try:
                client.read_into(digest, fd)
                self._seal(fd, min(variants))
            finally:
                os.close(fd)
            if len(variants) > 1:
                temps[True] = self._temp()
                shutil.copyfile(temp, temps[True])
                self._seal_path(temps[True], True)
        except BaseException:
            for path in temps.values():
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            raise
        return sum(self._publish(path, digest, executable)
                   for executable, path in temps.items())

    def _copy_variant(self, digest: Digest, executable: bool) -> int:
        """The blob's other variant is here: copied locally rather than fetched again."""
        temp = self._temp()
        try:
            shutil.copyfile(self.object_path(digest.hash, not executable), temp)
            self._seal_path(temp, executable)
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise
        return self._publish(temp, digest, executable)

    def _seal_path(self, path: str, executable: bool) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._seal(fd, executable)
        finally:
            os.close(fd)

    def _publish(self, temp: str, digest: Digest, executable: bool) -> int:
        """Hardlink a complete, verified temp file into objects/; the bytes it adds (0 when
        another thread or process got there first)."""
        target = self.object_path(digest.hash, executable)
        try:
            os.link(temp, target)
            os.unlink(temp)
            return digest.size_bytes
        except FileExistsError:
            # Another thread or process got there first (same bytes), or the file there is
            # damaged (we fetched because it did not match): the verified copy replaces it.
            os.replace(temp, target)
            return 0

    # -- pins, accounting, eviction --------------------------------------------------------

    def _pin(self, wanted: Wanted) -> None:
        with self._pins_lock:
            for (k, executable) in wanted:
                name = f"{'x' if executable else 'r'}/{k.partition('/')[0]}"
                self._pins[name] = self._pins.get(name, 0) + 1

    def _unpin(self, wanted: Wanted) -> None:
        with self._pins_lock:
            for (k, executable) in wanted:
                name = f"{'x' if executable else 'r'}/{k.partition('/')[0]}"
                left = self._pins[name] - 1
                if left:
                    self._pins[name] = left
                else:
                    del self._pins[name]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _read_total(self) -> int:
        data = os.pread(self._lock_fd, _TOTAL.size, 0)
        return _TOTAL.unpack(data)[0] if len(data) == _TOTAL.size else 0

    def _write_total(self, total: int) -> None:
        os.pwrite(self._lock_fd, _TOTAL.pack(max(total, 0)), 0)

    def _account(self, added: int) -> None:
        """Add to the shared total; past max_bytes, evict. The total is an estimate (a crash
        can lose an addition, a race can count one twice) that every eviction's scan makes
        exact again."""
        if not added:
            return
        with self._locked():
            total = self._read_total() + added
            if total > self.max_bytes:
                total = self._evict()
            self._write_total(total)

    def _trim(self) -> None:
        """Back under max_bytes once nothing of a lease is pinned: a blob larger than the
        bound (or pinned files that alone exceeded it) could not be evicted while it was
        being staged, and must not stay until the next insert."""
        with self._locked():
            total = self._read_total()
            if total > self.max_bytes:
                self._write_total(self._evict())

    def _scan(self) -> tuple[list[tuple[float, int, str]], int]:
        """(mtime, size, "r/ab/<hash>") of every object, and their total size."""
        entries: list[tuple[float, int, str]] = []
        total = 0
        for variant in "rx":
            for i in range(256):
                sub = f"{variant}/{i:02x}"
                try:
                    scan = os.scandir(f"{self._objects}/{sub}")
                except FileNotFoundError:
                    continue
                with scan:
                    for entry in scan:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        entries.append((st.st_mtime, st.st_size, f"{sub}/{entry.name}"))
                        total += st.st_size
        return entries, total

    def _evict(self) -> int:
        """Remove the least recently used unpinned objects down to LOW_WATER * max_bytes; the
        total left. Runs with the lock held."""
        entries, total = self._scan()
        target = int(self.max_bytes * LOW_WATER)
        if total <= self.max_bytes:
            return total
        entries.sort()
        with self._pins_lock:
            for _, size, name in entries:
                if total <= target:
                    break
                variant, _, hash_ = name.split("/")
                if f"{variant}/{hash_}" in self._pins:
                    continue
                try:
                    os.unlink(f"{self._objects}/{name}")
                except FileNotFoundError:
                    pass
                total -= size
        return total

    def _remove_dead_temps(self) -> None:
        """Temp directories whose owner is gone (their flock is free): a crash's leftovers."""
        tmp = self.directory / "tmp"
        for entry in os.scandir(tmp):
            path = tmp / entry.name
            if not entry.is_dir(follow_symlinks=False):
                path.unlink(missing_ok=True)
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live LocalCas owns it
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


def _chunks(blobs: list[Digest], limit: int) -> Iterator[list[Digest]]:
    """Groups of about one batch each, so one group's bytes are written out before the next
    group is read."""
    group: list[Digest] = []
    total = 0
    for digest in blobs:
        if group and total + digest.size_bytes > limit:
            yield group
            group, total = [], 0
        group.append(digest)
        total += digest.size_bytes
    if group:
        yield group
