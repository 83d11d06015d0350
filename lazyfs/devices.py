"""Device readers: the bytes of an image's extra device, chunk by chunk through the fetcher.

Both kinds of layer divide their device into a grid of ``chunk_size`` cells:

* a lazyfs layer's chunk device, whose cell *n* is chunk-table entry *n* (a zstd frame with
  an xxh3-128 digest somewhere in the layer blob);
* the uncompressed blob of a plain ``mkfs.erofs --blobdev`` image, whose cell *n* is simply
  bytes ``[n*chunk_size, (n+1)*chunk_size)`` of the blob (no digest: trusted mode).

A read of a device range asks the fetcher for every cell it touches in one call, so one
kernel read that spans several chunks is served by one (coalesced) request.
"""

from __future__ import annotations

from collections.abc import Callable

from lazyfs.fetch import BlobSource, ChunkFetcher, ChunkRef, FetchError, Priority
from lazyfs.layerfs import DeviceReadError

# Plain blobs have no chunk table; this is the fetch and cache granularity for them.
PLAIN_CELL_SIZE = 1 << 20


class ChunkGridDevice:
    """A device made of fixed-size cells, each described by a ChunkRef."""

    def __init__(
        self,
        fetcher: ChunkFetcher,
        source: BlobSource,
        chunk_size: int,
        device_size: int,
        chunk_ref: Callable[[int], ChunkRef],
        priority: Priority = Priority.ON_DEMAND,
    ):
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.fetcher = fetcher
        self.source = source
        self.chunk_size = chunk_size
        self.device_size = device_size
        self.chunk_ref = chunk_ref
        self.priority = priority

    def refs_for(self, offset: int, length: int) -> tuple[int, list[ChunkRef]]:
        """(first cell index, refs of every cell touching [offset, offset+length))."""
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        return first, [self.chunk_ref(n) for n in range(first, last + 1)]

    async def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if offset < 0 or offset + length > self.device_size:
            raise DeviceReadError(
                f"{self.source.name}: range {offset}+{length} outside the device ({self.device_size} bytes)")
        first, refs = self.refs_for(offset, length)
        try:
            chunks = await self.fetcher.get(self.source, refs, self.priority)
        except FetchError as e:
            raise DeviceReadError(str(e)) from e
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


def plain_blob_device(fetcher: ChunkFetcher, source: BlobSource, blob_size: int,
                      cell_size: int = PLAIN_CELL_SIZE) -> ChunkGridDevice:
    """The device of a plain ``mkfs.erofs --blobdev`` image: the blob itself, read raw."""

    def ref(n: int) -> ChunkRef:
        offset = n * cell_size
        length = min(cell_size, blob_size - offset)
        return ChunkRef(offset=offset, stored_length=length, length=length, digest=None, compression="none")

    return ChunkGridDevice(fetcher, source, cell_size, blob_size, ref)
