"""Modes: how an image gets from the registry into a running container.

A mode is a small class: ``image_for`` gives the image variant it pulls (by default
``variant``, prepared before any measurement by lazyfs.bench.prepare; the trace modes record
a trace and convert with it on first use), ``setup`` brings the system to the state the run
starts from (cold by default; ``warm`` primes the cache first), ``run`` measures one start,
``teardown`` undoes anything mode-specific. ``unavailable_reason`` says why a mode cannot
run in this build; the runner refuses (or, when asked, records) such runs instead of
measuring something else under the mode's name.

| mode | snapshotter | image | state at start |
| --- | --- | --- | --- |
| overlayfs | containerd's overlayfs | original (gzip) | cold: full pull + unpack |
| lazy | lazyfs | converted | cold cache, no trace |
| warm | lazyfs | converted | chunk cache filled by one earlier start of the same workload |
| lazy-prefetch | lazyfs | converted with the workload's trace embedded (--keep-order) | cold; the trace is prefetched |
| lazy-ordered | lazyfs | converted in trace order, trace embedded | cold; the trace is prefetched |
| learned | lazyfs | converted (no trace), with a learned trace attached in the registry | cold; the daemon finds and prefetches it |
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .env import BenchEnv, ResetReport
from .measure import Timings, Workload, measure
from .prepare import (
    LAZY, ORIGINAL, OciImage, PrepareError, SourceImage, convert_cached, push, registry_names,
)
from .system import DaemonSettings


@dataclass
class RunTarget:
    """What one run pulls and starts."""
    image_name: str
    image: OciImage          # the mode's variant, pushed to the registry
    workload: Workload
    container_name: str
    timeout: float


class ModeUnavailable(Exception):
    """The mode cannot run in this build (a feature it needs is missing)."""


class Mode:
    name: ClassVar[str]
    snapshotter: ClassVar[str] = "lazyfs"
    variant: ClassVar[str] = LAZY
    remote_pull: ClassVar[bool] = True  # ctr-remote rpull: remote-snapshot labels
    warm_cache: ClassVar[bool] = False

    def unavailable_reason(self) -> str | None:
        return None

    def image_for(self, ctx: PrepareContext, env: BenchEnv, source: SourceImage,
                  workload: Workload) -> OciImage:
        """The image variant this mode pulls (prepared before the runs, or here on demand)."""
        return source.variants[self.variant]

    def setup(self, env: BenchEnv, target: RunTarget) -> ResetReport:
        return env.reset(keep_cache=False)

    def run(self, env: BenchEnv, target: RunTarget) -> Timings:
        return measure(env.containerd, target.image.registry_ref(env.endpoint), self.snapshotter,
                       self.remote_pull, target.container_name, target.workload, target.timeout)

    def teardown(self, env: BenchEnv, target: RunTarget) -> None:
        """Nothing mode-specific: the next run's setup removes what this one left."""


class OverlayfsMode(Mode):
    name = "overlayfs"
    snapshotter = "overlayfs"
    variant = ORIGINAL
    remote_pull = False


class LazyMode(Mode):
    name = "lazy"


class WarmMode(Mode):
    """The converted image with every chunk the workload reads already in the lazyfs cache:
    one unmeasured start fills it; then containerd's state, the daemon and the page cache
    are reset as for a cold run, and only the cache directory is kept."""
    name = "warm"
    warm_cache = True

    def setup(self, env: BenchEnv, target: RunTarget) -> ResetReport:
        env.reset(keep_cache=False)
        priming = RunTarget(target.image_name, target.image, target.workload,
                            target.container_name + "-prime", target.timeout)
        super().run(env, priming)
        return env.reset(keep_cache=True)


def trace_embedding_missing(ordered: bool = False) -> str | None:
    """What trace prefetch under containerd lacks in this build, or None: trace recording
    (lazyfs.trace.format, the daemon's trace-start/trace-stop), embedding a trace in a converted
    image (``lazyfs convert --trace``, ConvertOptions.trace) and, for the trace-ordered
    layout or for keeping the order, ConvertOptions.trace_order (``--keep-order``). Under
    containerd a trace reaches the daemon only embedded in the layer: the snapshotter asks
    for prefetch of the embedded trace and has no way to pass a trace file."""
    if importlib.util.find_spec("lazyfs.trace.format") is None:
        return "trace recording (lazyfs.trace.format)"
    from lazyfs.image.convert import ConvertOptions
    fields = {f.name for f in dataclasses.fields(ConvertOptions)}
    if "trace" not in fields:
        return "`lazyfs convert --trace` (a trace embedded in the converted image)"
    if "trace_order" not in fields:
        return ("the trace-ordered layout (`lazyfs convert` writing traced files first)" if ordered
                else "`lazyfs convert --trace --keep-order` (a trace embedded without reordering)")
    return None


@dataclass
class PrepareContext:
    """What a mode needs to prepare an image variant during the runs."""
    cache_dir: Path
    chunk_size: int
    timeout: float


RECORDING_SETTINGS = DaemonSettings(serve="fuse")


def _workload_key(workload: Workload) -> str:
    return hashlib.sha256(json.dumps([workload.command, workload.ready]).encode()).hexdigest()[:12]


def record_trace(ctx: PrepareContext, env: BenchEnv, source: SourceImage, workload: Workload) -> Path:
    """The access trace of one cold lazy start of the workload (recorded once, cached).

    From a cold state: ``trace-start`` on the daemon, pull and run the converted image as the
    ``lazy`` mode does, ``trace-stop`` writing the trace. Its records name files by path, so
    it applies to any conversion of the same image.
    """
    digest = source.manifest_digest.split(":", 1)[1][:16]
    path = ctx.cache_dir / "traces" / f"{source.name}-{digest}-c{ctx.chunk_size}-{_workload_key(workload)}.trace"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whatever serving mode and policies the run is for: a FUSE-tree daemon sees the lookups
    # and opens a trace records, and its default policies fetch only what the start reads.
    with env.settings(RECORDING_SETTINGS):
        env.reset(keep_cache=False)
        lazy = source.variants[LAZY]
        env.snapshotter.daemon_request("trace-start")
        measure(env.containerd, lazy.registry_ref(env.endpoint), "lazyfs", True,
                f"bench-trace-{secrets.token_hex(4)}", workload, ctx.timeout)
        tmp = path.with_name(f".{path.name}.tmp")
        reply = env.snapshotter.daemon_request("trace-stop", timeout=60, path=str(tmp))
    if not reply.get("records"):
        raise PrepareError(f"the trace of {source.name} / {workload.name} is empty")
    os.rename(tmp, path)
    return path


class _TraceMode(Mode):
    """The image converted with the workload's trace embedded; on attach the daemon
    prefetches the traced files' chunks in first-access order while the workload reads on
    demand. ``ordered``: the conversion also writes the traced files first (trace-ordered
    layout), so their chunks are contiguous and arrive in a few large requests."""
    ordered: ClassVar[bool]

    def unavailable_reason(self) -> str | None:
        missing = trace_embedding_missing(self.ordered)
        if missing is not None:
            return f"mode {self.name} is not available: it needs {missing}, which this build lacks"
        return None

    def image_for(self, ctx: PrepareContext, env: BenchEnv, source: SourceImage,
                  workload: Workload) -> OciImage:
        layout = "ordered" if self.ordered else "trace"
        key = f"lazy-{layout}/{workload.name}"
        if key not in source.variants:
            trace = record_trace(ctx, env, source, workload)
            image = convert_cached(source, ctx.chunk_size, ctx.cache_dir, trace=trace,
                                   keep_order=not self.ordered)
            tag_variant = f"{layout}-{_workload_key(workload)}"
            push(image, env.endpoint, *registry_names(source, tag_variant, ctx.chunk_size))
            source.variants[key] = image
        return source.variants[key]


class LazyPrefetchMode(_TraceMode):
    """``lazyfs convert --trace T --keep-order``: the trace only, each layer's tar as it was."""
    name = "lazy-prefetch"
    ordered = False


class LazyOrderedMode(_TraceMode):
    """``lazyfs convert --trace T``: the trace, and the trace-ordered layout."""
    name = "lazy-ordered"
    ordered = True


class LearnedMode(Mode):
    """The second node's cold start: the image converted without a trace, and in the registry
    a trace of the workload's start attached to it as a learned trace (lazyfs.trace.share), as
    the first node to start it would have pushed. On attach the daemon finds the trace and
    prefetches from it. The converted image is pushed to a repository of its own
    (``...-learned``), so the referrers of the ``lazy`` mode's image stay empty."""
    name = "learned"

    def image_for(self, ctx: PrepareContext, env: BenchEnv, source: SourceImage,
                  workload: Workload) -> OciImage:
        key = f"learned/{workload.name}"
        if key not in source.variants:
            trace = record_trace(ctx, env, source, workload)  # recorded on the lazy variant itself
            image = dataclasses.replace(source.variants[LAZY])
            repository, tag = registry_names(source, LAZY, ctx.chunk_size)
            push(image, env.endpoint, repository + "-learned", tag)
            _attach_trace(image.registry_ref(env.endpoint), trace)
            source.variants[key] = image
        return source.variants[key]


def _attach_trace(ref: str, trace_path: Path) -> None:
    import trio

    from lazyfs.registry import open_store
    from lazyfs.trace import share
    from lazyfs.trace.format import Trace

    trace = Trace.decode(trace_path.read_bytes())

    async def attach() -> None:
        endpoint = ref.split("/", 1)[0]
        store = open_store(ref, insecure_registries=[endpoint])
        try:
            await share.push_trace(store, await share.image_manifest(store), trace)
        finally:
            await store.aclose()

    trio.run(attach)


MODES: dict[str, type[Mode]] = {m.name: m for m in
                                (OverlayfsMode, LazyMode, WarmMode, LazyPrefetchMode, LazyOrderedMode, LearnedMode)}


def make_mode(name: str) -> Mode:
    try:
        return MODES[name]()
    except KeyError:
        raise ModeUnavailable(f"unknown mode {name!r} (known: {', '.join(MODES)})") from None
