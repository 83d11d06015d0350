"""The lazyfs daemon: one process, one FUSE mount, one fetcher, one control socket.

This is the only module that touches pyfuse3's process-global session (init, main,
terminate, close). Everything runs in one trio nursery: the fetch scheduler, the control
socket server, the optional Prometheus endpoint, the signal watcher and ``pyfuse3.main``.
SIGTERM/SIGINT (or the ``shutdown`` request) unmount what the daemon stacked on top of its
FUSE mount, end the FUSE main loop and unmount cleanly.

A *startup spec* (JSON) lets ``lazyfs mount`` hand the daemon an image to resolve (or a list
of attach requests) and an overlay or bind mount to create once its layers are attached; the
daemon answers ``ready`` in ``ping`` only after that, and with ``--ready-fd`` it writes one
JSON line to that descriptor -- ready, or the error that stopped it -- so the parent process
knows at once when the mount is usable or why it failed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import httpcore
import pyfuse3
import trio

from lazyfs.daemon import attach as attach_kinds
from lazyfs.daemon import handover
from lazyfs.fetch.background import BackgroundFill
from lazyfs.fetch.policies import DEFAULT_POLICIES, PolicyError, PolicySet, load_policy, parse_policy_names
from lazyfs.fetch.cache import ChunkCache
from lazyfs.config import DEFAULT_HOSTS_DIR, ConfigError, RegistrySettings, parse_size
from lazyfs.daemon.learned import LearnedTraces, Recorder, RecordingPolicy
from lazyfs.daemon.mountstate import DEFAULT_READ_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, add_timeout_arguments
from lazyfs.fetch.scheduler import BlobSource, ChunkFetcher, FetchStats, Priority
from lazyfs.fetch.scheduler import RetryPolicy as ChunkRetryPolicy
from lazyfs.layer.chunks import ChunkRef
from lazyfs.serve import kernel
from lazyfs.serve.fuse import DEVICE_CACHE_BUDGET, DEVICE_WINDOW, DevicePagePusher, LazyOperations
from lazyfs.serve.layerfs import AttachedLayer, LayerExists, LayerFS, NoSuchEntry, cell_owners
from lazyfs.serve.mounts import (
    MountError, is_mounted, is_stale, mount_flags, set_read_ahead, stack_mount, unmount_fuse, unmount_path,
)
from lazyfs.registry import RetryPolicy, make_http_client
from lazyfs.serve.residency import MetadataTrimmer
from lazyfs.trace.format import Trace, TraceRecorder

log = logging.getLogger(__name__)

READ_AHEAD_KIB = 1024
SERVE_MODES = ("fuse", "kernel")
# Kernel mode: the chunk device's loop reads the FUSE file with direct I/O by default. Off, it
# reads through the page cache and the daemon stores what follows each small read there
# (lazyfs.serve.fuse.DevicePagePusher): fewer requests (948 against 1,057 per debian-scipy
# start), but slower warm starts and sequential reads as measured (docs/design.md, Serving
# modes, "Reads of the chunk device").
LOOP_DIRECT_IO = True


class StartupError(Exception):
    """The startup spec cannot be carried out; ``usage`` when the user's arguments are at fault
    (an image that does not resolve, or has layers that are not lazyfs layers)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


class RequestError(Exception):
    """A control request that cannot be carried out; the message goes back to the client."""

    def __init__(self, message: str, kind: str = "bad-request"):
        super().__init__(message)
        self.kind = kind


@dataclass
class DaemonOptions:
    fuse_dir: Path
    socket_path: Path
    cache_dir: Path
    cache_size: int | None = None
    metrics: tuple[str, int] | None = None
    registry: RegistrySettings = RegistrySettings()
    startup: dict | None = None
    ready_fd: int | None = None  # gets one JSON line: {"ready": true} or {"error": ..., "usage": ...}
    read_timeout: float = DEFAULT_READ_TIMEOUT  # a read waits this long for chunks, then EIO
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # connect/read silence, per request and per MiB
    policies: tuple[str, ...] = DEFAULT_POLICIES  # fetch policies (lazyfs.fetch.policies)
    recording: RecordingPolicy = field(default_factory=RecordingPolicy)  # automatic trace recording
    # The FUSE mount honours setuid bits and device nodes only for a trusted daemon; stacked
    # mounts decide for themselves (see lazyfs.serve.mounts.stack_mount).
    allow_suid_dev: bool = False
    serve: str = "fuse"  # "kernel": layers are EROFS mounts over their chunk devices (lazyfs.serve.kernel)
    layers_dir: Path | None = None  # kernel mode: where the layer roots are mounted
    loop_direct_io: bool = LOOP_DIRECT_IO
    take_over: bool = False  # hot upgrade: take over the daemon at socket_path (lazyfs.daemon.handover)

    def layer_root(self, name: str) -> Path:
        """The directory serving layer ``name``: a directory of the FUSE mount, or in kernel
        mode the layer's EROFS mount (a bind mount of the FUSE tree after a fallback)."""
        if self.serve == "kernel":
            return self.kernel_layers_dir / name
        return self.fuse_dir / name

    @property
    def kernel_layers_dir(self) -> Path:
        return self.layers_dir or self.fuse_dir.with_name(self.fuse_dir.name + ".layers")

    @property
    def fuse_options(self) -> set[str]:
        return {"ro", "default_permissions", "allow_other", "fsname=lazyfs", "subtype=lazyfs",
                *mount_flags(self.allow_suid_dev).split(",")}


@dataclass
class ReadStats:
    """Kernel read requests served, for `stats`."""

    requests: int = 0
    bytes: int = 0

    def record(self, _fh: int, _offset: int, length: int) -> None:
        self.requests += 1
        self.bytes += length


class FetchEventLog:
    """The last ``capacity`` range requests the fetcher completed, for fetch timelines.

    One event per request: wall-clock start and end (seconds since the epoch), stored bytes,
    chunks and the priority of the request's leader. ``fetch-log`` returns them.
    """

    def __init__(self, capacity: int = 100_000):
        self.events: deque[dict] = deque(maxlen=capacity)
        self.recorded = 0

    def observe(self, source: BlobSource, refs: Sequence[ChunkRef], priority: Priority,
                began: float, finished: float) -> None:
        # The fetcher's times are trio's clock; anchor them to the wall clock at completion.
        end = time.time()
        self.events.append({
            "start": end - (finished - began), "end": end,
            "bytes": max(r.end for r in refs) - min(r.offset for r in refs),
            "chunks": len(refs), "priority": priority.name.lower(), "source": source.name})
        self.recorded += 1

    def snapshot(self) -> dict:
        return {"events": list(self.events), "dropped": self.recorded - len(self.events)}


@dataclass
class Daemon:
    options: DaemonOptions
    fs: LayerFS = field(default_factory=LayerFS)
    read_stats: ReadStats = field(default_factory=ReadStats)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.cache = ChunkCache(self.options.cache_dir, self.options.cache_size)
        self.fetch_stats = FetchStats()
        self.fetch_log = FetchEventLog()
        # A chunk is retried for as long as a read may wait for it (backoff up to 4 s, jittered).
        retry = ChunkRetryPolicy(attempts=64, initial_delay=0.1, factor=2.0, max_delay=4.0, jitter=0.25,
                                 give_up_after=self.options.read_timeout)
        self.fetcher = ChunkFetcher(self.cache, stats=self.fetch_stats, on_fetch=self.fetch_log.observe,
                                    retry=retry, read_timeout=self.options.read_timeout)
        # Kernel mode over a page-cached loop: what follows each chunk-device read goes to the
        # kernel with it (lazyfs.serve.fuse.DevicePagePusher).
        device_pages = (DevicePagePusher(DEVICE_WINDOW, DEVICE_CACHE_BUDGET)
                        if self.options.serve == "kernel" and not self.options.loop_direct_io else None)
        self.operations = LazyOperations(self.fs, on_read=self._on_read, on_use=self._on_use,
                                         device_pages=device_pages)
        self.background = BackgroundFill(self.fetcher)
        self.policies = PolicySet(self.fetcher, self.options.policies)
        self.policies.ctx.background = self.background
        self.fetcher.policies = self.policies
        self.learned = LearnedTraces()
        self.learning = Recorder(self.options.cache_dir / "traces", self.options.recording, self._fill_paths,
                                 self.learned, self._push_store)
        self.recorder: TraceRecorder | None = None
        self.record_to: Path | None = None  # --record-trace: written when the daemon stops
        self.ready = False
        self.stacked: list[Path] = []  # overlay/bind mounts on top of ours, unmounted first
        self.image_mounts: dict[str, list[str]] = {}  # mount point -> its layers, topmost first
        self._nursery: trio.Nursery | None = None
        self._terminating = False
        self.http: httpx.AsyncClient | None = None
        self.attach_context: attach_kinds.AttachContext | None = None
        self.attached: dict[str, attach_kinds.Attached] = {}  # by layer name: owns the metadata descriptor
        self.layer_mounts: dict[str, Path] = {}  # kernel mode: EROFS (or fallback bind) mount per layer
        self._fallback_reasons: set[str] = set()
        self.attach_requests: dict[str, dict] = {}  # by layer name: what a successor attaches to take over
        # Layers whose after-attach work (trace look-up, learned trace) has not ended: until
        # it has, a prefetch may still be queued, so "prefetch done" must wait for it.
        self.after_attach_pending = 0
        self.handing_over = False  # frozen for a successor (lazyfs.daemon.handover)
        self.changes_in_flight = 0  # requests of handover.CHANGING_OPS being carried out
        self.taking_over = False  # attaching a predecessor's layers: every root must be taken over
        self.control_path: Path | None = None  # where our control socket is (moves once on a takeover)

    # ------------------------------------------------------------------ lifetime

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        seconds = self.options.request_timeout
        timeout = httpx.Timeout(seconds, connect=min(seconds, 10.0))
        async with httpx.AsyncClient(limits=limits, timeout=timeout, follow_redirects=True) as http, \
                make_http_client(timeout=seconds, max_connections=64) as registry_http:
            self.http = http
            self.attach_context = attach_kinds.AttachContext(
                fetcher=self.fetcher, cache=self.cache, http=http, registry_http=registry_http,
                registry=self.options.registry, background=self.background, learned=self.learned,
                retry=RetryPolicy(attempt_timeout=seconds),
                chunk_retry=replace(attach_kinds.CHUNK_RETRY, attempt_timeout=seconds),
                policies=self.policies)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self.fetcher.run)
                    self.policies.nursery = nursery
                    nursery.start_soon(self.background.run)
                    nursery.start_soon(self.learning.run)
                    nursery.start_soon(MetadataTrimmer(self.fs.layers).run)
                    nursery.start_soon(self._watch_signals)
                    nursery.start_soon(self._run_fuse, nursery)
                    await self._tune_read_ahead()
                    await nursery.start(self._serve_control)
                    if self.options.metrics is not None:
                        await nursery.start(self._serve_metrics)
                    if self.options.take_over:
                        try:
                            await handover.take_over(self, self._publish_control)
                        except handover.HandoverError as e:
                            raise StartupError(str(e), usage=True) from e
                    elif self.options.startup is not None:
                        await self._run_startup(self.options.startup)
                    self.ready = True
                    report_startup(self.options, {"ready": True})
                    log.info("daemon ready: FUSE at %s, control at %s", self.options.fuse_dir, self.options.socket_path)
            finally:
                self._nursery = None
                self._write_recorded_trace()
                await self._unstack()
                await self._release_layer_mounts()

    async def _run_fuse(self, nursery: trio.Nursery) -> None:
        await pyfuse3.main(max_tasks=128)
        nursery.cancel_scope.cancel()

    async def _tune_read_ahead(self) -> None:
        """Let the kernel read FUSE files in larger requests than its 128 KiB default.

        The kernel applies its own value when the daemon answers FUSE INIT; a stat of the
        mount root (from a thread: it is answered by this loop) waits for that first.
        """
        await trio.to_thread.run_sync(os.stat, self.options.fuse_dir)
        set_read_ahead(self.options.fuse_dir, READ_AHEAD_KIB)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: unmounting", signal.Signals(signum).name)
                await self.terminate()

    async def terminate(self) -> None:
        if self._terminating:
            return
        self._terminating = True
        await self.learning.finish_all()  # a start cut short by the unmount is still recorded
        await self._unstack()
        await self._release_layer_mounts()
        pyfuse3.terminate()

    async def _unstack(self) -> None:
        while self.stacked:
            path = self.stacked.pop()
            await trio.to_thread.run_sync(unmount_path, path, True)

    async def _release_layer_mounts(self) -> None:
        """Kernel mode: unmount every layer's EROFS (their loop devices clear themselves)
        before the FUSE mount that backs them goes."""
        for name in list(self.layer_mounts):
            await trio.to_thread.run_sync(kernel.unmount_layer, self.layer_mounts.pop(name))

    async def _run_startup(self, spec: dict) -> None:
        if spec.get("record_trace"):
            self.record_to = Path(spec["record_trace"])
            self.recorder = TraceRecorder()  # kernel-mode layers map their cells as they attach
        stack = spec.get("stack")
        restart = bool(spec.get("restart"))  # by the mount's supervisor, after its daemon died
        if "image" in spec:
            await self.mount_image(spec["image"], Path(stack["mountpoint"]), restart=restart)
            return
        await self._attach_all(spec.get("attach", []))
        if stack:
            await self._stack(stack["layers"], Path(stack["mountpoint"]), _trusted(stack), restart)

    async def mount_image(self, image: dict, mountpoint: Path, prefix: str = "", restart: bool = False) -> list[str]:
        """Attach every layer of the image (named ``prefix`` + ``NNN-<digest>``) and stack them
        read-only at mountpoint; the layer names, topmost first. On failure nothing stays."""
        allow_suid_dev = _trusted(image)
        requests = await self._image_requests(image)
        for request in requests:
            request["name"] = prefix + request["name"]
        names = [request["name"] for request in reversed(requests)]  # overlayfs: topmost first
        try:
            await self._attach_all(requests)
            await self._stack(names, mountpoint, allow_suid_dev, restart)
        except BaseException:
            with trio.CancelScope(shield=True):
                for name in names:
                    if name in {layer.name for layer in self.fs.layers()}:
                        await self.detach({"name": name})
            raise
        self.image_mounts[str(mountpoint)] = names
        return names

    async def unmount_image(self, mountpoint: Path, lazy: bool) -> None:
        names = self.image_mounts.get(str(mountpoint))
        if names is None:
            raise RequestError(f"{mountpoint} is not an image mount of this daemon", "not-found")
        try:
            await trio.to_thread.run_sync(unmount_path, mountpoint, lazy)
        except MountError as e:
            raise RequestError(str(e), "busy") from e
        del self.image_mounts[str(mountpoint)]
        if mountpoint in self.stacked:
            self.stacked.remove(mountpoint)
        for name in names:
            await self.detach({"name": name})

    async def _attach_all(self, requests: list[dict]) -> None:
        # Layers attach concurrently: each costs at least one round trip for its metadata.
        async with trio.open_nursery() as nursery:
            for request in requests:
                nursery.start_soon(self.attach, request)

    async def _stack(self, names: list[str], target: Path, allow_suid_dev: bool, restart: bool = False) -> None:
        """Stack the layers at target. On a restart the dead daemon's overlay is still there: it
        is kept if every layer under it was taken over (kernel mode), else replaced."""
        if restart and is_mounted(target):
            if all(self.fs.layer(name).info.get("adopted") for name in names):
                log.info("kept the mount at %s: its layers were taken over", target)
                self.stacked.append(target)
                return
            await trio.to_thread.run_sync(unmount_path, target, True)
            log.info("replaced the mount at %s: not every layer under it could be taken over", target)
        lower = [self.options.layer_root(name) for name in names]
        await trio.to_thread.run_sync(functools.partial(stack_mount, lower, target, allow_suid_dev=allow_suid_dev))
        self.stacked.append(target)

    async def _image_requests(self, image: dict) -> list[dict]:
        """Resolve the image here rather than in `lazyfs mount`: that process then needs
        neither trio nor httpx, and the manifest comes over the daemon's own connections."""
        from lazyfs.daemon.imagespec import ImageSpecError, image_attach_requests

        assert self.attach_context is not None
        try:
            requests = await image_attach_requests(
                image["ref"], layer=image.get("layer"), platform=image.get("platform"),
                store_options=self.options.registry.store_options(), trace=image.get("trace"),
                prefetch=image.get("prefetch", True), learn=image.get("learn", "pull"),
                http=self.attach_context.registry_http, retry=self.attach_context.retry)
        except ImageSpecError as e:
            raise StartupError(str(e), usage=True) from e
        for request in requests:
            if image.get("background_fetch"):
                request["background_fetch"] = True
                request["background_rate"] = image.get("background_rate")
        return requests

    # ------------------------------------------------------------------ tracing

    def _on_read(self, ino: int, offset: int, length: int) -> None:
        self.read_stats.record(ino, offset, length)
        if self.recorder is None and not self.learning.active:
            return
        try:
            span = self.fs.device_cells(ino, offset, length)
        except Exception:  # a trace must never fail a read that already succeeded
            log.debug("no trace record for inode %#x", ino, exc_info=True)
            return
        if span is not None and span[2]:
            layer, nid, cells = span
            key, size = _trace_key(layer), layer.device.chunk_size  # type: ignore[attr-defined]
            if self.recorder is not None:
                self.recorder.record(key, size, nid, "", cells)
            self.learning.on_chunks(key, size, nid, cells)
            return
        # Kernel mode: a read of a chunk-device file, named after the files its cells hold.
        try:
            found = self.fs.device_read_files(ino, offset, length)
        except Exception:
            log.debug("no trace record for device read of inode %#x", ino, exc_info=True)
            return
        if found is not None:
            layer, files = found
            key, size = _trace_key(layer), layer.device.chunk_size  # type: ignore[attr-defined]
            for nid, cells in files:
                if self.recorder is not None:
                    self.recorder.record(key, size, nid, "", cells)
                self.learning.on_chunks(key, size, nid, cells)

    def _on_use(self, kind: str, ino: int) -> None:
        if self.recorder is None and not self.learning.active:
            return
        found = self.fs.locate(ino)
        if found is not None:
            layer, nid = found
            key, size = _trace_key(layer), getattr(layer.device, "chunk_size", 0)
            if self.recorder is not None:
                self.recorder.record_file(kind, key, size, nid)
            self.learning.on_file(kind, key, size, nid)

    def _learn_request(self, request: dict) -> tuple:
        """``record_trace`` in an attach request: the layer joins the recording of its image's
        start (the image the attach found it in), pushed when it ends if ``share`` is "push"."""
        if request.get("kind") != "lazyfs":
            raise RequestError("'record_trace' needs a lazyfs layer")
        credentials = request.get("push_credentials")
        if credentials is not None and not (isinstance(credentials, dict) and all(
                isinstance(credentials.get(k), str) for k in ("username", "password"))):
            raise RequestError("'push_credentials' must be {\"username\": ..., \"password\": ...}")
        assert self.attach_context is not None
        ref, digest = _require_str(request, "ref"), _require_str(request, "digest")
        try:
            store, _ = self.attach_context.stores.get(self.attach_context, ref)
        except attach_kinds.AttachError as e:
            raise RequestError(str(e), "attach-failed") from e
        return store, ref, digest, request.get("share") == "push", credentials

    def _push_store(self, ref: str, credentials: dict):
        """A store for ``ref`` that authenticates with the given credentials (pushing a trace
        with the snapshotter's configured credentials rather than the Docker config's)."""
        from lazyfs.registry import Authenticator, CredentialStore, Credentials, Secret, open_store
        from lazyfs.registry.reference import parse_reference

        assert self.attach_context is not None
        store = CredentialStore()
        store.add(parse_reference(ref).registry,
                  Credentials(credentials["username"], Secret(credentials["password"])))
        options = self.options.registry.store_options()
        options.pop("auth_file")
        return open_store(ref, http=self.attach_context.registry_http, authenticator=Authenticator(store),
                          **options)

    async def trace_start(self) -> dict:
        for layer in self.fs.layers():
            await self._map_cells(layer)
        self.recorder = TraceRecorder()
        self.record_to = None
        return {}

    async def _map_cells(self, layer) -> None:
        """Kernel mode: the daemon sees reads of the chunk device, not of files; a trace names
        them through the layer's cell -> nid map (one walk of its metadata, in a thread)."""
        if layer.as_device and layer.cell_owners is None:
            layer.cell_owners = await trio.to_thread.run_sync(
                cell_owners, layer.image, layer.device.chunk_size)

    def _write_recorded_trace(self) -> None:
        """--record-trace: the trace recorded since the mount, written as the daemon stops."""
        if self.recorder is None or self.record_to is None:
            return
        trace, self.recorder = self.recorder.trace, None
        try:
            self._fill_paths(trace)
            _write_atomically(self.record_to, trace.encode())
            log.info("trace of %d records written to %s", len(trace.accesses) + len(trace.files), self.record_to)
        except OSError as e:
            log.error("cannot write the trace to %s: %s", self.record_to, e)

    async def trace_stop(self, request: dict) -> dict:
        if self.recorder is None:
            raise RequestError("no trace is being recorded (send trace-start first)", "not-found")
        trace, self.recorder = self.recorder.trace, None
        self.record_to = None
        await trio.to_thread.run_sync(self._fill_paths, trace)
        data = trace.encode()
        path = request.get("path")
        if path is not None:
            if not isinstance(path, str) or not path:
                raise RequestError("'path' must be a non-empty string")
            await trio.to_thread.run_sync(_write_atomically, Path(path), data)
        return {"records": len(trace.accesses), "files": len(trace.files), "layers": list(trace.layers),
                "bytes": len(data)}

    def _fill_paths(self, trace: Trace) -> None:
        """Names for the recorded nids: one walk of each traced layer's metadata."""
        by_key = {_trace_key(layer): layer for layer in self.fs.layers()}
        for key in set(trace.layers) | {f.layer for f in trace.files}:
            layer = by_key.get(key)
            wanted = {r.nid for r in [*trace.accesses, *trace.files] if r.layer == key}
            if layer is None or not wanted:
                continue
            names: dict[int, str] = {}
            for path, inode in layer.image.walk():
                if inode.nid in wanted and inode.nid not in names:
                    names[inode.nid] = path.decode("utf-8", "surrogateescape")
                    if len(names) == len(wanted):
                        break
            for record in [*trace.accesses, *trace.files]:
                if record.layer == key:
                    record.path = names.get(record.nid, "?")

    # ------------------------------------------------------------------ operations

    async def attach(self, request: dict) -> dict:
        name = _require_str(request, "name")
        kind = _require_str(request, "kind")
        attacher = attach_kinds.KINDS.get(kind)
        if attacher is None:
            raise RequestError(f"unknown layer kind {kind!r} (known: {', '.join(sorted(attach_kinds.KINDS))})")
        if name in {layer.name for layer in self.fs.layers()}:
            raise RequestError(f"a layer named {name!r} is already attached", "exists")
        assert self.attach_context is not None
        learn = self._learn_request(request) if request.get("record_trace") else None
        try:
            attached = await attacher(self.attach_context, request)
        except attach_kinds.AttachError as e:
            log.error("attaching %s failed: %s", name, e)
            raise RequestError(str(e), "attach-failed") from e
        after = attached.info.pop(attach_kinds.AFTER_ATTACH, None)
        kernel_mode = self.options.serve == "kernel"
        try:
            self.fs.attach(name, attached.image, attached.device, attached.info,
                           as_device=kernel_mode and hasattr(attached.device, "read_grid"))
        except LayerExists as e:
            attached.close_meta()
            raise RequestError(str(e), "exists") from e
        except ValueError as e:
            attached.close_meta()
            raise RequestError(str(e)) from e
        self.attached[name] = attached
        self.attach_requests[name] = request
        if kernel_mode:
            try:
                await self._mount_layer_root(name, attached, map_cells=learn is not None)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.detach({"name": name})
                raise
        else:
            self.fs.layer(name).info["serve"] = "fuse"
        layer = self.fs.layer(name)  # after a fallback to the FUSE tree, a new slot
        if layer.as_device and self._nursery is not None:
            self._nursery.start_soon(self._load_mapped_lengths, layer)
        log.info("attached %s (%s %s, served by %s)", name, kind, layer.info.get("digest") or layer.info.get("meta", ""),
                 layer.info["serve"])
        if after is not None and self._nursery is not None:
            self.after_attach_pending += 1
            self._nursery.start_soon(self._after_attach, after, layer, learn)
        return {"path": str(self.options.layer_root(name))}

    async def _load_mapped_lengths(self, layer: AttachedLayer) -> None:
        """Kernel mode: walk the layer's metadata for its padding check before reads need it.
        A layer detached meanwhile (its image closed) makes the walk fail: nothing to keep."""
        try:
            await layer.device.load_mapped_lengths()  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - a background warm-up; reads compute it again
            log.debug("layer %s: mapped lengths not computed in advance: %s", layer.name, e)

    async def _mount_layer_root(self, name: str, attached: attach_kinds.Attached, map_cells: bool = False) -> None:
        """Kernel mode: the layer's EROFS mount over loop devices of its chunk-device file and
        its metadata; where that is impossible, a bind mount of its FUSE tree (logged once)."""
        root = self.options.layer_root(name)
        layer = self.fs.layer(name)
        # What a later daemon must attach under this name to take the mount over.
        identity = handover.layer_identity(layer.info)
        if map_cells or self.recorder is not None or self.learning.active:
            await self._map_cells(layer)  # traces: before the kernel's first read of the device
        if is_mounted(root):  # left by a daemon that died (its loop reads a dead FUSE file), or handed over
            if layer.as_device:
                try:
                    adopted = await trio.to_thread.run_sync(kernel.adopt_layer, self.options.fuse_dir / name, root,
                                                           identity)
                except kernel.KernelServeError as e:
                    if self.taking_over:  # the running daemon's mount: not ours to replace
                        raise RequestError(f"layer {name}: {e}", "attach-failed") from e
                    log.info("cannot take over the mount at %s: %s", root, e)
                else:
                    self.layer_mounts[name] = root
                    layer.info.update(adopted.describe(), adopted=True)
                    return
            if self.taking_over:
                raise RequestError(f"layer {name}: the mount at {root} cannot be taken over", "attach-failed")
            await trio.to_thread.run_sync(unmount_path, root, True)
            log.info("replaced the stale mount at %s", root)
        if self.taking_over:
            raise RequestError(f"layer {name}: nothing to take over at {root}", "attach-failed")
        if not layer.as_device:
            kind, reason = "device", "its device cannot be shown as a file"
        elif attached.meta_fd is None:
            kind, reason = "meta", "its metadata is not in a file"
        else:
            try:
                mounted = await trio.to_thread.run_sync(
                    kernel.mount_layer, self.options.fuse_dir / name, attached.meta_fd, root,
                    self.options.loop_direct_io, identity, self.options.allow_suid_dev)
            except kernel.KernelServeError as e:
                kind, reason = e.kind, str(e)
            else:
                self.layer_mounts[name] = root
                layer.info.update(mounted.describe())
                _set_loop_read_ahead(mounted.chunk_loop, READ_AHEAD_KIB)
                return
        self._log_fallback(name, kind, reason)
        layer = self.fs.show_tree(name)
        await self._invalidate_root_entry(name)
        try:
            await trio.to_thread.run_sync(functools.partial(
                stack_mount, [self.options.fuse_dir / name], root, allow_suid_dev=self.options.allow_suid_dev))
        except MountError as e:
            raise RequestError(f"layer {name}: {e}", "attach-failed") from e
        self.layer_mounts[name] = root
        layer.info.update({"serve": "fuse", "fallback": reason})

    def _log_fallback(self, name: str, kind: str, reason: str) -> None:
        """A warning for the first layer that falls back for each kind of cause, then info."""
        if kind in self._fallback_reasons:
            log.info("layer %s is served by FUSE: %s", name, reason)
            return
        self._fallback_reasons.add(kind)
        log.warning("kernel serving mode impossible for layer %s, served by FUSE instead: %s", name, reason)

    async def _after_attach(self, after, attached, learn: tuple | None) -> None:
        def on_manifest(manifest: str) -> None:
            if learn is not None and attached.name in {layer.name for layer in self.fs.layers()}:
                store, ref, *rest = learn
                self.learning.add_layer(store, ref, manifest, *rest)

        try:
            await after(attached.info, on_manifest)
        except Exception:  # a learned trace is an optimisation: it must not take the daemon down
            log.exception("learned trace of layer %s failed", attached.name)
        finally:
            self.after_attach_pending -= 1

    async def detach(self, request: dict) -> dict:
        name = _require_str(request, "name")
        try:
            self.fs.layer(name)
        except NoSuchEntry as e:
            raise RequestError(str(e), "not-found") from e
        root = self.layer_mounts.pop(name, None)
        if root is not None:  # first the mount that reads the FUSE file or tree
            await trio.to_thread.run_sync(kernel.unmount_layer, root)
        self.fs.detach(name)
        self.policies.detach(name)
        self.attach_requests.pop(name, None)
        attached = self.attached.pop(name, None)
        if attached is not None:
            attached.close_meta()
        await self._invalidate_root_entry(name)
        log.info("detached %s", name)
        return {}

    def forget_mounts(self) -> None:
        """Let go of the layer and stacked mounts without unmounting them (handed over to a
        successor, or given back to a predecessor)."""
        self.layer_mounts.clear()
        self.stacked.clear()
        self.image_mounts.clear()

    async def _invalidate_root_entry(self, name: str) -> None:
        # Answer only once the kernel has forgotten the entry (its timeout is a day), so that
        # the name is gone (or changed) for whoever asked. invalidate_entry blocks until
        # related requests complete, which this loop answers: hence a worker thread.
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, pyfuse3.ROOT_INODE,
                                          name.encode("utf-8", "surrogateescape"))
        except OSError as e:  # ENOENT: the entry is not in the kernel's cache
            log.debug("invalidating the entry of %s: %s", name, e)

    async def _mount_image_request(self, request: dict) -> dict:
        image = request.get("image")
        if not isinstance(image, dict) or not isinstance(image.get("ref"), str):
            raise RequestError("'image' must be an object with a string 'ref'")
        mountpoint = Path(_require_str(request, "mountpoint"))
        if not mountpoint.is_absolute():
            raise RequestError("'mountpoint' must be an absolute path")
        if str(mountpoint) in self.image_mounts:
            raise RequestError(f"{mountpoint} is already an image mount of this daemon", "exists")
        # Layer names are unique per mount point, so one daemon can mount an image twice.
        prefix = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:8] + "-"
        try:
            names = await self.mount_image(image, mountpoint, prefix)
        except StartupError as e:
            raise RequestError(str(e), "bad-image") from e
        except MountError as e:
            raise RequestError(str(e), "mount-failed") from e
        return {"layers": names, "paths": [str(self.options.layer_root(name)) for name in names]}

    def list_layers(self) -> dict:
        return {"layers": [
            {"name": layer.name, "path": str(self.options.layer_root(layer.name)),
             "attached_at": layer.attached_at, **layer.info}
            for layer in self.fs.layers()]}

    def stats(self) -> dict:
        fetch = self.fetch_stats.snapshot()
        fetch["pending"] = self.fetcher.pending_count()  # queued, in backoff or in flight
        prefetch_queued = fetch["queued"].get("prefetch", 0)
        prefetch_done = fetch["done"].get("prefetch", 0) + fetch["already_cached"].get("prefetch", 0)
        return {
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "layers": len(self.fs.layers()),
            "reads": {"requests": self.read_stats.requests, "bytes": self.read_stats.bytes},
            "fetch": fetch,
            "cache": self.cache.stats(),
            "prefetch": {"queued": prefetch_queued, "done": prefetch_done,
                         "skipped_cached": fetch["already_cached"].get("prefetch", 0),
                         "layers_pending": self.after_attach_pending},
            "background": self.background.progress(),
            "learned": {"lookups": self.learned.lookups, "found": self.learned.found,
                        "recordings": self.learning.summary()},
        }

    async def handle(self, request: Any) -> dict:
        if not isinstance(request, dict):
            raise RequestError("a request must be a JSON object")
        if request.get("op") not in handover.CHANGING_OPS:
            return await self._handle(request)
        if self.handing_over:
            raise RequestError("the daemon is handing over to a new daemon (hot upgrade); retry", "upgrading")
        self.changes_in_flight += 1  # a handover waits for these to end before it says what we serve
        try:
            return await self._handle(request)
        finally:
            self.changes_in_flight -= 1

    async def _handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"ready": self.ready, "pid": os.getpid(), "fuse": str(self.options.fuse_dir),
                    "serve": self.options.serve}
        if op == "attach":
            return await self.attach(request)
        if op == "detach":
            return await self.detach(request)
        if op == "mount-image":
            return await self._mount_image_request(request)
        if op == "unmount-image":
            await self.unmount_image(Path(_require_str(request, "mountpoint")), bool(request.get("lazy")))
            return {}
        if op == "list":
            return self.list_layers()
        if op == "stats":
            return self.stats()
        if op == "trace-start":
            return await self.trace_start()
        if op == "trace-stop":
            return await self.trace_stop(request)
        if op == "fetch-log":
            return self.fetch_log.snapshot()
        if op == "shutdown":
            assert self._nursery is not None
            self._nursery.start_soon(self.terminate)
            return {}
        raise RequestError(f"unknown op {op!r}")

    # ------------------------------------------------------------------ control socket

    async def _serve_control(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        path = self.options.socket_path
        if self.options.take_over:  # the predecessor's socket is at `path` until we take it over
            path = path.with_name(f".{path.name}.{os.getpid()}.new")
        with _suppress_missing():
            path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        bound = os.stat(path).st_ino
        self.control_path = path
        sock.listen(64)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._serve_connection, [listener])
        finally:
            # Unless a successor's socket has replaced ours there (a hot upgrade).
            with _suppress_missing():
                if os.stat(self.control_path).st_ino == bound:
                    self.control_path.unlink()

    def _publish_control(self) -> None:
        """Takeover: our control socket replaces the predecessor's, in one rename (a client
        connecting meanwhile reaches one daemon or the other, never nothing)."""
        assert self.control_path is not None
        os.replace(self.control_path, self.options.socket_path)
        self.control_path = self.options.socket_path

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        lines = handover.LineReader(stream)
        async with stream:
            while True:
                try:
                    line = await lines.next()
                except ValueError as e:
                    await _send(stream, {"ok": False, "error": str(e), "type": "bad-request"})
                    return
                if line is None:
                    return
                try:
                    request = json.loads(line)
                    if isinstance(request, dict) and request.get("op") == "handover-begin":
                        if await handover.hand_over(self, stream, lines, request):
                            self._nursery.start_soon(self.terminate)  # type: ignore[union-attr]
                            return
                        continue
                    reply = {"ok": True, **await self.handle(request)}
                except ValueError as e:
                    reply = {"ok": False, "error": f"invalid JSON: {e}", "type": "bad-request"}
                except RequestError as e:
                    reply = {"ok": False, "error": str(e), "type": e.kind}
                except Exception as e:  # a bug must not take the daemon down with it
                    log.exception("control request failed: %r", line[:200])
                    reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}", "type": "internal"}
                try:
                    await _send(stream, reply)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

    # ------------------------------------------------------------------ metrics

    async def _serve_metrics(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.options.metrics  # type: ignore[misc]
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started()
        await trio.serve_listeners(self._serve_metrics_connection, listeners)

    async def _serve_metrics_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(10):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 16384:
                    block = await stream.receive_some(4096)
                    if not block:
                        return
                    request += block
                body = prometheus_text(self.stats()).encode()
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
                try:
                    await stream.send_all(head + body)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


def prometheus_text(stats: dict) -> str:
    fetch, cache = stats["fetch"], stats["cache"]
    lines = []

    def metric(name: str, kind: str, value: float, help_: str, labels: str = "") -> None:
        lines.append(f"# HELP lazyfs_{name} {help_}")
        lines.append(f"# TYPE lazyfs_{name} {kind}")
        lines.append(f"lazyfs_{name}{labels} {value}")

    metric("layers", "gauge", stats["layers"], "Attached layers.")
    metric("read_requests_total", "counter", stats["reads"]["requests"], "Kernel read requests served.")
    metric("read_bytes_total", "counter", stats["reads"]["bytes"], "Bytes returned to kernel reads.")
    metric("fetch_requests_total", "counter", fetch["requests"], "Range requests to blob sources.")
    metric("fetch_bytes_total", "counter", fetch["bytes_fetched"], "Bytes fetched from blob sources.")
    metric("fetch_chunk_hits_total", "counter", fetch["hits"], "Chunk reads served from the cache.")
    metric("fetch_chunk_misses_total", "counter", fetch["misses"], "Chunk reads that needed a fetch.")
    metric("fetch_inflight", "gauge", fetch["inflight"], "Range requests in flight.")
    metric("fetch_failed_chunks_total", "counter", fetch["failed_chunks"], "Chunks that failed after retries.")
    metric("fetch_retries_total", "counter", fetch["retries"], "Retried chunk fetches.")
    metric("fetch_read_timeouts_total", "counter", fetch["read_timeouts"],
           "Reads that failed at the read bound while their chunks were still being fetched.")
    metric("cache_bytes", "gauge", cache["bytes"], "Bytes in the chunk cache.")
    metric("cache_entries", "gauge", cache["entries"], "Chunks in the chunk cache.")
    for q, value in fetch.get("latency", {}).items():
        lines.append(f'lazyfs_fetch_latency_seconds{{quantile="{q}"}} {value}')
    return "\n".join(lines) + "\n"


def _set_loop_read_ahead(loop: str, kib: int) -> None:
    """EROFS reads ahead by its block device's setting (128 KiB for a new loop device)."""
    try:
        Path(f"/sys/block/{os.path.basename(loop)}/queue/read_ahead_kb").write_text(str(kib))
    except OSError as e:
        log.info("cannot set readahead of %s: %s", loop, e)


def _trace_key(layer) -> str:
    """How a trace names a layer: its blob digest, or for a plain image ``plain:<name>``."""
    return layer.info.get("digest") or f"plain:{layer.name}"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def _send(stream: trio.SocketStream, reply: dict) -> None:
    await stream.send_all(json.dumps(reply).encode() + b"\n")


def _require_str(request: dict, key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{key!r} must be a non-empty string")
    return value


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, FileNotFoundError)


# ---------------------------------------------------------------------- entry point


# httpcore reads a response body in 64 KiB pieces, each a trip through trio, h11 and httpx:
# for chunk ranges of megabytes that is about 2 ms of CPU per MiB received; 256 KiB pieces
# halve it (larger ones cost more again in allocation). A class attribute of httpcore's, so
# it is set once for the process, here.
HTTP_READ_BYTES = 256 << 10


def run_daemon(options: DaemonOptions) -> int:
    """Mount, serve until unmounted or signalled, unmount. Returns an exit status."""
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = HTTP_READ_BYTES
    daemon = Daemon(options)
    if is_mounted(options.fuse_dir) and is_stale(options.fuse_dir):
        unmount_fuse(options.fuse_dir)  # left by a daemon that died (ENOTCONN): take its place
    options.fuse_dir.mkdir(parents=True, exist_ok=True)
    if options.serve == "kernel":
        options.kernel_layers_dir.mkdir(parents=True, exist_ok=True)
    try:
        pyfuse3.init(daemon.operations, str(options.fuse_dir), set(options.fuse_options))
    except RuntimeError as e:
        log.error("cannot mount FUSE at %s: %s", options.fuse_dir, e)
        report_startup(options, {"error": f"cannot mount FUSE at {options.fuse_dir}: {e}"})
        return 1
    status = 0
    outcome = {"error": "the daemon stopped before it was ready"}
    try:
        trio.run(daemon.run)
    except BaseException as e:  # report, then make sure the FUSE mount goes away
        if isinstance(e, KeyboardInterrupt):
            status = 130
        else:
            log.error("daemon failed: %s", _describe(e), exc_info=not _is_expected(e))
            usage = all(isinstance(leaf, StartupError) and leaf.usage for leaf in _leaves(e))
            status = 2 if usage else 1
            outcome = {"error": "; ".join(_user_message(leaf) for leaf in _leaves(e)), "usage": usage}
    finally:
        if daemon.operations.device_pages is not None:
            daemon.operations.device_pages.wait_idle()  # no store may outlive the session
        pyfuse3.close(unmount=True)
        report_startup(options, outcome)  # a no-op once ready was reported
    return status


def report_startup(options: DaemonOptions, outcome: dict) -> None:
    """Tell whoever started the daemon how the startup went (once; later calls do nothing)."""
    fd, options.ready_fd = options.ready_fd, None
    if fd is None:
        return
    try:
        os.write(fd, json.dumps(outcome).encode() + b"\n")
    except OSError:  # the parent is gone: nobody to tell
        pass
    finally:
        os.close(fd)


def _trusted(spec: dict) -> bool:
    """Whether a mount request opts in to setuid bits and device nodes (``allow_suid_dev``)."""
    value = spec.get("allow_suid_dev", False)
    if not isinstance(value, bool):
        raise RequestError("'allow_suid_dev' must be true or false")
    return value


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _user_message(exc: BaseException) -> str:
    if isinstance(exc, (StartupError, RequestError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _is_expected(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_expected(e) for e in exc.exceptions)
    return isinstance(exc, (RequestError, StartupError, OSError))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def parse_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _policies(text: str) -> tuple[str, ...]:
    try:
        names = parse_policy_names(text)
        for name in names:
            load_policy(name)  # a user's module that does not import fails here, not at start
    except PolicyError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return tuple(names)


def add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fuse-dir", required=True, type=Path, help="where the FUSE mount goes")
    parser.add_argument("--socket", required=True, type=Path, help="control socket path")
    parser.add_argument("--cache-dir", required=True, type=Path, help="chunk cache directory")
    parser.add_argument("--cache-size", type=_size, default=None, help="cache size limit: bytes, or 500M, 20G")
    parser.add_argument("--metrics", type=parse_host_port, default=None, help="serve Prometheus text at HOST:PORT")
    parser.add_argument("--insecure-registry", action="append", default=[], help="registry host reached over plain HTTP")
    parser.add_argument("--hosts-dir", default=str(DEFAULT_HOSTS_DIR),
                        help="containerd hosts.toml directory naming registry mirrors (\"\": none)")
    parser.add_argument("--registry-auth", type=Path, default=None, help="Docker config.json with credentials")
    parser.add_argument("--startup", type=Path, default=None, help="JSON startup spec (image or attach list, stacked mount)")
    add_timeout_arguments(parser, with_defaults=True)
    parser.add_argument("--serve", choices=SERVE_MODES, default="fuse",
                        help="fuse: layers are directories of the FUSE mount; kernel: the kernel's EROFS "
                             "serves each layer over a loop device of its chunk device (a FUSE file)")
    parser.add_argument("--layers-dir", type=Path, default=None,
                        help="kernel mode: where the layers' EROFS mounts go (default: FUSE-DIR.layers)")
    parser.add_argument("--loop-direct-io", choices=("on", "off"), default="on" if LOOP_DIRECT_IO else "off",
                        help="kernel mode: whether the chunk device's loop reads its FUSE file with direct I/O")
    parser.add_argument("--policy", type=_policies, default=DEFAULT_POLICIES, metavar="NAME[,NAME]",
                        help="fetch policies: none, readahead, trace, background, locality, extent, or "
                             f"package.module:Class (default: {','.join(DEFAULT_POLICIES)})")
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="file descriptor that gets one JSON line once the startup spec is done or has failed")
    policy = RecordingPolicy()
    parser.add_argument("--record-quiet", type=float, default=policy.quiet, metavar="SECONDS",
                        help="a recorded start ends when no new chunk was read for this long")
    parser.add_argument("--record-max-seconds", type=float, default=policy.max_duration, metavar="SECONDS",
                        help="a recorded start ends this long after its first read at the latest")
    parser.add_argument("--record-max-bytes", type=_size, default=policy.max_bytes, metavar="BYTES",
                        help="the merged trace of an image is cut to its earliest records to this size")
    parser.add_argument("--allow-suid-dev", action="store_true",
                        help="mount FUSE with suid,dev (only for trusted images; default nosuid,nodev)")
    parser.add_argument("--take-over", action="store_true",
                        help="hot upgrade: take over the layers, mounts and control socket of the kernel-mode "
                             "daemon at --socket (with its --layers-dir and another --fuse-dir), which then exits")


def options_from_args(args: argparse.Namespace) -> DaemonOptions:
    startup = json.loads(args.startup.read_text()) if args.startup is not None else None
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)  # not for the mount helpers this daemon runs
    return DaemonOptions(
        fuse_dir=args.fuse_dir, socket_path=args.socket, cache_dir=args.cache_dir,
        cache_size=args.cache_size, metrics=args.metrics,
        registry=RegistrySettings(insecure=tuple(args.insecure_registry),
                                  hosts_dir=Path(args.hosts_dir) if args.hosts_dir else None,
                                  auth_file=args.registry_auth),
        startup=startup, ready_fd=args.ready_fd,
        recording=RecordingPolicy(quiet=args.record_quiet, max_duration=args.record_max_seconds,
                                  max_bytes=args.record_max_bytes),
        allow_suid_dev=args.allow_suid_dev, read_timeout=args.read_timeout,
        request_timeout=args.request_timeout,
        serve=args.serve, layers_dir=args.layers_dir, loop_direct_io=args.loop_direct_io == "on",
        policies=tuple(args.policy), take_over=args.take_over)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.daemon", description=__doc__.splitlines()[0])
    add_daemon_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (default INFO: startup, attach, detach, failures; -v: DEBUG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO - 10 * min(args.verbose, 1),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:  # one line per HTTP request only when asked for
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_daemon(options_from_args(args))

