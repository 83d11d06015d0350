"""LayerFS and the pyfuse3 Operations called directly (no kernel) on mkfs.erofs images."""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest
import trio

from lazyfs.fetch.cache import ChunkCache
from lazyfs.serve.devices import plain_blob_device
from lazyfs.erofs.reader import Image
from lazyfs.fetch.scheduler import ChunkFetcher, RetryPolicy
from lazyfs.serve.fuse import DevicePagePusher, LazyOperations, boundary
from lazyfs.serve.layerfs import ROOT_INODE, DeviceReadError, LayerFS, NoSuchEntry, StaleInode
from lazyfs.fetch.sources import FileBlobSource, SourceError
from tests.fixtures.erofs_trees import make_plain_image


@pytest.fixture(scope="module")
def plain_image(tmp_path_factory):
    return make_plain_image(tmp_path_factory.mktemp("plain"))


@pytest.fixture
async def fs_and_ops(plain_image, tmp_path):
    cache = ChunkCache(tmp_path / "cache")
    fetcher = ChunkFetcher(cache, retry=RetryPolicy(attempts=2, initial_delay=0.01))
    async with fetcher:
        image = Image.open(plain_image.meta)
        with FileBlobSource(plain_image.blob) as source:
            fs = LayerFS()
            fs.attach("base", image, plain_blob_device(fetcher, source, source.size, cell_size=65536))
            yield fs, LazyOperations(fs)
        image.close()


def _walk_source(root):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            yield os.path.relpath(path, root), os.lstat(path)


async def _resolve(fs: LayerFS, rel: str) -> int:
    ino = fs.lookup(ROOT_INODE, b"base")
    for part in rel.split("/"):
        ino = fs.lookup(ino, part.encode())
    return ino


async def test_attributes_and_content_match_the_source_tree(fs_and_ops, plain_image):
    fs, _ = fs_and_ops
    inodes_by_source_ino: dict[int, int] = {}
    for rel, st in _walk_source(plain_image.source):
        ino = await _resolve(fs, rel)
        attr = fs.getattr(ino)
        assert attr.mode == st.st_mode, rel
        assert (attr.uid, attr.gid, attr.nlink) == (st.st_uid, st.st_gid, st.st_nlink), rel
        if not stat.S_ISDIR(st.st_mode):
            assert attr.size == st.st_size, rel
            assert attr.mtime_ns == st.st_mtime_ns, rel
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            assert attr.rdev == (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12), rel
        if stat.S_ISREG(st.st_mode):
            with open(os.path.join(plain_image.source, rel), "rb") as f:
                assert await fs.read(ino, 0, st.st_size + 10) == f.read(), rel
        if stat.S_ISLNK(st.st_mode):
            assert fs.readlink(ino) == os.fsencode(os.readlink(os.path.join(plain_image.source, rel)))
        source_xattrs = {n.encode(): os.getxattr(os.path.join(plain_image.source, rel), n, follow_symlinks=False)
                         for n in os.listxattr(os.path.join(plain_image.source, rel), follow_symlinks=False)}
        assert {n: fs.getxattr(ino, n) for n in fs.listxattr(ino)} == source_xattrs, rel
        # Hard links: one inode number per source inode.
        assert inodes_by_source_ino.setdefault(st.st_ino, ino) == ino, rel


async def test_partial_reads_across_chunks_and_holes(fs_and_ops, plain_image):
    fs, _ = fs_and_ops
    for rel in ("big.bin", "sparse"):
        data = (plain_image.source / rel).read_bytes()
        ino = await _resolve(fs, rel)
        for offset, size in [(0, 1), (65535, 2), (65536 * 2 - 100, 65536 + 200), (len(data) - 5, 100),
                             (len(data), 10), (1000, 300000)]:
            assert await fs.read(ino, offset, size) == data[offset:offset + size], (rel, offset, size)


async def test_root_lists_attached_layers(fs_and_ops):
    fs, _ = fs_and_ops
    assert [e.name for e in fs.listdir(ROOT_INODE)] == [b"base"]
    base = fs.lookup(ROOT_INODE, b"base")
    assert fs.lookup(base, b"..") == ROOT_INODE
    assert fs.lookup(ROOT_INODE, b"..") == ROOT_INODE
    nested = fs.lookup(fs.lookup(base, b"dir"), b"nested")
    assert fs.lookup(nested, b"..") == fs.lookup(base, b"dir")
    assert fs.lookup(nested, b".") == nested
    assert stat.S_ISDIR(fs.getattr(ROOT_INODE).mode)
    with pytest.raises(NoSuchEntry):
        fs.lookup(ROOT_INODE, b"other")


async def test_detached_layer_inodes_are_stale(fs_and_ops):
    fs, ops = fs_and_ops
    small = await _resolve(fs, "small.txt")
    image = fs.layer("base").image
    device = fs.layer("base").device
    fs.detach("base")
    with pytest.raises(StaleInode):
        fs.getattr(small)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(small)
    assert info.value.errno == errno.ESTALE
    # Reattaching gets a new slot: the old inode number stays stale.
    fs.attach("base", image, device)
    with pytest.raises(StaleInode):
        fs.getattr(small)
    assert fs.getattr(await _resolve(fs, "small.txt")).size == 13


async def test_operations_translate_and_refuse_writes(fs_and_ops, plain_image):
    _, ops = fs_and_ops
    base = await ops.lookup(ROOT_INODE, b"base")
    entry = await ops.lookup(base.st_ino, b"small.txt")
    assert entry.st_size == 13 and entry.attr_timeout > 3600 and entry.entry_timeout > 3600
    assert entry.st_blocks == 8  # one 4 KiB block, in 512-byte units, like the kernel
    info = await ops.open(entry.st_ino, os.O_RDONLY)
    assert info.keep_cache and not info.direct_io
    assert await ops.read(info.fh, 6, 100) == b"lazyfs\n"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(entry.st_ino, os.O_RDWR)
    assert e.value.errno == errno.EROFS
    for call in (ops.mkdir(base.st_ino, b"x", 0o755, None), ops.unlink(base.st_ino, b"small.txt", None),
                 ops.setxattr(entry.st_ino, b"user.x", b"1", None), ops.write(info.fh, 0, b"x")):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await call
        assert e.value.errno == errno.EROFS
    # Inside a layer a miss is a cacheable negative entry; at the root (layers come and go) ENOENT.
    missing = await ops.lookup(base.st_ino, b"missing")
    assert missing.st_ino == 0 and missing.entry_timeout > 3600
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(ROOT_INODE, b"no-such-layer")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(entry.st_ino, b"user.missing")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.readlink(entry.st_ino)
    assert e.value.errno == errno.EINVAL
    assert await ops.listxattr(entry.st_ino) == [b"user.comment"]
    st = await ops.statfs(None)
    assert st.f_files > 300 and st.f_namemax == 255
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.access(entry.st_ino, os.W_OK)
    assert e.value.errno == errno.EROFS


async def test_readdir_handles_are_stable_snapshots(fs_and_ops, plain_image):
    fs, ops = fs_and_ops
    many = await _resolve(fs, "many")
    fh = await ops.opendir(many)
    names = [e.name for e in fs.listdir(many)]
    assert names == sorted(os.fsencode(n) for n in os.listdir(plain_image.source / "many"))
    assert fs.getattr(many).nlink == 2
    await ops.releasedir(fh)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.readdir(fh, 0, None)
    assert e.value.errno == errno.EBADF


class _BrokenSource:
    name = "broken"
    host = "broken"

    async def read_range(self, offset, length):
        raise SourceError(self.name, offset, length, "connection reset")


@pytest.mark.expected_log
async def test_failed_fetch_is_eio_for_that_read_only(plain_image, tmp_path):
    cache = ChunkCache(tmp_path / "cache")
    async with ChunkFetcher(cache, retry=RetryPolicy(attempts=2, initial_delay=0.001)) as fetcher:
        image = Image.open(plain_image.meta)
        fs = LayerFS()
        fs.attach("base", image, plain_blob_device(fetcher, _BrokenSource(), plain_image.blob.stat().st_size))
        ops = LazyOperations(fs)
        big = await _resolve(fs, "big.bin")
        with pytest.raises(DeviceReadError):
            await fs.read(big, 0, 10)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(big, 0, 10)
        assert e.value.errno == errno.EIO
        # Inline or metadata-only answers still work.
        assert fs.getattr(big).size > 0
        image.close()


@pytest.mark.expected_log
async def test_boundary_turns_unexpected_errors_into_eio():
    @boundary
    async def handler(self, inode):
        raise ZeroDivisionError("bug")

    with pytest.raises(pyfuse3.FUSEError) as e:
        await handler(None, 5)
    assert e.value.errno == errno.EIO


async def test_a_device_read_hands_the_kernel_whole_pages_of_what_follows_within_its_cell(plain_image, tmp_path):
    """Kernel mode: a read of the chunk-device file returns what was asked; what follows it
    within the read's cell goes to the page-cache store in whole pages (none of the read's own
    last page), and once the byte budget is exceeded the device file is invalidated."""
    stored: list[tuple[int, int, bytes]] = []
    invalidated: list[int] = []
    pusher = DevicePagePusher(window=20_000, budget=100_000, store=lambda *args: stored.append(args),
                              invalidate=invalidated.append)
    cache = ChunkCache(tmp_path / "cache")
    fetcher = ChunkFetcher(cache, retry=RetryPolicy(attempts=2, initial_delay=0.01))
    blob = plain_image.blob.read_bytes()
    async with fetcher:
        with Image.open(plain_image.meta) as image, FileBlobSource(plain_image.blob) as source:
            fs = LayerFS()
            layer = fs.attach("base", image, plain_blob_device(fetcher, source, source.size, cell_size=65536),
                              as_device=True)
            ops = LazyOperations(fs, device_pages=pusher)
            device = layer.entry_ino
            assert await ops.read(device, 1000, 3000) == blob[1000:4000]
            # 4000..24000 follows; the first whole page starts at 4096, the last ends at 20480
            ((ino, offset, data),) = stored
            assert (ino, offset, data) == (device, 4096, blob[4096:20480])
            # A read ending 6000 bytes before the cell's end: only those (one whole page).
            assert await ops.read(device, 57_344, 2192) == blob[57_344:59_536]
            assert stored[-1][1:] == (61_440, blob[61_440:65_536])
            # A read that ends on the cell boundary: nothing follows within the cell.
            count = len(stored)
            assert await ops.read(device, 61_440, 4096) == blob[61_440:65_536]
            assert len(stored) == count and not invalidated
            # Bytes that entered the device file's cache: 3000+16384, 2192+4096, 4096; then over.
            assert await ops.read(device, 65_536, 70_000) == blob[65_536:135_536]
            for _ in range(100):  # the invalidation runs in its own thread: wait, bounded
                if invalidated:
                    break
                await trio.sleep(0.01)
            assert invalidated == [device]
            assert pusher.wait_idle()
            # Other inodes are read as they are.
            other = fs.attach("tree", image, plain_blob_device(fetcher, source, source.size, cell_size=65536))
            before = len(stored)
            await ops.read(other.ino(image.resolve("big.bin")), 0, 100)
            assert len(stored) == before
