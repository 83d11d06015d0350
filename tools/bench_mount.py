#!/usr/bin/env python3
"""lazyfs mounts side by side with curl and the kernel's EROFS; prints a table.

    .venv/bin/python tools/bench_mount.py [--big-mib 1024] [--files 100000] [--chunk-kib 1024]
                                          [--serve fuse kernel]

In one run, against a local docker-registry on loopback:
1. cold sequential read of one big file through `lazyfs mount --layer` (empty cache), in each
   serving mode (`--serve`: the FUSE tree, or the kernel's EROFS over the daemon's chunk device)
   vs `curl -o /dev/null` of the same layer blob, and `curl | zstd -d` of it (download and
   decompress in C, nothing else: the bound for any reader that must decompress);
2. in each serving mode, first read of cached data (page cache of the file dropped, and in kernel
   mode that of the chunk-device file below the loop too; chunk cache warm) vs the same file
   on a kernel EROFS mount of the materialised layer (metadata + chunk device on a loop device,
   page cache dropped), then a second read (page cache) of both;
3. `find -type f | xargs stat` over a layer of many small files on a fresh lazyfs mount (the
   first serving mode given) vs a
   fresh kernel EROFS mount of the same layer;
4. the daemon's RSS with that many-file layer mounted: straight after the walk, and after
   a few idle seconds (the daemon unmaps idle metadata pages periodically, lazyfs.serve.residency).

Fairness: curl's time is the median of three downloads (one download of 0.4 s moves by a
factor of three with the machine's load); the page-cache reads are the best of three for
both sides, the same Python loop of 1 MiB reads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyfs.layer.builder import build_layer  # noqa: E402
from lazyfs.layer.reader import materialise_chunk_device, open_blob_file  # noqa: E402
from lazyfs.registry import open_store  # noqa: E402
from lazyfs.registry.manifest import OCI_CONFIG, OCI_LAYER_ZSTD, OCI_MANIFEST, sha256_digest  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402

MiB = 1 << 20
IDLE_S = 3.0  # longer than lazyfs.serve.residency.TRIM_INTERVAL


class _PatternReader(io.RawIOBase):
    """``size`` bytes that compress about 2:1 (random blocks interleaved with text runs)."""

    def __init__(self, size: int, seed: int = 1):
        self.left = size
        self.rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left, 1 << 20)
        if n <= 0:
            return 0
        half = n // 2
        buf[:half] = self.rng.randbytes(half)
        buf[half:n] = (b"lazyfs benchmark text " * (n // 22 + 1))[: n - half]
        self.left -= n
        return n


def big_file_tar(path: Path, size: int) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
        tar.addfile(info, io.BufferedReader(_PatternReader(size)))


def many_files_tar(path: Path, count: int) -> None:
    rng = random.Random(2)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        per_dir = 1000
        for d in range((count + per_dir - 1) // per_dir):
            info = tarfile.TarInfo(f"d{d:03d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
            for i in range(min(per_dir, count - d * per_dir)):
                data = rng.randbytes(rng.randrange(0, 2048))
                info = tarfile.TarInfo(f"d{d:03d}/file-{i:04d}.txt")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def convert(tar: Path, blob: Path, chunk_size: int):
    with open(tar, "rb") as src, open(blob, "wb") as out:
        return build_layer(src, out, chunk_size=chunk_size)


async def push(host: str, repo: str, blobs: list[tuple[Path, object]]) -> None:
    store = open_store(f"{host}/{repo}:v1")
    try:
        layers = []
        for path, result in blobs:
            await store.push_blob(path, digest=result.digest, media_type=OCI_LAYER_ZSTD)
            layers.append({"mediaType": OCI_LAYER_ZSTD, "digest": result.digest, "size": result.size,
                           "annotations": result.annotations})
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [r.diff_id for _, r in blobs]}}).encode()
        await store.push_blob(config, digest=sha256_digest(config), media_type=OCI_CONFIG)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                                          "size": len(config)},
                               "layers": layers}).encode()
        await store.push_manifest(manifest, OCI_MANIFEST, "v1")
    finally:
        await store.aclose()


def lazyfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lazyfs.cli", *args], check=True)


class LazyMount:
    def __init__(self, work: Path, name: str, image: str, digest: str, cache: Path, serve: str):
        self.path = work / f"mnt-{name}-{serve}"
        self.run_dir = work / "run"
        self.path.mkdir(exist_ok=True)
        lazyfs("mount", "--run-dir", str(self.run_dir), "--cache-dir", str(cache), "--serve", serve, "--layer",
               digest, image, str(self.path))

    def pid(self) -> int:
        for state in self.run_dir.iterdir():
            info = json.loads((state / "mount.json").read_text())
            if info["mountpoint"] == str(self.path):
                return int((state / "daemon.pid").read_text())
        raise RuntimeError("no daemon for this mount")

    def stats(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "lazyfs.cli", "stats", "--json", "--run-dir", str(self.run_dir),
                              str(self.path)], check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    def read_requests(self) -> int:
        return self.stats()["reads"]["requests"]

    def device_files(self) -> list[Path]:
        """Kernel mode: the chunk-device files below the loop devices (their pages are a
        second cache of the same data)."""
        files = []
        for layer in self.stats()["attached"]:
            if layer.get("loop"):
                name = os.path.basename(layer["loop"])
                files.append(Path(Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()))
        return files

    def close(self) -> None:
        lazyfs("umount", "--run-dir", str(self.run_dir), str(self.path))


class KernelErofs:
    """The layer as the kernel mounts it: metadata image + materialised chunk device."""

    def __init__(self, work: Path, name: str, blob: Path):
        self.meta, self.device = work / f"{name}.meta", work / f"{name}.chunkdev"
        with open(blob, "rb") as f:
            layer = open_blob_file(f)
            self.meta.write_bytes(bytes(layer.image._mv))
            materialise_chunk_device(f, layer, self.device)
        self.path = work / f"kmnt-{name}"
        self.path.mkdir(exist_ok=True)
        self.loops = [subprocess.run(["losetup", "-f", "--show", "-r", str(p)], check=True, capture_output=True,
                                     text=True).stdout.strip() for p in (self.meta, self.device)]
        subprocess.run(["mount", "-t", "erofs", "-o", f"ro,device={self.loops[1]}", self.loops[0], str(self.path)],
                       check=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.path)], check=False)
        for loop in self.loops:
            subprocess.run(["losetup", "-d", loop], check=False)


def drop_file_cache(*paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_read(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 20):
            total += len(block)
    return time.perf_counter() - start, total


def timed_curl(url: str) -> float:
    start = time.perf_counter()
    subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)
    return time.perf_counter() - start


def timed_curl_zstd(url: str) -> float:
    """Download and decompress the blob with the C tools, nothing else: no verification,
    no cache, no FUSE. What any reader that must decompress the file cannot beat here."""
    start = time.perf_counter()
    subprocess.run(f"curl -sf '{url}' | zstd -dqc > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def timed_walk(root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(f"find {root} -type f -print0 | xargs -0 stat > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (a figure that other load on the machine
    changes much less than throughput)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and its parts: RssAnon (heap), RssFile (mapped files, e.g. the metadata image)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            found[key] = int(value.split()[0]) / 1024
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--serve", nargs="+", choices=("fuse", "kernel"), default=["fuse", "kernel"],
                        help="serving modes of the big-file rows (the many-file rows use the first)")
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-mount-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        big_file_tar(work / "big.tar", args.big_mib * MiB)
        many_files_tar(work / "many.tar", args.files)
        big = convert(work / "big.tar", work / "big.blob", args.chunk_kib * 1024)
        many = convert(work / "many.tar", work / "many.blob", args.chunk_kib * 1024)
        (work / "big.tar").unlink()
        (work / "many.tar").unlink()
        print(f"built layers in {time.perf_counter() - t:.1f}s: big blob {big.size / MiB:.0f} MiB, "
              f"many-file blob {many.size / MiB:.1f} MiB", file=sys.stderr)
        with start_registry(work / "registry") as registry:
            trio.run(push, registry.host, "bench/mount", [(work / "big.blob", big), (work / "many.blob", many)])
            image = f"{registry.host}/bench/mount:v1"
            blob_url = f"{registry.url}/v2/bench/mount/blobs/{big.digest}"
            size_mib = args.big_mib

            # 1. cold sequential read vs curl of the blob, in each serving mode
            os.sync()
            curl_s = statistics.median(timed_curl(blob_url) for _ in range(3))
            floor_s = statistics.median(timed_curl_zstd(blob_url) for _ in range(3))
            kernel = KernelErofs(work, "big", work / "big.blob")
            try:
                for serve in args.serve:
                    mount = LazyMount(work, "big", image, big.digest, work / f"cache-{serve}", serve)
                    try:
                        os.sync()  # no writeback of the setup's files during the timed reads
                        cpu_before = cpu_seconds(mount.pid())
                        cold_s, n = timed_read(mount.path / "big.bin")
                        cpu_s = cpu_seconds(mount.pid()) - cpu_before
                        assert n == size_mib * MiB
                        rows.append((f"[{serve}] cold read of a {size_mib} MiB file (registry)",
                                     f"{size_mib / cold_s:.0f} MiB/s ({cold_s:.1f}s)",
                                     f"curl of its {big.size / MiB:.0f} MiB blob: {curl_s:.1f}s",
                                     f"{curl_s / cold_s:.2f}x in time (target >= 0.5x); "
                                     f"daemon CPU {cpu_s:.1f}s ({1000 * cpu_s / size_mib:.1f} ms/MiB)"))
                        # 2. cached data: first read after dropping the file's pages, then a second
                        # read (straight after, so that nothing else on the machine drops the page
                        # cache between)
                        os.sync()
                        drop_file_cache(mount.path / "big.bin", kernel.path / "big.bin", kernel.device, kernel.meta,
                                        *map(Path, kernel.loops), *mount.device_files())
                        first_s, _ = timed_read(mount.path / "big.bin")
                        before = mount.read_requests()
                        second_s = min(timed_read(mount.path / "big.bin")[0] for _ in range(3))
                        reached = mount.read_requests() - before
                        k_first_s, _ = timed_read(kernel.path / "big.bin")
                        k_second_s = min(timed_read(kernel.path / "big.bin")[0] for _ in range(3))
                        rows.append((f"[{serve}] first read, chunk cache warm", f"{size_mib / first_s:.0f} MiB/s",
                                     f"kernel EROFS: {size_mib / k_first_s:.0f} MiB/s",
                                     f"{k_first_s / first_s:.2f}x (target >= 0.5x)"))
                        rows.append((f"[{serve}] second read (page cache)", f"{size_mib / second_s:.0f} MiB/s",
                                     f"kernel EROFS: {size_mib / k_second_s:.0f} MiB/s",
                                     f"{k_second_s / second_s:.2f}x (target >= 0.9x); "
                                     f"{reached} reads reached the daemon"))
                    finally:
                        mount.close()
                rows.append(("curl | zstd -d of the blob (no FUSE/cache)",
                             f"{size_mib / floor_s:.0f} MiB/s ({floor_s:.1f}s)", f"curl alone: {curl_s:.1f}s",
                             f"{curl_s / floor_s:.2f}x in time: the bound for any decompressing reader"))
            finally:
                kernel.close()

            # 3./4. metadata walk over many files, and the daemon's memory
            mount = LazyMount(work, "many", image, many.digest, work / "cache-many", args.serve[0])
            kernel = KernelErofs(work, "many", work / "many.blob")
            os.sync()
            try:
                walk_s = timed_walk(mount.path)
                k_walk_s = timed_walk(kernel.path)
                rows.append((f"[{args.serve[0]}] find | xargs stat, {args.files} files", f"{walk_s:.2f}s",
                             f"kernel EROFS: {k_walk_s:.2f}s", f"{walk_s / k_walk_s:.2f}x (target <= 3x)"))
                for when in ("after the walk", f"{IDLE_S:.0f}s later"):
                    if when != "after the walk":
                        time.sleep(IDLE_S)
                    memory = memory_mib(mount.pid())
                    rows.append((f"[{args.serve[0]}] daemon RSS, {args.files}-file layer, {when}", f"{memory['VmRSS']:.0f} MiB",
                                 f"anon {memory['RssAnon']:.0f} MiB, file {memory['RssFile']:.0f} MiB, "
                                 f"shmem {memory.get('RssShmem', 0):.0f} MiB", "target <= 150 MiB"))
            finally:
                mount.close()
                kernel.close()
    width = [max(len(r[i]) for r in rows + [("what", "lazyfs", "reference", "ratio")]) for i in range(4)]
    header = ("what", "lazyfs", "reference", "ratio")
    print(" | ".join(h.ljust(w) for h, w in zip(header, width)))
    print("-+-".join("-" * w for w in width))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, width)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
