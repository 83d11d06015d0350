"""Locality: what an on-demand miss says about the next reads.

A converted layer stores files in tar order, and tar order keeps a package's files together:
the file read next is very often stored right after the one just read, or in the same
directory. So on each on-demand miss this policy queues, at SPECULATIVE priority:

1. the rest of the missed file (up to ``file_bytes`` stored bytes);
2. the chunks stored right after the missed one in the blob (``window_bytes``);
3. the other files of the same directory whose chunks are stored within ``reach_bytes`` of the
   miss, before or after it (again bounded by ``directory_bytes`` in all);

at most ``max_chunks`` chunks per miss in all.

Speculative requests use only an idle link and are cut after their current chunk when an
on-demand request starts (lazyfs.fetch.scheduler), so a wrong guess costs a read at most one
chunk's transfer time; a right one saves a round trip per file. Parts 1 and 3 need the layer's
file map, which the daemon builds after the attach; until then only part 2 applies.
"""

from __future__ import annotations

from bisect import bisect_left

from lazyfs.fetch.policies import FetchPolicy, LayerInfo, PolicyContext
from lazyfs.fetch.scheduler import Priority


class LocalityPolicy(FetchPolicy):
    name = "locality"
    wants_files = True  # the daemon builds each layer's FileMap for it

    def __init__(self, window_bytes: int = 512 << 10, file_bytes: int = 4 << 20,
                 directory_bytes: int = 1 << 20, reach_bytes: int = 1 << 20, max_chunks: int = 32):
        self.window_bytes = window_bytes
        self.file_bytes = file_bytes
        self.directory_bytes = directory_bytes
        self.reach_bytes = reach_bytes
        # Each chunk costs CPU (decode, verify, a cache file) whatever its size; small files are
        # one chunk each, so a byte budget alone could mean hundreds of chunks per miss.
        self.max_chunks = max_chunks

    def on_miss(self, ctx: PolicyContext, layer: LayerInfo, chunks: list[int]) -> None:
        ctx.queue(layer, self.guesses(layer, chunks), Priority.SPECULATIVE)

    def guesses(self, layer: LayerInfo, chunks: list[int]) -> list[int]:
        """The chunks to queue after a miss of ``chunks``, most likely first, without repeats."""
        chosen: dict[int, None] = {}  # ordered set
        missed = set(chunks)

        def take(candidates, budget: int) -> None:
            for n in candidates:
                if budget <= 0 or len(chosen) >= self.max_chunks:
                    return
                if n in missed or n in chosen:
                    continue
                chosen[n] = None
                budget -= layer.chunk_ref(n).stored_length

        files = layer.files
        last = max(chunks, key=lambda n: layer.chunk_ref(n).offset)
        if files is not None:
            file = files.file_of(last)
            if file is not None:
                own = files.chunks[file]
                take(own[own.index(last) + 1:] if last in own else own, self.file_bytes)
        take(self._following(layer, last), self.window_bytes)
        if files is not None:
            file = files.file_of(last)
            if file is not None:
                take(self._near_siblings(layer, file, last), self.directory_bytes)
        return list(chosen)

    def _following(self, layer: LayerInfo, n: int):
        """Chunk numbers stored after chunk n, in blob order (each stored frame once)."""
        order = layer.blob_order()
        offset = layer.chunk_ref(n).offset
        i = bisect_left(order, (offset + 1, -1))
        previous = offset
        for stored_at, m in order[i:]:
            if stored_at != previous:
                previous = stored_at
                yield m

    def _near_siblings(self, layer: LayerInfo, file: int, n: int):
        """The chunks of the other files of the directory, stored within reach, nearest first."""
        files = layer.files
        assert files is not None
        here = layer.chunk_ref(n).offset
        near = []
        for sibling in files.siblings(file):
            if sibling == file or not files.chunks[sibling]:
                continue
            distance = abs(layer.chunk_ref(files.chunks[sibling][0]).offset - here)
            if distance <= self.reach_bytes:
                near.append((distance, sibling))
        for _, sibling in sorted(near):
            yield from files.chunks[sibling]
