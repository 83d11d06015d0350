"""The snapshotter under a real containerd + runc, pulling from a real registry.

Ordinary images take the overlayfs-compatible path (containerd unpacks into our snapshots);
``ctr snapshots`` and our own metadata must agree, and removing everything must leave no
mount and no directory behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from lazyfs.registry import open_store
from lazyfs.registry.manifest import sha256_digest
from lazyfs.serve.kernel import attached_loops
from snapshotter.daemon_client import stop_daemon
from snapshotter.layerfs import layer_source
from snapshotter.store import Kind, MetaStore
from tests.fixtures.containerd import unmount_below
from tests.fixtures.images import build_image, device, directory, file, whiteout
from tests.fixtures.images import busybox_layer as busybox_layer_with
from tests.fixtures.lazyimage import convert_with_cli, layer_sizes
from tests.fixtures.lazyimage import push_to_registry_async as push

SNAPSHOTTER = "lazyfs"
START_TIMEOUT = 20.0


class SnapshotterProcess:
    """lazyfs-snapshotter serving ``socket`` with its state under ``root``."""

    def __init__(self, root: Path, socket: Path, insecure_hosts: list[str], daemon: bool = True,
                 serve: str = "fuse", policies: tuple[str, ...] | None = None):
        self.root = root
        self.socket = socket
        self.config = root.parent / "snapshotter.toml"
        hosts = ", ".join(f'"{h}"' for h in insecure_hosts)
        self.config.write_text(
            f'root = "{root}"\nsocket = "{socket}"\nlog_level = "debug"\n\n'
            f'[daemon]\nenabled = {"true" if daemon else "false"}\nserve = "{serve}"\n'
            + ("" if policies is None else f"policies = {list(policies)!r}\n".replace("'", '"')) + "\n"
            f'[registry]\ninsecure_hosts = [{hosts}]\n')
        self.log_path = root.parent / "snapshotter.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if self.socket.exists():
            self.socket.unlink()
        exe = Path(sys.executable).parent / "lazyfs-snapshotter"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(exe), "--config", str(self.config)],
                                            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"snapshotter did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def metadata(self) -> list:
        store = MetaStore(self.root / "metadata.db")
        try:
            with store.transaction() as tx:
                return tx.walk()
        finally:
            store.close()


@pytest.fixture
def snapshotter_proc(request, containerd, registry, tmp_path):
    """The snapshotter and its daemon; parametrise indirectly with "kernel" for the kernel
    serving mode (default "fuse")."""
    root = tmp_path / "sn-root"
    proc = SnapshotterProcess(root, containerd.snapshotter_socket, [registry.host],
                              serve=getattr(request, "param", "fuse"))
    containerd.trust_http_registry(registry.host)
    try:
        proc.start()
        # containerd dialled the socket before it existed and is backing off: wait until it
        # reaches the snapshotter, or the first pull can fail with "unavailable".
        wait_reconnected(containerd)
        yield proc
    finally:
        try:
            proc.stop()
        finally:
            stop_daemon(root / "daemon.pid")
            unmount_below(root)


def busybox_layer() -> list:
    return busybox_layer_with(("sh", "cat", "ls", "sleep", "dd", "sha256sum", "su"),
                              dirs=("etc", "proc", "sys", "dev", "tmp")) + [
        file("etc/gone", b"removed by the next layer\n")]


def mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(str(path))]


async def test_ordinary_image_pull_run_and_remove(containerd, registry, registry_repo,
                                                  snapshotter_proc):
    image = build_image([busybox_layer(),
                         [directory("etc"), whiteout("etc/gone"), file("hello.txt", b"hello from layer 2\n")]])
    ref = await push(registry, registry_repo, image)
    await trio.to_thread.run_sync(lambda: containerd.pull(ref, snapshotter=SNAPSHOTTER))

    out = await trio.to_thread.run_sync(lambda: containerd.run(
        ref, "t5-ordinary", "/bin/sh", "-c", "cat /hello.txt; ls /etc", snapshotter=SNAPSHOTTER))
    assert out.stdout.splitlines() == ["hello from layer 2"]  # etc/gone is whited out

    # ctr's view and our metadata agree: two committed layers, one on the other
    ctr_ls = containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:]
    rows = [line.split() for line in ctr_ls]
    assert sorted(r[-1] for r in rows) == ["Committed", "Committed"]
    (top,) = [r for r in rows if len(r) == 3]
    # (the container's removed rootfs snapshot stays with us until containerd's next GC)
    ours = [s for s in snapshotter_proc.metadata() if s.kind == Kind.COMMITTED]
    assert len(ours) == 2
    assert sorted(len(s.parent_ids) for s in ours) == [0, 1]
    info = containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", top[0]).stdout
    assert '"Kind": "Committed"' in info and top[1] in info
    tree = containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "tree").stdout
    assert tree.index(top[1]) < tree.index(top[0])
    usage = containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "usage", top[1]).stdout
    assert "MiB" in usage  # the busybox layer, measured at commit
    S = ("snapshots", "--snapshotter", SNAPSHOTTER)
    containerd.ctr(*S, "prepare", "scratch", top[0])
    refused = containerd.ctr(*S, "rm", top[0], check=False)
    assert refused.returncode != 0 and "child" in refused.stderr
    containerd.ctr(*S, "rm", "scratch")
    assert "scratch" not in containerd.ctr(*S, "ls").stdout

    containerd.ctr("image", "rm", "--sync", ref)
    assert snapshotter_proc.metadata() == []
    assert os.listdir(snapshotter_proc.root / "snapshots") == []
    assert mounts_below(snapshotter_proc.root / "snapshots") == []
    assert containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:] == []


def wait_reconnected(containerd, timeout: float = 15.0) -> None:
    """containerd redials a proxy snapshotter with backoff (at most 3 s apart); until then its
    calls fail fast with "unavailable". `snapshots ls` does not tell (containerd answers it from
    its own metadata), so this prepares and removes a probe snapshot."""
    containerd.wait_snapshotter(SNAPSHOTTER, timeout=timeout)


def remove_container(containerd, name: str) -> None:
    """Kill a detached container's task (bounded wait for it to stop) and remove both."""
    containerd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
    for _ in range(100):
        if task_status(containerd, name) != "RUNNING":
            break
        time.sleep(0.05)
    containerd.ctr("task", "delete", name, check=False)
    containerd.ctr("containers", "rm", name, check=False)


def task_status(containerd, name: str) -> str:
    for line in containerd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[-1]
    return "absent"


async def test_snapshotter_restart_under_a_running_container(containerd, registry, registry_repo,
                                                             snapshotter_proc):
    image = build_image([busybox_layer(), [file("data.txt", b"payload\n")]])
    ref = await push(registry, registry_repo, image)
    # ctr-remote sends the remote-snapshot labels; an ordinary layer still gets unpacked
    await trio.to_thread.run_sync(lambda: containerd.pull(ref, snapshotter=SNAPSHOTTER, remote=True))
    reader = ("i=0; while [ $i -lt 1200 ]; do cat /data.txt >/dev/null || exit 7; "
              "i=$((i+1)); sleep 0.05; done")
    containerd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "reader", "/bin/sh", "-c", reader)
    try:
        assert task_status(containerd, "reader") == "RUNNING"
        snapshotter_proc.stop()
        snapshotter_proc.start()
        wait_reconnected(containerd)
        # the running container never noticed; new containers are served by the new process
        out = await trio.to_thread.run_sync(lambda: containerd.run(
            ref, "after-restart", "/bin/cat", "/data.txt", snapshotter=SNAPSHOTTER))
        assert out.stdout == "payload\n"
        assert task_status(containerd, "reader") == "RUNNING"
    finally:
        remove_container(containerd, "reader")


def test_daemon_killed_is_restarted(snapshotter_proc):
    pid_file = snapshotter_proc.root / "daemon.pid"
    deadline = time.monotonic() + START_TIMEOUT
    while not pid_file.exists():
        assert time.monotonic() < deadline, snapshotter_proc.log_tail()
        time.sleep(0.05)
    old_pid = int(pid_file.read_text())
    os.kill(old_pid, 9)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        text = pid_file.read_text()
        if text and int(text) != old_pid and \
                f"lazyfs daemon started (pid {int(text)})" in snapshotter_proc.log_tail():
            break
        assert time.monotonic() < deadline, snapshotter_proc.log_tail()
        time.sleep(0.05)
    log = snapshotter_proc.log_path.read_text()
    assert f"lazyfs daemon lost (pid {old_pid})" in log
    # the new daemon answers on the same control socket and serves the same FUSE mountpoint
    from snapshotter.daemon_client import DaemonLayerFS
    fs = DaemonLayerFS(snapshotter_proc.root / "daemon.sock", snapshotter_proc.root / "mnt")
    assert fs.ready()
    assert str(snapshotter_proc.root / "mnt") in mounts_below(snapshotter_proc.root)


# -- lazy layers ---------------------------------------------------------------------------

def daemon_list(snapshotter_proc) -> list[dict]:
    from snapshotter.daemon_client import DaemonLayerFS
    fs = DaemonLayerFS(snapshotter_proc.root / "daemon.sock", snapshotter_proc.root / "mnt")
    return fs.request("list")["layers"]


def daemon_layers(snapshotter_proc) -> set[str]:
    return {layer["name"] for layer in daemon_list(snapshotter_proc)}


def wait_daemon_restarted(snapshotter_proc, old_pid: int) -> int:
    pid_file = snapshotter_proc.root / "daemon.pid"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        text = pid_file.read_text()
        if text and int(text) != old_pid and \
                f"lazyfs daemon started (pid {int(text)})" in snapshotter_proc.log_tail():
            return int(text)
        assert time.monotonic() < deadline, snapshotter_proc.log_tail()
        time.sleep(0.05)


@pytest.mark.parametrize("snapshotter_proc", ["fuse", "kernel"], indirect=True)
async def test_lazy_image_lifecycle(containerd, registry, registry_repo, snapshotter_proc):
    """Converted image: pulled with labels (no layer download), run, fetched only in part;
    survives a snapshotter restart under a reading container; a killed daemon is restarted
    with the layers re-attached; removal detaches the layers and leaves nothing behind.
    In both serving modes (kernel: the lowerdirs are EROFS mounts over loop devices)."""
    big = os.urandom(8 << 20)  # the first container never reads it
    image = build_image([busybox_layer(),
                         [file("hello.txt", b"hello lazily\n"), file("big.bin", big)]])
    src = await push(registry, registry_repo, image)
    dst = f"{registry.host}/{registry_repo}-lazy:v1"
    await trio.to_thread.run_sync(convert_with_cli, src, dst)
    start = registry.mark()

    await trio.to_thread.run_sync(lambda: containerd.pull(dst, snapshotter=SNAPSHOTTER, remote=True))
    out = await trio.to_thread.run_sync(lambda: containerd.run(
        dst, "t5-lazy", "/bin/sh", "-c", "cat /hello.txt", snapshotter=SNAPSHOTTER))
    assert out.stdout == "hello lazily\n"

    lazy = [s for s in snapshotter_proc.metadata() if s.lazy_layer]
    assert len(lazy) == 2, snapshotter_proc.log_tail()
    digests = {layer_source(s.labels).layer_digest for s in lazy}
    sizes = await layer_sizes(dst, registry.host)
    assert digests == set(sizes)
    registry.mark()
    sent = registry.blob_bytes(start)
    fetched = sum(sent.get(d, 0) for d in digests)
    print(f"lazy pull + run fetched {fetched} of {sum(sizes.values())} layer bytes")
    assert fetched < sum(sizes.values()) // 4, (fetched, sizes)
    layers = {s.lazy_layer for s in lazy}
    assert daemon_layers(snapshotter_proc) == layers
    serve = "kernel" if 'serve = "kernel"' in snapshotter_proc.config.read_text() else "fuse"
    assert {layer["serve"] for layer in daemon_list(snapshotter_proc)} == {serve}

    # a container reading lazy files in a loop outlives a snapshotter restart
    reader = ("i=0; while [ $i -lt 1200 ]; do cat /hello.txt >/dev/null || exit 7; "
              "dd if=/big.bin of=/dev/null bs=4096 count=1 skip=$((i % 2048 * 1)) 2>/dev/null "
              "|| exit 8; i=$((i+1)); sleep 0.02; done")
    containerd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, dst, "lazy-reader", "/bin/sh", "-c", reader)
    daemon_pid = int((snapshotter_proc.root / "daemon.pid").read_text())
    try:
        snapshotter_proc.stop()
        snapshotter_proc.start()
        wait_reconnected(containerd)
        assert "adopting the lazyfs daemon" in snapshotter_proc.log_tail()
        assert int((snapshotter_proc.root / "daemon.pid").read_text()) == daemon_pid
        out = await trio.to_thread.run_sync(lambda: containerd.run(
            dst, "t5-lazy-2", "/bin/sh", "-c",
            "dd if=/big.bin bs=1048576 skip=3 count=1 2>/dev/null | sha256sum",
            snapshotter=SNAPSHOTTER))
        assert out.stdout.split()[0] == hashlib.sha256(big[3 << 20:4 << 20]).hexdigest()
        assert task_status(containerd, "lazy-reader") == "RUNNING"
    finally:
        remove_container(containerd, "lazy-reader")

    # the daemon dies: a new one serves the same layers again
    os.kill(daemon_pid, 9)
    wait_daemon_restarted(snapshotter_proc, daemon_pid)
    deadline = time.monotonic() + START_TIMEOUT
    while daemon_layers(snapshotter_proc) != layers:
        assert time.monotonic() < deadline, snapshotter_proc.log_tail()
        time.sleep(0.05)
    out = await trio.to_thread.run_sync(lambda: containerd.run(
        dst, "t5-lazy-3", "/bin/cat", "/hello.txt", snapshotter=SNAPSHOTTER))
    assert out.stdout == "hello lazily\n"

    # removal: snapshots, directories and attached layers go
    containerd.ctr("image", "rm", "--sync", dst)
    assert snapshotter_proc.metadata() == []
    assert os.listdir(snapshotter_proc.root / "snapshots") == []
    assert daemon_layers(snapshotter_proc) == set()
    assert mounts_below(snapshotter_proc.root / "snapshots") == []
    layer_dir = snapshotter_proc.root / "mnt"
    assert [m for m in mounts_below(layer_dir) if m != str(layer_dir)] == []  # kernel mode: EROFS mounts
    deadline = time.monotonic() + 10  # loop devices clear themselves as their last user goes
    while [b for b in attached_loops().values() if b.startswith(str(snapshotter_proc.root))]:
        assert time.monotonic() < deadline, attached_loops()
        time.sleep(0.05)

    # plain `ctr image pull` forwards the lazyfs annotations but no image reference: the
    # layers (valid tar+zstd) are unpacked like any other
    await trio.to_thread.run_sync(lambda: containerd.pull(dst, snapshotter=SNAPSHOTTER))
    out = await trio.to_thread.run_sync(lambda: containerd.run(
        dst, "t5-unpacked", "/bin/cat", "/hello.txt", snapshotter=SNAPSHOTTER))
    assert out.stdout == "hello lazily\n"
    assert [s.lazy_layer for s in snapshotter_proc.metadata() if s.kind == Kind.COMMITTED] == [None, None]
    assert daemon_layers(snapshotter_proc) == set()


async def test_mixed_image_ordinary_and_lazy_layers(containerd, registry, registry_repo,
                                                    snapshotter_proc):
    """An ordinary gzip base layer under a lazyfs layer: the first is unpacked, the second
    served lazily on top of it."""
    base = busybox_layer()
    image = build_image([base, [file("app.txt", b"lazy app on an unpacked base\n")]])
    src = await push(registry, registry_repo, image)
    converted_ref = f"{registry.host}/{registry_repo}-mixed:lazy"
    await trio.to_thread.run_sync(convert_with_cli, src, converted_ref)

    store = open_store(converted_ref, insecure_registries=[registry.host])
    try:
        converted = json.loads((await store.get_manifest()).data)
        config = json.loads(await store.get_blob(converted["config"]["digest"]))
        config["rootfs"]["diff_ids"][0] = image.layers[0].diff_id
        config_bytes = json.dumps(config).encode()
        await store.push_blob(image.layers[0].blob, digest=image.layers[0].digest,
                              media_type=image.layers[0].descriptor.media_type)
        await store.push_blob(config_bytes, digest=sha256_digest(config_bytes),
                              media_type=converted["config"]["mediaType"])
        converted["config"] = {**converted["config"], "digest": sha256_digest(config_bytes),
                               "size": len(config_bytes)}
        converted["layers"][0] = image.layers[0].descriptor.to_json()
        await store.push_manifest(json.dumps(converted).encode(), converted["mediaType"], "mixed")
    finally:
        await store.aclose()
    mixed = f"{registry.host}/{registry_repo}-mixed:mixed"

    await trio.to_thread.run_sync(lambda: containerd.pull(mixed, snapshotter=SNAPSHOTTER, remote=True))
    out = await trio.to_thread.run_sync(lambda: containerd.run(
        mixed, "t5-mixed", "/bin/cat", "/app.txt", snapshotter=SNAPSHOTTER))
    assert out.stdout == "lazy app on an unpacked base\n"
    committed = [s for s in snapshotter_proc.metadata() if s.kind == Kind.COMMITTED]
    by_depth = sorted(committed, key=lambda s: len(s.parent_ids))
    assert [s.lazy_layer is not None for s in by_depth] == [False, True]
    assert (snapshotter_proc.root / "snapshots" / str(by_depth[0].id) / "fs" / "bin" / "busybox").exists()
    containerd.ctr("image", "rm", "--sync", mixed)
    assert snapshotter_proc.metadata() == []
    assert daemon_layers(snapshotter_proc) == set()


def setuid_probe_layer() -> list:
    """busybox, a setuid-root id(1) with the libraries it loads, and a 0666 /dev/null node."""
    id_binary = Path(shutil.which("id") or "/usr/bin/id")
    libraries = subprocess.run(["ldd", str(id_binary)], capture_output=True, text=True, check=True).stdout
    paths = sorted({word for word in libraries.split() if word.startswith("/")})
    entries = busybox_layer() + [directory("usr"), directory("usr/bin"),
                                 file("usr/bin/id", id_binary.read_bytes(), mode=0o4755),
                                 directory("devices"), device("devices/null", "char", 1, 3, mode=0o666),
                                 file("etc/passwd", b"root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"),
                                 file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")]
    made = {"usr", "usr/bin", "devices", "bin", "etc", "proc", "sys", "dev", "tmp"}
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                entries.append(directory(parent))
        entries.append(file("/".join(parts), Path(path).read_bytes(), mode=0o755))
    return entries


# Run as nobody (su), the setuid id(1) reports euid 0 when the rootfs honours setuid bits; as
# root, writing the image's own /dev/null node works when the rootfs honours device nodes.
SETUID_PROBE = ("su -s /bin/sh nobody -c '/usr/bin/id -u' 2>&1; "
                "echo x > /devices/null && echo device-usable")


async def test_setuid_and_device_nodes_in_containers_as_with_overlayfs(containerd, registry, registry_repo,
                                                                       snapshotter_proc):
    """The daemon's FUSE mount is nosuid,nodev, yet a container from lazy layers sees setuid
    bits and device nodes exactly as one from containerd's overlayfs snapshotter: the
    container's rootfs overlay is a mount of its own (ctr's --read-only too: a read-only
    overlay with an upperdir). A view of a one-layer image is a bind mount of the FUSE layer
    directory, which containerd remounts with its own flags."""
    fuse_options = next(line.split()[5] for line in open("/proc/self/mountinfo")
                        if line.split()[4] == str(snapshotter_proc.root / "mnt"))
    assert {"nosuid", "nodev"} <= set(fuse_options.split(","))
    src = await push(registry, registry_repo, build_image([setuid_probe_layer()]))
    dst = f"{registry.host}/{registry_repo}-lazy:v1"
    await trio.to_thread.run_sync(convert_with_cli, src, dst)
    await trio.to_thread.run_sync(lambda: containerd.pull(src))
    await trio.to_thread.run_sync(lambda: containerd.pull(dst, snapshotter=SNAPSHOTTER, remote=True))

    def run(ref: str, name: str, snapshotter: str, *flags: str) -> str:
        # --allow-new-privs: ctr sets no_new_privs by default, which would hide setuid bits.
        return containerd.ctr("run", "--rm", "--allow-new-privs", *flags, "--snapshotter", snapshotter, ref, name,
                              "/bin/sh", "-c", SETUID_PROBE, timeout=60).stdout

    expected = "0\ndevice-usable\n"
    assert await trio.to_thread.run_sync(run, src, "t5-suid-overlayfs", "overlayfs") == expected
    assert await trio.to_thread.run_sync(run, src, "t5-suid-overlayfs-ro", "overlayfs", "--read-only") == expected
    assert await trio.to_thread.run_sync(run, dst, "t5-suid-lazy", SNAPSHOTTER) == expected
    assert await trio.to_thread.run_sync(run, dst, "t5-suid-lazy-ro", SNAPSHOTTER, "--read-only") == expected
    assert [s.lazy_layer is not None for s in snapshotter_proc.metadata() if s.kind == Kind.COMMITTED] == [True]

    # A view of the one-layer image (`ctr images mount` without --rw), seen from the host as
    # nobody: a bind mount of the FUSE layer directory, remounted read-only by containerd.
    public = Path(tempfile.mkdtemp(prefix="lazyfs-view-"))
    os.chmod(public, 0o755)
    try:
        seen = {}
        for ref, snapshotter in ((src, "overlayfs"), (dst, SNAPSHOTTER)):
            target = public / snapshotter
            target.mkdir()
            containerd.ctr("images", "mount", "--snapshotter", snapshotter, ref, str(target))
            try:
                euid = subprocess.run(["runuser", "-u", "nobody", "--", str(target / "usr/bin/id"), "-u"],
                                      capture_output=True, text=True, timeout=30).stdout
                device = subprocess.run(["runuser", "-u", "nobody", "--", "sh", "-c",
                                         f"echo x > {target / 'devices/null'} && echo device-usable"],
                                        capture_output=True, text=True, timeout=30).stdout
                seen[snapshotter] = euid + device
            finally:
                containerd.ctr("images", "unmount", "--rm", str(target))
        # containerd remounts the bind read-only with its own flags, which drops nosuid,nodev
        assert seen[SNAPSHOTTER] == seen["overlayfs"] == expected, seen
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.parametrize("snapshotter_proc", ["kernel"], indirect=True)
async def test_kernel_mode_daemon_failover_under_a_running_container(containerd, registry, registry_repo,
                                                                     snapshotter_proc):
    """Kernel serving mode: SIGKILL of the daemon under a running container. The container's
    loop over a file it already read goes on; the restarted daemon takes over the loop devices
    (LOOP_CHANGE_FD), so data the container never read before is served to it afterwards,
    through its unchanged overlay and EROFS mounts."""
    big = os.urandom(8 << 20)
    image = build_image([busybox_layer(), [file("hello.txt", b"hello lazily\n"), file("big.bin", big)]])
    src = await push(registry, registry_repo, image)
    dst = f"{registry.host}/{registry_repo}-lazy:v1"
    await trio.to_thread.run_sync(convert_with_cli, src, dst)
    await trio.to_thread.run_sync(lambda: containerd.pull(dst, snapshotter=SNAPSHOTTER, remote=True))
    layers = {s.lazy_layer for s in snapshotter_proc.metadata() if s.lazy_layer}
    assert len(layers) == 2 and {layer["serve"] for layer in daemon_list(snapshotter_proc)} == {"kernel"}
    # The loop touches only what it read before the kill (the whole busybox binary, which
    # every `cat` maps, and hello.txt): page-cache hits, which must never fail.
    reader = ("cat /bin/busybox /hello.txt >/dev/null && touch /tmp/started; while [ ! -e /tmp/stop ]; do cat /hello.txt >/dev/null || exit 7; sleep 0.05; "
              "done; echo survived")
    outcome: dict = {}

    def run_reader() -> None:
        outcome["run"] = containerd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, dst, "survivor",
                                        "/bin/sh", "-c", reader, timeout=120, check=False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, run_reader)
        try:
            # Started means its shell runs the loop (binaries read): a task is RUNNING earlier.
            deadline = time.monotonic() + START_TIMEOUT
            for attempt in itertools.count():
                if task_status(containerd, "survivor") == "RUNNING" and containerd.ctr(
                        "task", "exec", "--exec-id", f"check-{attempt}", "survivor", "/bin/cat", "/tmp/started",
                        check=False).returncode == 0:
                    break
                assert time.monotonic() < deadline and "run" not in outcome, outcome
                await trio.sleep(0.05)
            daemon_pid = int((snapshotter_proc.root / "daemon.pid").read_text())
            os.kill(daemon_pid, 9)
            wait_daemon_restarted(snapshotter_proc, daemon_pid)
            # Re-attached, and each layer's loop device swapped to the new daemon's file.
            deadline = time.monotonic() + START_TIMEOUT
            while {layer["name"] for layer in daemon_list(snapshotter_proc) if layer.get("adopted")} != layers:
                assert time.monotonic() < deadline, snapshotter_proc.log_tail()
                await trio.sleep(0.05)
            assert "run" not in outcome, outcome
            probe = await trio.to_thread.run_sync(lambda: containerd.ctr(
                "task", "exec", "--exec-id", "probe", "survivor", "/bin/sh", "-c",
                "dd if=/big.bin bs=1048576 skip=5 count=1 2>/dev/null | sha256sum"))
            assert probe.stdout.split()[0] == hashlib.sha256(big[5 << 20:6 << 20]).hexdigest()
        finally:
            await trio.to_thread.run_sync(lambda: containerd.ctr(
                "task", "exec", "--exec-id", "stop", "survivor", "/bin/busybox", "touch", "/tmp/stop", check=False))
    assert outcome["run"].returncode == 0 and outcome["run"].stdout == "survived\n", outcome["run"]
    containerd.ctr("image", "rm", "--sync", dst)
    assert daemon_layers(snapshotter_proc) == set()


@pytest.mark.parametrize("snapshotter_proc", ["kernel"], indirect=True)
async def test_hot_upgrade_under_a_running_container_fails_no_read(containerd, registry, registry_repo,
                                                                  snapshotter_proc):
    """`lazyfs-snapshotter upgrade` under a container that reads in a loop, every pass a piece
    of big.bin it never read (so a read that reaches the daemon): no read fails, the new daemon
    serves every layer through the same loop devices, the supervisor watches it instead of
    restarting one, and data never read before reads right through it."""
    piece, stride, pieces = 65536, 262144, 128
    big, later = os.urandom(pieces * stride), os.urandom(4 << 20)
    image = build_image([busybox_layer(), [file("hello.txt", b"hello lazily\n"), file("big.bin", big),
                                           file("later.bin", later)]])
    src = await push(registry, registry_repo, image)
    dst = f"{registry.host}/{registry_repo}-lazy:v1"
    await trio.to_thread.run_sync(convert_with_cli, src, dst)
    await trio.to_thread.run_sync(lambda: containerd.pull(dst, snapshotter=SNAPSHOTTER, remote=True))
    before = {layer["name"]: layer for layer in daemon_list(snapshotter_proc)}
    assert len(before) == 2 and {layer["serve"] for layer in before.values()} == {"kernel"}
    reader = ("cat /bin/busybox /hello.txt >/dev/null && touch /tmp/started; i=0; while [ ! -e /tmp/stop ]; do "
              "cat /hello.txt >/dev/null || exit 7; "
              f"if [ $i -lt {pieces} ]; then dd if=/big.bin of=/tmp/got bs={piece} skip=$((i*{stride // piece})) "
              "seek=$i count=1 conv=notrunc 2>/dev/null || exit 8; i=$((i+1)); echo $i >/tmp/i.new && mv /tmp/i.new /tmp/i; fi; "
              "sleep 0.02; done; echo survived $i; sha256sum /tmp/got")
    outcome: dict = {}

    def run_reader() -> None:
        outcome["run"] = containerd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, dst, "upgraded",
                                        "/bin/sh", "-c", reader, timeout=180, check=False)

    def pieces_read(exec_id: str) -> int:
        done = containerd.ctr("task", "exec", "--exec-id", exec_id, "upgraded", "/bin/cat", "/tmp/i", check=False)
        return int(done.stdout or 0)

    old_pid = int((snapshotter_proc.root / "daemon.pid").read_text())
    exe = Path(sys.executable).parent / "lazyfs-snapshotter"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, run_reader)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            for attempt in itertools.count():
                if task_status(containerd, "upgraded") == "RUNNING" and containerd.ctr(
                        "task", "exec", "--exec-id", f"check-{attempt}", "upgraded", "/bin/cat", "/tmp/started",
                        check=False).returncode == 0:
                    break
                assert time.monotonic() < deadline and "run" not in outcome, outcome
                await trio.sleep(0.05)
            read_before = await trio.to_thread.run_sync(pieces_read, "before")
            upgraded = await trio.to_thread.run_sync(lambda: subprocess.run(
                [str(exe), "upgrade", "--config", str(snapshotter_proc.config)], capture_output=True, text=True,
                timeout=300))
            read_after = await trio.to_thread.run_sync(pieces_read, "after")
            assert upgraded.returncode == 0, (upgraded.stderr, snapshotter_proc.log_tail())
            new_pid = int((snapshotter_proc.root / "daemon.pid").read_text())
            assert new_pid != old_pid and f"replaced by daemon {new_pid}" in upgraded.stdout
            assert read_after > read_before, (read_before, read_after)  # the loop read on meanwhile
            after = {layer["name"]: layer for layer in daemon_list(snapshotter_proc)}
            assert after.keys() == before.keys()
            loops = attached_loops()
            for name, layer in after.items():
                assert layer["adopted"] and layer["loop"] == before[name]["loop"]
                assert loops[layer["loop"]] == str(snapshotter_proc.root / "chunk-devices.next" / name)
            # The supervisor watches the new daemon rather than restarting one.
            deadline = time.monotonic() + START_TIMEOUT
            while f"was replaced by daemon {new_pid}" not in snapshotter_proc.log_tail(200):
                assert time.monotonic() < deadline, snapshotter_proc.log_tail()
                await trio.sleep(0.05)
            assert "lazyfs daemon lost" not in snapshotter_proc.log_path.read_text()
            probe = await trio.to_thread.run_sync(lambda: containerd.ctr(
                "task", "exec", "--exec-id", "probe", "upgraded", "/bin/sh", "-c", "sha256sum /later.bin"))
            assert probe.stdout.split()[0] == hashlib.sha256(later).hexdigest()
        finally:
            await trio.to_thread.run_sync(lambda: containerd.ctr(
                "task", "exec", "--exec-id", "stop", "upgraded", "/bin/busybox", "touch", "/tmp/stop", check=False))
    run = outcome["run"]
    assert run.returncode == 0 and run.stdout.startswith("survived "), run
    count = int(run.stdout.split()[1])
    expected = b"".join(big[k * stride:k * stride + piece] for k in range(count))
    assert run.stdout.split()[2] == hashlib.sha256(expected).hexdigest()
    containerd.ctr("image", "rm", "--sync", dst)
    assert daemon_layers(snapshotter_proc) == set()  # the snapshotter's requests reach the new daemon
