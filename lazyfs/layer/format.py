"""The bytes of a lazyfs layer blob (format version 1), as docs/parts/layer-format.md describes.

A blob is a valid ``tar+zstd`` stream: zstd frames of tar bytes, then zstd *skippable* frames
(ignored by every zstd decoder) holding the sections lazyfs needs:

    [tar frames ...][meta section][table section][trace section?][footer]

Each section frame is ``u32 magic (SECTION_FRAME_MAGIC) | u32 payload length | payload``, all
little-endian. The footer is the last, fixed-size frame; it records the offset (of the payload),
stored length, uncompressed length, compression and sha256 (of the stored bytes) of each section.

This module only encodes and decodes; it performs no I/O. Every decoder raises LayerFormatError
(and only that) for malformed input.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import struct
from collections.abc import Callable

import google_crc32c
import zstandard

from lazyfs.layer.errors import LayerFormatError

FORMAT_VERSION = 1

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 << 20
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_INLINE_THRESHOLD = 4096

# zstd skippable frames use magics 0x184D2A50..0x184D2A5F; lazyfs uses one of them for all its
# sections and tells them apart by position (the footer) and by each payload's own magic.
SKIPPABLE_MAGIC_MIN = 0x184D2A50
SKIPPABLE_MAGIC_MAX = 0x184D2A5F
SECTION_FRAME_MAGIC = 0x184D2A5A
SKIPPABLE_HEADER = struct.Struct("<II")  # magic, payload length

ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"

COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_NONE: "none", COMPRESSION_ZSTD: "zstd"}

# Every section is bounded, so that a hostile size field (or a small zstd frame of zeros that
# honestly decodes to gigabytes) cannot exhaust memory or disk. The metadata holds small files
# inline, hence its larger bound; the table bound is 8 Mi chunks (8 TiB of 1 MiB chunks).
MAX_SECTION_SIZE = 4 << 30  # stored bytes of any section
MAX_DECODED_SIZE = {"meta": 1 << 30, "table": 256 << 20, "trace": 64 << 20}
DECODE_PIECE = 1 << 20  # sections decode in pieces of this size (no frame-sized buffer)

# --- footer -------------------------------------------------------------------------------
FOOTER_MAGIC = b"LZFSFOOT"
# magic 8s, version u16, payload size u16, flags u32, chunk_size u32, ordered_chunks u32
# (ordered_chunks: chunks at the start of the chunk device that belong to the trace-ordered
# files; 0 unless FOOTER_FLAG_TRACE_ORDERED)
FOOTER_HEAD = struct.Struct("<8sHHIII")
# offset u64, stored_size u64, size u64, compression u8, reserved 7 bytes, sha256 32s
SECTION_ENTRY = struct.Struct("<QQQB7x32s")
FOOTER_SECTIONS = ("meta", "table", "trace")
FOOTER_CRC_OFFSET = FOOTER_HEAD.size + len(FOOTER_SECTIONS) * SECTION_ENTRY.size  # 216
FOOTER_PAYLOAD_SIZE = FOOTER_CRC_OFFSET + 8  # crc32c u32 + reserved u32
FOOTER_FRAME_SIZE = SKIPPABLE_HEADER.size + FOOTER_PAYLOAD_SIZE
FOOTER_FLAG_TRACE = 0x1
# The tar is in the trace-ordered layout (traced files first). Informational: reading the blob
# needs nothing from it (the chunk table says where every chunk is). Only with FOOTER_FLAG_TRACE.
FOOTER_FLAG_TRACE_ORDERED = 0x2
FOOTER_FLAGS_KNOWN = FOOTER_FLAG_TRACE | FOOTER_FLAG_TRACE_ORDERED
assert FOOTER_HEAD.size == 24 and SECTION_ENTRY.size == 64
assert FOOTER_PAYLOAD_SIZE == 224 and FOOTER_FRAME_SIZE == 232

# --- chunk table --------------------------------------------------------------------------
TABLE_MAGIC = b"LZFSCTAB"
# magic 8s, version u16, entry size u16, chunk_size u32, count u64, data_end u64
TABLE_HEAD = struct.Struct("<8sHHIQQ")
# offset u64, stored length u32, length u32, xxh3-128 digest 16s (canonical, big-endian)
TABLE_ENTRY = struct.Struct("<QII16s")
assert TABLE_HEAD.size == 32 and TABLE_ENTRY.size == 32


def check_chunk_size(chunk_size: int) -> int:
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise LayerFormatError(
            f"chunk size {chunk_size} is not a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        )
    return chunk_size


def max_frame_size(chunk_size: int) -> int:
    """The largest stored (compressed) frame a chunk of chunk_size bytes may occupy.

    Generous above zstd's compress bound (size + size/256 + a little), which every frame meets.
    """
    return chunk_size + (chunk_size >> 7) + 4096


def table_device_tag(table_sha256: bytes) -> bytes:
    """The chunk device's tag in the metadata's EROFS device table, binding the metadata to its
    chunk table: ``sha256=`` + unpadded base64url of the table payload's sha256 (50 bytes; the
    tag field holds 63)."""
    return b"sha256=" + base64.urlsafe_b64encode(table_sha256).rstrip(b"=")


def skippable_frame(payload: bytes, magic: int = SECTION_FRAME_MAGIC) -> bytes:
    if not SKIPPABLE_MAGIC_MIN <= magic <= SKIPPABLE_MAGIC_MAX:
        raise ValueError(f"{magic:#x} is not a zstd skippable frame magic")
    return SKIPPABLE_HEADER.pack(magic, len(payload)) + payload


@dataclasses.dataclass(frozen=True)
class Section:
    """Where one section's stored bytes are in the blob and how to verify and decode them."""

    offset: int  # of the payload (after the 8-byte skippable frame header)
    stored_size: int
    size: int  # after decompression
    compression: int
    sha256: bytes  # of the stored bytes

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hex()

    def check(self, name: str, blob_size: int | None = None) -> None:
        if self.compression not in COMPRESSION_NAMES:
            raise LayerFormatError(f"{name} section: unknown compression {self.compression}")
        if self.stored_size <= 0 or self.size <= 0:
            raise LayerFormatError(f"{name} section is empty")
        if self.stored_size > MAX_SECTION_SIZE:
            raise LayerFormatError(f"{name} section is too large ({self.stored_size} stored bytes)")
        limit = MAX_DECODED_SIZE.get(name, MAX_SECTION_SIZE)
        if self.size > limit:
            raise LayerFormatError(f"{name} section of {self.size} bytes exceeds the limit of {limit}")
        if self.compression == COMPRESSION_NONE and self.stored_size != self.size:
            raise LayerFormatError(f"{name} section: stored size differs from size but is uncompressed")
        if len(self.sha256) != 32:
            raise LayerFormatError(f"{name} section: digest is not a sha256")
        if self.offset < SKIPPABLE_HEADER.size:
            raise LayerFormatError(f"{name} section: offset {self.offset} is inside the blob header")
        if blob_size is not None and self.offset + self.stored_size > blob_size:
            raise LayerFormatError(
                f"{name} section [{self.offset}, +{self.stored_size}) exceeds the blob ({blob_size} bytes)"
            )

    def open(self, name: str, stored: bytes) -> bytes:
        """Verify the stored bytes of this section and return them decoded."""
        if self.compression == COMPRESSION_NONE:
            self._verify(name, stored)
            return bytes(stored)
        out = bytearray()
        self.open_into(name, stored, out.extend)
        return bytes(out)

    def _verify(self, name: str, stored: bytes) -> None:
        if len(stored) != self.stored_size:
            raise LayerFormatError(f"{name} section: got {len(stored)} bytes, expected {self.stored_size}")
        if hashlib.sha256(stored).digest() != self.sha256:
            raise LayerFormatError(f"{name} section: sha256 mismatch")

    def open_into(self, name: str, stored: bytes, write: Callable[[bytes], object]) -> None:
        """Verify the stored bytes and pass them decoded to write(), a piece at a time.

        Decoding never trusts the zstd frame header: output is produced in DECODE_PIECE pieces
        and stops one byte past the declared size, so memory stays bounded whatever the frame
        claims, and a frame that decodes to more or less than ``size`` is an error.
        """
        self._verify(name, stored)
        if self.compression == COMPRESSION_NONE:
            write(bytes(stored))
            return
        total = 0
        try:
            with zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=True) as reader:
                while total <= self.size:
                    piece = reader.read(min(DECODE_PIECE, self.size + 1 - total))
                    if not piece:
                        break
                    total += len(piece)
                    if total <= self.size:
                        write(piece)
        except zstandard.ZstdError as e:
            raise LayerFormatError(f"{name} section: cannot decompress: {e}") from None
        if total != self.size:
            what = "more than" if total > self.size else f"{total} bytes, expected"
            raise LayerFormatError(f"{name} section: decompressed to {what} {self.size} bytes")


def make_section(offset: int, payload: bytes, compression: int, size: int) -> Section:
    return Section(offset, len(payload), size, compression, hashlib.sha256(payload).digest())


@dataclasses.dataclass(frozen=True)
class LayerIndex:
    """Where a lazyfs layer keeps its sections: what the footer and the annotations both say."""

    version: int
    chunk_size: int
    meta: Section
    table: Section
    trace: Section | None = None
    trace_ordered: bool = False  # the tar is in the trace-ordered layout
    ordered_chunks: int = 0  # chunks 0..ordered_chunks-1 belong to the files written first

    @property
    def data_limit(self) -> int:
        """Where the chunk frames must end: at the first section's frame header."""
        sections = [s for s in (self.meta, self.table, self.trace) if s is not None]
        return min(s.offset for s in sections) - SKIPPABLE_HEADER.size

    def check(self, blob_size: int | None = None) -> None:
        if self.version != FORMAT_VERSION:
            raise LayerFormatError(f"unsupported lazyfs layer format version {self.version}")
        if self.trace_ordered and self.trace is None:
            raise LayerFormatError("a trace-ordered layout without an embedded trace")
        if not 0 <= self.ordered_chunks < 1 << 32 or (self.ordered_chunks and not self.trace_ordered):
            raise LayerFormatError(f"ordered chunk count {self.ordered_chunks} without a trace-ordered layout")
        check_chunk_size(self.chunk_size)
        self.meta.check("meta", blob_size)
        self.table.check("table", blob_size)
        if self.table.compression != COMPRESSION_NONE:
            raise LayerFormatError("table section must be stored uncompressed")
        if self.trace is not None:
            self.trace.check("trace", blob_size)


_ABSENT = SECTION_ENTRY.pack(0, 0, 0, 0, b"\0" * 32)


def encode_footer(index: LayerIndex) -> bytes:
    """The footer frame (FOOTER_FRAME_SIZE bytes) for index."""
    flags = FOOTER_FLAG_TRACE if index.trace is not None else 0
    if index.trace_ordered:
        flags |= FOOTER_FLAG_TRACE_ORDERED
    payload = bytearray(
        FOOTER_HEAD.pack(
            FOOTER_MAGIC, index.version, FOOTER_PAYLOAD_SIZE, flags, index.chunk_size, index.ordered_chunks
        )
    )
    for section in (index.meta, index.table, index.trace):
        if section is None:
            payload += _ABSENT
        else:
            payload += SECTION_ENTRY.pack(
                section.offset, section.stored_size, section.size, section.compression, section.sha256
            )
    payload += struct.pack("<II", google_crc32c.value(bytes(payload)), 0)
    return skippable_frame(bytes(payload))


def decode_footer(frame: bytes, blob_size: int | None = None) -> LayerIndex:
    """Parse the last FOOTER_FRAME_SIZE bytes of a blob. blob_size, if known, bounds the offsets."""
    if len(frame) != FOOTER_FRAME_SIZE:
        raise LayerFormatError(f"footer must be {FOOTER_FRAME_SIZE} bytes, got {len(frame)}")
    magic, length = SKIPPABLE_HEADER.unpack_from(frame)
    if magic != SECTION_FRAME_MAGIC or length != FOOTER_PAYLOAD_SIZE:
        raise LayerFormatError("no lazyfs footer at the end of the blob (not a lazyfs layer)")
    payload = frame[SKIPPABLE_HEADER.size :]
    fmagic, version, size, flags, chunk_size, ordered_chunks = FOOTER_HEAD.unpack_from(payload)
    if fmagic != FOOTER_MAGIC:
        raise LayerFormatError("footer magic mismatch (not a lazyfs layer)")
    crc, reserved = struct.unpack_from("<II", payload, FOOTER_CRC_OFFSET)
    if crc != google_crc32c.value(bytes(payload[:FOOTER_CRC_OFFSET])):
        raise LayerFormatError("footer checksum mismatch")
    if version != FORMAT_VERSION:
        raise LayerFormatError(f"unsupported lazyfs layer format version {version}")
    if size != FOOTER_PAYLOAD_SIZE or reserved or flags & ~FOOTER_FLAGS_KNOWN:
        raise LayerFormatError("footer has unknown flags or sizes")
    ordered = bool(flags & FOOTER_FLAG_TRACE_ORDERED)
    if ordered and not flags & FOOTER_FLAG_TRACE:
        raise LayerFormatError("footer says trace-ordered but has no trace section")
    sections = []
    for i, name in enumerate(FOOTER_SECTIONS):
        raw = payload[FOOTER_HEAD.size + i * SECTION_ENTRY.size :][: SECTION_ENTRY.size]
        sections.append(Section(*SECTION_ENTRY.unpack(raw)))
    meta, table, trace = sections
    if flags & FOOTER_FLAG_TRACE:
        pass
    elif bytes(raw) != _ABSENT:
        raise LayerFormatError("footer describes a trace section without the trace flag")
    else:
        trace = None
    index = LayerIndex(version, chunk_size, meta, table, trace, ordered, ordered_chunks)
    index.check(None if blob_size is None else blob_size - FOOTER_FRAME_SIZE)
    return index


# --- chunk table --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkEntry:
    offset: int  # of the zstd frame in the blob
    stored_length: int
    length: int  # uncompressed
    digest: bytes  # xxh3-128 of the uncompressed bytes, canonical (big-endian) form


class ChunkTable:
    """The decoded chunk table: entry n describes chunk n of the layer's chunk device.

    The entries stay in their encoded form (32 bytes each) and are unpacked when asked for: a
    table of millions of chunks costs its own size in memory, not a Python object per chunk.
    """

    def __init__(self, chunk_size: int, data_end: int, entries: list[ChunkEntry] | None = None, *,
                 raw: bytes | None = None):
        self.chunk_size = chunk_size
        self.data_end = data_end
        if raw is None:
            raw = b"".join(TABLE_ENTRY.pack(e.offset, e.stored_length, e.length, e.digest) for e in entries or ())
        self._raw = raw
        self._count = len(raw) // TABLE_ENTRY.size

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, n: int) -> ChunkEntry:
        if not 0 <= n < self._count:
            raise LayerFormatError(f"chunk {n} is outside the chunk table ({self._count} entries)")
        return ChunkEntry(*TABLE_ENTRY.unpack_from(self._raw, n * TABLE_ENTRY.size))

    @property
    def entries(self) -> list[ChunkEntry]:
        """Every entry as an object (for tools; the daemon indexes the table instead)."""
        return [ChunkEntry(*fields) for fields in TABLE_ENTRY.iter_unpack(self._raw)]

    def encode(self) -> bytes:
        head = TABLE_HEAD.pack(TABLE_MAGIC, FORMAT_VERSION, TABLE_ENTRY.size, self.chunk_size, self._count,
                               self.data_end)
        return head + bytes(self._raw)

    @classmethod
    def decode(cls, data: bytes, chunk_size: int | None = None, data_limit: int | None = None) -> ChunkTable:
        """Parse and validate a table. chunk_size, if given, must match the table's own;
        data_limit, if given, is where the chunk frames must end (the first section frame)."""
        if len(data) < TABLE_HEAD.size:
            raise LayerFormatError(f"chunk table is truncated ({len(data)} bytes)")
        magic, version, entry_size, tsize, count, data_end = TABLE_HEAD.unpack_from(data)
        if magic != TABLE_MAGIC:
            raise LayerFormatError("chunk table magic mismatch")
        if version != FORMAT_VERSION or entry_size != TABLE_ENTRY.size:
            raise LayerFormatError(f"unsupported chunk table version {version} / entry size {entry_size}")
        check_chunk_size(tsize)
        if chunk_size is not None and tsize != chunk_size:
            raise LayerFormatError(f"chunk table chunk size {tsize} differs from the layer's {chunk_size}")
        if len(data) != TABLE_HEAD.size + count * TABLE_ENTRY.size:
            raise LayerFormatError(f"chunk table size {len(data)} does not match its count {count}")
        if data_limit is not None and data_end > data_limit:
            raise LayerFormatError(f"chunk table data end {data_end} lies past the chunk frames (end {data_limit})")
        limit = max_frame_size(tsize)
        # Entries may share a frame (identical chunks) but no frame may reach past data_end
        # into the sections; each chunk's xxh3 is checked when it is read.
        raw = bytes(memoryview(data)[TABLE_HEAD.size :])
        for n, (offset, stored, length, _digest) in enumerate(TABLE_ENTRY.iter_unpack(raw)):
            if not 0 < length <= tsize or not 0 < stored <= limit or offset + stored > data_end:
                raise LayerFormatError(
                    f"chunk table entry {n} is invalid (offset {offset}, stored {stored}, length {length})"
                )
        return cls(tsize, data_end, raw=raw)
