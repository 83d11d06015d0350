"""`lazyfs cache` against a real cache directory."""

import json
import os

from lazyfs.fetch.cache import ChunkCache, chunk_digest
from tests.fixtures.lazymount import lazyfs_cli


def test_cache_stats_gc_clear(tmp_path):
    cache = ChunkCache(tmp_path / "cache")
    for i in range(10):
        data = os.urandom(1000 + i)
        cache.put(chunk_digest(data), data)
    stats = json.loads(lazyfs_cli("cache", "stats", "--json", "--cache-dir", str(tmp_path / "cache")).stdout)
    assert stats["entries"] == 10 and stats["bytes"] == sum(1000 + i for i in range(10))
    config = tmp_path / "lazyfs.toml"
    config.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\nsize = "5K"\n')
    gc = json.loads(lazyfs_cli("cache", "gc", "--json", "--config", str(config)).stdout)
    assert gc["bytes"] <= 5 * 1024 and gc["evicted"] >= 5 and gc["limit_bytes"] == 5120
    cleared = json.loads(lazyfs_cli("cache", "clear", "--json", "--cache-dir", str(tmp_path / "cache")).stdout)
    assert cleared["entries"] == 0 and cleared["bytes"] == 0
    assert lazyfs_cli("cache", "gc", "--cache-dir", str(tmp_path / "cache"), check=False).returncode == 2
