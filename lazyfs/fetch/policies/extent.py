"""Extent: on a miss, fetch the stretch of the blob around it, growing where reads keep coming.

A start without a trace is a chain of dependent reads (an import reads the next module only
once it has run this one), so every miss costs a round trip and the link idles in between.
A converted layer stores files in tar order, which keeps a directory's files (a package's
modules, their ``__pycache__``) next to each other. So on a miss this policy queues, at
SPECULATIVE priority (an idle link only; on-demand reads cut in):

1. the rest of the missed file (``file_bytes``);
2. the other files of its directory, nearest in the blob first (``directory_bytes``): a
   package's modules are read together;
3. a window of the blob following the miss. Its size adapts per layer: a miss that lands
   just past a window queued earlier (within ``grow_reach`` of its end) means the reads walk
   through the blob faster than the window reached, so the window there doubles (up to
   ``max_window``); a miss anywhere else starts a new stretch at ``min_window``.

A miss of a chunk that was queued earlier and cut back out of the queue does not count.
Windows count stored bytes and each chunk of a queued window costs a cache file, so the
window is also bounded in chunks (``max_chunks``). The queue is in blob order per request;
the scheduler streams it as long requests on an idle link.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from lazyfs.fetch.policies import FetchPolicy, LayerInfo, PolicyContext
from lazyfs.fetch.scheduler import Priority


@dataclass
class _Stretch:
    """A stretch of a layer's blob whose reads were guessed ahead: [start, end) stored bytes."""

    start: int
    end: int
    window: int


@dataclass
class _LayerState:
    stretches: list[_Stretch] = field(default_factory=list)  # most recent last
    grown: int = 0  # how many misses doubled a window (statistics, tests)


class ExtentPolicy(FetchPolicy):
    name = "extent"
    wants_files = True  # the daemon builds each layer's FileMap for it

    # Variants the offline model (tools/notrace_model.py) compares.
    MODEL_VARIANTS: dict[str, dict] = {
        "extent (default)": {},
        "extent, no directory": {"directory_bytes": 0},
        "extent, fixed 256 KiB window": {"max_window": 256 << 10},
        "extent, up to 16 MiB": {"max_window": 16 << 20, "max_chunks": 1024},
        "extent, 1 MiB start": {"min_window": 1 << 20},
    }

    def __init__(self, *, min_window: int = 256 << 10, max_window: int = 8 << 20, grow_reach: int = 2 << 20,
                 file_bytes: int = 4 << 20, directory_bytes: int = 2 << 20, max_chunks: int = 512,
                 stretches: int = 16):
        self.min_window = min_window
        self.max_window = max(max_window, min_window)
        self.grow_reach = grow_reach
        self.file_bytes = file_bytes
        self.directory_bytes = directory_bytes
        self.max_chunks = max_chunks
        self.max_stretches = stretches
        self._layers: dict[int, _LayerState] = {}

    def reset(self) -> None:
        self._layers.clear()

    def detach(self, ctx: PolicyContext, layer: LayerInfo) -> None:
        self._layers.pop(id(layer), None)

    def on_miss(self, ctx: PolicyContext, layer: LayerInfo, chunks: list[int]) -> None:
        ctx.queue(layer, self.guesses(layer, chunks), Priority.SPECULATIVE)

    def state(self, layer: LayerInfo) -> _LayerState:
        return self._layers.setdefault(id(layer), _LayerState())

    def window_after(self, layer: LayerInfo, offset: int) -> int:
        """The window for a miss at stored ``offset``, and the stretch it now belongs to."""
        state = self.state(layer)
        for stretch in reversed(state.stretches):
            if stretch.start <= offset < stretch.end + self.grow_reach:
                if offset >= stretch.end - stretch.window // 2:
                    # Read on past (or near the end of) what was queued: guess further.
                    stretch.window = min(self.max_window, stretch.window * 2)
                    state.grown += 1
                state.stretches.remove(stretch)
                state.stretches.append(stretch)
                return stretch.window
        state.stretches.append(_Stretch(offset, offset, self.min_window))
        del state.stretches[:-self.max_stretches]
        return self.min_window

    def guesses(self, layer: LayerInfo, chunks: list[int]) -> list[int]:
        """The chunks to queue after a miss of ``chunks``, most likely first, without repeats."""
        chosen: dict[int, None] = {}  # ordered set
        missed = set(chunks)

        def take(candidates, budget: int) -> int:
            """Take candidates until the budget is spent; returns the end of the last taken."""
            end = 0
            for n in candidates:
                if budget <= 0 or len(chosen) >= self.max_chunks:
                    break
                if n in missed or n in chosen:
                    continue
                chosen[n] = None
                ref = layer.chunk_ref(n)
                budget -= ref.stored_length
                end = max(end, ref.end)
            return end

        last = max(chunks, key=lambda n: layer.chunk_ref(n).offset)
        here = layer.chunk_ref(last)
        window = self.window_after(layer, here.offset)
        files = layer.files
        file = files.file_of(last) if files is not None else None
        if file is not None:
            own = files.chunks[file]
            take(own[own.index(last) + 1:] if last in own else own, self.file_bytes)
        end = take(self._following(layer, last), window)
        if file is not None and self.directory_bytes:
            end = max(end, take(self._siblings(layer, file, last), self.directory_bytes))
        stretch = self.state(layer).stretches[-1]
        stretch.start = min(stretch.start, here.offset)
        stretch.end = max(stretch.end, here.end, end)
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

    def _siblings(self, layer: LayerInfo, file: int, n: int):
        """The chunks of the other files of the directory, nearest in the blob first."""
        files = layer.files
        assert files is not None
        here = layer.chunk_ref(n).offset
        near = sorted((abs(layer.chunk_ref(files.chunks[s][0]).offset - here), s)
                      for s in files.siblings(file) if s != file and files.chunks[s])
        for _, sibling in near:
            yield from files.chunks[sibling]
