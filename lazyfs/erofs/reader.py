"""A lazy EROFS reader over a bytes-like object or an mmap of a metadata image.

Nothing is parsed at open beyond the superblock, the device table and the root inode; every
other structure is decoded when asked for, with each offset and length checked against the
image length before it is read. Bad input raises CorruptImage (or UnsupportedImage for valid
but unhandled features) naming the nid and byte offset; nothing else escapes for bad bytes.

Semantics follow the Linux kernel's fs/erofs (super.c, inode.c, data.c, dir.c, namei.c,
xattr.c): compact inodes take their mtime from the superblock build time, flat inline tails
must not cross a block boundary, chunk maps sit after the inode and its inline xattrs aligned
to their entry size, chunk-index device ids are masked with the mask derived from
extra_devices, and block addresses of device 0 go through the flat address space that the
devices' mapped_blkaddr ranges define.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import operator
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from . import format as F
from .errors import CorruptImage, ErofsError, UnsupportedImage

# Upper bound for one read() call: larger requests return a short read.
READ_MAX = 64 << 20
# Longest symlink target the kernel serves (PAGE_SIZE - 1 on 4 KiB pages).
SYMLINK_MAX = 4095
INODE_CACHE_SIZE = 8192
MAX_FILE_SIZE = (1 << 63) - 1

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_DIRENT_SIZE = F.DIRENT.size
_KNOWN_FILE_TYPES = range(F.FT_UNKNOWN, F.FT_SYMLINK + 1)
_COMPRESSED = (F.LAYOUT_COMPRESSED_FULL, F.LAYOUT_COMPRESSED_COMPACT)
_VALID_TYPES = frozenset(F.FT_FROM_MODE)
_DEVICE_TYPES = (F.S_IFCHR, F.S_IFBLK)


class NotFound(ErofsError):
    """A path component does not exist (or a non-directory was used as a directory)."""


class Device(NamedTuple):
    """One extra device from the device table. index is the 1-based device id."""

    index: int
    tag: bytes
    blocks: int
    mapped_blkaddr: int


class DirEntry(NamedTuple):
    name: bytes
    nid: int
    file_type: int


class Extent(NamedTuple):
    """A piece of a file: device_id None is a hole, 0 is the image itself, n >= 1 a device."""

    file_offset: int
    length: int
    device_id: int | None
    device_offset: int


class Inode:
    """A decoded on-disk inode. rdev is the raw new_encode_dev() value for device files."""

    __slots__ = (
        "nid", "offset", "compact", "layout", "xattr_icount", "mode", "nlink", "size",
        "raw_u", "ino", "uid", "gid", "mtime", "mtime_nsec", "inode_size", "xattr_size",
        "chunk_bits",
    )

    def __init__(self, nid: int, offset: int, compact: bool, layout: int, xattr_icount: int,
                 mode: int, nlink: int, size: int, raw_u: int, ino: int, uid: int, gid: int,
                 mtime: int, mtime_nsec: int) -> None:
        self.nid = nid
        self.offset = offset  # byte offset of the on-disk inode in the image
        self.compact = compact
        self.layout = layout
        self.xattr_icount = xattr_icount
        self.mode = mode
        self.nlink = nlink
        self.size = size
        self.raw_u = raw_u  # the i_u union: raw_blkaddr, rdev or chunk format
        self.ino = ino
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.mtime_nsec = mtime_nsec
        self.inode_size = 32 if compact else 64
        self.xattr_size = 12 + 4 * (xattr_icount - 1) if xattr_icount else 0  # xattr_ibody_size()
        self.chunk_bits = 0  # log2 of the chunk size, for CHUNK_BASED inodes

    def __repr__(self) -> str:
        return (f"Inode(nid={self.nid}, mode={self.mode:o}, size={self.size}, "
                f"layout={F.LAYOUT_NAMES.get(self.layout, self.layout)})")

    @property
    def file_type(self) -> int:
        return F.FT_FROM_MODE[self.mode & F.S_IFMT]

    @property
    def is_dir(self) -> bool:
        return self.mode & F.S_IFMT == F.S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.mode & F.S_IFMT == F.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & F.S_IFMT == F.S_IFLNK

    @property
    def is_chr(self) -> bool:
        return self.mode & F.S_IFMT == F.S_IFCHR

    @property
    def is_blk(self) -> bool:
        return self.mode & F.S_IFMT == F.S_IFBLK

    @property
    def is_fifo(self) -> bool:
        return self.mode & F.S_IFMT == F.S_IFIFO

    @property
    def is_sock(self) -> bool:
        return self.mode & F.S_IFMT == F.S_IFSOCK

    @property
    def rdev(self) -> int:
        return self.raw_u if self.mode & F.S_IFMT in _DEVICE_TYPES else 0

    @property
    def major(self) -> int:
        return F.new_decode_dev(self.rdev)[0]

    @property
    def minor(self) -> int:
        return F.new_decode_dev(self.rdev)[1]

    @property
    def raw_blkaddr(self) -> int:
        return self.raw_u

    @property
    def is_compressed(self) -> bool:
        return self.layout in _COMPRESSED

    @property
    def chunk_format(self) -> int:
        return self.raw_u & 0xFFFF if self.layout == F.LAYOUT_CHUNK_BASED else 0

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_bits if self.chunk_bits else 0

    @property
    def data_offset(self) -> int:
        """Byte offset just past the inode and its inline xattrs (inline data, chunk maps)."""
        return self.offset + self.inode_size + self.xattr_size


class Image:
    """An EROFS image in memory. Decodes on demand; see the module docstring for the contract."""

    def __init__(self, buf) -> None:
        mv = memoryview(buf)
        if mv.ndim != 1 or mv.itemsize != 1:
            flat = mv.cast("B")
            mv.release()
            mv = flat
        self._mv = mv
        self._len = len(mv)
        self._mmap: mmap.mmap | None = None
        self._prefixes: list[tuple[bytes, bytes]] | None = None
        self._inode_cached = functools.lru_cache(maxsize=INODE_CACHE_SIZE)(self._load_inode)
        try:
            self._parse_superblock()
            root = self.inode(self.root_nid)
            if not root.is_dir:
                raise CorruptImage(f"root nid {self.root_nid} is not a directory (mode {root.mode:o})")
        except BaseException:
            self._inode_cached.cache_clear()
            mv.release()  # so that Image.open() can close its mmap
            raise

    @classmethod
    def open(cls, path: str | os.PathLike) -> Image:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CorruptImage(f"{os.fspath(path)!r}: empty file, no EROFS superblock")
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            img = cls(m)
        except BaseException:
            try:
                m.close()
            except BufferError:
                pass  # a view held by the traceback still exports the map; it closes when freed
            raise
        img._mmap = m
        return img

    @property
    def buffer(self) -> object | None:
        """The object the image reads from (bytes, mmap, ...), or None once closed."""
        try:
            return self._mv.obj
        except ValueError:  # released by close()
            return None

    def close(self) -> None:
        self._inode_cached.cache_clear()
        self._mv.release()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- superblock -------------------------------------------------------------------------

    def _parse_superblock(self) -> None:
        if self._len < F.SUPER_OFFSET + F.SUPER_SIZE:
            raise CorruptImage(f"image of {self._len} bytes is too short for a superblock")
        (magic, checksum, self.feature_compat, blkszbits, sb_extslots, self.root_nid, self.inos,
         self.build_time, self.build_time_nsec, self.blocks, self.meta_blkaddr,
         self.xattr_blkaddr, self.uuid, self.volume_name, self.feature_incompat, _u1,
         extra_devices, devt_slotoff, dirblkbits, self.xattr_prefix_count,
         self.xattr_prefix_start, self.packed_nid, _filter, _reserved
         ) = F.SUPER.unpack_from(self._mv, F.SUPER_OFFSET)
        if magic != F.MAGIC:
            raise CorruptImage(f"bad magic {magic:#010x} at offset {F.SUPER_OFFSET}")
        if not 9 <= blkszbits <= 16:
            raise CorruptImage(f"block size bits {blkszbits} outside 9..16 in the superblock")
        self.blkszbits = blkszbits
        self.block_size = bs = 1 << blkszbits
        if dirblkbits:
            raise UnsupportedImage(f"dirblkbits {dirblkbits} is not supported (the kernel refuses it too)")
        if self.feature_compat & F.FEATURE_COMPAT_SB_CHKSUM:
            length = bs - F.SUPER_OFFSET if bs > F.SUPER_OFFSET else bs
            if F.SUPER_OFFSET + length > self._len:
                raise CorruptImage(f"image of {self._len} bytes is too short for the checksummed superblock area")
            crc = F.crc32c_superblock(self._mv, bs)
            if crc != checksum:
                raise CorruptImage(f"superblock checksum {checksum:#010x} != computed {crc:#010x}")
        unknown = self.feature_incompat & ~F.SUPPORTED_INCOMPAT
        if unknown:
            raise UnsupportedImage(f"unknown incompatible feature bits {unknown:#x}")
        if 128 + sb_extslots * 16 > 4096 - F.SUPER_OFFSET:
            raise CorruptImage(f"superblock extension slots {sb_extslots} exceed the first block")
        self.volume_name = self.volume_name.split(b"\0", 1)[0]  # a C string, as the kernel reads it
        self._meta_off = self.meta_blkaddr * bs
        self._xattr_off = self.xattr_blkaddr * bs

        self.devices: list[Device] = []
        self.device_id_mask = 0
        if self.feature_incompat & F.FEATURE_INCOMPAT_DEVICE_TABLE and extra_devices:
            self.device_id_mask = (1 << extra_devices.bit_length()) - 1
            pos = devt_slotoff * F.DEVICE_SLOT_SIZE
            end = pos + extra_devices * F.DEVICE_SLOT_SIZE
            if end > self._len:
                raise CorruptImage(
                    f"device table of {extra_devices} slots at offset {pos} runs past the image end ({self._len})")
            for i in range(extra_devices):
                tag, blocks, mapped, _ = F.DEVICE_SLOT.unpack_from(self._mv, pos + i * F.DEVICE_SLOT_SIZE)
                self.devices.append(Device(i + 1, tag.split(b"\0", 1)[0], blocks, mapped))
        # Device 0 addresses inside a device's [mapped_blkaddr, +blocks) belong to that device.
        self._flat_ranges = [
            (d.mapped_blkaddr * bs, (d.mapped_blkaddr + d.blocks) * bs, d.index)
            for d in self.devices if d.mapped_blkaddr
        ]

    # -- inodes -----------------------------------------------------------------------------

    def inode(self, nid: int) -> Inode:
        """The inode with this nid (decoded once, kept in a bounded LRU cache)."""
        return self._inode_cached(nid)

    def _load_inode(self, nid: int) -> Inode:
        if type(nid) is not int or nid < 0:
            raise CorruptImage(f"invalid nid {nid!r}")
        off = self._meta_off + (nid << 5)
        if off + 32 > self._len:
            raise CorruptImage(f"nid {nid}: inode offset {off} is past the image end ({self._len})")
        mv = self._mv
        compact = F.INODE_COMPACT.unpack_from(mv, off)
        ifmt = compact[0]
        if ifmt & ~F.I_ALL:
            raise UnsupportedImage(f"nid {nid}: unsupported i_format {ifmt:#x} at offset {off}")
        layout = (ifmt >> F.I_DATALAYOUT_BIT) & F.I_DATALAYOUT_MASK
        if layout > F.LAYOUT_CHUNK_BASED:
            raise UnsupportedImage(f"nid {nid}: unsupported data layout {layout} at offset {off}")
        if ifmt & F.I_VERSION_MASK:
            if off + 64 > self._len:
                raise CorruptImage(f"nid {nid}: extended inode at offset {off} runs past the image end")
            (_f, icount, mode, _r, size, raw_u, ino, uid, gid, mtime, mtime_nsec, nlink, _r2
             ) = F.INODE_EXTENDED.unpack_from(mv, off)
            inode = Inode(nid, off, False, layout, icount, mode, nlink, size, raw_u, ino, uid, gid,
                          mtime, mtime_nsec)
        else:
            (_f, icount, mode, nlink, size, _r, raw_u, ino, uid, gid, _r2) = compact
            inode = Inode(nid, off, True, layout, icount, mode, nlink, size, raw_u, ino, uid, gid,
                          self.build_time, self.build_time_nsec)
        if mode & F.S_IFMT not in _VALID_TYPES:
            raise CorruptImage(f"nid {nid}: bogus i_mode {mode:o} at offset {off}")
        if size > MAX_FILE_SIZE:  # the kernel's loff_t: a larger st_size would read as negative
            raise CorruptImage(f"nid {nid}: size {size} at offset {off} exceeds {MAX_FILE_SIZE}")
        if layout == F.LAYOUT_CHUNK_BASED:
            if raw_u & 0xFFFF & ~F.CHUNK_FORMAT_ALL:
                raise UnsupportedImage(f"nid {nid}: unsupported chunk format {raw_u & 0xFFFF:#x}")
            inode.chunk_bits = self.blkszbits + (raw_u & F.CHUNK_FORMAT_BLKBITS_MASK)
        if off + inode.inode_size + inode.xattr_size > self._len:
            raise CorruptImage(
                f"nid {nid}: inline xattrs ({inode.xattr_size} bytes after offset {off}) run past the image end")
        return inode

    # -- data mapping -----------------------------------------------------------------------

    def map(self, nid: int, offset: int, length: int) -> list[Extent]:
        """Where bytes [offset, offset+length) of a file live, clipped to the file size."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        inode = self.inode(nid)
        end = min(offset + length, inode.size)
        if offset >= end:
            return []
        layout = inode.layout
        if layout == F.LAYOUT_CHUNK_BASED:
            return self._map_chunks(inode, offset, end)
        if layout == F.LAYOUT_FLAT_PLAIN or layout == F.LAYOUT_FLAT_INLINE:
            return self._map_flat(inode, offset, end)
        raise UnsupportedImage(f"nid {nid}: compressed data ({F.LAYOUT_NAMES[layout]}) is not supported")

    def _map_flat(self, inode: Inode, offset: int, end: int) -> list[Extent]:
        bs = self.block_size
        size = inode.size
        nblocks = (size + bs - 1) >> self.blkszbits
        inline = inode.layout == F.LAYOUT_FLAT_INLINE
        plain_end = (nblocks - 1) * bs if inline else size
        extents: list[Extent] = []
        if offset < plain_end:
            stop = min(end, plain_end)
            dev, pos = self._locate(inode.raw_u * bs + offset, stop - offset, inode.nid)
            extents.append(Extent(offset, stop - offset, dev, pos))
            offset = stop
        if offset < end:
            # Tail-packed data right after the inode and its xattrs, within one block.
            tail_pos = inode.data_offset
            tail_len = size - plain_end
            if (tail_pos % bs) + tail_len > bs:
                raise CorruptImage(
                    f"nid {inode.nid}: inline data of {tail_len} bytes at offset {tail_pos} crosses a block boundary")
            if tail_pos + tail_len > self._len:
                raise CorruptImage(f"nid {inode.nid}: inline data at offset {tail_pos} runs past the image end")
            extents.append(Extent(offset, end - offset, 0, tail_pos + offset - plain_end))
        return extents

    def _map_chunks(self, inode: Inode, offset: int, end: int) -> list[Extent]:
        bs = self.block_size
        fmt = inode.raw_u & 0xFFFF
        chunk_bits = inode.chunk_bits
        chunk_size = 1 << chunk_bits
        indexes = bool(fmt & F.CHUNK_FORMAT_INDEXES)
        unit = 8 if indexes else 4
        base = (inode.data_offset + unit - 1) & ~(unit - 1)
        nchunks = (inode.size + chunk_size - 1) >> chunk_bits
        if base + nchunks * unit > self._len:
            raise CorruptImage(
                f"nid {inode.nid}: chunk array of {nchunks} x {unit} bytes at offset {base} runs past the image end")
        mv = self._mv
        mask = self.device_id_mask
        ndev = len(self.devices)
        extents: list[Extent] = []
        first = offset >> chunk_bits
        last = (end - 1) >> chunk_bits
        for chunk in range(first, last + 1):
            start = max(offset, chunk << chunk_bits)
            stop = min(end, (chunk + 1) << chunk_bits)
            within = start - (chunk << chunk_bits)
            if indexes:
                _advise, device_id, blkaddr = F.CHUNK_INDEX.unpack_from(mv, base + chunk * 8)
                device_id &= mask
            else:
                blkaddr = _U32.unpack_from(mv, base + chunk * 4)[0]
                device_id = 0
            if blkaddr == F.NULL_ADDR:
                dev, pos = None, 0
            elif device_id == 0:
                dev, pos = self._locate(blkaddr * bs + within, stop - start, inode.nid)
            else:
                if device_id > ndev:
                    raise CorruptImage(
                        f"nid {inode.nid}: chunk {chunk} names device {device_id}, the image has {ndev}")
                pos = blkaddr * bs + within
                # blocks == 0 means "size not recorded" (mkfs.erofs 1.5 writes that for --blobdev).
                dev_blocks = self.devices[device_id - 1].blocks
                if dev_blocks and pos + (stop - start) > dev_blocks * bs:
                    raise CorruptImage(
                        f"nid {inode.nid}: chunk {chunk} at block {blkaddr} lies past the end of device {device_id}")
                dev = device_id
            if extents:
                prev = extents[-1]
                if prev.device_id == dev and (dev is None or prev.device_offset + prev.length == pos):
                    extents[-1] = prev._replace(length=prev.length + stop - start)
                    continue
            extents.append(Extent(start, stop - start, dev, pos))
        return extents

    def _locate(self, pa: int, length: int, nid: int) -> tuple[int, int]:
        """Resolve a device-0 byte address through the flat device address space."""
        for start, stop, index in self._flat_ranges:
            if start <= pa < stop:
                if pa + length > stop:
                    raise CorruptImage(f"nid {nid}: extent at {pa}+{length} crosses the end of device {index}")
                return index, pa - start
        if pa + length > self._len:
            raise CorruptImage(f"nid {nid}: data at offset {pa}+{length} lies past the image end ({self._len})")
        return 0, pa

    def read(self, nid: int, offset: int, size: int,
             devices: Mapping[int, Callable[[int, int], bytes]] | None = None) -> bytes:
        """File bytes; holes read as zeros, extra devices through devices[id](offset, length).

        Reads stop at the end of the file and at READ_MAX bytes (a short read).
        """
        size = min(size, READ_MAX)
        extents = self.map(nid, offset, size)
        mv = self._mv
        if len(extents) == 1 and extents[0].device_id == 0:
            e = extents[0]
            return bytes(mv[e.device_offset:e.device_offset + e.length])
        parts = []
        for e in extents:
            if e.device_id is None:
                parts.append(bytes(e.length))
            elif e.device_id == 0:
                parts.append(mv[e.device_offset:e.device_offset + e.length])
            else:
                reader = devices.get(e.device_id) if devices is not None else None
                if reader is None:
                    raise ErofsError(f"nid {nid}: data on device {e.device_id} but no reader was given for it")
                data = reader(e.device_offset, e.length)
                if len(data) != e.length:
                    raise ErofsError(
                        f"nid {nid}: device {e.device_id} returned {len(data)} bytes at "
                        f"{e.device_offset}, expected {e.length}")
                parts.append(data)
        return b"".join(parts)

    def readlink(self, nid: int) -> bytes:
        inode = self.inode(nid)
        if not inode.is_symlink:
            raise ErofsError(f"nid {nid} is not a symlink (mode {inode.mode:o})")
        if inode.size > SYMLINK_MAX:
            raise CorruptImage(f"nid {nid}: symlink of {inode.size} bytes is longer than {SYMLINK_MAX}")
        target = self.read(nid, 0, inode.size)
        if b"\0" in target:
            raise CorruptImage(f"nid {nid}: symlink target contains a NUL byte")
        return target

    # -- directories ------------------------------------------------------------------------

    def _dir_inode(self, nid: int) -> Inode:
        inode = self.inode(nid)
        if not inode.is_dir:
            raise NotFound(f"nid {nid} is not a directory (mode {inode.mode:o})")
        return inode

    def _dir_block(self, inode: Inode, index: int) -> bytes:
        """Directory block `index`, cut to the directory size."""
        bs = self.block_size
        start = index * bs
        length = min(bs, inode.size - start)
        layout = inode.layout
        if layout == F.LAYOUT_FLAT_INLINE or layout == F.LAYOUT_FLAT_PLAIN:
            extents = self._map_flat(inode, start, start + length)
        else:
            extents = self.map(inode.nid, start, length)
        if len(extents) != 1 or extents[0].device_id != 0:
            raise UnsupportedImage(f"nid {inode.nid}: directory block {index} is not stored in the image")
        pos = extents[0].device_offset
        return bytes(self._mv[pos:pos + length])

    def _dir_entries(self, inode: Inode, index: int, block: bytes) -> list[tuple[bytes, int, int]]:
        """Decode and check every dirent of one directory block: [(name, nid, file_type)].

        The checks run over whole lists (the walk's hot path); when one fails, the block is
        decoded again entry by entry to report exactly which dirent is bad.
        """
        maxsize = len(block)
        if maxsize >= _DIRENT_SIZE:
            nameoff0 = _U16.unpack_from(block, 8)[0]
            if _DIRENT_SIZE <= nameoff0 < maxsize and not nameoff0 % _DIRENT_SIZE:
                raw = list(F.DIRENT.iter_unpack(block[:nameoff0]))
                offsets = [r[1] for r in raw]
                last = offsets[-1]
                if last < maxsize:
                    end = block.find(b"\0", last, maxsize)
                    offsets.append(maxsize if end < 0 else end)
                    names = [block[a:b] for a, b in zip(offsets, offsets[1:])]
                    lengths = list(map(len, names))
                    joined = b"".join(names)
                    if (min(lengths) > 0 and max(lengths) <= F.NAME_LEN_MAX
                            and all(map(operator.lt, names, names[1:]))
                            and b"/" not in joined and b"\0" not in joined
                            and max(r[2] for r in raw) <= F.FT_SYMLINK):
                        return list(zip(names, [r[0] for r in raw], [r[2] for r in raw]))
        return self._dir_entries_one_by_one(inode, index, block)

    def _dir_entries_one_by_one(self, inode: Inode, index: int, block: bytes) -> list[tuple[bytes, int, int]]:
        """The entry-by-entry check behind _dir_entries(), which names the first bad dirent."""
        maxsize = len(block)
        nid = inode.nid
        where = f"nid {nid} dir block {index}"
        if maxsize < _DIRENT_SIZE:
            raise CorruptImage(f"{where}: {maxsize} bytes cannot hold a dirent")
        nameoff0 = _U16.unpack_from(block, 8)[0]
        if nameoff0 < _DIRENT_SIZE or nameoff0 >= maxsize or nameoff0 % _DIRENT_SIZE:
            raise CorruptImage(f"{where}: invalid first nameoff {nameoff0} (block of {maxsize} bytes)")
        raw = list(F.DIRENT.iter_unpack(block[:nameoff0]))
        entries = []
        prev_name = b""
        last = len(raw) - 1
        for i, (child, nameoff, ftype, _r) in enumerate(raw):
            if i < last:
                name_end = raw[i + 1][1]
                if name_end > maxsize:
                    raise CorruptImage(f"{where}: dirent {i + 1} nameoff {name_end} past the block")
            else:
                name_end = block.find(b"\0", nameoff, maxsize)
                if name_end < 0:
                    name_end = maxsize
            name = block[nameoff:name_end]
            if not 0 < len(name) <= F.NAME_LEN_MAX:
                raise CorruptImage(f"{where}: dirent {i} has a name of {name_end - nameoff} bytes at {nameoff}")
            if b"/" in name or b"\0" in name:
                raise CorruptImage(f"{where}: dirent {i} name {name!r} contains '/' or NUL")
            if name <= prev_name:
                raise CorruptImage(f"{where}: dirent {i} name {name!r} is not sorted after {prev_name!r}")
            if ftype not in _KNOWN_FILE_TYPES:
                raise CorruptImage(f"{where}: dirent {i} has unknown file type {ftype}")
            prev_name = name
            entries.append((name, child, ftype))
        return entries

    def iterdir(self, dir_nid: int, *, dots: bool = False) -> Iterator[DirEntry]:
        """The entries of a directory in on-disk (sorted) order; '.' and '..' only with dots."""
        for name, child, ftype in self._iter_raw(self._dir_inode(dir_nid)):
            if not dots and (name == b"." or name == b".."):
                continue
            yield DirEntry(name, child, ftype)

    def _check_dir_size(self, inode: Inode) -> None:
        # Directory data always lives in the image, so it cannot be larger than the image.
        if inode.size > self._len:
            raise CorruptImage(f"nid {inode.nid}: directory size {inode.size} exceeds the image ({self._len})")

    def _iter_raw(self, inode: Inode) -> Iterator[tuple[bytes, int, int]]:
        return itertools.chain.from_iterable(self._iter_blocks(inode))

    def _iter_blocks(self, inode: Inode) -> Iterator[list[tuple[bytes, int, int]]]:
        """The checked entries of each directory block in turn."""
        self._check_dir_size(inode)
        bs = self.block_size
        nblocks = (inode.size + bs - 1) >> self.blkszbits
        prev_last = b""
        for index in range(nblocks):
            entries = self._dir_entries(inode, index, self._dir_block(inode, index))
            if entries[0][0] <= prev_last:
                raise CorruptImage(
                    f"nid {inode.nid} dir block {index}: first name {entries[0][0]!r} is not sorted "
                    f"after the previous block's {prev_last!r}")
            prev_last = entries[-1][0]
            yield entries

    def lookup(self, dir_nid: int, name: bytes) -> int | None:
        """The nid of `name` in a directory, by binary search over blocks then dirents."""
        inode = self._dir_inode(dir_nid)
        if isinstance(name, str):
            name = os.fsencode(name)
        if not name or len(name) > F.NAME_LEN_MAX or b"/" in name or b"\0" in name:
            return None
        self._check_dir_size(inode)
        bs = self.block_size
        lo, hi = 0, ((inode.size + bs - 1) >> self.blkszbits) - 1
        candidate = -1
        while lo <= hi:  # the last block whose first name is <= name
            mid = (lo + hi) // 2
            first = self._first_name(inode, mid)
            if first == name:
                candidate = mid
                break
            if first < name:
                candidate = mid
                lo = mid + 1
            else:
                hi = mid - 1
        if candidate < 0:
            return None
        entries = self._dir_entries(inode, candidate, self._dir_block(inode, candidate))
        lo, hi = 0, len(entries) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            entry_name = entries[mid][0]
            if entry_name == name:
                return entries[mid][1]
            if entry_name < name:
                lo = mid + 1
            else:
                hi = mid - 1
        return None

    def _first_name(self, inode: Inode, index: int) -> bytes:
        block = self._dir_block(inode, index)
        maxsize = len(block)
        if maxsize < _DIRENT_SIZE:
            raise CorruptImage(f"nid {inode.nid} dir block {index}: {maxsize} bytes cannot hold a dirent")
        nameoff0 = _U16.unpack_from(block, 8)[0]
        if nameoff0 < _DIRENT_SIZE or nameoff0 >= maxsize or nameoff0 % _DIRENT_SIZE:
            raise CorruptImage(f"nid {inode.nid} dir block {index}: invalid first nameoff {nameoff0}")
        if nameoff0 > _DIRENT_SIZE:
            end = _U16.unpack_from(block, _DIRENT_SIZE + 8)[0]
            if not nameoff0 < end <= maxsize:
                raise CorruptImage(f"nid {inode.nid} dir block {index}: invalid second nameoff {end}")
        else:
            end = block.find(b"\0", nameoff0, maxsize)
            if end < 0:
                end = maxsize
        return block[nameoff0:end]

    def resolve(self, path: str | bytes) -> int:
        """The nid of a path ('/a/b', relative to the root), not following symlinks."""
        if isinstance(path, str):
            path = os.fsencode(path)
        nid = self.root_nid
        for component in path.split(b"/"):
            if not component or component == b".":
                continue
            if not self.inode(nid).is_dir:
                raise NotFound(f"{path!r}: a component before {component!r} is not a directory")
            child = self.lookup(nid, component)
            if child is None:
                raise NotFound(f"{path!r}: no entry {component!r}")
            nid = child
        return nid

    def walk(self, nid: int | None = None) -> Iterator[tuple[bytes, Inode]]:
        """Depth-first, pre-order: (path, inode) for the start directory (b'/') and below.

        Iterative; a directory reached twice (a cycle or a hard-linked directory) is corruption,
        as is a dirent whose file type disagrees with its inode.
        """
        start = self.root_nid if nid is None else nid
        start_inode = self.inode(start)
        yield b"/", start_inode
        if not start_inode.is_dir:
            return
        seen = {start}
        stack: list[tuple[bytes, Iterator[tuple[bytes, int, int]]]] = [(b"/", self._iter_raw(start_inode))]
        inode_of = self._inode_cached
        while stack:
            prefix, entries = stack[-1]
            for name, child, ftype in entries:
                if name == b"." or name == b"..":
                    continue
                inode = inode_of(child)
                mode_type = inode.mode & F.S_IFMT
                if ftype and F.FT_FROM_MODE[mode_type] != ftype:
                    raise CorruptImage(
                        f"dirent {prefix + name!r} has file type {ftype} but nid {child} has mode {inode.mode:o}")
                path = prefix + name
                yield path, inode
                if mode_type == F.S_IFDIR:
                    if child in seen:
                        raise CorruptImage(f"directory nid {child} reached twice (at {path!r}): a cycle")
                    seen.add(child)
                    stack.append((path + b"/", self._iter_raw(inode)))
                    break
            else:
                stack.pop()

    # -- xattrs -----------------------------------------------------------------------------

    def _long_prefixes(self) -> list[tuple[bytes, bytes]]:
        """The long xattr name prefixes as (short prefix, infix), read once on first use."""
        if self._prefixes is not None:
            return self._prefixes
        prefixes: list[tuple[bytes, bytes]] = []
        pos = self.xattr_prefix_start * 4
        if self.xattr_prefix_count:
            if self.feature_incompat & F.FEATURE_INCOMPAT_FRAGMENTS and self.packed_nid:
                packed = self.inode(self.packed_nid)
                # Entries are 4-byte aligned u16-length records; 258 bytes bound one record.
                area = self.read(self.packed_nid, pos, min(packed.size - pos, self.xattr_prefix_count * 260)) \
                    if pos < packed.size else b""
                base = 0
            else:
                area = self._mv[pos:pos + self.xattr_prefix_count * 260]
                base = 0
            for i in range(self.xattr_prefix_count):
                base = (base + 3) & ~3
                if base + 2 > len(area):
                    raise CorruptImage(f"long xattr prefix {i} at offset {pos + base} runs past its area")
                length = _U16.unpack_from(area, base)[0] or 0x10000
                if not 1 <= length <= F.NAME_LEN_MAX + 1 or base + 2 + length > len(area):
                    raise CorruptImage(f"long xattr prefix {i} at offset {pos + base} has bad length {length}")
                base_index = area[base + 2]
                infix = bytes(area[base + 3:base + 2 + length])
                prefixes.append((F.XATTR_PREFIXES.get(base_index, b""), infix))
                base += 2 + length
        self._prefixes = prefixes
        return prefixes

    def _xattr_entries(self, nid: int) -> Iterator[tuple[bytes, int, int]]:
        """(full name, value offset, value size) of every xattr, shared ones first."""
        inode = self.inode(nid)
        if not inode.xattr_icount:
            return
        if inode.xattr_size == F.XATTR_IBODY_HEADER.size:
            raise UnsupportedImage(f"nid {nid}: an xattr body of only a header is not supported")
        mv = self._mv
        head = inode.offset + inode.inode_size
        limit = head + inode.xattr_size  # checked against the image length at inode load
        shared_count = mv[head + 4]
        pos = head + F.XATTR_IBODY_HEADER.size
        if pos + 4 * shared_count > limit:
            raise CorruptImage(f"nid {nid}: {shared_count} shared xattr ids overrun the xattr body at {head}")
        for i in range(shared_count):
            xattr_id = _U32.unpack_from(mv, pos + 4 * i)[0]
            at = self._xattr_off + 4 * xattr_id
            entry = self._xattr_entry(at, self._len, nid)
            if entry is not None:
                yield entry
        pos += 4 * shared_count
        while pos < limit:
            entry = self._xattr_entry(pos, limit, nid)
            if entry is not None:
                yield entry
            name_len, _index, value_size = F.XATTR_ENTRY.unpack_from(mv, pos)
            pos += F.xattr_entry_size(name_len, value_size)

    def _xattr_entry(self, pos: int, limit: int, nid: int) -> tuple[bytes, int, int] | None:
        """One xattr entry at pos, ending by limit; None for a name index nobody knows."""
        if pos + F.XATTR_ENTRY.size > limit:
            raise CorruptImage(f"nid {nid}: xattr entry at offset {pos} runs past its area")
        name_len, index, value_size = F.XATTR_ENTRY.unpack_from(self._mv, pos)
        if pos + F.xattr_entry_size(name_len, value_size) > limit:
            raise CorruptImage(
                f"nid {nid}: xattr entry at offset {pos} (name {name_len}, value {value_size} bytes) overruns its area")
        name = bytes(self._mv[pos + 4:pos + 4 + name_len])
        if index & F.XATTR_LONG_PREFIX:
            prefixes = self._long_prefixes()
            which = index & F.XATTR_LONG_PREFIX_MASK
            if which >= len(prefixes):
                raise CorruptImage(f"nid {nid}: xattr at offset {pos} uses long prefix {which} of {len(prefixes)}")
            short, infix = prefixes[which]
            if not short:
                return None
            full = short + infix + name
        else:
            short = F.XATTR_PREFIXES.get(index)
            if short is None:
                return None  # the kernel skips names with an unknown index
            full = short + name
        return full, pos + 4 + name_len, value_size

    def listxattr(self, nid: int) -> list[bytes]:
        return [name for name, _pos, _size in self._xattr_entries(nid)]

    def getxattr(self, nid: int, name: bytes) -> bytes | None:
        for full, pos, size in self._xattr_entries(nid):
            if full == name:
                return bytes(self._mv[pos:pos + size])
        return None

    def xattrs(self, nid: int) -> dict[bytes, bytes]:
        return {full: bytes(self._mv[pos:pos + size]) for full, pos, size in self._xattr_entries(nid)}
