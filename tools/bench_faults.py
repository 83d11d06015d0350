#!/usr/bin/env python3
"""Reading a whole lazyfs image through a registry that damages a share of its answers.

    .venv/bin/python tools/bench_faults.py [--rates 0,5,10,25] [--files 1200] [--seed 1]

Builds an image of --files files (most small, some up to 1 MiB; two layers, 64 KiB chunks),
converts it, pushes it to a local docker-registry and, for each fault rate, mounts it with
`lazyfs mount` (cold cache, no prefetch) through a proxy that damages that share of all GET
answers -- manifests, layer metadata, chunk tables and chunk ranges alike -- with one of: a reset
before or during the body, 500, 503, 429, a cut body, a flipped byte, a slow answer, another
range than asked (with its true or a lying Content-Range). Then every file is read once (8
threads) and compared with its source.

Prints per rate: whether the mount succeeded, file reads attempted and failed (EIO), reads
that returned wrong bytes (must be 0), GET requests that reached the proxy and faults it
injected (each damaged answer is one retried attempt, in the registry client or the fetcher),
chunk retries in the daemon's fetcher (the registry client's own quick retry inside a chunk
fetch is not counted there), p50/p99 of whole-file read latency and the time to read all files.
Exits 1 unless every mount succeeded with 0 wrong bytes and >= 99.9 % of reads. Needs root.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faultproxy import Fault, FaultProxy  # noqa: E402
from tests.fixtures.images import build_image, directory, file  # noqa: E402
from tests.fixtures.lazyimage import convert_image, push_to_registry  # noqa: E402
from tests.fixtures.lazymount import lazyfs_cli  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402

CHUNK = 64 * 1024
FAULTS = [
    Fault.reset(), Fault.reset(after_bytes=1000), Fault.status(500), Fault.status(503), Fault.status(429),
    Fault.truncate(777), Fault.corrupt(at=5), Fault.corrupt(at=30000), Fault.delay(0.2),
    Fault.other_range(CHUNK), Fault.other_range(4096, lie=True),
]
# Not drawn: the whole blob for a range (Fault.ignore_range). The client keeps such an answer and
# serves later reads of the blob from it, so it would make a damaged run faster, not slower
# (tests/t5_mount_faults.py and tests/t5_registry_mirror.py cover it).


class RandomFaultProxy(FaultProxy):
    """A FaultProxy that damages each GET with probability `rate`, with a fault drawn at random."""

    def __init__(self, upstream: str, rate: float, seed: int) -> None:
        super().__init__(upstream)
        self.rate = rate
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.injected = 0

    def _arrive(self, method, path, range_header, authorized):
        record, fault = super()._arrive(method, path, range_header, authorized)
        if fault is None and method == "GET" and "/v2/" in path:
            with self._rng_lock:
                if self._rng.random() < self.rate:
                    fault = self._rng.choice(FAULTS)
                    self.injected += 1
            if fault is not None:
                record.fault = fault.name
        return record, fault


def make_files(count: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        kind = rng.random()
        if kind < 0.70:
            size = rng.randint(100, 16 * 1024)
        elif kind < 0.95:
            size = rng.randint(16 * 1024, 256 * 1024)
        else:
            size = rng.randint(256 * 1024, 1024 * 1024)
        files[f"d{i % 20:02d}/f{i:05d}"] = rng.randbytes(size)
    return files


def build(files: dict[str, bytes]):
    dirs = sorted({name.split("/")[0] for name in files})
    names = sorted(files)
    half = len(names) // 2
    layers = [[directory(d) for d in dirs] + [file(n, files[n]) for n in part]
              for part in (names[:half], names[half:])]
    return convert_image(build_image(layers), chunk_size=CHUNK)


def read_all(root: Path, files: dict[str, bytes], seed: int) -> tuple[int, int, list[float]]:
    """(failed, wrong, latencies) of reading every file once, 8 at a time, in a random order
    (so that reads coalesce and read ahead less than a tree walk would: more requests)."""
    digests = {name: hashlib.sha256(data).digest() for name, data in files.items()}

    def one(name: str) -> tuple[str, float]:
        started = time.perf_counter()
        try:
            data = (root / name).read_bytes()
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            return "failed", time.perf_counter() - started
        outcome = "ok" if hashlib.sha256(data).digest() == digests[name] else "wrong"
        return outcome, time.perf_counter() - started

    with ThreadPoolExecutor(8) as pool:
        order = sorted(files)
        random.Random(seed).shuffle(order)
        results = list(pool.map(one, order))
    failed = sum(1 for outcome, _ in results if outcome == "failed")
    wrong = sum(1 for outcome, _ in results if outcome == "wrong")
    return failed, wrong, [seconds for _, seconds in results]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def measure(registry_host: str, files: dict[str, bytes], rate: float, seed: int, work: Path) -> dict:
    mountpoint, run_dir, cache = work / "mnt", work / "run", work / "cache"
    mountpoint.mkdir(parents=True)
    with RandomFaultProxy(registry_host, rate, seed) as proxy:
        mount = lazyfs_cli("mount", "--no-prefetch", "--run-dir", str(run_dir), "--cache-dir", str(cache),
                           f"{proxy.host}/bench/faults:v1", str(mountpoint), check=False, timeout=600)
        if mount.returncode != 0:
            return {"rate": rate, "mounted": False, "error": mount.stderr.strip(), "injected": proxy.injected}
        try:
            started = time.perf_counter()
            failed, wrong, latencies = read_all(mountpoint, files, seed)
            seconds = time.perf_counter() - started
            stats = json.loads(lazyfs_cli("stats", "--json", "--run-dir", str(run_dir), str(mountpoint)).stdout)
        finally:
            lazyfs_cli("umount", "--run-dir", str(run_dir), str(mountpoint), check=False)
        return {"rate": rate, "mounted": True, "reads": len(files), "failed": failed, "wrong": wrong,
                "injected": proxy.injected, "requests": sum(1 for r in proxy.requests if r.method == "GET"),
                "retries": stats["fetch"]["retries"], "failed_chunks": stats["fetch"]["failed_chunks"],
                "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99), "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0,5,10,25", help="fault rates in percent, comma-separated")
    parser.add_argument("--files", type=int, default=1200, help="files in the image")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_faults: needs root (FUSE mounts)", file=sys.stderr)
        return 2
    files = make_files(args.files, args.seed)
    image = build(files)
    total = sum(len(data) for data in files.values())
    print(f"image: {len(files)} files, {total / 2**20:.1f} MiB in 2 layers, {CHUNK // 1024} KiB chunks")
    with tempfile.TemporaryDirectory(prefix="lazyfs-bench-faults-") as tmp:
        tmp_path = Path(tmp)
        with start_registry(tmp_path / "registry") as registry:
            push_to_registry(registry, "bench/faults", image)
            rows = [measure(registry.host, files, int(rate) / 100, args.seed, tmp_path / f"rate{rate}")
                    for rate in args.rates.split(",")]
    print(f"{'fault rate':>10} {'mount':>6} {'reads':>6} {'failed':>6} {'wrong':>6} {'GETs':>6} {'faults':>7} "
          f"{'chunk retries':>13} {'p50 ms':>7} {'p99 ms':>7} {'all reads s':>11}")
    for row in rows:
        if not row["mounted"]:
            print(f"{row['rate']:>10.0%} {'FAILED':>6}  {row['error']}")
            continue
        print(f"{row['rate']:>10.0%} {'ok':>6} {row['reads']:>6} {row['failed']:>6} {row['wrong']:>6} "
              f"{row['requests']:>6} {row['injected']:>7} {row['retries']:>13} "
              f"{row['p50'] * 1000:>7.1f} {row['p99'] * 1000:>7.1f} {row['seconds']:>11.1f}")
    bad = [r for r in rows if not r["mounted"] or r["wrong"] or r["failed"] > r["reads"] * 0.001]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
