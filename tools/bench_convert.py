#!/usr/bin/env python3
"""Conversion throughput and size of lazyfs layers against the gzip layer they come from.

    .venv/bin/python tools/bench_convert.py [--dirs DIR ...] [--levels 3,5] [--threads 1,2]

Packs the given directories (default: this venv's site-packages, a few hundred MiB of real
files) into one uncompressed tar, compresses it with
`gzip -6` as a registry layer would be, then converts the gzip layer (and the plain tar, to
separate gzip decoding from our own work) and prints one table. Throughput is MiB of
uncompressed tar per second of wall time, and per CPU-second of this process (all threads),
which does not depend on what else the machine is doing, and the CPU time of the main thread
(tar parsing; the part that does not run in parallel). The load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyfs.layer.builder import build_layer  # noqa: E402

MiB = 1 << 20


def default_dirs() -> list[str]:
    return [sysconfig.get_paths()["purelib"]]


def make_tar(dirs: list[str], path: Path) -> int:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            tar.add(d, arcname=d.lstrip("/"))
    return path.stat().st_size


def convert(src: Path, out: Path, level: int, threads: int, chunk_size: int):
    start, cpu_start, main_start = time.perf_counter(), time.process_time(), time.thread_time()
    with open(src, "rb") as f, open(out, "wb") as o:
        result = build_layer(f, o, level=level, threads=threads, chunk_size=chunk_size)
    return (time.perf_counter() - start, time.process_time() - cpu_start, time.thread_time() - main_start,
            result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dirs", nargs="+", default=None)
    parser.add_argument("--levels", default="3")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    args = parser.parse_args()
    dirs = args.dirs or default_dirs()
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmpdir = Path(tmp)
        tar_path, gz_path = tmpdir / "layer.tar", tmpdir / "layer.tar.gz"
        tar_size = make_tar(dirs, tar_path)
        start = time.perf_counter()
        with open(gz_path, "wb") as gz:
            subprocess.run(["gzip", "-6", "-c", str(tar_path)], stdout=gz, check=True)
        gzip_time = time.perf_counter() - start
        gz_size = gz_path.stat().st_size
        print(f"input: {', '.join(dirs)}")
        print(f"tar {tar_size / MiB:.1f} MiB; gzip -6 {gz_size / MiB:.1f} MiB in {gzip_time:.1f} s "
              f"({tar_size / MiB / gzip_time:.0f} MiB/s)")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'input':<6} {'level':>5} {'threads':>7} {'seconds':>8} {'MiB/s':>7} {'cpu s':>7} {'MiB/cpu-s':>9} {'main s':>6} "
              f"{'blob MiB':>9} {'vs gzip':>7} {'meta MiB':>8} {'chunks':>7} {'files':>7}")
        for source, label in ((gz_path, "gzip"), (tar_path, "tar")):
            for level in (int(x) for x in args.levels.split(",")):
                for threads in (int(x) for x in args.threads.split(",")):
                    out = tmpdir / "out.blob"
                    seconds, cpu, main_cpu, r = convert(source, out, level, threads, args.chunk_size)
                    print(f"{label:<6} {level:>5} {threads:>7} {seconds:>8.2f} {tar_size / MiB / seconds:>7.1f} "
                          f"{cpu:>7.1f} {tar_size / MiB / cpu:>9.1f} {main_cpu:>6.1f} "
                          f"{r.size / MiB:>9.1f} {r.size / gz_size:>7.3f} {r.index.meta.stored_size / MiB:>8.2f} "
                          f"{r.stats.chunks:>7} {r.stats.files:>7}")
                    out.unlink()
        print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
