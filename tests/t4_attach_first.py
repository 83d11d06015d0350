"""Attach-critical work goes first: a layer that attaches while another layer's trace prefetch
is on the link gets the link (real daemon, real registry, the fault proxy holding the prefetch
request so that it is certainly in flight)."""

from __future__ import annotations

import random
import re
import time

from lazyfs.daemon.control import request
from lazyfs.trace.format import Access, Trace
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures.common import require_root
from tests.fixtures.images import build_image, directory, file
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import start_shared_daemon, stop_daemon

CHUNK = 65536
rng = random.Random(4)
FILES = {"app/main": rng.randbytes(300_000), "data/unused": rng.randbytes(500_000), "app/lib": rng.randbytes(200_000)}
LAYERS = [[directory("app"), file("app/main", FILES["app/main"]), directory("data"),
           file("data/unused", FILES["data/unused"])],
          [directory("app"), file("app/lib", FILES["app/lib"])]]


def _until(what: str, condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.02)


def test_second_layer_attaches_while_the_first_layers_prefetch_yields(registry, tmp_path):
    require_root()
    trace = Trace({"sha256:" + "0" * 64: CHUNK}, [Access(0, "sha256:" + "0" * 64, 99, 0, 1, "/app/main"),
                                                   Access(3, "sha256:" + "0" * 64, 98, 0, 0, "/app/lib")])
    image = convert_image(build_image(LAYERS), chunk_size=CHUNK, trace=trace.encode())
    push_to_registry(registry, "t/attach-first", image)
    first, second = (layer.digest for layer in image.layers)
    socket, fuse = tmp_path / "daemon.sock", tmp_path / "fuse"
    with FaultProxy(registry.host) as proxy:
        # The first layer's first prefetch request (its traced chunks are stored first, after
        # the blob's header; its sections are at the end) gets no answer: it stays in flight
        # until it yields.
        near_start = r"^bytes=\d{1,3}-"
        proxy.add(Fault.stall(), method="GET", path=first, range=near_start)
        daemon = start_shared_daemon(socket, fuse, tmp_path / "cache", tmp_path / "daemon.log",
                                     "--request-timeout", "300")
        try:
            def attach(name: str, layer) -> None:
                request(str(socket), "attach", name=name, kind="lazyfs", ref=f"{proxy.host}/t/attach-first:v1",
                        digest=layer.digest, size=layer.descriptor.size,
                        annotations=dict(layer.descriptor.annotations), prefetch=True)

            attach("l0", image.layers[0])
            stalled = _until("prefetch request", lambda: [r for r in proxy.requests if r.fault == "stall"],
                             timeout=30)
            began = time.monotonic()
            attach("l1", image.layers[1])
            attached = time.monotonic()

            during = [r for r in proxy.requests if began <= r.time <= attached]
            assert any(second in r.path and r.range for r in during), "the second layer's sections"
            assert not [r for r in during if first in r.path], "a request of the first layer during the attach"
            # The stalled request was given up when the attach began (not after the 300 s
            # request bound): its chunks are asked for again once the attach is over.
            again = _until("resumed prefetch", lambda: [
                r for r in proxy.requests if first in r.path and r.range and re.match(near_start, r.range)
                and r.seq > stalled[0].seq])
            assert again[0].time > attached

            def prefetched():
                stats = request(str(socket), "stats")
                fetch, layers = stats["fetch"], request(str(socket), "list")["layers"]
                wanted = sum(layer.get("prefetch_chunks", 0) for layer in layers)
                done = fetch["done"]["prefetch"] + fetch["already_cached"]["prefetch"]
                return len(layers) == 2 and wanted > 0 and done >= wanted and stats
            stats = _until("finished prefetch", prefetched)
            assert stats["fetch"]["failed_chunks"] == 0
            assert (fuse / "l0" / "app" / "main").read_bytes() == FILES["app/main"]
            assert (fuse / "l1" / "app" / "lib").read_bytes() == FILES["app/lib"]
        finally:
            stop_daemon(daemon, fuse)
