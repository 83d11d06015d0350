#!/usr/bin/env python3
"""EROFS reader benchmark: open time and stat-walk throughput on a large image.

Builds a tree of N entries (default 200k: directories of 1000 small files), makes an image
with mkfs.erofs and, when it works, with lazyfs's own writer, then measures side by side:

* build time of each image;
* open time: Image.open() + resolving one path (the median of several runs);
* a full stat walk with the reader (walk() + mode/uid/gid/size/mtime/nlink of every inode);
* dump.erofs -s (superblock only) and dump.erofs --path on one file;
* the kernel: `mount -t erofs -o loop`, then `find -printf` of the same attributes, with a
  cold cache (drop_caches) and warm.

Everything lives on tmpfs (/dev/shm) when there is one.

Needs root (mount, drop_caches). Usage: .venv/bin/python tools/bench_erofs.py [--entries N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyfs.erofs.reader import Image  # noqa: E402

FILES_PER_DIR = 1000


def make_tree(root: Path, entries: int) -> str:
    """About `entries` entries; returns the path of one file deep in the middle."""
    root.mkdir()
    ndirs = max(1, entries // (FILES_PER_DIR + 1))
    made = 0
    for d in range(ndirs):
        sub = root / f"dir{d:04d}"
        sub.mkdir()
        made += 1
        for f in range(FILES_PER_DIR):
            fd = os.open(sub / f"file-{f:04d}.txt", os.O_CREAT | os.O_WRONLY, 0o644)
            if f % 10 == 0:
                os.write(fd, b"x" * (f % 300))
            os.close(fd)
            made += 1
    return f"/dir{ndirs // 2:04d}/file-{FILES_PER_DIR // 2:04d}.txt"


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def stat_walk(image: Path) -> int:
    count = 0
    with Image.open(image) as img:
        for _path, inode in img.walk():
            (inode.mode, inode.uid, inode.gid, inode.size, inode.mtime, inode.mtime_nsec,
             inode.nlink)
            count += 1
    return count


def open_and_resolve(image: Path, path: str) -> int:
    with Image.open(image) as img:
        return img.resolve(path)


def build_with_writer(src: Path, image: Path) -> None:
    from lazyfs.erofs.writer import Builder

    builder = Builder()
    builder.add_tree(str(src))
    with open(image, "wb") as out:
        builder.write(out)


def kernel_find(image: Path, mnt: Path) -> list[tuple[str, float, int]]:
    subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(mnt)], check=True)
    try:
        results = []
        for label in ("cold", "warm"):
            if label == "cold":
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            t0 = time.perf_counter()
            out = subprocess.run(["find", str(mnt), "-printf", "%m %U %G %s %T@ %n\n"],
                                 check=True, capture_output=True).stdout
            results.append((label, time.perf_counter() - t0, out.count(b"\n")))
        return results
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (kernel mount, drop_caches)", file=sys.stderr)
        return 1
    rows: list[tuple[str, str, str]] = []
    # On tmpfs, so the numbers measure the readers rather than this machine's disk.
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bench-erofs-", dir=scratch) as tmp:
        tmpdir = Path(tmp)
        src = tmpdir / "src"
        t, probe = timed(lambda: make_tree(src, args.entries))
        rows.append(("source tree", f"{args.entries} entries", f"{t:.1f} s to create"))

        images = {}
        mkfs_img = tmpdir / "mkfs.img"
        t, _ = timed(lambda: subprocess.run(["mkfs.erofs", "--quiet", str(mkfs_img), str(src)], check=True))
        images["mkfs.erofs"] = mkfs_img
        rows.append(("build", "mkfs.erofs 1.5", f"{t:.2f} s, {mkfs_img.stat().st_size >> 20} MiB"))
        writer_img = tmpdir / "writer.img"
        try:
            t, _ = timed(lambda: build_with_writer(src, writer_img))
            images["lazyfs writer"] = writer_img
            rows.append(("build", "lazyfs writer", f"{t:.2f} s, {writer_img.stat().st_size >> 20} MiB"))
        except Exception as e:  # the writer is optional here: report, keep measuring
            rows.append(("build", "lazyfs writer", f"failed: {type(e).__name__}: {e}"))

        for label, image in images.items():
            t, _ = timed(lambda: open_and_resolve(image, probe), repeat=7)
            rows.append(("open + resolve", f"reader, {label} image", f"{t * 1000:.2f} ms"))
            cpu0 = time.process_time()
            t, n = timed(lambda: stat_walk(image), repeat=3)
            cpu = (time.process_time() - cpu0) / 3
            rows.append(("stat walk", f"reader, {label} image",
                         f"{n / t:,.0f} entries/s ({n} in {t:.2f} s; {n / cpu:,.0f}/s of CPU time)"))

        t, _ = timed(lambda: subprocess.run(["dump.erofs", "-s", str(mkfs_img)], check=True,
                                            capture_output=True), repeat=5)
        rows.append(("superblock", "dump.erofs -s", f"{t * 1000:.2f} ms"))
        t, _ = timed(lambda: subprocess.run(["dump.erofs", f"--path={probe}", str(mkfs_img)], check=True,
                                            capture_output=True), repeat=5)
        rows.append(("open + resolve", "dump.erofs --path", f"{t * 1000:.2f} ms"))

        mnt = tmpdir / "mnt"
        mnt.mkdir()
        for label, secs, n in kernel_find(mkfs_img, mnt):
            rows.append(("stat walk", f"kernel find -printf ({label})", f"{n / secs:,.0f} entries/s ({n} in {secs:.2f} s)"))

    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
