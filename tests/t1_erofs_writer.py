"""The EROFS writer: layout decisions, validation and determinism, checked on the raw bytes."""

import io
import os
import random

import pytest

from lazyfs.erofs import format as fmt
from lazyfs.erofs.writer import Builder, ChunkedData, Entry, FileData

DIR = fmt.S_IFDIR | 0o755
REG = fmt.S_IFREG | 0o644


def build(entries, **kw):
    builder = Builder(**kw)
    for entry in entries:
        builder.add(entry)
    out = io.BytesIO()
    info = builder.write(out)
    return out.getvalue(), info


def superblock(image):
    return fmt.SUPER.unpack_from(image, fmt.SUPER_OFFSET)


def inode_at(image, nid):
    """(i_format, icount, mode, nlink, size, i_u, uid, gid, header size) of one inode."""
    pos = nid * fmt.INODE_SLOT_SIZE
    i_format = int.from_bytes(image[pos:pos + 2], "little")
    if i_format & fmt.I_VERSION_MASK == fmt.INODE_LAYOUT_COMPACT:
        f, icount, mode, nlink, size, _, i_u, _, uid, gid, _ = fmt.INODE_COMPACT.unpack_from(
            image, pos
        )
        return f, icount, mode, nlink, size, i_u, uid, gid, fmt.INODE_COMPACT.size
    f, icount, mode, _, size, i_u, _, uid, gid, _, _, nlink, _ = fmt.INODE_EXTENDED.unpack_from(
        image, pos
    )
    return f, icount, mode, nlink, size, i_u, uid, gid, fmt.INODE_EXTENDED.size


def layout_of(image, nid):
    return (inode_at(image, nid)[0] >> fmt.I_DATALAYOUT_BIT) & fmt.I_DATALAYOUT_MASK


def test_superblock_checksum_and_fields():
    image, info = build([Entry(b"", DIR, mtime=7), Entry(b"a", REG, data=b"x", mtime=7)],
                        uuid=b"u" * 16, volume_name=b"vol")
    sb = superblock(image)
    assert sb[0] == fmt.MAGIC
    assert sb[1] == fmt.crc32c_superblock(image[:4096], 4096)
    assert sb[2] & fmt.FEATURE_COMPAT_SB_CHKSUM
    assert sb[3] == 12 and sb[5] == info.root_nid < 65536
    assert sb[6] == 2 and sb[7] == 7 == info.build_time  # inos, build time = common mtime
    assert sb[9] * 4096 == len(image) == info.image_size
    assert sb[12] == b"u" * 16 and sb[13].rstrip(b"\0") == b"vol"
    assert sb[14] == 0 and info.extra_devices == 0  # no chunked files, no device table
    assert info.extended_inodes == 0


def test_inline_threshold_and_block_boundary():
    sizes = [0, 1, 100, 4000, 4063, 4064, 4065, 4095, 4096]
    entries = [Entry(b"", DIR)] + [
        Entry(b"f%d" % n, REG, data=bytes([n % 251]) * n) for n in sizes
    ]
    image, info = build(entries)
    for n in sizes:
        nid = info.nids[b"f%d" % n]
        pos = nid * 32
        if n == 0:
            assert layout_of(image, nid) == fmt.LAYOUT_FLAT_PLAIN
            assert inode_at(image, nid)[5] == fmt.NULL_ADDR
        elif 32 + n <= 4096:
            assert layout_of(image, nid) == fmt.LAYOUT_FLAT_INLINE, n
            # the tail never crosses the inode's block
            assert pos % 4096 + 32 + n <= 4096
            assert image[pos + 32:pos + 32 + n] == bytes([n % 251]) * n
        else:
            assert layout_of(image, nid) == fmt.LAYOUT_FLAT_PLAIN, n
            blk = inode_at(image, nid)[5]
            assert image[blk * 4096:blk * 4096 + n] == bytes([n % 251]) * n


def test_chunk_indexes_and_device_table():
    cs = 1 << 20
    entries = [
        Entry(b"", DIR),
        Entry(b"c", REG, data=ChunkedData(size=2 * cs + 1, chunks=[5, None, 0])),
        Entry(b"s", REG, data=ChunkedData(size=(5 << 30) + 3, chunks=[None] * 5120 + [9])),
    ]
    image, info = build(entries)
    sb = superblock(image)
    assert sb[14] & fmt.FEATURE_INCOMPAT_CHUNKED_FILE
    assert sb[14] & fmt.FEATURE_INCOMPAT_DEVICE_TABLE
    assert sb[16] == 1 and sb[17] * fmt.DEVICE_SLOT_SIZE == 1152  # extra_devices, devt_slotoff
    tag, blocks, mapped, _ = fmt.DEVICE_SLOT.unpack_from(image, 1152)
    assert blocks == info.device_blocks == 10 * 256 and mapped == 0
    assert info.extra_devices == 1
    nid = info.nids[b"c"]
    f, icount, _, _, size, i_u, *_, isize = inode_at(image, nid)
    assert (f >> 1) & 7 == fmt.LAYOUT_CHUNK_BASED and size == 2 * cs + 1
    assert i_u == fmt.CHUNK_FORMAT_INDEXES | 8  # 1 MiB = 4096 << 8
    pos = nid * 32 + isize
    pos += -pos % 8
    idx = [fmt.CHUNK_INDEX.unpack_from(image, pos + 8 * i) for i in range(3)]
    assert idx == [(0, 1, 5 * 256), (0, 0, fmt.NULL_ADDR), (0, 1, 0)]
    f, *_, isize = inode_at(image, info.nids[b"s"])
    assert f & fmt.I_VERSION_MASK == fmt.INODE_LAYOUT_EXTENDED  # size >= 4 GiB


def test_compact_and_extended_inodes():
    image, info = build([
        Entry(b"", DIR, mtime=100),
        Entry(b"same", REG, mtime=100),
        Entry(b"other_time", REG, mtime=101),
        Entry(b"nsec", REG, mtime=100, mtime_nsec=5),
        Entry(b"biguid", REG, mtime=100, uid=70000),
    ])
    assert info.build_time == 100 and info.extended_inodes == 3
    for name, version in [(b"same", 0), (b"other_time", 1), (b"nsec", 1), (b"biguid", 1)]:
        assert inode_at(image, info.nids[name])[0] & 1 == version, name
    assert inode_at(image, info.nids[b"biguid"])[6] == 70000


def test_directory_dirents_sorted_and_split():
    names = [b"n%05d" % i for i in range(1000)] + [b"-dash", b"Z"]
    entries = [Entry(b"", DIR)] + [Entry(n, REG) for n in names]
    image, info = build(entries)
    f, _, _, nlink, size, blk, *_ = inode_at(image, info.root_nid)
    assert nlink == 2
    seen = []
    for block_no in range(-(-size // 4096)):
        if (f >> 1) & 7 == fmt.LAYOUT_FLAT_INLINE and block_no == size // 4096:
            start = info.root_nid * 32 + 32
        else:
            start = (blk + block_no) * 4096
        end = start + min(4096, size - block_no * 4096)
        block = image[start:end]
        count = fmt.DIRENT.unpack_from(block, 0)[1] // 12
        offs = [fmt.DIRENT.unpack_from(block, 12 * i)[1] for i in range(count)] + [len(block)]
        seen += [block[offs[i]:offs[i + 1]].rstrip(b"\0") for i in range(count)]
    assert seen == sorted(names + [b".", b".."])


def test_nlink_and_hardlinks():
    image, info = build([
        Entry(b"", DIR), Entry(b"d", DIR), Entry(b"d/e", DIR), Entry(b"f", REG, data=b"1"),
        Entry(b"g", REG, hardlink_to=b"f"), Entry(b"d/h", REG, hardlink_to=b"f"),
    ])
    assert info.inodes == 4
    assert info.nids[b"f"] == info.nids[b"g"] == info.nids[b"d/h"]
    assert inode_at(image, info.nids[b"f"])[3] == 3
    assert inode_at(image, info.root_nid)[3] == 3
    assert inode_at(image, info.nids[b"d"])[3] == 3


def test_devices_and_symlink():
    image, info = build([
        Entry(b"", DIR),
        Entry(b"wh", fmt.S_IFCHR, rdev=(0, 0)),
        Entry(b"tty", fmt.S_IFCHR | 0o620, rdev=(4, 300)),
        Entry(b"l", fmt.S_IFLNK | 0o777, link_target=b"target/path"),
        Entry(b"long", fmt.S_IFLNK | 0o777, link_target=b"x" * 4095),
    ])
    assert inode_at(image, info.nids[b"tty"])[5] == fmt.new_encode_dev(4, 300)
    assert fmt.new_decode_dev(fmt.new_encode_dev(4, 300)) == (4, 300)
    nid = info.nids[b"l"]
    assert layout_of(image, nid) == fmt.LAYOUT_FLAT_INLINE
    assert image[nid * 32 + 32:nid * 32 + 43] == b"target/path"
    assert layout_of(image, info.nids[b"long"]) == fmt.LAYOUT_FLAT_PLAIN


def test_shared_xattrs_only_when_they_save_space():
    value = b"v" * 40
    entries = [Entry(b"", DIR)] + [
        Entry(b"f%d" % i, REG, xattrs={b"user.shared": value, b"user.own": b"%d" % i})
        for i in range(5)
    ]
    # An 8-byte entry on two inodes: 16 bytes inline, 8 + 2 * 4 shared: stays inline.
    entries[1].xattrs[b"user.s"] = entries[2].xattrs[b"user.s"] = b"1"
    image, info = build(entries)
    assert info.shared_xattrs == 1 and info.xattr_blkaddr > 0
    for i in range(5):
        nid = info.nids[b"f%d" % i]
        _, icount, *_, isize = inode_at(image, nid)
        _, shared_count, _ = fmt.XATTR_IBODY_HEADER.unpack_from(image, nid * 32 + isize)
        assert shared_count == 1
        xid = int.from_bytes(image[nid * 32 + isize + 12:nid * 32 + isize + 16], "little")
        pos = info.xattr_blkaddr * 4096 + 4 * xid
        name_len, index, value_size = fmt.XATTR_ENTRY.unpack_from(image, pos)
        assert (index, image[pos + 4:pos + 4 + name_len]) == (fmt.XATTR_INDEX_USER, b"shared")
        assert image[pos + 4 + name_len:pos + 4 + name_len + value_size] == value


def test_more_than_255_shared_xattrs_spill_inline():
    xattrs = {b"user.k%03d" % i: b"shared value %03d" % i for i in range(300)}
    entries = [Entry(b"", DIR)] + [Entry(b"f%d" % i, REG, xattrs=xattrs) for i in range(3)]
    image, info = build(entries)
    assert info.shared_xattrs == 300
    nid = info.nids[b"f0"]
    _, shared_count, _ = fmt.XATTR_IBODY_HEADER.unpack_from(image, nid * 32 + 32)
    assert shared_count == 255


@pytest.mark.parametrize("entry, message", [
    (Entry(b"/abs", REG), "bad path"),
    (Entry(b"a//b", REG), "bad path"),
    (Entry(b"a/..", REG), "bad path"),
    (Entry(b"x" * 256, REG), "longer than 255"),
    (Entry(b"missing/f", REG), "was not added yet"),
    (Entry(b"file/f", REG), "is not a directory"),
    (Entry(b"file", REG), "duplicate path"),
    (Entry(b"big", REG, data=b"x" * 5000), "inline threshold"),
    (Entry(b"c", REG, data=ChunkedData(size=3 << 20, chunks=[1])), "needs 3"),
    (Entry(b"c", REG, data=ChunkedData(size=1, chunks=[1 << 24])), "32-bit block address"),
    (Entry(b"x", REG, xattrs={b"os2.foo": b""}), "xattr name"),
    (Entry(b"x", REG, xattrs={b"user.a": b"v" * 65536}), "value longer"),
    (Entry(b"l", fmt.S_IFLNK | 0o777), "link_target"),
    (Entry(b"h", REG, hardlink_to=b"dir"), "is a directory"),
    (Entry(b"h", REG, hardlink_to=b"nope"), "not added yet"),
    (Entry(b"m", 0o644), "bad mode"),
])
def test_invalid_entries_are_refused(entry, message):
    builder = Builder()
    builder.add(Entry(b"", DIR))
    builder.add(Entry(b"file", REG))
    builder.add(Entry(b"dir", DIR))
    with pytest.raises(ValueError, match=message):
        builder.add(entry)


def test_missing_host_file_is_a_value_error(tmp_path):
    builder = Builder()
    builder.add(Entry(b"", DIR))
    with pytest.raises(ValueError, match="cannot read"):
        builder.add(Entry(b"f", REG, data=FileData(str(tmp_path / "absent"))))


def test_root_is_required_and_must_be_a_directory():
    with pytest.raises(ValueError, match="root"):
        Builder().write(io.BytesIO())
    with pytest.raises(ValueError, match="root"):
        Builder().add(Entry(b"", REG))


def random_tree(seed, count=300):
    rng = random.Random(seed)
    entries = [Entry(b"", DIR, mtime=1000)]
    dirs = [b""]
    for i in range(count):
        parent = rng.choice(dirs)
        path = (parent + b"/" if parent else b"") + b"e%d" % i
        kind = rng.random()
        if kind < 0.2:
            entries.append(Entry(path, DIR, mtime=1000 + rng.randrange(3)))
            dirs.append(path)
        else:
            entries.append(Entry(path, REG, mtime=1000, uid=rng.randrange(3),
                                 data=rng.randbytes(rng.randrange(3000)),
                                 xattrs={b"user.k": b"shared-value-%d" % rng.randrange(2)}))
    return entries


def test_deterministic_and_independent_of_add_order():
    entries = random_tree(1)
    first, _ = build(entries)
    second, _ = build(entries)
    assert first == second
    # Another valid add order (parents before children) gives the same bytes.
    shuffled = [entries[0]] + sorted(entries[1:], key=lambda e: (e.path.count(b"/"), e.path[::-1]))
    third, _ = build(shuffled)
    assert first == third


def test_file_data_streams_from_host_file(tmp_path):
    small = tmp_path / "small"
    small.write_bytes(b"s" * 300)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * 4096 + 17))
    image, info = build([
        Entry(b"", DIR),
        Entry(b"small", REG, data=FileData(str(small))),
        Entry(b"big", REG, data=FileData(str(big))),
    ], plain_data=True)
    blk = inode_at(image, info.nids[b"big"])[5]
    assert image[blk * 4096:blk * 4096 + big.stat().st_size] == big.read_bytes()
    nid = info.nids[b"small"]
    assert image[nid * 32 + 32:nid * 32 + 332] == b"s" * 300
