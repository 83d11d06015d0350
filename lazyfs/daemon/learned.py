"""Learned traces in the daemon: look one up in the registry when an image without an embedded
trace is attached (lazyfs.trace.share does the registry part).

The layers of one image attach concurrently (``lazyfs mount``) or one Prepare after another
(the snapshotter); one look-up per image serves them all: the first attach starts it, the
others wait for its result, which is remembered for ``TTL`` seconds (a miss too, so an image
without a trace costs its layers one look-up, not one each).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import trio

from lazyfs.registry import ImageStore, RegistryError
from lazyfs.trace.format import Trace, TraceError, TraceRecorder, cap, merge
from lazyfs.trace.share import PulledTrace, ShareError, find_traces, pull_trace, push_trace

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 10.0  # a look-up is a few small requests; a registry slower than this gets no wait
TTL = 600.0


@dataclass
class _Entry:
    done: trio.Event = field(default_factory=trio.Event)
    result: PulledTrace | None = None
    at: float = 0.0


class LearnedTraces:
    """Traces found in registries, by (store, image manifest digest)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._manifests: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._layers: dict[str, set[str]] = {}
        self.lookups = 0
        self.found = 0

    async def manifest_of(self, store: ImageStore, reference: str | None, layer: str) -> str | None:
        """The digest of the image manifest that ``reference`` (tag or digest; an index resolves
        to this host's platform) names, if ``layer`` is one of its layers: for attaches that do
        not say which image they belong to (ctr-remote sends no manifest digest label). One
        resolution per reference and minute."""
        key = (store.name, reference or "")
        now = trio.current_time()
        cached = self._manifests.get(key)
        if cached is None or now - cached[0] > 60:
            digest = None
            with trio.move_on_after(LOOKUP_TIMEOUT):
                try:
                    manifest = await store.resolve_manifest(reference)
                    digest = manifest.digest
                    self._layers[digest] = {d.digest for d in manifest.layers}
                except RegistryError as e:
                    log.info("cannot resolve %s in %s for its learned trace: %s", reference, store.name, e)
            cached = self._manifests[key] = (now, digest)
        digest = cached[1]
        if digest is None or layer not in self._layers.get(digest, ()):
            return None
        return digest

    async def lookup(self, store: ImageStore, manifest_digest: str) -> PulledTrace | None:
        key = (store.name, manifest_digest)
        entry = self._entries.get(key)
        if entry is not None and (not entry.done.is_set() or trio.current_time() - entry.at < TTL):
            await entry.done.wait()
            return entry.result
        entry = self._entries[key] = _Entry()
        try:
            entry.result = await self._fetch(store, manifest_digest)
        finally:
            entry.at = trio.current_time()
            entry.done.set()
            self.lookups += 1  # counted when done: a test can wait for it
        return entry.result

    def known(self, key: tuple[str, str]) -> PulledTrace | None:
        """The trace found (or pushed) for (store name, manifest digest), if any is remembered."""
        entry = self._entries.get(key)
        return entry.result if entry is not None and entry.done.is_set() else None

    def remember(self, key: tuple[str, str], trace: Trace, artifact: str) -> None:
        """What this daemon pushed: later attaches of the image use it without a look-up."""
        entry = self._entries[key] = _Entry()
        entry.result = PulledTrace(trace, trace.encode(), artifact, "")
        entry.at = trio.current_time()
        entry.done.set()

    async def _fetch(self, store: ImageStore, manifest_digest: str) -> PulledTrace | None:
        with trio.move_on_after(LOOKUP_TIMEOUT) as scope:
            try:
                # The manifest and the list of referrers side by side: a miss costs one round.
                found: dict = {}

                async def get(key: str, fetch) -> None:
                    try:
                        found[key] = await fetch(store, manifest_digest)
                    except (ShareError, RegistryError, TraceError) as e:
                        found.setdefault("error", e)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(get, "subject", lambda s, d: s.get_manifest(d))
                    nursery.start_soon(get, "candidates", find_traces)
                if "error" in found:
                    raise found["error"]
                subject = found["subject"]
                if subject.is_index:
                    log.info("learned trace: %s is an index, not the image manifest", manifest_digest)
                    return None
                pulled = await pull_trace(store, subject, candidates=found["candidates"])
            except ShareError as e:
                log.info("learned trace: %s", e)
                return None
            except (RegistryError, TraceError) as e:
                log.info("learned trace of %s in %s not available: %s", manifest_digest, store.name, e)
                return None
        if scope.cancelled_caught:
            log.info("learned trace of %s: no answer from %s within %.0fs", manifest_digest, store.name,
                     LOOKUP_TIMEOUT)
            return None
        self.found += 1
        log.info("learned trace %s (created %s) found for %s in %s", pulled.artifact, pulled.created or "?",
                 manifest_digest, store.name)
        return pulled


def learned_chunks(trace: Trace, digest: str, chunk_size: int, chunk_count: int) -> list[int] | None:
    """The layer's chunks a learned trace names, in first-access order; None (logged) when the
    trace does not fit the layer: another chunk size, or chunks the layer does not have."""
    if digest not in trace.layers:
        return []
    if trace.layers[digest] != chunk_size:
        log.warning("learned trace gives layer %s chunk size %d, the layer has %d: ignored",
                    digest, trace.layers[digest], chunk_size)
        return None
    chunks = trace.chunks_of(digest)
    if chunks and max(chunks) >= chunk_count:
        log.warning("learned trace names chunk %d of layer %s, which has %d: ignored",
                    max(chunks), digest, chunk_count)
        return None
    return chunks


# -- automatic recording -----------------------------------------------------------------------

@dataclass
class RecordingPolicy:
    """When a recording of a start ends, and how large what is kept may grow."""

    quiet: float = 5.0  # no read of a chunk not read before for this long: the start is over
    max_duration: float = 120.0  # from the first read
    wait_first_read: float = 3600.0  # attached and never read: give up
    max_bytes: int = 1 << 20  # the stored (merged) trace, encoded; earliest records kept


@dataclass
class Recording:
    """The start of one image: reads of its layers from its first read until they fall quiet."""

    store: ImageStore
    ref: str  # the image reference the layers were attached from
    manifest: str
    layers: set[str]
    push: bool
    credentials: object | None = None  # a registry CredentialStore for the push, if not the default
    recorder: TraceRecorder | None = None
    attached_at: float = 0.0
    first_read: float | None = None
    last_new: float = 0.0
    state: str = "waiting"  # waiting -> recording -> saved | pushed | push-failed | unused
    records: int = 0
    pushed: str | None = None
    learned: PulledTrace | None = None  # the trace this start was prefetched from, if any

    def summary(self) -> dict:
        return {"image": self.manifest, "store": self.store.name, "layers": len(self.layers), "state": self.state,
                "records": self.records, "pushed": self.pushed}


class Recorder:
    """Records the start that follows the attach of an image's layers (see RecordingPolicy),
    merges it into the image's trace under ``directory`` (``<manifest hex>.trace``: every
    recorded start of the image, first use first, at most ``max_bytes``), and with ``push``
    attaches that trace to the image in its registry."""

    def __init__(self, directory, policy: RecordingPolicy, fill_paths, learned: LearnedTraces,
                 push_store_factory=None) -> None:
        self.directory = directory
        self.policy = policy
        self.fill_paths = fill_paths  # Trace -> None: names for the recorded nids (in a thread)
        self.learned = learned
        self.push_store_factory = push_store_factory  # (ref, credentials) -> a store to push with
        self.recordings: list[Recording] = []
        self.by_layer: dict[str, list[Recording]] = {}
        self._wakeup = trio.Event()

    @property
    def active(self) -> bool:
        return bool(self.by_layer)

    def add_layer(self, store: ImageStore, ref: str, manifest: str, layer: str, push: bool,
                  credentials=None) -> None:
        """The attach of one layer of an image: it joins (or starts) the image's recording."""
        for recording in self.recordings:
            if recording.manifest == manifest and recording.store.name == store.name \
                    and recording.state in ("waiting", "recording"):
                break
        else:
            recording = Recording(store, ref, manifest, set(), push, credentials, TraceRecorder(),
                                  attached_at=trio.current_time())
            ended = [r for r in self.recordings if r.state not in ("waiting", "recording")]
            for old in ended[:-64]:  # the summaries of the last ended ones are enough
                self.recordings.remove(old)
            self.recordings.append(recording)
            self._wakeup.set()
        if layer not in recording.layers:
            recording.layers.add(layer)
            self.by_layer.setdefault(layer, []).append(recording)

    def on_chunks(self, layer: str, chunk_size: int, nid: int, cells: list[int]) -> None:
        """A read of ``cells`` of ``layer`` (called from the FUSE read path: no await, cheap)."""
        now = None
        for recording in self.by_layer.get(layer, ()):
            recorder = recording.recorder
            if recording.first_read is None:
                recorder.started = time.monotonic()  # times count from the start's first read
            if recorder.record(layer, chunk_size, nid, "", cells):
                now = now if now is not None else trio.current_time()
                if recording.first_read is None:
                    recording.first_read = now
                    recording.state = "recording"
                recording.last_new = now

    def on_file(self, kind: str, layer: str, chunk_size: int, nid: int) -> None:
        for recording in self.by_layer.get(layer, ()):
            if recording.first_read is not None:
                recording.recorder.record_file(kind, layer, chunk_size, nid)

    def summary(self) -> list[dict]:
        return [r.summary() for r in self.recordings]

    async def run(self) -> None:
        """Ends recordings as the policy says; one check every half second while any is open."""
        while True:
            open_ = [r for r in self.recordings if r.state in ("waiting", "recording")]
            if not open_:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            await trio.sleep(0.5)
            now = trio.current_time()
            for recording in open_:
                if self._over(recording, now):
                    self._close(recording)
                    await self._finish(recording)

    async def finish_all(self, timeout: float = 15.0) -> None:
        """End every open recording now (the daemon is stopping): what was recorded is saved,
        and pushed if asked, within ``timeout``."""
        with trio.move_on_after(timeout):
            for recording in [r for r in self.recordings if r.state in ("waiting", "recording")]:
                self._close(recording)
                await self._finish(recording)

    def _over(self, r: Recording, now: float) -> bool:
        p = self.policy
        if r.first_read is None:
            return now - r.attached_at > p.wait_first_read
        size = r.recorder.chunk_count * 80  # about one encoded record per chunk
        return now - r.last_new >= p.quiet or now - r.first_read >= p.max_duration or size > 4 * p.max_bytes

    def _close(self, recording: Recording) -> None:
        for layer in recording.layers:
            users = self.by_layer.get(layer, [])
            if recording in users:
                users.remove(recording)
            if not users:
                self.by_layer.pop(layer, None)

    async def _finish(self, recording: Recording) -> None:
        trace, recording.recorder = recording.recorder.trace, None
        if recording.first_read is None or not trace.accesses:
            recording.state = "unused"
            return
        recording.records = len(trace.accesses) + len(trace.files)
        try:
            merged = await trio.to_thread.run_sync(self._merge_and_save, recording, trace)
        except (OSError, TraceError) as e:
            log.error("recorded trace of %s not saved: %s", recording.manifest, e)
            recording.state = "save-failed"
            return
        recording.state = "saved"
        log.info("recorded the start of %s: %d records, merged trace %d bytes", recording.manifest,
                 recording.records, len(merged.encode()))
        if recording.push:
            await self._push(recording, merged)

    def _path(self, manifest: str):
        return self.directory / f"{manifest.partition(':')[2]}.trace"

    def _merge_and_save(self, recording: Recording, trace: Trace) -> Trace:
        self.fill_paths(trace)
        path = self._path(recording.manifest)
        traces = [trace]
        try:
            traces.insert(0, Trace.decode(path.read_bytes()))
        except FileNotFoundError:
            pass
        except TraceError as e:
            log.warning("replacing the unreadable trace %s: %s", path, e)
        merged = cap(merge(traces), self.policy.max_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(merged.encode())
        os.replace(tmp, path)
        return merged

    async def _push(self, recording: Recording, merged: Trace) -> None:
        key = (recording.store.name, recording.manifest)
        known = self.learned.known(key)
        if known is not None and _chunks(merged) <= _chunks(known.trace):
            recording.state = "saved"  # the registry's trace already has every chunk
            log.info("not pushing the trace of %s: the registry's %s already covers it",
                     recording.manifest, known.artifact)
            return
        store = recording.store
        if recording.credentials is not None and self.push_store_factory is not None:
            store = self.push_store_factory(recording.ref, recording.credentials)
        try:
            with trio.fail_after(60):
                subject = await store.get_manifest(recording.manifest)
                recording.pushed = await push_trace(store, subject, merged)
        except (RegistryError, ShareError, trio.TooSlowError) as e:
            recording.state = "push-failed"
            log.warning("pushing the recorded trace of %s to %s failed: %s", recording.manifest, store.name, e)
            return
        finally:
            if store is not recording.store:
                await store.aclose()
        recording.state = "pushed"
        self.learned.remember(key, merged, recording.pushed)


def _chunks(trace: Trace) -> set[tuple[str, int]]:
    return {(a.layer, n) for a in trace.accesses for n in range(a.first, a.last + 1)}
