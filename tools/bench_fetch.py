#!/usr/bin/env python3
"""Measurements behind the cache and fetcher design choices; prints tables.

    .venv/bin/python tools/bench_fetch.py [--dir DIR] [--small-chunks 100000]

1. decode (zstd decompress + xxh3-128 verify) per chunk size: on the trio loop vs in a
   worker thread -- throughput and the longest stall another task on the loop sees;
2. ChunkCache put/get throughput (get includes the xxh3 re-verification);
3. layout: one file per chunk vs append-only pack files, on many small chunks:
   write, index rebuild on open, random reads, disk usage;
4. end to end: ChunkFetcher reading a blob of zstd chunks from a local HTTP server that
   answers ranges, cold and then warm cache, with and without range coalescing;
5. bound (only with --only bound; root: it shapes a link): a trace-ordered start over a real
   registry at 100 Mbit/s + 20 ms, prefetch request bounds side by side, chunks streamed or
   delivered with their whole request.
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import httpx
import threading
import trio
import xxhash
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyfs.fetch.cache import ChunkCache, chunk_digest  # noqa: E402
from lazyfs.fetch.scheduler import ChunkFetcher, Priority  # noqa: E402
from lazyfs.fetch.sources import HttpBlobSource  # noqa: E402
from lazyfs.layer.chunks import ChunkRef, decode_chunk  # noqa: E402

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20]
REPEAT = 3
FETCHERS = 4  # concurrent fetch tasks decoding in the decode benchmark


def sample_data(size: int) -> bytes:
    """Text-like bytes (random words from a 2000-word vocabulary plus 1/8 random bytes):
    zstd level 3 compresses it about 2.5:1 and decodes at the speed of real file content,
    unlike zeros or incompressible noise, which decode at memcpy speed."""
    rnd = random.Random(size)
    vocabulary = [rnd.randbytes(rnd.randint(2, 10)).hex().encode() for _ in range(2000)]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(vocabulary) + b" "
        if rnd.random() < 0.05:
            out += rnd.randbytes(16)
    return bytes(out[:size])


def fmt_rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:8.0f} MB/s"


# ------------------------------------------------------------------ 1. decode on/off loop

async def decode_run(ref: ChunkRef, frame: bytes, count: int, offload: bool) -> tuple[float, float]:
    """``FETCHERS`` tasks each decode count/FETCHERS chunks in turn, as concurrent fetch tasks
    do; a ticker task measures the longest time the loop could not run it."""
    limiter = trio.CapacityLimiter(2)
    stall = 0.0
    done = trio.Event()

    async def ticker():
        nonlocal stall
        while not done.is_set():
            before = time.perf_counter()
            await trio.sleep(0)
            stall = max(stall, time.perf_counter() - before)

    async def fetch_task(n: int):
        for _ in range(n):
            if offload:
                await trio.to_thread.run_sync(decode_chunk, ref, frame, limiter=limiter)
            else:
                decode_chunk(ref, frame)
                await trio.sleep(0)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        async with trio.open_nursery() as workers:
            for _ in range(FETCHERS):
                workers.start_soon(fetch_task, count // FETCHERS)
        done.set()
    return time.perf_counter() - start, stall


def bench_decode() -> None:
    print(f"\n## decode = zstd decompress + xxh3-128 verify; {FETCHERS} fetch tasks, 2 worker threads when offloaded")
    print(f"{'chunk':>8} {'ratio':>6} {'per chunk':>10} {'on loop':>14} {'max stall':>10} {'threads':>14} {'max stall':>10}")
    for size in SIZES:
        data = sample_data(size)
        frame = zstandard.ZstdCompressor(level=3).compress(data)
        ref = ChunkRef(0, len(frame), size, chunk_digest(data), "zstd")
        count = max(4 * FETCHERS, (256 << 20) // size)
        per_chunk = float("inf")
        for _ in range(REPEAT):
            t0 = time.perf_counter()
            for _ in range(count):
                decode_chunk(ref, frame)
            per_chunk = min(per_chunk, (time.perf_counter() - t0) / count)
        ratio = size / len(frame)
        # Best of REPEAT runs: the machine may be shared, and noise only ever adds time.
        inline, inline_stall = map(min, zip(*(trio.run(decode_run, ref, frame, count, False)
                                             for _ in range(REPEAT))))
        threaded, thread_stall = map(min, zip(*(trio.run(decode_run, ref, frame, count, True)
                                               for _ in range(REPEAT))))
        print(f"{size >> 10:>6}Ki {ratio:>6.1f} {per_chunk * 1e6:>8.0f}us {fmt_rate(size * count, inline)} "
              f"{inline_stall * 1e3:>8.2f}ms {fmt_rate(size * count, threaded)} {thread_stall * 1e3:>8.2f}ms")
    data = sample_data(4 << 20)
    t0 = time.perf_counter()
    for _ in range(50):
        xxhash.xxh3_128_digest(data)
    print(f"xxh3-128 alone: {fmt_rate(50 * len(data), time.perf_counter() - t0)}")

    async def thread_round_trip() -> float:
        t0 = time.perf_counter()
        for _ in range(2000):
            await trio.to_thread.run_sync(int)
        return (time.perf_counter() - t0) / 2000
    print(f"trio.to_thread.run_sync round trip: {trio.run(thread_round_trip) * 1e6:.0f} us")


# ------------------------------------------------------------------ 2. cache put/get

def bench_cache(workdir: Path) -> None:
    print("\n## ChunkCache put / get (get re-verifies xxh3-128; page cache warm)")
    print(f"{'chunk':>8} {'count':>6} {'put':>14} {'get':>14} {'get per chunk':>14}")
    for size in [4 << 10, *SIZES]:
        root = workdir / f"cache-{size}"
        cache = ChunkCache(root)
        count = max(16, min(4000, (128 << 20) // size))
        chunks = []
        base = sample_data(size)
        for i in range(count):
            data = i.to_bytes(8, "little") + base[8:]
            chunks.append((chunk_digest(data), data))
        t0 = time.perf_counter()
        for digest, data in chunks:
            cache.put(digest, data)
        put = time.perf_counter() - t0
        t0 = time.perf_counter()
        for digest, _ in chunks:
            assert cache.get(digest) is not None
        get = time.perf_counter() - t0
        print(f"{size >> 10:>6}Ki {count:>6} {fmt_rate(size * count, put)} {fmt_rate(size * count, get)} "
              f"{get / count * 1e6:>12.0f}us")
        shutil.rmtree(root)


# ------------------------------------------------------------------ 3. layout

class PackStore:
    """The alternative layout, for comparison: chunks appended to 64 MiB pack files with an
    append-only index file per pack (digest, offset, length); reads verify xxh3 like the cache."""

    PACK_LIMIT = 64 << 20
    RECORD = struct.Struct("<16sQI")

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.index: dict[bytes, tuple[int, int, int]] = {}
        self.packs = sorted(int(p.stem) for p in root.glob("*.pack"))
        for pack in self.packs:
            raw = (root / f"{pack}.idx").read_bytes()
            for i in range(0, len(raw) - len(raw) % self.RECORD.size, self.RECORD.size):
                digest, offset, length = self.RECORD.unpack_from(raw, i)
                self.index[digest] = (pack, offset, length)
        self.current = self.packs[-1] if self.packs else 0
        self._data = open(root / f"{self.current}.pack", "ab")
        self._idx = open(root / f"{self.current}.idx", "ab")
        self._fds: dict[int, int] = {}

    def put(self, digest: bytes, data: bytes) -> None:
        if digest in self.index:
            return
        if self._data.tell() + len(data) > self.PACK_LIMIT:
            self._data.close()
            self._idx.close()
            self.current += 1
            self._data = open(self.root / f"{self.current}.pack", "ab")
            self._idx = open(self.root / f"{self.current}.idx", "ab")
        offset = self._data.tell()
        self._data.write(data)
        self._data.flush()
        self._idx.write(self.RECORD.pack(digest, offset, len(data)))
        self._idx.flush()
        self.index[digest] = (self.current, offset, len(data))

    def get(self, digest: bytes) -> bytes | None:
        pack, offset, length = self.index[digest]
        fd = self._fds.get(pack)
        if fd is None:
            fd = self._fds[pack] = os.open(self.root / f"{pack}.pack", os.O_RDONLY)
        data = os.pread(fd, length, offset)
        return data if chunk_digest(data) == digest else None

    def close(self) -> None:
        self._data.close()
        self._idx.close()
        for fd in self._fds.values():
            os.close(fd)


def disk_usage(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_layout(workdir: Path, count: int) -> None:
    rnd = random.Random(1)
    sizes = [rnd.choice([512, 1024, 2048, 4096, 8192, 16384]) for _ in range(count)]
    payload = rnd.randbytes(16384 + count * 8)
    chunks = []
    for i, size in enumerate(sizes):
        data = payload[i * 8: i * 8 + size]
        chunks.append((chunk_digest(data), data))
    total = sum(sizes)
    sample = rnd.sample(chunks, min(10000, count))
    print(f"\n## layout: {count} small chunks (512 B..16 KiB, {total / 1e6:.0f} MB of data)")
    print(f"{'layout':>16} {'write':>9} {'open':>16} {'10k gets warm':>14} {'10k gets cold':>14} {'disk':>8}")
    for name in ("file per chunk", "pack files"):
        root = workdir / name.replace(" ", "-")
        t0 = time.perf_counter()
        store = ChunkCache(root) if name == "file per chunk" else PackStore(root)
        for digest, data in chunks:
            store.put(digest, data)
        store.close()
        write = time.perf_counter() - t0
        if isinstance(store, ChunkCache):
            t0 = time.perf_counter()
            store = ChunkCache(root)
            with_snapshot = time.perf_counter() - t0
            (root / "index").unlink()
            t0 = time.perf_counter()
            store = ChunkCache(root)
            opened = f"{with_snapshot:.2f}s/{time.perf_counter() - t0:.2f}s"
        else:
            t0 = time.perf_counter()
            store = PackStore(root)
            opened = f"{time.perf_counter() - t0:.2f}s"
        t0 = time.perf_counter()
        for digest, _ in sample:
            assert store.get(digest) is not None
        warm = time.perf_counter() - t0
        cold_text = "n/a"
        store.close()
        if drop_caches():
            store = ChunkCache(root) if isinstance(store, ChunkCache) else PackStore(root)
            drop_caches()
            t0 = time.perf_counter()
            for digest, _ in sample:
                assert store.get(digest) is not None
            cold_text = f"{time.perf_counter() - t0:.2f}s"
            store.close()
        print(f"{name:>16} {write:>8.2f}s {opened:>16} {warm:>13.2f}s {cold_text:>14} "
              f"{disk_usage(root) / 1e6:>6.0f}MB")
        shutil.rmtree(root)
    print("open: file per chunk = with the index snapshot / listing + stat(2) of every chunk")


class _RangeServer(http.server.BaseHTTPRequestHandler):
    blob = b""
    delay = 0.0  # seconds before each answer: a stand-in for the round trip to a registry
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        first, last = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
        body = self.blob[first:last + 1]
        time.sleep(self.delay)
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(self.blob)}")
        self.end_headers()
        self.wfile.write(body)


class _Listener(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops concurrent connects (1 s SYN retry)


async def fetch_all(cache_root: Path, url: str, refs: list[ChunkRef], max_coalesce: int) -> tuple[float, int]:
    async with httpx.AsyncClient() as client:
        source = HttpBlobSource(url, client)
        async with ChunkFetcher(ChunkCache(cache_root), max_coalesce=max_coalesce) as fetcher:
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(0, len(refs), 4):  # 4-chunk reads, all at once, like a busy start
                    nursery.start_soon(fetcher.get, source, refs[i:i + 4])
            await fetcher.wait_idle()
            return time.perf_counter() - start, fetcher.stats.requests


def bench_end_to_end(workdir: Path) -> None:
    chunk = 1 << 20
    data = sample_data(64 * chunk)
    compressor = zstandard.ZstdCompressor(level=3)
    blob = bytearray()
    refs = []
    for i in range(64):
        piece = data[i * chunk:(i + 1) * chunk]
        frame = compressor.compress(piece)
        refs.append(ChunkRef(len(blob), len(frame), len(piece), chunk_digest(piece), "zstd"))
        blob += frame
    _RangeServer.blob = bytes(blob)
    server = _Listener(("127.0.0.1", 0), _RangeServer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/blob"
    print(f"\n## end to end: 64 x 1 MiB chunks ({len(blob) / 1e6:.0f} MB stored) from a local HTTP server")
    print(f"{'delay':>6} {'coalescing':>11} {'cold':>8} {'requests':>9} {'MB/s (data)':>12} {'warm':>7}")
    try:
        for delay in (0.0, 0.05):
            _RangeServer.delay = delay
            for label, bound in (("off", 1), ("8 MiB", 8 << 20)):
                root = workdir / f"e2e-{bound}"
                cold, requests = trio.run(fetch_all, root, url, refs, bound)
                warm, _ = trio.run(fetch_all, root, url, refs, bound)
                print(f"{delay * 1e3:>4.0f}ms {label:>11} {cold:>7.2f}s {requests:>9} "
                      f"{len(data) / cold / 1e6:>12.0f} {warm:>6.2f}s")
                shutil.rmtree(root)
    finally:
        server.shutdown()
        server.server_close()


class _WholeRange:
    """A RegistryBlobSource without streaming: chunks reach readers when the request ends."""

    def __init__(self, source):
        self.name, self.host, self.read_range = source.name, source.host, source.read_range


async def ordered_start(cache_root: Path, source, refs: list[ChunkRef], request_bytes: int,
                        window: int, think: float) -> tuple[float, float, int]:
    """A trace-ordered start: every chunk queued as prefetch at once, then read in order with
    ``think`` seconds of work after each. Seconds to the first chunk, to the last, requests."""
    cache = ChunkCache(cache_root)
    async with ChunkFetcher(cache, max_coalesce=max(request_bytes, 8 << 20), background_coalesce=request_bytes,
                            background_window=window) as fetcher:
        began = trio.current_time()
        fetcher.enqueue(source, refs, Priority.PREFETCH)
        first = None
        for ref in refs:
            await fetcher.get(source, [ref])
            first = first if first is not None else trio.current_time() - began
            await trio.sleep(think)
        total = trio.current_time() - began
        await fetcher.wait_idle()
        requests = fetcher.stats.requests
    shutil.rmtree(cache_root)
    return first, total, requests


def bench_prefetch_bound(workdir: Path, runs: int) -> None:
    """Does the prefetch request bound still pay once chunks are delivered as they stream in?
    A real registry behind a 100 Mbit/s + 20 ms link; configurations alternate within one run."""
    import hashlib
    import statistics

    import httpx

    from lazyfs.bench.netshape import LinkShape, ShapedRegistry
    from lazyfs.fetch.sources import RegistryBlobSource
    from lazyfs.registry import RegistryClient, parse_reference

    chunk = 512 << 10
    datas = [os.urandom(chunk // 2) + sample_data(chunk // 2) for _ in range(48)]
    compressor = zstandard.ZstdCompressor(level=3)
    frames = [compressor.compress(d) for d in datas]
    blob = b"".join(frames)
    refs, offset = [], 0
    for frame, data in zip(frames, datas):
        refs.append(ChunkRef(offset, len(frame), len(data), xxhash.xxh3_128_digest(data), "zstd"))
        offset += len(frame)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    configs = [("streamed", "1 MiB / 3 MiB", 1 << 20, 3 << 20), ("streamed", "8 MiB / 8 MiB", 8 << 20, 8 << 20),
               ("streamed", "64 MiB / 64 MiB", 64 << 20, 64 << 20), ("whole", "1 MiB / 3 MiB", 1 << 20, 3 << 20),
               ("whole", "64 MiB / 64 MiB", 64 << 20, 64 << 20)]
    results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}

    async def one_round(endpoint: str) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            store = RegistryClient(parse_reference(f"{endpoint}/bench/bound:x"), http)
            if not await store.blob_size(digest):
                await store.push_blob(blob, digest=digest)
            streamed = RegistryBlobSource(store, digest)
            for mode, label, request_bytes, window in configs:
                source = streamed if mode == "streamed" else _WholeRange(streamed)
                results.setdefault((mode, label), []).append(
                    await ordered_start(workdir / "bound-cache", source, refs, request_bytes, window, 0.01))

    with ShapedRegistry(workdir / "registry", LinkShape(rate_mbit=100, rtt_ms=20)) as registry:
        for _ in range(runs):
            trio.run(one_round, registry.endpoint)
    print(f"\nTrace-ordered start of {len(refs)} chunks ({len(blob) / 2**20:.1f} MiB stored), read in order "
          f"with 10 ms of work each, 100 Mbit/s + 20 ms; median of {runs} (all runs):")
    print(f"{'delivery':<9} {'request / window':<17} {'first chunk s':>13} {'all read s':>11} {'requests':>9}")
    for (mode, label), values in results.items():
        print(f"{mode:<9} {label:<17} {statistics.median(v[0] for v in values):>13.3f} "
              f"{statistics.median(v[1] for v in values):>11.2f} {statistics.median(v[2] for v in values):>9.0f}"
              "   " + " ".join(f"{v[1]:.2f}" for v in values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="scratch directory (default: a new temporary directory)")
    parser.add_argument("--small-chunks", type=int, default=100_000)
    parser.add_argument("--only", choices=["decode", "cache", "layout", "e2e", "bound"])
    parser.add_argument("--runs", type=int, default=3, help="rounds of the bound measurement")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fetch-", dir=args.dir))
    print(f"scratch directory {workdir} on {os.statvfs(workdir).f_bsize}-byte blocks")
    try:
        if args.only in (None, "decode"):
            bench_decode()
        if args.only in (None, "cache"):
            bench_cache(workdir)
        if args.only in (None, "layout"):
            bench_layout(workdir, args.small_chunks)
        if args.only in (None, "e2e"):
            bench_end_to_end(workdir)
        if args.only == "bound":  # needs root (a shaped link), so only on request
            bench_prefetch_bound(workdir, args.runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
