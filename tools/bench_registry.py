#!/usr/bin/env python3
"""Registry client throughput against a local docker-registry; prints a table.

    .venv/bin/python tools/bench_registry.py [--size-mib 64]

Side by side on one blob of random bytes, in one run:
1. whole-blob download: RegistryClient.download_blob (streamed, sha256-verified, temp + rename)
   vs `curl -o` (no verification);
2. ranged reads (1 MiB sequential, 64 KiB random; 1 and 8 concurrent tasks): RegistryClient.read_range
   vs bare httpx GETs with the same Range headers (the cost of the client's checks and retries
   machinery);
3. ranged reads answered with 200 (a proxy that drops Range), the client slicing the stream.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyfs.registry import RegistryClient, parse_reference  # noqa: E402
from tests.faultproxy import Fault, FaultProxy  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402

MiB = 1024 * 1024


async def timed(fn) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def run_reads(read, ranges, concurrency: int) -> None:
    queue = list(ranges)

    async def worker():
        while queue:
            offset, length = queue.pop()
            await read(offset, length)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)


async def bench(host: str, proxy_host: str, size: int, workdir: Path) -> list[tuple[str, str, float, float]]:
    rows = []
    data = os.urandom(size)
    async with httpx.AsyncClient(timeout=60) as http:
        client = RegistryClient(parse_reference(f"{host}/bench/blob:latest"), http)
        digest = (await client.push_blob(data)).digest
        url = f"http://{host}/v2/bench/blob/blobs/{digest}"

        seconds = await timed(lambda: client.download_blob(digest, workdir / "lazyfs.out"))
        rows.append(("whole blob", "lazyfs download_blob", seconds, size / seconds / MiB))

        async def curl():
            await trio.run_process(["curl", "-sSf", "-o", str(workdir / "curl.out"), url])
        seconds = await timed(curl)
        rows.append(("whole blob", "curl -o", seconds, size / seconds / MiB))

        rng = random.Random(1)
        sequential = [(o, MiB) for o in range(0, size, MiB)]
        random_small = [(rng.randrange(0, size - 65536), 65536) for _ in range(400)]

        async def bare(offset, length):
            r = await http.get(url, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
            assert r.status_code == 206 and len(r.content) == length

        async def ours(offset, length):
            assert len(await client.read_range(digest, offset, length)) == length

        for label, ranges in (("1 MiB sequential", sequential), ("64 KiB random", random_small)):
            total = sum(length for _, length in ranges)
            for concurrency in (1, 8):
                for name, read in (("lazyfs read_range", ours), ("bare httpx GET", bare)):
                    seconds = await timed(lambda: run_reads(read, ranges, concurrency))
                    rows.append((f"{label} x{concurrency}", name, seconds, total / seconds / MiB))

        proxied = RegistryClient(parse_reference(f"{proxy_host}/bench/blob:latest"), http)
        for offset in (0, size // 2, size - 65536):
            seconds = await timed(lambda: proxied.read_range(digest, offset, 65536))
            rows.append((f"200 answer, 64 KiB at {offset // MiB} MiB", "lazyfs read_range", seconds,
                         65536 / seconds / MiB))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, start_registry(Path(tmp) / "registry") as registry, \
            FaultProxy(registry.host) as proxy:
        proxy.add(Fault.ignore_range(), times=None)
        rows = trio.run(bench, registry.host, proxy.host, args.size_mib * MiB, Path(tmp))
    print(f"{'workload':38} {'reader':22} {'seconds':>8} {'MiB/s':>9}")
    for workload, reader, seconds, rate in rows:
        print(f"{workload:38} {reader:22} {seconds:8.3f} {rate:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
