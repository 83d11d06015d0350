"""Modes: how an image gets from the registry into a running container.

A mode is a small class: ``variant`` names the image variant it pulls (prepared before any
measurement, see lazyfs.bench.prepare), ``setup`` brings the system to the state the run
starts from (cold by default; ``warm`` primes the cache first), ``run`` measures one start,
``teardown`` undoes anything mode-specific. ``unavailable_reason`` says why a mode cannot
run in this build; the runner refuses (or, when asked, records) such runs instead of
measuring something else under the mode's name.

| mode | snapshotter | image | state at start |
| --- | --- | --- | --- |
| overlayfs | containerd's overlayfs | original (gzip) | cold: full pull + unpack |
| lazy | lazyfs | converted | cold cache, no trace |
| warm | lazyfs | converted | chunk cache filled by one earlier start of the same workload |
| lazy-prefetch | lazyfs | converted, trace embedded | cold; the trace is prefetched |
| lazy-ordered | lazyfs | converted in trace order, trace embedded | cold; prefetched |
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from .env import BenchEnv, ResetReport
from .measure import Timings, Workload, measure
from .prepare import LAZY, ORIGINAL, OciImage


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


def trace_embedding_missing() -> str | None:
    """What the trace modes lack in this build, or None when everything they use exists:
    trace recording (lazyfs.trace, the daemon's trace-start/trace-stop) and embedding a
    trace in a converted image (``lazyfs convert --trace``, ConvertOptions.trace)."""
    if importlib.util.find_spec("lazyfs.trace") is None:
        return "trace recording (lazyfs.trace)"
    from lazyfs.convert import ConvertOptions
    if "trace" not in {f.name for f in dataclasses.fields(ConvertOptions)}:
        return "`lazyfs convert --trace` (a trace embedded in the converted image)"
    return None


class _TraceMode(Mode):
    """Under containerd a trace reaches the daemon only embedded in the layer (the
    snapshotter asks for prefetch of the embedded trace), so these modes need a converted
    image with the trace of the workload embedded."""

    def unavailable_reason(self) -> str | None:
        missing = trace_embedding_missing()
        if missing is not None:
            return f"mode {self.name} is not available: it needs {missing}, which this build lacks"
        return (f"mode {self.name} is not available: `lazyfs bench` does not record and embed "
                f"traces yet")

    def setup(self, env: BenchEnv, target: RunTarget) -> ResetReport:
        raise ModeUnavailable(self.unavailable_reason())


class LazyPrefetchMode(_TraceMode):
    name = "lazy-prefetch"
    variant = "lazy-trace"


class LazyOrderedMode(_TraceMode):
    name = "lazy-ordered"
    variant = "lazy-ordered"


MODES: dict[str, type[Mode]] = {m.name: m for m in
                                (OverlayfsMode, LazyMode, WarmMode, LazyPrefetchMode, LazyOrderedMode)}


def make_mode(name: str) -> Mode:
    try:
        return MODES[name]()
    except KeyError:
        raise ModeUnavailable(f"unknown mode {name!r} (known: {', '.join(MODES)})") from None
