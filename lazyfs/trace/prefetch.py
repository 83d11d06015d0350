"""Which chunks of a layer a trace prefetches (the daemon's prefetch, `lazyfs trace stats --image`)."""

from __future__ import annotations

from lazyfs.erofs.errors import ErofsError
from lazyfs.layer.reader import Layer
from lazyfs.trace.format import Trace


def prefetch_chunks(layer: Layer, digest: str, trace: Trace, embedded: bool) -> list[int]:
    """The layer's chunks to prefetch, in first-access order.

    A trace recorded on this very layer names its chunks by number. An embedded trace was
    recorded before conversion (another digest, other chunk numbers: convert may reorder
    files), so its records are followed by path: every chunk of each traced file, in order.
    """
    if not embedded:
        return [n for n in trace.chunks_of(digest) if n < layer.chunk_count]
    chunks: list[int] = []
    seen_paths: set[str] = set()
    seen_chunks: set[int] = set()
    image, cell = layer.image, layer.chunk_size
    for access in trace.accesses:
        if access.path in seen_paths or access.path == "?":
            continue
        seen_paths.add(access.path)
        try:
            nid = image.resolve(access.path)
            inode = image.inode(nid)
            if not inode.is_reg:
                continue
            extents = image.map(nid, 0, inode.size)
        except ErofsError:
            continue  # the file is in another layer of the image
        for ext in extents:
            if ext.device_id == 1 and ext.length:
                for n in range(ext.device_offset // cell, (ext.device_offset + ext.length - 1) // cell + 1):
                    if n not in seen_chunks and n < layer.chunk_count:
                        seen_chunks.add(n)
                        chunks.append(n)
    return chunks
