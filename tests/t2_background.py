"""BackgroundFill on trio's mock clock over an in-memory blob: order, rate bound, cache skips."""

from __future__ import annotations

import pytest
import trio

from lazyfs.fetch.background import MIN_BATCH, BackgroundFill
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.scheduler import ChunkFetcher, Priority
from tests.t2_fetch import MemorySource, build_blob

CHUNK = 64 << 10


async def _run_fill(cache: ChunkCache, refs, source, rate, *, prefetch=()) -> tuple[BackgroundFill, ChunkFetcher]:
    async with ChunkFetcher(cache) as fetcher:
        fill = BackgroundFill(fetcher)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill.run)
            if prefetch:
                fetcher.enqueue(source, list(prefetch), Priority.PREFETCH)
            fill.add("layer", source, refs, rate)
            while not fill.progress()["done"]:
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    return fill, fetcher


async def test_fill_fetches_every_chunk_within_the_rate_after_the_prefetch(tmp_path, autojump_clock):
    blob, refs, datas = build_blob([CHUNK] * 40, compress=False)
    source = MemorySource(blob)
    cache = ChunkCache(tmp_path / "cache")
    rate = 128 << 10  # slower than the source (256 KiB batches, 1 s a request): the pacing shows
    fill, fetcher = await _run_fill(cache, refs + refs[:3], source, rate, prefetch=refs[30:32])
    job = fill.jobs[0]
    assert job.state == "done" and len(job.refs) == 40
    assert all(cache.contains(ref.digest) for ref in refs)
    # The prefetch went first; the fill skipped what it had cached.
    assert job.chunks_cached == 2 and job.chunks_requested == 38
    assert fetcher.stats.done[Priority.BACKGROUND] == 38
    fill_requests = [(t, length) for t, offset, length in source.requests if offset not in (refs[30].offset,)]
    started = job.started
    sent = 0
    for t, length in sorted(fill_requests):
        assert t >= started
        sent += length
        # Requested by time t: at most the rate since the start plus one batch.
        assert sent <= rate * (t - started) + max(MIN_BATCH, rate // 4) + CHUNK
    # ... and not much faster than the rate either: the fill paces itself, it is not just slow.
    assert job.finished - started >= (sent - max(MIN_BATCH, rate // 4)) / rate


async def test_fill_skips_a_layer_larger_than_the_cache(tmp_path, autojump_clock):
    blob, refs, _ = build_blob([CHUNK] * 8, compress=False)
    source = MemorySource(blob)
    cache = ChunkCache(tmp_path / "cache", 4 * CHUNK)
    fill, _ = await _run_fill(cache, refs, source, None)
    assert fill.jobs[0].state == "too-large" and source.requests == []


def test_rate_must_be_positive(tmp_path):
    async def main():
        async with ChunkFetcher(ChunkCache(tmp_path / "cache")) as fetcher:
            with pytest.raises(ValueError):
                BackgroundFill(fetcher).add("layer", MemorySource(b""), [], 0)

    trio.run(main)
