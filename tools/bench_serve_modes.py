#!/usr/bin/env python3
"""Reading one big file through each serving mode (FUSE tree; kernel EROFS over a loop device
with and without direct I/O), chunk cache warm; prints a table.

    .venv/bin/python tools/bench_serve_modes.py [--big-mib 512] [--chunk-kib 1024]

For each mode a daemon (`python -m lazyfs.daemon`, shared cache, warmed by a first read) serves
the layer through `lazyfs mount --daemon`; then, per mode: all page caches dropped
(`echo 3 > /proc/sys/vm/drop_caches`), a first sequential read in 1 MiB pieces, the growth of
the page cache it caused (`Cached` in /proc/meminfo: a file cached twice shows twice its size),
the best of three second reads (page cache), and the kernel read requests that reached the
daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mount import big_file_tar, convert, push, timed_read  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402

MiB = 1 << 20
MODES = {  # name -> daemon arguments
    "fuse": ["--serve", "fuse"],
    "kernel, loop direct I/O on": ["--serve", "kernel", "--loop-direct-io", "on"],
    "kernel, loop direct I/O off": ["--serve", "kernel", "--loop-direct-io", "off"],
}


def cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "lazyfs.cli", *args], check=True, capture_output=True,
                          text=True).stdout


def cached_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Cached in /proc/meminfo")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Daemon:
    def __init__(self, work: Path, name: str, args: list[str], cache: Path, registry_host: str):
        self.dir = work / name.replace(" ", "-").replace(",", "").replace("/", "")
        self.dir.mkdir()
        self.socket = self.dir / "control.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lazyfs.daemon", "--fuse-dir", str(self.dir / "fuse"), "--socket",
             str(self.socket), "--cache-dir", str(cache), "--insecure-registry", registry_host, *args],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "daemon.log", "wb"))
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {(self.dir / 'daemon.log').read_text()}")
            time.sleep(0.05)
        self.mnt = self.dir / "mnt"
        self.mnt.mkdir()

    def mount(self, image: str, digest: str) -> None:
        cli("mount", "--run-dir", str(self.dir / "run"), "--daemon", str(self.socket), "--layer", digest, image,
            str(self.mnt))

    def reads(self) -> int:
        return json.loads(cli("stats", "--json", "--socket", str(self.socket), str(self.mnt)))["reads"]["requests"]

    def close(self) -> None:
        cli("umount", "--run-dir", str(self.dir / "run"), str(self.mnt))
        self.proc.terminate()
        self.proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=512)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        big_file_tar(work / "big.tar", args.big_mib * MiB)
        big = convert(work / "big.tar", work / "big.blob", args.chunk_kib * 1024)
        (work / "big.tar").unlink()
        with start_registry(work / "registry") as registry:
            trio.run(push, registry.host, "bench/serve", [(work / "big.blob", big)])
            image = f"{registry.host}/bench/serve:v1"
            cache = work / "cache"
            for name, daemon_args in MODES.items():
                daemon = Daemon(work, name, daemon_args, cache, registry.host)
                try:
                    daemon.mount(image, big.digest)
                    path = daemon.mnt / "big.bin"
                    timed_read(path)  # the first mode fills the chunk cache
                    drop_caches()
                    before_cached, before_reads = cached_mib(), daemon.reads()
                    first_s, n = timed_read(path)
                    grown = cached_mib() - before_cached
                    assert n == args.big_mib * MiB
                    second_s = min(timed_read(path)[0] for _ in range(3))
                    rows.append((name, f"{args.big_mib / first_s:.0f} MiB/s", f"{grown:.0f} MiB",
                                 f"{args.big_mib / second_s:.0f} MiB/s", str(daemon.reads() - before_reads)))
                finally:
                    daemon.close()
    header = ("mode", "first read (warm chunk cache)", "page cache growth", "second read", "daemon reads")
    width = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"{args.big_mib} MiB file, {args.chunk_kib} KiB chunks")
    print(" | ".join(h.ljust(w) for h, w in zip(header, width)))
    print("-+-".join("-" * w for w in width))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, width)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
