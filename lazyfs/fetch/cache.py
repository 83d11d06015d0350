"""Persistent content-addressed chunk cache, and the store for metadata images.

On-disk layout under the cache root::

    chunks/<hh>/<32 hex>   one file per chunk: its uncompressed bytes, named by xxh3-128 digest
    meta/<hh>/<64 hex>     one file per metadata image, named by sha256 digest
    tmp/                   files being written; published by rename(2), emptied on open
    index                  LRU snapshot (a hint, see below)

``<hh>`` is the first two hex digits of the name (256 fan-out directories per store).

Crash safety: a file appears under ``chunks/`` or ``meta/`` only by an atomic rename of a
fully written temporary file, so a process killed at any moment leaves either the whole
chunk or nothing (plus a stray temporary file, which the next open removes). Every chunk
read is re-hashed (xxh3-128 runs at memory speed, see docs); a mismatch -- a bit flip, a
torn write after a power loss, someone editing the directory -- is reported as a miss and
the file is deleted, so the fetcher refetches. There is deliberately no fsync: after a power
loss the verification turns a torn file into a miss instead of wrong bytes.

The index (size per chunk, in LRU order) lives in memory. On open it is rebuilt from the
directory listing, which is the truth: ``save_index()`` (called periodically by the fetcher
and by ``close()``) writes a snapshot of sizes in LRU order, so that opening needs no stat(2)
for the chunks it lists; chunks written since the snapshot are stat'ed and count as most
recently used (by mtime), listed chunks that are gone are dropped. A lost or damaged snapshot
only costs open time. Snapshot format: magic ``LZCIDX1\n``, u64 count, count records of
(16-byte digest, u64 size), then the xxh3-64 of everything before it; little-endian.

All methods are synchronous and thread-safe: the fetcher may call ``get`` or ``put`` from a
worker thread for large chunks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import shutil
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import xxhash

from lazyfs.layer.chunks import DIGEST_SIZE  # cache keys are chunk digests

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")
_INDEX_MAGIC = b"LZCIDX1\n"
_INDEX_HEADER = struct.Struct("<8sQ")
_INDEX_RECORD = struct.Struct("<16sQ")
_INDEX_TRAILER = struct.Struct("<Q")


class CacheError(Exception):
    """Storing or reading one cache entry failed (ENOSPC, EIO, ...). The cache stays usable."""

    def __init__(self, message: str, *, key: str, errno_: int | None = None):
        super().__init__(f"{message} (entry {key})")
        self.key = key
        self.errno = errno_


def chunk_digest(data: bytes) -> bytes:
    """The content address of a chunk: xxh3-128 of its uncompressed bytes."""
    return xxhash.xxh3_128_digest(data)


def _read_file(path: str, expected_size: int) -> bytes:
    """The whole file; one read(2) when it has the expected size (one more shows if it is longer)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while True:
            part = os.read(fd, expected_size + 1)
            if not part:
                return b"".join(parts) if len(parts) != 1 else parts[0]
            parts.append(part)
    finally:
        os.close(fd)


def _writer_alive(temp_name: str) -> bool:
    """Whether another live process may still be writing this temporary file (named
    ``<key>.<pid>.<thread>.<n>``): e.g. the daemon, while ``lazyfs cache gc`` opens the cache."""
    parts = temp_name.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and set(name) <= _HEX


class ChunkCache:
    """Content-addressed, crash-safe, LRU-bounded chunk store (see module docstring)."""

    def __init__(self, root: str | os.PathLike, limit_bytes: int | None = None):
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        self._chunks_dir = self.root / "chunks"
        self._chunks_prefix = f"{self._chunks_dir}/"
        self._meta_dir = self.root / "meta"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # digest -> size, oldest use first
        self._index_dirty = False
        self._pins: dict[bytes, int] = {}
        self._bytes = 0
        self._tmp_names = itertools.count()
        self._verified_meta: set[str] = set()
        self._hits = self._misses = self._evictions = self._corrupt = 0
        self._put_errors = 0
        self._open()

    # ----------------------------------------------------------------- opening

    def _open(self) -> None:
        for directory in (self._chunks_dir, self._meta_dir, self._tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)  # fan-out directories: on first use
        stray = 0
        with os.scandir(self._tmp_dir) as it:
            for entry in it:
                if not _writer_alive(entry.name):
                    self._remove_quietly(Path(entry.path))
                    stray += 1
        snapshot = self._load_index()
        present: set[bytes] = set()
        unlisted: list[tuple[float, bytes, int]] = []
        with os.scandir(self._chunks_dir) as it:
            fans = [entry for entry in it]
        for fan in fans:
            prefix = fan.name
            if not (_is_hex(prefix, 2) and fan.is_dir(follow_symlinks=False)):
                self._remove_quietly(Path(fan.path))
                stray += 1
                continue
            with os.scandir(fan.path) as it:
                for entry in it:
                    name = entry.name
                    if not (_is_hex(name, 2 * DIGEST_SIZE) and name.startswith(prefix)
                            and entry.is_file(follow_symlinks=False)):
                        self._remove_quietly(Path(entry.path))
                        stray += 1
                        continue
                    digest = bytes.fromhex(name)
                    if digest in snapshot:
                        present.add(digest)
                    else:
                        st = entry.stat(follow_symlinks=False)
                        unlisted.append((st.st_mtime, digest, st.st_size))
        for digest, size in snapshot.items():  # snapshot order is LRU order
            if digest in present:
                self._entries[digest] = size
                self._bytes += size
        unlisted.sort()
        for _, digest, size in unlisted:
            self._entries[digest] = size
            self._bytes += size
        self._index_dirty = bool(unlisted) or len(present) != len(snapshot)
        if stray:
            log.info("cache %s: removed %d stray file(s) left by an interrupted write", self.root, stray)
        log.debug("cache %s: %d chunks, %d bytes", self.root, len(self._entries), self._bytes)
        if self.limit_bytes is not None:
            self.evict_to(self.limit_bytes)

    # ----------------------------------------------------------------- chunks

    def chunk_path(self, digest: bytes) -> Path:
        return Path(self._chunk_file(digest))

    def _chunk_file(self, digest: bytes) -> str:
        # A str path, not pathlib: this is on the hot path of every hit.
        self._check_digest(digest)
        name = digest.hex()
        return f"{self._chunks_prefix}{name[:2]}/{name}"

    def contains(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._entries

    def size_of(self, digest: bytes) -> int | None:
        with self._lock:
            return self._entries.get(digest)

    def get(self, digest: bytes) -> bytes | None:
        """The chunk's verified bytes, or None (absent, vanished, or corrupt and now deleted)."""
        path = self._chunk_file(digest)
        with self._lock:
            size = self._entries.get(digest)
            if size is None:
                self._misses += 1
                return None
        try:
            data = _read_file(path, size)
        except FileNotFoundError:
            with self._lock:
                self._forget_locked(digest)
                self._misses += 1
            return None
        except OSError as e:
            log.warning("cache: reading chunk %s failed (%s); treating it as a miss", digest.hex(), e)
            self._drop_corrupt(digest, path)
            return None
        if len(data) != size or chunk_digest(data) != digest:
            log.warning("cache: chunk %s is corrupt (%d bytes); deleted, it will be refetched",
                        digest.hex(), len(data))
            self._drop_corrupt(digest, path)
            return None
        with self._lock:
            self._hits += 1
            if digest in self._entries:
                self._entries.move_to_end(digest)
                self._index_dirty = True
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        """Publish a chunk whose digest the caller has verified. Raises CacheError on I/O failure.

        The stored entry is never partial: the bytes go to a temporary file that is renamed
        into place only when complete. Storing an existing chunk only refreshes its last use.
        """
        path = self._chunk_file(digest)
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                self._index_dirty = True
                return
        self._write_atomically(Path(path), data, key=digest.hex())
        with self._lock:
            if digest not in self._entries:
                self._entries[digest] = len(data)
                self._bytes += len(data)
                self._index_dirty = True
            if self.limit_bytes is not None and self._bytes > self.limit_bytes:
                self._evict_locked(self.limit_bytes, keep=digest)

    def discard(self, digest: bytes) -> bool:
        """Remove one chunk unless it is pinned. Returns whether it was removed."""
        with self._lock:
            if digest not in self._entries or self._pins.get(digest):
                return False
            self._remove_locked(digest)
            return True

    # ----------------------------------------------------------------- pins and eviction

    def pin(self, digest: bytes) -> None:
        """Protect a chunk (present or about to be) from eviction until the matching unpin."""
        with self._lock:
            self._pins[digest] = self._pins.get(digest, 0) + 1

    def unpin(self, digest: bytes) -> None:
        with self._lock:
            count = self._pins.get(digest, 0)
            if count <= 0:
                raise ValueError(f"chunk {digest.hex()} is not pinned")
            if count == 1:
                del self._pins[digest]
            else:
                self._pins[digest] = count - 1

    @contextlib.contextmanager
    def pinned(self, digest: bytes) -> Iterator[None]:
        self.pin(digest)
        try:
            yield
        finally:
            self.unpin(digest)

    def is_pinned(self, digest: bytes) -> bool:
        with self._lock:
            return self._pins.get(digest, 0) > 0

    def evict_to(self, limit: int) -> int:
        """Evict least recently used unpinned chunks until at most ``limit`` bytes remain.

        Returns the number of chunks evicted; pinned chunks may keep the total above limit.
        """
        with self._lock:
            return self._evict_locked(limit, keep=None)

    def clear(self) -> int:
        """Remove every unpinned chunk; returns how many were removed."""
        return self.evict_to(0)

    def _evict_locked(self, limit: int, keep: bytes | None) -> int:
        victims = []
        excess = self._bytes - limit
        for digest, size in self._entries.items():
            if excess <= 0:
                break
            if digest == keep or self._pins.get(digest):
                continue
            victims.append(digest)
            excess -= size
        for digest in victims:
            self._remove_locked(digest)
        self._evictions += len(victims)
        return len(victims)

    def _remove_locked(self, digest: bytes) -> None:
        self._forget_locked(digest)
        self._remove_quietly(self.chunk_path(digest))

    def _forget_locked(self, digest: bytes) -> None:
        size = self._entries.pop(digest, None)
        if size is not None:
            self._bytes -= size
            self._index_dirty = True

    def _drop_corrupt(self, digest: bytes, path: str) -> None:
        with self._lock:
            self._forget_locked(digest)
            self._corrupt += 1
            self._misses += 1
        self._remove_quietly(Path(path))

    # ----------------------------------------------------------------- index snapshot

    def save_index(self) -> bool:
        """Write the LRU snapshot if anything changed since the last one; returns whether it did.

        Safe to call from a worker thread; the listing is copied under the lock, written outside it.
        """
        with self._lock:
            if not self._index_dirty:
                return False
            records = list(self._entries.items())
            self._index_dirty = False
        body = bytearray(_INDEX_HEADER.pack(_INDEX_MAGIC, len(records)))
        for digest, size in records:
            body += _INDEX_RECORD.pack(digest, size)
        body += _INDEX_TRAILER.pack(xxhash.xxh3_64_intdigest(body))
        try:
            self._write_atomically(self.root / "index", bytes(body), key="index")
        except CacheError:
            with self._lock:
                self._index_dirty = True
            raise
        return True

    def close(self) -> None:
        """Save the index snapshot (failure to do so only costs the next open some time)."""
        try:
            self.save_index()
        except CacheError as e:
            log.info("cache %s: index snapshot not saved: %s", self.root, e)

    def _load_index(self) -> dict[bytes, int]:
        try:
            raw = (self.root / "index").read_bytes()
        except FileNotFoundError:
            return {}
        fixed = _INDEX_HEADER.size + _INDEX_TRAILER.size
        if len(raw) >= fixed:
            magic, count = _INDEX_HEADER.unpack_from(raw)
            body_end = len(raw) - _INDEX_TRAILER.size
            (checksum,) = _INDEX_TRAILER.unpack_from(raw, body_end)
            if (magic == _INDEX_MAGIC and len(raw) == fixed + count * _INDEX_RECORD.size
                    and xxhash.xxh3_64_intdigest(raw[:body_end]) == checksum):
                return dict(_INDEX_RECORD.iter_unpack(raw[_INDEX_HEADER.size:body_end]))
        log.info("cache %s: ignoring a damaged index snapshot; listing sizes with stat", self.root)
        return {}

    # ----------------------------------------------------------------- metadata images

    def meta_file(self, sha256_hex: str) -> Path:
        if not _is_hex(sha256_hex, 64):
            raise ValueError(f"not a lowercase sha256 hex digest: {sha256_hex!r}")
        return self._meta_dir / sha256_hex[:2] / sha256_hex

    def put_meta(self, sha256_hex: str, data: bytes) -> Path:
        """Store a metadata image after checking its sha256; returns its path."""
        path = self.meta_file(sha256_hex)
        if hashlib.sha256(data).hexdigest() != sha256_hex:
            raise CacheError("metadata bytes do not match their sha256", key=sha256_hex)
        if sha256_hex not in self._verified_meta or not path.exists():
            self._write_atomically(path, data, key=sha256_hex)
            self._verified_meta.add(sha256_hex)
        return path

    def meta_path(self, sha256_hex: str) -> Path | None:
        """Path of a stored metadata image, verified once per process; None if absent or corrupt."""
        path = self.meta_file(sha256_hex)
        if sha256_hex in self._verified_meta and path.exists():
            return path
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            return None
        if digest.hexdigest() != sha256_hex:
            log.warning("cache: metadata image %s is corrupt; deleted", sha256_hex)
            self._remove_quietly(path)
            return None
        self._verified_meta.add(sha256_hex)
        return path

    # ----------------------------------------------------------------- stats and helpers

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "bytes": self._bytes,
                "entries": len(self._entries),
                "evictions": self._evictions,
                "corrupt": self._corrupt,
                "put_errors": self._put_errors,
                "pinned": len(self._pins),
                "limit_bytes": -1 if self.limit_bytes is None else self.limit_bytes,
            }

    def _write_atomically(self, path: Path, data: bytes, *, key: str) -> None:
        tmp = self._tmp_dir / f"{key}.{os.getpid()}.{threading.get_ident()}.{next(self._tmp_names)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            finally:
                os.close(fd)
            try:
                os.rename(tmp, path)
            except FileNotFoundError:  # the fan-out directory's first entry
                path.parent.mkdir(exist_ok=True)
                os.rename(tmp, path)
        except OSError as e:
            self._remove_quietly(tmp)
            with self._lock:
                self._put_errors += 1
            what = errno.errorcode.get(e.errno or 0, str(e.errno))
            raise CacheError(f"cannot store cache entry: {what}: {e.strerror}",
                             key=key, errno_=e.errno) from e

    @staticmethod
    def _remove_quietly(path: Path) -> None:
        try:
            path.unlink()
        except IsADirectoryError:
            shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.info("cache: cannot remove %s: %s", path.name, e)

    @staticmethod
    def _check_digest(digest: bytes) -> None:
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise ValueError(f"chunk digest must be {DIGEST_SIZE} bytes, got {digest!r}")
