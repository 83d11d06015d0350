"""Model a start without a trace as a chain of dependent reads, under fetch policies' guesses.

    .venv/bin/python tools/notrace_model.py OCI_DIR TRACE [--cpu 2.5] [--rtt-ms 20] [--rate-mbit 100]

OCI_DIR is the converted image's OCI layout (its layer blobs are read locally), TRACE a trace
of a start of it (`lazyfs trace record ... -o TRACE IMAGE -- CMD`). The trace's reads are
replayed in order, one after the other (each read depends on the one before: an import
reads the next module only once it has run this one), with the workload's CPU time spread
evenly between them. A read whose chunks are neither fetched nor on their way costs a round
trip (an on-demand request: RTT + overhead + its bytes at the link rate) and tells the policy
of the miss; guesses stored right after the missed chunks ride along in its request (256 KiB).
As in the fetch scheduler, the other guesses stream only while no on-demand request is in
flight, first queued first sent (``--front``: newest first), and an on-demand request first
waits for the guesses already sent (``--pipe-kib``). A read whose chunks are queued within
256 KiB of the head waits for them instead of asking. The model prints per policy: dependent
round trips, waits, stored MiB and chunks fetched, and the estimated start

    round trips x (RTT + overhead) + on-demand bytes / rate + waits behind guesses + CPU
    + chunks x --chunk-cpu-ms

The variants compared are the locality policy's and ExtentPolicy.MODEL_VARIANTS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyfs.daemon.attach import file_map  # noqa: E402
from lazyfs.fetch.policies import LayerInfo  # noqa: E402
from lazyfs.fetch.policies.locality import LocalityPolicy  # noqa: E402
from lazyfs.fetch.policies.extent import ExtentPolicy  # noqa: E402
from lazyfs.layer.reader import open_blob_file  # noqa: E402
from lazyfs.trace.format import Trace  # noqa: E402


def load_layers(oci_dir: Path, trace: Trace) -> dict[str, LayerInfo]:
    layers = {}
    for digest in trace.layers:
        with open(oci_dir / "blobs" / "sha256" / digest.partition(":")[2], "rb") as f:
            layer = open_blob_file(f)
            info = LayerInfo(digest, None, layer.chunk_count, layer.chunk_ref)  # type: ignore[arg-type]
            info.files = file_map(layer)
            info.blob_order()
            layers[digest] = info
    return layers


class Link:
    """One link: on-demand requests first; guesses stream in queue order when it is free."""

    def __init__(self, rtt: float, rate: float, overhead: float, pipe: int):
        self.rtt, self.rate, self.overhead = rtt, rate, overhead
        self.pipe = pipe
        self.queue: list[tuple[str, int, int]] = []  # (layer, chunk, stored bytes) in send order
        self.sent_partial = 0  # bytes of queue[0] already through the link
        self.clock = 0.0  # time up to which the link's work is accounted
        self.arrived: set[tuple[str, int]] = set()
        self.guessed_bytes = 0
        self.on_demand_bytes = 0
        self.chunks = 0  # fetched, each a decode, a verify and a cache file

    def advance(self, until: float) -> None:
        """Stream guesses from self.clock to ``until``."""
        budget = (until - self.clock) * self.rate
        self.clock = max(self.clock, until)
        while self.queue and budget > 0:
            layer, n, size = self.queue[0]
            need = size - self.sent_partial
            if need <= budget:
                budget -= need
                self.queue.pop(0)
                self.sent_partial = 0
                self.arrived.add((layer, n))
            else:
                self.sent_partial += int(budget)
                budget = 0

    def bytes_ahead(self, keys: set[tuple[str, int]]) -> int | None:
        """Queued bytes up to and including the last of ``keys``; None if one is not queued."""
        total, left = -self.sent_partial, set(keys)
        for layer, n, size in self.queue:
            total += size
            left.discard((layer, n))
            if not left:
                return total
        return None

    def guess(self, layer: str, chunks: list[tuple[int, int]], front: bool) -> None:
        queued = {(l, n) for l, n, _ in self.queue}
        new = [(layer, n, size) for n, size in chunks if (layer, n) not in self.arrived and (layer, n) not in queued]
        self.guessed_bytes += sum(size for _, _, size in new)
        self.chunks += len(new)
        if front and self.queue:  # after the chunk being sent
            self.queue[1:1] = new
        else:
            self.queue.extend(new)

    def on_demand(self, now: float, layer: str, chunks: list[tuple[int, int]]) -> float:
        """An on-demand request at ``now``: when its chunks are in. Guesses pause meanwhile."""
        self.advance(now)
        keys = {(layer, n) for n, _ in chunks}
        self.queue = [item for item in self.queue if (item[0], item[1]) not in keys]
        nbytes = sum(size for _, size in chunks)
        self.on_demand_bytes += nbytes
        self.chunks += len(chunks)
        transfer = nbytes / self.rate
        # Guesses stop while an on-demand request is in flight (the scheduler cuts them), but
        # what the server has sent of them (up to ``pipe`` bytes) is still ahead on the link.
        ahead = 0.0
        if self.queue and self.pipe:
            ahead = min(self.pipe, sum(size for _, _, size in self.queue) - self.sent_partial) / self.rate
            self.advance(now + ahead)
        done = now + ahead + self.rtt + self.overhead + transfer
        self.clock = done
        self.arrived.update(keys)
        return done


Guesser = Callable[[LayerInfo, list[int]], list[int]]


def replay(layers: dict[str, LayerInfo], trace: Trace, guesser: Guesser | None, *, rtt: float, rate: float,
           overhead: float, cpu: float, pipe: int, chunk_cpu: float, front: bool = False, cut_ahead: int = 256 << 10) -> dict:
    link = Link(rtt, rate, overhead, pipe)
    accesses = [a for a in trace.accesses]
    gap = cpu / max(1, len(accesses))
    now = 0.0
    trips = waits = 0
    waited = 0.0
    seen: set[tuple[str, int]] = set()
    for access in accesses:
        now += gap
        info = layers[access.layer]
        chunks = [n for n in range(access.first, access.last + 1)]
        link.advance(now)
        missing = {(access.layer, n) for n in chunks if (access.layer, n) not in link.arrived}
        seen.update((access.layer, n) for n in chunks)
        if not missing:
            continue
        ahead = link.bytes_ahead(missing)
        own = sum(info.chunk_ref(n).stored_length for _, n in missing)
        if ahead is not None and ahead - own <= cut_ahead:
            waits += 1
            done = now + ahead / rate
            link.advance(done)
            waited += done - now
            now = done
            continue
        # Neither fetched nor close in the queue: a round trip (chunks already queued further
        # back are taken out of the queue into the request; the policy hears of the rest).
        queued = {(l, n) for l, n, _ in link.queue}
        fresh = [n for _, n in missing if (access.layer, n) not in queued]
        trips += 1
        request = sorted(n for _, n in missing)
        guesses = guesser(info, fresh) if (guesser and fresh) else []
        # Guesses stored right after the missed chunks ride along in the same request.
        end = max(info.chunk_ref(n).end for n in request)
        ride = 256 << 10
        riders = []
        for n in guesses:
            ref = info.chunk_ref(n)
            if ref.offset >= end and ref.offset - end <= 64 << 10 and ref.end - end <= ride:
                riders.append(n)
                ride -= ref.end - end
                end = ref.end
        finish = link.on_demand(now, access.layer, [(n, info.chunk_ref(n).stored_length) for n in request])
        link.arrived.update((access.layer, n) for n in riders)
        link.guessed_bytes += sum(info.chunk_ref(n).stored_length for n in riders)
        link.chunks += len(riders)
        now = finish
        link.guess(access.layer, [(n, info.chunk_ref(n).stored_length) for n in guesses if n not in riders], front)
    fetched = link.on_demand_bytes + link.guessed_bytes
    # Chunks are decoded, verified and written off the reader's path, but on a machine with
    # few cores they take CPU from the workload.
    return {"trips": trips, "waits": waits, "waited": waited, "time": now + link.chunks * chunk_cpu,
            "fetched": fetched, "guessed": link.guessed_bytes, "chunks": link.chunks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("oci_dir", type=Path)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--cpu", type=float, default=2.5, help="the workload's CPU seconds (a warm start)")
    parser.add_argument("--rtt-ms", type=float, default=20)
    parser.add_argument("--overhead-ms", type=float, default=5, help="per request, client + registry")
    parser.add_argument("--rate-mbit", type=float, default=100)
    parser.add_argument("--pipe-kib", type=int, default=256,
                        help="guessed bytes already sent when an on-demand request cuts them")
    parser.add_argument("--chunk-cpu-ms", type=float, default=0.3,
                        help="CPU per fetched chunk (decode, verify, cache file) taken from the workload")
    parser.add_argument("--front", action="store_true", help="newest guesses first (default: queue order)")
    args = parser.parse_args()
    trace = Trace.decode(args.trace.read_bytes())
    layers = load_layers(args.oci_dir, trace)
    rate = args.rate_mbit * 1e6 / 8
    needed = sum(layers[d].chunk_ref(n).stored_length for d in trace.layers for n in trace.chunks_of(d))
    image = sum(sum(layers[d].chunk_ref(n).stored_length for n in range(layers[d].chunk_count)) for d in layers)
    print(f"trace: {len(trace.accesses)} reads, {needed / 2**20:.1f} MiB stored needed; layers "
          f"{image / 2**20:.1f} MiB stored; link {args.rate_mbit:g} Mbit/s + {args.rtt_ms:g} ms, "
          f"CPU {args.cpu:g} s")
    variants: dict[str, Guesser | None] = {
        "none": None,
        "locality": LocalityPolicy().guesses,
        "locality 4 MiB/128": LocalityPolicy(window_bytes=4 << 20, max_chunks=128).guesses,
    }
    for label, kwargs in ExtentPolicy.MODEL_VARIANTS.items():
        variants[label] = ExtentPolicy(**kwargs).guesses
    print(f"{'policy':<30} {'round trips':>11} {'waits':>6} {'wait s':>7} {'MiB fetched':>12} {'chunks':>7} {'est. s':>7}")
    for label, guesser in variants.items():
        if isinstance(getattr(guesser, "__self__", None), ExtentPolicy):
            guesser.__self__.reset()
        r = replay(layers, trace, guesser, rtt=args.rtt_ms / 1000, rate=rate, overhead=args.overhead_ms / 1000,
                   cpu=args.cpu, pipe=args.pipe_kib << 10, front=args.front,
                   chunk_cpu=args.chunk_cpu_ms / 1000)
        print(f"{label:<30} {r['trips']:11d} {r['waits']:6d} {r['waited']:7.2f} {r['fetched'] / 2**20:12.1f} "
              f"{r['chunks']:7d} {r['time']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
