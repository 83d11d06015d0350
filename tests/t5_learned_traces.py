"""Learned traces across two nodes: real registry, two containerd + runc + lazyfs-snapshotter
instances with separate roots and caches. Node 1 pulls and runs a workload on an image
converted without a trace; its daemon records the start and attaches the trace to the image in
the registry. Node 2, cold, pulls the same image, prefetches from the learned trace and runs
the workload with (almost) no on-demand fetch. A hostile trace changes nothing but a log line."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import trio

from lazyfs.registry import open_store
from lazyfs.trace import share
from lazyfs.trace.format import Access, Trace
from snapshotter.daemon_client import DaemonLayerFS, stop_daemon
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.containerd import Containerd, unmount_below
from tests.fixtures.images import build_image, directory, file
from tests.fixtures.images import push_image
from tests.fixtures.lazymount import lazyfs_cli
from tests.t5_containerd import SNAPSHOTTER, SnapshotterProcess, busybox_layer

FILES = 16
READ = [f"app/f{i:02d}" for i in range(0, FILES, 2)]  # the workload reads half the files
WORKLOAD = ["/bin/sh", "-c", " ".join(f"cat /{p} >/dev/null;" for p in READ) + " echo ready"]


class Node:
    """One machine: a containerd and a snapshotter (with its daemon) of its own."""

    def __init__(self, base: Path, registry, share_mode: str):
        base.mkdir(parents=True)
        self.containerd = Containerd(base / "containerd")
        # No speculative policy: node 1's on-demand fetches are the yardstick of node 2's.
        self.snapshotter = SnapshotterProcess(base / "sn-root", self.containerd.snapshotter_socket,
                                              [registry.host], policies=("readahead", "trace"))
        with open(self.snapshotter.config, "a") as config:
            config.write(f'\n[traces]\nrecord = true\nshare = "{share_mode}"\nquiet = 1.0\n')
        self.registry = registry

    def start(self) -> None:
        self.containerd.start()
        self.containerd.trust_http_registry(self.registry.host)
        self.snapshotter.start()
        self.containerd.wait_snapshotter(SNAPSHOTTER, timeout=15)

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            try:
                self.snapshotter.stop()
            finally:
                stop_daemon(self.snapshotter.root / "daemon.pid")
                unmount_below(self.snapshotter.root)

    def daemon(self, op: str = "stats") -> dict:
        fs = DaemonLayerFS(self.snapshotter.root / "daemon.sock", self.snapshotter.root / "mnt")
        return fs.request(op)

    def pull_and_run(self, ref: str, name: str) -> str:
        self.containerd.pull(ref, snapshotter=SNAPSHOTTER, remote=True)
        return self.containerd.run(ref, name, *WORKLOAD, snapshotter=SNAPSHOTTER).stdout

    def wait(self, what: str, predicate, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.daemon()
            if predicate(stats):
                return stats
            assert time.monotonic() < deadline, f"{what}: {stats['learned']} {stats['fetch']}\n" \
                                                f"{self.snapshotter.log_tail()}"
            time.sleep(0.1)


@pytest.fixture
def nodes(registry, tmp_path):
    require_root()
    require_tool("runc")
    started = []
    try:
        def make(name: str, share_mode: str) -> Node:
            node = Node(tmp_path / name, registry, share_mode)
            started.append(node)
            node.start()
            return node
        yield make
    finally:
        for node in started:
            node.stop()


def _image():
    rng = random.Random(1414)
    app = [directory("app")] + [file(f"app/f{i:02d}", rng.randbytes(300_000)) for i in range(FILES)]
    return build_image([busybox_layer(), app])


async def _converted(registry, registry_repo) -> str:
    """The workload's image pushed, and converted with `lazyfs convert` (no trace)."""
    src = f"{registry.host}/{registry_repo}:v1"
    store = open_store(src, insecure_registries=[registry.host])
    try:
        await push_image(store, _image(), tag="v1")
    finally:
        await store.aclose()
    dst = f"{registry.host}/{registry_repo}-lazy:v1"
    await trio.to_thread.run_sync(lambda: lazyfs_cli("convert", "-q", src, dst))
    return dst


def _on_demand(stats: dict) -> int:
    return stats["fetch"]["queued"]["on_demand"]


async def test_second_node_starts_from_the_learned_trace(registry, registry_repo, nodes):
    ref = await _converted(registry, registry_repo)

    one = nodes("node1", "push")
    out = await trio.to_thread.run_sync(one.pull_and_run, ref, "learn-1")
    assert out.strip() == "ready"
    pushed = one.wait("node 1 pushes its recorded start",
                      lambda s: any(r["state"] == "pushed" for r in s["learned"]["recordings"]))
    (recording,) = [r for r in pushed["learned"]["recordings"] if r["state"] == "pushed"]
    misses_1 = _on_demand(pushed)
    assert pushed["fetch"]["queued"]["prefetch"] == 0  # nothing to learn from yet
    assert misses_1 >= len(READ)

    # the trace is in the registry, attached to the image manifest node 1 ran
    store = open_store(ref, insecure_registries=[registry.host])
    try:
        subject = await share.image_manifest(store)
        pulled = await share.pull_trace(store, subject)
    finally:
        await store.aclose()
    assert pulled.artifact == recording["pushed"] and recording["image"] == subject.digest
    assert {a.path for a in pulled.trace.accesses} >= {f"/{p}" for p in READ}
    assert not {a.path for a in pulled.trace.accesses} & {f"/app/f{i:02d}" for i in range(1, FILES, 2)}

    two = nodes("node2", "pull")
    await trio.to_thread.run_sync(lambda: two.containerd.pull(ref, snapshotter=SNAPSHOTTER, remote=True))
    stats = two.wait("node 2 prefetches the learned trace",
                     lambda s: s["prefetch"]["queued"] > 0 and s["prefetch"]["done"] >= s["prefetch"]["queued"])
    layers = {layer["digest"]: layer for layer in two.daemon("list")["layers"]}
    assert {layer.get("learned_trace") for layer in layers.values()} <= {pulled.artifact, None}
    assert any(layer.get("learned_trace") == pulled.artifact for layer in layers.values())
    out = await trio.to_thread.run_sync(lambda: two.containerd.run(ref, "learn-2", *WORKLOAD,
                                                                   snapshotter=SNAPSHOTTER).stdout)
    assert out.strip() == "ready"
    after = two.daemon()
    misses_2 = _on_demand(after)
    print(f"on-demand chunk fetches: node 1 {misses_1}, node 2 {misses_2}; "
          f"node 2 prefetched {after['prefetch']['done']} chunks")
    assert after["prefetch"]["done"] >= len(READ)
    assert misses_2 * 4 <= misses_1, (misses_1, misses_2)


@pytest.mark.expected_log
async def test_hostile_learned_trace_changes_nothing_but_a_log_line(registry, registry_repo, nodes):
    ref = await _converted(registry, registry_repo)
    store = open_store(ref, insecure_registries=[registry.host])
    try:
        subject = await share.image_manifest(store)
        top = subject.layers[1].digest
        chunk_size = int(subject.layers[1].annotations["containerd.io/snapshot/lazyfs.chunk-size"])
        hostile = Trace(layers={top: chunk_size})
        hostile.accesses.append(Access(0, top, 1, 0, 5000, "/app/f00"))  # chunks the layer does not have
        await share.push_trace(store, subject, hostile)
    finally:
        await store.aclose()
    node = nodes("node", "pull")
    out = await trio.to_thread.run_sync(node.pull_and_run, ref, "hostile")
    assert out.strip() == "ready"
    log = node.snapshotter.root / "daemon.log"
    deadline = time.monotonic() + 30  # the look-up runs after the attach, in the background
    while f"names chunk 5000 of layer {top}" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    assert node.daemon()["prefetch"]["queued"] == 0
