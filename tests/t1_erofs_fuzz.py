"""Fuzzing the EROFS reader: mutated mkfs.erofs images may only ever raise ErofsError."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.erofs import format as F
from lazyfs.erofs.errors import ErofsError
from lazyfs.erofs.reader import Image
from tests.erofs_images import fix_superblock_checksum, make_socket, mkfs
from tests.fixtures.common import require_root

# Bounds that keep one exercise() cheap whatever the mutation did.
MAX_ENTRIES = 2000
MAX_READ = 256 * 1024


def small_tree(root: Path) -> None:
    rng = random.Random(7)
    root.mkdir()
    (root / "empty").touch()
    for size in (1, 100, 4095, 4097, 9000):
        (root / f"f{size}").write_bytes(rng.randbytes(size))
    os.link(root / "f1", root / "hard")
    os.symlink("f100", root / "sym")
    os.symlink("y" * 600, root / "longsym")
    os.mknod(root / "chr", 0o600 | 0o020000, os.makedev(5, 1))
    os.mkfifo(root / "fifo")
    make_socket(root / "sock")
    many = root / "many"
    many.mkdir()
    for i in range(70):
        p = many / f"{i:03d}-{'n' * 60}"
        p.write_bytes(b"%d" % i)
        os.setxattr(p, b"user.shared", b"everyone")
    os.setxattr(root / "f100", b"trusted.overlay.opaque", b"y")
    os.setxattr(root / "f100", b"security.lazyfs", b"\x01" * 20)
    sub = root / "a" / "b" / "c"
    sub.mkdir(parents=True)
    (sub / "leaf").write_bytes(b"leaf")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[tuple[bytes, bytes]]:
    """(image, blob) pairs: a plain image and a chunk-indexed one with its blob."""
    require_root()
    base = tmp_path_factory.mktemp("erofs-fuzz")
    small_tree(base / "src")
    plain = mkfs(base / "plain.img", base / "src").read_bytes()
    blob = base / "blob"
    chunked = mkfs(base / "chunked.img", base / "src", "--chunksize=4096", f"--blobdev={blob}").read_bytes()
    mapped = mkfs(base / "mapped.img", base / "src", "--chunksize=8192").read_bytes()
    return [(plain, b""), (chunked, blob.read_bytes()), (mapped, b"")]


def exercise(data: bytes, blob: bytes, rng: random.Random) -> None:
    """Use every reader entry point on an image; only ErofsError may escape."""
    try:
        img = Image(data)
    except ErofsError:
        return

    def device(offset: int, length: int) -> bytes:
        return blob[offset:offset + length].ljust(length, b"\0")

    devices = {d.index: device for d in img.devices}
    try:
        for count, (path, inode) in enumerate(img.walk()):
            if count > MAX_ENTRIES:
                break
            nid = inode.nid
            for call in (
                lambda: img.xattrs(nid),
                lambda: img.getxattr(nid, b"user.shared"),
                lambda: img.map(nid, 0, inode.size),
                lambda: img.read(nid, 0, MAX_READ, devices),
                lambda: img.read(nid, max(0, inode.size - 10), 20, devices),
                lambda: img.readlink(nid),
                lambda: list(img.iterdir(nid, dots=True)),
                lambda: img.lookup(nid, rng.randbytes(rng.randrange(1, 12))),
                lambda: img.lookup(nid, b"070-" + b"n" * 60),
                lambda: img.resolve(path),
                lambda: (inode.file_type, inode.major, inode.minor, inode.is_compressed),
            ):
                try:
                    call()
                except ErofsError:
                    pass
    except ErofsError:
        pass
    for nid in (rng.randrange(0, 4096), rng.randrange(0, 1 << 64)):
        try:
            img.inode(nid)
            img.listxattr(nid)
        except ErofsError:
            pass


def mutate(data: bytes, rng: random.Random) -> bytes:
    d = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips anywhere in the metadata
        for _ in range(rng.randrange(1, 8)):
            pos = rng.randrange(len(d))
            d[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        d = d[: rng.randrange(len(d))]
    elif kind == 2:  # random overwrite of the superblock
        pos = F.SUPER_OFFSET + rng.randrange(F.SUPER_SIZE)
        d[pos:pos + 4] = rng.randbytes(4)
    elif kind == 3:  # random overwrite of a run of inodes / dirents / xattrs in block 0..n
        pos = rng.randrange(F.SUPER_OFFSET + F.SUPER_SIZE, len(d))
        n = rng.randrange(1, 64)
        d[pos:pos + n] = rng.randbytes(n)[: len(d) - pos]
    elif kind == 4:  # plausible but wrong small integers (offsets, counts, nids)
        pos = rng.randrange(F.SUPER_OFFSET, len(d) - 2)
        d[pos:pos + 2] = rng.choice([0, 1, 12, 0xFF, 0xFFFF, 4095, 4096]).to_bytes(2, "little")
    else:  # copy one region over another (duplicated names, self-references)
        n = rng.randrange(4, 128)
        src, dst = rng.randrange(len(d) - n), rng.randrange(F.SUPER_OFFSET, len(d) - n)
        d[dst:dst + n] = d[src:src + n]
    if rng.random() < 0.85:  # mostly get past the checksum to reach the deeper parsers
        try:
            fix_superblock_checksum(d)
        except Exception:
            pass  # a truncated superblock has nothing to fix
    return bytes(d)


def test_unmutated_seeds_are_fully_readable(seeds):
    for data, blob in seeds:
        img = Image(data)
        assert sum(1 for _ in img.walk()) > 80


def test_deterministic_mutations(seeds):
    rng = random.Random(20240601)
    for i in range(1000):
        data, blob = seeds[i % len(seeds)]
        exercise(mutate(data, rng), blob, rng)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(which=st.integers(0, 2), seed=st.integers(0, 2**32 - 1),
       edits=st.lists(st.tuples(st.integers(0, 1 << 21), st.binary(min_size=1, max_size=16)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 1 << 21)))
def test_hypothesis_mutations(seeds, which, seed, edits, cut):
    data, blob = seeds[which]
    d = bytearray(data)
    for pos, chunk in edits:
        pos %= len(d)
        d[pos:pos + len(chunk)] = chunk[: len(d) - pos]
    if cut is not None:
        d = d[: cut % (len(d) + 1)]
    fix_superblock_checksum(d) if len(d) >= F.SUPER_OFFSET + F.SUPER_SIZE else None
    exercise(bytes(d), blob, random.Random(seed))


def dirent_block(names: list[bytes], block_size: int = 4096) -> bytes:
    """One directory block holding `names` in the given order, nids 100, 101, ..."""
    head = len(names) * F.DIRENT.size
    out, offset = bytearray(), head
    for i, name in enumerate(names):
        out += F.DIRENT.pack(100 + i, offset, F.FT_REG_FILE, 0)
        offset += len(name)
    out += b"".join(names)
    return bytes(out.ljust(block_size, b"\0"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=40),
       edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=4),
       cut=st.integers(12, 4096))
def test_dirent_block_checks_agree(seeds, names, edits, cut):
    """The list-wide dirent checks accept exactly what the entry-by-entry checks accept."""
    img = Image(seeds[0][0])
    block = bytearray(dirent_block(sorted(set(names))))
    for pos, value in edits:
        block[pos] = value
    block = bytes(block[:cut])
    inode = img.inode(img.root_nid)
    try:
        slow = img._dir_entries_one_by_one(inode, 0, block)
    except ErofsError:
        slow = None
    try:
        fast = img._dir_entries(inode, 0, block)
    except ErofsError:
        fast = None
    assert fast == slow
