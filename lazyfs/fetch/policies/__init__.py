"""Fetch policies: what to fetch before a reader asks for it.

The fetcher consults a :class:`PolicySet` at three moments: an on-demand read missed chunks
(``on_miss``), a range request ended (``on_request_done``), and nothing is queued or in flight
any more (``on_idle``); the daemon adds ``attach``/``detach`` of layers. A policy answers by
queueing chunks of a layer at a priority (``ctx.queue``): on-demand reads always come first,
then READAHEAD > PREFETCH (traces) > SPECULATIVE (guesses such as locality) > BACKGROUND.

Hooks are plain functions on the trio thread: they must not block or await (they run inside
the fetcher's bookkeeping); a hook that raises is logged and ignored. What a policy may know
about a layer is a :class:`LayerInfo`, filled in by the daemon (the fetch package does not see
the serving or daemon code): the chunk table, the trace's chunks, and -- once built in a worker
thread after the attach -- the :class:`FileMap` from chunks to files and directories.

Policies are named: ``none``, ``readahead``, ``trace``, ``background``, ``locality``, or
``package.module:Class`` for a class of one's own (constructed without arguments). Several
combine (``trace,locality``): each sees every event.
"""

from __future__ import annotations

import importlib
import logging
import posixpath
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from lazyfs.fetch.policy_names import BUILTIN_NAMES, DEFAULT_POLICIES, PolicyError, parse_policy_names
from lazyfs.fetch.scheduler import BlobSource, ChunkFetcher, Priority
from lazyfs.layer.chunks import ChunkRef

log = logging.getLogger(__name__)
__all__ = ["BUILTIN_NAMES", "DEFAULT_POLICIES", "FetchPolicy", "FileMap", "LayerInfo", "PolicyContext",
           "PolicyError", "PolicySet", "load_policy", "parse_policy_names"]


class FileMap:
    """Which file each chunk of a layer belongs to, and which files share a directory.

    ``files`` are (path, chunk numbers in file order) of the layer's regular files. A chunk
    shared by several files (dedup) belongs to the first.
    """

    def __init__(self, files: Iterable[tuple[str, Sequence[int]]]):
        self.paths: list[str] = []
        self.chunks: list[tuple[int, ...]] = []
        self._file_of: dict[int, int] = {}
        self._by_directory: dict[str, list[int]] = {}
        for path, chunks in files:
            index = len(self.paths)
            self.paths.append(path)
            self.chunks.append(tuple(chunks))
            for n in chunks:
                self._file_of.setdefault(n, index)
            self._by_directory.setdefault(posixpath.dirname(path), []).append(index)

    def file_of(self, chunk: int) -> int | None:
        return self._file_of.get(chunk)

    def directory(self, file: int) -> str:
        return posixpath.dirname(self.paths[file])

    def siblings(self, file: int) -> list[int]:
        """The files of the same directory (itself included)."""
        return self._by_directory.get(self.directory(file), [])


@dataclass(eq=False)
class LayerInfo:
    """An attached layer, as policies see it."""

    name: str
    source: BlobSource
    chunk_count: int
    chunk_ref: Callable[[int], ChunkRef]
    trace_chunks: list[int] = field(default_factory=list)  # a trace's chunks, first access first
    background_rate: int | None = None  # stored bytes/s for the background policy (None: no limit)
    files: FileMap | None = None  # filled in once built (after the attach, in a worker thread)
    _by_offset: list[tuple[int, int]] | None = None

    def chunk_at(self, offset: int) -> int | None:
        """The chunk number whose stored frame starts at ``offset`` (first of equal ones)."""
        if self._by_offset is None:
            self._by_offset = sorted((self.chunk_ref(n).offset, n) for n in range(self.chunk_count))
        i = bisect_left(self._by_offset, (offset, -1))
        if i < len(self._by_offset) and self._by_offset[i][0] == offset:
            return self._by_offset[i][1]
        return None

    def blob_order(self) -> list[tuple[int, int]]:
        """(stored offset, chunk number) of every chunk, in blob order."""
        self.chunk_at(0)
        assert self._by_offset is not None
        return self._by_offset


class PolicyContext:
    """What a policy acts through: the fetcher and the attached layers."""

    def __init__(self, fetcher: ChunkFetcher):
        self.fetcher = fetcher
        self.layers: dict[str, LayerInfo] = {}  # by source name
        self.background = None  # a lazyfs.fetch.background.BackgroundFill, if the daemon has one

    def queue(self, layer: LayerInfo, chunks: Iterable[int], priority: Priority) -> int:
        """Queue chunks of a layer (numbers); cached and already pending ones are skipped by the
        fetcher (a pending one may be promoted). Returns how many were handed over."""
        refs = [layer.chunk_ref(n) for n in chunks if 0 <= n < layer.chunk_count]
        if refs:
            self.fetcher.enqueue(layer.source, refs, priority)
        return len(refs)


class FetchPolicy:
    """Base class of fetch policies: every hook does nothing. Override what you need."""

    name = "none"
    readahead = False  # whether devices read ahead of sequential readers
    wants_files = False  # whether the daemon should build each layer's FileMap

    def attach(self, ctx: PolicyContext, layer: LayerInfo) -> None:
        """A layer was attached (its trace chunks and chunk table are known)."""

    def detach(self, ctx: PolicyContext, layer: LayerInfo) -> None:
        """A layer was detached: forget it."""

    def on_miss(self, ctx: PolicyContext, layer: LayerInfo, chunks: list[int]) -> None:
        """An on-demand read needs these chunks, which are neither cached nor pending."""

    def on_request_done(self, ctx: PolicyContext, layer: LayerInfo, chunks: list[int],
                        priority: Priority) -> None:
        """A range request ended; ``chunks`` arrived."""

    def on_idle(self, ctx: PolicyContext) -> None:
        """Nothing is queued or in flight."""


def _builtins() -> dict[str, type[FetchPolicy]]:
    from lazyfs.fetch.policies.builtin import BackgroundPolicy, ReadaheadPolicy, TracePolicy
    from lazyfs.fetch.policies.extent import ExtentPolicy
    from lazyfs.fetch.policies.locality import LocalityPolicy
    return {"none": FetchPolicy, "readahead": ReadaheadPolicy, "trace": TracePolicy,
            "background": BackgroundPolicy, "locality": LocalityPolicy, "extent": ExtentPolicy}


def load_policy(name: str) -> FetchPolicy:
    builtins = _builtins()
    if name in builtins:
        return builtins[name]()
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        raise PolicyError(f"unknown fetch policy {name!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise PolicyError(f"cannot load fetch policy {name!r}: {e}") from e
    policy = cls()
    if not isinstance(policy, FetchPolicy):
        raise PolicyError(f"{name!r} is not a lazyfs.fetch.policies.FetchPolicy")
    return policy


class PolicySet:
    """The policies of one daemon; the fetcher's ``policies`` hook."""

    def __init__(self, fetcher: ChunkFetcher, names: Iterable[str] = DEFAULT_POLICIES):
        self.names = parse_policy_names(names)
        self.policies = [load_policy(name) for name in self.names]
        self.ctx = PolicyContext(fetcher)
        self._by_name: dict[str, LayerInfo] = {}
        # Mapping chunks back to numbers costs a sorted table per layer: only for policies that
        # listen to misses or ended requests.
        self._hears = {hook: any(getattr(type(p), hook) is not getattr(FetchPolicy, hook) for p in self.policies)
                       for hook in ("on_miss", "on_request_done")}

        self.nursery = None  # where file maps are built (set by the daemon)

    @property
    def readahead(self) -> bool:
        return any(policy.readahead for policy in self.policies)

    @property
    def wants_files(self) -> bool:
        return any(getattr(policy, "wants_files", False) for policy in self.policies)

    def build_files_soon(self, layer: LayerInfo, build: Callable[[], FileMap]) -> None:
        """Build the layer's file map in a worker thread; policies see it once it is there."""
        if self.nursery is None:
            return

        def build_both() -> FileMap:
            layer.blob_order()  # the sorted chunk table too, off the trio thread
            return build()

        async def run() -> None:
            try:
                layer.files = await trio.to_thread.run_sync(build_both)
            except Exception as e:  # the policies work without it (blob order only)
                log.info("no file map for %s: %s: %s", layer.name, type(e).__name__, e)

        self.nursery.start_soon(run)

    def attach(self, layer: LayerInfo) -> None:
        self._by_name[layer.name] = layer
        self.ctx.layers[layer.source.name] = layer
        self._each("attach", layer)

    def detach(self, name: str) -> None:
        """The layer attached under ``name`` is gone (another one may share its blob)."""
        layer = self._by_name.pop(name, None)
        if layer is None:
            return
        if self.ctx.layers.get(layer.source.name) is layer:
            del self.ctx.layers[layer.source.name]
            for other in self._by_name.values():
                if other.source.name == layer.source.name:
                    self.ctx.layers[other.source.name] = other
        self._each("detach", layer)

    # called by the fetcher (no awaits)
    def on_miss(self, source: BlobSource, refs: Sequence[ChunkRef]) -> None:
        layer = self.ctx.layers.get(source.name)
        if layer is not None and self._hears["on_miss"]:
            chunks = [n for n in (layer.chunk_at(ref.offset) for ref in refs) if n is not None]
            if chunks:
                self._each("on_miss", layer, chunks)

    def on_request_done(self, source: BlobSource, refs: Sequence[ChunkRef], priority: Priority) -> None:
        layer = self.ctx.layers.get(source.name)
        if layer is not None and self._hears["on_request_done"]:
            chunks = [n for n in (layer.chunk_at(ref.offset) for ref in refs) if n is not None]
            self._each("on_request_done", layer, chunks, priority)

    def on_idle(self) -> None:
        self._each("on_idle")

    def _each(self, hook: str, *args) -> None:
        for policy in self.policies:
            try:
                getattr(policy, hook)(self.ctx, *args)
            except Exception:
                log.exception("fetch policy %s: %s failed", policy.name, hook)
