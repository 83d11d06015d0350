"""How fast the EROFS writer builds large trees.

    .venv/bin/python tools/bench_erofs_writer.py [--entries 200000 50000 ...]

Each tree has directories of 100 entries: 70% small inline files (0..2000 bytes), 20% chunked
files (1..3 chunks), 5% symlinks, 5% files carrying an xattr shared by many inodes. Prints add()
and write() wall time, their CPU time (robust against other load on the machine), image size,
bytes of image per inode and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyfs.erofs import format as fmt  # noqa: E402
from lazyfs.erofs.writer import Builder, ChunkedData, Entry  # noqa: E402

CHUNK = 1 << 20


def make_entries(count: int, seed: int = 1) -> list[Entry]:
    rng = random.Random(seed)
    payloads = [rng.randbytes(n) for n in (0, 10, 100, 500, 1000, 2000)]
    entries = [Entry(b"", fmt.S_IFDIR | 0o755, mtime=1_700_000_000)]
    next_chunk = 0
    directory = b""
    for i in range(count - 1):
        if i % 100 == 0:
            directory = b"dir%06d" % (i // 100)
            entries.append(Entry(directory, fmt.S_IFDIR | 0o755, mtime=1_700_000_000))
            continue
        path = directory + b"/file-%08d.py" % i
        roll = rng.random()
        if roll < 0.70:
            entries.append(Entry(path, fmt.S_IFREG | 0o644, mtime=1_700_000_000,
                                 data=rng.choice(payloads)))
        elif roll < 0.90:
            n = rng.randrange(1, 4)
            entries.append(Entry(path, fmt.S_IFREG | 0o644, mtime=1_700_000_000,
                                 data=ChunkedData(n * CHUNK - 7, list(range(next_chunk, next_chunk + n)))))
            next_chunk += n
        elif roll < 0.95:
            entries.append(Entry(path, fmt.S_IFLNK | 0o777, mtime=1_700_000_000,
                                 link_target=b"../some/where/else"))
        else:
            entries.append(Entry(path, fmt.S_IFREG | 0o644, mtime=1_700_000_001,
                                 xattrs={b"security.selinux": b"system_u:object_r:usr_t:s0\0"}))
    return entries


def measure(count: int) -> tuple[int, float, float, float, int, float]:
    entries = make_entries(count)
    builder = Builder()
    start, start_cpu = time.perf_counter(), time.process_time()
    for entry in entries:
        builder.add(entry)
    added = time.perf_counter()
    out = io.BytesIO()
    info = builder.write(out)
    written, written_cpu = time.perf_counter(), time.process_time()
    return (len(entries), added - start, written - added, written_cpu - start_cpu,
            info.image_size, info.image_size / info.inodes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    args = parser.parse_args()
    print(f"{'entries':>9} {'add s':>7} {'write s':>8} {'total s':>8} {'CPU s':>7} "
          f"{'image MiB':>10} {'B/inode':>8} {'peak RSS MiB':>13}")
    for count in args.entries:
        n, add_s, write_s, cpu_s, size, per_inode = measure(count)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{n:>9} {add_s:>7.2f} {write_s:>8.2f} {add_s + write_s:>8.2f} {cpu_s:>7.2f} "
              f"{size / 2**20:>10.1f} {per_inode:>8.0f} {rss:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
