"""The trace-ordered layout end to end: a start recorded on a converted image, the image
converted again with `lazyfs convert --trace`, then (a) stock containerd (overlayfs snapshotter)
unpacks and runs it, (b) it mounts lazily with the same tree as the unordered image, and (c) the
prefetch of its embedded trace needs a request per layer where the image converted with
`--trace --keep-order` (trace embedded, input order), prefetching the same trace, needs one per
traced file (counted at the proxy in front of the registry)."""

from __future__ import annotations

import hashlib
import math
import random

import pytest
import trio

from lazyfs import cli
from lazyfs.registry import open_store
from lazyfs.trace.format import Trace
from lazyfs.fetch.scheduler import PREFETCH_REQUEST_BYTES
from tests.faultproxy import FaultProxy
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.images import build_image, directory, file, push_image, symlink
from tests.fixtures.lazymount import lazy_mount, lazyfs_cli, tree_signature, wait_for_prefetch
from tests.t4_convert import busybox_bytes, manifest_of

CHUNK = 65536
TRACED_COUNT = 12
rng = random.Random(11)
# Traced and untraced files alternate in the tar, so without reordering every traced file is a
# separate run of chunks, more than the fetcher's coalescing gap (64 KiB) away from the next.
FILES = {}
for i in range(TRACED_COUNT):
    FILES[f"app/t{i:02d}"] = rng.randbytes(150_000 + i)
    FILES[f"app/u{i:02d}"] = rng.randbytes(150_000 + i)
FILES["opt/late"] = rng.randbytes(200_000)
FILES["opt/cold"] = rng.randbytes(300_000)
# First access order differs from the tar order: the layout follows the trace.
STARTUP = [f"app/t{i:02d}" for i in reversed(range(TRACED_COUNT))] + ["opt/late"]


def layers():
    base = [directory("bin"), file("bin/busybox", busybox_bytes(), mode=0o755), symlink("bin/sh", "busybox"),
            symlink("bin/sha256sum", "busybox"), directory("app")]
    base += [file(name, data) for name, data in FILES.items() if name.startswith("app/")]
    upper = [directory("opt"), file("opt/cold", FILES["opt/cold"]), file("opt/late", FILES["opt/late"]),
             file("opt/small", b"small\n")]
    return [base, upper]


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.host) as running:
        yield running


def _convert(src: str, dst: str, *extra: str) -> None:
    assert cli.main(["convert", "-q", "--chunk-size", str(CHUNK), *extra, src, dst]) == 0


def _chunk_requests(proxy, ref: str) -> int:
    """Ranged blob requests below each layer's sections (chunk data, not metadata/table/trace)."""
    data_end = {d.digest: int(d.annotations["containerd.io/snapshot/lazyfs.meta.offset"]) - 8
                for d in manifest_of(ref).layers}
    count = 0
    for r in proxy.requests:
        if r.range is None or "/blobs/" not in r.path:
            continue
        digest = r.path.rsplit("/", 1)[1].split("?")[0]
        start = int(r.range.removeprefix("bytes=").split("-")[0])
        if digest in data_end and start < data_end[digest]:
            count += 1
    return count


def _prefetch_requests(proxy, proxied: str, mountpoint, run_dir, cache_dir, *args: str) -> tuple[int, dict]:
    proxy.clear_requests()
    with lazy_mount(mountpoint, *args, proxied, run_dir=run_dir, cache_dir=cache_dir) as mount:
        fetch = wait_for_prefetch(mount, layers=2)["fetch"]
        requests = _chunk_requests(proxy, proxied)
        for rel in STARTUP:
            assert (mount.path / rel).read_bytes() == FILES[rel]
        # Every read of the start hit the cache. (The chunk device's sequential readahead may
        # still queue the chunks after the traced run, at prefetch priority.)
        assert mount.stats()["fetch"]["queued"]["on_demand"] == 0
        signature = tree_signature(mount.path, with_blocks=False, dir_nlink=False)
    return requests, {"fetch": fetch, "tree": signature}


def test_trace_ordered_image_runs_mounts_and_prefetches_in_few_requests(registry, registry_repo, proxy, tmp_path):
    require_root()
    require_tool("runc")
    src = f"{registry.host}/{registry_repo}:src"

    async def push() -> None:
        store = open_store(src)
        try:
            await push_image(store, build_image(layers()), tag="src")
        finally:
            await store.aclose()

    trio.run(push)
    plain = f"{registry.host}/{registry_repo}:plain"
    _convert(src, plain)

    # Record the start on the unordered image.
    trace_file = tmp_path / "start.trace"
    proxied_plain = f"{proxy.host}/{registry_repo}:plain"
    with lazy_mount(tmp_path / "mnt", proxied_plain, run_dir=tmp_path / "run", cache_dir=tmp_path / "c0") as mount:
        lazyfs_cli("trace", "start", "--run-dir", str(mount.run_dir), str(mount.path))
        for rel in STARTUP:
            assert (mount.path / rel).read_bytes() == FILES[rel]
        lazyfs_cli("trace", "stop", "--run-dir", str(mount.run_dir), "-o", str(trace_file), str(mount.path))
    assert [a.path.lstrip("/") for a in Trace.decode(trace_file.read_bytes()).accesses] == STARTUP

    ordered = f"{registry.host}/{registry_repo}:ordered"
    _convert(src, ordered, "--trace", str(trace_file))
    report = _inspect(ordered)
    assert [layer["layout"] for layer in report] == ["trace-ordered", "trace-ordered"]
    assert report[0]["ordered_chunks"] == TRACED_COUNT * 3 and report[1]["ordered_chunks"] == 4
    embedded = f"{registry.host}/{registry_repo}:embedded"
    _convert(src, embedded, "--trace", str(trace_file), "--keep-order")
    report = _inspect(embedded)
    assert [(layer["layout"], layer["trace"]) for layer in report] == [("input", True)] * 2
    assert manifest_of(embedded).layers[0].annotations["containerd.io/snapshot/lazyfs.meta.offset"] == \
        manifest_of(plain).layers[0].annotations["containerd.io/snapshot/lazyfs.meta.offset"]

    # (c) the same start prefetched from the embedded trace, in the input order and ordered.
    unordered_requests, plain_run = _prefetch_requests(
        proxy, f"{proxy.host}/{registry_repo}:embedded", tmp_path / "mnt", tmp_path / "run", tmp_path / "c1")
    ordered_requests, ordered_run = _prefetch_requests(
        proxy, f"{proxy.host}/{registry_repo}:ordered", tmp_path / "mnt", tmp_path / "run", tmp_path / "c2")
    print(f"prefetch of {ordered_run['fetch']['queued']['prefetch']} chunks: {unordered_requests} range requests "
          f"in the input order, {ordered_requests} trace-ordered")
    assert ordered_run["fetch"]["queued"]["prefetch"] == plain_run["fetch"]["queued"]["prefetch"]
    # The traced chunks are contiguous in each layer: the base layer's (random bytes, stored
    # as they are) go out in requests of at most the fetcher's prefetch request size, the upper
    # layer's in one.
    traced_base = sum(len(FILES[f"app/t{i:02d}"]) for i in range(TRACED_COUNT))
    assert ordered_requests <= math.ceil(traced_base / PREFETCH_REQUEST_BYTES) + 1, ordered_requests
    assert unordered_requests >= TRACED_COUNT, unordered_requests
    # (b) the same tree, lazily.
    assert ordered_run["tree"] == plain_run["tree"]

    # (a) stock containerd unpacks and runs the reordered layers.
    from tests.fixtures.containerd import Containerd

    instance = Containerd(tmp_path / "containerd")
    try:
        instance.start()
        instance.trust_http_registry(registry.host)
        instance.pull(ordered, snapshotter="overlayfs")
        out = instance.run(ordered, "lazyfs-trace-layout", "/bin/sh", "-c",
                           "sha256sum /app/t03 /app/u07 /opt/late /opt/cold; cat /opt/small").stdout
    finally:
        instance.stop()
    want = [f"{hashlib.sha256(FILES[p]).hexdigest()}  /{p}" for p in ("app/t03", "app/u07", "opt/late", "opt/cold")]
    assert out.split("\n") == want + ["small", ""], out


def _inspect(ref: str) -> list[dict]:
    from tests.t4_convert import inspect_json

    return inspect_json(ref)["images"][0]["layers"]
