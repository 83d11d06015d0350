"""A full cache disk on a real mount: reads are served anyway (from the verified bytes in
memory), the cache holds only whole, correct chunks, and it fills again once space returns.

The cache lives on a tiny tmpfs that is filled up before the mount starts, so the metadata
cannot be cached either (the attach keeps it in memory).
"""

from __future__ import annotations

import errno
import os
import random

import pytest

from lazyfs.fetch.cache import chunk_digest
from tests.fixtures.common import require_root
from tests.fixtures.images import build_image, directory, file
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import lazy_mount
from tests.fixtures.tmpfs import tiny_tmpfs  # noqa: F401 (fixture)

CHUNK = 16384
rng = random.Random(13)
FILES = {f"d/f{i}": rng.randbytes(4 * CHUNK) for i in range(8)}  # 32 distinct chunks, 512 KiB (the tmpfs has 1 MiB)


@pytest.fixture(scope="module")
def image(registry):
    require_root()
    entries = [directory("d"), *(file(name, data) for name, data in FILES.items())]
    push_to_registry(registry, "t/cache-full", convert_image(build_image([entries]), chunk_size=CHUNK))
    return f"{registry.host}/t/cache-full:v1"


def fill(directory) -> int:
    """Write zeros into directory/filler until the filesystem is full; the bytes written."""
    written = 0
    with open(directory / "filler", "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(bytes(64 << 10))
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return written


def cached_chunks(cache_dir) -> dict[str, bytes]:
    chunks = {}
    for dirpath, _dirs, names in os.walk(cache_dir / "chunks"):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                chunks[name] = f.read()
    return chunks


def drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_full_cache_disk_serves_reads_and_recovers(image, tiny_tmpfs, tmp_path):
    cache_dir = tiny_tmpfs / "cache"
    for sub in ("chunks", "meta", "tmp"):
        (cache_dir / sub).mkdir(parents=True)
    assert fill(tiny_tmpfs) > 0
    names = sorted(FILES)
    first, rest = names[:4], names[4:]
    with lazy_mount(tmp_path / "mnt", image, run_dir=tmp_path / "run", cache_dir=cache_dir) as mount:
        for name in first:  # the disk is full: every store fails, every read still succeeds
            assert (mount.path / name).read_bytes() == FILES[name]
        stats = mount.stats()
        assert stats["fetch"]["cache_put_errors"] > 0 and stats["fetch"]["failed_chunks"] == 0
        assert stats["cache"]["entries"] == len(cached_chunks(cache_dir))

        (tiny_tmpfs / "filler").unlink()  # space returns
        for name in rest:
            assert (mount.path / name).read_bytes() == FILES[name]
        for name in first:  # still right (from memory or fetched again)
            drop_page_cache(mount.path / name)
            assert (mount.path / name).read_bytes() == FILES[name]
        errors_before = stats["fetch"]["cache_put_errors"]
        stats = mount.stats()
        assert stats["fetch"]["cache_put_errors"] == errors_before
        chunks = cached_chunks(cache_dir)
        assert {chunk_digest(FILES[name][i:i + CHUNK]).hex() for name in rest
                for i in range(0, len(FILES[name]), CHUNK)} <= set(chunks)
        assert len(chunks) == stats["cache"]["entries"]
        assert all(chunk_digest(data).hex() == name for name, data in chunks.items())  # whole and correct
        assert os.listdir(cache_dir / "tmp") == []  # no partial write left behind
