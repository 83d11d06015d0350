"""The snapshotter proper: containerd's overlayfs snapshotter semantics plus lazy layers.

On disk, under the root: ``metadata.db`` (see :mod:`snapshotter.store`) and
``snapshots/<id>/fs`` (the upper directory, the whole tree of a committed ordinary layer) with
``snapshots/<id>/work`` (overlayfs workdir) for active snapshots. A lazy layer's committed
snapshot keeps an empty ``fs`` and is served from the layer filesystem's directory instead.

Remote snapshot protocol (containerd's unpacker): a Prepare carrying
``containerd.io/snapshot.ref`` = chain id whose labels describe a lazyfs layer is attached in
the layer filesystem and committed at once with the Prepare labels; the call then answers
AlreadyExists and containerd finds the committed snapshot by that label and parent, so it
neither downloads nor unpacks the layer. Anything else, or a failed attach, takes the ordinary
path (an active snapshot containerd unpacks into).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import AlreadyExists, LayerFSError
from .filters import matcher
from .layerfs import LAZY_LAYER_LABEL, TARGET_REF_LABEL, LayerFS, layer_id, layer_source
from .store import Kind, MetaStore, Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def disk_usage(root: Path) -> Usage:
    """Allocated bytes and distinct inodes under ``root`` (itself included), like fs.DiskUsage."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [str(root)]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512
        if os.path.isdir(path) and not os.path.islink(path):
            with os.scandir(path) as entries:
                stack.extend(e.path for e in entries)
    return Usage(size=size, inodes=len(seen))


class Snapshotter:
    def __init__(self, root: Path, layerfs: LayerFS | None = None):
        self.root = Path(root)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.store = MetaStore(self.root / "metadata.db")
        self.layerfs = layerfs

    def close(self) -> None:
        self.store.close()

    # -- paths -----------------------------------------------------------------------------

    def upper_path(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "fs"

    def work_path(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "work"

    # -- the Snapshots API -----------------------------------------------------------------

    def stat(self, key: str) -> Snapshot:
        with self.store.transaction() as tx:
            return tx.get(key)

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: list[str]) -> Snapshot:
        with self.store.transaction() as tx:
            return tx.update_labels(name, labels, fieldpaths)

    def usage(self, key: str) -> Usage:
        snap = self.stat(key)
        if snap.kind == Kind.ACTIVE:
            return disk_usage(self.upper_path(snap.id))
        return Usage(size=snap.size, inodes=snap.inodes)

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        log.debug("prepare %r on %r, labels %s", key, parent, sorted(labels))
        if labels.get(TARGET_REF_LABEL) and self.layerfs is not None:
            self._prepare_lazy(key, parent, labels)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def mounts(self, key: str) -> list[Mount]:
        with self.store.transaction() as tx:
            snap = tx.get_active_or_view(key)
            parents = [tx.get_by_id(pid) for pid in snap.parent_ids]
        return self._mounts(snap, parents)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        with self.store.transaction() as tx:
            snap = tx.get(key)
            # A non-active key has no upper directory to measure; tx.commit refuses it.
            usage = disk_usage(self.upper_path(snap.id)) if snap.kind == Kind.ACTIVE else Usage(0, 0)
            return tx.commit(key, name, usage.size, usage.inodes, labels)

    def remove(self, key: str) -> None:
        with self.store.transaction() as tx:
            snap = tx.remove(key)
            live_ids = tx.ids()
        # As containerd's overlayfs: the metadata is gone, so failures below only log.
        self._remove_directories(live_ids)
        if snap.lazy_layer is not None:
            self._detach_if_unused(snap.lazy_layer)

    def walk(self, filters: list[str] = ()) -> Iterator[Snapshot]:
        wanted = matcher(list(filters))
        with self.store.transaction() as tx:
            snaps = tx.walk()
        return (s for s in snaps if wanted(s))

    def cleanup(self) -> None:
        with self.store.transaction() as tx:
            live_ids = tx.ids()
        self._remove_directories(live_ids)

    # -- lazy layers -----------------------------------------------------------------------

    def reattach_lazy_layers(self) -> int:
        """Attach again every layer a committed lazy snapshot uses (after a restart of either
        process), and detach layers no snapshot uses (left by a Prepare interrupted between
        attach and commit); returns how many layers are in use."""
        if self.layerfs is None:
            return 0
        with self.store.transaction() as tx:
            lazy = tx.lazy_snapshots()
        in_use = {snap.lazy_layer for snap in lazy}
        try:
            for layer in self.layerfs.attached() - in_use:
                log.info("detaching layer %s: no snapshot uses it", layer)
                self.layerfs.unmount(layer)
        except LayerFSError as e:
            log.error("detaching unused layers failed: %s", e)
        attached = set()
        for snap in lazy:
            if snap.lazy_layer in attached:
                continue
            try:
                self.layerfs.mount(snap.lazy_layer, snap.labels)
                attached.add(snap.lazy_layer)
            except LayerFSError as e:
                log.error("re-attaching layer %s of snapshot %s failed: %s",
                          snap.lazy_layer, snap.name, e)
        return len(attached)

    def _prepare_lazy(self, key: str, parent: str, labels: Mapping[str, str]) -> None:
        """Raise AlreadyExists once the target is committed as a lazy snapshot; return to
        take the ordinary path."""
        target = labels[TARGET_REF_LABEL]
        with self.store.transaction() as tx:
            if tx.find_committed(TARGET_REF_LABEL, target, parent) is not None:
                raise AlreadyExists(f"target snapshot {target!r}")
            if tx.exists(key) or (parent and not (
                    tx.exists(parent) and tx.get(parent).kind == Kind.COMMITTED)):
                return  # not a valid Prepare: the ordinary path reports why
        source = layer_source(labels)
        if source is None:
            return
        try:
            if not self.layerfs.check(labels):
                log.warning("lazyfs daemon not ready; unpacking layer %s", source.layer_digest)
                return
            layer = layer_id(source)
            self.layerfs.mount(layer, labels)
        except LayerFSError as e:
            log.warning("lazy layer %s unavailable, falling back to unpacking: %s",
                        source.layer_digest, e)
            return
        committed_labels = {**labels, LAZY_LAYER_LABEL: layer}
        try:
            with self.store.transaction() as tx:
                snap = tx.create(Kind.ACTIVE, key, parent, labels)
                # Like stargz: commit under the target name; another namespace's snapshot of
                # the same chain on a different parent may hold it, so then make it unique.
                name = target if not tx.exists(target) else f"{target}@{snap.id}"
                self._make_directories(snap.id, Kind.COMMITTED)
                tx.commit(key, name, 0, 0, committed_labels)
                tx.set_lazy_layer(name, layer)
        except Exception:
            self._detach_if_unused(layer)
            raise
        log.info("layer %s of %s served lazily as snapshot %s",
                 source.layer_digest, source.image_ref, name)
        raise AlreadyExists(f"target snapshot {target!r}")

    # -- helpers ---------------------------------------------------------------------------

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        with self.store.transaction() as tx:
            snap = tx.create(kind, key, parent, labels)
            parents = [tx.get_by_id(pid) for pid in snap.parent_ids]
            self._make_directories(snap.id, kind)
        return self._mounts(snap, parents)

    def _make_directories(self, snapshot_id: int, kind: Kind) -> None:
        snap_dir = self.snapshots_dir / str(snapshot_id)
        # A rolled-back transaction gives its id out again; its directory may still be there.
        if snap_dir.exists():
            shutil.rmtree(snap_dir)
        self.upper_path(snapshot_id).mkdir(parents=True, mode=0o755)
        if kind == Kind.ACTIVE:
            self.work_path(snapshot_id).mkdir(mode=0o711)

    def _detach_if_unused(self, layer: str) -> None:
        if self.layerfs is None:
            return
        with self.store.transaction() as tx:
            if tx.lazy_layer_users(layer):
                return
        try:
            self.layerfs.unmount(layer)
        except LayerFSError as e:
            log.warning("detaching unused layer %s failed: %s", layer, e)

    def _lower_path(self, snap: Snapshot) -> str:
        if snap.lazy_layer is not None and self.layerfs is not None:
            return self.layerfs.path(snap.lazy_layer)
        return str(self.upper_path(snap.id))

    def _mounts(self, snap: Snapshot, parents: list[Snapshot]) -> list[Mount]:
        if not parents:
            mode = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(self.upper_path(snap.id)), (mode, "rbind"))]
        if snap.kind != Kind.ACTIVE and len(parents) == 1:
            return [Mount("bind", self._lower_path(parents[0]), ("ro", "rbind"))]
        options = []
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(snap.id)}", f"upperdir={self.upper_path(snap.id)}"]
        options.append("lowerdir=" + ":".join(self._lower_path(p) for p in parents))
        return [Mount("overlay", "overlay", tuple(options))]

    def _remove_directories(self, live_ids: set[int]) -> None:
        for entry in os.scandir(self.snapshots_dir):
            if entry.name.isdigit() and int(entry.name) in live_ids:
                continue
            try:
                shutil.rmtree(entry.path)
            except OSError as e:
                log.warning("removing %s failed: %s", entry.path, e)

