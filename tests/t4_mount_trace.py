"""Access traces: recorded on a mount, prefetched from a file or from the layer itself."""

from __future__ import annotations

import random

import pytest

from lazyfs.trace.format import Access, Trace
from tests.faultproxy import FaultProxy
from tests.fixtures.common import require_root
from tests.fixtures.images import build_image, directory, file
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import lazy_mount, lazyfs_cli, wait_for_prefetch

CHUNK = 65536
rng = random.Random(5)
FILES = {"app/main": rng.randbytes(300_000), "app/lib": rng.randbytes(200_000),
         "data/unused": rng.randbytes(1_000_000), "data/other": rng.randbytes(150_000)}
LAYERS = [[directory("app"), file("app/main", FILES["app/main"]), directory("data"),
           file("data/unused", FILES["data/unused"])],
          [directory("app"), file("app/lib", FILES["app/lib"]), directory("data"),
           file("data/other", FILES["data/other"])]]
STARTUP = ("app/main", "app/lib")


def _push(registry, repo: str, trace: bytes | None = None) -> str:
    image = convert_image(build_image(LAYERS), chunk_size=CHUNK, trace=trace)
    push_to_registry(registry, repo, image)
    return repo


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.host) as running:
        yield running


def _chunk_requests(proxy) -> int:
    return len([r for r in proxy.requests if "/blobs/" in r.path and r.range is not None])


def test_trace_round_trip():
    trace = Trace({"sha256:" + "a" * 64: 65536},
                  [Access(0, "sha256:" + "a" * 64, 40, 0, 3, "/dir with space/f\tx"), Access(5, "plain:x", 2, 7, 7, "?")])
    again = Trace.decode(trace.encode())
    assert again == trace
    assert again.chunks_of("sha256:" + "a" * 64) == [0, 1, 2, 3]


@pytest.mark.parametrize("serve", ["fuse", "kernel"])
def test_record_then_prefetch_from_the_trace_file(registry, proxy, serve, tmp_path):
    """In both serving modes (kernel: the daemon sees chunk-device reads and names the files
    through the metadata)."""
    require_root()
    repo = _push(registry, f"t/mount-trace-{serve}:v1")
    image = f"{proxy.host}/{repo}"
    trace_file = tmp_path / "startup.trace"
    with lazy_mount(tmp_path / "mnt", "--serve", serve, image, run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache-a") as mount:
        lazyfs_cli("trace", "start", "--run-dir", str(mount.run_dir), str(mount.path))
        for rel in STARTUP:
            assert (mount.path / rel).read_bytes() == FILES[rel]
        lazyfs_cli("trace", "stop", "--run-dir", str(mount.run_dir), "-o", str(trace_file), str(mount.path))
    trace = Trace.decode(trace_file.read_bytes())
    assert [a.path for a in trace.accesses] == ["/app/main", "/app/lib"]
    assert len(trace.layers) == 2

    with lazy_mount(tmp_path / "mnt", "--serve", serve, "--trace", str(trace_file), image, run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache-b") as mount:
        stats = wait_for_prefetch(mount, layers=2)
        assert sum(layer.get("prefetch_chunks", 0) for layer in stats["attached"]) == 5 + 4
        proxy.clear_requests()
        for rel in STARTUP:
            assert (mount.path / rel).read_bytes() == FILES[rel]
        assert _chunk_requests(proxy) == 0, "the traced files were prefetched"
        assert (mount.path / "data/unused").read_bytes() == FILES["data/unused"]
        assert _chunk_requests(proxy) > 0


def test_embedded_trace_is_prefetched_by_path(registry, proxy, tmp_path):
    require_root()
    recorded = Trace({"sha256:" + "0" * 64: CHUNK},
                     [Access(0, "sha256:" + "0" * 64, 99, 0, 1, "/app/main"),
                      Access(3, "sha256:" + "0" * 64, 98, 0, 0, "/app/lib")])
    repo = _push(registry, "t/mount-trace-embedded:v1", trace=recorded.encode())
    with lazy_mount(tmp_path / "mnt", f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        stats = wait_for_prefetch(mount, layers=2)
        assert sum(layer.get("prefetch_chunks", 0) for layer in stats["attached"]) == 5 + 4
        proxy.clear_requests()
        for rel in STARTUP:
            assert (mount.path / rel).read_bytes() == FILES[rel]
        assert _chunk_requests(proxy) == 0
