"""Images from the EROFS writer, mounted by the kernel's EROFS and checked by fsck.erofs."""

import os
import random
import stat
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.erofs import format as fmt
from lazyfs.erofs.reader import Image
from lazyfs.erofs.writer import Builder, ChunkedData, Entry
from tests.fixtures.common import run
from tests.fixtures.erofs_images import ChunkDevice, compare_tree, fsck, mounted_erofs
from tests.t1_erofs_roundtrip import CHUNK as ROUND_TRIP_CHUNK
from tests.t1_erofs_roundtrip import trees

DIR = fmt.S_IFDIR | 0o755
REG = fmt.S_IFREG | 0o644
CHUNK = 1 << 20


def posix_acl(*entries):
    """A POSIX ACL xattr value (version 2): (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ACL_ACCESS = posix_acl((0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF),
                       (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF))


def write_image(tmp_path, entries, name="meta.img", **kw):
    builder = Builder(**kw)
    for entry in entries:
        builder.add(entry)
    image = str(tmp_path / name)
    with open(image, "wb") as f:
        info = builder.write(f)
    assert os.path.getsize(image) == info.image_size
    return image, info


def layer_entries(device: ChunkDevice):
    """A tree exercising every inode kind, layout and xattr form the writer has."""
    rng = random.Random(7)
    entries = [
        Entry(b"", DIR, mtime=1_700_000_000, xattrs={b"trusted.overlay.opaque": b"y"}),
        Entry(b"small", DIR, mtime=1_700_000_000),
    ]
    for i in range(300):
        entries.append(Entry(b"small/f%03d" % i, REG, mtime=1_700_000_000,
                             data=rng.randbytes(rng.randrange(0, 600))))
    for n in (0, 1, 4063, 4064, 4095, 4096):
        entries.append(Entry(b"inline_%d" % n, REG, mtime=1_700_000_000, data=b"i" * n))
    entries.append(Entry(b"chunked_4097", REG, data=device.store(b"c" * 4097),
                         mtime=1_700_000_000))
    multi = rng.randbytes(2 * CHUNK) + bytes(CHUNK) + rng.randbytes(CHUNK // 2 + 3)
    multi_data = device.store(multi)
    entries.append(Entry(b"multi", REG, data=multi_data, mtime=1_600_000_000,
                         mtime_nsec=123_456_789))
    # Another file made of the same chunks (dedup inside a layer).
    entries.append(Entry(b"dedup", REG, data=ChunkedData(multi_data.size, list(multi_data.chunks)),
                         mtime=1_700_000_000))
    sparse = device.store(b"head" + bytes(CHUNK - 4))
    sparse.size = (5 << 30) + 77  # > 4 GiB: extended inode, hole chunks up to a data tail
    sparse.chunks += [None] * (-(-sparse.size // CHUNK) - 2)
    sparse.chunks += device.store(b"tail" * 1000).chunks
    entries.append(Entry(b"sparse", REG, data=sparse, mtime=1_700_000_000))
    deep = b"deep"
    entries.append(Entry(deep, DIR, mtime=1_700_000_000))
    for level in range(40):
        deep += b"/level%02d" % level
        entries.append(Entry(deep, DIR, mtime=1_700_000_000 + level, uid=level, gid=2 * level))
    entries.append(Entry(deep + b"/bottom", REG, data=b"bottom\n", mtime=1_700_000_000))
    entries.append(Entry(b"wide", DIR, mtime=1_700_000_000))
    for i in range(10_000):
        entries.append(Entry(b"wide/entry-with-a-longish-name-%05d" % i, REG,
                             mtime=1_700_000_000, data=b"%d" % i))
    shared = {b"user.shared": b"s" * 100, b"security.selinux": b"system_u:object_r:x:s0\0"}
    entries += [
        Entry(b"x1", REG, mtime=1_700_000_000, xattrs={**shared, b"user.one": b"1"}),
        Entry(b"x2", REG, mtime=1_700_000_000, xattrs={**shared, b"user." + b"n" * 250: b""}),
        Entry(b"x3", REG, mtime=1_700_000_000, xattrs={**shared, b"trusted.t": b"t" * 3000}),
        Entry(b"xbig", REG, mtime=1_700_000_000, xattrs={b"user.big": b"b" * 65535,
                                                          b"user.big2": b"c" * 20000}),
        Entry(b"xacl", DIR, mtime=1_700_000_000, xattrs={b"system.posix_acl_access": ACL_ACCESS,
                                                          b"system.posix_acl_default": ACL_ACCESS}),
        Entry(b"xacl/opaque", DIR, mtime=1_700_000_000,
              xattrs={b"trusted.overlay.opaque": b"y"}),
        Entry(b"whiteout", fmt.S_IFCHR, rdev=(0, 0), mtime=1_700_000_000),
        Entry(b"tty", fmt.S_IFCHR | 0o620, rdev=(4, 70000), gid=5, mtime=1_700_000_000),
        Entry(b"disk", fmt.S_IFBLK | 0o660, rdev=(259, 3), mtime=1_700_000_000),
        Entry(b"fifo", fmt.S_IFIFO | 0o600, mtime=1_700_000_000),
        Entry(b"sock", fmt.S_IFSOCK | 0o777, mtime=1_700_000_000),
        Entry(b"link", fmt.S_IFLNK | 0o777, link_target=b"small/f001", mtime=1_700_000_000),
        Entry(b"longlink", fmt.S_IFLNK | 0o777, link_target=b"y/" * 2000, mtime=1_700_000_000),
        Entry(b"bigids", REG | 0o6000, uid=100_000, gid=4_000_000_000, mtime=1_700_000_000,
              data=b"ids"),
        # Xattrs that push inline data out of the inode's block: FLAT_PLAIN fallbacks, and a
        # chunk index that starts past a block boundary.
        Entry(b"xdir", DIR, mtime=1_700_000_000, xattrs={b"user.big": b"d" * 4000}),
        Entry(b"xdir/child", REG, mtime=1_700_000_000, data=b"c" * 100,
              xattrs={b"user.big": b"f" * 4000}),
        Entry(b"xdir/link", fmt.S_IFLNK | 0o777, mtime=1_700_000_000, link_target=b"child",
              xattrs={b"trusted.big": b"l" * 4090}),  # user.* is off limits on symlinks
        Entry(b"xdir/chunked", REG, mtime=1_700_000_000, xattrs={b"user.big": b"k" * 9000},
              data=device.store(b"k" * (CHUNK + 10))),
        Entry(b"hard1", REG, data=b"shared inode", mtime=5, xattrs={b"user.h": b"1"}),
        Entry(b"small/hard2", REG, hardlink_to=b"hard1"),
        Entry(b"deep/hard3", REG, hardlink_to=b"hard1"),
        Entry(b"devlink", REG, hardlink_to=b"tty"),
    ]
    return entries


def test_kernel_mounts_chunked_layer(tmp_path):
    device = ChunkDevice(str(tmp_path / "chunks.dev"), CHUNK)
    entries = layer_entries(device)
    image, info = write_image(tmp_path, entries)
    assert info.build_time == 1_700_000_000 and info.root_nid < 65536
    assert info.shared_xattrs >= 2 and info.extended_inodes >= 40
    with Image.open(image) as meta:  # the fallbacks the tree is meant to exercise
        layouts = {p: meta.inode(info.nids[p]).layout for p in (
            b"xdir", b"xdir/child", b"xdir/link", b"inline_4064", b"inline_4063", b"small")}
    assert layouts == {
        b"xdir": fmt.LAYOUT_FLAT_PLAIN, b"xdir/child": fmt.LAYOUT_FLAT_PLAIN,
        b"xdir/link": fmt.LAYOUT_FLAT_PLAIN, b"inline_4064": fmt.LAYOUT_FLAT_INLINE,
        b"inline_4063": fmt.LAYOUT_FLAT_INLINE, b"small": fmt.LAYOUT_FLAT_INLINE,
    }
    device.finish(info.device_blocks, 4096)
    assert os.stat(device.path).st_blocks * 512 < 64 * CHUNK  # the device file stays sparse
    fsck(image, device.path)
    with mounted_erofs(image, device.path) as mnt:
        compare_tree(mnt, entries, info, device)
        assert os.statvfs(mnt).f_bsize == 4096


def test_kernel_mounts_self_contained_image_from_host_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "sub").mkdir()
    (src / "sub" / "empty").mkdir()
    (src / "big").write_bytes(random.Random(1).randbytes(3 * 4096 + 123))
    (src / "small").write_bytes(b"small\n")
    (src / "edge").write_bytes(b"e" * 4096)
    (src / "empty").write_bytes(b"")
    os.link(src / "small", src / "sub" / "small-link")
    os.symlink("../big", src / "sub" / "sym")
    os.mkfifo(src / "fifo")
    os.mknod(src / "sock", stat.S_IFSOCK | 0o644)
    os.mknod(src / "wh", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(src / "sub", "trusted.overlay.opaque", b"y")
    os.setxattr(src / "big", "user.comment", b"hello")
    os.chown(src / "small", 1234, 5678)
    os.utime(src / "big", ns=(0, 1_234_567_890_123_456_789))
    builder = Builder(plain_data=True)
    builder.add_tree(str(src))
    image = str(tmp_path / "plain.img")
    with open(image, "wb") as f:
        info = builder.write(f)
    entries = builder.entries()
    fsck(image)
    with mounted_erofs(image) as mnt:
        compare_tree(mnt, entries, info)
        assert os.listxattr(os.path.join(mnt, "sub")) == ["trusted.overlay.opaque"]
    extracted = tmp_path / "extracted"
    fsck(image, extract_to=str(extracted))
    for name in ("big", "small", "edge", "empty", "sub/small-link"):
        assert (extracted / name).read_bytes() == (src / name).read_bytes()
    assert os.readlink(extracted / "sub" / "sym") == "../big"


@pytest.mark.parametrize("threshold", [0, 64, 4096])
def test_kernel_reads_every_inline_threshold(tmp_path, threshold):
    entries = [Entry(b"", DIR)]
    for n in (0, 1, 63, 64, 65, 2000, 4000, 4064, 4096, 5000, 9000):
        entries.append(Entry(b"f%d" % n, REG, data=bytes(range(256)) * (n // 256) + b"z" * (n % 256)))
    image, info = write_image(tmp_path, entries, inline_threshold=threshold, plain_data=True)
    fsck(image)
    with mounted_erofs(image) as mnt:
        compare_tree(mnt, entries, info)


@pytest.mark.parametrize("block_size", [512, 1024, 2048])
def test_kernel_mounts_small_block_sizes(tmp_path, block_size):
    """Sub-page blocks: the superblock checksum then covers one block from offset 1024 on.

    fsck.erofs 1.5 handles 4 KiB blocks only, so the kernel is the sole judge here.
    """
    device = ChunkDevice(str(tmp_path / "chunks.dev"), 1 << 16)
    entries = [Entry(b"", DIR, xattrs={b"user.root": b"r"}), Entry(b"d", DIR)]
    entries += [Entry(b"d/%d" % i, REG, data=b"%d" % i) for i in range(200)]
    entries += [
        Entry(b"chunked", REG, data=device.store(random.Random(3).randbytes(200_000))),
        Entry(b"tail", REG, data=b"t" * (block_size - 40), xattrs={b"user.a": b"b"}),
        Entry(b"link", fmt.S_IFLNK | 0o777, link_target=b"l" * (block_size + 10)),
    ]
    image, info = write_image(tmp_path, entries, block_size=block_size, chunk_size=1 << 16,
                              inline_threshold=block_size)
    device.finish(info.device_blocks, block_size)
    with mounted_erofs(image, device.path) as mnt:
        compare_tree(mnt, entries, info, device)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(tree=trees(), block_size=st.sampled_from([1024, 4096]))
def test_kernel_round_trip_of_generated_trees(tmp_path_factory, tree, block_size):
    """The generated trees of the reader round trip, this time read by the kernel."""
    entries, chunk_bytes = tree
    tmp = tmp_path_factory.mktemp("gen")
    device = ChunkDevice(str(tmp / "chunks.dev"), ROUND_TRIP_CHUNK)
    with open(device.path, "r+b") as f:
        for chunk, content in chunk_bytes.items():
            f.seek(chunk * ROUND_TRIP_CHUNK)
            f.write(content)
    image, info = write_image(tmp, entries, block_size=block_size, chunk_size=ROUND_TRIP_CHUNK,
                              inline_threshold=block_size, plain_data=True)
    device.finish(info.device_blocks, block_size)
    device_file = device.path if info.extra_devices else None
    if block_size == 4096:
        fsck(image, device_file)
    with mounted_erofs(image, device_file) as mnt:
        compare_tree(mnt, entries, info, device)


def test_overlayfs_honours_whiteouts_and_opaque_dirs(tmp_path):
    """Two writer-made layers stacked by overlayfs: the upper one's whiteout hides a file and
    its opaque directory hides the lower directory's content."""
    lower, _ = write_image(tmp_path, [
        Entry(b"", DIR), Entry(b"gone", REG, data=b"old"), Entry(b"kept", REG, data=b"k"),
        Entry(b"d", DIR), Entry(b"d/old", REG, data=b"o"), Entry(b"m", DIR),
        Entry(b"m/lower", REG, data=b"l"),
    ], name="lower.img")
    upper, _ = write_image(tmp_path, [
        Entry(b"", DIR), Entry(b"gone", fmt.S_IFCHR, rdev=(0, 0)),
        Entry(b"d", DIR, xattrs={b"trusted.overlay.opaque": b"y"}),
        Entry(b"d/new", REG, data=b"n"), Entry(b"m", DIR), Entry(b"m/upper", REG, data=b"u"),
    ], name="upper.img")
    merged = tmp_path / "merged"
    merged.mkdir()
    with mounted_erofs(lower) as low, mounted_erofs(upper) as up:
        run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={up}:{low}", str(merged)])
        try:
            assert sorted(os.listdir(merged)) == ["d", "kept", "m"]
            assert os.listdir(merged / "d") == ["new"]
            assert sorted(os.listdir(merged / "m")) == ["lower", "upper"]
            assert (merged / "kept").read_bytes() == b"k"
        finally:
            subprocess.run(["umount", str(merged)], check=False)

