"""Blob sources: where the fetcher reads stored chunk bytes from, by byte range.

Each source has a ``name`` (identity of the blob, used in messages and for coalescing), a
``host`` (the unit of the fetcher's concurrency limit) and ``async read_range(offset,
length)`` returning exactly ``length`` bytes or raising SourceError. Network sources also
have ``iter_range(offset, length)``, the same bytes as pieces as they arrive, so the fetcher
can hand out each chunk of a long request as soon as its bytes are in.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio

from lazyfs.registry import ImageStore
from lazyfs.registry.retry import StreamProgress, TransientFailure


class SourceError(Exception):
    """A range read from a blob source failed or returned the wrong bytes."""

    def __init__(self, source_name: str, offset: int, length: int, reason: str, *, status: int | None = None):
        super().__init__(f"{source_name}: range {offset}+{length}: {reason}")
        self.source_name = source_name
        self.offset = offset
        self.length = length
        self.reason = reason
        self.status = status


class FileBlobSource:
    """A blob in a local file; reads go through a worker thread (os.pread)."""

    host = "local-file"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = f"file {self.path}"
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileBlobSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    async def read_range(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            raise SourceError(self.name, offset, length, "source is closed")
        return await trio.to_thread.run_sync(self._pread, self._fd, offset, length)

    def _pread(self, fd: int, offset: int, length: int) -> bytes:
        parts = []
        done = 0
        while done < length:
            try:
                part = os.pread(fd, length - done, offset + done)
            except OSError as e:
                raise SourceError(self.name, offset, length, f"read failed: {e}") from e
            if not part:
                raise SourceError(self.name, offset, length, f"end of file after {done} bytes")
            parts.append(part)
            done += len(part)
        return b"".join(parts)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HttpBlobSource:
    """A blob at a plain HTTP(S) URL that answers Range requests, over an injected client.

    Redirects are followed (a plain URL may point at object storage). A 206 must carry
    the requested Content-Range. A server that ignores Range and answers
    200 with the whole blob is tolerated: the body is streamed, the bytes before ``offset``
    are discarded and the connection is closed once the range has been read. A body must
    keep arriving (``progress_timeout`` seconds per MiB at most, as registry reads), so a
    server that drips bytes does not hold a fetch slot for ever.
    """

    def __init__(self, url: str, client: httpx.AsyncClient, progress_timeout: float | None = None):
        self.url = url
        self.client = client
        self.progress_timeout = progress_timeout
        self.name = f"url {url}"
        self.host = urlsplit(url).netloc

    async def read_range(self, offset: int, length: int) -> bytes:
        parts = []
        async with contextlib.aclosing(self.iter_range(offset, length)) as pieces:
            async for piece in pieces:
                parts.append(piece)
        return b"".join(parts)

    async def iter_range(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """The range's bytes as they arrive (exactly ``length`` in all, or SourceError)."""
        if length == 0:
            return
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        try:
            async with self.client.stream("GET", self.url, headers=headers, follow_redirects=True) as response:
                if response.status_code == 206:
                    self._check_content_range(response, offset, length)
                    skip = 0
                elif response.status_code == 200:
                    skip = offset
                else:
                    raise SourceError(self.name, offset, length,
                                      f"HTTP {response.status_code} for a range request",
                                      status=response.status_code)
                have = 0
                progress = StreamProgress(self.progress_timeout)
                async for block in response.aiter_raw():
                    progress.arrived(len(block))
                    if skip:
                        if len(block) <= skip:
                            skip -= len(block)
                            continue
                        block = block[skip:]
                        skip = 0
                    block = block[:length - have]  # a longer body is cut off unread
                    have += len(block)
                    yield block
                    if have >= length:
                        break
                if have < length:
                    raise SourceError(self.name, offset, length, f"body ended after {have} of {length} bytes")
        except httpx.HTTPError as e:
            raise SourceError(self.name, offset, length, f"{type(e).__name__}: {e}") from e
        except TransientFailure as e:
            raise SourceError(self.name, offset, length, e.reason) from None

    def _check_content_range(self, response: httpx.Response, offset: int, length: int) -> None:
        header = response.headers.get("content-range", "")
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None or int(match[1]) != offset or int(match[2]) != offset + length - 1:
            raise SourceError(self.name, offset, length, f"206 with Content-Range {header!r}",
                              status=206)


class RegistryBlobSource:
    """One blob of an image store (a registry repository or a local OCI layout), by digest.

    The store does its own transport-level retries (connection errors, 429/5xx, short
    bodies) and follows redirects; what it finally raises (RegistryError) reaches the
    fetcher, which retries the chunk with its own policy. Concurrency is limited per
    registry endpoint, so all repositories of one registry share the fetcher's slots.
    """

    def __init__(self, store: ImageStore, digest: str):
        self.store = store
        self.digest = digest
        self.name = f"{store.name}@{digest}"
        reference = getattr(store, "reference", None)
        self.host = getattr(reference, "endpoint", None) or store.name

    async def read_range(self, offset: int, length: int) -> bytes:
        return await self.store.read_range(self.digest, offset, length)

    async def iter_range(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """The range's bytes as they arrive, if the store can stream (a registry); else in one piece."""
        stream = getattr(self.store, "iter_range", None)
        if stream is None:
            yield await self.store.read_range(self.digest, offset, length)
            return
        async with contextlib.aclosing(stream(self.digest, offset, length)) as pieces:
            async for piece in pieces:
                yield piece
