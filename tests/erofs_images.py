"""Helpers shared by the EROFS reader tests: source trees, mkfs.erofs images, image patching."""

from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path

import google_crc32c

from lazyfs.erofs import format as F
from tests.fixtures.common import require_tool, run

FILE_SIZES = (0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 1024 * 1024 + 7)
MTIME_NS = 1_600_000_000_123_456_789


def make_socket(path: Path) -> None:
    """Leave a unix socket inode at path (a tree entry of type socket)."""
    cwd = os.getcwd()
    os.chdir(path.parent)  # AF_UNIX paths are limited to 108 bytes: bind a relative name
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)
    finally:
        os.chdir(cwd)


def build_source_tree(root: Path, *, big_dir: int = 10_000, depth: int = 200) -> None:
    """A tree with every file type, owners, xattrs, hard links, odd sizes, a sparse file."""
    rng = random.Random(1)
    root.mkdir()
    files = root / "files"
    files.mkdir()
    for size in FILE_SIZES:
        (files / f"f{size}").write_bytes(rng.randbytes(size))
    with open(files / "sparse", "wb") as f:
        f.truncate(3 * 1024 * 1024)
        f.seek(1024 * 1024 + 100)
        f.write(b"in the middle of nowhere")
    (files / "zeros").write_bytes(bytes(70000))
    os.link(files / "f4097", files / "hardlink-to-f4097")
    os.link(files / "f1", root / "hardlink-to-f1")

    special = root / "special"
    special.mkdir()
    os.mknod(special / "chr", 0o600 | 0o020000, os.makedev(1, 3))
    os.mknod(special / "chr-big", 0o640 | 0o020000, os.makedev(259, 70000))
    os.mknod(special / "blk", 0o660 | 0o060000, os.makedev(8, 17))
    os.mknod(special / "whiteout", 0o000 | 0o020000, os.makedev(0, 0))
    os.mkfifo(special / "fifo", 0o644)
    make_socket(special / "sock")

    links = root / "links"
    links.mkdir()
    os.symlink("../files/f1", links / "short")
    os.symlink("x" * 3000, links / "long")
    os.symlink("/absolute/target", links / "abs")

    owned = root / "owned"
    owned.mkdir()
    for name, uid, gid in (("a", 1000, 1000), ("b", 65534, 100), ("c", 70000, 80000)):
        (owned / name).write_bytes(name.encode())
        os.chown(owned / name, uid, gid)
    os.chmod(owned / "a", 0o4755)
    os.chmod(owned / "b", 0o2711)

    xattrs = root / "xattrs"
    xattrs.mkdir()
    os.setxattr(xattrs, b"trusted.overlay.opaque", b"y")
    for i in range(4):
        p = xattrs / f"x{i}"
        p.write_bytes(b"data")
        os.setxattr(p, b"user.shared", b"same value on every file")  # shared by mkfs
        os.setxattr(p, b"user.own", f"value {i}".encode())
        os.setxattr(p, b"trusted.t", bytes([i]) * (i + 1))
        os.setxattr(p, b"security.s", b"sec" * 30)
    os.setxattr(xattrs / "x0", b"user.empty", b"")
    os.setxattr(xattrs / "x1", b"user." + b"n" * 200, b"v" * 1000)

    if big_dir:
        big = root / "big"
        big.mkdir()
        for i in range(big_dir):
            (big / f"entry-{i:05d}-{'y' * (i % 37)}").touch()
    if depth:
        p = root / "deep"
        p.mkdir()
        for _ in range(depth):
            p = p / "d"
            p.mkdir()
        (p / "bottom").write_bytes(b"bottom")

    # Timestamps last: creating entries changes directory mtimes.
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(MTIME_NS, MTIME_NS))
    os.utime(files / "f1", ns=(MTIME_NS, 1_500_000_000_999_999_999))


def mkfs(image: Path, source: Path, *args: str) -> Path:
    require_tool("mkfs.erofs")
    run(["mkfs.erofs", "--quiet", *args, str(image), str(source)])
    return image


def read_superblock(data: bytes | bytearray) -> list:
    return list(F.SUPER.unpack_from(data, F.SUPER_OFFSET))


SB_FIELDS = (
    "magic checksum feature_compat blkszbits sb_extslots root_nid inos build_time build_time_nsec "
    "blocks meta_blkaddr xattr_blkaddr uuid volume_name feature_incompat u1 extra_devices "
    "devt_slotoff dirblkbits xattr_prefix_count xattr_prefix_start packed_nid xattr_filter reserved2"
).split()


def patch_superblock(data: bytearray, *, fix_checksum: bool = True, **fields) -> bytearray:
    """Change superblock fields by name and (by default) recompute the checksum."""
    values = read_superblock(data)
    for name, value in fields.items():
        values[SB_FIELDS.index(name)] = value
    F.SUPER.pack_into(data, F.SUPER_OFFSET, *values)
    if fix_checksum:
        fix_superblock_checksum(data)
    return data


def fix_superblock_checksum(data: bytearray) -> None:
    """Recompute the checksum the way the kernel checks it (for any block size bits 9..16)."""
    values = read_superblock(data)
    if not values[2] & F.FEATURE_COMPAT_SB_CHKSUM or not 9 <= values[3] <= 16:
        return
    bs = 1 << values[3]
    length = bs - F.SUPER_OFFSET if bs > F.SUPER_OFFSET else bs
    area = bytearray(data[F.SUPER_OFFSET:F.SUPER_OFFSET + length])
    area[F.SUPER_CHECKSUM_OFFSET:F.SUPER_CHECKSUM_OFFSET + 4] = bytes(4)
    crc = google_crc32c.value(bytes(area)) ^ 0xFFFFFFFF
    struct.pack_into("<I", data, F.SUPER_OFFSET + F.SUPER_CHECKSUM_OFFSET, crc)
