"""The filesystem model: attached layers as plain async Python, without pyfuse3.

A :class:`LayerFS` holds a set of attached layers. Each layer is an EROFS metadata image plus
a *device reader* that turns ranges of the image's extra device (device 1: the layer's chunk
device, or the blob of a plain ``mkfs.erofs --blobdev`` image) into bytes, normally through
the fetch scheduler. The mount root is a synthetic directory listing every attached layer
by name; below that each name is the layer's own root directory.

Inode numbers are derived, never stored: ``(slot << SLOT_SHIFT) | nid`` for a layer attached
in ``slot`` (slots count up and are never reused in one process, so an inode number the
kernel still caches can never point at a different layer's file), and 1 for the mount root.

A layer served in kernel mode (lazyfs.serve.kernel) is not a directory of the mount but its
*chunk device*: one read-only regular file, ``cell count x cell size`` bytes, whose bytes are
the decoded chunk grid (chunk *n* at ``n * chunk_size``, short chunks padded with zeros). Its
inode number uses the nid :data:`DEVICE_NID`, which no EROFS inode can have.

Everything here is testable without a kernel: the FUSE adapter (lazyfs.serve.fuse), the tests and
tools call the same methods.
"""

from __future__ import annotations

import errno
import itertools
import logging
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lazyfs.erofs import format as ef
from lazyfs.erofs.errors import ErofsError
from lazyfs.erofs.reader import Image

log = logging.getLogger(__name__)

ROOT_INODE = 1
SLOT_SHIFT = 44
NID_MASK = (1 << SLOT_SHIFT) - 1
IMAGE_DEVICE = 0
CHUNK_DEVICE = 1
DEVICE_NID = NID_MASK  # the chunk-device file of a layer in kernel mode (nids are far smaller)


class LayerFSError(Exception):
    """A request the filesystem model refuses; ``errno`` says how the kernel should see it."""

    errno = errno.EIO


class NoSuchEntry(LayerFSError):
    errno = errno.ENOENT


class NotADirectory(LayerFSError):
    errno = errno.ENOTDIR


class NotASymlink(LayerFSError):
    errno = errno.EINVAL


class NoSuchAttribute(LayerFSError):
    errno = errno.ENODATA


class StaleInode(LayerFSError):
    """The inode belongs to a layer that has been detached."""

    errno = errno.ESTALE


class LayerExists(LayerFSError):
    errno = errno.EEXIST


class DeviceReadError(LayerFSError):
    """Bytes of the chunk device could not be obtained (fetch failed after retries)."""

    errno = errno.EIO


class DeviceReader(Protocol):
    """Bytes of an image's extra device (the chunk device)."""

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; raise DeviceReadError when impossible."""
        ...


@dataclass(frozen=True)
class Attributes:
    """What stat(2) shows for an inode, independent of FUSE's types."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime_ns: int
    blocks: int  # 512-byte units, as the kernel EROFS driver reports them
    blksize: int


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    ino: int


@dataclass
class AttachedLayer:
    name: str
    slot: int
    image: Image
    device: DeviceReader
    info: dict = field(default_factory=dict)  # how it was attached, for `list`
    attached_at: float = field(default_factory=time.time)
    as_device: bool = False  # kernel mode: the mount shows the chunk-device file, not the tree
    cell_owners: dict[int, int] | None = None  # kernel mode, while tracing: device cell -> nid

    def ino(self, nid: int) -> int:
        return (self.slot << SLOT_SHIFT) | nid

    @property
    def entry_ino(self) -> int:
        """The inode of the layer's entry in the mount root."""
        return self.ino(DEVICE_NID if self.as_device else self.image.root_nid)


def _valid_layer_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name and len(name.encode()) <= 255


class LayerFS:
    """Attached layers and the read-only filesystem operations over them."""

    def __init__(self) -> None:
        self._by_slot: dict[int, AttachedLayer] = {}
        self._by_name: dict[str, AttachedLayer] = {}
        self._slots = itertools.count(1)
        self._root_mtime_ns = time.time_ns()

    # ------------------------------------------------------------------ layers

    def attach(self, name: str, image: Image, device: DeviceReader, info: dict | None = None,
               as_device: bool = False) -> AttachedLayer:
        if not _valid_layer_name(name):
            raise ValueError(f"invalid layer name {name!r}: must be one path component")
        if name in self._by_name:
            raise LayerExists(f"a layer named {name!r} is already attached")
        # Kernel mode needs a device that can show itself as a file: ``grid_size`` and
        # ``read_grid`` (lazyfs.serve.devices.ChunkGridDevice).
        if as_device and not hasattr(device, "read_grid"):
            raise ValueError(f"layer {name!r}: its device reader cannot be shown as a file")
        layer = AttachedLayer(name, next(self._slots), image, device, dict(info or {}), as_device=as_device)
        if as_device:
            cell_size = device.chunk_size  # type: ignore[attr-defined]
            device.mapped_lengths = lambda: mapped_lengths(image, cell_size)  # type: ignore[attr-defined]
        self._by_slot[layer.slot] = layer
        self._by_name[name] = layer
        self._root_mtime_ns = time.time_ns()
        log.info("attached layer %s in slot %d", name, layer.slot)
        return layer

    def detach(self, name: str) -> AttachedLayer:
        layer = self._by_name.pop(name, None)
        if layer is None:
            raise NoSuchEntry(f"no layer named {name!r} is attached")
        del self._by_slot[layer.slot]
        self._root_mtime_ns = time.time_ns()
        log.info("detached layer %s (slot %d)", name, layer.slot)
        return layer

    def layers(self) -> list[AttachedLayer]:
        return list(self._by_name.values())

    def layer(self, name: str) -> AttachedLayer:
        try:
            return self._by_name[name]
        except KeyError:
            raise NoSuchEntry(f"no layer named {name!r} is attached") from None

    def root_ino_of(self, name: str) -> int:
        return self.layer(name).entry_ino

    def show_tree(self, name: str) -> AttachedLayer:
        """Serve a layer attached as a device file as a directory tree instead (kernel mode
        fell back). It moves to a new slot, so that inode numbers the kernel cached for the
        device file answer ESTALE; the caller invalidates the root entry."""
        old = self.detach(name)
        return self.attach(name, old.image, old.device, old.info)

    def locate(self, ino: int) -> tuple[AttachedLayer, int] | None:
        """(layer, nid) of an inode; None for the root and for inodes of detached layers."""
        if ino == ROOT_INODE:
            return None
        layer = self._by_slot.get(ino >> SLOT_SHIFT)
        return (layer, ino & NID_MASK) if layer is not None else None

    def _resolve(self, ino: int) -> tuple[AttachedLayer, int]:
        layer = self._by_slot.get(ino >> SLOT_SHIFT)
        if layer is None:
            raise StaleInode(f"inode {ino:#x} belongs to no attached layer")
        return layer, ino & NID_MASK

    # ------------------------------------------------------------------ namespace

    def lookup(self, parent_ino: int, name: bytes) -> int:
        if parent_ino == ROOT_INODE:
            if name in (b".", b".."):
                return ROOT_INODE
            layer = self._by_name.get(name.decode("utf-8", "surrogateescape"))
            if layer is None:
                raise NoSuchEntry(name)
            return layer.entry_ino
        layer, nid = self._resolve(parent_ino)
        if nid == DEVICE_NID:
            raise NotADirectory(parent_ino)
        inode = layer.image.inode(nid)
        if not stat.S_ISDIR(inode.mode):
            raise NotADirectory(parent_ino)
        if name == b".." and nid == layer.image.root_nid:
            return ROOT_INODE
        if name == b".":
            return parent_ino
        child = layer.image.lookup(nid, name)
        if child is None:
            raise NoSuchEntry(name)
        return layer.ino(child)

    def getattr(self, ino: int) -> Attributes:
        if ino == ROOT_INODE:
            return Attributes(
                ino=ROOT_INODE, mode=stat.S_IFDIR | 0o755, nlink=2 + len(self._by_slot),
                uid=0, gid=0, size=0, rdev=0, mtime_ns=self._root_mtime_ns, blocks=0, blksize=4096,
            )
        layer, nid = self._resolve(ino)
        if nid == DEVICE_NID:
            size = layer.device.grid_size  # type: ignore[attr-defined]
            return Attributes(
                ino=ino, mode=stat.S_IFREG | 0o444, nlink=1, uid=0, gid=0, size=size, rdev=0,
                mtime_ns=int(layer.attached_at * 1e9), blocks=-(-size // 512), blksize=4096)
        inode = layer.image.inode(nid)
        block_size = layer.image.block_size
        return Attributes(
            ino=ino,
            mode=inode.mode,
            nlink=inode.nlink,
            uid=inode.uid,
            gid=inode.gid,
            size=inode.size,
            rdev=inode.rdev,
            mtime_ns=inode.mtime * 1_000_000_000 + inode.mtime_nsec,
            blocks=-(-inode.size // block_size) * (block_size // 512),
            blksize=block_size,
        )

    def listdir(self, ino: int) -> list[DirEntry]:
        """Entries of a directory without ``.`` and ``..``, in on-disk (name) order."""
        if ino == ROOT_INODE:
            return [DirEntry(l.name.encode("utf-8", "surrogateescape"), l.entry_ino) for l in self._by_name.values()]
        layer, nid = self._resolve(ino)
        if nid == DEVICE_NID or not stat.S_ISDIR(layer.image.inode(nid).mode):
            raise NotADirectory(ino)
        return [DirEntry(name, layer.ino(child)) for name, child in _named_children(layer.image, nid)]

    def readlink(self, ino: int) -> bytes:
        if ino == ROOT_INODE:
            raise NotASymlink(ino)
        layer, nid = self._resolve(ino)
        if nid == DEVICE_NID or not stat.S_ISLNK(layer.image.inode(nid).mode):
            raise NotASymlink(ino)
        return layer.image.readlink(nid)

    def listxattr(self, ino: int) -> list[bytes]:
        if ino == ROOT_INODE:
            return []
        layer, nid = self._resolve(ino)
        if nid == DEVICE_NID:
            return []
        return list(layer.image.listxattr(nid))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == ROOT_INODE:
            raise NoSuchAttribute(name)
        layer, nid = self._resolve(ino)
        if nid == DEVICE_NID:
            raise NoSuchAttribute(name)
        value = layer.image.getxattr(nid, name)
        if value is None:
            raise NoSuchAttribute(name)
        return value

    def statfs(self) -> dict[str, int]:
        blocks = files = 0
        for layer in self._by_slot.values():
            blocks += layer.image.blocks
            files += layer.image.inos
        return {"bsize": 4096, "blocks": blocks, "files": files, "namemax": ef.NAME_LEN_MAX}

    def device_cells(self, ino: int, offset: int, length: int) -> tuple[AttachedLayer, int, list[int]] | None:
        """(layer, nid, chunk-device cells) that bytes [offset, offset+length) of a file use."""
        if ino == ROOT_INODE or length <= 0:
            return None
        layer, nid = self._resolve(ino)
        if nid == DEVICE_NID:
            return None
        cell = getattr(layer.device, "chunk_size", None)
        if not cell:
            return None
        cells: list[int] = []
        for ext in layer.image.map(nid, offset, length):
            if ext.device_id == CHUNK_DEVICE and ext.length:
                cells.extend(range(ext.device_offset // cell, (ext.device_offset + ext.length - 1) // cell + 1))
        return layer, nid, cells

    def device_read_files(self, ino: int, offset: int, length: int) -> tuple[AttachedLayer, list[tuple[int, list[int]]]] | None:
        """For a read of a chunk-device file (kernel mode): (layer, [(nid, cells)...]), the
        files whose data the cells hold, in device order; None for other inodes or while the
        layer's cell owners are not known (see :func:`cell_owners`)."""
        if ino == ROOT_INODE or length <= 0:
            return None
        layer, nid = self._resolve(ino)
        owners = layer.cell_owners
        if nid != DEVICE_NID or owners is None:
            return None
        cell = layer.device.chunk_size  # type: ignore[attr-defined]
        files: list[tuple[int, list[int]]] = []
        for n in range(offset // cell, (offset + length - 1) // cell + 1):
            owner = owners.get(n)
            if owner is None:
                continue
            if files and files[-1][0] == owner:
                files[-1][1].append(n)
            else:
                files.append((owner, [n]))
        return layer, files

    # ------------------------------------------------------------------ data

    def device_window_end(self, ino: int, offset: int, size: int, window: int) -> int | None:
        """For a read of a chunk-device file: where the bytes that follow it, up to ``window``
        of them, stop without leaving the last cell the read touches (so that they cost no
        fetch and no decoding beyond the read's own); ``offset + size`` when there are none
        (the read ends on a cell boundary or at the end of the device). None for any other
        inode."""
        if ino == ROOT_INODE or size <= 0:
            return None
        layer, nid = self._resolve(ino)
        if nid != DEVICE_NID:
            return None
        cell = layer.device.chunk_size  # type: ignore[attr-defined]
        end = offset + size
        stop = min(end + max(window, 0), -(-end // cell) * cell, layer.device.grid_size)  # type: ignore[attr-defined]
        return max(stop, end)

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        if ino == ROOT_INODE:
            raise LayerFSError(f"inode {ino} is a directory")
        layer, nid = self._resolve(ino)
        if nid == DEVICE_NID:
            return await layer.device.read_grid(offset, size)  # type: ignore[attr-defined]
        inode = layer.image.inode(nid)
        if not stat.S_ISREG(inode.mode):
            raise LayerFSError(f"inode {ino:#x} is not a regular file")
        if offset >= inode.size or size <= 0:
            return b""
        size = min(size, inode.size - offset)
        parts: list[bytes] = []
        for group in _coalesce(layer.image.map(nid, offset, size)):
            parts.append(await _read_group(layer, nid, group))
        data = b"".join(parts)
        if len(data) != size:
            raise LayerFSError(f"inode {ino:#x}: mapped {len(data)} bytes for a read of {size} at {offset}")
        return data


def cell_owners(image: Image, cell_size: int) -> dict[int, int]:
    """Chunk-device cell -> nid of the (first) regular file whose data it holds: one walk of
    the metadata, so that reads of the chunk device (kernel mode) name files in traces."""
    owners: dict[int, int] = {}
    for _path, inode in image.walk():
        if not stat.S_ISREG(inode.mode) or not inode.size:
            continue
        for ext in image.map(inode.nid, 0, inode.size):
            if ext.device_id == CHUNK_DEVICE and ext.length:
                for n in range(ext.device_offset // cell_size, (ext.device_offset + ext.length - 1) // cell_size + 1):
                    owners.setdefault(n, inode.nid)
    return owners


def mapped_lengths(image: Image, cell_size: int) -> dict[int, int]:
    """Chunk-device cell -> bytes of file data mapped onto it (the most any file maps): what
    its chunk must hold for the kernel's reads of those files to be right. A walk that steps
    over what it cannot read (crafted metadata fails there on its own; the rest still counts)."""
    mapped: dict[int, int] = {}
    seen, directories = {image.root_nid}, [image.root_nid]
    while directories:
        try:
            entries = [(e.name, e.nid) for e in image.iterdir(directories.pop())]
        except ErofsError:
            continue
        for name, nid in entries:
            if name in (b".", b"..") or nid in seen:
                continue
            seen.add(nid)
            try:
                inode = image.inode(nid)
                if stat.S_ISDIR(inode.mode):
                    directories.append(nid)
                    continue
                if not stat.S_ISREG(inode.mode) or not inode.size:
                    continue
                extents = list(image.map(nid, 0, inode.size))
            except ErofsError:
                continue
            for ext in extents:
                if ext.device_id != CHUNK_DEVICE or not ext.length:
                    continue
                end = ext.device_offset + ext.length
                for n in range(ext.device_offset // cell_size, (end - 1) // cell_size + 1):
                    reach = min(end, (n + 1) * cell_size) - n * cell_size
                    if reach > mapped.get(n, 0):
                        mapped[n] = reach
    return mapped


def _named_children(image: Image, nid: int) -> Iterator[tuple[bytes, int]]:
    for entry in image.iterdir(nid):
        yield entry.name, entry.nid


@dataclass
class _Group:
    """Consecutive extents of one kind that can be served by one device call."""

    file_offset: int
    device_id: int | None
    device_offset: int
    length: int


def _coalesce(extents: Sequence) -> Iterator[_Group]:
    group: _Group | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if (
            group is not None
            and group.device_id == ext.device_id
            and (ext.device_id is None or group.device_offset + group.length == ext.device_offset)
        ):
            group.length += ext.length
            continue
        if group is not None:
            yield group
        group = _Group(ext.file_offset, ext.device_id, ext.device_offset, ext.length)
    if group is not None:
        yield group


async def _read_group(layer: AttachedLayer, nid: int, group: _Group) -> bytes:
    if group.device_id is None:
        return bytes(group.length)
    if group.device_id == IMAGE_DEVICE:
        # Bytes inside the metadata image itself (inline tails, flat data): no fetch needed.
        return layer.image.read(nid, group.file_offset, group.length)
    if group.device_id == CHUNK_DEVICE:
        data = await layer.device.read(group.device_offset, group.length)
        if len(data) != group.length:
            raise DeviceReadError(
                f"layer {layer.name}: device returned {len(data)} bytes for {group.length} at {group.device_offset}"
            )
        return data
    raise LayerFSError(f"layer {layer.name}: extent on unknown device {group.device_id}")
