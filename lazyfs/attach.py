"""Turning an ``attach`` request into (EROFS image, device reader): one function per layer kind.

* ``plain``: a chunk-based EROFS image made by ``mkfs.erofs --chunksize=N --blobdev=BLOB``:
  ``meta`` is the image's path, ``blob`` a path or an http(s) URL of the uncompressed blob.
* ``lazyfs``: a lazyfs layer blob in a registry or a local OCI layout (see lazyfs.layer).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from lazyfs.cache import ChunkCache
from lazyfs.devices import ChunkGridDevice, plain_blob_device
from lazyfs.erofs.errors import ErofsError
from lazyfs.erofs.reader import Image
from lazyfs.fetch import ChunkFetcher
from lazyfs.layerfs import DeviceReader
from lazyfs.sources import FileBlobSource, HttpBlobSource

log = logging.getLogger(__name__)


class AttachError(Exception):
    """The layer cannot be attached: bad request, unreachable source, invalid metadata."""


@dataclass
class AttachContext:
    fetcher: ChunkFetcher
    cache: ChunkCache
    http: httpx.AsyncClient
    insecure_registries: frozenset[str] = frozenset()


Attacher = Callable[[AttachContext, dict], Awaitable[tuple[Image, DeviceReader, dict]]]


def _string(request: dict, key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise AttachError(f"{key!r} must be a non-empty string")
    return value


async def _http_size(http: httpx.AsyncClient, url: str) -> int:
    try:
        response = await http.head(url)
    except httpx.HTTPError as e:
        raise AttachError(f"HEAD {url}: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        raise AttachError(f"HEAD {url}: HTTP {response.status_code}")
    length = response.headers.get("content-length")
    if length is None or not length.isdigit():
        raise AttachError(f"HEAD {url}: no Content-Length")
    return int(length)


def open_image(path: str | os.PathLike) -> Image:
    """Map a metadata image file and open it; AttachError for unreadable or invalid images."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise AttachError(f"{path} is empty, not an EROFS image")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise AttachError(f"cannot open metadata image {path}: {e.strerror}") from e
    try:
        return Image(mapped)
    except ErofsError as e:
        # The mapping is released with the last reference to it (the failed Image may still
        # hold a view of it, so it cannot be closed here).
        raise AttachError(f"{path} is not a usable EROFS image: {e}") from None


async def attach_plain(ctx: AttachContext, request: dict) -> tuple[Image, DeviceReader, dict]:
    meta = _string(request, "meta")
    blob = _string(request, "blob")
    image = await trio.to_thread.run_sync(open_image, meta)
    if len(image.devices) != 1:
        image.close()
        raise AttachError(f"{meta} has {len(image.devices)} extra devices; a plain image needs exactly one (--blobdev)")
    if blob.startswith(("http://", "https://")):
        source = HttpBlobSource(blob, ctx.http)
        size = await _http_size(ctx.http, blob)
    else:
        try:
            source = FileBlobSource(blob)
        except OSError as e:
            image.close()
            raise AttachError(f"cannot open blob {blob}: {e.strerror}") from e
        size = source.size
    needed = image.devices[0].blocks * image.block_size
    if size < needed:
        log.info("blob %s has %d bytes, the image declares a %d-byte device", blob, size, needed)
    device = plain_blob_device(ctx.fetcher, source, size)
    return image, device, {"kind": "plain", "meta": os.path.abspath(meta), "blob": blob}


KINDS: dict[str, Attacher] = {
    "plain": attach_plain,
}
