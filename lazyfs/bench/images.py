"""Benchmark images: build from a recipe into a cached OCI layout, check, push.

Cache layout (default /var/cache/lazyfs-bench, or $LAZYFS_BENCH_CACHE)::

    stages/<stage key>/rootfs/         the root filesystem after this layer's steps
    stages/<stage key>/layer/<hex>     the layer blob (gzip tar of the diff to the stage below)
    stages/<stage key>/stage.json      written last: the stage is complete
    images/<name>-<image key[:16]>/oci/          OCI image layout, tag = recipe.tag
    images/<name>-<image key[:16]>/image.json    written last: build record (sizes, times)

Stages are shared between recipes with a common prefix (debian-scipy reuses the layers of
debian-python). A build holds an exclusive lock on the cache directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageBuildError
from .lifecycle import exclusive_lock
from .ocilayout import LayerBlob, write_layer, write_oci_layout
from .pyccheck import check_layers, verify_layers
from .recipes import BUILTIN_RECIPES, Recipe, builtin_recipe, image_key, stage_keys
from .rootfs import run_step, truncate_mtimes, unmount_below

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/lazyfs-bench")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LAZYFS_BENCH_CACHE", DEFAULT_CACHE_DIR))


@dataclass(frozen=True)
class BuiltImage:
    name: str
    tag: str
    oci_dir: Path               # an OCI image layout holding this one image
    rootfs: Path                # the final stage's root filesystem (all layers applied)
    layers: tuple[LayerBlob, ...]
    manifest_digest: str
    workload: tuple[str, ...]
    ready_line: str
    build_seconds: float        # time of the build that produced the cache entry
    pyc: dict[str, int]         # PycReport.summary() of the image
    cached: bool                # True when this call found the image already built

    @property
    def ref(self) -> str:
        """The skopeo/containers-image reference of the image: ``oci:DIR:TAG``."""
        return f"oci:{self.oci_dir}:{self.tag}"

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def tar_size(self) -> int:
        return sum(layer.tar_size for layer in self.layers)

    def layer_paths(self) -> list[Path]:
        return [self.oci_dir / "blobs" / "sha256" / layer.digest.split(":", 1)[1]
                for layer in self.layers]


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        unmount_below(path)
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _build_stage(recipe: Recipe, index: int, key: str, below: Path | None,
                 stages: Path) -> tuple[Path, LayerBlob]:
    """Build (or find) stage ``index``; return (its directory, its layer)."""
    final = stages / key
    record = final / "stage.json"
    if record.exists():
        return final, LayerBlob(**json.loads(record.read_text())["layer"])
    work = _fresh_dir(stages / f".{key}.tmp")
    root = work / "rootfs"
    started = time.monotonic()
    if below is None:
        root.mkdir()
    else:
        # Hard links inside the rootfs are kept; reflinks make the copy cheap where possible.
        proc = subprocess.run(["cp", "-a", "--reflink=auto", str(below / "rootfs"), str(root)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageBuildError(f"copying the stage below failed: {proc.stderr}")
    for step in recipe.layers[index]:
        log.info("%s layer %d: %s", recipe.name, index, step)
        run_step(step, root)
    truncate_mtimes(root)
    layer = write_layer(below / "rootfs" if below is not None else None, root, work / "layer")
    seconds = time.monotonic() - started
    (work / "stage.json").write_text(json.dumps(
        {"key": key, "recipe": recipe.name, "index": index, "seconds": round(seconds, 1),
         "steps": [repr(s) for s in recipe.layers[index]], "layer": layer.to_json()}, indent=1))
    os.rename(work, final)
    log.info("%s layer %d built in %.1f s: %d bytes (%d uncompressed)",
             recipe.name, index, seconds, layer.size, layer.tar_size)
    return final, layer


def _load_image(image_dir: Path, *, cached: bool) -> BuiltImage:
    record = json.loads((image_dir / "image.json").read_text())
    return BuiltImage(
        name=record["name"], tag=record["tag"], oci_dir=image_dir / "oci",
        rootfs=Path(record["rootfs"]),
        layers=tuple(LayerBlob(**layer) for layer in record["layers"]),
        manifest_digest=record["manifest_digest"], workload=tuple(record["workload"]),
        ready_line=record["ready_line"], build_seconds=record["build_seconds"],
        pyc=record["pyc"], cached=cached)


def build_image(recipe: Recipe | str, cache_dir: Path | None = None) -> BuiltImage:
    """Build the recipe's image (or a built-in recipe by name) unless it is cached.

    Raises ImageBuildError when a step fails and StalePycError when a .pyc in the packed
    layers does not match its source as the tar records it.
    """
    if isinstance(recipe, str):
        recipe = builtin_recipe(recipe)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    image_dir = cache_dir / "images" / f"{recipe.name}-{image_key(recipe)[:16]}"
    if (image_dir / "image.json").exists():
        return _load_image(image_dir, cached=True)
    with exclusive_lock(cache_dir / ".lock"):
        if (image_dir / "image.json").exists():  # built by another process meanwhile
            return _load_image(image_dir, cached=True)
        started = time.monotonic()
        stages = cache_dir / "stages"
        stages.mkdir(parents=True, exist_ok=True)
        below: Path | None = None
        layer_files: list[tuple[Path, LayerBlob]] = []
        for index, key in enumerate(stage_keys(recipe)):
            below, layer = _build_stage(recipe, index, key, below, stages)
            layer_files.append((below / "layer" / layer.digest.split(":", 1)[1], layer))
        pyc = verify_layers([path for path, _ in layer_files])
        work = _fresh_dir(image_dir.with_name(f".{image_dir.name}.tmp"))
        manifest_digest = write_oci_layout(
            work / "oci", layer_files, tag=recipe.tag, cmd=list(recipe.workload),
            env=list(recipe.env),
            history=[f"lazyfs-bench {recipe.name} layer {i}: " + "; ".join(map(repr, steps))
                     for i, steps in enumerate(recipe.layers)])
        seconds = time.monotonic() - started
        (work / "image.json").write_text(json.dumps({
            "name": recipe.name, "tag": recipe.tag, "rootfs": str(below / "rootfs"),
            "layers": [layer.to_json() for _, layer in layer_files],
            "manifest_digest": manifest_digest, "workload": list(recipe.workload),
            "ready_line": recipe.ready_line, "build_seconds": round(seconds, 1),
            "pyc": pyc.summary(), "image_key": image_key(recipe),
        }, indent=1))
        if image_dir.exists():
            shutil.rmtree(image_dir)
        os.rename(work, image_dir)
        image = _load_image(image_dir, cached=False)
        log.info("built %s in %.1f s: %d layers, %d bytes compressed, %d uncompressed",
                 recipe.name, seconds, len(image.layers), image.size, image.tar_size)
        return image


def push_image(image: BuiltImage, endpoint: str, repository: str | None = None,
               tag: str | None = None) -> str:
    """Copy the image into the registry at endpoint (``host:port``, plain HTTP).

    Returns the manifest digest the registry stored. The blobs are pushed as they are
    (same digests as the OCI layout).
    """
    repository = repository or image.name
    tag = tag or image.tag
    with tempfile.TemporaryDirectory() as tmp:
        digest_file = Path(tmp) / "digest"
        cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
               "--digestfile", str(digest_file), image.ref,
               f"docker://{endpoint}/{repository}:{tag}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise ImageBuildError(f"pushing {image.name} to {endpoint}/{repository}:{tag} "
                                  f"failed: {proc.stderr.strip()}")
        return digest_file.read_text().strip()


def _oci_layer_paths(oci_dir: Path) -> list[Path]:
    index = json.loads((oci_dir / "index.json").read_text())
    blobs = oci_dir / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":", 1)[1]).read_text())
    return [blobs / layer["digest"].split(":", 1)[1] for layer in manifest["layers"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.bench.images",
                                     description="Build, check and push benchmark images.")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"cache directory (default $LAZYFS_BENCH_CACHE or {DEFAULT_CACHE_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in recipes")
    build = sub.add_parser("build", help="build (or find cached) a built-in image")
    build.add_argument("name", choices=sorted(BUILTIN_RECIPES))
    check = sub.add_parser("check", help="check the .pyc headers of an OCI layout's image")
    check.add_argument("oci_dir", type=Path)
    push = sub.add_parser("push", help="build if needed, then push to a registry")
    push.add_argument("name", choices=sorted(BUILTIN_RECIPES))
    push.add_argument("endpoint", help="registry host:port (plain HTTP)")
    push.add_argument("--repository", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.command == "list":
        for name in sorted(BUILTIN_RECIPES):
            recipe = builtin_recipe(name)
            print(f"{name:16} {recipe.description}\n{'':16} workload: {' '.join(recipe.workload)}")
        return 0
    if args.command == "check":
        report = check_layers(_oci_layer_paths(args.oci_dir))
        print(json.dumps(report.summary()))
        for mismatch in report.mismatches[:20]:
            print(mismatch)
        return 0 if report.ok else 1
    image = build_image(args.name, args.cache)
    if args.command == "build":
        print(json.dumps({
            "name": image.name, "ref": image.ref, "manifest": image.manifest_digest,
            "layers": [{"digest": l.digest, "size": l.size, "tar_size": l.tar_size}
                       for l in image.layers],
            "size": image.size, "tar_size": image.tar_size, "rootfs": str(image.rootfs),
            "build_seconds": image.build_seconds, "cached": image.cached, "pyc": image.pyc,
        }, indent=1))
        return 0
    print(push_image(image, args.endpoint, args.repository))
    return 0


if __name__ == "__main__":
    sys.exit(main())
