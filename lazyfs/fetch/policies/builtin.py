"""The built-in fetch policies besides locality: readahead, trace prefetch, background fill."""

from __future__ import annotations

from lazyfs.fetch.policies import FetchPolicy, LayerInfo, PolicyContext
from lazyfs.fetch.scheduler import Priority


class ReadaheadPolicy(FetchPolicy):
    """Adaptive readahead of sequential readers. The window logic lives with the devices that
    see the reads (lazyfs.serve.devices); this policy switches it on."""

    name = "readahead"
    readahead = True


class TracePolicy(FetchPolicy):
    """Prefetch the chunks a trace names (given at mount, or embedded in the layer), in
    first-access order, as soon as the layer is attached."""

    name = "trace"

    def attach(self, ctx: PolicyContext, layer: LayerInfo) -> None:
        ctx.queue(layer, layer.trace_chunks, Priority.PREFETCH)


class BackgroundPolicy(FetchPolicy):
    """Fetch every chunk of every layer at the lowest priority once the fetcher is idle, so the
    image becomes fully local (lazyfs.fetch.background; requests yield to on-demand reads)."""

    name = "background"

    def attach(self, ctx: PolicyContext, layer: LayerInfo) -> None:
        if ctx.background is not None:
            ctx.background.add(layer.name, layer.source,
                               [layer.chunk_ref(n) for n in range(layer.chunk_count)], layer.background_rate)
