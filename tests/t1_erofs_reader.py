"""The EROFS reader against images made by mkfs.erofs (erofs-utils 1.5), compared with the source tree."""

from __future__ import annotations

import mmap
import os
import stat
import struct
from pathlib import Path

import pytest

from lazyfs.erofs import format as F
from lazyfs.erofs.errors import CorruptImage, ErofsError, UnsupportedImage
from lazyfs.erofs.reader import READ_MAX, Device, DirEntry, Extent, Image, NotFound
from lazyfs.erofs.writer import Builder, ChunkedData
from tests.erofs_images import (
    SB_FIELDS, build_source_tree, fix_superblock_checksum, mkfs, patch_superblock, read_superblock,
)
from tests.fixtures.common import require_root

FIXED_TIME = 1234567890


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    require_root()
    root = tmp_path_factory.mktemp("erofs-src") / "src"
    build_source_tree(root)
    return root


@pytest.fixture(scope="module")
def images(tree, tmp_path_factory) -> dict[str, tuple[Path, Path | None, tuple[str, ...]]]:
    """name -> (image, blob or None, mkfs args)."""
    out = tmp_path_factory.mktemp("erofs-img")
    blob = out / "blob"
    variants = {
        "default": (),
        "chunked-blob": ("--chunksize=4096", f"--blobdev={blob}"),
        "extended": ("-Eforce-inode-extended",),
        "fixed-time": (f"-T{FIXED_TIME}",),
        "all-root": ("--all-root",),
    }
    result = {}
    for name, args in variants.items():
        image = mkfs(out / f"{name}.img", tree, *args)
        result[name] = (image, blob if name == "chunked-blob" else None, args)
    # The project's own writer, read back by this independent reader.
    builder = Builder(plain_data=True)
    builder.add_tree(str(tree))
    with open(out / "writer-plain.img", "wb") as f:
        builder.write(f)
    result["writer-plain"] = (out / "writer-plain.img", None, ())
    chunk_device = out / "chunk-device"
    builder = Builder(chunk_size=8192)
    builder.add_tree(str(tree), chunk_store=AppendingChunkStore(chunk_device, 8192))
    with open(out / "writer-chunked.img", "wb") as f:
        builder.write(f)
    result["writer-chunked"] = (out / "writer-chunked.img", chunk_device, ())
    return result


class AppendingChunkStore:
    """A chunk device file: each file's chunks appended; all-zero chunks become holes."""

    def __init__(self, path: Path, chunk_size: int) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.next_chunk = 0
        path.write_bytes(b"")

    def add_file(self, host_path: str, size: int) -> ChunkedData:
        chunks: list[int | None] = []
        with open(host_path, "rb") as src, open(self.path, "r+b") as dev:
            while piece := src.read(self.chunk_size):
                if piece == bytes(len(piece)):
                    chunks.append(None)
                    continue
                dev.seek(self.next_chunk * self.chunk_size)
                dev.write(piece)
                chunks.append(self.next_chunk)
                self.next_chunk += 1
        return ChunkedData(size, chunks)


def blob_devices(blob: Path | None):
    if blob is None:
        return None
    fd = os.open(blob, os.O_RDONLY)

    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return {1: read}


def read_all(img: Image, nid: int, devices=None) -> bytes:
    size = img.inode(nid).size
    parts, offset = [], 0
    while offset < size:
        part = img.read(nid, offset, min(READ_MAX, size - offset), devices)
        assert part
        parts.append(part)
        offset += len(part)
    return b"".join(parts)


def source_entries(root: Path) -> dict[bytes, os.stat_result]:
    entries = {b"/": os.lstat(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            entries[b"/" + os.fsencode(os.path.relpath(full, root))] = os.lstat(full)
    return entries


@pytest.mark.parametrize("variant", ["default", "chunked-blob", "extended", "fixed-time", "all-root",
                                     "writer-plain", "writer-chunked"])
def test_image_matches_source_tree(tree, images, variant):
    image, blob, args = images[variant]
    devices = blob_devices(blob)
    expected = source_entries(tree)
    with Image.open(image) as img:
        seen = {}
        nid_of_ino: dict[int, int] = {}
        for path, inode in img.walk():
            seen[path] = inode
            st = expected[path]
            assert stat.S_IFMT(inode.mode) == stat.S_IFMT(st.st_mode), path
            assert stat.S_IMODE(inode.mode) == stat.S_IMODE(st.st_mode), path
            if variant == "all-root":
                assert (inode.uid, inode.gid) == (0, 0), path
            else:
                assert (inode.uid, inode.gid) == (st.st_uid, st.st_gid), path
            if variant == "fixed-time":
                assert (inode.mtime, inode.mtime_nsec) == (FIXED_TIME, 0), path
            else:
                # mkfs.erofs 1.5 keeps nanoseconds: an inode whose mtime differs from the
                # build time is stored extended with its own i_mtime/i_mtime_nsec.
                assert inode.mtime * 10**9 + inode.mtime_nsec == st.st_mtime_ns, path
            if variant == "extended":
                assert not inode.compact
            assert inode.nlink == st.st_nlink, path
            # Hard links share one inode, so one nid.
            if not stat.S_ISDIR(st.st_mode):
                assert nid_of_ino.setdefault(st.st_ino, inode.nid) == inode.nid, path
            if stat.S_ISREG(st.st_mode):
                assert inode.is_reg and inode.size == st.st_size
                with open(tree / os.fsdecode(path[1:]), "rb") as f:
                    assert read_all(img, inode.nid, devices) == f.read(), path
            elif stat.S_ISLNK(st.st_mode):
                assert inode.is_symlink
                assert img.readlink(inode.nid) == os.readlink(tree / os.fsdecode(path[1:])).encode()
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert (inode.major, inode.minor) == (os.major(st.st_rdev), os.minor(st.st_rdev)), path
                assert inode.rdev == F.new_encode_dev(inode.major, inode.minor)
            else:
                assert inode.rdev == 0
            source = tree / os.fsdecode(path[1:]) if path != b"/" else tree
            want = {} if stat.S_ISLNK(st.st_mode) else {
                n.encode(): os.getxattr(source, n, follow_symlinks=False) for n in os.listxattr(source)}
            assert img.xattrs(inode.nid) == want, path
            assert sorted(img.listxattr(inode.nid)) == sorted(want)
            for name, value in want.items():
                assert img.getxattr(inode.nid, name) == value
            assert img.getxattr(inode.nid, b"user.absent") is None
        assert set(seen) == set(expected)
        assert len(seen) > 10_000 + 200


def test_superblock_and_devices(images, tree):
    image, blob, _ = images["chunked-blob"]
    with Image.open(image) as img:
        assert img.block_size == 4096
        assert img.feature_incompat & F.FEATURE_INCOMPAT_CHUNKED_FILE
        assert img.feature_incompat & F.FEATURE_INCOMPAT_DEVICE_TABLE
        assert img.devices == [Device(1, b"", 0, 0)]
        assert img.inos == len(source_entries(tree)) - 2  # two hard links share inodes
        assert len(img.uuid) == 16 and img.volume_name == b""
        nid = img.resolve("/files/f12293")
        inode = img.inode(nid)
        assert inode.layout == F.LAYOUT_CHUNK_BASED
        assert inode.chunk_format & F.CHUNK_FORMAT_INDEXES and inode.chunk_size == 4096
        assert img.map(nid, 0, 1 << 40) == [Extent(0, 3 * 4096 + 5, 1, img.map(nid, 0, 1)[0].device_offset)]
        with pytest.raises(ErofsError, match="no reader"):
            img.read(nid, 0, 10)
        # A device that returns short reads is reported, not padded.
        with pytest.raises(ErofsError, match="returned"):
            img.read(nid, 0, 10, {1: lambda off, n: b"x"})


def test_buffer_is_what_the_image_reads_until_closed(images):
    image, _, _ = images["chunked-blob"]
    data = Path(image).read_bytes()
    img = Image(data)
    assert img.buffer is data
    img.close()
    assert img.buffer is None
    with Image.open(image) as mapped:
        assert isinstance(mapped.buffer, mmap.mmap)


def test_flat_layouts_and_inline_tail(images):
    image, _, _ = images["default"]
    with Image.open(image) as img:
        nid = img.resolve(b"/files/f4097")
        inode = img.inode(nid)
        assert inode.layout == F.LAYOUT_FLAT_INLINE
        extents = img.map(nid, 0, 4097)
        assert [(e.file_offset, e.length, e.device_id) for e in extents] == [(0, 4096, 0), (4096, 1, 0)]
        assert extents[1].device_offset == inode.data_offset
        assert img.map(nid, 4097, 10) == []
        assert img.read(nid, 4090, 100) == img.read(nid, 0, 5000)[4090:]
        assert img.inode(img.resolve("/files/f4096")).layout == F.LAYOUT_FLAT_PLAIN


def test_block_map_chunks(tree, tmp_path):
    image = mkfs(tmp_path / "map.img", tree / "files", "--chunksize=8192")
    with Image.open(image) as img:
        nid = img.resolve("/f1048583")
        inode = img.inode(nid)
        assert inode.layout == F.LAYOUT_CHUNK_BASED
        assert not inode.chunk_format & F.CHUNK_FORMAT_INDEXES
        assert 4096 << (inode.chunk_format & F.CHUNK_FORMAT_BLKBITS_MASK) == 8192 == inode.chunk_size
        assert all(e.device_id == 0 for e in img.map(nid, 0, inode.size))
        assert read_all(img, nid) == (tree / "files" / "f1048583").read_bytes()
        sparse = img.resolve("/sparse")
        assert read_all(img, sparse) == (tree / "files" / "sparse").read_bytes()


def test_lookup_and_iterdir(images, tree):
    image, _, _ = images["default"]
    with Image.open(image) as img:
        big = img.resolve("/big")
        names = sorted(os.listdir(tree / "big"))
        entries = list(img.iterdir(big))
        assert [e.name.decode() for e in entries] == names
        assert all(isinstance(e, DirEntry) and e.file_type == F.FT_REG_FILE for e in entries)
        dots = list(img.iterdir(big, dots=True))
        assert [e.name for e in dots[:2]] == [b".", b".."]
        assert dots[0].nid == big and dots[1].nid == img.root_nid
        assert img.inode(big).size > 40 * img.block_size  # many dirent blocks
        for e in entries[::97] + entries[-3:]:
            assert img.lookup(big, e.name) == e.nid
        for absent in (b"a", b"entry-", b"entry-00000-x", b"entry-09999-zzz", b"zzz", b"\xff" * 255):
            assert img.lookup(big, absent) is None
        for bad in (b"", b"a/b", b"x\0y", b"n" * 256):
            assert img.lookup(big, bad) is None
        assert img.lookup(big, b"..") == img.root_nid


def test_resolve(images):
    image, _, _ = images["default"]
    with Image.open(image) as img:
        assert img.resolve("/") == img.resolve(b"") == img.root_nid
        deep = img.resolve("/deep" + "/d" * 200 + "/bottom")
        assert img.read(deep, 0, 100) == b"bottom"
        assert img.resolve("/files/../links/./short") == img.resolve("/links/short")
        # Symlinks are not followed.
        assert img.inode(img.resolve("/links/short")).is_symlink
        with pytest.raises(NotFound):
            img.resolve("/files/missing")
        with pytest.raises(NotFound):
            img.resolve("/files/f1/below-a-file")
        with pytest.raises(NotFound):
            list(img.iterdir(img.resolve("/files/f1")))
        with pytest.raises(ErofsError, match="not a symlink"):
            img.readlink(img.resolve("/files/f1"))


def test_walk_is_iterative_and_ordered(images):
    image, _, _ = images["default"]
    with Image.open(image) as img:
        paths = [p for p, _ in img.walk()]
        assert paths[0] == b"/"
        deepest = max(paths, key=lambda p: p.count(b"/"))
        assert deepest.count(b"/") == 202
        sub = [p for p, _ in img.walk(img.resolve("/links"))]
        assert sub == [b"/", b"/abs", b"/long", b"/short"]


def test_open_from_bytes_and_memoryview(images):
    image, _, _ = images["fixed-time"]
    data = image.read_bytes()
    for buf in (data, bytearray(data), memoryview(data), memoryview(data).cast("I")):
        img = Image(buf)
        assert img.build_time == FIXED_TIME and img.build_time_nsec == 0
        assert img.inode(img.root_nid).compact
        assert img.inode(img.root_nid) is img.inode(img.root_nid)  # cached


def test_compressed_inodes_metadata_readable_data_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "text").write_bytes(b"compress me " * 10000)
    image = mkfs(tmp_path / "z.img", src, "-zlz4")
    with Image.open(image) as img:
        nid = img.resolve("/text")
        inode = img.inode(nid)
        assert inode.is_compressed and inode.size == 120000
        with pytest.raises(UnsupportedImage, match="compressed"):
            img.read(nid, 0, 10)


# -- rejected superblocks and synthetic features mkfs.erofs 1.5 cannot produce --------------

def test_superblock_errors(images):
    image, _, _ = images["default"]
    good = bytearray(image.read_bytes())
    with pytest.raises(CorruptImage, match="too short"):
        Image(good[:1100])
    with pytest.raises(CorruptImage, match="magic"):
        Image(patch_superblock(bytearray(good), magic=0x12345678))
    bad_crc = bytearray(good)
    bad_crc[F.SUPER_OFFSET + 48] ^= 1  # a uuid byte
    with pytest.raises(CorruptImage, match="checksum"):
        Image(bad_crc)
    with pytest.raises(UnsupportedImage, match="0x80"):
        sb = Image(good)
        Image(patch_superblock(bytearray(good), feature_incompat=sb.feature_incompat | 0x80))
    with pytest.raises(CorruptImage, match="block size bits 17"):
        Image(patch_superblock(bytearray(good), blkszbits=17))
    with pytest.raises(UnsupportedImage, match="dirblkbits"):
        Image(patch_superblock(bytearray(good), dirblkbits=1))
    files_nid = Image(good).resolve("/files/f1")
    with pytest.raises(CorruptImage, match="not a directory"):
        Image(patch_superblock(bytearray(good), root_nid=files_nid))
    with pytest.raises(CorruptImage, match="past the image end"):
        Image(good).inode(1 << 40)
    corrupt_file = image.parent / "corrupt.img"
    corrupt_file.write_bytes(patch_superblock(bytearray(good), magic=1))
    with pytest.raises(CorruptImage, match="magic"):
        Image.open(corrupt_file)
    with pytest.raises(CorruptImage, match="empty"):
        empty = image.parent / "empty.img"
        empty.write_bytes(b"")
        Image.open(empty)


def reopen(data: bytearray) -> Image:
    """An Image of edited bytes, with the superblock checksum fixed for the edit."""
    fix_superblock_checksum(data)
    return Image(data)


def test_flat_device_address_space(images):
    """Block-map style device-0 addresses inside a device's mapped_blkaddr range go to it."""
    image, blob, _ = images["chunked-blob"]
    data = bytearray(image.read_bytes())
    img = Image(bytes(data))
    nid = img.resolve("/files/f12293")
    inode = img.inode(nid)
    index_pos = (inode.data_offset + 7) & ~7
    devt = read_superblock(data)[SB_FIELDS.index("devt_slotoff")] * F.DEVICE_SLOT_SIZE
    struct.pack_into("<II", data, devt + 64, 100_000, 5000)  # blocks, mapped_blkaddr
    for i in range(4):
        _advise, device_id, blkaddr = F.CHUNK_INDEX.unpack_from(data, index_pos + 8 * i)
        assert device_id == 1
        F.CHUNK_INDEX.pack_into(data, index_pos + 8 * i, 0, 0, 5000 + blkaddr)
    F.CHUNK_INDEX.pack_into(data, index_pos + 8 * 2, 0, 0, F.NULL_ADDR)  # a hole
    patched = reopen(data)
    assert patched.devices == [Device(1, b"", 100_000, 5000)]
    extents = patched.map(nid, 0, inode.size)
    assert [(e.device_id, e.length) for e in extents] == [(1, 8192), (None, 4096), (1, 5)]
    blob_bytes = blob.read_bytes()
    content = patched.read(nid, 0, inode.size, {1: lambda off, n: blob_bytes[off:off + n]})
    original = img.read(nid, 0, inode.size, {1: lambda off, n: blob_bytes[off:off + n]})
    assert content == original[:8192] + bytes(4096) + original[12288:]
    # Device ids are masked with roundup_pow_of_two(devices + 1) - 1: 3 is device 1 here...
    F.CHUNK_INDEX.pack_into(data, index_pos + 8, 0, 3, 0)
    assert reopen(data).map(nid, 4096, 1)[0].device_id == 1
    # ...and with two devices the mask is 3, so id 3 names a device the table lacks.
    two = patch_superblock(bytearray(data), extra_devices=2)
    with pytest.raises(CorruptImage, match="names device 3"):
        reopen(two).map(nid, 4096, 1)
    # An address past the end of a device with a known size is corruption.
    F.CHUNK_INDEX.pack_into(data, index_pos, 0, 1, 100_000)
    with pytest.raises(CorruptImage, match="past the end of device 1"):
        reopen(data).map(nid, 0, 1)


def test_long_xattr_prefixes(images):
    image, _, _ = images["default"]
    data = bytearray(image.read_bytes())
    img = Image(data)
    nid = img.resolve("/xattrs")
    inode = img.inode(nid)
    entry = inode.offset + inode.inode_size + 12  # the first inline entry after the header
    name_len, index, value_size = F.XATTR_ENTRY.unpack_from(data, entry)
    assert (index, data[entry + 4:entry + 4 + name_len]) == (F.XATTR_INDEX_TRUSTED, b"overlay.opaque")
    # A prefix table in unused space at the end of the image: trusted. + "overlay.".
    table = data.rfind(bytes(64), 0, 2 << 20) + 4 & ~3
    record = bytes([F.XATTR_INDEX_TRUSTED]) + b"overlay."
    struct.pack_into("<H", data, table, len(record))
    data[table + 2:table + 2 + len(record)] = record
    # Reuse the entry name "overlay.opaque" behind long prefix 0.
    data[entry + 1] = F.XATTR_LONG_PREFIX | 0
    patch_superblock(data, xattr_prefix_count=1, xattr_prefix_start=table // 4,
                     feature_incompat=img.feature_incompat | F.FEATURE_INCOMPAT_XATTR_PREFIXES)
    patched = Image(data)
    assert patched.xattrs(nid) == {b"trusted.overlay.overlay.opaque": b"y"}
    data[entry + 1] = F.XATTR_LONG_PREFIX | 5
    with pytest.raises(CorruptImage, match="long prefix 5"):
        reopen(data).listxattr(nid)


def test_corrupt_directory_blocks(images):
    image, _, _ = images["default"]
    data = bytearray(image.read_bytes())
    img = Image(data)
    nid = img.resolve("/links")
    pos = img.map(nid, 0, 1)[0].device_offset
    names = [e.name for e in img.iterdir(nid, dots=True)]
    assert names == [b".", b"..", b"abs", b"long", b"short"]

    def corrupted(offset, fmt, value):
        d = bytearray(data)
        struct.pack_into(fmt, d, offset, value)
        return reopen(d)

    with pytest.raises(CorruptImage, match="first nameoff"):
        list(corrupted(pos + 8, "<H", 7).iterdir(nid))
    with pytest.raises(CorruptImage, match="first nameoff"):
        list(corrupted(pos + 8, "<H", 61).iterdir(nid))  # not a multiple of 12
    nameoff3 = struct.unpack_from("<H", data, pos + 3 * 12 + 8)[0]
    with pytest.raises(CorruptImage, match="not sorted"):
        d = bytearray(data)
        d[nameoff3 + pos] = ord("z")  # "long" -> "zong" sorts after "short"
        list(reopen(d).iterdir(nid))
    with pytest.raises(CorruptImage, match="name of 0 bytes"):
        list(corrupted(pos + 3 * 12 + 8, "<H", nameoff3 - 3).iterdir(nid))
    with pytest.raises(CorruptImage, match="past the image end"):
        list(corrupted(pos + 2 * 12, "<Q", 1 << 40).walk())
    with pytest.raises(CorruptImage, match="unknown file type"):
        list(corrupted(pos + 2 * 12 + 10, "<B", 9).iterdir(nid))
    # A dirent pointing back at an ancestor directory is a cycle.
    d = bytearray(data)
    struct.pack_into("<QHB", d, pos + 2 * 12, img.root_nid, struct.unpack_from("<H", data, pos + 2 * 12 + 8)[0],
                     F.FT_DIR)
    with pytest.raises(CorruptImage, match="reached twice"):
        list(reopen(d).walk())
