"""Build EROFS images: the metadata of a lazyfs layer, or a self-contained image.

The image is laid out in three regions, all addressed in blocks of ``block_size``:

* the metadata area from byte 0 (``meta_blkaddr`` = 0): the superblock at 1024, the device
  table right after it, then every inode in depth-first path order (root first, so its nid
  fits the superblock's 16-bit field; small records fill holes left by block alignment).
  Each inode is followed by its inline xattrs and either its tail-packed data (FLAT_INLINE)
  or its chunk indexes (CHUNK_BASED);
* the shared xattr area (``xattr_blkaddr``), present when some (name, value) pair is worth
  sharing between inodes;
* the data area: whole blocks of directories and of FLAT_PLAIN files.

Regular files given as ChunkedData point with 8-byte chunk indexes into extra device 1
(the layer's chunk device). Nothing depends on the order entries were added in, so equal
input gives equal bytes. docs/parts/erofs-writer.md describes the layout byte by byte.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from lazyfs.erofs import format as fmt

log = logging.getLogger(__name__)

_COPY_PIECE = 1 << 20
_U16 = 1 << 16
_U32 = 1 << 32
_TYPES = (
    fmt.S_IFREG, fmt.S_IFDIR, fmt.S_IFLNK, fmt.S_IFCHR, fmt.S_IFBLK, fmt.S_IFIFO, fmt.S_IFSOCK,
)
_DEVICE_SLOT_OFFSET = fmt.SUPER_OFFSET + fmt.SUPER_SIZE  # right after the superblock
_XATTR_SIZE_MAX = 0xFFFF  # e_value_size is 16 bits
_SYMLINK_MAX = 4095  # PATH_MAX less the terminating NUL
_HOLES_KEPT = 32  # metadata holes offered to later inodes (bounds the placement cost)

# Name prefixes by index, longest first, so "system.posix_acl_access" is matched whole.
_PREFIX_MATCH = sorted(
    ((prefix, index) for index, prefix in fmt.XATTR_PREFIXES.items()
     if index != fmt.XATTR_INDEX_LUSTRE),
    key=lambda item: -len(item[0]),
)
_WHOLE_NAME_INDEXES = (fmt.XATTR_INDEX_POSIX_ACL_ACCESS, fmt.XATTR_INDEX_POSIX_ACL_DEFAULT)


@dataclass(frozen=True)
class FileData:
    """Content of a regular file read from a host file when the image is written."""

    path: str


@dataclass
class ChunkedData:
    """A regular file whose content lives on the chunk device (extra device 1).

    ``chunks[i]`` is the chunk number holding bytes ``[i*chunk_size, (i+1)*chunk_size)`` of the
    file, i.e. device byte address ``chunk * chunk_size``; None is a hole.
    """

    size: int
    chunks: list[int | None]


@dataclass
class Entry:
    path: bytes  # b"" for the root, else b"a/b/c"
    mode: int  # st_mode including the S_IFMT type bits
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    rdev: tuple[int, int] | None = None  # (major, minor) of a character or block device
    link_target: bytes | None = None  # symlinks
    hardlink_to: bytes | None = None  # an earlier non-directory path; its inode is shared
    data: bytes | FileData | ChunkedData | None = None  # regular files


@dataclass
class BuildInfo:
    image_size: int
    blocks: int  # image_size // block_size
    inodes: int
    extra_devices: int  # 1 when the image has a chunk device (a device table), else 0
    device_blocks: int  # blocks of the chunk device in the device table (0 without one)
    root_nid: int
    build_time: int
    build_time_nsec: int
    meta_blkaddr: int
    xattr_blkaddr: int
    shared_xattrs: int
    extended_inodes: int
    nids: dict[bytes, int]  # every path (hard links included) -> nid


class ChunkStore(Protocol):
    """Where add_tree() puts the content of regular files above the inline threshold."""

    def add_file(self, host_path: str, size: int) -> ChunkedData: ...


@dataclass
class _Inode:
    entry: Entry
    size: int = 0
    nlink: int = 1
    # Filled in by the layout pass.
    nid: int = 0
    ino: int = 0
    compact: bool = True
    layout: int = fmt.LAYOUT_FLAT_PLAIN
    xattr_body: bytes = b""
    tail: bytes = b""  # inline data right after the xattrs
    data_blocks: int = 0  # FLAT_PLAIN / FLAT_INLINE whole blocks in the data area
    raw_blkaddr: int = fmt.NULL_ADDR
    dir_blocks: list[list[tuple[bytes, "_Inode"]]] | None = None


def _split_xattr_name(name: bytes) -> tuple[int, bytes]:
    for prefix, index in _PREFIX_MATCH:
        if index in _WHOLE_NAME_INDEXES:
            if name == prefix:
                return index, b""
        elif name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    raise ValueError(
        f"xattr name {name!r}: only user.*, trusted.*, security.* and the POSIX ACL names "
        "can be stored"
    )


def _xattr_entry(name: bytes, value: bytes) -> bytes:
    index, suffix = _split_xattr_name(name)
    raw = fmt.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + b"\0" * (-len(raw) % 4)


def _check_path(path: bytes) -> None:
    if not isinstance(path, bytes):
        raise ValueError(f"path {path!r} must be bytes")
    if path == b"":
        return
    if b"\0" in path:
        raise ValueError(f"bad path {path!r}: contains NUL")
    names = path.split(b"/")
    if b"" in names or b"." in names or b".." in names:
        raise ValueError(
            f"bad path {path!r}: '/'-separated without leading or trailing slash, "
            "no empty, '.' or '..' component"
        )
    if max(map(len, names)) > fmt.NAME_LEN_MAX:
        raise ValueError(f"bad path {path!r}: name longer than {fmt.NAME_LEN_MAX} bytes")


def _parent(path: bytes) -> bytes:
    cut = path.rfind(b"/")
    return b"" if cut < 0 else path[:cut]


def _basename(path: bytes) -> bytes:
    return path[path.rfind(b"/") + 1:]


class Builder:
    """Collects entries (parents first) and writes one EROFS image.

    ``build_time`` None picks the most common mtime of the inodes (ties: the earliest), so most
    inodes can use the 32-byte compact form, which has no timestamp of its own.
    """

    def __init__(
        self,
        *,
        block_size: int = 4096,
        chunk_size: int = 1 << 20,
        inline_threshold: int = 4096,
        plain_data: bool = False,
        build_time: int | None = None,
        build_time_nsec: int = 0,
        uuid: bytes = b"\0" * 16,
        volume_name: bytes = b"",
        device_blocks: int | None = None,
        device_tag: bytes = b"",
    ) -> None:
        if block_size & (block_size - 1) or not 512 <= block_size <= 65536:
            raise ValueError(f"block_size {block_size} must be a power of two in [512, 65536]")
        if chunk_size & (chunk_size - 1) or chunk_size < block_size:
            raise ValueError(f"chunk_size {chunk_size} must be a power of two >= block_size")
        chunkbits = chunk_size.bit_length() - block_size.bit_length()
        if chunkbits > fmt.CHUNK_FORMAT_BLKBITS_MASK:
            raise ValueError(f"chunk_size {chunk_size} too large for block_size {block_size}")
        if not 0 <= inline_threshold <= block_size:
            raise ValueError(f"inline_threshold {inline_threshold} must be in [0, block_size]")
        if len(uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        if len(volume_name) > 15 or b"\0" in volume_name:
            raise ValueError("volume_name: at most 15 bytes, no NUL (the kernel wants a NUL in 16)")
        if len(device_tag) > 63 or b"\0" in device_tag:
            raise ValueError("device_tag: at most 63 bytes, no NUL")
        if device_blocks is not None and not 0 <= device_blocks < _U32:
            raise ValueError(f"device_blocks {device_blocks} does not fit 32 bits")
        if build_time is not None and not 0 <= build_time < 1 << 64:
            raise ValueError(f"build_time {build_time} out of range")
        if not 0 <= build_time_nsec < 10**9:
            raise ValueError(f"build_time_nsec {build_time_nsec} out of range")
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.inline_threshold = inline_threshold
        self.plain_data = plain_data
        self.build_time = build_time
        self.build_time_nsec = build_time_nsec
        self.uuid = uuid
        self.volume_name = volume_name
        self.device_blocks = device_blocks
        self.device_tag = device_tag
        self._chunkbits = chunkbits
        self._inodes: dict[bytes, _Inode] = {}  # path -> inode (hard links share one)
        # directory path -> (name, inode) of each child
        self._children: dict[bytes, list[tuple[bytes, _Inode]]] = {}
        self._entries: list[Entry] = []

    # -- collecting entries --------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        path = entry.path
        _check_path(path)
        if path in self._inodes:
            raise ValueError(f"duplicate path {path!r}")
        if path == b"":
            if entry.hardlink_to is not None or stat.S_IFMT(entry.mode) != fmt.S_IFDIR:
                raise ValueError("the root entry b'' must be a directory")
        else:
            parent = _parent(path)
            if parent not in self._children:
                what = "is not a directory" if parent in self._inodes else "was not added yet"
                raise ValueError(f"parent {parent!r} of {path!r} {what}")
        if entry.hardlink_to is not None:
            target = self._inodes.get(entry.hardlink_to)
            if target is None:
                raise ValueError(f"hard link {path!r}: target {entry.hardlink_to!r} not added yet")
            if stat.S_IFMT(target.entry.mode) == fmt.S_IFDIR:
                raise ValueError(f"hard link {path!r}: target {entry.hardlink_to!r} is a directory")
            target.nlink += 1
            inode = target
        else:
            inode = _Inode(entry=entry, size=self._check_entry(entry))
        self._inodes[path] = inode
        self._entries.append(entry)
        if path != b"":
            self._children[_parent(path)].append((_basename(path), inode))
        if inode.entry is entry and stat.S_IFMT(entry.mode) == fmt.S_IFDIR:
            self._children[path] = []

    def entries(self) -> list[Entry]:
        """The entries added so far, in the order they were added."""
        return list(self._entries)

    def _check_entry(self, entry: Entry) -> int:
        """Validate one entry; returns its i_size except for directories (computed later)."""
        where = f"entry {entry.path!r}"
        kind = stat.S_IFMT(entry.mode)
        if kind not in _TYPES or entry.mode & ~(fmt.S_IFMT | 0o7777):
            raise ValueError(f"{where}: bad mode {entry.mode:o}")
        for value, limit, name in (
            (entry.uid, _U32, "uid"), (entry.gid, _U32, "gid"), (entry.mtime, 1 << 64, "mtime"),
            (entry.mtime_nsec, 10**9, "mtime_nsec"),
        ):
            if type(value) is not int or not 0 <= value < limit:
                raise ValueError(f"{where}: {name} {value!r} out of range")
        for name, value in entry.xattrs.items():
            if len(_split_xattr_name(name)[1]) > 255:
                raise ValueError(f"{where}: xattr name {name!r} too long")
            if len(value) > _XATTR_SIZE_MAX:
                raise ValueError(f"{where}: xattr {name!r} value longer than {_XATTR_SIZE_MAX}")
        if entry.data is not None and kind != fmt.S_IFREG:
            raise ValueError(f"{where}: only regular files carry data")
        if (entry.link_target is not None) != (kind == fmt.S_IFLNK):
            raise ValueError(f"{where}: a symlink needs link_target, other types must not have one")
        if entry.rdev is not None:
            if kind not in (fmt.S_IFCHR, fmt.S_IFBLK):
                raise ValueError(f"{where}: only character and block devices have rdev")
            major, minor = entry.rdev
            if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
                raise ValueError(f"{where}: rdev {entry.rdev} does not fit 12:20 bits")
        if kind == fmt.S_IFLNK:
            if not 0 < len(entry.link_target) <= _SYMLINK_MAX or b"\0" in entry.link_target:
                raise ValueError(f"{where}: symlink target must be 1..{_SYMLINK_MAX} bytes, no NUL")
            return len(entry.link_target)
        if kind != fmt.S_IFREG:
            return 0
        data = entry.data
        if data is None:
            return 0
        if isinstance(data, ChunkedData):
            return self._check_chunks(where, data)
        if isinstance(data, FileData):
            try:
                st = os.stat(data.path)
            except OSError as e:
                raise ValueError(f"{where}: cannot read {data.path}: {e.strerror}") from e
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{where}: {data.path} is not a regular file")
            size = st.st_size
        elif isinstance(data, (bytes, bytearray, memoryview)):
            size = len(data)
        else:
            raise ValueError(f"{where}: data must be bytes, FileData or ChunkedData")
        if size > self.inline_threshold and not self.plain_data:
            raise ValueError(
                f"{where}: {size} bytes exceed the inline threshold {self.inline_threshold}; "
                "give ChunkedData or build with plain_data=True"
            )
        return size

    def _check_chunks(self, where: str, data: ChunkedData) -> int:
        if not 0 <= data.size < 1 << 63:
            raise ValueError(f"{where}: size {data.size} out of range")
        expected = -(-data.size // self.chunk_size)
        if len(data.chunks) != expected:
            raise ValueError(
                f"{where}: {len(data.chunks)} chunks given, size {data.size} needs {expected}"
            )
        blocks_per_chunk = self.chunk_size // self.block_size
        for chunk in data.chunks:
            if chunk is None:
                continue
            if not isinstance(chunk, int) or chunk < 0:
                raise ValueError(f"{where}: bad chunk number {chunk!r}")
            if (chunk + 1) * blocks_per_chunk > fmt.NULL_ADDR:
                raise ValueError(f"{where}: chunk {chunk} lies beyond the 32-bit block address space")
        return data.size

    def add_tree(self, root_dir: str, *, chunk_store: ChunkStore | None = None) -> None:
        """Add a host directory tree (lstat semantics) as the whole image.

        Regular files above the inline threshold go to ``chunk_store`` when one is given,
        else they are read into the image (which then needs plain_data=True).
        """
        if self._inodes:
            raise ValueError("add_tree() builds the whole image: the builder must be empty")
        seen: dict[tuple[int, int], bytes] = {}
        root = os.fsencode(root_dir)
        stack = [b""]
        while stack:
            rel = stack.pop()
            host = os.path.join(root, rel) if rel else root
            st = os.lstat(host)
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in seen:
                self.add(Entry(path=rel, mode=st.st_mode, hardlink_to=seen[key]))
                continue
            seen[key] = rel
            entry = Entry(
                path=rel, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                mtime=st.st_mtime_ns // 10**9, mtime_nsec=st.st_mtime_ns % 10**9,
                xattrs=_host_xattrs(host),
            )
            if stat.S_ISDIR(st.st_mode):
                names = sorted(os.listdir(host), reverse=True)
                stack.extend(os.path.join(rel, n) if rel else n for n in names)
            elif stat.S_ISLNK(st.st_mode):
                entry.link_target = os.readlink(host)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISREG(st.st_mode) and st.st_size:
                if st.st_size > self.inline_threshold and chunk_store is not None:
                    entry.data = chunk_store.add_file(os.fsdecode(host), st.st_size)
                else:
                    entry.data = FileData(os.fsdecode(host))
            self.add(entry)

    # -- writing ---------------------------------------------------------------------------

    def write(self, out: BinaryIO) -> BuildInfo:
        if b"" not in self._inodes:
            raise ValueError("no root entry (path b'') was added")
        order = self._inode_order()
        build_time, build_nsec = self._pick_build_time(order)
        chunked = [i for i in order if isinstance(i.entry.data, ChunkedData) and i.size]
        with_devices = bool(chunked) or self.device_blocks is not None
        shared_ids, shared_area = self._shared_xattrs(order)
        for ino, inode in enumerate(order, 1):
            inode.ino = ino
            self._prepare_inode(inode, build_time, build_nsec, shared_ids)
        meta_start = _DEVICE_SLOT_OFFSET + (fmt.DEVICE_SLOT_SIZE if with_devices else 0)
        meta_end = self._place_inodes(order, meta_start)
        bs = self.block_size
        xattr_blkaddr = -(-meta_end // bs)
        data_blkaddr = xattr_blkaddr + -(-len(shared_area) // bs)
        next_blk = data_blkaddr
        for inode in order:
            if inode.data_blocks:
                inode.raw_blkaddr = next_blk
                next_blk += inode.data_blocks
        if next_blk >= _U32:
            raise ValueError("image larger than 2**32 blocks")

        meta = bytearray(xattr_blkaddr * bs)
        for inode in order:
            self._encode_inode(meta, inode)
        device_blocks = self._device_blocks(chunked) if with_devices else 0
        if with_devices:
            meta[_DEVICE_SLOT_OFFSET:meta_start] = fmt.DEVICE_SLOT.pack(
                self.device_tag, device_blocks, 0, b""
            )
        incompat = 0
        if with_devices:
            incompat |= fmt.FEATURE_INCOMPAT_DEVICE_TABLE
        if chunked:
            incompat |= fmt.FEATURE_INCOMPAT_CHUNKED_FILE
        root = self._inodes[b""]
        meta[fmt.SUPER_OFFSET:fmt.SUPER_OFFSET + fmt.SUPER_SIZE] = fmt.SUPER.pack(
            fmt.MAGIC, 0, fmt.FEATURE_COMPAT_SB_CHKSUM, bs.bit_length() - 1, 0, root.nid,
            len(order), build_time, build_nsec, next_blk, 0,
            xattr_blkaddr if shared_area else 0, self.uuid, self.volume_name, incompat, 0,
            1 if with_devices else 0,
            _DEVICE_SLOT_OFFSET // fmt.DEVICE_SLOT_SIZE if with_devices else 0,
            0, 0, 0, 0, 0, b"",
        )
        crc = fmt.crc32c_superblock(meta, bs)
        meta[fmt.SUPER_OFFSET + 4:fmt.SUPER_OFFSET + 8] = crc.to_bytes(4, "little")

        out.write(meta)
        if shared_area:
            out.write(shared_area + bytes(-len(shared_area) % bs))
        for inode in order:
            if inode.data_blocks:
                self._write_data(out, inode)
        extended = sum(1 for i in order if not i.compact)
        log.info(
            "erofs image: %d inodes (%d extended), %d blocks, %d shared xattrs",
            len(order), extended, next_blk, len(shared_ids),
        )
        return BuildInfo(
            image_size=next_blk * bs, blocks=next_blk, inodes=len(order),
            extra_devices=1 if with_devices else 0, device_blocks=device_blocks,
            root_nid=root.nid, build_time=build_time,
            build_time_nsec=build_nsec, meta_blkaddr=0,
            xattr_blkaddr=xattr_blkaddr if shared_area else 0, shared_xattrs=len(shared_ids),
            extended_inodes=extended, nids={p: i.nid for p, i in self._inodes.items()},
        )

    def _inode_order(self) -> list[_Inode]:
        """Inodes in depth-first order of sorted names; a hard-linked inode at its first path."""
        order: list[_Inode] = []
        placed: set[int] = set()
        children = self._children
        stack = [(b"", self._inodes[b""])]
        while stack:
            path, inode = stack.pop()
            if id(inode) not in placed:
                placed.add(id(inode))
                order.append(inode)
            names = children.get(path) if inode.entry.path == path else None
            if names:
                names.sort(key=_first)
                prefix = path + b"/" if path else b""
                stack.extend((prefix + n, child) for n, child in reversed(names))
        return order

    def _pick_build_time(self, order: list[_Inode]) -> tuple[int, int]:
        if self.build_time is not None:
            return self.build_time, self.build_time_nsec
        counts = Counter((i.entry.mtime, i.entry.mtime_nsec) for i in order)
        best = max(counts.values())
        return min(t for t, n in counts.items() if n == best)

    def _shared_xattrs(self, order: list[_Inode]) -> tuple[dict[tuple[bytes, bytes], int], bytes]:
        """Pick the (name, value) pairs that take less room shared than repeated inline."""
        uses = Counter(pair for i in order for pair in i.entry.xattrs.items())
        area = bytearray()
        ids: dict[tuple[bytes, bytes], int] = {}
        bs = self.block_size
        for pair in sorted(p for p, n in uses.items() if n > 1):
            raw = _xattr_entry(*pair)
            count = uses[pair]
            if (count - 1) * len(raw) <= 4 * count:
                continue
            # Keep each entry inside one block when it can be.
            if len(raw) <= bs and len(area) % bs + len(raw) > bs:
                area += bytes(-len(area) % bs)
            ids[pair] = len(area) // 4
            area += raw
        return ids, bytes(area)

    def _prepare_inode(
        self, inode: _Inode, build_time: int, build_nsec: int,
        shared_ids: dict[tuple[bytes, bytes], int],
    ) -> None:
        entry = inode.entry
        kind = stat.S_IFMT(entry.mode)
        inode.layout, inode.tail, inode.data_blocks = fmt.LAYOUT_FLAT_PLAIN, b"", 0
        inode.xattr_body = b""
        if kind == fmt.S_IFDIR:
            self._split_dir(inode)
        xattrs = sorted(entry.xattrs.items())
        # h_shared_count is one byte: pairs beyond 255 shared ones stay inline.
        by_id = sorted((shared_ids[p], p) for p in xattrs if p in shared_ids)[:255]
        shared = [xid for xid, _ in by_id]
        referenced = {p for _, p in by_id}
        inline = b"".join(_xattr_entry(*p) for p in xattrs if p not in referenced)
        if shared or inline:
            inode.xattr_body = (
                fmt.XATTR_IBODY_HEADER.pack(0, len(shared), b"")
                + b"".join(i.to_bytes(4, "little") for i in shared) + inline
            )
            if (len(inode.xattr_body) - fmt.XATTR_IBODY_HEADER.size) // 4 + 1 >= _U16:
                raise ValueError(f"entry {entry.path!r}: xattrs too large for one inode")
        inode.compact = (
            entry.uid < _U16 and entry.gid < _U16 and inode.size < _U32 and inode.nlink < _U16
            and entry.mtime == build_time and entry.mtime_nsec == build_nsec
        )
        data = entry.data
        if kind == fmt.S_IFDIR:
            self._choose_dir_layout(inode)
        elif kind == fmt.S_IFREG and isinstance(data, ChunkedData) and inode.size:
            inode.layout = fmt.LAYOUT_CHUNK_BASED
        elif kind == fmt.S_IFLNK:
            self._choose_flat(inode, inode.entry.link_target)
        elif kind == fmt.S_IFREG and inode.size:
            small = inode.size <= self.inline_threshold
            self._choose_flat(inode, _read_small(data, inode.size) if small else None)

    def _split_dir(self, inode: _Inode) -> None:
        """Split the sorted dirents into blocks; the size of the last one is exact."""
        path = inode.entry.path
        children = self._children[path]
        subdirs = sum(1 for _, child in children if child.entry.mode & fmt.S_IFMT == fmt.S_IFDIR)
        names = [(b".", inode), (b"..", self._inodes[_parent(path)]), *children]
        names.sort(key=_first)
        bs = self.block_size
        blocks: list[list[tuple[bytes, _Inode]]] = [[]]
        used = 0
        dirent_size = fmt.DIRENT.size
        for name, child in names:
            need = dirent_size + len(name)
            if used + need > bs:
                blocks.append([])
                used = 0
            blocks[-1].append((name, child))
            used += need
        inode.dir_blocks = blocks
        inode.size = (len(blocks) - 1) * bs + used
        inode.nlink = 2 + subdirs

    def _choose_dir_layout(self, inode: _Inode) -> None:
        """The last dirent block goes inline when it fits next to the inode."""
        blocks = inode.dir_blocks
        tail = inode.size % self.block_size
        if tail and self._inline_fits(inode, tail):
            inode.layout = fmt.LAYOUT_FLAT_INLINE
            inode.data_blocks = len(blocks) - 1
            inode.tail = bytes(tail)  # a placeholder: dirents need the nids placed later
        else:
            inode.layout = fmt.LAYOUT_FLAT_PLAIN
            inode.data_blocks = len(blocks)

    def _inline_fits(self, inode: _Inode, tail_len: int) -> bool:
        return self._header_size(inode) + tail_len <= self.block_size

    def _header_size(self, inode: _Inode) -> int:
        isize = fmt.INODE_COMPACT.size if inode.compact else fmt.INODE_EXTENDED.size
        return isize + len(inode.xattr_body)

    def _choose_flat(self, inode: _Inode, small_content: bytes | None) -> None:
        """FLAT_INLINE when the whole content fits the inode's block, else FLAT_PLAIN."""
        if small_content is not None and self._inline_fits(inode, len(small_content)):
            inode.layout = fmt.LAYOUT_FLAT_INLINE
            inode.tail = small_content
        else:
            inode.layout = fmt.LAYOUT_FLAT_PLAIN
            inode.data_blocks = -(-inode.size // self.block_size)

    def _place_inodes(self, order: list[_Inode], start: int) -> int:
        """Assign nids (meta_blkaddr 0, so nid = byte offset / 32); returns the area's end.

        Records go one after the other in inode order. A record whose inode, xattrs and inline
        data fit in one block never straddles a block boundary (the kernel reads the inline
        tail from the inode's block): it moves to the next block instead, and the hole it
        leaves is offered to later records that fit in it whole (first fit over the most
        recent holes), so that tail-packing does not waste a fifth of the metadata.
        """
        bs = self.block_size
        slot = fmt.INODE_SLOT_SIZE
        pos = _align(start, slot)
        holes: list[list[int]] = []  # [start, end) inside one block each
        for inode in order:
            within_block = self._header_size(inode) + len(inode.tail)
            size = within_block
            if inode.layout == fmt.LAYOUT_CHUNK_BASED:
                size = _align(size, fmt.CHUNK_INDEX.size)
                size += fmt.CHUNK_INDEX.size * len(inode.entry.data.chunks)
            size = _align(size, slot)
            place = -1
            if size <= bs:
                for hole in holes:
                    if hole[1] - hole[0] >= size:
                        place = hole[0]
                        hole[0] += size
                        if hole[1] - hole[0] < slot:
                            holes.remove(hole)
                        break
            if place < 0:
                if within_block <= bs and pos % bs + within_block > bs:
                    block_end = pos + (-pos % bs)
                    holes.append([pos, block_end])
                    del holes[:-_HOLES_KEPT]
                    pos = block_end
                place = pos
                pos += size
            inode.nid = place // slot
        return pos

    def _encode_inode(self, meta: bytearray, inode: _Inode) -> None:
        entry = inode.entry
        kind = stat.S_IFMT(entry.mode)
        if kind in (fmt.S_IFCHR, fmt.S_IFBLK):
            i_u = fmt.new_encode_dev(*(entry.rdev or (0, 0)))
        elif kind in (fmt.S_IFIFO, fmt.S_IFSOCK):
            i_u = 0
        elif inode.layout == fmt.LAYOUT_CHUNK_BASED:
            i_u = fmt.CHUNK_FORMAT_INDEXES | self._chunkbits
        else:
            i_u = inode.raw_blkaddr
        icount = 0
        if inode.xattr_body:
            icount = (len(inode.xattr_body) - fmt.XATTR_IBODY_HEADER.size) // 4 + 1
        i_format = (inode.layout << fmt.I_DATALAYOUT_BIT) | (
            fmt.INODE_LAYOUT_COMPACT if inode.compact else fmt.INODE_LAYOUT_EXTENDED
        )
        if inode.compact:
            head = fmt.INODE_COMPACT.pack(
                i_format, icount, entry.mode, inode.nlink, inode.size, 0, i_u, inode.ino,
                entry.uid, entry.gid, 0,
            )
        else:
            head = fmt.INODE_EXTENDED.pack(
                i_format, icount, entry.mode, 0, inode.size, i_u, inode.ino, entry.uid,
                entry.gid, entry.mtime, entry.mtime_nsec, inode.nlink, b"",
            )
        tail = inode.tail
        if inode.dir_blocks is not None and inode.layout == fmt.LAYOUT_FLAT_INLINE:
            tail = _dirent_block(inode.dir_blocks[-1])
        pos = inode.nid * fmt.INODE_SLOT_SIZE
        body = head + inode.xattr_body + tail
        meta[pos:pos + len(body)] = body
        if inode.layout == fmt.LAYOUT_CHUNK_BASED:
            pos = _align(pos + len(body), fmt.CHUNK_INDEX.size)
            index = self._chunk_indexes(entry.data)
            meta[pos:pos + len(index)] = index

    def _chunk_indexes(self, data: ChunkedData) -> bytes:
        blocks_per_chunk = self.chunk_size // self.block_size
        pack = fmt.CHUNK_INDEX.pack
        hole = pack(0, 0, fmt.NULL_ADDR)
        return b"".join(
            hole if c is None else pack(0, 1, c * blocks_per_chunk) for c in data.chunks
        )

    def _device_blocks(self, chunked: list[_Inode]) -> int:
        if self.device_blocks is not None:
            return self.device_blocks
        used = [c for i in chunked for c in i.entry.data.chunks if c is not None]
        return (max(used) + 1) * (self.chunk_size // self.block_size) if used else 0

    def _write_data(self, out: BinaryIO, inode: _Inode) -> None:
        """The inode's whole blocks in the data area, the last one zero-padded."""
        bs = self.block_size
        if inode.dir_blocks is not None:
            for block in inode.dir_blocks[: inode.data_blocks]:
                raw = _dirent_block(block)
                out.write(raw + bytes(bs - len(raw)))
            return
        entry = inode.entry
        data = entry.link_target if entry.link_target is not None else entry.data
        if isinstance(data, FileData):
            written = _copy_file(out, data.path, inode.size, entry.path)
        else:
            out.write(data)
            written = len(data)
        out.write(bytes(-written % bs))


def _first(item: tuple[bytes, _Inode]) -> bytes:
    return item[0]


def _align(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _dirent_block(block: list[tuple[bytes, _Inode]]) -> bytes:
    nameoff = fmt.DIRENT.size * len(block)
    dirents = []
    for name, child in block:
        ftype = fmt.FT_FROM_MODE[stat.S_IFMT(child.entry.mode)]
        dirents.append(fmt.DIRENT.pack(child.nid, nameoff, ftype, 0))
        nameoff += len(name)
    return b"".join(dirents) + b"".join(name for name, _ in block)


def _read_small(data: bytes | FileData, size: int) -> bytes:
    if isinstance(data, FileData):
        with open(data.path, "rb") as f:
            content = f.read(size + 1)
        if len(content) != size:
            raise ValueError(f"{data.path} changed size while the image was built")
        return content
    return bytes(data)


def _copy_file(out: BinaryIO, path: str, size: int, entry_path: bytes) -> int:
    copied = 0
    with open(path, "rb") as f:
        while copied < size:
            piece = f.read(min(_COPY_PIECE, size - copied))
            if not piece:
                break
            out.write(piece)
            copied += len(piece)
    if copied != size or os.stat(path).st_size != size:
        raise ValueError(f"entry {entry_path!r}: {path} changed size while the image was built")
    return copied


def _host_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):  # the host filesystem has none
            return {}
        raise
    return {
        os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)
    }
