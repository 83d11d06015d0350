"""Benchmark image recipes: what goes in each layer, and the workload that starts the image.

A recipe is pure data; its hash (over the steps and the content of any host files it
copies) keys the build cache, so changing a recipe rebuilds exactly what changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Bumped when the builder's output for the same recipe changes (packing rules, cleanup).
BUILDER_VERSION = 1


@dataclass(frozen=True)
class Debootstrap:
    """A Debian base system: ``debootstrap --variant=VARIANT [--include=...] SUITE``."""
    suite: str = "bookworm"
    variant: str = "minbase"
    include: tuple[str, ...] = ()


@dataclass(frozen=True)
class AptInstall:
    """``apt-get install --no-install-recommends PACKAGES`` inside the rootfs (chroot)."""
    packages: tuple[str, ...]


@dataclass(frozen=True)
class CopyFiles:
    """Host files or directory trees copied into the rootfs: (host path, path in the image)."""
    files: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Busybox:
    """The host's static busybox at /bin/busybox, with symlinks for the given applets."""
    applets: tuple[str, ...] = ("sh", "echo", "cat", "ls", "true")
    host_binary: str = "/bin/busybox"


@dataclass(frozen=True)
class CompilePyc:
    """Byte-compile (timestamp-based .pyc) the Python sources under ``dirs``.

    ``interpreter="chroot"`` runs the image's own python3 (the .pyc matches what the image
    will run); ``"host"`` runs this interpreter, for images without Python of their own.
    """
    dirs: tuple[str, ...]
    interpreter: str = "chroot"


Step = Debootstrap | AptInstall | CopyFiles | Busybox | CompilePyc


@dataclass(frozen=True)
class Recipe:
    name: str
    layers: tuple[tuple[Step, ...], ...]
    workload: tuple[str, ...]
    ready_line: str = "ready"
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                            "LANG=C.UTF-8")
    tag: str = "latest"
    description: str = field(default="", compare=False)


def _step_json(step: Step) -> dict:
    return {"step": type(step).__name__, **asdict(step)}


def _host_content_digest(step: Step) -> str | None:
    """Digest of the host files a step copies, so the cache notices when they change."""
    paths: list[Path]
    if isinstance(step, CopyFiles):
        paths = [Path(src) for src, _ in step.files]
    elif isinstance(step, Busybox):
        paths = [Path(step.host_binary)]
    else:
        return None
    h = hashlib.sha256()
    for root in paths:
        candidates = sorted(root.rglob("*")) if root.is_dir() else [root]
        for p in candidates:
            if p.is_file() and not p.is_symlink():
                h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def stage_keys(recipe: Recipe) -> list[str]:
    """One key per layer: the hash of every step up to and including that layer."""
    h = hashlib.sha256(f"lazyfs-bench-builder-{BUILDER_VERSION}".encode())
    keys = []
    for layer in recipe.layers:
        for step in layer:
            h.update(json.dumps(_step_json(step), sort_keys=True).encode())
            content = _host_content_digest(step)
            if content is not None:
                h.update(content.encode())
        h.update(b"/layer")
        keys.append(h.hexdigest())
    return keys


def image_key(recipe: Recipe) -> str:
    h = hashlib.sha256(stage_keys(recipe)[-1].encode())
    h.update(json.dumps([recipe.name, recipe.workload, recipe.ready_line, recipe.env,
                         recipe.tag]).encode())
    return h.hexdigest()


# --- built-in recipes -----------------------------------------------------------------

DEBIAN_BASE = (Debootstrap(),)
PYTHON_LAYER = (AptInstall(("python3",)), CompilePyc(("/usr/lib/python3", "/usr/lib/python3.11")))
SCIPY_LAYER = (AptInstall(("python3-numpy", "python3-scipy", "python3-pandas")),
               CompilePyc(("/usr/lib/python3", "/usr/lib/python3.11")))

DEBIAN_PYTHON = Recipe(
    name="debian-python",
    layers=(DEBIAN_BASE, PYTHON_LAYER),
    workload=("python3", "-c", "import json, email, http.client; print('ready')"),
    description="Debian bookworm minbase + python3 (base layer, python layer)",
)

DEBIAN_SCIPY = Recipe(
    name="debian-scipy",
    layers=(DEBIAN_BASE, PYTHON_LAYER, SCIPY_LAYER),
    workload=("python3", "-c", "import numpy, pandas, scipy.stats; print('ready')"),
    description="debian-python + python3-numpy, python3-scipy, python3-pandas from Debian",
)


def busybox_python_recipe() -> Recipe:
    """A tiny image for tests: busybox, plus this interpreter's json package byte-compiled.

    Built with no network through the same code path as the Debian images (layer diff,
    packing, .pyc check, OCI layout).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    target = f"/usr/lib/{version}"
    return Recipe(
        name="busybox-python",
        layers=(
            (Busybox(),),
            (CopyFiles(((str(stdlib / "json"), f"{target}/json"),)),
             CompilePyc((target,), interpreter="host")),
        ),
        workload=("/bin/sh", "-c", "echo ready"),
        description="busybox-static + a byte-compiled copy of the json package (tests)",
    )


BUILTIN_RECIPES = {
    "debian-python": lambda: DEBIAN_PYTHON,
    "debian-scipy": lambda: DEBIAN_SCIPY,
    "busybox-python": busybox_python_recipe,
}


def builtin_recipe(name: str) -> Recipe:
    try:
        return BUILTIN_RECIPES[name]()
    except KeyError:
        raise KeyError(f"no built-in recipe {name!r}; known: {', '.join(BUILTIN_RECIPES)}") from None

