"""Replay a recorded start through the locality policy's guesses: how many of its chunk reads
would have been guessed by an earlier miss, and at what cost in guessed bytes.

    .venv/bin/python tools/locality_replay.py OCI_DIR TRACE

OCI_DIR is the converted image's OCI layout (its layer blobs are read locally), TRACE a trace
of a start of it (`lazyfs trace record ... -o TRACE IMAGE -- CMD`). Every guess counts as
fetched in time (an upper bound: a real start's reads may come before the guesses arrive).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyfs.daemon.attach import file_map  # noqa: E402
from lazyfs.fetch.policies import LayerInfo  # noqa: E402
from lazyfs.fetch.policies.locality import LocalityPolicy  # noqa: E402
from lazyfs.layer.reader import open_blob_file  # noqa: E402
from lazyfs.trace.format import Trace  # noqa: E402

VARIANTS = {
    "locality (default)": LocalityPolicy(),
    "blob window only": LocalityPolicy(file_bytes=0, directory_bytes=0),
    "rest of file only": LocalityPolicy(window_bytes=0, directory_bytes=0),
    "directory only": LocalityPolicy(window_bytes=0, file_bytes=0),
    "4 MiB window, 128 chunks": LocalityPolicy(window_bytes=4 << 20, max_chunks=128),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("oci_dir", type=Path)
    parser.add_argument("trace", type=Path)
    args = parser.parse_args()
    trace = Trace.decode(args.trace.read_bytes())
    layers = {}
    for digest in trace.layers:
        with open(args.oci_dir / "blobs" / "sha256" / digest.partition(":")[2], "rb") as f:
            layer = open_blob_file(f)
            info = LayerInfo(digest, None, layer.chunk_count, layer.chunk_ref)  # type: ignore[arg-type]
            info.files = file_map(layer)
            info.blob_order()
            layers[digest] = info
    print(f"{'policy':<26} {'reads':>6} {'guessed':>8} {'guesses':>8} {'MiB guessed':>12}")
    for name, policy in VARIANTS.items():
        guessed: set[tuple[str, int]] = set()
        seen: set[tuple[str, int]] = set()
        hits = reads = 0
        guessed_bytes = 0
        for access in trace.accesses:
            info = layers[access.layer]
            chunks = [n for n in range(access.first, access.last + 1) if (access.layer, n) not in seen]
            if not chunks:
                continue
            misses = [n for n in chunks if (access.layer, n) not in guessed]
            reads += len(chunks)
            hits += len(chunks) - len(misses)
            seen.update((access.layer, n) for n in chunks)
            if misses:
                for n in policy.guesses(info, misses):
                    if (access.layer, n) not in guessed and (access.layer, n) not in seen:
                        guessed.add((access.layer, n))
                        guessed_bytes += info.chunk_ref(n).stored_length
        print(f"{name:<26} {reads:6d} {hits:8d} {len(guessed):8d} {guessed_bytes / 2**20:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
