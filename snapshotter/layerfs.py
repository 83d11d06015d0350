"""What the snapshotter needs from a lazy layer filesystem, and the labels that describe a layer.

The snapshotter depends only on :class:`LayerFS` (the stargz-snapshotter pattern): ``check``
whether the labels of a Prepare name a layer the filesystem can serve lazily, ``mount`` it
(returning the directory overlayfs uses as a lowerdir), ``unmount`` it when no snapshot uses it.
:class:`snapshotter.daemon_client.DaemonLayerFS` implements it over the lazyfs daemon's control
socket; tests use an in-process fake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

# containerd's unpacker: the chain id the committed snapshot will be known by.
TARGET_REF_LABEL = "containerd.io/snapshot.ref"
# Labels the CRI plugin (and ctr-remote) add for remote snapshotters.
CRI_IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
# stargz-snapshotter's names for the same facts (ctr-remote rpull sends these).
STARGZ_REF_LABEL = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST_LABEL = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS_LABEL = "containerd.io/snapshot/remote/stargz.layers"
# Layer annotations of the lazyfs format, forwarded by containerd as Prepare labels.
LAZYFS_LABEL_PREFIX = "containerd.io/snapshot/lazyfs."
# Set by the snapshotter on the committed snapshot of a lazily served layer.
LAZY_LAYER_LABEL = "containerd.io/snapshot/lazyfs-snapshotter.lazy-layer"


@dataclass(frozen=True)
class LayerSource:
    """Where a layer comes from, as far as the Prepare labels tell."""

    image_ref: str
    layer_digest: str
    manifest_digest: str
    lazyfs_annotations: dict[str, str]  # the layer's lazyfs annotations, full keys


def layer_source(labels: Mapping[str, str]) -> LayerSource | None:
    """The layer named by ``labels``, or None when they do not name a lazyfs layer."""
    image_ref = labels.get(CRI_IMAGE_REF_LABEL) or labels.get(STARGZ_REF_LABEL, "")
    layer_digest = labels.get(CRI_LAYER_DIGEST_LABEL) or labels.get(STARGZ_DIGEST_LABEL, "")
    annotations = {k: v for k, v in labels.items() if k.startswith(LAZYFS_LABEL_PREFIX)}
    if not (image_ref and layer_digest and annotations):
        return None
    return LayerSource(image_ref=image_ref, layer_digest=layer_digest,
                       manifest_digest=labels.get(CRI_MANIFEST_DIGEST_LABEL, ""),
                       lazyfs_annotations=annotations)


def layer_id(source: LayerSource) -> str:
    """The name a layer is attached under: its digest, so snapshots of one layer share it."""
    return source.layer_digest.replace(":", "-")


class LayerFS(Protocol):
    def check(self, labels: Mapping[str, str]) -> bool:
        """Whether the layer these Prepare labels describe can be mounted lazily."""

    def mount(self, layer: str, labels: Mapping[str, str]) -> str:
        """Attach layer ``layer`` (idempotent) and return the directory holding its root."""

    def unmount(self, layer: str) -> None:
        """Detach ``layer``; no snapshot uses it any more."""

    def path(self, layer: str) -> str:
        """The directory of an attached layer (the lowerdir overlayfs stacks)."""

    def attached(self) -> set[str]:
        """Names of the layers attached now."""
