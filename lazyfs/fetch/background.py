"""Background fill: fetch every chunk of a layer at the lowest priority, so it becomes fully local.

One task per daemon works through the layers it is given, one after another, in blob
order. Before each layer (and between batches) it waits until the fetcher is idle, so a
trace prefetch finishes first and on-demand reads are never queued behind a batch for long
(they overtake queued background items anyway: Priority.BACKGROUND is the lowest). A batch
is a run of uncached chunks of about ``batch_bytes`` stored bytes; with a rate limit, a
batch starts only when the bytes sent so far fit the rate since the layer's fill began, so
at any time t the layer's fill has requested at most ``rate * t + batch`` bytes.

Chunks already in the cache (another image, an earlier mount, the prefetch) are skipped
and counted as such. A layer whose chunks do not fit in the cache's size limit is not
filled at all (state ``too-large``): it would only evict its own first chunks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from lazyfs.fetch.scheduler import BlobSource, ChunkFetcher, Priority
from lazyfs.layer.chunks import ChunkRef

log = logging.getLogger(__name__)

UNLIMITED_BATCH = 32 << 20
MIN_BATCH = 256 << 10
# With a rate limit a batch is this many seconds of the rate: small enough for a smooth rate.
BATCH_SECONDS = 0.25


@dataclass
class FillJob:
    layer: str  # the attached layer's name, for messages
    source: BlobSource
    refs: list[ChunkRef]  # each stored chunk once, in blob order
    rate: int | None  # stored bytes per second; None: as fast as the fetcher goes
    state: str = "queued"  # queued, running, done, failed, too-large (than the cache)
    chunks_requested: int = 0
    chunks_cached: int = 0  # were already in the cache
    bytes_requested: int = 0
    started: float | None = None  # trio clock
    finished: float | None = None

    @property
    def stored_bytes(self) -> int:
        return sum(ref.stored_length for ref in self.refs)

    def progress(self) -> dict:
        seconds = None
        if self.started is not None:
            seconds = (self.finished if self.finished is not None else trio.current_time()) - self.started
        return {"layer": self.layer, "state": self.state, "rate": self.rate,
                "chunks": len(self.refs), "chunks_requested": self.chunks_requested,
                "chunks_cached": self.chunks_cached, "bytes": self.stored_bytes,
                "bytes_requested": self.bytes_requested, "seconds": seconds}


def unique_refs(refs: Sequence[ChunkRef]) -> list[ChunkRef]:
    """Each stored chunk once (a layer can point at one stored chunk many times), by offset."""
    by_offset: dict[int, ChunkRef] = {}
    for ref in refs:
        by_offset.setdefault(ref.offset, ref)
    return [by_offset[offset] for offset in sorted(by_offset)]


class BackgroundFill:
    def __init__(self, fetcher: ChunkFetcher):
        self.fetcher = fetcher
        self.jobs: list[FillJob] = []
        self._send, self._receive = trio.open_memory_channel(math.inf)

    def add(self, layer: str, source: BlobSource, refs: Sequence[ChunkRef], rate: int | None) -> FillJob:
        if rate is not None and rate <= 0:
            raise ValueError("the background rate must be positive")
        job = FillJob(layer, source, unique_refs([r for r in refs if r.digest is not None]), rate)
        self.jobs.append(job)
        self._send.send_nowait(job)
        return job

    def progress(self) -> dict:
        jobs = [job.progress() for job in self.jobs]
        return {
            "layers": jobs,
            "chunks": sum(j["chunks"] for j in jobs),
            "chunks_done": sum(j["chunks_requested"] + j["chunks_cached"] for j in jobs),
            "chunks_cached": sum(j["chunks_cached"] for j in jobs),
            "bytes": sum(j["bytes"] for j in jobs),
            "bytes_requested": sum(j["bytes_requested"] for j in jobs),
            "done": all(job.state in ("done", "failed", "too-large") for job in self.jobs),
        }

    async def run(self) -> None:
        async for job in self._receive:
            try:
                await self._fill(job)
            except Exception as e:  # a broken layer must not stop the fill of the others
                job.state = "failed"
                job.finished = trio.current_time()
                log.info("background fetch of %s stopped: %s: %s", job.layer, type(e).__name__, e)

    async def _fill(self, job: FillJob) -> None:
        await self.fetcher.wait_idle()
        cache = self.fetcher.cache
        job.started = trio.current_time()
        limit = cache.limit_bytes
        if limit is not None and sum(ref.length for ref in job.refs) > limit:
            # It would evict its own first chunks (and everything else) to make room.
            job.state = "too-large"
            job.finished = job.started
            log.info("no background fetch of %s: it is larger than the cache (%d bytes)", job.layer, limit)
            return
        job.state = "running"
        log.info("background fetch of %s: %d chunks, %d bytes, rate %s", job.layer, len(job.refs),
                 job.stored_bytes, job.rate or "unlimited")
        batch_limit = UNLIMITED_BATCH if job.rate is None else max(MIN_BATCH, int(job.rate * BATCH_SECONDS))
        index = 0
        while index < len(job.refs):
            batch: list[ChunkRef] = []
            size = 0
            while index < len(job.refs) and size < batch_limit:
                ref = job.refs[index]
                index += 1
                if cache.contains(ref.digest):  # type: ignore[arg-type]
                    job.chunks_cached += 1
                    continue
                batch.append(ref)
                size += ref.stored_length
            if not batch:
                continue
            if job.rate is not None:
                await trio.sleep_until(job.started + job.bytes_requested / job.rate)
            self.fetcher.enqueue(job.source, batch, Priority.BACKGROUND)
            job.bytes_requested += size
            await self.fetcher.wait_idle()
            job.chunks_requested += len(batch)
        job.state = "done"
        job.finished = trio.current_time()
        log.info("background fetch of %s done: %d chunks fetched, %d already cached", job.layer,
                 job.chunks_requested, job.chunks_cached)
