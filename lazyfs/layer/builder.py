"""Stream an OCI layer tar (gzip, zstd or plain) into a lazyfs layer blob with bounded memory.

The input is read once, sequentially (lazyfs.layer.tarstream). The output tar is the input
tar byte for byte, except that sparse members are written expanded; its bytes go out as zstd
frames (lazyfs.layer.frames) of two kinds:

* *stream frames*: tar headers, padding, the end-of-archive blocks, and the content of files
  stored in the metadata (at or below the inline threshold) and of all-zero chunks, grouped up
  to STREAM_FRAME_TARGET bytes. Nobody fetches these by range, so grouping them only helps
  compression.
* *chunk frames*: one per chunk of every larger regular file, exactly the chunk's bytes, so a
  chunk is one Range request and one independent decompression.

Chunk compression runs on a thread pool (zstandard releases the GIL); frames are written in
order by one writer thread behind a bounded queue, so memory stays at a few chunks whatever
the layer size. After the tar come the metadata (EROFS, zstd-compressed), the chunk table and the
footer as skippable frames (lazyfs.layer.format).

With a trace (``trace=``), the layer is written in the trace-ordered layout instead
(lazyfs.layer.layout): the decompressed input is spooled to a temporary file, listed, and its
members are copied out by offset with the traced files first, so their chunks are contiguous
at the start of the blob. That tar has a new diff_id; without a trace nothing is spooled and
the tar is kept byte for byte.

Dedup inside a layer: the tar stream must still decompress to every byte of every file, so a
repeated chunk is written again; its chunk-table entry points at the first copy's frame, so it
is fetched and cached once and its own frame is never read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import os
import stat
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from lazyfs.erofs.writer import Builder as ErofsBuilder
from lazyfs.erofs.writer import ChunkedData
from lazyfs.layer import format as fmt
from lazyfs.layer import layout
from lazyfs.layer.annotations import to_annotations
from lazyfs.layer.errors import BuildCancelled, LayerFormatError, UnsafeTarEntry
from lazyfs.layer.frames import FrameWriter
from lazyfs.layer import tarparse
from lazyfs.layer.tarparse import Member, SparseExpander, TarHeaderError, TarReader
from lazyfs.layer.tarstream import STREAM_ERRORS, ReadAhead, Tap, open_tar_stream
from lazyfs.layer.tree import OVERLAY_XATTR_PREFIX, Node, Tree
from lazyfs.trace.format import Trace, TraceError

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
STREAM_FRAME_TARGET = 1 << 20
SPOOL_PIECE = 1 << 20
DEFAULT_LEVEL = 3
META_LEVEL = 9
_TAR_BLOCK = 512
_XATTR_NAME_PREFIXES = (b"user.", b"trusted.", b"security.")
_XATTR_WHOLE_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_XATTR_VALUE_MAX = 0xFFFF
_SCHILY_XATTR = b"SCHILY.xattr."
# Limits on what one layer may make the converter hold (see docs/design.md, "Tar forms").
# containerd creates each path under its snapshot directory, so a name longer than PATH_MAX
# less that directory's length, or a component over NAME_MAX, fails there (ENAMETOOLONG).
MAX_NAME_BYTES = 3072
MAX_COMPONENT_BYTES = 255
MAX_ENTRIES = 1 << 21  # tar entries
MAX_NODES = 1 << 21  # files and directories (implicit ones included) in the layer's tree
MAX_TREE_BYTES = 256 << 20  # names, link targets and xattrs held for the metadata
MAX_PATH_BYTES = 512 << 20  # the full paths of all nodes (the metadata writer keys by path)
_UID_MAX = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to chown


@dataclasses.dataclass
class LayerStats:
    files: int = 0  # regular files (hard links not counted twice)
    entries: int = 0  # tar members read
    chunks: int = 0  # chunk-table entries
    unique_chunks: int = 0  # distinct frames the table points at
    dedup_bytes: int = 0  # uncompressed bytes served by another chunk's frame
    hole_bytes: int = 0  # all-zero chunks stored as holes
    inline_bytes: int = 0  # file content held in the metadata
    ordered_files: int = 0  # files moved to the front by the trace-ordered layout


@dataclasses.dataclass
class BuildResult:
    digest: str  # "sha256:..." of the blob: the descriptor digest
    size: int  # blob bytes
    diff_id: str  # "sha256:..." of the uncompressed tar
    tar_size: int
    source_diff_id: str  # "sha256:..." of the input's uncompressed tar (to check against the config)
    input_format: str  # "gzip", "zstd" or "tar"
    index: fmt.LayerIndex
    stats: LayerStats

    @property
    def annotations(self) -> dict[str, str]:
        return to_annotations(self.index)


class LayerBuilder:
    """One conversion: feed it a tar stream with build(), get the blob written to out."""

    def __init__(
        self,
        out: BinaryIO,
        *,
        chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
        inline_threshold: int = fmt.DEFAULT_INLINE_THRESHOLD,
        level: int = DEFAULT_LEVEL,
        threads: int | None = None,
        trace: bytes | None = None,
        order: bool = True,
        spool_dir: str | os.PathLike | None = None,
        cancel: threading.Event | None = None,
    ):
        fmt.check_chunk_size(chunk_size)
        if not 0 <= inline_threshold <= BLOCK_SIZE:
            raise LayerFormatError(f"inline threshold {inline_threshold} must be in [0, {BLOCK_SIZE}]")
        self.out = out
        self.chunk_size = chunk_size
        self.inline_threshold = inline_threshold
        self.level = level
        self.threads = threads or os.cpu_count() or 1
        self.trace = trace
        # With a trace (and order), the layer is written in the trace-ordered layout (traced
        # files first), which needs the input spooled to a temporary file in spool_dir.
        self._traced = None if trace is None or not order else layout.traced_paths(_trace_paths(trace))
        self.spool_dir = spool_dir
        self.ordered_chunks = 0
        self.tree = Tree()
        self.stats = LayerStats()
        self._tar_size = 0
        self._stream = bytearray()
        self._entries: list[fmt.ChunkEntry | None] = []
        self._first_chunk: dict[bytes, int] = {}
        self._zero = bytes(chunk_size)
        self._frames: FrameWriter | None = None
        self._tree_bytes = 0
        self._cancel = cancel

    def _check(self) -> None:
        """Stop between two pieces of work (a chunk, a member, a MiB) once cancel is set."""
        if self._cancel is not None and self._cancel.is_set():
            raise BuildCancelled("conversion cancelled")

    # -- tar bytes ---------------------------------------------------------------------

    def _emit_stream(self, data: bytes) -> None:
        self._tar_size += len(data)
        self._stream += data
        if len(self._stream) >= STREAM_FRAME_TARGET:
            self._flush_stream()

    def _flush_stream(self) -> None:
        if self._stream:
            self._frames.frame(bytes(self._stream))
            self._stream = bytearray()

    def _emit_chunk(self, data: bytes) -> int | None:
        """Write one chunk of file content; its chunk number, or None for a hole."""
        zero = self._zero if len(data) == self.chunk_size else bytes(len(data))
        if data == zero:
            self.stats.hole_bytes += len(data)
            self._emit_stream(data)
            return None
        self._flush_stream()
        self._tar_size += len(data)
        n = len(self._entries)
        self._entries.append(None)
        self._frames.frame(data, functools.partial(self._chunk_written, n, len(data)))
        return n

    def _chunk_written(self, n: int, length: int, offset: int, stored: int, digest: bytes, key: bytes) -> None:
        """On the writer thread, in blob order: table entry n, sharing an earlier copy's frame.

        Dedup is keyed by sha256: xxh3 is not collision-resistant, and a crafted collision must
        not make two different chunks share one frame.
        """
        first = self._first_chunk.get(key)
        if first is None:
            self._first_chunk[key] = n
            self._entries[n] = fmt.ChunkEntry(offset, stored, length, digest)
        else:
            self._entries[n] = self._entries[first]
            self.stats.dedup_bytes += length

    # -- members -----------------------------------------------------------------------

    def build(self, src: BinaryIO, progress: Callable[[int], None] | None = None) -> BuildResult:
        """Read the whole layer from src and write the blob. Closes nothing."""
        decompressed, kind = open_tar_stream(src, progress)
        max_pending_bytes = max(16 << 20, (self.threads + 1) * self.chunk_size)
        with concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="lazyfs-zstd") as pool, \
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lazyfs-write") as serial:
            self._frames = frames = FrameWriter(self.out, pool, serial, self.level, max_pending_bytes)
            stream = ReadAhead(decompressed)
            try:
                if self._traced is None:
                    self._stream_members(stream, kind)
                else:
                    self._ordered_members(stream, kind)
                self._flush_stream()
                frames.drain()
                return self._finish(kind, "sha256:" + stream.sha256.hexdigest())
            finally:
                frames.cancel()
                stream.close()

    def _stream_members(self, stream: BinaryIO, kind: str) -> None:
        """The input tar byte for byte, read once, sequentially."""
        self._tap = tap = Tap(stream, self._emit_stream)
        reader = TarReader(io.BufferedReader(tap, 64 << 10), check=self._check)
        try:
            while (member := reader.next()) is not None:
                self._count(member)
                self._member(reader, member)
            while tap.read(1 << 20):  # the end-of-archive blocks and any padding after them
                self._check()
        except TarHeaderError as e:
            raise LayerFormatError(f"cannot read the layer tar ({kind}): {e}") from None
        except STREAM_ERRORS as e:
            raise LayerFormatError(f"cannot read the layer tar ({kind}): {e}") from None
        self._emit_stream(tap.take_all())

    def _count(self, m: Member) -> None:
        self.stats.entries += 1
        if self.stats.entries > MAX_ENTRIES:
            raise LayerFormatError(f"layer has more than {MAX_ENTRIES} tar entries")

    def _member(self, reader: TarReader, m: Member) -> None:
        # Everything before this member's header blocks goes out as it came in.
        self._emit_stream(self._tap.take(m.offset))
        node = self._add_node(m)
        if node is None:
            return
        where = m.where
        if m.sparse is not None:
            node.data = self._sparse(reader, m, where)
        elif m.size <= self.inline_threshold:
            node.data = self._small(reader.read, m, where)
        else:
            self._emit_stream(self._tap.take(m.offset_data))
            node.data = self._chunked(reader, m, where)

    def _add_node(self, m: Member) -> Node | None:
        """Add the member to the tree as containerd's applier would; the node whose content the
        caller must read, if any."""
        where = m.where
        name = self._checked_name(m.name, where)
        if m.type == tarparse.XGLTYPE:
            # containerd ignores a global header's records but still applies its name: the
            # path is removed (or, for a whiteout name, whited out) and its parents created.
            self.tree.discard(name, where)
            self._tree_bounded()
            return None
        if not 0 <= m.uid <= _UID_MAX or not 0 <= m.gid <= _UID_MAX:
            raise UnsafeTarEntry(where, f"owner {m.uid}:{m.gid} out of range")
        node = Node(mode=m.mode & 0o7777, uid=m.uid, gid=m.gid, xattrs=self._xattrs(m, where))
        node.mtime, node.mtime_nsec = (m.mtime, m.mtime_nsec) if m.mtime >= 0 else (0, 0)
        if m.type == tarparse.REGTYPE:
            node.mode |= stat.S_IFREG
        elif m.type == tarparse.DIRTYPE:
            node.mode |= stat.S_IFDIR
        elif m.type == tarparse.SYMTYPE:
            node.mode = stat.S_IFLNK | 0o777  # what symlink(2) makes, whatever the header says
            node.link_target = m.linkname
            if not 0 < len(node.link_target) < 4096:
                raise UnsafeTarEntry(where, "symlink target is empty or longer than 4095 bytes")
            self._hold(len(m.linkname))
        elif m.type == tarparse.LNKTYPE:
            target = self.tree.lookup_link_target(self._checked_name(m.linkname, where), where)
            # containerd applies the link's own header to the inode it now shares (lchown,
            # setxattr, chmod, chtimes), so the last link's owner, mode and times win.
            target.uid, target.gid = node.uid, node.gid
            target.mtime, target.mtime_nsec = node.mtime, node.mtime_nsec
            target.xattrs = {**target.xattrs, **node.xattrs}
            if not stat.S_ISLNK(target.mode):
                target.mode = stat.S_IFMT(target.mode) | node.mode
            self.tree.add(name, target, where)
            self._tree_bounded()
            return None
        elif m.type in (tarparse.CHRTYPE, tarparse.BLKTYPE):
            node.mode |= stat.S_IFCHR if m.type == tarparse.CHRTYPE else stat.S_IFBLK
            if not (0 <= m.devmajor < 1 << 12 and 0 <= m.devminor < 1 << 20):
                raise UnsafeTarEntry(where, f"device number {m.devmajor}:{m.devminor} out of range")
            node.rdev = (m.devmajor, m.devminor)
        elif m.type == tarparse.FIFOTYPE:
            node.mode |= stat.S_IFIFO
        else:
            kind = {tarparse.CONTTYPE: "contiguous file"}.get(m.type, "entry")
            raise UnsafeTarEntry(where, f"unsupported tar {kind} type {m.type.decode('latin-1')!r} "
                                        "(containerd refuses it too)")
        self.tree.add(name, node, where)
        self._tree_bounded()
        if m.type != tarparse.REGTYPE:
            return None
        self.stats.files += 1
        return node

    def _checked_name(self, name: bytes, where: str) -> bytes:
        check_name(name, where)
        self._hold(len(name))
        return name

    def _tree_bounded(self) -> None:
        if self.tree.nodes > MAX_NODES or self.tree.path_bytes > MAX_PATH_BYTES:
            raise LayerFormatError(f"layer tree too large (over {MAX_NODES} files and directories "
                                   f"or {MAX_PATH_BYTES >> 20} MiB of paths)")

    def _hold(self, n: int) -> None:
        self._tree_bytes += n
        if self._tree_bytes > MAX_TREE_BYTES:
            raise LayerFormatError(f"layer names and xattrs exceed {MAX_TREE_BYTES >> 20} MiB")

    def _xattrs(self, m: Member, where: str) -> dict[bytes, bytes]:
        """Extended attributes from PAX SCHILY.xattr.* records (the only ones containerd applies)."""
        out: dict[bytes, bytes] = {}
        for key, raw in m.pax.items():
            if not key.startswith(_SCHILY_XATTR):
                continue
            name = key[len(_SCHILY_XATTR):]
            if name.startswith(OVERLAY_XATTR_PREFIX):
                log.debug("%s: dropping overlayfs xattr %r from the tar", where, name)
                continue
            supported = name in _XATTR_WHOLE_NAMES or any(
                name.startswith(p) and len(name) > len(p) for p in _XATTR_NAME_PREFIXES
            )
            if not supported or len(raw) > _XATTR_VALUE_MAX or len(name) > 255:
                log.debug("%s: dropping xattr %r (not storable in EROFS)", where, name)
                continue
            self._hold(len(name) + len(raw))
            out[name] = raw
        return out

    def _sparse(self, reader: TarReader, m: Member, where: str) -> bytes | ChunkedData:
        """A sparse member is written expanded, as a regular file with a new PAX header; all-zero
        chunks become holes of the EROFS file. (The only case where the output tar differs.)"""
        self._tap.skip(m.end)
        self._sparse_header(m)
        if m.size <= self.inline_threshold:
            data = self._small(reader.read, m, where)
            self._emit_stream(data)
        else:
            data = self._cut(reader.read, m.size, where)
        self._tap.skip(m.end)
        pad = -m.size % _TAR_BLOCK
        if pad:
            self._emit_stream(bytes(pad))
        return data

    def _sparse_header(self, m: Member) -> None:
        h = tarfile.TarInfo(m.name.decode("utf-8", "surrogateescape"))
        h.type, h.size, h.mode, h.uid, h.gid = tarfile.REGTYPE, m.size, m.mode & 0o7777, m.uid, m.gid
        h.mtime = max(0, m.mtime)
        h.uname = m.uname.decode("utf-8", "surrogateescape")
        h.gname = m.gname.decode("utf-8", "surrogateescape")
        # Keep every record but the sparse ones (the PAX mtime verbatim, with its nanoseconds).
        h.pax_headers = {
            k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in m.pax.items() if not k.startswith(b"GNU.sparse.") and k not in (b"size", b"path")
        }
        try:
            header = h.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        except (ValueError, UnicodeError) as e:
            raise UnsafeTarEntry(m.where, f"cannot be re-encoded as a PAX header: {e}") from None
        self._emit_stream(header)

    def _small(self, read: Callable[[int], bytes], m: Member, where: str) -> bytes:
        """Content kept in the metadata; its tar bytes stay in the tap (stream frames)."""
        data = read(m.size)
        if len(data) != m.size:
            raise LayerFormatError(f"tar entry {where!r} is truncated")
        self.stats.inline_bytes += len(data)
        return data

    def _chunked(self, reader: TarReader, m: Member, where: str) -> ChunkedData:
        """Content cut into chunk frames (read chunk by chunk, never whole)."""
        self._tap.hold = True
        try:
            return self._cut(reader.read, m.size, where, lambda done: self._tap.skip(m.offset_data + done))
        finally:
            self._tap.hold = False

    def _cut(self, read: Callable[[int], bytes], size: int, where: str,
             after: Callable[[int], None] | None = None) -> ChunkedData:
        """Cut size bytes from read() into chunks; after(bytes done) runs before each is emitted."""
        chunks: list[int | None] = []
        done = 0
        while done < size:
            self._check()
            want = min(self.chunk_size, size - done)
            data = read(want)
            if len(data) != want:
                raise LayerFormatError(f"tar entry {where!r} is truncated")
            done += want
            if after is not None:
                after(done)
            chunks.append(self._emit_chunk(data))
        return ChunkedData(size=size, chunks=chunks)

    # -- the trace-ordered path: spool, plan, write members by offset ---------------------

    def _ordered_members(self, stream: BinaryIO, kind: str) -> None:
        """Write the members in the trace-ordered layout (lazyfs.layer.layout).

        The input is spooled (decompressed) to a temporary file, listed by a random-access tar
        reader, and its members are copied out by offset in the planned order, so memory stays
        bounded whatever the layer size.
        """
        with tempfile.TemporaryFile(prefix="lazyfs-spool-", dir=self.spool_dir) as spool:
            self._spool(stream, spool, kind)
            spool.seek(0)
            fd = spool.fileno()
            size = os.fstat(fd).st_size
            reader = TarReader(io.BufferedReader(io.FileIO(fd, closefd=False), 64 << 10), seekable_size=size,
                                check=self._check)
            members = []
            try:
                while (info := reader.next()) is not None:
                    self._count(info)
                    check_name(info.name, info.where)  # before the plan splits names
                    if info.islnk():
                        check_name(info.linkname, info.where)
                    members.append(layout.Member(info, info.offset, info.end))
            except TarHeaderError as e:
                raise LayerFormatError(f"cannot read the layer tar ({kind}): {e}") from None
            trailer = reader.entries_end
            self.stats.entries = 0
            plan = layout.plan(members, self._traced, self.inline_threshold)
            moved = set(plan.moved)
            self._emit_span(fd, 0, members[0].start if members else trailer)
            for step in plan.steps:
                self._check()
                member = members[step.member]
                self.stats.entries += 1
                if step.copy:
                    self._emit_span(fd, member.start, member.end)
                    self._add_node(member.info)
                    continue
                try:
                    self._spooled_member(fd, member)
                except TarHeaderError as e:
                    raise LayerFormatError(f"cannot read the layer tar ({kind}): {e}") from None
                if step.member in moved:
                    self.ordered_chunks = len(self._entries)
            self._emit_span(fd, trailer, size)
            self.stats.ordered_files = len(plan.moved)

    def _spool(self, stream: BinaryIO, spool: BinaryIO, kind: str) -> None:
        while True:
            self._check()
            try:
                piece = stream.read(SPOOL_PIECE)
            except STREAM_ERRORS as e:
                raise LayerFormatError(f"cannot read the layer tar ({kind}): {e}") from None
            if not piece:
                break
            spool.write(piece)
        spool.flush()

    def _emit_span(self, fd: int, start: int, end: int) -> None:
        """Input bytes [start, end) of the spool, as stream bytes, piece by piece."""
        while start < end:
            self._check()
            data = os.pread(fd, min(SPOOL_PIECE, end - start), start)
            if not data:
                raise LayerFormatError(f"tar stream ended before offset {end}")
            self._emit_stream(data)
            start += len(data)

    def _spooled_member(self, fd: int, member: layout.Member) -> None:
        m = member.info
        node = self._add_node(m)
        where = m.where
        if node is None:
            self._emit_span(fd, member.start, member.end)
            return
        position = m.offset_data

        def read(n: int) -> bytes:
            nonlocal position
            data = os.pread(fd, n, position)
            position += len(data)
            return data

        if m.sparse is not None:
            self._sparse_header(m)
            expanded = SparseExpander(read, m.sparse, m.size).read
            if m.size <= self.inline_threshold:
                node.data = self._small(expanded, m, where)
                self._emit_stream(node.data)
            else:
                node.data = self._cut(expanded, m.size, where)
            self._emit_stream(bytes(-m.size % _TAR_BLOCK))
        elif m.size <= self.inline_threshold:
            node.data = self._small(read, m, where)
            self._emit_span(fd, member.start, member.end)
        else:
            self._emit_span(fd, member.start, m.offset_data)
            node.data = self._cut(read, m.size, where)
            self._emit_span(fd, m.offset_data + m.size, member.end)

    # -- sections ------------------------------------------------------------------------

    def _finish(self, kind: str, source_diff_id: str) -> BuildResult:
        frames = self._frames
        data_end = frames.position
        entries = [e for e in self._entries if e is not None]
        if len(entries) != len(self._entries):
            raise RuntimeError("a chunk frame was never written")
        table = fmt.ChunkTable(self.chunk_size, data_end, entries).encode()
        table_sha = hashlib.sha256(table).digest()

        device_blocks = len(entries) * (self.chunk_size // BLOCK_SIZE)
        if device_blocks >= 1 << 32:
            raise LayerFormatError("layer too large: chunk device exceeds 2**32 blocks")
        erofs = ErofsBuilder(
            block_size=BLOCK_SIZE, chunk_size=self.chunk_size, inline_threshold=self.inline_threshold,
            device_blocks=device_blocks, device_tag=fmt.table_device_tag(table_sha),
        )
        try:
            for entry in self.tree.entries():
                self._check()
                erofs.add(entry)
            meta_buf = io.BytesIO()
            erofs.write(meta_buf)
        except ValueError as e:
            raise LayerFormatError(f"cannot build the layer metadata: {e}") from None
        meta = meta_buf.getvalue()
        meta_stored = zstandard.ZstdCompressor(level=META_LEVEL, threads=-1).compress(meta)

        meta_offset = frames.raw(fmt.skippable_frame(meta_stored)) + fmt.SKIPPABLE_HEADER.size
        table_offset = frames.raw(fmt.skippable_frame(table)) + fmt.SKIPPABLE_HEADER.size
        trace = None
        if self.trace:
            trace_stored = zstandard.ZstdCompressor(level=META_LEVEL).compress(self.trace)
            trace_offset = frames.raw(fmt.skippable_frame(trace_stored)) + fmt.SKIPPABLE_HEADER.size
            trace = fmt.make_section(trace_offset, trace_stored, fmt.COMPRESSION_ZSTD, len(self.trace))
        index = fmt.LayerIndex(
            version=fmt.FORMAT_VERSION,
            chunk_size=self.chunk_size,
            meta=fmt.make_section(meta_offset, meta_stored, fmt.COMPRESSION_ZSTD, len(meta)),
            table=fmt.make_section(table_offset, table, fmt.COMPRESSION_NONE, len(table)),
            trace=trace,
            trace_ordered=self.stats.ordered_files > 0,
            ordered_chunks=self.ordered_chunks,
        )
        frames.raw(fmt.encode_footer(index))
        self.stats.chunks = len(entries)
        self.stats.unique_chunks = len(self._first_chunk)
        result = BuildResult(
            digest="sha256:" + frames.sha256.hexdigest(),
            size=frames.position,
            diff_id="sha256:" + frames.tar_sha256.hexdigest(),
            tar_size=self._tar_size,
            source_diff_id=source_diff_id,
            input_format=kind,
            index=index,
            stats=self.stats,
        )
        log.info(
            "layer %s: %d entries, %d chunks (%d unique), tar %d bytes -> blob %d bytes",
            result.digest, self.stats.entries, self.stats.chunks, self.stats.unique_chunks,
            self._tar_size, result.size,
        )
        return result


def build_layer(
    src: BinaryIO,
    out: BinaryIO,
    *,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    inline_threshold: int = fmt.DEFAULT_INLINE_THRESHOLD,
    level: int = DEFAULT_LEVEL,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    trace: bytes | None = None,
    order: bool = True,
    spool_dir: str | os.PathLike | None = None,
    cancel: threading.Event | None = None,
) -> BuildResult:
    """Convert one layer tar (gzip/zstd/plain, sniffed) read from src into a lazyfs blob on out.

    trace, if given (lazyfs.trace.format format, checked by the caller), is embedded as the trace
    section and the tar is written in the trace-ordered layout, spooling the decompressed
    input to a temporary file in spool_dir (default: the system's temporary directory).
    Without a trace, or with order=False (the trace is only embedded), the output tar is the
    input byte for byte. Setting cancel stops the build (BuildCancelled) within a chunk's work.
    """
    builder = LayerBuilder(
        out, chunk_size=chunk_size, inline_threshold=inline_threshold, level=level, threads=threads,
        trace=trace, order=order, spool_dir=spool_dir, cancel=cancel,
    )
    with _short_gil_switch_interval():
        return builder.build(src, progress)


@contextlib.contextmanager
def _short_gil_switch_interval(seconds: float = 0.0005):
    """Hand the GIL over sooner while converting.

    The main thread parses the tar in Python while worker threads inflate, compress and hash
    in C with the GIL released; with the default 5 ms interval a worker coming back from C
    waits for the parser to give the GIL up, and the stages run one after another instead of
    side by side (measured: 46.5 -> 57 MiB/s from a gzip layer, tools/bench_convert.py).
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def check_name(name: bytes, where: str) -> None:
    """Refuse a name containerd could not create (ENAMETOOLONG under its snapshot directory)."""
    if len(name) > MAX_NAME_BYTES:
        raise UnsafeTarEntry(where[:80] + "...", f"file name too long ({len(name)} bytes, limit {MAX_NAME_BYTES})")
    if any(len(part) > MAX_COMPONENT_BYTES for part in name.split(b"/")):
        raise UnsafeTarEntry(where, f"file name too long (a component over {MAX_COMPONENT_BYTES} bytes)")


def _trace_paths(trace: bytes) -> list[str]:
    """The paths a trace names, in first-access order (a malformed trace is a format error)."""
    try:
        return [access.path for access in Trace.decode(trace).accesses]
    except TraceError as e:
        raise LayerFormatError(f"embedded trace: {e}") from None
