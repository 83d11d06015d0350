#!/usr/bin/env python3
"""What the bounds on crafted layers cost: section decoding and chunk-table validation.

* a 128 MiB metadata section (32 MiB random + 96 MiB zeros): zstd one-shot decompression
  against Section.open_into (sha256 + decoding in 1 MiB pieces, as attach does);
* a metadata bomb: 1 GiB of zeros (32 KiB stored) declared as 1 MiB: time and peak Python
  memory until the error;
* the largest chunk table allowed (256 MiB, 8 Mi entries): decode time and peak memory.

Usage: .venv/bin/python tools/bench_layer_bounds.py
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import tracemalloc
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyfs.layer import format as fmt  # noqa: E402
from lazyfs.layer.errors import LayerFormatError  # noqa: E402


def section(stored: bytes, size: int) -> fmt.Section:
    return fmt.Section(8, len(stored), size, fmt.COMPRESSION_ZSTD, hashlib.sha256(stored).digest())


def traced(fn) -> tuple[float, int]:
    """(seconds, peak bytes of Python allocations) of fn(): timed in one run, and traced in
    another (tracemalloc slows every allocation down)."""
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return seconds, peak


def main() -> None:
    data = os.urandom(32 << 20) + bytes(96 << 20)
    stored = zstandard.ZstdCompressor().compress(data)
    meta = section(stored, len(data))
    best_one_shot = best_pieces = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(stored, max_output_size=len(data))
        best_one_shot = min(best_one_shot, time.perf_counter() - start)
        start = time.perf_counter()
        meta.open_into("meta", stored, lambda piece: None)
        best_pieces = min(best_pieces, time.perf_counter() - start)
    print(f"128 MiB metadata: one-shot decompress {best_one_shot * 1000:.0f} ms, "
          f"open_into (sha256 + 1 MiB pieces) {best_pieces * 1000:.0f} ms (best of 3)")

    compressor = zstandard.ZstdCompressor().compressobj(size=1 << 30)
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(1024)) + compressor.flush()
    declared = section(bomb, 1 << 20)

    def open_bomb() -> None:
        try:
            declared.open_into("meta", bomb, lambda piece: None)
        except LayerFormatError:
            return
        raise AssertionError("the bomb was accepted")

    seconds, peak = traced(open_bomb)
    print(f"metadata bomb ({len(bomb) >> 10} KiB stored, 1 GiB of zeros, declared 1 MiB): "
          f"refused in {seconds * 1000:.1f} ms, peak {peak / (1 << 20):.1f} MiB")

    count = fmt.MAX_DECODED_SIZE["table"] // fmt.TABLE_ENTRY.size - 1
    raw = (fmt.TABLE_HEAD.pack(fmt.TABLE_MAGIC, fmt.FORMAT_VERSION, fmt.TABLE_ENTRY.size, 4096, count, 1 << 20)
           + fmt.TABLE_ENTRY.pack(0, 100, 4096, bytes(16)) * count)
    seconds, peak = traced(lambda: fmt.ChunkTable.decode(raw))
    print(f"chunk table of {count} entries ({len(raw) >> 20} MiB): decoded in {seconds:.2f} s, "
          f"peak {peak >> 20} MiB")


if __name__ == "__main__":
    main()
