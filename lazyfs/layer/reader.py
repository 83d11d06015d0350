"""Reading a lazyfs layer: locate and verify its sections, map file ranges onto chunks.

Trust chain: the layer index (from the descriptor annotations, verified through the manifest,
or from the footer of a bare blob, which is then trusted) gives the sha256 of the stored
metadata; the metadata's chunk device tag carries the sha256 of the chunk table; the table
carries each chunk's xxh3-128. Layer.load() checks the first two links; fetchers check the
last (lazyfs.layer.chunks.decode_chunk) before any byte is served.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import BinaryIO, NamedTuple

from lazyfs.erofs.errors import ErofsError
from lazyfs.erofs.reader import Image
from lazyfs.layer.chunks import ChunkCorrupt, ChunkRef, decode_chunk
from lazyfs.layer import format as fmt
from lazyfs.layer.annotations import from_annotations
from lazyfs.layer.errors import LayerFormatError

CHUNK_DEVICE_ID = 1

__all__ = [
    "Layer", "Piece", "locate", "from_annotations", "read_index", "open_blob_file",
    "materialise_chunk_device",
]


class Piece(NamedTuple):
    """A run of a file's bytes [file_offset, file_offset+length).

    chunk is the chunk number holding them (offset = position inside that chunk); chunk None
    with in_meta False is a hole (zeros); in_meta True means the bytes are in the metadata
    image at byte offset ``offset`` (inline or plain data, read with Image.read).
    """

    file_offset: int
    length: int
    chunk: int | None
    offset: int
    in_meta: bool = False


def locate(read_range: Callable[[int, int], bytes], blob_size: int) -> fmt.LayerIndex:
    """The layer index from the footer at the end of a blob (read_range(offset, length))."""
    if blob_size < fmt.FOOTER_FRAME_SIZE:
        raise LayerFormatError(f"blob of {blob_size} bytes is too small to be a lazyfs layer")
    tail = read_range(blob_size - fmt.FOOTER_FRAME_SIZE, fmt.FOOTER_FRAME_SIZE)
    return fmt.decode_footer(bytes(tail), blob_size)


def read_index(
    read_range: Callable[[int, int], bytes], blob_size: int, annotations: Mapping[str, str] | None = None
) -> tuple[fmt.LayerIndex, bool]:
    """(index, trusted_footer): from the annotations if they have one, else from the footer."""
    if annotations and any(k.startswith("containerd.io/snapshot/lazyfs.") for k in annotations):
        return from_annotations(annotations, blob_size), False
    return locate(read_range, blob_size), True


class Layer:
    """A verified layer: its EROFS image and chunk table."""

    def __init__(self, image: Image, table: fmt.ChunkTable, *, trusted_footer: bool = False,
                 table_sha256: bytes | None = None):
        self.image = image
        self.table = table
        self.chunk_size = table.chunk_size
        self.trusted_footer = trusted_footer
        if table_sha256 is None:
            table_sha256 = hashlib.sha256(table.encode()).digest()
        tag = fmt.table_device_tag(table_sha256)
        devices = image.devices
        if len(devices) != 1 or devices[0].tag != tag:
            raise LayerFormatError("the metadata's chunk device tag does not match the chunk table")
        if devices[0].blocks * image.block_size != len(table) * self.chunk_size:
            raise LayerFormatError(
                f"chunk device of {devices[0].blocks} blocks does not match {len(table)} chunks"
            )

    @classmethod
    def load(
        cls, index: fmt.LayerIndex, meta_stored: bytes, table_stored: bytes, *, trusted_footer: bool = False
    ) -> Layer:
        """Verify the stored metadata and table against index and open them."""
        meta = index.meta.open("meta", meta_stored)
        table_bytes = index.table.open("table", table_stored)
        return cls.from_verified(meta, table_bytes, index.chunk_size, trusted_footer=trusted_footer,
                                 data_limit=index.data_limit)

    @classmethod
    def from_verified(
        cls, meta: bytes | memoryview | Image, table_bytes: bytes, chunk_size: int | None = None,
        *, trusted_footer: bool = False, data_limit: int | None = None,
    ) -> Layer:
        """From metadata already verified (e.g. cached by digest) and the raw table bytes.

        The table is verified here against the tag the metadata carries.
        """
        try:
            image = meta if isinstance(meta, Image) else Image(meta)
        except ErofsError as e:
            raise LayerFormatError(f"layer metadata is not a valid EROFS image: {e}") from None
        table = fmt.ChunkTable.decode(table_bytes, chunk_size, data_limit)
        return cls(image, table, trusted_footer=trusted_footer, table_sha256=hashlib.sha256(table_bytes).digest())

    @property
    def chunk_count(self) -> int:
        return len(self.table)

    @property
    def device_size(self) -> int:
        """Bytes of the chunk device (chunk n at [n*chunk_size, (n+1)*chunk_size))."""
        return len(self.table) * self.chunk_size

    def chunk_ref(self, n: int) -> ChunkRef:
        e = self.table[n]
        return ChunkRef(e.offset, e.stored_length, e.length, e.digest, "zstd")

    def chunks_for(self, nid: int, offset: int, length: int) -> list[Piece]:
        """The pieces of bytes [offset, offset+length) of file nid, clipped to its size."""
        try:
            extents = self.image.map(nid, offset, length)
        except ErofsError as e:
            raise LayerFormatError(f"cannot map nid {nid}: {e}") from None
        pieces: list[Piece] = []
        cs = self.chunk_size
        for ext in extents:
            if ext.device_id is None:
                pieces.append(Piece(ext.file_offset, ext.length, None, 0))
            elif ext.device_id == 0:
                pieces.append(Piece(ext.file_offset, ext.length, None, ext.device_offset, True))
            elif ext.device_id == CHUNK_DEVICE_ID:
                pos, file_pos, left = ext.device_offset, ext.file_offset, ext.length
                while left:
                    n, within = divmod(pos, cs)
                    take = min(left, cs - within)
                    if n >= len(self.table) or within + take > self.table[n].length:
                        raise LayerFormatError(f"nid {nid}: range at {pos}+{take} is beyond chunk {n}")
                    pieces.append(Piece(file_pos, take, n, within))
                    pos, file_pos, left = pos + take, file_pos + take, left - take
            else:
                raise LayerFormatError(f"nid {nid}: data on unknown device {ext.device_id}")
        return pieces

    def read(self, nid: int, offset: int, size: int, chunk: Callable[[int], bytes]) -> bytes:
        """File bytes, getting whole decoded chunks from chunk(n). For tools and tests."""
        parts = []
        for p in self.chunks_for(nid, offset, size):
            if p.in_meta:
                parts.append(self.image.read(nid, p.file_offset, p.length))
            elif p.chunk is None:
                parts.append(bytes(p.length))
            else:
                parts.append(chunk(p.chunk)[p.offset : p.offset + p.length])
        return b"".join(parts)

    def close(self) -> None:
        self.image.close()


def _file_reader(f: BinaryIO) -> Callable[[int, int], bytes]:
    def read_range(offset: int, length: int) -> bytes:
        data = os.pread(f.fileno(), length, offset)
        if len(data) != length:
            raise LayerFormatError(f"blob is truncated: wanted {length} bytes at {offset}")
        return data

    return read_range


def open_blob_file(f: BinaryIO, annotations: Mapping[str, str] | None = None) -> Layer:
    """A Layer from a whole blob in a local file (annotations if given, else the trusted footer)."""
    size = os.fstat(f.fileno()).st_size
    read_range = _file_reader(f)
    index, trusted = read_index(read_range, size, annotations)
    meta = read_range(index.meta.offset, index.meta.stored_size)
    table = read_range(index.table.offset, index.table.stored_size)
    return Layer.load(index, meta, table, trusted_footer=trusted)


def read_chunk(f: BinaryIO, layer: Layer, n: int) -> bytes:
    """Chunk n of a local blob, decoded and verified."""
    ref = layer.chunk_ref(n)
    try:
        return decode_chunk(ref, _file_reader(f)(ref.offset, ref.stored_length))
    except ChunkCorrupt as e:
        raise LayerFormatError(f"chunk {n}: {e}") from None


def materialise_chunk_device(f: BinaryIO, layer: Layer, out_path: str | os.PathLike) -> int:
    """Write the chunk device as a sparse file (chunk n at n*chunk_size); returns its size."""
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, layer.device_size)
        for n in range(layer.chunk_count):
            os.pwrite(fd, read_chunk(f, layer, n), n * layer.chunk_size)
    finally:
        os.close(fd)
    return layer.device_size
