"""Convert an image (or every platform of an index) so that each layer is a lazyfs layer.

The plan for one image manifest: download each layer blob into a staging directory (streamed,
digest-verified by the store), convert it with lazyfs.layer.builder in a worker thread (the
builder itself compresses on every core), check that the source layer's uncompressed tar
matches its diff_id in the config, and rewrite the config (rootfs.diff_ids) and the manifest
(OCI media types; each layer's descriptor carries the lazyfs annotations). Layers that are
already lazyfs, and blobs that are not tar layers, are copied unchanged. Only when every
manifest has been converted does anything get written to the destination: blobs first, then
child manifests by digest, then the top manifest or index under the destination's tag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Protocol

import trio

from lazyfs.layer.annotations import is_lazyfs
from lazyfs.layer.builder import BuildResult, build_layer
from lazyfs.layer.errors import LayerFormatError
from lazyfs.layer.format import DEFAULT_CHUNK_SIZE, DEFAULT_INLINE_THRESHOLD
from lazyfs.registry.manifest import (
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD,
    OCI_MANIFEST, Descriptor, Manifest, Platform, sha256_digest,
)

log = logging.getLogger(__name__)

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
CONVERTIBLE_LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR})
_CONFIG_TYPES = {DOCKER_CONFIG: OCI_CONFIG}
_DOWNLOADS_IN_PARALLEL = 3
_STOP_WAIT = 10.0  # seconds a cancelled build may take to notice (it checks every chunk)


class ConvertError(Exception):
    """The image cannot be converted (bad layer, diff_id mismatch, unsupported manifest...)."""


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    inline_threshold: int = DEFAULT_INLINE_THRESHOLD
    platform: Platform | None = None  # convert only this platform of an index
    threads: int | None = None
    level: int = 3
    # A trace (lazyfs.trace.format format) embedded in every converted layer, whose tar is then written
    # in the trace-ordered layout (traced files first; a new diff_id). Its records name files by
    # path, so the daemon can follow them in a layer whose chunk numbers it never saw.
    trace: bytes | None = None
    # False: embed the trace but keep each layer's tar as it is (byte for byte, same diff_id).
    trace_order: bool = True


class Progress(Protocol):
    """What convert_image reports; every method may be called from a worker thread."""

    def layer_started(self, digest: str, size: int) -> None: ...

    def layer_advanced(self, digest: str, nbytes: int) -> None: ...

    def layer_finished(self, digest: str) -> None: ...


class _NoProgress:
    def layer_started(self, digest: str, size: int) -> None:
        pass

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        pass

    def layer_finished(self, digest: str) -> None:
        pass


@dataclasses.dataclass
class LayerOutcome:
    source: Descriptor
    target: Descriptor
    converted: bool  # False: copied unchanged
    build: BuildResult | None = None


@dataclasses.dataclass
class ImageOutcome:
    source_digest: str
    manifest: bytes
    manifest_digest: str
    config: bytes
    layers: list[LayerOutcome]
    platform: dict | None = None
    media_type: str = OCI_MANIFEST


@dataclasses.dataclass
class ConvertResult:
    source_digest: str
    digest: str  # of the pushed top-level manifest or index
    media_type: str
    images: list[ImageOutcome]


class _Staging:
    """Blobs of the converted image on local disk, by digest, until they are pushed."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, Path] = {}
        self.media_types: dict[str, str] = {}
        self.inline: dict[str, bytes] = {}

    def path_for(self, digest: str) -> Path:
        return self.directory / digest.replace(":", "-")

    def add_file(self, digest: str, path: Path, media_type: str) -> None:
        target = self.path_for(digest)
        if path != target:
            os.replace(path, target)
        self.files[digest] = target
        self.media_types[digest] = media_type

    def add_bytes(self, digest: str, data: bytes, media_type: str) -> None:
        self.inline[digest] = data
        self.media_types[digest] = media_type


class _Converter:
    def __init__(self, src, options: ConvertOptions, staging: _Staging, progress: Progress):
        self.src = src
        self.options = options
        self.staging = staging
        self.progress = progress
        self.layer_cache: dict[str, LayerOutcome] = {}
        self._in_progress: dict[str, trio.Event] = {}  # a layer used twice is converted once
        self.download_limiter = trio.CapacityLimiter(_DOWNLOADS_IN_PARALLEL)
        self.convert_lock = trio.Lock()  # one conversion at a time: each uses every core

    async def image(self, manifest: Manifest, platform: dict | None = None) -> ImageOutcome:
        doc = manifest.json
        config_desc = manifest.config
        layers = manifest.layers
        if not any(d.media_type in CONVERTIBLE_LAYER_TYPES and not is_lazyfs(d.annotations) for d in layers):
            return await self._copy_unchanged(manifest, platform)
        config = await self.src.get_config(manifest)
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise ConvertError(f"{manifest.digest}: config has {diff_ids!r} diff_ids for {len(layers)} layers")
        outcomes: list[LayerOutcome | None] = [None] * len(layers)

        async def one(i: int) -> None:
            outcomes[i] = await self.layer(layers[i], diff_ids[i])

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(layers)):
                    nursery.start_soon(one, i)
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None

        new_diff_ids = []
        for outcome, diff_id in zip(outcomes, diff_ids):
            new_diff_ids.append(outcome.build.diff_id if outcome.build is not None else diff_id)
        config = dict(config)
        config["rootfs"] = dict(config["rootfs"], diff_ids=new_diff_ids)
        config_bytes = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
        config_type = _CONFIG_TYPES.get(config_desc.media_type, config_desc.media_type)
        new_config = Descriptor(config_type, sha256_digest(config_bytes), len(config_bytes),
                                annotations=dict(config_desc.annotations))
        self.staging.add_bytes(new_config.digest, config_bytes, config_type)

        new_doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": new_config.to_json(),
                   "layers": [o.target.to_json() for o in outcomes]}
        for key in ("annotations", "subject", "artifactType"):
            if key in doc:
                new_doc[key] = doc[key]
        data = json.dumps(new_doc, indent=2).encode()
        digest = sha256_digest(data)
        log.info("converted manifest %s -> %s", manifest.digest, digest)
        return ImageOutcome(manifest.digest, data, digest, config_bytes, list(outcomes), platform)

    async def _copy_unchanged(self, manifest: Manifest, platform: dict | None) -> ImageOutcome:
        """An image with nothing to convert (already lazyfs, or an attestation) is copied as is."""
        config_desc = manifest.config
        config = await self.src.get_blob(config_desc.digest)
        self.staging.add_bytes(config_desc.digest, config, config_desc.media_type)
        outcomes = [await self.layer(desc, None) for desc in manifest.layers]
        log.info("manifest %s has no layer to convert: copied unchanged", manifest.digest)
        return ImageOutcome(manifest.digest, manifest.data, manifest.digest, config, outcomes, platform,
                            media_type=manifest.media_type)

    async def layer(self, desc: Descriptor, diff_id: str | None) -> LayerOutcome:
        while desc.digest in self._in_progress:
            await self._in_progress[desc.digest].wait()
        cached = self.layer_cache.get(desc.digest)
        if cached is not None:
            if cached.converted and cached.build.source_diff_id != diff_id:
                raise ConvertError(f"layer {desc.digest}: the config says {diff_id}, "
                                   f"its uncompressed tar is {cached.build.source_diff_id}")
            return cached
        done = self._in_progress[desc.digest] = trio.Event()
        try:
            outcome = await self._layer(desc, diff_id)
        finally:
            del self._in_progress[desc.digest]
            done.set()
        self.layer_cache[desc.digest] = outcome
        return outcome

    async def _layer(self, desc: Descriptor, diff_id: str | None) -> LayerOutcome:
        workdir = self.staging.directory
        source_path = workdir / ("src-" + desc.digest.replace(":", "-"))
        async with self.download_limiter:
            await self.src.download_blob(desc.digest, source_path)
        passthrough = desc.media_type not in CONVERTIBLE_LAYER_TYPES or (
            desc.media_type == OCI_LAYER_ZSTD and is_lazyfs(desc.annotations)
        )
        if passthrough:
            self.staging.add_file(desc.digest, source_path, desc.media_type)
            return LayerOutcome(desc, desc, converted=False)
        out_path = workdir / ("new-" + desc.digest.replace(":", "-"))
        async with self.convert_lock:
            result = await self._build_in_thread(desc, source_path, out_path)
        source_path.unlink()
        if result.source_diff_id != diff_id:
            raise ConvertError(
                f"layer {desc.digest}: its uncompressed tar is {result.source_diff_id}, the config says {diff_id}"
            )
        annotations = {k: v for k, v in desc.annotations.items() if not k.startswith("containerd.io/snapshot/lazyfs.")}
        annotations.update(result.annotations)
        target = Descriptor(OCI_LAYER_ZSTD, result.digest, result.size, annotations=annotations)
        self.staging.add_file(result.digest, out_path, OCI_LAYER_ZSTD)
        return LayerOutcome(desc, target, converted=True, build=result)

    async def _build_in_thread(self, desc: Descriptor, source_path: Path, out_path: Path) -> BuildResult:
        """The build on a worker thread that stops soon after this task is cancelled (Ctrl-C,
        SIGTERM, a failed sibling layer), so the staging directory can be removed."""
        cancel, finished = threading.Event(), threading.Event()

        def work() -> BuildResult:
            try:
                return self._build(desc, source_path, out_path, cancel)
            finally:
                finished.set()

        try:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except BaseException:
            cancel.set()
            # The builder checks cancel between chunks; wait for it so that no thread still
            # writes into the staging directory while it is removed.
            finished.wait(_STOP_WAIT)
            raise

    def _build(self, desc: Descriptor, source_path: Path, out_path: Path, cancel: threading.Event) -> BuildResult:
        o = self.options
        self.progress.layer_started(desc.digest, desc.size)
        try:
            with open(source_path, "rb") as src, open(out_path, "wb") as out:
                return build_layer(
                    src, out, chunk_size=o.chunk_size, inline_threshold=o.inline_threshold, level=o.level,
                    threads=o.threads, progress=lambda n: self.progress.layer_advanced(desc.digest, n),
                    trace=o.trace, order=o.trace_order, spool_dir=self.staging.directory, cancel=cancel,
                )
        except LayerFormatError as e:
            raise ConvertError(f"layer {desc.digest}: {e}") from e
        finally:
            self.progress.layer_finished(desc.digest)


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first real error of a nursery's group (callers expect our error types, not a group)."""
    leaves = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(group)
    for e in leaves:
        if not isinstance(e, trio.Cancelled):
            return e
    return leaves[0]


async def convert_image(
    src,
    dst,
    *,
    tag: str | None,
    options: ConvertOptions = ConvertOptions(),
    progress: Progress | None = None,
    workdir: str | os.PathLike | None = None,
) -> ConvertResult:
    """Convert the image src (an ImageStore at its own reference) and push it to dst under tag."""
    progress = progress or _NoProgress()
    with tempfile.TemporaryDirectory(prefix="lazyfs-convert-", dir=workdir) as tmp:
        staging = _Staging(Path(tmp))
        converter = _Converter(src, options, staging, progress)
        top = await src.get_manifest()
        images: list[ImageOutcome] = []
        if top.is_index and options.platform is not None:
            chosen = top.select_platform(options.platform)
            top = await src.get_manifest(chosen.digest)
        if not top.is_index:
            if top.media_type not in (OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"):
                raise ConvertError(f"unsupported manifest media type {top.media_type}")
            image = await converter.image(top)
            images.append(image)
            result_bytes, result_type = image.manifest, image.media_type
        else:
            entries = []
            for entry in top.manifests:
                child = await src.get_manifest(entry.digest)
                if child.is_index:
                    raise ConvertError(f"nested index {entry.digest} is not supported")
                image = await converter.image(child, entry.platform)
                images.append(image)
                new_entry = Descriptor(image.media_type, image.manifest_digest, len(image.manifest),
                                       annotations=dict(entry.annotations), platform=entry.platform)
                entries.append(new_entry.to_json())
            doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
            if "annotations" in top.json:
                doc["annotations"] = top.json["annotations"]
            result_bytes, result_type = json.dumps(doc, indent=2).encode(), OCI_INDEX
        digest = await _push(dst, staging, images, result_bytes, result_type, tag, top.is_index)
        return ConvertResult(top.digest, digest, result_type, images)


async def _push(dst, staging: _Staging, images: list[ImageOutcome], top: bytes, top_type: str,
                tag: str | None, is_index: bool) -> str:
    for digest, path in staging.files.items():
        await dst.push_blob(path, digest=digest, media_type=staging.media_types[digest])
    for image in images:
        config_digest = sha256_digest(image.config)
        await dst.push_blob(image.config, digest=config_digest, media_type=staging.media_types[config_digest])
    if is_index:
        for image in images:
            await dst.push_manifest(image.manifest, image.media_type)
    return await dst.push_manifest(top, top_type, tag)
