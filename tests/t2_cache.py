"""ChunkCache: content addressing, LRU bounds, pins, crash safety, corruption, ENOSPC."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lazyfs.fetch.cache import CacheError, ChunkCache, chunk_digest
from tests.fixtures.tmpfs import tiny_tmpfs  # noqa: F401 (fixture)


def make_chunk(seed: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = (seed.to_bytes(4, "little") * (size // 4 + 1))[:size]
    return chunk_digest(data), data


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "chunks").glob("*/*") if p.is_file())


def test_put_get_roundtrip_and_layout(tmp_path):
    cache = ChunkCache(tmp_path)
    digest, data = make_chunk(1)
    assert cache.get(digest) is None
    cache.put(digest, data)
    assert cache.contains(digest)
    assert cache.get(digest) == data
    hexname = digest.hex()
    assert (tmp_path / "chunks" / hexname[:2] / hexname).read_bytes() == data
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["bytes"]) == (1, 1, 1, 1000)


def test_same_chunk_is_stored_once(tmp_path):
    cache = ChunkCache(tmp_path)
    digest, data = make_chunk(7)
    cache.put(digest, data)
    cache.put(digest, data)  # e.g. the same chunk in a second layer
    assert cache.stats()["entries"] == 1
    assert cache.stats()["bytes"] == len(data)
    assert len(chunk_files(tmp_path)) == 1


def test_bad_digest_argument_is_rejected(tmp_path):
    cache = ChunkCache(tmp_path)
    with pytest.raises(ValueError):
        cache.put(b"short", b"x")
    with pytest.raises(ValueError):
        cache.get("00" * 16)


def test_lru_eviction_order(tmp_path):
    cache = ChunkCache(tmp_path, limit_bytes=3000)
    a, b, c, d = (make_chunk(i) for i in range(4))
    for digest, data in (a, b, c):
        cache.put(digest, data)
    assert cache.get(a[0]) == a[1]  # a is now more recently used than b
    cache.put(*d)
    assert not cache.contains(b[0])
    assert all(cache.contains(x[0]) for x in (a, c, d))
    assert cache.stats()["evictions"] == 1
    assert cache.stats()["bytes"] == 3000
    assert len(chunk_files(tmp_path)) == 3


def test_pinned_chunks_are_never_evicted(tmp_path):
    cache = ChunkCache(tmp_path, limit_bytes=2000)
    a, b, c = (make_chunk(i) for i in range(3))
    cache.put(*a)
    cache.put(*b)
    cache.pin(a[0])
    with cache.pinned(b[0]):
        cache.put(*c)  # over the limit, but a and b are pinned and c is the one just stored
        assert all(cache.contains(x[0]) for x in (a, b, c))
        assert cache.evict_to(0) == 1  # only c could go
        assert cache.contains(a[0]) and cache.contains(b[0]) and not cache.contains(c[0])
        assert cache.clear() == 0
    cache.unpin(a[0])
    assert not cache.is_pinned(a[0])
    with pytest.raises(ValueError):
        cache.unpin(a[0])
    assert cache.clear() == 2
    assert cache.stats()["entries"] == 0 and chunk_files(tmp_path) == []


def test_pin_before_put_protects_the_new_chunk(tmp_path):
    cache = ChunkCache(tmp_path, limit_bytes=1000)
    a, b = make_chunk(1), make_chunk(2)
    cache.pin(a[0])
    cache.put(*a)
    cache.put(*b)  # a is pinned, so b stays too (over the limit) until a is released
    assert cache.contains(a[0]) and cache.contains(b[0])
    cache.unpin(a[0])
    cache.evict_to(1000)
    assert not cache.contains(a[0]) and cache.contains(b[0])


def test_index_is_rebuilt_on_open_with_lru_order_from_mtime(tmp_path):
    cache = ChunkCache(tmp_path)
    chunks = [make_chunk(i) for i in range(5)]
    for digest, data in chunks:
        cache.put(digest, data)
    # Make chunk 0 the most recently used on disk, the others in order.
    now = time.time()
    for age, (digest, _) in zip([0, 50, 40, 30, 20], chunks):
        os.utime(cache.chunk_path(digest), (now - age, now - age))
    reopened = ChunkCache(tmp_path, limit_bytes=3000)
    assert reopened.stats()["entries"] == 3
    assert reopened.stats()["bytes"] == 3000
    kept = [i for i, (digest, _) in enumerate(chunks) if reopened.contains(digest)]
    assert kept == [0, 3, 4]


def test_open_removes_stray_temporary_and_foreign_files(tmp_path):
    cache = ChunkCache(tmp_path)
    digest, data = make_chunk(3)
    cache.put(digest, data)
    (tmp_path / "tmp" / "half-written.123").write_bytes(b"partial")
    (tmp_path / "chunks" / "ab").mkdir(exist_ok=True)
    (tmp_path / "chunks" / "ab" / "not-a-digest").write_bytes(b"x")
    (tmp_path / "chunks" / "ab" / ("cd" + "0" * 30)).write_bytes(b"x")  # wrong fan-out dir
    (tmp_path / "chunks" / "not-a-fan").mkdir()
    reopened = ChunkCache(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert chunk_files(tmp_path) == [cache.chunk_path(digest)]
    assert not (tmp_path / "chunks" / "not-a-fan").exists()
    assert reopened.get(digest) == data


@pytest.mark.expected_log
def test_corrupt_entry_is_a_miss_and_is_deleted(tmp_path):
    cache = ChunkCache(tmp_path)
    digest, data = make_chunk(5)
    cache.put(digest, data)
    path = cache.chunk_path(digest)
    flipped = bytearray(data)
    flipped[500] ^= 1
    path.write_bytes(bytes(flipped))
    assert cache.get(digest) is None
    assert not path.exists() and not cache.contains(digest)
    assert cache.stats()["corrupt"] == 1
    # A torn (truncated) file found on open is caught the same way.
    cache.put(digest, data)
    path.write_bytes(data[:10])
    reopened = ChunkCache(tmp_path)
    assert reopened.get(digest) is None
    assert reopened.stats()["corrupt"] == 1
    reopened.put(digest, data)
    assert reopened.get(digest) == data


def test_vanished_file_is_a_miss(tmp_path):
    cache = ChunkCache(tmp_path)
    digest, data = make_chunk(6)
    cache.put(digest, data)
    cache.chunk_path(digest).unlink()
    assert cache.get(digest) is None
    assert not cache.contains(digest)


_WRITER = textwrap.dedent("""
    import os, sys
    from lazyfs.fetch.cache import ChunkCache, chunk_digest
    cache = ChunkCache(sys.argv[1])
    print("ready", flush=True)
    for i in range(100000):
        data = os.urandom(4096) * (256 + i % 512)   # 1..3 MiB: the kill lands mid-write
        cache.put(chunk_digest(data), data)
""")


def test_kill_9_at_any_moment_leaves_only_whole_chunks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    interrupted_writes = 0
    for round_ in range(8):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                                 stdout=subprocess.PIPE, env=env)
        try:
            assert child.stdout.readline() == b"ready\n"
            time.sleep(0.05 + 0.03 * round_)  # vary where in a write the kill lands
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=10)
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        interrupted_writes += len(list((tmp_path / "tmp").iterdir()))
        cache = ChunkCache(tmp_path)
        assert list((tmp_path / "tmp").iterdir()) == []
        files = chunk_files(tmp_path)
        assert files and cache.stats()["entries"] == len(files)
        for path in files:
            data = path.read_bytes()
            assert chunk_digest(data).hex() == path.name
            assert cache.get(bytes.fromhex(path.name)) == data
        assert cache.stats()["corrupt"] == 0
    assert interrupted_writes > 0, "expected some kill to interrupt a write"


def test_enospc_raises_cache_error_and_cache_keeps_working(tiny_tmpfs):
    cache = ChunkCache(tiny_tmpfs / "cache")
    stored = []
    with pytest.raises(CacheError) as excinfo:
        for i in range(10):
            digest, data = make_chunk(i, 300 * 1024)
            cache.put(digest, data)
            stored.append((digest, data))
    assert excinfo.value.errno == errno.ENOSPC
    assert excinfo.value.key == digest.hex()
    assert 1 <= len(stored) < 4
    assert not cache.contains(digest)
    assert list((tiny_tmpfs / "cache" / "tmp").iterdir()) == []  # no half-written file left
    assert cache.stats()["put_errors"] == 1
    for stored_digest, stored_data in stored:
        assert cache.get(stored_digest) == stored_data
    cache.evict_to(0)
    cache.put(digest, data)
    assert cache.get(digest) == data
    assert ChunkCache(tiny_tmpfs / "cache").stats()["entries"] == 1


def test_metadata_store(tmp_path):
    cache = ChunkCache(tmp_path)
    image = b"\xe2\xe1\xf5\xe0" + bytes(8188)
    sha = hashlib.sha256(image).hexdigest()
    assert cache.meta_path(sha) is None
    with pytest.raises(CacheError):
        cache.put_meta(sha, image + b"x")
    path = cache.put_meta(sha, image)
    assert path.read_bytes() == image
    assert ChunkCache(tmp_path).meta_path(sha) == path
    with pytest.raises(ValueError):
        cache.meta_path("../etc/passwd")


@pytest.mark.expected_log
def test_corrupt_metadata_image_is_not_served(tmp_path):
    cache = ChunkCache(tmp_path)
    image = bytes(range(256)) * 64
    sha = hashlib.sha256(image).hexdigest()
    path = cache.put_meta(sha, image)
    path.write_bytes(image[:-1] + b"\0")
    assert ChunkCache(tmp_path).meta_path(sha) is None
    assert not path.exists()


def test_index_snapshot_keeps_lru_order_and_tracks_changes(tmp_path):
    cache = ChunkCache(tmp_path)
    chunks = [make_chunk(i) for i in range(6)]
    for digest, data in chunks:
        cache.put(digest, data)
    cache.get(chunks[0][0])  # LRU order now 1 2 3 4 5 0
    assert cache.save_index() and not cache.save_index()  # nothing changed in between
    cache.discard(chunks[1][0])  # listed in the snapshot, gone from the directory
    added = make_chunk(99)
    cache.put(*added)  # written after the snapshot: must be found by the listing
    reopened = ChunkCache(tmp_path, limit_bytes=3000)
    assert reopened.stats()["entries"] == 3
    kept = {digest for digest, _ in chunks + [added] if reopened.contains(digest)}
    assert kept == {chunks[5][0], chunks[0][0], added[0]}  # 2, 3, 4 were least recently used
    reopened.close()
    assert ChunkCache(tmp_path).stats()["entries"] == 3


def test_damaged_index_snapshot_is_ignored(tmp_path):
    cache = ChunkCache(tmp_path)
    chunks = [make_chunk(i) for i in range(3)]
    for digest, data in chunks:
        cache.put(digest, data)
    cache.close()
    index = tmp_path / "index"
    raw = bytearray(index.read_bytes())
    raw[20] ^= 0xFF  # a size in the first record; the checksum no longer matches
    index.write_bytes(bytes(raw))
    reopened = ChunkCache(tmp_path)
    assert reopened.stats()["bytes"] == 3000
    assert all(reopened.get(digest) == data for digest, data in chunks)
    index.write_bytes(b"garbage")
    assert ChunkCache(tmp_path).stats()["entries"] == 3


def test_open_keeps_temporary_files_of_live_writers(tmp_path):
    ChunkCache(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = tmp_path / "tmp" / f"{'ab' * 16}.{child.pid}.1.0"
        dead = tmp_path / "tmp" / f"{'cd' * 16}.{os.getpid()}.1.0"  # ours: we are not writing it
        live.write_bytes(b"being written by another process")
        dead.write_bytes(b"left over")
        ChunkCache(tmp_path)
        assert live.exists() and not dead.exists()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    ChunkCache(tmp_path)
    assert not live.exists()
