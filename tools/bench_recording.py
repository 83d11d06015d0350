"""CPU cost of automatic trace recording on the FUSE read path (lazyfs.daemon.learned.Recorder).

    .venv/bin/python tools/bench_recording.py

Prints the time of one ``Recorder.on_chunks`` call for a read of a chunk not read before (a
cold start's first reads), of a chunk read before, and of a layer no recording covers (what
every read costs once recordings have ended: one dict look-up). The end-to-end cost on a
start is cell (r) against (a) of tools/bench_prefetch.py.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyfs.daemon.learned import LearnedTraces, Recorder, RecordingPolicy  # noqa: E402

READS = 20_000
LAYER = "sha256:" + "1" * 64


class _Store:
    name = "bench"  # all add_layer uses of a store


async def main() -> None:
    recorder = Recorder(Path(tempfile.gettempdir()), RecordingPolicy(), lambda trace: None, LearnedTraces())
    recorder.add_layer(_Store(), "ref", "sha256:" + "0" * 64, LAYER, False)
    cases = {
        "new chunk": lambda i: recorder.on_chunks(LAYER, 1 << 20, i // 4, [i]),
        "chunk read before": lambda i: recorder.on_chunks(LAYER, 1 << 20, i // 4, [i % 1000]),
        "layer not recorded": lambda i: recorder.on_chunks("sha256:" + "2" * 64, 1 << 20, i, [i]),
    }
    for name, call in cases.items():
        began = time.perf_counter()
        for i in range(READS):
            call(i)
        print(f"{name:<20} {(time.perf_counter() - began) / READS * 1e6:6.2f} us per read")


if __name__ == "__main__":
    trio.run(main)
