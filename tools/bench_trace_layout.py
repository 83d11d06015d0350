#!/usr/bin/env python3
"""Range requests a traced start needs, with and without the trace-ordered layout.

    .venv/bin/python tools/bench_trace_layout.py [--dirs DIR ...] [--modules rich,httpx,...]
                                                 [--chunk-size N]

Packs the given directories (default: this venv's site-packages) into one tar, records what a
Python start importing --modules reads from them (the compiled .pyc of every imported source
module, or the source when there is none, and extension modules), writes that as a trace,
converts the tar without and with the trace, and prints for each blob: conversion time, the
traced files and their chunks, and the Range requests needed to fetch those chunks when all of
them are queued at once, grouped the way lazyfs.fetch.scheduler.ChunkFetcher groups queued chunks
(neighbours by blob offset, gaps up to 64 KiB, at most 8 MiB per request), with the bytes
those requests carry (gaps included) beside the bytes the chunks need.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import default_dirs, make_tar  # noqa: E402

from lazyfs.layer.builder import build_layer  # noqa: E402
from lazyfs.layer.reader import open_blob_file  # noqa: E402
from lazyfs.trace.format import Access, Trace  # noqa: E402

MiB = 1 << 20
MAX_GAP = 64 << 10  # ChunkFetcher's defaults
MAX_COALESCE = 8 << 20
LAYER = "sha256:" + "0" * 64

_LIST_FILES = """
import importlib, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path:
        print(path)
"""


def start_files(modules: str, dirs: list[str]) -> list[str]:
    """Absolute paths a start reads from dirs, in import order."""
    out = subprocess.run([sys.executable, "-c", _LIST_FILES, modules], check=True, capture_output=True,
                         text=True).stdout.split()
    roots = [os.path.realpath(d) for d in dirs]
    files = []
    for path in out:
        path = os.path.realpath(path)
        if not any(path.startswith(r + "/") for r in roots):
            continue
        if path.endswith(".py"):
            cached = importlib.util.cache_from_source(path)
            path = cached if os.path.exists(cached) else path
        files.append(path)
    return list(dict.fromkeys(files))


def requests_for(blob: Path, paths: list[str]) -> tuple[int, int, int, int, int]:
    """(traced files with chunks, chunks, range requests, bytes requested, bytes of the chunks)."""
    with open(blob, "rb") as f:
        layer = open_blob_file(f)
        chunks: dict[int, None] = {}
        files = 0
        for path in paths:
            nid = layer.image.resolve(path)
            pieces = [p.chunk for p in layer.chunks_for(nid, 0, layer.image.inode(nid).size) if p.chunk is not None]
            files += bool(pieces)
            chunks.update(dict.fromkeys(pieces))
        frames = sorted({(layer.table[n].offset, layer.table[n].stored_length) for n in chunks})
        layer.close()
    requests = requested = 0
    start = end = None
    for offset, length in frames:
        if start is None or offset - end > MAX_GAP or offset + length - start > MAX_COALESCE:
            if start is not None:
                requested += end - start
            requests += 1
            start = offset
        end = offset + length
    if start is not None:
        requested += end - start
    return files, len(chunks), requests, requested, sum(length for _, length in frames)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dirs", nargs="+", default=None)
    parser.add_argument("--modules", default="rich.console,httpx,zstandard,trio,hypothesis,pytest")
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    dirs = args.dirs or default_dirs()
    files = start_files(args.modules, dirs)
    with tempfile.TemporaryDirectory(prefix="lazyfs-bench-") as tmp:
        tar = Path(tmp) / "layer.tar"
        size = make_tar(dirs, tar)
        # make_tar stores each directory under its own path without the leading slash.
        paths = ["/" + p.lstrip("/") for p in files]
        trace = Trace({LAYER: args.chunk_size},
                      [Access(i, LAYER, 0, 0, 0, p) for i, p in enumerate(paths)]).encode()
        print(f"tar {size / MiB:.1f} MiB from {', '.join(dirs)}; start: import {args.modules}: "
              f"{len(files)} files read; chunk size {args.chunk_size // 1024} KiB")
        print(f"{'layout':<14}{'convert s':>10}{'files':>7}{'chunks':>8}{'requests':>10}"
              f"{'MiB requested':>15}{'MiB needed':>12}")
        for layout, embedded in (("input order", None), ("trace-ordered", trace)):
            blob = Path(tmp) / "blob"
            started = time.perf_counter()
            with open(tar, "rb") as src, open(blob, "wb") as out:
                build_layer(src, out, chunk_size=args.chunk_size, threads=args.threads, trace=embedded,
                            spool_dir=tmp)
            seconds = time.perf_counter() - started
            nfiles, chunks, requests, requested, needed = requests_for(blob, paths)
            print(f"{layout:<14}{seconds:>10.2f}{nfiles:>7}{chunks:>8}{requests:>10}"
                  f"{requested / MiB:>15.2f}{needed / MiB:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
