"""One chunk of a layer blob: where its stored form is, what it must decode to, and the check
that the decoded bytes are what the chunk table promised (the last link of the trust chain,
lazyfs.layer.reader). Pure: used by the fetcher, the layer reader and tools alike."""

from __future__ import annotations

from dataclasses import dataclass

import xxhash
import zstandard

COMPRESSIONS = ("zstd", "none")
DIGEST_SIZE = 16  # xxh3-128
_ZSTD_UNKNOWN_SIZE = zstandard.CONTENTSIZE_UNKNOWN


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a blob: where its stored form is and what it must decode to."""

    offset: int  # byte offset of the stored (compressed) form in the blob
    stored_length: int  # bytes in the blob
    length: int  # uncompressed length
    digest: bytes | None  # xxh3-128 of the uncompressed bytes; None only for trusted plain blobs
    compression: str  # "zstd" or "none"

    def __post_init__(self):
        if self.offset < 0 or self.stored_length < 0 or self.length < 0:
            raise ValueError(f"negative offset or length in {self!r}")
        if self.digest is not None and len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"chunk digest must be {DIGEST_SIZE} bytes: {self!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"unknown chunk compression {self.compression!r}")
        if self.compression == "none" and self.stored_length != self.length:
            raise ValueError(f"uncompressed chunk with stored_length != length: {self!r}")

    @property
    def end(self) -> int:
        return self.offset + self.stored_length


class ChunkCorrupt(Exception):
    """The bytes received for a chunk do not decode to its declared length and digest."""


def decode_chunk(ref: ChunkRef, stored: bytes) -> bytes:
    """Decompress (bounded by ``ref.length``) and verify one chunk. Pure; safe in a thread."""
    if ref.compression == "zstd":
        try:
            declared = zstandard.get_frame_parameters(stored).content_size
        except zstandard.ZstdError as e:
            raise ChunkCorrupt(f"not a zstd frame: {e}") from e
        if declared != _ZSTD_UNKNOWN_SIZE and declared != ref.length:
            # decompress() trusts a declared size over max_output_size: reject before allocating.
            raise ChunkCorrupt(f"zstd frame declares {declared} bytes, chunk has {ref.length}")
        try:
            data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=ref.length)
        except zstandard.ZstdError as e:
            raise ChunkCorrupt(f"zstd frame does not decode within {ref.length} bytes: {e}") from e
    else:
        data = bytes(stored)
    if len(data) != ref.length:
        raise ChunkCorrupt(f"decoded {len(data)} bytes, expected {ref.length}")
    if ref.digest is not None and xxhash.xxh3_128_digest(data) != ref.digest:
        raise ChunkCorrupt("xxh3-128 digest mismatch")
    return data
