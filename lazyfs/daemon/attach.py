"""Turning an ``attach`` request into (EROFS image, device reader): one function per layer kind.

* ``plain``: a chunk-based EROFS image made by ``mkfs.erofs --chunksize=N --blobdev=BLOB``:
  ``meta`` is the image's path, ``blob`` a path or an http(s) URL of the uncompressed blob.
* ``lazyfs``: a lazyfs layer blob in a registry or a local OCI layout (see lazyfs.layer).
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from lazyfs.config import RegistrySettings
from lazyfs.fetch.background import BackgroundFill
from lazyfs.fetch.cache import CacheError, ChunkCache
from lazyfs.fetch.policies import FileMap, LayerInfo, PolicySet
from lazyfs.serve.devices import ChunkGridDevice, RecentChunks, plain_blob_device
from lazyfs.erofs.errors import ErofsError
from lazyfs.erofs.reader import Image
from lazyfs.fetch.scheduler import ChunkFetcher, Priority
from lazyfs.layer.annotations import from_annotations, is_lazyfs
from lazyfs.layer.errors import LayerFormatError
from lazyfs.layer.format import FOOTER_FRAME_SIZE, Section
from lazyfs.layer.reader import Layer, locate
from lazyfs.serve.layerfs import DeviceReader
from lazyfs.registry import (
    DigestMismatch, ImageStore, InvalidReference, LayoutReference, RegistryError, RetryPolicy, open_store,
    parse_any_reference, sha256_check,
)
from lazyfs.fetch.sources import FileBlobSource, HttpBlobSource
from lazyfs.trace.format import Trace, TraceError
from lazyfs.daemon.learned import LearnedTraces, learned_chunks
from lazyfs.trace.prefetch import prefetch_chunks

log = logging.getLogger(__name__)


class AttachError(Exception):
    """The layer cannot be attached: bad request, unreachable source, invalid metadata."""


@dataclass
class AttachContext:
    fetcher: ChunkFetcher
    cache: ChunkCache
    http: httpx.AsyncClient  # plain blob URLs
    registry_http: httpx.AsyncClient  # registries (redirects are followed by the registry client)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    stores: "_Stores" = field(default_factory=lambda: _Stores())
    recent: RecentChunks = field(default_factory=RecentChunks)  # decoded chunks, daemon-wide
    background: BackgroundFill | None = None  # fills layers attached with background_fetch
    policies: PolicySet | None = None  # fetch policies (None: readahead and trace prefetch)
    learned: LearnedTraces = field(default_factory=LearnedTraces)  # traces found in registries
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # manifests, metadata, chunk tables, traces
    chunk_retry: RetryPolicy = field(default_factory=lambda: CHUNK_RETRY)  # chunk ranges


@dataclass
class Attached:
    """What an attacher made: the metadata, the device reader, what `list` shows, and for the
    kernel serving mode a descriptor of the metadata image as a file (owned: close_meta)."""

    image: Image
    device: DeviceReader
    info: dict
    meta_fd: int | None = None

    def close_meta(self) -> None:
        fd, self.meta_fd = self.meta_fd, None
        if fd is not None:
            os.close(fd)


Attacher = Callable[[AttachContext, dict], Awaitable[Attached]]


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


async def attach_plain(ctx: AttachContext, request: dict) -> Attached:
    with ctx.fetcher.attaching():
        return await _attach_plain(ctx, request)


async def _attach_plain(ctx: AttachContext, request: dict) -> Attached:
    meta = _string(request, "meta")
    blob = _string(request, "blob")
    image = await trio.to_thread.run_sync(open_image, meta)
    if len(image.devices) != 1:
        image.close()
        raise AttachError(f"{meta} has {len(image.devices)} extra devices; a plain image needs exactly one (--blobdev)")
    if blob.startswith(("http://", "https://")):
        source = HttpBlobSource(blob, ctx.http, progress_timeout=ctx.retry.attempt_timeout)
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
    device = plain_blob_device(ctx.fetcher, source, size, recent=ctx.recent)
    try:
        meta_fd: int | None = os.open(meta, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:  # it was readable a moment ago; kernel mode only needs it
        log.info("cannot reopen %s: %s", meta, e)
        meta_fd = None
    return Attached(image, device, {"kind": "plain", "meta": os.path.abspath(meta), "blob": blob}, meta_fd)


class StoreBlobSource:
    """One blob of an image store (registry repository or OCI layout) as a fetcher BlobSource."""

    def __init__(self, store: ImageStore, digest: str, host: str, retry: RetryPolicy):
        self.store = store
        self.digest = digest
        self.name = f"{store.name}@{digest}"
        self.host = host
        self.retry = retry

    async def read_range(self, offset: int, length: int) -> bytes:
        return await self.store.read_range(self.digest, offset, length, what="chunk range", retry=self.retry)


@dataclass
class _Stores:
    """Image stores by repository, shared by all layers of one daemon (one auth state each)."""

    by_name: dict[str, ImageStore] = field(default_factory=dict)

    def get(self, ctx: AttachContext, ref: str) -> tuple[ImageStore, str]:
        try:
            parsed = parse_any_reference(ref)
        except InvalidReference as e:
            raise AttachError(f"invalid image reference {ref!r}: {e}") from e
        if isinstance(parsed, LayoutReference):
            key, host = f"oci:{os.path.abspath(parsed.path)}", "oci-layout"
        else:
            key, host = f"{parsed.registry}/{parsed.repository}", parsed.endpoint
        store = self.by_name.get(key)
        if store is None:
            try:
                store = open_store(ref, http=ctx.registry_http, retry=ctx.retry, **ctx.registry.store_options())
            except RegistryError as e:  # a bad hosts.toml
                raise AttachError(str(e)) from e
            self.by_name[key] = store
        return store, host


# Chunk reads are retried by the fetcher (per chunk, with its own backoff); the store only
# retries briefly so that one bad response does not multiply into many requests. Everything
# else an attach reads (metadata, chunk table, trace) has the store's full policy.
CHUNK_RETRY = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.5, deadline=30.0)


async def _section_bytes(ctx: AttachContext, store: ImageStore, digest: str, section: Section,
                         what: str) -> bytes:
    """A metadata/table/trace section's stored bytes: from the cache, else by a range read
    that is repeated until the bytes match the section's sha256 (or the retries run out)."""
    key = section.sha256.hex()
    path = ctx.cache.meta_path(key)
    if path is not None:
        return await trio.to_thread.run_sync(path.read_bytes)
    try:
        stored = await store.read_range(digest, section.offset, section.stored_size,
                                        verify=sha256_check(section.sha256), what=what)
    except RegistryError as e:
        raise AttachError(f"layer {digest}: {e}") from e
    try:
        ctx.cache.put_meta(key, stored)
    except CacheError as e:
        # A full disk costs the copy, not the attach: the bytes are verified when opened.
        log.warning("layer %s: section %s not cached: %s", digest, key, e)
    return stored


def _decode_file_backed(section: Section, stored: bytes, directory: Path) -> tuple[mmap.mmap, int]:
    """The decoded section in an unnamed file mapped read-only: reclaimable page cache, not
    daemon heap. It is decoded straight into the file, a piece at a time. Also returns a
    read-only descriptor of the file (the kernel serving mode mounts it).

    A layer's metadata holds its small files inline, so it can be large (100 MB for 100k
    small files); mapped from a file, only the pages in use stay resident.
    """
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        def write(piece: bytes) -> None:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]

        section.open_into("meta", stored, write)
        mapped = mmap.mmap(fd, section.size, access=mmap.ACCESS_READ)
        return mapped, os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _load_layer(cache_root: Path, index, meta_stored: bytes, table_stored: bytes,
                trusted: bool) -> tuple[Layer, int | None]:
    """Verify and open a layer's sections (in a worker thread: hashing and zstd); the layer
    and a descriptor of its metadata as a file (None when it stays in memory)."""
    table = index.table.open("table", table_stored)
    meta_fd = None
    try:
        meta, meta_fd = _decode_file_backed(index.meta, meta_stored, cache_root / "tmp")
    except OSError as e:  # no O_TMPFILE on this filesystem, or it is full: keep it in memory
        log.info("metadata stays in memory: %s", e)
        meta = index.meta.open("meta", meta_stored)
    try:
        return Layer.from_verified(meta, table, index.chunk_size, trusted_footer=trusted,
                                   data_limit=index.data_limit), meta_fd
    except BaseException:
        if meta_fd is not None:
            os.close(meta_fd)
        raise


async def _sections_bytes(ctx: AttachContext, store: ImageStore, digest: str,
                          sections: list[tuple[Section, str]]) -> list[bytes]:
    """Several sections' stored bytes, fetched side by side (one round trip, not one each).
    If any fails, the error of the first failed one in list order is raised (the same error
    whichever read gives up first; each read's retries are bounded)."""
    results: list[bytes] = [b""] * len(sections)
    failures: dict[int, Exception] = {}

    async def one(i: int, section: Section, what: str) -> None:
        try:
            results[i] = await _section_bytes(ctx, store, digest, section, what)
        except Exception as e:
            failures[i] = e

    async with trio.open_nursery() as nursery:
        for i, (section, what) in enumerate(sections):
            nursery.start_soon(one, i, section, what)
    if failures:
        raise failures[min(failures)]
    return results


async def attach_lazyfs(ctx: AttachContext, request: dict) -> Attached:
    # Attach-critical fetches first: no prefetch starts on the link until the layer is attached.
    with ctx.fetcher.attaching():
        return await _attach_lazyfs(ctx, request)


async def _attach_lazyfs(ctx: AttachContext, request: dict) -> Attached:
    ref = _string(request, "ref")
    digest = _string(request, "digest")
    annotations = request.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise AttachError("'annotations' must be an object of strings")
    size = request.get("size")
    _background_rate(request)  # a bad value is refused before anything is fetched
    store, host = ctx.stores.get(ctx, ref)
    try:
        if size is None:
            size = await store.blob_size(digest)
            if size is None:
                raise AttachError(f"blob {digest} is not in {store.name}")
        if is_lazyfs(annotations):
            index, trusted = from_annotations(annotations, size), False
        else:
            tail = await _footer_bytes(store, digest, size)
            index, trusted = locate(lambda _o, _l: tail, size), True
            log.warning("layer %s: no lazyfs annotations, trusting the footer of the blob", digest)
        sections = [(index.meta, "layer metadata"), (index.table, "chunk table")]
        if request.get("prefetch") and request.get("trace") is None and index.trace is not None:
            sections.append((index.trace, "embedded trace"))
        meta, table, *trace = await _sections_bytes(ctx, store, digest, sections)
        layer, meta_fd = await trio.to_thread.run_sync(_load_layer, ctx.cache.root, index, meta, table, trusted)
    except LayerFormatError as e:
        raise AttachError(f"layer {digest} of {store.name}: {e}") from e
    except RegistryError as e:
        raise AttachError(f"layer {digest} of {store.name}: {e}") from e
    try:
        device, info = await _serve_lazyfs(ctx, request, store, host, index, layer, trusted,
                                           trace[0] if trace else None)
    except BaseException:
        if meta_fd is not None:
            os.close(meta_fd)
        raise
    return Attached(layer.image, device, info, meta_fd)


async def _serve_lazyfs(ctx: AttachContext, request: dict, store: ImageStore, host: str, index, layer: Layer,
                        trusted: bool, trace_stored: bytes | None) -> tuple[ChunkGridDevice, dict]:
    """The device reader and `list` info of a loaded lazyfs layer; queues its prefetch and
    background fill (``trace_stored``: the embedded trace's stored bytes, if fetched)."""
    ref, digest = request["ref"], request["digest"]
    background_rate = _background_rate(request)
    source = StoreBlobSource(store, digest, host, ctx.chunk_retry)
    readahead = ctx.policies is None or ctx.policies.readahead
    device = ChunkGridDevice(ctx.fetcher, source, layer.chunk_size, layer.device_size, layer.chunk_ref,
                             recent=ctx.recent, **({} if readahead else {"readahead_bytes": 0}))
    info = {"kind": "lazyfs", "ref": ref, "digest": digest, "chunk_size": layer.chunk_size,
            "chunks": layer.chunk_count, "trusted_footer": trusted}
    found = await _prefetch_trace(digest, index, request, trace_stored)
    layer_info = None
    if ctx.policies is not None:
        layer_info = LayerInfo(_string(request, "name"), source, layer.chunk_count, layer.chunk_ref,
                               background_rate=background_rate)
        ctx.policies.attach(layer_info)
        if ctx.policies.wants_files:
            ctx.policies.build_files_soon(layer_info, lambda: file_map(layer))
        info["policies"] = ctx.policies.names
    learn = None
    if request.get("learned_trace") or request.get("record_trace"):
        learn = functools.partial(
            _learn, ctx, store, ref, digest, _given_manifest(request), layer, source,
            bool(request.get("learned_trace")) and found is None and index.trace is None)
    if found is not None or learn is not None:
        # After the attach, in the background: the pull must not wait for the trace's chunks
        # to be looked up, nor for a learned trace.
        info[AFTER_ATTACH] = functools.partial(_after_attach, ctx, layer, digest, source, found, layer_info, learn)
    if request.get("background_fetch") and not (ctx.policies and "background" in ctx.policies.names):
        if ctx.background is None:
            raise AttachError("this daemon does not fetch in the background")
        # Queued now, started by the fill once the fetcher is idle: after the prefetch above.
        ctx.background.add(_string(request, "name"), source,
                           [layer.chunk_ref(n) for n in range(layer.chunk_count)], background_rate)
        info["background_fetch"] = {"rate": background_rate}
    return device, info


AFTER_ATTACH = "_after_attach"  # info key: what the daemon runs once the layer is attached


async def _after_attach(ctx: AttachContext, layer: Layer, digest: str, source: StoreBlobSource,
                        found: tuple[Trace, bool] | None, layer_info: LayerInfo | None,
                        learn: Callable[..., Awaitable[None]] | None, info: dict,
                        on_manifest: Callable[[str], None]) -> None:
    """What follows an attach without delaying it (``info`` is the layer's live ``list``
    entry): the chunks of its trace queued for prefetch, then learned traces. Following an
    embedded trace's paths through the metadata takes up to half a second of CPU on a large
    layer; it waits until the layers being attached (the rest of a pull) are attached, as the
    prefetch would anyway."""
    if found is not None:
        trace, embedded = found
        await ctx.fetcher.attaches_settled()
        chunks = await trio.to_thread.run_sync(prefetch_chunks, layer, digest, trace, embedded)
        if layer_info is not None:
            layer_info.trace_chunks = chunks
        if chunks and (ctx.policies is None or "trace" in ctx.policies.names):
            ctx.fetcher.enqueue(source, [layer.chunk_ref(n) for n in chunks], Priority.PREFETCH)
        info["prefetch_chunks"] = len(chunks)
    if learn is not None:
        await learn(info, on_manifest)


def _given_manifest(request: dict) -> str | None:
    manifest = request.get("image_manifest")
    if manifest is not None and (not isinstance(manifest, str) or not manifest.startswith("sha256:")):
        raise AttachError("'image_manifest' must be the image manifest's sha256 digest")
    return manifest


async def _learn(ctx: AttachContext, store: ImageStore, ref: str, digest: str, manifest: str | None,
                 layer: Layer, source: StoreBlobSource, prefetch: bool, info: dict,
                 on_manifest: Callable[[str], None]) -> None:
    """Learned traces of an attached layer (``info`` is its live ``list`` entry): find the image
    manifest it belongs to (``image_manifest``, else what ``ref`` resolves to if the layer is
    one of its layers), report it (the daemon records the start), and with ``prefetch``
    prefetch from the trace attached to that image in the registry."""
    if manifest is None:
        manifest = await ctx.learned.manifest_of(store, parse_any_reference(ref).object, digest)
        if manifest is None:
            return
    info["image_manifest"] = manifest
    on_manifest(manifest)
    if not prefetch:
        return
    learned = await _learned_trace_chunks(ctx, store, manifest, digest, layer)
    if learned is not None:
        artifact, chunks = learned
        if chunks and (ctx.policies is None or "trace" in ctx.policies.names):
            ctx.fetcher.enqueue(source, [layer.chunk_ref(n) for n in chunks], Priority.PREFETCH)
        info["prefetch_chunks"] = len(chunks)
        info["learned_trace"] = artifact


async def _learned_trace_chunks(ctx: AttachContext, store: ImageStore, manifest: str, digest: str,
                                layer: Layer) -> tuple[str, list[int]] | None:
    """(artifact digest, chunks) from a trace attached in the registry to the image whose
    manifest is ``manifest``; None when there is none or it does not fit the layer. The
    trace was checked against the image's layers when pulled and only orders chunks that the
    layer's verified table describes."""
    pulled = await ctx.learned.lookup(store, manifest)
    if pulled is None:
        return None
    chunks = learned_chunks(pulled.trace, digest, layer.chunk_size, layer.chunk_count)
    return None if chunks is None else (pulled.artifact, chunks)


async def _footer_bytes(store: ImageStore, digest: str, size: int) -> bytes:
    """The last bytes of a blob read without annotations: read again while they do not decode
    as a footer (a fault in transit fails its CRC32C); a blob that never has one is read once
    more, unchecked, so that decoding it says why (not a lazyfs layer, another version...)."""
    if size < FOOTER_FRAME_SIZE:
        return b""

    def decodes(tail: bytes) -> bool:
        try:
            locate(lambda _o, _l: tail, size)
        except LayerFormatError:
            return False
        return True

    offset = size - FOOTER_FRAME_SIZE
    try:
        return await store.read_range(digest, offset, FOOTER_FRAME_SIZE, verify=decodes, what="layer footer")
    except DigestMismatch:
        return await store.read_range(digest, offset, FOOTER_FRAME_SIZE, what="layer footer")


def _background_rate(request: dict) -> int | None:
    """``background_rate``: stored bytes per second of the background fill, or absent/None."""
    rate = request.get("background_rate")
    if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0):
        raise AttachError("'background_rate' must be a positive number of bytes per second")
    return rate


async def _prefetch_trace(digest: str, index, request: dict,
                          trace_stored: bytes | None) -> tuple[Trace, bool] | None:
    """(trace, embedded): a file named by ``trace``, else (with ``prefetch``) the layer's own,
    whose stored bytes the attach fetched with its metadata."""
    path = request.get("trace")
    try:
        if path is not None:
            if not isinstance(path, str):
                raise AttachError("'trace' must be the path of a trace file")
            try:
                return Trace.decode(await trio.to_thread.run_sync(Path(path).read_bytes)), False
            except OSError as e:
                raise AttachError(f"cannot read trace {path}: {e.strerror}") from e
        if trace_stored is not None:
            return Trace.decode(index.trace.open("trace", trace_stored)), True
    except (TraceError, LayerFormatError) as e:
        raise AttachError(f"layer {digest}: trace: {e}") from e
    return None


def file_map(layer: Layer) -> FileMap:
    """Each regular file of the layer with its chunk numbers, in directory-walk order (for the
    fetch policies; built in a worker thread)."""
    image, cell = layer.image, layer.chunk_size
    files = []
    for path, inode in image.walk():
        if not inode.is_reg or not inode.size:
            continue
        chunks: list[int] = []
        try:
            extents = image.map(inode.nid, 0, inode.size)
        except ErofsError:
            continue
        for ext in extents:
            if ext.device_id == 1 and ext.length:
                chunks.extend(range(ext.device_offset // cell, (ext.device_offset + ext.length - 1) // cell + 1))
        if chunks:
            files.append((path.decode("utf-8", "surrogateescape"), [n for n in chunks if n < layer.chunk_count]))
    return FileMap(files)


KINDS: dict[str, Attacher] = {
    "plain": attach_plain,
    "lazyfs": attach_lazyfs,
}
