"""Keeping the daemon's resident set to what it uses: idle metadata pages are unmapped.

A layer's metadata image is mapped read-only from a file (a lazyfs layer: an unnamed file in
the cache's tmp directory; a plain image: the image file). The layer format inlines small
files into the metadata, and EROFS keeps an inode's inline data right behind the inode, so
a stat walk over a many-file layer touches every page of the image (120 MiB for 100,000
files of up to 2 KiB). Those pages are page cache, shared and reclaimable, but while
they are mapped they count in the daemon's RSS.

Every ``interval`` seconds :class:`MetadataTrimmer` drops the daemon's mappings of every
attached layer's metadata with ``madvise(MADV_DONTNEED)``. On a shared file mapping that
only removes page-table entries: the pages stay in the page cache, and the next access
maps them again with a minor fault (no I/O; fault-around maps 16 neighbouring pages at
once). The bytes seen through the mapping never change: the file is written once before
it is mapped and never truncated while mapped.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Iterable

import trio

from lazyfs.serve.layerfs import AttachedLayer

log = logging.getLogger(__name__)

TRIM_INTERVAL = 2.0


def metadata_mapping(layer: AttachedLayer) -> mmap.mmap | None:
    """The file mapping a layer's metadata image reads from, if it is one."""
    owner = layer.image.buffer
    return owner if isinstance(owner, mmap.mmap) and not owner.closed else None


class MetadataTrimmer:
    """Unmaps the attached layers' metadata pages periodically (see the module docstring)."""

    def __init__(self, layers: Callable[[], Iterable[AttachedLayer]], interval: float = TRIM_INTERVAL):
        self.layers = layers
        self.interval = interval
        self.trims = 0

    def trim(self) -> int:
        """Drop the mappings now; returns how many layer images were trimmed."""
        trimmed = 0
        for layer in self.layers():
            mapping = metadata_mapping(layer)
            if mapping is None:
                continue
            try:
                mapping.madvise(mmap.MADV_DONTNEED)
            except (ValueError, OSError) as e:  # closed by a detach meanwhile
                log.debug("metadata of layer %s not trimmed: %s", layer.name, e)
                continue
            trimmed += 1
        self.trims += 1
        return trimmed

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.trim()
