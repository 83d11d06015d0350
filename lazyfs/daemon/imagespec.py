"""From an image reference to the daemon's attach requests (one per layer, base layer first).

Runs in the daemon that `lazyfs mount` starts, on the daemon's own HTTP client: it resolves
the manifest (an index resolves to the wanted platform) and turns each layer's descriptor --
digest, size and annotations -- into an attach request; the attach then reads the layer
metadata (range reads named by the annotations). Each request also names the image manifest,
so that a layer without an embedded trace can prefetch from a trace attached to the image in
the registry (lazyfs.daemon.learned).
"""

from __future__ import annotations

import httpx

from lazyfs.layer.annotations import is_lazyfs
from lazyfs.registry import InvalidReference, Platform, RegistryError, RetryPolicy, open_store


class ImageSpecError(Exception):
    """The image cannot be resolved, or has no lazyfs layers where some are needed."""


def layer_name(index: int, digest: str) -> str:
    """The top-level directory of a layer in the daemon's mount: position and short digest."""
    return f"{index:03d}-{digest.partition(':')[2][:16]}"


async def _resolve(reference: str, platform: str | None, store_options: dict,
                   http: httpx.AsyncClient | None, retry: RetryPolicy | None = None):
    try:
        store = open_store(reference, http=http, retry=retry, **store_options)
    except (InvalidReference, RegistryError) as e:
        raise ImageSpecError(f"invalid image reference {reference!r}: {e}") from e
    try:
        manifest = await store.resolve_manifest(platform=Platform.parse(platform) if platform else None)
        return manifest
    except RegistryError as e:
        raise ImageSpecError(f"cannot resolve {reference}: {e}") from e
    finally:
        await store.aclose()


async def image_attach_requests(reference: str, *, layer: str | None = None, platform: str | None = None,
                                store_options: dict | None = None, trace: str | None = None,
                                prefetch: bool = True, learn: str = "pull",
                                http: httpx.AsyncClient | None = None,
                                retry: RetryPolicy | None = None) -> list[dict]:
    """The attach requests for the image's layers (or the one `layer` names), base layer first.

    ``learn``: "pull" looks up a trace attached to the image in the registry when a layer has
    none of its own (and prefetch is on) and records the start into the daemon's local trace
    of the image; "push" also attaches that trace to the image in the registry; "off" neither."""
    if learn not in ("off", "pull", "push"):
        raise ImageSpecError(f"learn must be off, pull or push, not {learn!r}")
    manifest = await _resolve(reference, platform, store_options or {}, http, retry)
    requests = []
    for index, descriptor in enumerate(manifest.layers):
        if layer is not None and not _matches(descriptor.digest, layer):
            continue
        requests.append({
            "name": layer_name(index, descriptor.digest), "kind": "lazyfs", "ref": reference,
            "digest": descriptor.digest, "size": descriptor.size, "annotations": dict(descriptor.annotations),
            "prefetch": prefetch, **({"trace": trace} if trace else {}),
            # without a trace of its own, a layer looks for one the registry carries
            "image_manifest": manifest.digest, "learned_trace": prefetch and not trace and learn != "off",
            "record_trace": learn != "off", "share": learn,
        })
    if layer is not None and len(requests) != 1:
        raise ImageSpecError(f"{len(requests)} layers of {reference} match {layer!r}")
    if not requests:
        raise ImageSpecError(f"{reference} has no layers")
    plain = [r["digest"] for r in requests if not is_lazyfs(r["annotations"])]
    if plain:
        raise ImageSpecError(
            f"{len(plain)} layer(s) of {reference} are not lazyfs layers (no lazyfs annotations), "
            f"e.g. {plain[0]}: convert the image with `lazyfs convert` first")
    return requests


def _matches(digest: str, wanted: str) -> bool:
    return digest == wanted or digest.partition(":")[2].startswith(wanted.partition(":")[2] or wanted)
