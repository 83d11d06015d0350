"""lazyfs under Kubernetes' runtime interface: containerd's CRI plugin driven the way kubelet
drives it, over CRI's gRPC API (``tests/cri``), with no kubelet and no network plugin.

One containerd (CRI on, configured as docs/design.md tells users) and one lazyfs-snapshotter
serve the whole module; the sandbox ("pause") image is built here from busybox-static and
pulled from the test registry like any other. Pods use the host network, which needs no CNI.
Each test runs a pod in kubelet's order (RunPodSandbox, ImageService.PullImage with the
sandbox config, CreateContainer, StartContainer), reads the container's CRI log, then tears everything down as kubelet does
(StopPodSandbox, RemovePodSandbox, RemoveImage) and checks that nothing is left behind.
"""

from __future__ import annotations

import hashlib
import os
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trio

from lazyfs.bench.system import DaemonSettings, Snapshotter
from snapshotter.layerfs import layer_source
from snapshotter.store import Kind, MetaStore
from tests.cri.client import CriClient, api_pb2
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.containerd import CriContainerd, pause_image
from tests.fixtures.images import build_image, busybox_layer, file
from tests.fixtures.lazyimage import convert_with_cli, layer_sizes
from tests.fixtures.lazyimage import push_to_registry_async as push

SNAPSHOTTER = "lazyfs"
DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"
CALL_TIMEOUT = 120.0   # one CRI call (a pull, a sandbox start)
EXIT_TIMEOUT = 60.0    # a container running one short command


@dataclass
class Node:
    containerd: CriContainerd
    snapshotter: Snapshotter
    registry: object
    log_root: Path

    @property
    def cri(self) -> CriClient:
        assert self.containerd.cri is not None
        return self.containerd.cri

    def metadata(self) -> list:
        store = MetaStore(self.snapshotter.root / "metadata.db")
        try:
            with store.transaction() as tx:
                return tx.walk()
        finally:
            store.close()

    def attached_layers(self) -> set[str]:
        return {layer["name"] for layer in self.snapshotter.daemon_request("list")["layers"]}


@pytest.fixture(scope="module")
def node(registry, tmp_path_factory):
    """containerd with CRI + lazyfs-snapshotter (+ its daemon), once for the module."""
    require_root()
    require_tool("runc")
    base = tmp_path_factory.mktemp("cri-node")
    pause_ref = trio.run(push, registry, "cri/pause", pause_image())
    containerd = CriContainerd(base / "containerd", sandbox_image=pause_ref, snapshotter=SNAPSHOTTER)
    containerd.trust_http_registry(registry.host)
    snapshotter = Snapshotter(base / "snapshotter", containerd.snapshotter_socket, base)
    try:
        containerd.start()
        # No speculative policy: the byte counts below measure what reads fetch on demand.
        snapshotter.start(insecure_hosts=[registry.host], settings=DaemonSettings(policies=("readahead", "trace")))
        containerd.wait_snapshotter(SNAPSHOTTER)
        yield Node(containerd, snapshotter, registry, base / "pods")
    finally:
        try:
            containerd.stop()
        finally:
            snapshotter.stop()


@pytest.fixture(autouse=True)
def clean_node(node):
    """Whatever a failed test left (pods, images) is removed through CRI after it, so the
    next test starts from an empty node."""
    yield
    rt, images = node.cri.runtime, node.cri.images
    for sandbox in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=CALL_TIMEOUT).items:
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=CALL_TIMEOUT)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id),
                            timeout=CALL_TIMEOUT)
    for image in images.ListImages(api_pb2.ListImagesRequest(), timeout=CALL_TIMEOUT).images:
        images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image.id)),
                           timeout=CALL_TIMEOUT)


def pull(node: Node, ref: str, sandbox: api_pb2.PodSandboxConfig | None = None) -> str:
    """ImageService.PullImage, as kubelet sends it (with the pod's sandbox config)."""
    return node.cri.images.PullImage(api_pb2.PullImageRequest(
        image=api_pb2.ImageSpec(image=ref), sandbox_config=sandbox), timeout=CALL_TIMEOUT).image_ref


def sandbox_config(node: Node, name: str) -> api_pb2.PodSandboxConfig:
    uid = uuid.uuid4().hex
    log_dir = node.log_root / f"lazyfs-test_{name}_{uid}"
    log_dir.mkdir(parents=True)
    host_network = api_pb2.NamespaceOption(network=api_pb2.NODE)
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace="lazyfs-test"),
        log_directory=str(log_dir),
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=host_network)))


@dataclass
class Pod:
    sandbox_id: str
    config: api_pb2.PodSandboxConfig


def run_sandbox(node: Node, name: str) -> Pod:
    """RunPodSandbox with the host network (the CRI plugin pulls the sandbox image itself)."""
    config = sandbox_config(node, name)
    rt = node.cri.runtime
    sandbox_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config),
                                  timeout=CALL_TIMEOUT).pod_sandbox_id
    status = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                 timeout=CALL_TIMEOUT).status
    assert status.state == api_pb2.SANDBOX_READY
    return Pod(sandbox_id, config)


def run_container(node: Node, pod: Pod, image_ref: str, command: list[str],
                  name: str = "workload") -> Path:
    """CreateContainer, StartContainer; wait (bounded) for it to exit 0; its CRI log file."""
    rt = node.cri.runtime
    container = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=image_ref),
        command=command,
        log_path=f"{name}/0.log")
    container_id = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod.sandbox_id, config=container, sandbox_config=pod.config),
        timeout=CALL_TIMEOUT).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=container_id), timeout=CALL_TIMEOUT)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while True:
        st = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=container_id),
                                timeout=CALL_TIMEOUT).status
        if st.state == api_pb2.CONTAINER_EXITED:
            break
        assert time.monotonic() < deadline, f"container still {api_pb2.ContainerState.Name(st.state)}"
        time.sleep(0.05)
    assert (st.exit_code, st.reason) == (0, "Completed"), (st.exit_code, st.reason, st.message)
    assert st.log_path == str(Path(pod.config.log_directory) / f"{name}/0.log")
    return Path(st.log_path)


def log_lines(path: Path, expected: int) -> list[tuple[str, str]]:
    """(stream, text) of the first ``expected`` lines of a CRI log file: each line is
    ``<RFC 3339 time> <stdout|stderr> <F|P> <text>``. containerd copies the container's output
    into the file as it exits, so this waits (bounded) for the lines to arrive."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out = []
    for line in lines:
        _time, stream, tag, text = line.split(" ", 3)
        assert tag == "F", line  # full lines only: the outputs here are short
        out.append((stream, text))
    return out


def remove_pod_and_images(node: Node, pod: Pod, refs: list[str]) -> None:
    """What kubelet does when a pod is deleted and its images are garbage-collected."""
    rt = node.cri.runtime
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=CALL_TIMEOUT)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id),
                        timeout=CALL_TIMEOUT)
    assert rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=CALL_TIMEOUT).items == []
    assert rt.ListContainers(api_pb2.ListContainersRequest(), timeout=CALL_TIMEOUT).containers == []
    for ref in refs:
        node.cri.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)),
                                    timeout=CALL_TIMEOUT)
    assert node.cri.images.ListImages(api_pb2.ListImagesRequest(), timeout=CALL_TIMEOUT).images == []


def assert_nothing_left(node: Node) -> None:
    """containerd's GC (run synchronously by the last RemoveImage) removed every snapshot
    through the snapshotter, which detached every lazy layer from the daemon."""
    assert node.containerd.snapshots(SNAPSHOTTER) == []
    assert node.metadata() == []
    assert sorted(p.name for p in (node.snapshotter.root / "snapshots").iterdir()) == []
    assert node.attached_layers() == set()
    with open("/proc/self/mountinfo") as f:
        below = [line.split()[4] for line in f
                 if line.split()[4].startswith(str(node.snapshotter.root / "snapshots"))]
    assert below == []


def test_docs_config_is_the_tested_config(node):
    """The CRI settings docs/design.md gives users are the ones this containerd runs with."""
    text = DESIGN.read_text()
    snapshotter_part = text[text.index("## Snapshotter ("):]
    section = snapshotter_part[snapshotter_part.index("### Configuration"):]
    block = section[section.index("```toml") + len("```toml"):]
    documented = tomllib.loads(block[:block.index("```")])
    running = tomllib.loads(node.containerd.config())
    cri = "io.containerd.grpc.v1.cri"
    assert documented["plugins"][cri]["containerd"] == {
        "snapshotter": SNAPSHOTTER, "disable_snapshot_annotations": False}
    for key, value in documented["plugins"][cri]["containerd"].items():
        assert running["plugins"][cri]["containerd"][key] == value
    assert documented["proxy_plugins"][SNAPSHOTTER]["type"] == running["proxy_plugins"][SNAPSHOTTER]["type"]
    assert cri not in running["disabled_plugins"]
    # no CNI: the runtime is ready, the pod network is not (host-network pods need none)
    conditions = node.cri.conditions()
    assert conditions["RuntimeReady"].status
    assert not conditions["NetworkReady"].status


async def test_lazy_image_runs_through_cri(node, registry, registry_repo):
    """A converted image pulled through CRI is attached lazily (CRI's labels name it), the pod
    runs and logs, only a fraction of the layer bytes is fetched (a later read fetches what
    it reads), and removal leaves nothing."""
    big = os.urandom(8 << 20)  # the first container never reads it, the second one MiB
    image = build_image([busybox_layer(("sh", "cat", "dd", "sha256sum")),
                         [file("hello.txt", b"hello through CRI\n"), file("big.bin", big)]])
    src = await push(registry, registry_repo, image)
    ref = f"{registry.host}/{registry_repo}-lazy:v1"
    await trio.to_thread.run_sync(convert_with_cli, src, ref)
    sizes = await layer_sizes(ref, registry.host)
    start = registry.mark()

    # kubelet's order: the sandbox first, then the pod's images, then its containers
    pod = run_sandbox(node, "lazy")
    image_id = pull(node, ref, pod.config)
    lazy = [s for s in node.metadata() if s.lazy_layer]
    assert {layer_source(s.labels).layer_digest for s in lazy} == set(sizes), node.snapshotter.log_tail()
    assert all(s.kind == Kind.COMMITTED for s in lazy)
    # the labels came from the CRI plugin, not from ctr-remote
    assert all(s.labels["containerd.io/snapshot/cri.image-ref"] == ref for s in lazy)
    assert node.attached_layers() == {s.lazy_layer for s in lazy}

    log = run_container(node, pod, ref, ["/bin/sh", "-c", "cat /hello.txt; echo done >&2"])
    assert log_lines(log, 2) == [("stdout", "hello through CRI"), ("stderr", "done")]

    sent = registry.blob_bytes(start)
    fetched = sum(sent.get(d, 0) for d in sizes)
    print(f"CRI pull + run fetched {fetched} of {sum(sizes.values())} layer bytes")
    assert fetched < sum(sizes.values()) // 4, (fetched, sizes)

    # a second container of the pod (the image is present: kubelet asks ImageStatus and does
    # not pull) reads one MiB of the file: right bytes, fetched on demand, not the whole file
    status = node.cri.images.ImageStatus(api_pb2.ImageStatusRequest(
        image=api_pb2.ImageSpec(image=ref)), timeout=CALL_TIMEOUT).image
    assert status.id == image_id and ref in status.repo_tags
    log = run_container(node, pod, ref, ["/bin/sh", "-c",
                        "dd if=/big.bin bs=1048576 skip=3 count=1 2>/dev/null | sha256sum"],
                        name="reader")
    assert log_lines(log, 1) == [("stdout", f"{hashlib.sha256(big[3 << 20:4 << 20]).hexdigest()}  -")]
    sent = registry.blob_bytes(start)
    more = sum(sent.get(d, 0) for d in sizes) - fetched
    assert (1 << 20) <= more < (3 << 20), more

    remove_pod_and_images(node, pod, [ref, node.containerd.sandbox_image])
    assert_nothing_left(node)


async def test_gzip_image_falls_back_to_unpacking(node, registry, registry_repo):
    """An ordinary gzip image through the same CRI path is unpacked into lazyfs snapshots
    (no lazy layer, the whole layers downloaded) and runs; removal leaves nothing."""
    image = build_image([busybox_layer(("sh", "cat")), [file("hello.txt", b"hello, unpacked\n")]])
    ref = await push(registry, registry_repo, image)
    sizes = await layer_sizes(ref, registry.host)
    start = registry.mark()

    pod = run_sandbox(node, "gzip")
    pull(node, ref, pod.config)
    committed = [s for s in node.metadata() if s.kind == Kind.COMMITTED]
    assert len(committed) == 3  # the sandbox image's layer and this image's two
    assert [s.lazy_layer for s in committed] == [None, None, None]
    assert node.attached_layers() == set()
    sent = registry.blob_bytes(start)
    assert {d: sent.get(d, 0) for d in sizes} == sizes  # ordinary pull: every layer in full

    log = run_container(node, pod, ref, ["/bin/cat", "/hello.txt"])
    assert log_lines(log, 1) == [("stdout", "hello, unpacked")]
    remove_pod_and_images(node, pod, [ref, node.containerd.sandbox_image])
    assert_nothing_left(node)


def test_pull_of_a_missing_image_is_an_error(node, registry):
    """kubelet's ErrImagePull: PullImage fails with NOT_FOUND and nothing stays behind."""
    with pytest.raises(grpc.RpcError) as err:
        pull(node, f"{registry.host}/cri/absent:v1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    assert_nothing_left(node)


def test_sandbox_image_runs_until_sigterm(node):
    """The sandbox built here behaves like Kubernetes' pause: it keeps the pod up until it is
    sent SIGTERM, then exits (CRI marks the pod not ready)."""
    pod = run_sandbox(node, "pause")
    rt = node.cri.runtime

    def state() -> int:
        return rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id),
                                   timeout=CALL_TIMEOUT).status.state

    assert node.containerd.ctr("task", "ls").stdout.split()[-1] == "RUNNING"
    assert state() == api_pb2.SANDBOX_READY
    node.containerd.ctr("task", "kill", "-s", "SIGTERM", pod.sandbox_id)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while state() != api_pb2.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "the sandbox ignored SIGTERM"
        time.sleep(0.05)
    remove_pod_and_images(node, pod, [node.containerd.sandbox_image])
    assert_nothing_left(node)
