"""ChunkFetcher scheduling logic on trio's mock clock, over in-memory blob sources.

The in-memory source is a test double for fault injection and request recording; the real
file and HTTP sources are tested in t4_sources.py.
"""

import errno
import resource
import tempfile

import pytest
import trio
import trio.testing
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.fetch import scheduler
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.scheduler import ChunkFetcher, FetchError, Priority, RetryPolicy
from lazyfs.layer.chunks import ChunkCorrupt, ChunkRef, decode_chunk
from lazyfs.fetch.sources import SourceError
from tests.fixtures.tmpfs import tiny_tmpfs  # noqa: F401 (fixture)

REQUEST_TIME = 1.0  # seconds each in-memory request takes (on the mock clock, in most tests)


class MemorySource:
    """A blob in memory that records every range request and can inject faults."""

    def __init__(self, blob: bytes, name: str = "mem blob", host: str = "mem-host"):
        self.blob = blob
        self.name = name
        self.host = host
        self.requests: list[tuple[float, int, int]] = []  # (start time, offset, length)
        self.faults: list = []  # consumed one per request: an exception, or a bytes mangler

    async def read_range(self, offset: int, length: int) -> bytes:
        self.requests.append((trio.current_time(), offset, length))
        await trio.sleep(REQUEST_TIME)
        fault = self.faults.pop(0) if self.faults else None
        if isinstance(fault, BaseException):
            raise fault
        data = self.blob[offset:offset + length]
        return fault(data) if fault is not None else data

    def ranges(self) -> list[tuple[int, int]]:
        return [(offset, length) for _, offset, length in self.requests]


class SharedLink:
    """One link for several streams: pieces cross it one at a time, in turn (trio.Lock is
    fair), at ``rate`` bytes per second, so concurrent responses share its bandwidth."""

    def __init__(self, rate: float):
        self.rate = rate
        self.lock = trio.Lock()

    async def send(self, nbytes: int) -> None:
        async with self.lock:
            await trio.sleep(nbytes / self.rate)


class StreamingMemorySource(MemorySource):
    """A MemorySource that answers in pieces (``iter_range``) at ``rate`` bytes per second after
    ``latency`` seconds, like a response arriving over a link. An exception fault is raised
    half-way through the body; ``ends`` records (time, offset, bytes sent) when each stops."""

    def __init__(self, blob: bytes, *, rate: float = 1 << 20, latency: float = 0.02,
                 piece: int = 16 << 10, link: SharedLink | None = None, **kwargs):
        super().__init__(blob, **kwargs)
        self.rate, self.latency, self.piece, self.link = rate, latency, piece, link
        self.ends: list[tuple[float, int, int]] = []

    async def iter_range(self, offset: int, length: int):
        self.requests.append((trio.current_time(), offset, length))
        fault = self.faults.pop(0) if self.faults else None
        data = self.blob[offset:offset + length]
        if fault is not None and not isinstance(fault, BaseException):
            data = fault(data)
        sent = 0
        try:
            await trio.sleep(self.latency)
            while sent < len(data):
                if isinstance(fault, BaseException) and sent >= len(data) // 2:
                    raise fault
                piece = data[sent:sent + self.piece]
                if self.link is not None:
                    await self.link.send(len(piece))
                else:
                    await trio.sleep(len(piece) / self.rate)
                sent += len(piece)
                yield piece
        finally:
            self.ends.append((trio.current_time(), offset, sent))


def build_blob(sizes, *, gap: int = 0, compress: bool = True, seed: int = 0):
    """A blob of chunks (zstd frames or plain), ``gap`` filler bytes between them."""
    blob = bytearray()
    refs, datas = [], []
    compressor = zstandard.ZstdCompressor(level=1)
    for i, size in enumerate(sizes):
        data = bytes((seed * 131 + i * 7 + j) % 251 for j in range(64)) * (size // 64) + b"x" * (size % 64)
        stored = compressor.compress(data) if compress else data
        refs.append(ChunkRef(len(blob), len(stored), size, xxhash.xxh3_128_digest(data),
                             "zstd" if compress else "none"))
        datas.append(data)
        blob += stored + bytes(gap)
    return bytes(blob), refs, datas


@pytest.fixture
def cache(tmp_path):
    return ChunkCache(tmp_path / "cache")


async def test_single_flight_many_waiters_one_request(cache, autojump_clock):
    blob, refs, datas = build_blob([4096])
    source = MemorySource(blob)
    results = []
    async with ChunkFetcher(cache) as fetcher:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                async def reader():
                    results.append(await fetcher.get(source, refs))
                nursery.start_soon(reader)
    assert source.ranges() == [(refs[0].offset, refs[0].stored_length)]
    assert results == [datas] * 10
    assert fetcher.stats.misses == 1 and fetcher.stats.joined == 9
    assert cache.get(refs[0].digest) == datas[0]
    assert cache.stats()["pinned"] == 0


async def test_second_read_is_a_cache_hit(cache, autojump_clock):
    blob, refs, datas = build_blob([1000, 2000])
    source = MemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        assert await fetcher.get(source, refs) == datas
        assert await fetcher.get(source, refs[::-1]) == datas[::-1]
    assert len(source.requests) == 1
    assert fetcher.stats.hits == 2 and fetcher.stats.misses == 2


async def test_same_chunk_in_two_sources_is_fetched_once(cache, autojump_clock):
    blob, refs, datas = build_blob([3000])
    first, second = MemorySource(blob, name="layer a"), MemorySource(b"pad" + blob, name="layer b")
    moved = ChunkRef(refs[0].offset + 3, refs[0].stored_length, refs[0].length, refs[0].digest, "zstd")
    async with ChunkFetcher(cache) as fetcher:
        assert await fetcher.get(first, refs) == datas
        assert await fetcher.get(second, [moved]) == datas
    assert len(first.requests) == 1 and second.requests == []


async def test_prefetch_requests_are_small_and_few_bytes_are_in_flight(cache, autojump_clock):
    """Prefetch chunks reach waiters only when their request completes: a long contiguous
    prefetch goes out as requests of at most background_coalesce bytes, with at most
    background_window bytes in flight, in queue order, so the first chunks come first."""
    blob, refs, datas = build_blob([256 << 10] * 24, compress=False)
    source = MemorySource(blob)
    async with ChunkFetcher(cache, background_coalesce=1 << 20, background_window=2 << 20) as fetcher:
        fetcher.enqueue(source, refs, Priority.PREFETCH)
        await fetcher.wait_idle()
        on_demand = await fetcher.get(source, refs[:1])
    assert on_demand == datas[:1]
    assert all(length <= 1 << 20 for _, _, length in source.requests)
    assert sum(length for _, _, length in source.requests) == len(blob)
    by_start: dict[float, int] = {}
    for started, _, length in source.requests:
        by_start[started] = by_start.get(started, 0) + length
    assert max(by_start.values()) <= 2 << 20  # each request takes REQUEST_TIME: one wave at a time
    waves = [offset for _, offset, _ in sorted(source.requests)]  # by start time, then offset
    assert waves == sorted(waves)  # earlier queue positions never wait for later ones
    assert len(source.requests) == 6


async def test_on_demand_reads_still_coalesce_to_max_coalesce(cache, autojump_clock):
    blob, refs, datas = build_blob([256 << 10] * 24, compress=False)
    source = MemorySource(blob)
    async with ChunkFetcher(cache, background_coalesce=1 << 20) as fetcher:
        assert await fetcher.get(source, refs) == datas
    assert source.ranges() == [(0, len(blob))]


async def test_adjacent_chunks_coalesce_up_to_the_bound(cache, autojump_clock):
    blob, refs, datas = build_blob([64 << 10] * 20, compress=False)
    source = MemorySource(blob)
    async with ChunkFetcher(cache, max_coalesce=256 << 10) as fetcher:
        assert await fetcher.get(source, refs) == datas
    assert sorted(source.ranges()) == [(i * (256 << 10), 256 << 10) for i in range(5)]
    assert fetcher.stats.coalesced_chunks == 15
    assert all(start == 0.0 for start, _, _ in source.requests)  # 5 requests in parallel


async def test_small_gaps_merge_large_gaps_split(cache, autojump_clock):
    blob, refs, datas = build_blob([1000] * 4, gap=100, compress=False)
    source = MemorySource(blob)
    async with ChunkFetcher(cache, max_gap=100) as fetcher:
        assert await fetcher.get(source, refs) == datas
    assert source.ranges() == [(0, refs[-1].end)]

    blob, refs, datas = build_blob([1000] * 4, gap=101, compress=False, seed=1)
    source = MemorySource(blob, name="other")
    async with ChunkFetcher(cache, max_gap=100) as fetcher:
        assert await fetcher.get(source, refs) == datas
    assert sorted(source.ranges()) == [(r.offset, r.stored_length) for r in refs]


async def test_on_demand_promotes_queued_prefetch_and_jumps_the_queue(cache, autojump_clock):
    # Chunks far apart so that nothing coalesces; one request at a time.
    blob, refs, datas = build_blob([1000] * 6, gap=1 << 20, compress=False)
    source = MemorySource(blob)
    a, b, c, d, e, x = refs
    async with ChunkFetcher(cache, per_host_concurrency=1) as fetcher:
        fetcher.enqueue(source, [a, b, c, d, e], Priority.PREFETCH)
        await trio.sleep(0.5)  # a is in flight
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.get, source, [d])
            nursery.start_soon(fetcher.get, source, [x])
        # d (promoted) and x (new on-demand) were fetched right after a, before b and c.
        assert trio.current_time() == pytest.approx(3.0)
        await fetcher.wait_idle()
    order = [offset for _, offset, _ in source.requests]
    assert order == [a.offset, d.offset, x.offset, b.offset, c.offset, e.offset]
    assert fetcher.stats.promotions == 1
    assert fetcher.stats.done[Priority.PREFETCH] == 4
    assert fetcher.stats.done[Priority.ON_DEMAND] == 2


async def test_prefetch_leaves_a_slot_for_on_demand(cache, autojump_clock):
    blob, refs, datas = build_blob([1000] * 12, gap=1 << 20, compress=False)
    source = MemorySource(blob)
    async with ChunkFetcher(cache, per_host_concurrency=3) as fetcher:
        fetcher.enqueue(source, refs[:10], Priority.BACKGROUND)
        await trio.sleep(0.5)
        assert fetcher.stats.inflight == 2  # background may use all slots but one
        assert await fetcher.get(source, refs[10:11]) == datas[10:11]
        assert trio.current_time() == pytest.approx(1.5)  # not delayed by the queue
    assert source.requests[2][1] == refs[10].offset


async def test_priorities_order_the_queue(cache, autojump_clock):
    blob, refs, _ = build_blob([1000] * 5, gap=1 << 20, compress=False)
    source = MemorySource(blob)
    async with ChunkFetcher(cache, per_host_concurrency=2) as fetcher:
        fetcher.enqueue(source, [refs[0], refs[1], refs[4]], Priority.BACKGROUND)
        fetcher.enqueue(source, refs[2:4], Priority.PREFETCH)
        await fetcher.wait_idle()
    order = [offset for _, offset, _ in source.requests]
    # refs[0] started at once (a slot was free); then prefetch before background, each in
    # arrival order, one at a time (one of the two slots is kept for on-demand reads).
    assert order == [refs[i].offset for i in (0, 2, 3, 1, 4)]
    assert [start for start, _, _ in source.requests] == [0.0, 1.0, 2.0, 3.0, 4.0]


async def test_enqueue_skips_cached_chunks(cache, autojump_clock):
    blob, refs, datas = build_blob([500, 600])
    cache.put(refs[0].digest, datas[0])
    source = MemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        fetcher.enqueue(source, refs, Priority.PREFETCH)
        await fetcher.wait_idle()
    assert source.ranges() == [(refs[1].offset, refs[1].stored_length)]
    assert fetcher.stats.already_cached[Priority.PREFETCH] == 1
    assert cache.contains(refs[1].digest)


async def test_retry_backoff_timing(cache, autojump_clock):
    blob, refs, datas = build_blob([2000])
    source = MemorySource(blob)
    source.faults = [OSError(errno.ECONNRESET, "reset"), OSError(errno.ECONNRESET, "reset")]
    retry = RetryPolicy(attempts=4, initial_delay=2.0, factor=3.0, max_delay=100.0)
    async with ChunkFetcher(cache, retry=retry) as fetcher:
        assert await fetcher.get(source, refs) == datas
    # request 1 at 0 (fails at 1), backoff 2 -> request 2 at 3 (fails at 4), backoff 6 -> 10
    assert [start for start, _, _ in source.requests] == [0.0, 3.0, 10.0]
    assert fetcher.stats.retries == 2 and fetcher.stats.source_errors == 2


@pytest.mark.expected_log
async def test_source_errors_exhaust_attempts_then_fetch_error(cache, autojump_clock):
    blob, refs, _ = build_blob([2000])
    source = MemorySource(blob)
    source.faults = [OSError(errno.EIO, "boom")] * 3
    retry = RetryPolicy(attempts=3, initial_delay=1.0)
    errors = []
    async with ChunkFetcher(cache, retry=retry) as fetcher:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                async def reader():
                    with pytest.raises(FetchError) as excinfo:
                        await fetcher.get(source, refs)
                    errors.append(excinfo.value)
                nursery.start_soon(reader)
        assert len(errors) == 3 and all(e.attempts == 3 for e in errors)
        assert isinstance(errors[0].__cause__, OSError)
        assert len(source.requests) == 3
        assert not cache.contains(refs[0].digest)
        # The failure is not sticky: a later read tries again.
        assert len(await fetcher.get(source, refs)) == 1
    assert len(source.requests) == 4


@pytest.mark.expected_log
async def test_wrong_bytes_are_refetched_and_never_returned(cache, autojump_clock):
    blob, refs, datas = build_blob([1000, 1000], compress=False)
    source = MemorySource(blob)
    corrupt_second = lambda data: data[:1500] + bytes([data[1500] ^ 0xFF]) + data[1501:]  # noqa: E731
    source.faults = [corrupt_second, lambda data: data[:-1]]  # then a short body
    async with ChunkFetcher(cache, retry=RetryPolicy(attempts=3, initial_delay=1.0)) as fetcher:
        assert await fetcher.get(source, refs) == datas
    # First chunk verified from the first answer; the second needed two more requests.
    assert source.ranges() == [(0, 2000), (1000, 1000), (1000, 1000)]
    assert fetcher.stats.verify_failures == 1 and fetcher.stats.source_errors == 1
    assert cache.get(refs[1].digest) == datas[1]


@pytest.mark.expected_log
async def test_persistent_verification_failure_gives_fetch_error(cache, autojump_clock):
    blob, refs, _ = build_blob([3000])
    bad = ChunkRef(refs[0].offset, refs[0].stored_length, refs[0].length, bytes(16), "zstd")
    source = MemorySource(blob)
    async with ChunkFetcher(cache, retry=RetryPolicy(attempts=3, initial_delay=0.5)) as fetcher:
        with pytest.raises(FetchError, match="digest mismatch"):
            await fetcher.get(source, [bad])
    assert len(source.requests) == 3
    assert not cache.contains(bad.digest)
    assert fetcher.stats.verify_failures == 3 and fetcher.stats.failed_chunks == 1


def test_zstd_bomb_is_rejected_without_allocating():
    bomb_size = 256 << 20
    declared = zstandard.ZstdCompressor(level=1).compress(bytes(bomb_size))
    undeclared = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(bomb_size))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for stored in (declared, undeclared):
        ref = ChunkRef(0, len(stored), 1 << 20, None, "zstd")
        with pytest.raises(ChunkCorrupt):
            decode_chunk(ref, stored)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 64 << 10


def test_decode_rejects_garbage_and_wrong_length():
    with pytest.raises(ChunkCorrupt):
        decode_chunk(ChunkRef(0, 5, 5, None, "zstd"), b"hello")
    frame = zstandard.ZstdCompressor().compress(b"a" * 100)
    with pytest.raises(ChunkCorrupt):
        decode_chunk(ChunkRef(0, len(frame), 99, None, "zstd"), frame)
    assert decode_chunk(ChunkRef(0, len(frame), 100, None, "zstd"), frame) == b"a" * 100
    with pytest.raises(ValueError):
        ChunkRef(0, 1, 1, b"short", "zstd")
    with pytest.raises(ValueError):
        ChunkRef(0, 1, 1, None, "gzip")


@pytest.mark.expected_log
async def test_bomb_through_the_fetcher_is_a_fetch_error(cache, autojump_clock):
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    source = MemorySource(stored)
    ref = ChunkRef(0, len(stored), 4096, xxhash.xxh3_128_digest(bytes(4096)), "zstd")
    async with ChunkFetcher(cache, retry=RetryPolicy(attempts=1)) as fetcher:
        with pytest.raises(FetchError, match="does not decode within 4096"):
            await fetcher.get(source, [ref])
    assert not cache.contains(ref.digest)


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(cache, autojump_clock):
    blob, refs, datas = build_blob([5000])
    source = MemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        got = []
        async with trio.open_nursery() as nursery:
            async def impatient():
                with trio.move_on_after(REQUEST_TIME / 2) as scope:
                    await fetcher.get(source, refs)
                assert scope.cancelled_caught

            async def patient():
                got.append(await fetcher.get(source, refs))
            nursery.start_soon(impatient)
            nursery.start_soon(patient)
        assert got == [datas]
        # The only waiter cancelled: the fetch still completes into the cache.
        other_blob, other_refs, other_datas = build_blob([700], seed=9)
        other = MemorySource(other_blob, name="other")
        with trio.move_on_after(0.1):
            await fetcher.get(other, other_refs)
        await fetcher.wait_idle()
        assert cache.get(other_refs[0].digest) == other_datas[0]
    assert len(source.requests) == 1 and len(other.requests) == 1
    assert cache.stats()["pinned"] == 0


@pytest.mark.expected_log
async def test_stopping_the_fetcher_fails_waiters_and_keeps_cache_consistent(cache, autojump_clock):
    blob, refs, _ = build_blob([1000, 1000], gap=1 << 20)
    source = MemorySource(blob)
    fetcher = ChunkFetcher(cache, per_host_concurrency=1)
    outcome = []
    async with trio.open_nursery() as nursery:
        async def fetcher_task(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await fetcher.run()
        scope = await nursery.start(fetcher_task)
        await trio.sleep(0)

        async def reader():
            try:
                await fetcher.get(source, refs)
            except FetchError as e:
                outcome.append(e)
        nursery.start_soon(reader)
        await trio.sleep(REQUEST_TIME / 2)
        scope.cancel()
    assert len(outcome) == 1 and "stopped" in str(outcome[0])
    assert cache.stats()["pinned"] == 0 and cache.stats()["entries"] == 0
    assert list((cache.root / "tmp").iterdir()) == []
    with pytest.raises(RuntimeError):
        await fetcher.get(source, refs)


async def test_plain_chunks_without_digest_are_length_checked_not_cached(cache, autojump_clock):
    blob, refs, datas = build_blob([1000, 1000], compress=False)
    plain = [ChunkRef(r.offset, r.stored_length, r.length, None, "none") for r in refs]
    source = MemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        assert await fetcher.get(source, plain) == datas
        assert await fetcher.get(source, plain) == datas
    assert len(source.requests) == 2
    assert cache.stats()["entries"] == 0


@pytest.mark.expected_log
async def test_corrupt_cache_entry_is_refetched(cache, autojump_clock):
    blob, refs, datas = build_blob([2000])
    cache.put(refs[0].digest, datas[0])
    cache.chunk_path(refs[0].digest).write_bytes(b"\0" * 2000)
    source = MemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        assert await fetcher.get(source, refs) == datas
    assert len(source.requests) == 1
    assert cache.get(refs[0].digest) == datas[0]


async def test_observer_sees_each_request(cache, autojump_clock):
    blob, refs, _ = build_blob([1000] * 3, compress=False)
    seen = []
    source = MemorySource(blob)
    async with ChunkFetcher(cache, on_fetch=lambda *args: seen.append(args)) as fetcher:
        await trio.sleep(5)
        await fetcher.get(source, refs, Priority.PREFETCH)
    assert seen == [(source, refs, Priority.PREFETCH, 5.0, 6.0)]
    snapshot = fetcher.stats.snapshot()
    assert snapshot["requests"] == 1 and snapshot["bytes_fetched"] == 3000
    assert snapshot["latency"]["p50"] == pytest.approx(1.0)


async def test_large_chunks_decode_in_worker_threads(cache):
    # Real clock: the offload path goes through trio.to_thread.
    blob, refs, datas = build_blob([1 << 20, 1 << 20, 4096])
    source = MemorySource(blob)
    async with ChunkFetcher(cache, offload_threshold=512 << 10, retry=RetryPolicy(attempts=1)) as fetcher:
        assert await fetcher.get(source, refs) == datas
        # While the chunks are still being written to the cache, a read joins them.
        assert await fetcher.get(source, refs) == datas
        await fetcher.wait_idle()
        assert await fetcher.get(source, refs) == datas
    assert len(source.requests) == 1
    assert fetcher.stats.hits == 3 and fetcher.stats.joined == 3


def test_retry_policy_delays():
    policy = RetryPolicy(attempts=6, initial_delay=0.5, factor=2.0, max_delay=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = RetryPolicy(initial_delay=1.0, jitter=0.5)
    assert all(1.0 <= jittered.delay(1) <= 1.5 for _ in range(50))


@pytest.mark.expected_log
async def test_cache_write_failure_still_serves_verified_bytes(tiny_tmpfs):
    cache = ChunkCache(tiny_tmpfs / "cache")
    blob, refs, datas = build_blob([600 << 10, 600 << 10, 1000], gap=1 << 20)
    source = MemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        assert await fetcher.get(source, refs) == datas  # the second large chunk hits ENOSPC
        await fetcher.wait_idle()
        assert fetcher.stats.cache_put_errors == 1
        assert cache.contains(refs[2].digest) and cache.stats()["put_errors"] == 1
        assert list((cache.root / "tmp").iterdir()) == []
        cache.evict_to(0)
        assert await fetcher.get(source, refs[1:2]) == datas[1:2]  # refetched, now cached
        await fetcher.wait_idle()
        assert cache.contains(refs[1].digest)


async def test_abandoned_on_demand_chunk_continues_as_prefetch(cache, autojump_clock):
    blob, refs, datas = build_blob([1000] * 3, gap=1 << 20, compress=False)
    source = MemorySource(blob)
    a, b, c = refs
    async with ChunkFetcher(cache, per_host_concurrency=1) as fetcher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.get, source, [a])
            await trio.sleep(0.1)  # a in flight
            with trio.move_on_after(0.1):
                await fetcher.get(source, [b])  # queued, then abandoned
            nursery.start_soon(fetcher.get, source, [c])
        await fetcher.wait_idle()
    assert [offset for _, offset, _ in source.requests] == [a.offset, c.offset, b.offset]
    assert cache.get(b.digest) == datas[1]


@pytest.mark.expected_log
async def test_permanent_source_errors_are_not_retried(cache, autojump_clock):
    blob, refs, _ = build_blob([1000])
    source = MemorySource(blob)
    source.faults = [SourceError(source.name, 0, 1000, "HTTP 404", status=404)]
    async with ChunkFetcher(cache, retry=RetryPolicy(attempts=5)) as fetcher:
        with pytest.raises(FetchError, match="404") as excinfo:
            await fetcher.get(source, refs)
    assert excinfo.value.attempts == 1 and len(source.requests) == 1
    assert trio.current_time() == REQUEST_TIME


chunk_sizes = st.lists(st.integers(1, 3000), min_size=1, max_size=10)
requests = st.lists(
    st.tuples(st.sampled_from(["get", "enqueue"]), st.lists(st.integers(0, 9), min_size=1, max_size=6),
              st.sampled_from(list(Priority)), st.sampled_from([0.0, 0.5, 1.0, 2.5]),
              st.sampled_from([None, 0.3, 1.5])),
    min_size=1, max_size=8)
faults = st.lists(st.sampled_from([None, "error", "corrupt", "short"]), max_size=6)


@pytest.mark.expected_log
@settings(max_examples=40, deadline=None)
@given(sizes=chunk_sizes, gap=st.sampled_from([0, 50, 300]), plan=requests, fault_plan=faults,
       concurrency=st.integers(1, 3), max_coalesce=st.sampled_from([1, 2500, 8000]),
       attempts=st.integers(1, 3), streaming=st.booleans())
def test_scheduler_invariants(sizes, gap, plan, fault_plan, concurrency, max_coalesce, attempts, streaming):
    """Whatever the mix of reads, prefetches, speculation, cancellations and faults, whole or
    streamed answers (which cut speculative requests): a read returns exactly
    the right bytes or raises FetchError; requests stay within bounds; without faults no
    chunk is fetched twice; at the end nothing is pending or pinned and the cache verifies."""
    blob, refs, datas = build_blob(sizes, gap=gap)
    source = StreamingMemorySource(blob, rate=4000, piece=700) if streaming else MemorySource(blob)
    mangle = {
        "error": OSError(errno.ECONNRESET, "reset"),
        "corrupt": lambda data: bytes([data[0] ^ 1]) + data[1:],
        "short": lambda data: data[:-1],
    }
    source.faults = [mangle[f] if f else None for f in fault_plan]
    outcomes = []
    fetched_refs = []  # the chunks each successful request carried (gap bytes not counted)

    async def main():
        cache = ChunkCache(root)
        fetcher = ChunkFetcher(cache, per_host_concurrency=concurrency, max_coalesce=max_coalesce,
                               max_gap=100, retry=RetryPolicy(attempts=attempts, initial_delay=0.5),
                               on_fetch=lambda source, refs, *_: fetched_refs.extend(refs))
        async with fetcher:
            async with trio.open_nursery() as nursery:
                for kind, indices, priority, delay, cancel_after in plan:
                    chosen = [i % len(refs) for i in indices]

                    async def one(kind=kind, chosen=chosen, priority=priority, delay=delay,
                                  cancel_after=cancel_after):
                        await trio.sleep(delay)
                        wanted = [refs[i] for i in chosen]
                        if kind == "enqueue":
                            fetcher.enqueue(source, wanted, priority)
                            return
                        with trio.move_on_after(cancel_after if cancel_after else float("inf")):
                            try:
                                got = await fetcher.get(source, wanted, priority)
                            except FetchError:
                                outcomes.append("error")
                                return
                            assert got == [datas[i] for i in chosen]
                            outcomes.append("ok")
                    nursery.start_soon(one)
            await fetcher.wait_idle()
            assert fetcher.pending_count() == 0
        assert cache.stats()["pinned"] == 0
        for ref, data in zip(refs, datas):
            assert cache.get(ref.digest) in (None, data)

    with tempfile.TemporaryDirectory() as root:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if not any(fault_plan):
        assert "error" not in outcomes
        digests = [ref.digest for ref in fetched_refs]  # equal chunks share a digest: one fetch
        assert len(digests) == len(set(digests))
    for _, offset, length in source.requests:
        assert offset + length <= len(blob)
        assert length <= max_coalesce or any(r.offset == offset and r.stored_length == length for r in refs)


async def test_fetcher_saves_the_cache_index_periodically_and_on_exit(cache):
    # Real clock: the save runs in a worker thread, which a mock clock would not wait for.
    blob, refs, _ = build_blob([1000, 2000])
    source = MemorySource(blob)
    index = cache.root / "index"
    async with ChunkFetcher(cache, index_save_interval=0.2) as fetcher:
        await fetcher.get(source, refs[:1])
        with trio.fail_after(10):
            while not index.exists():
                await trio.sleep(0.05)
        saved = index.read_bytes()
        await fetcher.get(source, refs[1:])
    assert index.read_bytes() != saved  # saved again when the fetcher stopped
    assert ChunkCache(cache.root).stats()["entries"] == 2


class StalledSource(MemorySource):
    """Requests hang until ``release`` is set (a registry that accepts and never answers)."""

    def __init__(self, blob: bytes):
        super().__init__(blob)
        self.release = trio.Event()

    async def read_range(self, offset: int, length: int) -> bytes:
        await self.release.wait()
        return await super().read_range(offset, length)


async def test_read_waits_at_most_the_read_bound_and_the_fetch_goes_on(cache, autojump_clock):
    blob, refs, datas = build_blob([4096, 4096])
    source = StalledSource(blob)
    async with ChunkFetcher(cache, read_timeout=10.0) as fetcher:
        started = trio.current_time()
        with pytest.raises(FetchError, match="not fetched within the 10s read bound"):
            await fetcher.get(source, refs)
        assert trio.current_time() - started == pytest.approx(10.0)
        assert fetcher.stats.read_timeouts == 1
        assert fetcher.pending_count() == 2  # abandoned, not cancelled: still worth caching
        source.release.set()
        await fetcher.wait_idle()
        assert all(cache.contains(ref.digest) for ref in refs)
        assert await fetcher.get(source, refs) == datas  # from the cache now
        assert len(source.requests) == 1


@pytest.mark.expected_log
async def test_a_chunk_is_retried_for_as_long_as_the_policy_gives_it(cache, autojump_clock):
    blob, refs, datas = build_blob([4096])
    source = MemorySource(blob)
    down = SourceError(source.name, 0, 1, "connection refused")
    source.faults = [down] * 6  # an outage: six failed requests, then the registry is back
    policy = RetryPolicy(attempts=100, initial_delay=1.0, factor=2.0, max_delay=4.0, give_up_after=30.0)
    async with ChunkFetcher(cache, retry=policy, read_timeout=60.0) as fetcher:
        assert await fetcher.get(source, refs) == datas
        assert len(source.requests) == 7

        source.faults = [down] * 100  # for good: given up once 30 s have passed since the first failure
        other_blob, other_refs, _ = build_blob([4096], seed=1)
        source.blob = other_blob
        started = trio.current_time()
        with pytest.raises(FetchError, match="connection refused"):
            await fetcher.get(source, other_refs)
        assert 25.0 <= trio.current_time() - started <= 32.0 + REQUEST_TIME


# ----------------------------------------------------------------- streaming delivery

# Speculative requests as long as the whole blob, to test cutting them.
LONG_YIELDING = dict(background_coalesce=8 << 20, background_window=8 << 20,
                     yielding_coalesce=8 << 20, yielding_window=8 << 20)

async def test_first_chunk_of_a_long_request_reaches_its_waiter_before_the_request_ends(cache, autojump_clock):
    """Chunks are handed out as their bytes arrive, not when the whole request has finished."""
    blob, refs, datas = build_blob([64 << 10] * 16, compress=False)  # 1 MiB, one second at 1 MiB/s
    source = StreamingMemorySource(blob)
    async with ChunkFetcher(cache, background_coalesce=8 << 20, background_window=8 << 20) as fetcher:
        fetcher.enqueue(source, refs, Priority.PREFETCH)
        await trio.sleep(0)
        got = await fetcher.get(source, refs[:1])
        first_at = trio.current_time()
        await fetcher.wait_idle()
    assert got == datas[:1]
    assert source.ranges() == [(0, len(blob))]  # joined the long request, no second request
    (request_end, _, sent), = source.ends
    assert sent == len(blob)
    assert first_at < 0.1 < 1.0 <= request_end  # 20 ms + 64 KiB at 1 MiB/s, against a second
    assert all(cache.contains(ref.digest) for ref in refs)


async def test_stream_failing_half_way_keeps_the_chunks_that_arrived(cache, autojump_clock):
    blob, refs, datas = build_blob([64 << 10] * 8, compress=False)
    source = StreamingMemorySource(blob)
    source.faults = [OSError(errno.ECONNRESET, "reset")]
    async with ChunkFetcher(cache, retry=RetryPolicy(attempts=2, initial_delay=0.5)) as fetcher:
        assert await fetcher.get(source, refs) == datas
    assert source.ranges() == [(0, len(blob)), (refs[4].offset, len(blob) - refs[4].offset)]
    assert fetcher.stats.retries == 4 and fetcher.stats.chunks_fetched == 8


async def test_corrupt_bytes_in_a_stream_are_never_handed_out(cache, autojump_clock):
    blob, refs, datas = build_blob([64 << 10] * 4)
    source = StreamingMemorySource(blob)
    source.faults = [lambda data: data[:-10] + bytes(10)]  # the last chunk's frame is damaged
    async with ChunkFetcher(cache, retry=RetryPolicy(attempts=2, initial_delay=0.5)) as fetcher:
        assert await fetcher.get(source, refs) == datas
    assert source.ranges()[1] == (refs[3].offset, refs[3].stored_length)
    assert fetcher.stats.verify_failures == 1


async def test_speculative_requests_wait_for_an_idle_link(cache, autojump_clock):
    blob, refs, datas = build_blob([64 << 10] * 8, compress=False)
    source = StreamingMemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.get, source, refs[:1])
            await trio.sleep(0.01)
            fetcher.enqueue(source, refs[4:], Priority.SPECULATIVE)
        await fetcher.wait_idle()
    (read_start, _, _), (speculative_start, offset, _) = source.requests
    (read_end, _, _) = source.ends[0]
    assert offset == refs[4].offset and speculative_start >= read_end > read_start


async def test_on_demand_read_cuts_a_speculative_request_after_its_current_chunk(cache, autojump_clock):
    """A yielding request stops after the chunk it is receiving when a read needs the link;
    its other chunks are fetched afterwards, and nothing is lost."""
    blob, refs, datas = build_blob([64 << 10] * 16, compress=False)
    other_blob, other_refs, other_datas = build_blob([64 << 10], compress=False, seed=3)
    source = StreamingMemorySource(blob)
    other = StreamingMemorySource(other_blob, name="other blob")  # same host
    async with ChunkFetcher(cache, **LONG_YIELDING) as fetcher:
        fetcher.enqueue(source, refs, Priority.SPECULATIVE)
        await trio.sleep(0.02 + 2.5 * (64 << 10) / (1 << 20))  # half-way through chunk 2
        assert await fetcher.get(other, other_refs) == other_datas
        await fetcher.wait_idle()
    first_end, _, sent = source.ends[0]
    assert sent == refs[3].offset  # chunk 2 was finished, chunk 3 not started
    assert other.requests[0][0] < first_end  # the read did not wait for the cut
    assert source.requests[1][1:] == (refs[3].offset, len(blob) - refs[3].offset)
    assert source.requests[1][0] >= other.ends[0][0]  # resumed once the link was idle again
    assert fetcher.stats.chunks_fetched == 17 and fetcher.stats.failed_chunks == 0
    assert all(cache.contains(ref.digest) for ref in refs)


async def test_reading_far_into_a_speculative_request_fetches_the_chunk_on_its_own(cache, autojump_clock):
    blob, refs, datas = build_blob([64 << 10] * 16, compress=False)
    source = StreamingMemorySource(blob)
    async with ChunkFetcher(cache, **LONG_YIELDING) as fetcher:
        fetcher.enqueue(source, refs, Priority.SPECULATIVE)
        await trio.sleep(0.03)
        assert await fetcher.get(source, refs[12:13]) == datas[12:13]
        read_at = trio.current_time()
        await fetcher.wait_idle()
    assert refs[12].offset in [offset for offset, _ in source.ranges()]  # its own request (13-15 ride along)
    assert read_at < 0.3  # not after the 12 chunks before it (0.75 s at 1 MiB/s)
    assert all(cache.contains(ref.digest) for ref in refs)


async def test_reading_just_ahead_in_a_speculative_request_waits_for_it(cache, autojump_clock):
    blob, refs, datas = build_blob([64 << 10] * 16, compress=False)
    source = StreamingMemorySource(blob)
    async with ChunkFetcher(cache, **LONG_YIELDING) as fetcher:
        fetcher.enqueue(source, refs, Priority.SPECULATIVE)
        await trio.sleep(0.03)
        assert await fetcher.get(source, refs[2:3]) == datas[2:3]
        await fetcher.wait_idle()
    assert source.ranges() == [(0, len(blob))]


async def test_speculative_requests_are_short_and_few_bytes_are_asked_for_at_once(cache, autojump_clock):
    """A cut cannot recall bytes already sent, so at most yielding_window bytes of speculation
    are ever requested at once per host, in requests of at most yielding_coalesce."""
    blob, refs, datas = build_blob([64 << 10] * 32, compress=False)
    source = StreamingMemorySource(blob)
    async with ChunkFetcher(cache, yielding_coalesce=256 << 10, yielding_window=512 << 10) as fetcher:
        fetcher.enqueue(source, refs, Priority.SPECULATIVE)
        await fetcher.wait_idle()
    assert all(length <= 256 << 10 for length in (r[2] for r in source.requests))
    events = sorted([(t, length) for t, _, length in source.requests] + [(t, -sent) for t, _, sent in source.ends])
    asked = 0
    for _, change in events:
        asked += change
        assert asked <= 512 << 10
    assert all(cache.contains(ref.digest) for ref in refs)


async def test_speculation_right_after_a_miss_rides_along_in_its_request(cache, autojump_clock):
    """Queued speculative chunks that follow an on-demand chunk join its request (after it in the
    stream, up to yielding_coalesce bytes); what comes before it does not."""
    blob, refs, datas = build_blob([64 << 10] * 10, compress=False)
    source = StreamingMemorySource(blob)
    async with ChunkFetcher(cache, yielding_coalesce=192 << 10) as fetcher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.get, source, refs[0:1])  # occupies the link: no speculation starts
            await trio.sleep(0.001)
            fetcher.enqueue(source, [refs[1], *refs[3:8]], Priority.SPECULATIVE)
            got = await fetcher.get(source, refs[2:3])
            first = trio.current_time()
        await fetcher.wait_idle()
    assert got == datas[2:3]
    # refs[2] on demand, with refs[3..5] (192 KiB) riding along; refs[1] (before it) does not
    assert (refs[2].offset, refs[6].offset - refs[2].offset) in source.ranges()
    assert first < 0.2


# ----------------------------------------------------------------- attach-critical work first

@pytest.fixture
def stores_on_loop(monkeypatch):
    """Chunks are written to the cache on the trio thread (with ``offload_threshold=ON_LOOP``):
    a worker thread would let the autojump clock leap ahead while it runs, and these tests
    compare times on that clock."""
    monkeypatch.setattr(scheduler, "_STORE_ON_LOOP_MAX", ON_LOOP)


ON_LOOP = 1 << 30


async def test_prefetch_waits_while_a_layer_attaches_and_reads_do_not(cache, autojump_clock, stores_on_loop):
    """Prefetch queued while a layer attaches starts only attach_settle after the last attach
    ended; an on-demand read meanwhile goes at once (also of a held prefetch chunk)."""
    blob, refs, datas = build_blob([64 << 10] * 8, compress=False)
    source = StreamingMemorySource(blob)
    async with ChunkFetcher(cache, attach_settle=0.5, offload_threshold=ON_LOOP) as fetcher:
        with fetcher.attaching():
            fetcher.enqueue(source, refs[2:], Priority.PREFETCH)
            with fetcher.attaching():  # a second layer attaching side by side
                assert await fetcher.get(source, refs[:1]) == datas[:1]
                assert await fetcher.get(source, refs[5:6]) == datas[5:6]
            await trio.sleep(1.0)
            assert [offset for _, offset, _ in source.requests] == [refs[0].offset, refs[5].offset]
        attached = trio.current_time()
        await fetcher.wait_idle()
    starts = [start for start, offset, _ in source.requests[2:]]
    assert starts and min(starts) >= attached + 0.5
    assert all(cache.contains(ref.digest) for ref in refs[:1] + refs[2:])
    assert fetcher.stats.failed_chunks == 0


async def test_attach_fetch_is_not_slowed_by_prefetch_on_the_link(cache, autojump_clock, stores_on_loop):
    """Layer 1's trace prefetch streams over the link when layer 2 starts attaching: its
    request stops after the chunk it is receiving and nothing else starts, so layer 2's
    metadata (fetched outside the fetcher, over the same link) has the link to itself; the
    prefetch resumes once the attach is over, and nothing is lost."""
    link = SharedLink(rate=1 << 20)
    blob, refs, datas = build_blob([64 << 10] * 32, compress=False)  # 2 MiB: 2 s of prefetch
    layer1 = StreamingMemorySource(blob, name="layer 1", link=link)
    metadata = bytes(256 << 10)
    layer2 = StreamingMemorySource(metadata, name="layer 2", link=link)
    async with ChunkFetcher(cache, attach_settle=0.5, offload_threshold=ON_LOOP) as fetcher:
        with fetcher.attaching():
            fetcher.enqueue(layer1, refs, Priority.PREFETCH)
        await trio.sleep(0.5 + 0.5)  # the settle time, then half a second of prefetch
        assert len(layer1.requests) == 1 and not layer1.ends
        with fetcher.attaching():
            began = trio.current_time()
            assert b"".join([piece async for piece in layer2.iter_range(0, len(metadata))]) == metadata
            took = trio.current_time() - began
        attached = trio.current_time()
        await fetcher.wait_idle()
    # Alone on the link: 20 ms + 256 KiB at 1 MiB/s. At most the rest of one 64 KiB prefetch
    # chunk shares it (sharing it with the whole prefetch would take twice as long).
    alone = 0.02 + len(metadata) / link.rate
    assert took <= alone + (64 << 10) / link.rate + 0.01, took
    (cut_at, _, sent), *_ = layer1.ends
    assert cut_at <= began + (64 << 10) / link.rate + 0.01 and sent % (64 << 10) == 0
    assert [start for start, _, _ in layer1.requests[1:]] and all(
        start >= attached + 0.5 for start, _, _ in layer1.requests[1:])
    assert all(cache.contains(ref.digest) for ref in refs)
    assert fetcher.stats.failed_chunks == 0 and fetcher.stats.chunks_fetched == 32


async def test_background_and_speculation_wait_for_an_attach_readahead_does_not(cache, autojump_clock,
                                                                             stores_on_loop):
    blob, refs, datas = build_blob([64 << 10] * 8, compress=False)
    source = StreamingMemorySource(blob)
    async with ChunkFetcher(cache, attach_settle=0.2, offload_threshold=ON_LOOP) as fetcher:
        with fetcher.attaching():
            fetcher.enqueue(source, refs[6:], Priority.BACKGROUND)
            fetcher.enqueue(source, refs[4:6], Priority.SPECULATIVE)
            fetcher.enqueue(source, refs[:2], Priority.READAHEAD)
            await trio.sleep(1.0)
            assert source.ranges() == [(refs[0].offset, refs[2].offset - refs[0].offset)]
        attached = trio.current_time()
        await fetcher.wait_idle()
    assert all(start >= attached + 0.2 for start, _, _ in source.requests[1:])
    assert all(cache.contains(ref.digest) for ref in refs[:2] + refs[4:])


async def test_attaches_settled_waits_for_every_attach_and_the_settle_time(cache, autojump_clock):
    async with ChunkFetcher(cache, attach_settle=0.5) as fetcher:
        await fetcher.attaches_settled()  # nothing attaching: at once
        assert trio.current_time() == 0
        settled_at = []

        async def after_the_pull():
            await fetcher.attaches_settled()
            settled_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            with fetcher.attaching():
                nursery.start_soon(after_the_pull)
                await trio.sleep(1.0)
            await trio.sleep(0.3)
            with fetcher.attaching():  # the next layer of the pull, within the settle time
                await trio.sleep(1.0)
    assert settled_at == [pytest.approx(2.3 + 0.5)]
