"""The pyfuse3 adapter: kernel requests translated into LayerFS calls, nothing more.

Every handler goes through :func:`boundary`: pyfuse3 lets a handler raise only FUSEError,
and any other exception escaping a handler would end ``pyfuse3.main`` and with it the mount.
The boundary passes FUSEError through, maps our own errors to an errno through one table,
and turns anything unexpected into EIO with a logged traceback.

The filesystem is immutable while a layer is attached, so the kernel may cache everything:
entries and attributes for a long time, file pages across opens (``keep_cache``). The mount
root changes when layers come and go; its attributes use a short timeout and detaching a
layer invalidates its entry explicitly (see lazyfs.daemon.server).
"""

from __future__ import annotations

import errno
import os
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3
import trio

from lazyfs.fetch.cache import CacheError
from lazyfs.erofs.errors import CorruptImage, ErofsError, UnsupportedImage
from lazyfs.serve.layerfs import ROOT_INODE, Attributes, DirEntry, LayerFS, LayerFSError, NoSuchEntry

log = logging.getLogger(__name__)

# Layer contents never change while attached: let the kernel cache lookups and attributes
# for a day. The root directory's own attributes change with attach/detach.
LAYER_TIMEOUT = 86400.0
ROOT_ATTR_TIMEOUT = 1.0

# Our exception types -> errno, most specific first. LayerFSError carries its own errno.
ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (CorruptImage, errno.EIO),
    (UnsupportedImage, errno.EOPNOTSUPP),
    (ErofsError, errno.EIO),
    (CacheError, errno.EIO),
)


def errno_for(exc: BaseException) -> int | None:
    if isinstance(exc, LayerFSError):
        return exc.errno
    for kind, code in ERRNO_TABLE:
        if isinstance(exc, kind):
            return code
    return None


def boundary(handler: Callable) -> Callable:
    """Let only FUSEError out of a handler (see the module docstring)."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place that must catch all
            code = errno_for(exc)
            if code is None:
                log.exception("unexpected error in %s%r", handler.__name__, args[1:])
                raise pyfuse3.FUSEError(errno.EIO) from None
            if code == errno.EIO:
                log.error("%s%r failed: %s", handler.__name__, args[1:], exc)
            else:
                log.debug("%s%r: %s", handler.__name__, args[1:], exc)
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def _read_only() -> Callable:
    """A handler for a request that would modify the filesystem."""

    async def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    return refuse


def entry_attributes(attr: Attributes) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = 0
    timeout = ROOT_ATTR_TIMEOUT if attr.ino == ROOT_INODE else LAYER_TIMEOUT
    entry.entry_timeout = LAYER_TIMEOUT
    entry.attr_timeout = timeout
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = attr.rdev
    entry.st_size = attr.size
    entry.st_blksize = attr.blksize
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = attr.mtime_ns
    entry.st_ctime_ns = attr.mtime_ns
    entry.st_mtime_ns = attr.mtime_ns
    return entry


def negative_entry() -> pyfuse3.EntryAttributes:
    """A lookup answer meaning "no such entry", which the kernel caches for entry_timeout."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = LAYER_TIMEOUT
    return entry


PAGE = 4096
# Kernel mode, loop through the page cache: how far past a chunk-device read (within its
# cell) the daemon stores bytes in the kernel's cache, and how much may enter the device
# files' caches before they are invalidated (chosen by measurement: docs/design.md).
DEVICE_WINDOW = 256 << 10
DEVICE_CACHE_BUDGET = 64 << 20
# Only reads smaller than this are followed by stores: larger ones are a sequential stream's
# readahead, whose next request the kernel sends by itself (stores would only race with it).
DEVICE_STORE_BELOW = 128 << 10


class DevicePagePusher:
    """Kernel mode: the bytes that follow a read of a chunk-device file, stored into the
    kernel's page cache of that file (FUSE_NOTIFY_STORE) before the read is answered, so that
    the loop device's next read of them is no request.

    The kernel's EROFS driver reads each file through the loop device on its own: neighbouring
    small files, or an ELF header and then the rest of the library, are separate reads of the
    chunk device, and the page cache's readahead treats such reads as random (reads them as
    they are). The daemon has the read's cell decoded anyway, so it hands the kernel up to
    ``window`` bytes that follow the read within that cell (after reads smaller than
    ``store_below``: larger ones are sequential readahead). This needs the loop to read its
    file through the page cache (direct I/O off). What the device files' caches hold is data
    also cached by EROFS above them, so it is bounded: once ``budget`` bytes have entered
    them (reads answered and bytes stored), they are invalidated.

    A store waits for page locks that other reads in flight may hold (reads further on in
    the device, answered independently), and those are answered by the FUSE loop: so stores
    run in worker threads, never on the loop.
    """

    def __init__(self, window: int, budget: int, store_below: int = DEVICE_STORE_BELOW,
                 store: Callable[[int, int, bytes], None] = pyfuse3.notify_store,
                 invalidate: Callable[[int], None] = pyfuse3.invalidate_inode):
        self.window = window
        self.budget = budget
        self.store_below = store_below
        self._store = store
        self._invalidate = invalidate
        self._cached: dict[int, int] = {}  # device inode -> bytes that entered its page cache
        self._busy = 0  # stores and invalidations in worker threads
        self._idle = threading.Condition()
        self.stored_bytes = 0
        self.invalidations = 0

    async def read_answered(self, ino: int, offset: int, length: int, following: bytes) -> None:
        """A read of ``length`` bytes at ``offset`` is about to be answered; ``following`` are
        the bytes right after it (possibly none). Stores them in whole pages."""
        # Whole pages only (a partial one would not become valid), and none of the read's own:
        # those stay locked until it is answered.
        end = offset + length
        start, stop = -(-end // PAGE) * PAGE, (end + len(following)) // PAGE * PAGE
        data = following[start - end:stop - end] if stop > start else b""
        invalidate = self._count(ino, length + len(data))
        if len(data) >= PAGE:
            await trio.to_thread.run_sync(self._guarded(self._store, ino, start, data), abandon_on_cancel=True)
            self.stored_bytes += len(data)
        if invalidate:
            # Not awaited: invalidating waits for the pages of reads in flight, this one's too.
            threading.Thread(target=self._guarded(self._invalidate_all, invalidate), name="device-page-invalidate",
                             daemon=True).start()

    def _invalidate_all(self, inos: list[int]) -> None:
        for ino in inos:
            try:
                self._invalidate(ino)
            except OSError as e:  # ENOENT: the kernel has no such inode (any more)
                log.debug("invalidating device inode %#x: %s", ino, e)

    def _count(self, ino: int, length: int) -> list[int]:
        """Count bytes entering a device file's cache; the files to invalidate, largest first,
        once the budget is exceeded (until half of it remains: each invalidation also costs
        the kernel one GETATTR of the file)."""
        self._cached[ino] = self._cached.get(ino, 0) + length
        total = sum(self._cached.values())
        inos: list[int] = []
        if total > self.budget:
            for cached_ino in sorted(self._cached, key=self._cached.__getitem__, reverse=True):
                if total <= self.budget // 2:
                    break
                total -= self._cached.pop(cached_ino)
                inos.append(cached_ino)
            self.invalidations += len(inos)
        return inos

    def forget(self, ino: int) -> None:
        """The device file is gone (its layer detached)."""
        self._cached.pop(ino, None)

    def _guarded(self, call: Callable, *args: Any) -> Callable[[], None]:
        """``call(*args)`` for a worker thread, counted until it ends (see :meth:`wait_idle`).
        A store stuck behind a read that is never answered (the daemon stopping) is abandoned
        by the loop rather than keeping it from ending."""
        with self._idle:
            self._busy += 1

        def run() -> None:
            try:
                call(*args)
            except OSError as e:  # ENOENT: the kernel has no such inode (any more)
                log.debug("device page store at %r: %s", args[1:2], e)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

        return run

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no store runs (before the FUSE session goes away)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)


class LazyOperations(pyfuse3.Operations):
    """Read-only pyfuse3 operations over a LayerFS."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: LayerFS, on_read: Callable[[int, int, int], None] | None = None,
                 on_use: Callable[[str, int], None] | None = None, device_pages: DevicePagePusher | None = None):
        super().__init__()
        self.fs = fs
        self.device_pages = device_pages
        self._dir_handles: dict[int, list[DirEntry]] = {}
        self._next_dir_handle = itertools.count(1)
        self._on_read = on_read
        self._on_use = on_use  # ("lookup" | "open", inode) after success, for access traces

    # -------------------------------------------------------------- namespace

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            inode = self.fs.lookup(parent_inode, name)
        except NoSuchEntry:
            if parent_inode == ROOT_INODE:
                raise  # layers come and go at the root: never cache a miss there
            # A layer never changes, so the kernel may remember the miss. Interpreters probe
            # many absent paths (Python's import searches every sys.path entry); without this
            # each probe is a round trip to the daemon.
            return negative_entry()
        attributes = entry_attributes(self.fs.getattr(inode))
        if self._on_use is not None:
            self._on_use("lookup", inode)
        return attributes

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inode numbers are derived from (slot, nid): there is no per-inode state to drop.
        return None

    @boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.fs.getattr(inode))

    @boundary
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return self.fs.readlink(inode)

    @boundary
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        entries = self.fs.listdir(inode)
        fh = next(self._next_dir_handle)
        self._dir_handles[fh] = entries
        return fh

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dir_handles.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for index in range(start_id, len(entries)):
            entry = entries[index]
            attr = entry_attributes(self.fs.getattr(entry.ino))
            if not pyfuse3.readdir_reply(token, entry.name, attr, index + 1):
                break

    @boundary
    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        return self.fs.getxattr(inode, name)

    @boundary
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return self.fs.listxattr(inode)

    @boundary
    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        self.fs.getattr(inode)
        if mode & 0o2:  # W_OK
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    @boundary
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        info = self.fs.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = info["bsize"]
        st.f_frsize = info["bsize"]
        st.f_blocks = info["blocks"]
        st.f_bfree = 0
        st.f_bavail = 0
        st.f_files = info["files"]
        st.f_ffree = 0
        st.f_favail = 0
        st.f_namemax = info["namemax"]
        return st

    # -------------------------------------------------------------- data

    @boundary
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        self.fs.getattr(inode)
        if self._on_use is not None:
            self._on_use("open", inode)
        # The file handle is the inode: reads need nothing else. keep_cache keeps pages
        # across opens, which is correct because the content never changes. (Answering
        # ENOSYS, which would spare the kernel OPEN and RELEASE, is not possible: the kernel
        # then opens with file handle 0, and pyfuse3 passes reads only the file handle.)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        pusher = self.device_pages
        window = 0 if pusher is None or size >= pusher.store_below else pusher.window
        stop = None if pusher is None else self.fs.device_window_end(fh, off, size, window)
        if pusher is not None and stop is not None:
            # One read of the cell for both: what was asked, and what follows it.
            data = await self.fs.read(fh, off, stop - off)
            data, following = data[:size], data[size:]
            await pusher.read_answered(fh, off, len(data), following)
        else:
            data = await self.fs.read(fh, off, size)
        if self._on_read is not None:
            self._on_read(fh, off, len(data))
        return data

    @boundary
    async def release(self, fh: int) -> None:
        return None

    @boundary
    async def flush(self, fh: int) -> None:
        # Nothing is ever written: ENOSYS stops the kernel sending FLUSH on every close(2).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # -------------------------------------------------------------- writes: EROFS

    setattr = _read_only()
    mknod = _read_only()
    mkdir = _read_only()
    unlink = _read_only()
    rmdir = _read_only()
    symlink = _read_only()
    rename = _read_only()
    link = _read_only()
    write = _read_only()
    create = _read_only()
    setxattr = _read_only()
    removexattr = _read_only()
