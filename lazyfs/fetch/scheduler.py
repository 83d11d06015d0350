"""The fetch scheduler: one place where chunk bytes come from a blob source into the cache.

A read asks for chunk references; hits come from the ChunkCache, misses become *pending*
items, one per chunk key (the digest), shared by every waiter. Pending items wait in a
per-host queue ordered by (priority, arrival); whenever a host has a free slot the best
item is taken, merged with queued neighbours of the same source and priority whose stored
ranges are contiguous (gaps up to ``max_gap``) up to ``max_coalesce`` bytes, and fetched by
one range request. The answer is read as it arrives: as soon as a chunk's stored bytes are
complete it is decompressed (bounded by its declared length), verified (xxh3-128) and only
then handed to its waiters and cached, while the rest of the request is still coming.
Failures are retried per chunk with exponential backoff; after the last attempt every waiter
gets a FetchError. Speculative and background requests yield the link to on-demand reads
(they are cut after their current chunk); fetch policies (lazyfs.fetch.policies) are told
of misses, ended requests and idle moments through ``policies``.

Concurrency rules (see the design notes): the bookkeeping -- ``_dispatch``, ``_take_group``,
``_promote``, ``_cut``, ``_deliver``, ``_failed`` and the policies' hooks -- is synchronous and never awaits, so queue state
is never observed half-changed; the only awaits are the source request, the worker-thread
calls for decoding/caching large chunks, backoff sleeps and waiters' waits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Protocol

import trio
from sortedcontainers import SortedKeyList

from lazyfs.fetch.cache import CacheError, ChunkCache
from lazyfs.layer.chunks import ChunkCorrupt, ChunkRef, decode_chunk

log = logging.getLogger(__name__)

# Prefetch and background requests: at most this many stored bytes each, and per host at most
# PREFETCH_WINDOW_BYTES of them in flight (see ChunkFetcher.__init__). With streaming delivery
# one long request in queue order is the fastest (docs: "Does the prefetch bound still pay").
PREFETCH_REQUEST_BYTES = 8 << 20
PREFETCH_WINDOW_BYTES = 8 << 20
# More chunk files than this per request are written from a worker thread (one file creation
# costs tens of microseconds to a millisecond, see docs), whatever their size.
_STORE_ON_LOOP_MAX = 4


class Priority(IntEnum):
    ON_DEMAND = 0  # a read is waiting
    READAHEAD = 1  # the next chunks of a file being read sequentially
    PREFETCH = 2  # chunks a trace names
    SPECULATIVE = 3  # a fetch policy's guess of what comes next (e.g. locality)
    BACKGROUND = 4  # the rest of the image


# Requests led by these priorities use only an idle link: they start only while their host has
# no on-demand request in flight, and one in flight is cut after the chunk it is receiving
# when an on-demand request starts (its other chunks are queued again).
YIELDING = frozenset({Priority.SPECULATIVE, Priority.BACKGROUND})
# A chunk a reader now waits for inside a yielding request is awaited there if at most this
# many stored bytes still come before it (about one round trip at 100 Mbit/s x 20 ms, so
# waiting is no slower than a new request); further away, the request is cut and the chunk
# fetched on demand.
CUT_AHEAD_BYTES = 256 << 10
# Cutting a request at the client does not recall the bytes the server has already sent: they
# sit in socket buffers and the bottleneck queue ahead of the next response. So yielding
# requests are short and few bytes of them are ever asked for at once per host: a read waits
# behind at most YIELDING_WINDOW_BYTES (40 ms at 100 Mbit/s) of speculation.
YIELDING_REQUEST_BYTES = 256 << 10
YIELDING_WINDOW_BYTES = 512 << 10
# Requests led by these priorities wait while a layer attaches (ChunkFetcher.attaching).
HELD_WHILE_ATTACHING = frozenset({Priority.PREFETCH, Priority.SPECULATIVE, Priority.BACKGROUND})
# How long they keep waiting after the last attach ended: the layers of one containerd pull
# attach one after another, a few milliseconds apart (docs: "The pull does not wait for
# prefetch").
ATTACH_SETTLE = 0.1


class BlobSource(Protocol):
    """Where stored chunk bytes come from. A source may also offer
    ``iter_range(offset, length) -> AsyncIterator[bytes]``: the same bytes as pieces in order,
    as they arrive; the fetcher then hands each chunk out as soon as its bytes are complete."""

    name: str  # for messages and as the identity of the blob (same name = same bytes)
    host: str  # concurrency is limited per host

    async def read_range(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or raise."""
        ...


async def _whole_range(source: BlobSource, offset: int, length: int) -> AsyncIterator[bytes]:
    """One piece: for sources that cannot stream."""
    yield await source.read_range(offset, length)


def open_range(source: BlobSource, offset: int, length: int) -> AsyncIterator[bytes]:
    """The bytes of a range as they arrive: ``source.iter_range`` if it has one."""
    iter_range = getattr(source, "iter_range", None)
    if iter_range is not None:
        return iter_range(offset, length)
    return _whole_range(source, offset, length)


class FetchError(Exception):
    """A chunk could not be fetched and verified; the read that needs it fails (EIO)."""

    def __init__(self, source_name: str, ref: ChunkRef, attempts: int, reason: str):
        digest = ref.digest.hex() if ref.digest is not None else "untrusted"
        super().__init__(
            f"chunk {digest} at {ref.offset}+{ref.stored_length} of {source_name}: "
            f"{reason} (after {attempts} attempt(s))")
        self.source_name = source_name
        self.ref = ref
        self.attempts = attempts
        self.reason = reason


class ShortRead(Exception):
    """A source returned a different number of bytes than requested."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: failure n (1-based) waits initial_delay * factor**(n-1), capped.

    A chunk fails for good after ``attempts`` attempts or, with ``give_up_after``, once that
    many seconds have passed since its first failure (the daemon sets it to its read bound, so
    that a chunk is retried for as long as a read may wait for it: an outage shorter than the
    bound delays the read instead of failing it)."""

    attempts: int = 4
    initial_delay: float = 0.1
    factor: float = 2.0
    max_delay: float = 5.0
    jitter: float = 0.0  # fraction of the delay added at random, to de-synchronise clients
    give_up_after: float | None = None

    def delay(self, failures: int) -> float:
        base = min(self.max_delay, self.initial_delay * self.factor ** (failures - 1))
        return base + (random.uniform(0, base * self.jitter) if self.jitter else 0.0)


class _State(Enum):
    QUEUED = "queued"
    BACKOFF = "backoff"
    FETCHING = "fetching"


@dataclass(eq=False)
class _Pending:
    """One chunk being fetched, shared by all of its waiters."""

    key: Hashable
    source: BlobSource
    ref: ChunkRef
    priority: Priority
    seq: int
    state: _State = _State.QUEUED
    done: trio.Event = field(default_factory=trio.Event)
    result: bytes | None = None
    error: FetchError | None = None
    cause: BaseException | None = None
    failures: int = 0
    first_failure: float | None = None  # trio clock
    waiters: int = 0
    request: _Request | None = None  # while FETCHING


@dataclass(eq=False)
class _Host:
    queue: SortedKeyList = field(default_factory=lambda: SortedKeyList(key=lambda p: (p.priority, p.seq)))
    active: int = 0
    active_background: int = 0  # requests led by a prefetch/background item
    background_bytes: int = 0  # stored bytes the prefetch/background requests among them ask for
    active_on_demand: int = 0  # requests led by an on-demand item
    yielding_bytes: int = 0  # stored bytes the yielding requests in flight ask for
    requests: set[_Request] = field(default_factory=set)


@dataclass(eq=False)
class _Request:
    """One range request in flight: its chunks (by stored offset) and how far it has come."""

    host: _Host
    group: list[_Pending]
    priority: Priority  # the leader's
    background: bool  # counts against the host's background slots
    bounded: int  # stored bytes counted against the host's prefetch window
    yielding: int  # stored bytes counted against the host's yielding window
    received: int  # stored offset up to which bytes have arrived
    next_index: int = 0  # the first chunk of the group whose bytes are not complete yet
    stop_at: int | None = None  # cut: no chunk starting at or after this offset is taken
    waiting: trio.CancelScope | None = None  # set while waiting for the next piece

    def in_progress(self) -> bool:
        """Whether some bytes of the next chunk have arrived (cutting now would waste them)."""
        return self.next_index < len(self.group) and self.group[self.next_index].ref.offset < self.received


def _group_bytes(group: list[_Pending]) -> int:
    return max(p.ref.end for p in group) - group[0].ref.offset


class FetchStats:
    """Counters of one fetcher; ``snapshot()`` is what the control socket reports."""

    LATENCY_SAMPLES = 4096

    def __init__(self):
        self.requests = 0
        self.bytes_fetched = 0
        self.chunks_fetched = 0
        self.coalesced_chunks = 0  # chunks that rode along in a request led by another chunk
        self.hits = 0
        self.misses = 0
        self.joined = 0  # waiters that joined an already pending chunk
        self.inflight = 0
        self.retries = 0
        self.source_errors = 0
        self.verify_failures = 0
        self.failed_chunks = 0
        self.read_timeouts = 0  # reads that gave up waiting (ChunkFetcher.read_timeout)
        self.cache_put_errors = 0
        self.promotions = 0
        self.queued = {p: 0 for p in Priority}
        self.done = {p: 0 for p in Priority}
        self.already_cached = {p: 0 for p in Priority}
        self._latencies: deque[float] = deque(maxlen=self.LATENCY_SAMPLES)

    def record_latency(self, seconds: float) -> None:
        self._latencies.append(seconds)

    def latency_percentiles(self) -> dict[str, float]:
        samples = sorted(self._latencies)
        if not samples:
            return {}

        def pct(q: float) -> float:
            return samples[min(len(samples) - 1, math.ceil(q * len(samples)) - 1)]

        return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": samples[-1]}

    def snapshot(self) -> dict:
        names = {p: p.name.lower() for p in Priority}
        return {
            "requests": self.requests,
            "bytes_fetched": self.bytes_fetched,
            "chunks_fetched": self.chunks_fetched,
            "coalesced_chunks": self.coalesced_chunks,
            "hits": self.hits,
            "misses": self.misses,
            "joined": self.joined,
            "inflight": self.inflight,
            "retries": self.retries,
            "source_errors": self.source_errors,
            "verify_failures": self.verify_failures,
            "failed_chunks": self.failed_chunks,
            "read_timeouts": self.read_timeouts,
            "cache_put_errors": self.cache_put_errors,
            "promotions": self.promotions,
            "queued": {names[p]: n for p, n in self.queued.items()},
            "done": {names[p]: n for p, n in self.done.items()},
            "already_cached": {names[p]: n for p, n in self.already_cached.items()},
            "latency": self.latency_percentiles(),
        }


FetchObserver = Callable[[BlobSource, Sequence[ChunkRef], Priority, float, float], None]


# HTTP statuses that another attempt will not change (the blob or the range is not there, or
# we may not read it); sources report them as an exception attribute ``status``.
_PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 416})


def _is_permanent(error: BaseException) -> bool:
    return getattr(error, "status", None) in _PERMANENT_STATUSES


def _chunk_key(source: BlobSource, ref: ChunkRef) -> Hashable:
    if ref.digest is not None:
        return ref.digest
    return ("plain", source.name, ref.offset, ref.length)


class ChunkFetcher:
    """Single-flight, coalescing, prioritised, verifying chunk fetcher over a ChunkCache.

    Run it in the daemon's nursery (``nursery.start_soon(fetcher.run)``) or as
    ``async with fetcher:``. Chunks without a digest (plain EROFS blobs, trusted mode) are
    length-checked, single-flighted and returned, but not stored in the content-addressed cache.
    """

    def __init__(
        self,
        cache: ChunkCache,
        *,
        max_coalesce: int = 8 << 20,
        max_gap: int = 64 << 10,
        per_host_concurrency: int = 8,
        background_coalesce: int = PREFETCH_REQUEST_BYTES,
        background_window: int = PREFETCH_WINDOW_BYTES,
        yielding_coalesce: int = YIELDING_REQUEST_BYTES,
        yielding_window: int = YIELDING_WINDOW_BYTES,
        retry: RetryPolicy = RetryPolicy(),
        stats: FetchStats | None = None,
        on_fetch: FetchObserver | None = None,
        offload_threshold: int = 256 << 10,
        cpu_threads: int = 2,
        index_save_interval: float = 60.0,
        read_timeout: float | None = None,
        attach_settle: float = ATTACH_SETTLE,
    ):
        if per_host_concurrency < 1:
            raise ValueError("per_host_concurrency must be at least 1")
        self.cache = cache
        self.max_coalesce = max_coalesce
        # Concurrent requests share the link, so prefetch requests in flight per host ask for at
        # most background_window bytes in all: the queue's first chunks are not slowed down by
        # later ones fetched side by side. Chunks stream out of a request as they arrive, so one
        # long request is no slower to deliver its first chunk than a short one.
        self.background_coalesce = min(background_coalesce, max_coalesce)
        self.background_window = background_window
        self.yielding_coalesce = yielding_coalesce
        self.yielding_window = yielding_window
        self.max_gap = max_gap
        self.per_host_concurrency = per_host_concurrency
        # One slot per host is kept for on-demand reads, so prefetch can never occupy them all.
        self.background_slots = max(1, per_host_concurrency - 1)
        self.retry = retry
        self.stats = stats if stats is not None else FetchStats()
        self.observers: list[FetchObserver] = [on_fetch] if on_fetch is not None else []
        self.offload_threshold = offload_threshold
        self.index_save_interval = index_save_interval
        # How long get() waits for fetched chunks before it fails (FetchError) instead; the
        # fetch itself goes on (as a prefetch), so a later read may find the chunk cached.
        self.read_timeout = read_timeout
        self.attach_settle = attach_settle
        self._attaching = 0  # attaches in flight (attaching())
        self._held_until = -math.inf  # trio clock: held requests wait until then after the last attach
        self._attaches_done: trio.Event | None = None  # set when the last attach in flight ends
        self._cpu_limiter = trio.CapacityLimiter(cpu_threads)
        self._pending: dict[Hashable, _Pending] = {}
        self._hosts: dict[str, _Host] = {}
        self._queued_by_source: dict[str, SortedKeyList] = {}
        self._seq = 0
        self._nursery: trio.Nursery | None = None
        self._nursery_manager = None
        self._closing = False
        self._cache_failing = False  # the last chunk store failed (a full disk): log only changes
        self._idle: trio.Event | None = None
        # Fetch policies (lazyfs.fetch.policies.PolicySet): told of misses, ended requests and
        # idle moments; they queue chunks through enqueue().
        self.policies = None

    # ----------------------------------------------------------------- lifetime

    async def run(self) -> None:
        """The scheduler's tasks; returns only when cancelled."""
        async with self:
            await trio.sleep_forever()

    async def __aenter__(self) -> ChunkFetcher:
        if self._nursery is not None or self._closing:
            raise RuntimeError("this ChunkFetcher is already running or has stopped")
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._save_index_periodically)
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        self._closing = True
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_manager.__aexit__(*exc_info)
        finally:
            self._nursery = None
            for pending in list(self._pending.values()):
                if pending.done.is_set():
                    self._retire(pending)
                else:
                    self._finish_failed(pending, "the fetcher stopped")
            self.cache.close()

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None or self._closing:
            raise RuntimeError("ChunkFetcher is not running (start fetcher.run() in a nursery)")
        return self._nursery

    # ----------------------------------------------------------------- public API

    async def get(self, source: BlobSource, chunks: Sequence[ChunkRef],
                  priority: Priority = Priority.ON_DEMAND) -> list[bytes]:
        """The verified uncompressed bytes of each chunk, in order. Raises FetchError."""
        self._require_running()
        results: list[bytes | None] = [None] * len(chunks)
        waiting: list[tuple[int, _Pending]] = []
        cached: list[int] = []
        missed: list[ChunkRef] = []
        try:
            for i, ref in enumerate(chunks):
                pending = self._pending.get(_chunk_key(source, ref))
                if pending is None and ref.digest is not None and self.cache.contains(ref.digest):
                    cached.append(i)
                    continue
                if pending is None:
                    missed.append(ref)
                waiting.append((i, self._want(source, ref, priority, waiter=True)))
            if missed and priority is Priority.ON_DEMAND:
                # Before dispatching: what a policy queues next to the misses can ride along.
                self._consult("on_miss", source, missed)
            self._dispatch()
            if cached:
                found = await self._read_cached([chunks[i].digest for i in cached],
                                                sum(chunks[i].length for i in cached))
                for i, data in zip(cached, found):
                    if data is None:  # vanished or corrupt since contains(): fetch it after all
                        waiting.append((i, self._want(source, chunks[i], priority, waiter=True)))
                    else:
                        self.stats.hits += 1
                        results[i] = data
                self._dispatch()
            with trio.move_on_after(self.read_timeout if self.read_timeout is not None else math.inf):
                while waiting:
                    i, pending = waiting[0]
                    await pending.done.wait()
                    waiting.pop(0)
                    pending.waiters -= 1
                    if pending.error is not None:
                        err = pending.error
                        raise FetchError(err.source_name, err.ref, err.attempts, err.reason) from pending.cause
                    results[i] = pending.result
            if waiting:
                self.stats.read_timeouts += 1
                _, late = waiting[0]
                raise FetchError(late.source.name, late.ref, late.failures,
                                 f"not fetched within the {self.read_timeout:g}s read bound")
        finally:
            for _, pending in waiting:  # left early: cancelled, or another chunk failed
                pending.waiters -= 1
                if pending.waiters == 0:
                    self._demote_abandoned(pending)
        return results  # type: ignore[return-value]

    def enqueue(self, source: BlobSource, chunks: Sequence[ChunkRef],
                priority: Priority = Priority.PREFETCH) -> None:
        """Fetch chunks into the cache in the background (trace prefetch, background fill).

        Chunks already cached are skipped; chunks without a digest are ignored (not cacheable).
        """
        self._require_running()
        for ref in chunks:
            if ref.digest is None:
                continue  # a plain chunk cannot be cached, so fetching it ahead gains nothing
            if _chunk_key(source, ref) not in self._pending and self.cache.contains(ref.digest):
                self.stats.already_cached[priority] += 1
                continue
            self._want(source, ref, priority, waiter=False)
        self._dispatch()

    @contextlib.contextmanager
    def attaching(self):
        """While this context is open a layer attaches: its metadata and chunk table come from
        the registry outside the fetcher, over the same link, and a pull waits for them. So
        meanwhile (and ``attach_settle`` seconds after the last attach) no trace prefetch,
        speculative or background request starts, and those in flight stop after their
        current chunk (their other chunks are queued again): the attach's bytes do not queue
        behind theirs. On-demand reads and readahead go on as always."""
        self._attaching += 1
        for host in self._hosts.values():
            for request in host.requests:
                if request.priority in HELD_WHILE_ATTACHING:
                    self._cut(request)
        try:
            yield
        finally:
            self._attaching -= 1
            if self._attaching == 0:
                self._held_until = trio.current_time() + self.attach_settle
                if self._attaches_done is not None:
                    self._attaches_done.set()
                    self._attaches_done = None
                if self._nursery is not None and not self._closing:
                    self._nursery.start_soon(self._release_held, self._held_until)

    async def attaches_settled(self) -> None:
        """Return once no layer attaches, nor did within ``attach_settle``: for work that
        belongs after a pull (it would slow the attaches down, even off the link)."""
        while self._holding():
            if self._attaching:
                if self._attaches_done is None:
                    self._attaches_done = trio.Event()
                await self._attaches_done.wait()
            else:
                await trio.sleep_until(self._held_until)

    def _holding(self) -> bool:
        """Whether requests led by HELD_WHILE_ATTACHING priorities must wait (see attaching)."""
        return self._attaching > 0 or trio.current_time() < self._held_until

    async def _release_held(self, at: float) -> None:
        await trio.sleep_until(at)
        self._dispatch()

    def pending_count(self) -> int:
        return len(self._pending)

    async def wait_idle(self) -> None:
        """Return once nothing is queued, in flight or being written to the cache."""
        while self._pending:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    # ----------------------------------------------------------------- bookkeeping (no awaits)

    def _want(self, source: BlobSource, ref: ChunkRef, priority: Priority, *, waiter: bool) -> _Pending:
        key = _chunk_key(source, ref)
        pending = self._pending.get(key)
        if pending is None:
            self._seq += 1
            pending = _Pending(key, source, ref, priority, self._seq)
            self._pending[key] = pending
            if ref.digest is not None:
                self.cache.pin(ref.digest)
            self._enqueue_pending(pending)
            self.stats.queued[priority] += 1
            if waiter:
                self.stats.misses += 1
        else:
            self._promote(pending, priority)
            if waiter:
                self.stats.joined += 1
        if waiter:
            pending.waiters += 1
        return pending

    def _promote(self, pending: _Pending, priority: Priority) -> None:
        if priority >= pending.priority:
            return
        self.stats.promotions += 1
        if pending.state is _State.QUEUED:
            host = self._hosts[pending.source.host]
            host.queue.remove(pending)
            pending.priority = priority
            host.queue.add(pending)
        else:  # in backoff: requeued at the new priority
            pending.priority = priority
            request = pending.request
            if (request is not None and priority is Priority.ON_DEMAND and request.priority in YIELDING
                    and pending.ref.offset - request.received > CUT_AHEAD_BYTES):
                # Too much of a yielding request before it: fetch it in its own request instead.
                self._cut(request)

    def _demote_abandoned(self, pending: _Pending) -> None:
        """A queued on-demand chunk whose readers all gave up is still worth caching, but no
        longer ahead of reads that are waiting: it continues as a prefetch."""
        if pending.priority is not Priority.ON_DEMAND or pending.done.is_set():
            return
        if pending.state is _State.QUEUED:
            host = self._hosts[pending.source.host]
            host.queue.remove(pending)
            pending.priority = Priority.PREFETCH
            host.queue.add(pending)
        elif pending.state is _State.BACKOFF:
            pending.priority = Priority.PREFETCH

    def _cut(self, request: _Request) -> None:
        """Stop a request after the chunk it is receiving; its later chunks are queued again."""
        if request.stop_at is not None:
            return
        request.stop_at = request.received
        if request.waiting is not None and not request.in_progress():
            request.waiting.cancel()  # nothing of the next chunk has arrived: stop at once

    def _yield_link(self, host: _Host) -> None:
        """An on-demand request starts: yielding requests on its host stop after their current chunk."""
        for request in host.requests:
            if request.priority in YIELDING:
                self._cut(request)

    def _enqueue_pending(self, pending: _Pending) -> None:
        pending.state = _State.QUEUED
        host = self._hosts.get(pending.source.host)
        if host is None:
            host = self._hosts[pending.source.host] = _Host()
        host.queue.add(pending)
        by_offset = self._queued_by_source.get(pending.source.name)
        if by_offset is None:
            by_offset = self._queued_by_source[pending.source.name] = SortedKeyList(
                key=lambda p: (p.ref.offset, p.seq))
        by_offset.add(pending)

    def _dequeue_pending(self, pending: _Pending) -> None:
        self._hosts[pending.source.host].queue.remove(pending)
        by_offset = self._queued_by_source[pending.source.name]
        by_offset.remove(pending)
        if not by_offset:
            del self._queued_by_source[pending.source.name]
        pending.state = _State.FETCHING

    def _dispatch(self) -> None:
        """Start requests while hosts have free slots; the best queued item leads each one."""
        nursery = self._nursery
        if nursery is None or self._closing:
            return
        holding = self._holding()
        for host in self._hosts.values():
            while host.queue and host.active < self.per_host_concurrency:
                leader = host.queue[0]
                if holding and leader.priority in HELD_WHILE_ATTACHING:
                    break  # a layer is attaching (the queue is in priority order)
                background = leader.priority is not Priority.ON_DEMAND
                if background and host.active_background >= self.background_slots:
                    break
                if leader.priority in YIELDING and host.active_on_demand:
                    break  # the link is not idle
                limit = self.max_coalesce
                if leader.priority >= Priority.PREFETCH:  # readahead wants long requests
                    budget = self.background_window - host.background_bytes
                    if budget <= 0 and host.active_background:
                        break
                    limit = min(self.background_coalesce, budget)
                yielding = leader.priority in YIELDING
                if yielding:
                    budget = self.yielding_window - host.yielding_bytes
                    if budget <= 0 and host.yielding_bytes:
                        break
                    limit = min(limit, self.yielding_coalesce, budget)
                group = self._take_group(leader, limit)
                bounded = _group_bytes(group) if leader.priority >= Priority.PREFETCH else 0
                request = _Request(host, group, leader.priority, background, bounded,
                                   _group_bytes(group) if yielding else 0, group[0].ref.offset)
                host.yielding_bytes += request.yielding
                for pending in group:
                    pending.request = request
                host.active += 1
                host.background_bytes += bounded
                if background:
                    host.active_background += 1
                else:
                    host.active_on_demand += 1
                    self._yield_link(host)
                host.requests.add(request)
                self.stats.inflight += 1
                nursery.start_soon(self._fetch_group, request)

    def _take_group(self, leader: _Pending, limit: int) -> list[_Pending]:
        """The leader plus queued neighbours (same source and priority) for one range request
        of at most ``limit`` stored bytes (the leader alone may exceed it)."""
        by_offset = self._queued_by_source[leader.source.name]
        index = by_offset.index(leader)
        start, end = leader.ref.offset, leader.ref.end
        after: list[_Pending] = []
        # Queued speculation right after an on-demand chunk rides along in its request, up to
        # yielding_coalesce bytes: streamed, it arrives after the chunks the reader waits for,
        # and saves the round trip a separate request would cost.
        ride = self.yielding_coalesce if leader.priority is Priority.ON_DEMAND else 0
        for pending in by_offset.islice(index + 1):
            ref = pending.ref
            if ref.offset < end:  # overlapping stored ranges are not merged
                continue
            if ref.offset - end > self.max_gap or ref.end - start > limit:
                break
            if pending.priority != leader.priority:
                if pending.priority not in YIELDING or ref.end - end > ride:
                    break
                ride -= ref.end - end
            after.append(pending)
            end = ref.end
        before: list[_Pending] = []
        for pending in by_offset.islice(0, index, reverse=True):
            ref = pending.ref
            if ref.end > start:
                continue
            if (start - ref.end > self.max_gap or pending.priority != leader.priority
                    or end - ref.offset > limit):
                break
            before.append(pending)
            start = ref.offset
        group = before[::-1] + [leader] + after
        for pending in group:
            self._dequeue_pending(pending)
        return group

    def _deliver(self, pending: _Pending, data: bytes) -> None:
        """Wake the waiters with verified bytes. The item stays registered (and pinned) until
        ``_retire``, after the cache write, so a read arriving meanwhile joins it, not refetches."""
        pending.result = data
        self.stats.done[pending.priority] += 1
        pending.done.set()

    def _failed(self, pending: _Pending, cause: BaseException, reason: str) -> float | None:
        """Count a failed attempt; returns the backoff delay, or None if the chunk failed for good."""
        pending.failures += 1
        now = trio.current_time()
        if pending.first_failure is None:
            pending.first_failure = now
        delay = self.retry.delay(pending.failures)
        limit = self.retry.give_up_after
        out_of_time = limit is not None and now + delay - pending.first_failure > limit
        if pending.failures >= self.retry.attempts or out_of_time or self._closing or _is_permanent(cause):
            log.warning("giving up on chunk at %d+%d of %s after %d attempt(s): %s",
                        pending.ref.offset, pending.ref.stored_length, pending.source.name,
                        pending.failures, reason)
            pending.cause = cause
            self._finish_failed(pending, reason)
            return None
        self.stats.retries += 1
        pending.state = _State.BACKOFF
        log.info("chunk at %d+%d of %s: attempt %d failed (%s); retrying in %.3fs",
                 pending.ref.offset, pending.ref.stored_length, pending.source.name,
                 pending.failures, reason, delay)
        return delay

    def _finish_failed(self, pending: _Pending, reason: str) -> None:
        if pending.done.is_set():
            return
        pending.error = FetchError(pending.source.name, pending.ref, pending.failures, reason)
        self.stats.failed_chunks += 1
        self._finish(pending)

    def _finish(self, pending: _Pending) -> None:
        if pending.state is _State.QUEUED:
            self._dequeue_pending(pending)
        self._retire(pending)
        pending.done.set()

    def _retire(self, pending: _Pending) -> None:
        if self._pending.get(pending.key) is pending:
            del self._pending[pending.key]
            if pending.ref.digest is not None:
                self.cache.unpin(pending.ref.digest)
            if not self._pending and self._idle is not None:
                self._idle.set()
                self._idle = None

    # ----------------------------------------------------------------- tasks

    async def _fetch_group(self, request: _Request) -> None:
        """One range request. Its bytes are read as they arrive, and each chunk is decoded,
        verified, handed to its waiters and written to the cache as soon as its stored bytes are
        complete, so the first chunks of a long request do not wait for the last ones."""
        group = request.group
        source = group[0].source
        start = group[0].ref.offset
        end = max(p.ref.end for p in group)
        retry_after: dict[float, list[_Pending]] = {}
        unstored: list[_Pending] = []  # delivered, cache write not done yet
        arrived: list[ChunkRef] = []  # chunks whose stored bytes arrived completely
        buffer = bytearray()  # the received bytes from buffer_start on
        buffer_start = start
        began = trio.current_time()
        failure: BaseException | None = None
        try:
            stream = open_range(source, start, end - start)
            async with contextlib.aclosing(stream):
                while request.next_index < len(group):
                    with trio.CancelScope() as waiting:
                        request.waiting = waiting
                        try:
                            piece = await stream.__anext__()
                        except StopAsyncIteration:
                            piece = None
                        except (trio.Cancelled, KeyboardInterrupt):
                            raise
                        except Exception as e:
                            failure = e
                            piece = None
                    request.waiting = None
                    if waiting.cancelled_caught or failure is not None:
                        break
                    if piece is None:
                        failure = ShortRead(f"asked for {end - start} bytes at {start}, "
                                            f"got {request.received - start}")
                        break
                    buffer += piece
                    request.received += len(piece)
                    if request.received > end:
                        failure = ShortRead(f"asked for {end - start} bytes at {start}, got more")
                        break
                    while request.next_index < len(group) and group[request.next_index].ref.end <= request.received:
                        pending = group[request.next_index]
                        request.next_index += 1
                        ref = pending.ref
                        with memoryview(buffer) as view:  # one copy out; released before the del
                            stored = bytes(view[ref.offset - buffer_start:ref.end - buffer_start])
                        del buffer[:ref.end - buffer_start]  # amortised O(1) at the front
                        buffer_start = ref.end
                        arrived.append(ref)
                        await self._verify_and_deliver(pending, stored, unstored, retry_after)
                    if len(unstored) >= _STORE_ON_LOOP_MAX or sum(
                            p.ref.length for p in unstored) >= self.offload_threshold:
                        await self._store(unstored)
                        self._retire_all(unstored)
                    if self._stops_here(request):
                        break
            if failure is not None:
                self.stats.source_errors += 1
                reason = f"source error: {type(failure).__name__}: {failure}"
                for pending in group[request.next_index:]:
                    pending.request = None
                    delay = self._failed(pending, failure, reason)
                    if delay is not None:
                        retry_after.setdefault(delay, []).append(pending)
            await self._store(unstored)
        finally:
            if arrived:
                finished = trio.current_time()
                self._record_request(source, arrived, finished - began, request.received - start)
                self._notify(source, arrived, request.priority, began, finished)
            if self._nursery is not None and not self._closing:
                self._consult("on_request_done", source, arrived, request.priority)
            self._retire_all(unstored)
            host = request.host
            host.requests.discard(request)
            host.active -= 1
            host.background_bytes -= request.bounded
            host.yielding_bytes -= request.yielding
            if request.background:
                host.active_background -= 1
            else:
                host.active_on_demand -= 1
            self.stats.inflight -= 1
            stopping = self._nursery is None or self._closing
            for pending in group[request.next_index:]:  # cut (or the fetcher stops): not failed
                if pending.request is request and not pending.done.is_set():
                    pending.request = None
                    if stopping:
                        self._finish_failed(pending, "the fetcher stopped")
                    else:
                        self._enqueue_pending(pending)
            nursery = self._nursery
            for delay, pendings in retry_after.items():
                if nursery is None or self._closing:
                    for pending in pendings:
                        self._finish_failed(pending, "the fetcher stopped")
                else:
                    nursery.start_soon(self._requeue_after, delay, pendings)
            self._dispatch()
            if not self._pending and not stopping:
                self._consult("on_idle")

    def _consult(self, hook: str, *args) -> None:
        """Tell the fetch policies (they may enqueue; they must not await)."""
        policies = self.policies
        if policies is None:
            return
        try:
            getattr(policies, hook)(*args)
        except Exception:
            log.exception("fetch policies: %s failed", hook)

    def _stops_here(self, request: _Request) -> bool:
        """A cut request ends before its next chunk, unless a reader waits for that chunk and
        it is about to arrive."""
        if request.stop_at is None or request.next_index >= len(request.group):
            return False
        following = request.group[request.next_index]
        if following.ref.offset < request.stop_at:
            return False  # the chunk in progress when the request was cut: finish it
        return not (following.priority is Priority.ON_DEMAND
                    and following.ref.offset - request.received <= CUT_AHEAD_BYTES)

    async def _verify_and_deliver(self, pending: _Pending, stored: bytes, delivered: list[_Pending],
                                  retry_after: dict[float, list[_Pending]]) -> None:
        pending.request = None
        try:
            chunk = await self._decode(pending.ref, stored)
        except ChunkCorrupt as e:
            self.stats.verify_failures += 1
            delay = self._failed(pending, e, f"verification failed: {e}")
            if delay is not None:
                retry_after.setdefault(delay, []).append(pending)
            return
        self._deliver(pending, chunk)
        delivered.append(pending)

    def _retire_all(self, delivered: list[_Pending]) -> None:
        for pending in delivered:
            self._retire(pending)
        delivered.clear()

    async def _save_index_periodically(self) -> None:
        while True:
            await trio.sleep(self.index_save_interval)
            try:
                await trio.to_thread.run_sync(self.cache.save_index, limiter=self._cpu_limiter)
            except CacheError as e:
                log.info("cache index snapshot not saved: %s", e)

    async def _requeue_after(self, delay: float, pendings: list[_Pending]) -> None:
        await trio.sleep(delay)
        for pending in pendings:
            if not pending.done.is_set():
                self._enqueue_pending(pending)
        self._dispatch()

    async def _decode(self, ref: ChunkRef, stored: bytes) -> bytes:
        if ref.length >= self.offload_threshold:
            return await trio.to_thread.run_sync(decode_chunk, ref, stored, limiter=self._cpu_limiter)
        return decode_chunk(ref, stored)

    async def _store(self, delivered: list[_Pending]) -> None:
        """Publish verified chunks in the cache; many or large ones in one worker-thread call."""
        items = [(p.ref.digest, p.result) for p in delivered if p.ref.digest is not None]
        if not items:
            return
        if len(items) >= _STORE_ON_LOOP_MAX or sum(len(data) for _, data in items) >= self.offload_threshold:
            failures = await trio.to_thread.run_sync(self._put_many, items, limiter=self._cpu_limiter)
        else:
            failures = self._put_many(items)
        # The reads still got their verified bytes; only the cache copy is missing. A full
        # disk fails every store: say so once, and once more when stores work again.
        self.stats.cache_put_errors += len(failures)
        if failures and not self._cache_failing:
            digest, error = failures[0]
            log.warning("cannot cache chunk %s: %s (reads are served from memory; further failures "
                        "are counted in stats as cache_put_errors)", digest.hex(), error)
        elif not failures and self._cache_failing:
            log.info("chunks are cached again after %d failed stores", self.stats.cache_put_errors)
        self._cache_failing = bool(failures)

    def _put_many(self, items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, CacheError]]:
        failures = []
        for digest, data in items:
            try:
                self.cache.put(digest, data)
            except CacheError as e:
                failures.append((digest, e))
        return failures

    async def _read_cached(self, digests: list[bytes], total: int) -> list[bytes | None]:
        if total >= self.offload_threshold:
            return await trio.to_thread.run_sync(self._get_many, digests, limiter=self._cpu_limiter)
        return self._get_many(digests)

    def _get_many(self, digests: list[bytes]) -> list[bytes | None]:
        return [self.cache.get(digest) for digest in digests]

    def _record_request(self, source: BlobSource, refs: list[ChunkRef], seconds: float, nbytes: int) -> None:
        self.stats.requests += 1
        self.stats.bytes_fetched += nbytes
        self.stats.chunks_fetched += len(refs)
        self.stats.coalesced_chunks += len(refs) - 1
        self.stats.record_latency(seconds)

    def _notify(self, source: BlobSource, refs: list[ChunkRef], priority: Priority,
                began: float, finished: float) -> None:
        for observer in self.observers:
            try:
                observer(source, refs, priority, began, finished)
            except Exception:
                log.exception("fetch observer %r failed", observer)
