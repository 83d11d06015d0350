"""Device readers: the bytes of an image's extra device, chunk by chunk through the fetcher.

Both kinds of layer divide their device into a grid of ``chunk_size`` cells:

* a lazyfs layer's chunk device, whose cell *n* is chunk-table entry *n* (a zstd frame with
  an xxh3-128 digest somewhere in the layer blob);
* the uncompressed blob of a plain ``mkfs.erofs --blobdev`` image, whose cell *n* is simply
  bytes ``[n*chunk_size, (n+1)*chunk_size)`` of the blob (no digest: trusted mode).

A read of a device range asks the fetcher for every cell it touches in one call, so one
kernel read that spans several chunks is served by one (coalesced) request.

Two things keep large sequential reads fast. The kernel reads a FUSE file in pieces much
smaller than a chunk (128 KiB), so the last few decoded chunks are kept in memory
(:class:`RecentChunks`, shared by all devices of a daemon, bounded in bytes): the pieces of
one chunk cost one cache read, not one each. And a read that continues where the previous
one on the same device stopped queues the next chunks as readahead (digest chunks only: they
land in the chunk cache), so the fetcher can fetch ahead in coalesced requests. Readahead
ranks below reads that wait and above trace prefetch, and unlike prefetch its requests are
not kept small: a sequential reader wants long requests.

The readahead window adapts like the kernel's page-cache readahead: a first read, or a read
that jumps, fetches only what it asks for; each read that continues into the next cell while
less than half of the window is still queued ahead doubles the window (1, 2, 4, ... cells) up
to ``readahead_bytes``. A lazy start that reads the head of a large file thus fetches that
head, not the next 32 MiB, while a long sequential read still reaches the full window after
a few chunks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import trio

from lazyfs.fetch.scheduler import BlobSource, ChunkFetcher, FetchError, Priority
from lazyfs.layer.chunks import ChunkRef
from lazyfs.serve.layerfs import DeviceReadError

# Plain blobs have no chunk table; this is the fetch granularity for them.
PLAIN_CELL_SIZE = 1 << 20
RECENT_CHUNKS_BYTES = 32 << 20
READAHEAD_BYTES = 32 << 20


class RecentChunks:
    """Decoded chunks most recently read, by key, up to a byte budget (LRU)."""

    def __init__(self, budget: int = RECENT_CHUNKS_BYTES):
        self.budget = budget
        self._chunks: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = 0

    def get(self, key: Hashable) -> bytes | None:
        data = self._chunks.get(key)
        if data is not None:
            self._chunks.move_to_end(key)
            self.hits += 1
        return data

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.budget:
            return
        old = self._chunks.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        self._chunks[key] = data
        self._bytes += len(data)
        while self._bytes > self.budget:
            _, evicted = self._chunks.popitem(last=False)
            self._bytes -= len(evicted)


class ChunkGridDevice:
    """A device made of fixed-size cells, each described by a ChunkRef."""

    def __init__(
        self,
        fetcher: ChunkFetcher,
        source: BlobSource,
        chunk_size: int,
        device_size: int,
        chunk_ref: Callable[[int], ChunkRef],
        recent: RecentChunks | None = None,
        readahead_bytes: int = READAHEAD_BYTES,
        priority: Priority = Priority.ON_DEMAND,
    ):
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.fetcher = fetcher
        self.source = source
        self.chunk_size = chunk_size
        self.device_size = device_size
        self.chunk_ref = chunk_ref
        self.recent = recent if recent is not None else RecentChunks()
        self.readahead_cells = max(0, readahead_bytes // chunk_size)
        self.priority = priority
        self.cell_count = -(-device_size // chunk_size)
        self._last_cell = -2  # last cell of the previous read; -2: none yet (cell 0 is a jump)
        self._window = 0  # current readahead window in cells (0: not sequential)
        self._prefetched_until = 0  # cells below this were already queued as readahead
        # Kernel mode: cell -> bytes of file data the metadata maps onto it (one walk of the
        # metadata, set by the layer model). read_grid pads a short cell with zeros, so a
        # table that puts a short (valid) chunk under a longer file range would otherwise read
        # as zeros where the tree read in FUSE mode fails.
        self.mapped_lengths: Callable[[], dict[int, int]] | None = None
        self._mapped: dict[int, int] | None = None
        self._mapped_lock = trio.Lock()

    def _key(self, n: int, ref: ChunkRef) -> Hashable:
        return ref.digest if ref.digest is not None else (self.source.name, n)

    @property
    def grid_size(self) -> int:
        """Bytes of the device as a file (kernel mode): every cell at its full size."""
        return self.cell_count * self.chunk_size

    async def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if offset < 0 or offset + length > self.device_size:
            raise DeviceReadError(
                f"{self.source.name}: range {offset}+{length} outside the device ({self.device_size} bytes)")
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        return self._assemble(await self._cells(first, last), first, offset, length)

    async def read_grid(self, offset: int, length: int) -> bytes:
        """Bytes of the device file: cell *n* at ``n * chunk_size``, a short cell (a file's last
        chunk) padded with zeros to the full cell, as the kernel's EROFS expects of device 1."""
        length = min(length, self.grid_size - offset)
        if length <= 0 or offset < 0:
            return b""
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        cells = await self._cells(first, last)
        for n, cell in enumerate(cells, start=first):
            if len(cell) < self.chunk_size and offset + length > n * self.chunk_size + len(cell):
                await self._check_padding(n, len(cell))
        padded = b"".join(c if len(c) == self.chunk_size else c.ljust(self.chunk_size, b"\0") for c in cells)
        start = offset - first * self.chunk_size
        return padded[start:start + length]

    async def load_mapped_lengths(self) -> dict[int, int]:
        """The cell -> mapped-bytes map, computed once off the event loop (the daemon starts
        this at attach so that reads seldom wait for it)."""
        if self._mapped is None and self.mapped_lengths is not None:
            async with self._mapped_lock:
                if self._mapped is None:
                    self._mapped = await trio.to_thread.run_sync(self.mapped_lengths)
        return self._mapped or {}

    async def _check_padding(self, n: int, have: int) -> None:
        """Zero padding after a short cell may be served only where no file maps data."""
        mapped = (await self.load_mapped_lengths()).get(n, 0)
        if mapped > have:
            raise DeviceReadError(
                f"{self.source.name}: chunk {n} has {have} bytes, the metadata maps {mapped} bytes of file data onto it")

    async def _cells(self, first: int, last: int) -> list[bytes]:
        """Decoded cells first..last: from the recent-chunks LRU, the rest in one fetcher call."""
        self._maybe_read_ahead(first, last)
        chunks: list[bytes | None] = []
        missing: list[tuple[int, int, ChunkRef]] = []  # (position, cell, ref)
        for i, n in enumerate(range(first, last + 1)):
            ref = self.chunk_ref(n)
            data = self.recent.get(self._key(n, ref))
            chunks.append(data)
            if data is None:
                missing.append((i, n, ref))
        if missing:
            try:
                fetched = await self.fetcher.get(self.source, [ref for _, _, ref in missing], self.priority)
            except FetchError as e:
                raise DeviceReadError(str(e)) from e
            for (i, n, ref), data in zip(missing, fetched):
                chunks[i] = data
                self.recent.put(self._key(n, ref), data)
        return chunks  # type: ignore[return-value]

    def _assemble(self, chunks: list[bytes], first: int, offset: int, length: int) -> bytes:
        start = offset - first * self.chunk_size
        if len(chunks) == 1:
            data = chunks[0][start:start + length]
        else:
            # Only the last cell may be shorter than chunk_size; a short cell in the middle
            # means the metadata maps a file range onto bytes that do not exist.
            for n, chunk in enumerate(chunks[:-1], start=first):
                if len(chunk) != self.chunk_size:
                    raise DeviceReadError(
                        f"{self.source.name}: chunk {n} has {len(chunk)} bytes, a read spans past it")
            data = b"".join(chunks)[start:start + length]
        if len(data) != length:
            raise DeviceReadError(
                f"{self.source.name}: range {offset}+{length} extends past the end of its chunk")
        return data

    def _maybe_read_ahead(self, first: int, last: int) -> None:
        previous = self._last_cell
        if first == last == previous:
            return  # another piece of the cell the previous read ended in: nothing new
        self._last_cell = last
        if first not in (previous, previous + 1):  # a first read or a jump: no stream (yet)
            self._window = 0
            self._prefetched_until = 0
            return
        if not self.readahead_cells:
            return
        queued_ahead = self._prefetched_until - (last + 1)
        if queued_ahead > self._window // 2:
            return  # the reader is still well behind the queued readahead
        self._window = min(self.readahead_cells, max(1, 2 * self._window))
        start = max(last + 1, self._prefetched_until)
        stop = min(self.cell_count, last + 1 + self._window)
        if start >= stop:
            return
        self._prefetched_until = stop
        refs = [self.chunk_ref(n) for n in range(start, stop)]
        refs = [ref for ref in refs if ref.digest is not None]  # plain cells are not cached
        if refs:
            self.fetcher.enqueue(self.source, refs, Priority.READAHEAD)


def plain_blob_device(fetcher: ChunkFetcher, source: BlobSource, blob_size: int,
                      cell_size: int = PLAIN_CELL_SIZE, recent: RecentChunks | None = None) -> ChunkGridDevice:
    """The device of a plain ``mkfs.erofs --blobdev`` image: the blob itself, read raw."""

    def ref(n: int) -> ChunkRef:
        offset = n * cell_size
        length = min(cell_size, blob_size - offset)
        return ChunkRef(offset=offset, stored_length=length, length=length, digest=None, compression="none")

    return ChunkGridDevice(fetcher, source, cell_size, blob_size, ref, recent=recent)
