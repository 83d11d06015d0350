"""Images an experiment pulls: built or found, converted to lazyfs (cached), pushed.

Every image exists in variants: ``original`` (the image as built: gzip layers) and ``lazy``
(``lazyfs convert`` of it). Conversions are cached as OCI layouts next to the image build
cache, keyed by the source manifest digest and the chunk size. Pushes go to the experiment's
registry storage through an unshaped loopback registry before any measurement; the shaped
registries of the profiles then serve that same storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BenchError
from .experiment import ImageSpec
from .images import build_image, default_cache_dir
from .system import tool, venv_script

log = logging.getLogger(__name__)

ORIGINAL = "original"
LAZY = "lazy"
REPOSITORY_PREFIX = "lazyfs-bench/"


class PrepareError(BenchError):
    """An image could not be built, converted or pushed."""


@dataclass
class SourceImage:
    name: str
    oci_dir: Path
    tag: str
    manifest_digest: str
    workload: tuple[str, ...] | None  # the recipe's workload, if built from a recipe
    ready_line: str | None
    variants: dict[str, OciImage] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"oci:{self.oci_dir}:{self.tag}"


@dataclass
class OciImage:
    """One variant: its OCI layout, where it is in the registry, and its sizes."""
    oci_dir: Path
    tag: str
    manifest_digest: str
    layer_bytes: int
    layers: int
    repository: str = ""
    registry_tag: str = ""

    @property
    def ref(self) -> str:
        return f"oci:{self.oci_dir}:{self.tag}"

    def registry_ref(self, endpoint: str) -> str:
        return f"{endpoint}/{self.repository}:{self.registry_tag}"


def read_layout(oci_dir: Path, tag: str | None = None) -> OciImage:
    """The manifest of ``tag`` (or the only image) in an OCI layout, and its layer sizes."""
    try:
        index = json.loads((oci_dir / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise PrepareError(f"{oci_dir}: not an OCI layout: {e}") from None
    entries = index.get("manifests", [])
    if tag is not None:
        entries = [m for m in entries
                   if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if len(entries) != 1:
        raise PrepareError(f"{oci_dir}: expected one image{f' tagged {tag}' if tag else ''}, "
                           f"found {len(entries)}")
    digest = entries[0]["digest"]
    manifest = json.loads((oci_dir / "blobs" / "sha256" / digest.split(":", 1)[1]).read_text())
    if "layers" not in manifest:
        raise PrepareError(f"{oci_dir}: {digest} is not an image manifest (an index?)")
    name = entries[0].get("annotations", {}).get("org.opencontainers.image.ref.name", tag or "latest")
    return OciImage(oci_dir, name, digest, sum(l["size"] for l in manifest["layers"]),
                    len(manifest["layers"]))


def resolve_image(spec: ImageSpec, cache_dir: Path | None = None) -> SourceImage:
    """Build the recipe (cached) or open the given layout."""
    if spec.recipe is not None:
        try:
            built = build_image(spec.recipe, cache_dir)
        except KeyError as e:
            raise PrepareError(str(e)) from None
        source = SourceImage(spec.name, built.oci_dir, built.tag, built.manifest_digest,
                             built.workload, built.ready_line)
    else:
        assert spec.ref is not None
        location = spec.ref.removeprefix("oci:")
        directory, _, tag = location.partition(":")
        layout = read_layout(Path(directory), tag or None)
        source = SourceImage(spec.name, Path(directory), layout.tag, layout.manifest_digest, None, None)
    source.variants[ORIGINAL] = read_layout(source.oci_dir, source.tag)
    return source


def convert_cached(source: SourceImage, chunk_size: int, cache_dir: Path | None = None,
                   trace: Path | None = None, keep_order: bool = False) -> OciImage:
    """``lazyfs convert`` of the source into a cached OCI layout (converted once), with
    ``--trace`` when a trace file is given (keyed by the trace's content): the trace-ordered
    layout, or with ``keep_order`` the trace embedded in layers of unchanged order."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"{source.name}-{source.manifest_digest.split(':', 1)[1][:16]}-c{chunk_size}"
    extra: list[str] = []
    if trace is not None:
        layout = "keep" if keep_order else "ordered"
        key += f"-trace-{hashlib.sha256(trace.read_bytes()).hexdigest()[:12]}-{layout}"
        extra = ["--trace", str(trace), *(["--keep-order"] if keep_order else [])]
    final = cache_dir / "converted" / key
    if (final / "done").exists():
        return read_layout(final / "oci", "latest")
    work = final.with_name(f".{key}.tmp")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log.info("converting %s (chunk size %d)", source.name, chunk_size)
    proc = subprocess.run([venv_script("lazyfs"), "convert", "-q", "--chunk-size", str(chunk_size),
                           *extra, source.ref, f"oci:{work / 'oci'}:latest"],
                          capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise PrepareError(f"lazyfs convert {source.name} failed: {(proc.stderr or proc.stdout).strip()}")
    (work / "done").write_text(proc.stdout)
    if final.exists():
        shutil.rmtree(final)
    os.rename(work, final)
    return read_layout(final / "oci", "latest")


def push(image: OciImage, endpoint: str, repository: str, tag: str) -> None:
    """skopeo copy with preserved digests (the manifest's bytes, annotations included, stay)."""
    proc = subprocess.run([tool("skopeo"), "copy", "--quiet", "--dest-tls-verify=false",
                           "--preserve-digests", image.ref, f"docker://{endpoint}/{repository}:{tag}"],
                          capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise PrepareError(f"pushing {image.ref} failed: {proc.stderr.strip()}")
    image.repository, image.registry_tag = repository, tag


def registry_names(source: SourceImage, variant: str, chunk_size: int) -> tuple[str, str]:
    tag = source.manifest_digest.split(":", 1)[1][:16]
    if variant != ORIGINAL:
        tag += f"-{variant}-c{chunk_size}"
    return REPOSITORY_PREFIX + source.name, tag
