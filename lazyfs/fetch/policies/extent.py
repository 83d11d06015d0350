"""Extent: on a miss, fetch the stretch of the blob around it, wider where misses keep coming.

A start without a trace is a chain of dependent reads (an import reads the next module only
once it has run this one), so every miss costs a round trip while the link idles. A
converted layer stores files in tar order, which keeps a package's files together, and a
start reads most of its files near one read before (in a recorded debian-scipy start, 661 of
782 first reads lie within 256 KiB of an earlier one), but in both directions: imports do
not follow name order. So on a miss this policy queues, at SPECULATIVE priority (an idle
link only; on-demand reads cut in, docs/design.md "Fetch policies"):

1. the rest of the missed file (``file_bytes``);
2. the stretch of the blob from ``back`` x window before the miss to a window after it, but of
   it only files of the kinds (name suffixes) that on-demand reads have asked for: a Python
   start reads compiled modules and libraries, never the sources stored beside them, and
   guessing those would double the bytes.

The window adapts per region of a layer: a miss outside the region looked at before but
within ``grow_reach`` of it means the reads range wider than guessed, so the window there
doubles (up to ``max_window``); a miss anywhere else starts a region at ``min_window``. The
defaults come from tools/notrace_model.py, which replays a recorded start through a model of
the link.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from lazyfs.fetch.policies import FetchPolicy, LayerInfo, PolicyContext
from lazyfs.fetch.scheduler import Priority


def file_kind(path: str) -> str:
    """A file's kind: its last name suffix that is not a version number (``libz.so.1.2`` ->
    ``so``, ``m.cpython-311.pyc`` -> ``pyc``), or "" without one."""
    name = path.rpartition("/")[2]
    for suffix in reversed(name.split(".")[1:]):
        if not suffix.isdigit():
            return suffix
    return ""


@dataclass
class _Region:
    """A region of a layer's blob whose reads were guessed ahead: [start, end) stored bytes."""

    start: int
    end: int
    window: int


@dataclass
class _LayerState:
    regions: list[_Region] = field(default_factory=list)  # most recently missed in last
    grown: int = 0  # how many misses doubled a window (statistics, tests)


class ExtentPolicy(FetchPolicy):
    name = "extent"
    wants_files = True  # the daemon builds each layer's FileMap for it

    # Variants the offline model (tools/notrace_model.py) compares.
    MODEL_VARIANTS: dict[str, dict] = {
        "extent (default)": {},
        "extent, every kind": {"by_kind": False},
        "extent, forward only": {"back": 0},
        "extent, fixed 128 KiB window": {"max_window": 128 << 10},
        "extent, 256 KiB..8 MiB": {"min_window": 256 << 10, "max_window": 8 << 20, "grow_reach": 2 << 20},
    }

    def __init__(self, *, min_window: int = 128 << 10, max_window: int = 1 << 20, grow_reach: int = 1 << 20,
                 back: float = 0.5, file_bytes: int = 4 << 20, max_chunks: int = 256, regions: int = 16,
                 by_kind: bool = True):
        self.min_window = min_window
        self.back = back
        self.max_window = max(max_window, min_window)
        self.grow_reach = grow_reach
        self.file_bytes = file_bytes
        # Each chunk costs CPU (decode, verify, a cache file) whatever its size.
        self.max_chunks = max_chunks
        self.max_regions = regions
        self.by_kind = by_kind
        self.kinds_read: set[str] = set()
        self._layers: dict[int, _LayerState] = {}

    def reset(self) -> None:
        """Forget everything learned (the offline model replays several starts)."""
        self._layers.clear()
        self.kinds_read.clear()

    def detach(self, ctx: PolicyContext, layer: LayerInfo) -> None:
        self._layers.pop(id(layer), None)

    def on_miss(self, ctx: PolicyContext, layer: LayerInfo, chunks: list[int]) -> None:
        ctx.queue(layer, self.guesses(layer, chunks), Priority.SPECULATIVE)

    def state(self, layer: LayerInfo) -> _LayerState:
        return self._layers.setdefault(id(layer), _LayerState())

    def window_after(self, layer: LayerInfo, offset: int) -> int:
        """The window for a miss at stored ``offset``; its region becomes the layer's last."""
        state = self.state(layer)
        for region in reversed(state.regions):
            if region.start - self.grow_reach <= offset < region.end + self.grow_reach:
                if offset < region.start or offset >= region.end:
                    # Reads range wider than what was guessed here: guess wider.
                    if region.window < self.max_window:
                        region.window = min(self.max_window, region.window * 2)
                        state.grown += 1
                state.regions.remove(region)
                state.regions.append(region)
                return region.window
        state.regions.append(_Region(offset, offset, self.min_window))
        del state.regions[:-self.max_regions]
        return self.min_window

    def guesses(self, layer: LayerInfo, chunks: list[int]) -> list[int]:
        """The chunks to queue after a miss of ``chunks``, most likely first, without repeats."""
        chosen: dict[int, None] = {}  # ordered set
        missed = set(chunks)
        files = layer.files
        if files is not None:
            for n in chunks:
                file = files.file_of(n)
                if file is not None:
                    self.kinds_read.add(file_kind(files.paths[file]))

        def wanted(n: int) -> bool:
            """Whether chunk n belongs to a file of a kind that reads have asked for."""
            if files is None or not self.by_kind:
                return True
            file = files.file_of(n)
            return file is not None and file_kind(files.paths[file]) in self.kinds_read

        def take(candidates, budget: int, bound: int | None = None, backward: bool = False,
                 filtered: bool = True) -> int | None:
            """Take candidates until the budget is spent or they are stored beyond ``bound``;
            returns the far edge of what was looked at (None: nothing)."""
            edge = None
            for n in candidates:
                if budget <= 0 or len(chosen) >= self.max_chunks:
                    break
                ref = layer.chunk_ref(n)
                if bound is not None and (ref.offset < bound if backward else ref.end > bound):
                    break
                edge = ref.offset if backward else ref.end
                if n in missed or n in chosen or (filtered and not wanted(n)):
                    continue
                chosen[n] = None
                budget -= ref.stored_length
            return edge

        first = min(chunks, key=lambda n: layer.chunk_ref(n).offset)
        last = max(chunks, key=lambda n: layer.chunk_ref(n).offset)
        start, end = layer.chunk_ref(first).offset, layer.chunk_ref(last).end
        window = self.window_after(layer, start)
        file = files.file_of(last) if files is not None else None
        if file is not None:
            own = files.chunks[file]
            take(own[own.index(last) + 1:] if last in own else own, self.file_bytes, filtered=False)
        # The window is a stretch of the blob: of it, the files of kinds that were read.
        after = take(self._following(layer, last), window, end + window)
        behind = int(window * self.back)
        before = take(self._preceding(layer, first), behind, start - behind, backward=True)
        # The region now covers what was looked at: a later miss outside it was not guessed.
        region = self.state(layer).regions[-1]
        region.start = min(region.start, start if before is None else before)
        region.end = max(region.end, end if after is None else after)
        return list(chosen)

    def _following(self, layer: LayerInfo, n: int):
        """Chunk numbers stored after chunk n, in blob order (each stored frame once)."""
        order = layer.blob_order()
        offset = layer.chunk_ref(n).offset
        previous = offset
        for i in range(bisect_left(order, (offset + 1, -1)), len(order)):  # no copy of the table
            stored_at, m = order[i]
            if stored_at != previous:
                previous = stored_at
                yield m

    def _preceding(self, layer: LayerInfo, n: int):
        """Chunk numbers stored before chunk n, nearest first (each stored frame once)."""
        order = layer.blob_order()
        offset = layer.chunk_ref(n).offset
        previous = offset
        for i in range(bisect_left(order, (offset, -1)) - 1, -1, -1):
            stored_at, m = order[i]
            if stored_at != previous:
                previous = stored_at
                yield m
