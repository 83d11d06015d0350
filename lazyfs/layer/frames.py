"""The output side of a conversion: zstd frames compressed on a pool, written in order."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import threading
from collections.abc import Callable
from typing import BinaryIO

import xxhash
import zstandard

FrameWritten = Callable[[int, int, bytes, bytes], None]


class FrameWriter:
    """Writes zstd frames to the blob in order while compression runs ahead on a thread pool.

    Compression runs on ``pool``; everything order-dependent (writing the blob, the blob's and
    the tar's sha256) runs on ``serial``, a one-thread executor whose FIFO
    keeps the order. The main thread only parses the tar and submits work, and it waits when
    the queued tasks hold more than ``max_pending_bytes`` of data, which bounds memory.
    """

    INLINE_BELOW = 64 << 10

    def __init__(self, out: BinaryIO, pool: concurrent.futures.Executor, serial: concurrent.futures.Executor,
                 level: int, max_pending_bytes: int):
        self._out = out
        self._pool = pool
        self._serial = serial
        self._level = level
        self._local = threading.local()
        self._pending: collections.deque = collections.deque()  # (future, bytes it holds)
        self._pending_bytes = 0
        self._max_pending_bytes = max_pending_bytes
        self.sha256 = hashlib.sha256()  # of the blob
        self.tar_sha256 = hashlib.sha256()  # of the uncompressed tar
        self.position = 0

    def _compress(self, data: bytes, digests: bool) -> tuple[bytes, bytes | None, bytes | None]:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self._level)
        if not digests:
            return compressor.compress(data), None, None
        return compressor.compress(data), xxhash.xxh3_128(data).digest(), hashlib.sha256(data).digest()

    def frame(self, data: bytes, written: FrameWritten | None = None) -> None:
        """Compress data into one frame. With written (a chunk), the worker also computes the
        chunk's xxh3-128 and sha256, and written(offset, stored length, xxh3, sha256) runs on
        the writer thread once the frame is in the blob."""
        if len(data) < self.INLINE_BELOW:
            # Tar headers and small files: a trip through the pool costs more than the work.
            self._queue(len(data), self._write_small_frame, data, written)
            return
        compressed = self._pool.submit(self._compress, data, written is not None)
        self._queue(len(data), self._write_frame, compressed, data, written)

    def _write_small_frame(self, data: bytes, written: FrameWritten | None) -> None:
        stored, digest, key = self._compress(data, written is not None)
        if written is not None:
            written(self.position, len(stored), digest, key)
        self._write(stored)
        self.tar_sha256.update(data)

    def _queue(self, nbytes: int, fn, *args) -> None:
        self._pending.append((self._serial.submit(fn, *args), nbytes))
        self._pending_bytes += nbytes
        while self._pending_bytes > self._max_pending_bytes:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self._pending.popleft()
        self._pending_bytes -= nbytes
        future.result()

    def _write_frame(self, compressed: concurrent.futures.Future, data: bytes, written: FrameWritten | None) -> None:
        stored, digest, key = compressed.result()
        if written is not None:
            written(self.position, len(stored), digest, key)
        self._write(stored)
        self.tar_sha256.update(data)

    def drain(self) -> None:
        while self._pending:
            self._wait_oldest()

    def cancel(self) -> None:
        """Drop queued work (after an error) so the executors shut down promptly."""
        while self._pending:
            self._pending.popleft()[0].cancel()
        self._pending_bytes = 0

    def raw(self, data: bytes) -> int:
        """Write bytes as they are (skippable frames) after every queued frame; their offset."""
        self.drain()
        offset = self.position
        self._write(data)
        return offset

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.sha256.update(data)
        self.position += len(data)
