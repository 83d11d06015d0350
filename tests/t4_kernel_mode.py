"""Kernel serving mode: EROFS mounts over loop devices of the daemon's chunk-device files.

What is proven here with the real kernel: the daemon's FUSE mount shows each layer as one
read-only file (the chunk grid), a read-only loop device reads it, the layer's root is an
EROFS mount; detach, umount and shutdown release the mount, both loop devices and the FUSE
file (counted by the loop devices' backing files and the mount table, over repeated cycles);
metadata the kernel refuses falls back to the FUSE tree, logged once.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lazyfs.daemon.control import ControlClient, ControlError, request
from lazyfs.daemon.mountstate import wait_for_exit
from lazyfs.erofs import format as fmt
from lazyfs.erofs.reader import Image
from lazyfs.erofs.writer import Builder, Entry
from lazyfs.serve.kernel import attached_loops
from lazyfs.serve.mounts import is_mounted, mounted_paths
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.erofs_images import ChunkDevice
from tests.fixtures.erofs_trees import make_plain_image
from tests.fixtures.images import build_image, directory, file, hardlink, opaque, whiteout
from tests.fixtures.lazyimage import convert_image, push_to_registry, push_to_store
from tests.fixtures.lazymount import assert_same_tree, lazy_mount, lazyfs_cli, start_shared_daemon, stop_daemon


def loops_under(path: Path) -> dict[str, str]:
    """Loop devices whose backing file lies below ``path`` (other tests may use loops too)."""
    return {loop: backing for loop, backing in attached_loops().items() if backing.startswith(str(path) + "/")}


def mounts_under(path: Path) -> list[str]:
    return sorted(p for p in mounted_paths() if p.startswith(str(path) + "/"))


def daemons_serving(socket: Path) -> list[int]:
    """Pids of the lazyfs daemons whose command line names ``socket`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and b"lazyfs.daemon" in cmdline and str(socket).encode() in cmdline:
            found.append(int(entry.name))
    return found


def released(path: Path, timeout: float = 10.0) -> bool:
    """Whether every loop device and mount below ``path`` is gone (autoclear runs as the last
    user of a loop device closes it: poll, bounded)."""
    deadline = time.monotonic() + timeout
    while loops_under(path) or mounts_under(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def plain_image(tmp_path):
    require_root()
    return make_plain_image(tmp_path / "image")


def test_layer_root_is_an_erofs_mount_over_a_loop_of_the_chunk_device_file(plain_image, tmp_path):
    run_dir = tmp_path / "run"
    with lazy_mount(tmp_path / "mnt", "--serve", "kernel", "--meta", str(plain_image.meta), "--blob",
                    str(plain_image.blob), run_dir=run_dir, cache_dir=tmp_path / "cache") as mount:
        (layer,) = mount.stats()["attached"]
        state = mount.state_root()
        device_file = state / "fuse" / "layer"
        assert layer["serve"] == "kernel" and layer["loop_direct_io"] is True
        assert layer["path"] == str(state / "layers" / "layer")
        # The FUSE mount shows the chunk device as one read-only file: the whole grid of cells.
        st = os.stat(device_file)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
        assert st.st_size == -(-plain_image.blob.stat().st_size // (1 << 20)) * (1 << 20)
        with open(device_file, "rb") as f:
            assert f.read(plain_image.blob.stat().st_size) == plain_image.blob.read_bytes()
            assert f.read().count(0) == st.st_size - plain_image.blob.stat().st_size  # zero padding
        loops = loops_under(tmp_path)
        assert loops[layer["loop"]] == str(device_file)
        assert loops[layer["meta_loop"]] == str(plain_image.meta)
        with open("/proc/self/mountinfo") as f:
            fstypes = {line.split()[4]: line.split(" - ")[1].split()[0] for line in f}
        assert fstypes[layer["path"]] == "erofs"
        assert_same_tree(plain_image.source, mount.path, with_blocks=False)
        table = lazyfs_cli("stats", "--run-dir", str(run_dir), str(mount.path)).stdout
        assert "kernel" in table and layer["loop"] in table
    assert released(tmp_path)


def resident_pages(path: Path, offset: int, length: int) -> list[bool]:
    """Which pages of ``path``'s range are in the page cache (mincore of a mapping: no read)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    size = offset + length - start
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
            return [bool(byte & 1) for byte in vector.raw]
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def test_a_read_of_the_chunk_device_brings_the_bytes_that_follow_it_into_the_page_cache(tmp_path):
    """With the loop through the page cache (`--loop-direct-io off`), reading the first bytes of
    a file through the layer's EROFS brings the chunk device's following bytes into the page
    cache of the device file below the loop (the daemon stores what follows a small read within
    its cell): the rest of that file, and the next file, then need no request to the daemon."""
    require_root()
    source = tmp_path / "src"
    source.mkdir()
    for name in ("a", "b"):
        (source / name).write_bytes(os.urandom(100_000))
    image = make_plain_image(tmp_path / "image", source, chunk_size=1 << 20)
    with Image.open(image.meta) as meta:
        where = {name: meta.map(meta.resolve(name), 0, 1)[0].device_offset for name in ("a", "b")}
    first, second = sorted(where, key=where.get)
    assert where[second] - where[first] < 128 << 10  # neighbours, as mkfs.erofs lays them out
    sock, root = tmp_path / "control.sock", tmp_path / "layers" / "one"
    daemon = start_kernel_daemon(tmp_path, tmp_path / "daemon.log", "--loop-direct-io", "off")
    try:
        request(str(sock), "attach", name="one", kind="plain", meta=str(image.meta), blob=str(image.blob))
        with open(root / first, "rb") as f:
            assert f.read(100) == (source / first).read_bytes()[:100]  # an ELF-header-sized read
        assert request(str(sock), "stats")["reads"]["requests"] >= 1
        assert all(resident_pages(tmp_path / "fuse" / "one", where[first],
                                  2 * 100_000 + where[second] - where[first] - 100_000))
        assert (root / first).read_bytes() == (source / first).read_bytes()
        assert (root / second).read_bytes() == (source / second).read_bytes()
        request(str(sock), "detach", name="one")
    finally:
        stop_daemon(daemon, tmp_path / "fuse")
    assert released(tmp_path), (loops_under(tmp_path), mounts_under(tmp_path))


def test_mount_and_umount_cycles_leak_nothing(tmp_path):
    require_root()
    base = [directory("etc"), file("etc/a", os.urandom(200_000)), hardlink("etc/b", "etc/a"),
            file("gone", b"x"), directory("d"), file("d/old", b"o")]
    top = [whiteout("gone"), directory("d"), opaque("d"), file("d/new", b"n"), file("big", os.urandom(3 << 20))]
    layout = f"oci:{tmp_path / 'layout'}:v1"
    push_to_store(layout, convert_image(build_image([base, top]), chunk_size=1 << 20))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    for _ in range(3):
        with lazy_mount(tmp_path / "mnt", "--serve", "kernel", layout, run_dir=run_dir, cache_dir=cache) as mount:
            assert sorted(os.listdir(mount.path)) == ["big", "d", "etc"]
            assert os.listdir(mount.path / "d") == ["new"]
            assert (mount.path / "etc" / "b").read_bytes() == (mount.path / "etc" / "a").read_bytes()
            assert len((mount.path / "big").read_bytes()) == 3 << 20
            attached = mount.stats()["attached"]
            assert [layer["serve"] for layer in attached] == ["kernel", "kernel"]
            assert len(loops_under(tmp_path)) == 4  # chunk device and metadata of each layer
        assert released(tmp_path), (loops_under(tmp_path), mounts_under(tmp_path))
        assert not os.path.ismount(tmp_path / "mnt")


def start_kernel_daemon(tmp_path: Path, log: Path, *args: str) -> subprocess.Popen:
    """`python -m lazyfs.daemon --serve kernel` with its state in tmp_path, once it answers ready."""
    fuse_dir, sock = tmp_path / "fuse", tmp_path / "control.sock"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lazyfs.daemon", "--serve", "kernel", "--fuse-dir", str(fuse_dir),
             "--socket", str(sock), "--cache-dir", str(tmp_path / "cache"), "--layers-dir", str(tmp_path / "layers"),
             *args],
            stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if request(str(sock), "ping", timeout=2)["ready"]:
                return proc
        except ControlError:
            pass
        assert time.monotonic() < deadline, "daemon did not become ready"
        time.sleep(0.05)


@pytest.fixture
def kernel_daemon(tmp_path):
    """A `lazyfs daemon --serve kernel` in the foreground; its log file is returned too."""
    require_root()
    log = tmp_path / "daemon.log"
    proc = start_kernel_daemon(tmp_path, log)
    try:
        yield proc, tmp_path / "control.sock", log
    finally:
        stop_daemon(proc, tmp_path / "fuse")


def test_detach_and_shutdown_release_everything(kernel_daemon, plain_image, tmp_path):
    proc, sock, _ = kernel_daemon
    with ControlClient(str(sock)) as client:
        assert client.request("ping")["serve"] == "kernel"
        for name in ("one", "two"):
            reply = client.request("attach", name=name, kind="plain", meta=str(plain_image.meta),
                                   blob=str(plain_image.blob))
            assert reply["path"] == str(tmp_path / "layers" / name)
        assert sorted(os.listdir(tmp_path / "fuse")) == ["one", "two"]  # two chunk-device files
        assert (tmp_path / "layers" / "one" / "small.txt").read_bytes() == b"hello lazyfs\n"
        assert len(loops_under(tmp_path)) == 4
        client.request("detach", name="one")
        assert not (tmp_path / "layers" / "one").exists()
        assert os.listdir(tmp_path / "fuse") == ["two"]
        assert mounts_under(tmp_path / "layers") == [str(tmp_path / "layers" / "two")]
        deadline = time.monotonic() + 10
        while len(loops_under(tmp_path)) != 2:
            assert time.monotonic() < deadline, loops_under(tmp_path)
            time.sleep(0.05)
        # An open file keeps the filesystem busy: detach unmounts it lazily (as with FUSE trees,
        # what is still open of a detached layer reads nothing more), and the loops go once the
        # file is closed.
        busy = open(tmp_path / "layers" / "two" / "big.bin", "rb")
        client.request("detach", name="two")
        assert not os.path.ismount(tmp_path / "layers" / "two")
        assert len(loops_under(tmp_path)) == 2
        busy.close()
        assert released(tmp_path / "layers")
        client.request("attach", name="three", kind="plain", meta=str(plain_image.meta), blob=str(plain_image.blob))
        client.request("shutdown")
    assert proc.wait(timeout=30) == 0
    assert released(tmp_path)
    assert not is_mounted(tmp_path / "fuse")


def _big_block_image(workdir: Path) -> tuple[Path, Path, bytes]:
    """A plain image with 8 KiB blocks: valid EROFS that lazyfs reads, but the kernel refuses
    (its block size may not exceed the page size)."""
    workdir.mkdir()
    device = ChunkDevice(str(workdir / "blob"), 65536)
    content = os.urandom(100_000)
    builder = Builder(block_size=8192, chunk_size=65536)
    builder.add(Entry(b"", fmt.S_IFDIR | 0o755))
    builder.add(Entry(b"f", fmt.S_IFREG | 0o644, data=device.store(content)))
    with open(workdir / "meta", "wb") as f:
        info = builder.write(f)
    device.finish(info.device_blocks, 8192)
    return workdir / "meta", workdir / "blob", content


def test_metadata_the_kernel_refuses_falls_back_to_the_fuse_tree_logged_once(kernel_daemon, tmp_path):
    proc, sock, log = kernel_daemon
    meta, blob, content = _big_block_image(tmp_path / "big-blocks")
    with ControlClient(str(sock)) as client:
        for name in ("a", "b"):
            path = Path(client.request("attach", name=name, kind="plain", meta=str(meta), blob=str(blob))["path"])
            assert (path / "f").read_bytes() == content
        layers = {layer["name"]: layer for layer in client.request("list")["layers"]}
        assert {layer["serve"] for layer in layers.values()} == {"fuse"}
        assert "Invalid argument" in layers["a"]["fallback"]
        assert stat.S_ISDIR(os.stat(tmp_path / "fuse" / "a").st_mode)  # the FUSE tree, bind-mounted
        client.request("detach", name="a")
        client.request("shutdown")
    assert proc.wait(timeout=30) == 0
    warnings = [line for line in log.read_text().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "kernel serving mode impossible for layer a" in warnings[0], warnings
    assert released(tmp_path)


def test_umount_after_the_daemon_was_killed_releases_everything(plain_image, tmp_path):
    run_dir = tmp_path / "run"
    with lazy_mount(tmp_path / "mnt", "--serve", "kernel", "--meta", str(plain_image.meta), "--blob",
                    str(plain_image.blob), run_dir=run_dir, cache_dir=tmp_path / "cache") as mount:
        assert (mount.path / "small.txt").read_bytes() == b"hello lazyfs\n"
        os.kill(mount.daemon_pid(), signal.SIGKILL)
        # What is in the page cache still reads: the kernel's EROFS serves it.
        assert (mount.path / "small.txt").read_bytes() == b"hello lazyfs\n"
        lazyfs_cli("umount", "--run-dir", str(run_dir), str(mount.path))
    assert released(tmp_path), (loops_under(tmp_path), mounts_under(tmp_path))
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_a_new_daemon_takes_over_the_loop_devices_of_a_dead_one(plain_image, tmp_path, direct_io):
    """SIGKILL of the daemon: the EROFS mount stays, and a file opened before reads again
    through the same loop device once a new daemon attached the layer (LOOP_CHANGE_FD)."""
    require_root()
    log, sock, root = tmp_path / "daemon.log", tmp_path / "control.sock", tmp_path / "layers" / "one"
    expected = (plain_image.source / "big.bin").read_bytes()
    first = start_kernel_daemon(tmp_path, log, "--loop-direct-io", direct_io)
    second = None
    try:
        request(str(sock), "attach", name="one", kind="plain", meta=str(plain_image.meta), blob=str(plain_image.blob))
        (before,) = request(str(sock), "list")["layers"]
        held = open(root / "big.bin", "rb")
        assert held.read(1000) == expected[:1000]
        first.kill()
        first.wait()
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if direct_io == "on":
            # Pages not cached cannot be read while no daemon serves the loop's file. (Through
            # the page cache, the dead daemon's device file may still hold them: no witness.)
            with pytest.raises(OSError):
                os.pread(held.fileno(), 1000, 70_000)
        second = start_kernel_daemon(tmp_path, log, "--loop-direct-io", direct_io)
        request(str(sock), "attach", name="one", kind="plain", meta=str(plain_image.meta), blob=str(plain_image.blob))
        (after,) = request(str(sock), "list")["layers"]
        assert after["adopted"] is True and after["serve"] == "kernel"
        assert (after["loop"], after["meta_loop"]) == (before["loop"], before["meta_loop"])
        assert loops_under(tmp_path)[after["loop"]] == str(tmp_path / "fuse" / "one")
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        held.seek(0)
        assert held.read() == expected  # the same open file, through the same mount
        held.close()
        assert (root / "small.txt").read_bytes() == b"hello lazyfs\n"
        request(str(sock), "detach", name="one")
        assert released(tmp_path / "layers")
    finally:
        if second is not None:
            stop_daemon(second, tmp_path / "fuse")
        stop_daemon(first, tmp_path / "fuse")
        subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)
    assert released(tmp_path), (loops_under(tmp_path), mounts_under(tmp_path))


def test_a_mount_of_another_layer_under_the_same_name_is_replaced_not_taken_over(plain_image, tmp_path):
    require_root()
    other = make_plain_image(tmp_path / "other")
    log, sock, root = tmp_path / "daemon.log", tmp_path / "control.sock", tmp_path / "layers" / "one"
    first = start_kernel_daemon(tmp_path, log)
    second = None
    try:
        request(str(sock), "attach", name="one", kind="plain", meta=str(plain_image.meta), blob=str(plain_image.blob))
        first.kill()
        first.wait()
        second = start_kernel_daemon(tmp_path, log)
        request(str(sock), "attach", name="one", kind="plain", meta=str(other.meta), blob=str(other.blob))
        (layer,) = request(str(sock), "list")["layers"]
        assert "adopted" not in layer and layer["meta"] == str(other.meta)
        assert loops_under(tmp_path)[layer["meta_loop"]] == str(other.meta)
        assert (root / "small.txt").read_bytes() == b"hello lazyfs\n"
        request(str(sock), "detach", name="one")
    finally:
        if second is not None:
            stop_daemon(second, tmp_path / "fuse")
        stop_daemon(first, tmp_path / "fuse")
    assert released(tmp_path), (loops_under(tmp_path), mounts_under(tmp_path))


# ---------------------------------------------------------------------- hot upgrade


class Reader(threading.Thread):
    """Reads files of a mount in a loop, as a container would, counting every failed read.

    Each pass reads every file of ``warm`` whole and drops its pages afterwards (so the next
    pass reaches the daemon again), and one piece of ``fresh`` that no pass read before (so a
    chunk the daemon has never fetched). Bounded: at most ``max_passes`` passes.
    """

    PIECE = 65536

    def __init__(self, warm: dict[Path, bytes], fresh: Path, fresh_bytes: bytes, max_passes: int = 100_000):
        super().__init__(daemon=True)
        self.warm, self.fresh, self.fresh_bytes, self.max_passes = warm, fresh, fresh_bytes, max_passes
        self.passes = self.reads = self.fresh_reads = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.progress = threading.Condition()

    def run(self) -> None:
        offset = 0
        while not self.stop.is_set() and self.passes < self.max_passes:
            for path, expected in self.warm.items():
                self._check(path, 0, len(expected), expected)
            if offset < len(self.fresh_bytes):
                length = min(self.PIECE, len(self.fresh_bytes) - offset)
                if self._check(self.fresh, offset, length, self.fresh_bytes[offset:offset + length]):
                    self.fresh_reads += 1
                offset += 3 * self.PIECE  # a chunk (64 KiB) that neither this nor readahead fetched yet
            with self.progress:
                self.passes += 1
                self.progress.notify_all()

    def _check(self, path: Path, offset: int, length: int, expected: bytes) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, length, offset)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError as e:
            self.failures.append(f"pass {self.passes}: {path}@{offset}: {e}")
            return False
        self.reads += 1
        if data != expected:
            self.failures.append(f"pass {self.passes}: {path}@{offset}: wrong bytes")
            return False
        return True

    def wait_passes(self, count: int, timeout: float = 60.0) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: self.passes >= count or not self.is_alive(), timeout), self.passes
        assert self.passes >= count, f"the reader stopped early: {self.failures}"

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=60)
        assert not self.is_alive()


class Churn(threading.Thread):
    """Attaches and detaches a layer over the control socket in a loop, as a snapshotter
    does while containers come and go, counting failed requests. Bounded."""

    def __init__(self, socket: Path, image, max_cycles: int = 10_000):
        super().__init__(daemon=True)
        self.socket, self.image, self.max_cycles = socket, image, max_cycles
        self.cycles = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.cycles < self.max_cycles:
            try:
                request(str(self.socket), "attach", name="churn", kind="plain", meta=str(self.image.meta),
                        blob=str(self.image.blob))
                request(str(self.socket), "detach", name="churn")
            except ControlError as e:
                self.failures.append(f"cycle {self.cycles}: {e}")
                return
            self.cycles += 1

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=60)
        assert not self.is_alive()


UPGRADE_RNG = random.Random(1111)
UPGRADE_WARM = {f"data/warm-{i}": UPGRADE_RNG.randbytes(200_000 + i * 7919) for i in range(6)}
UPGRADE_FRESH = UPGRADE_RNG.randbytes(24 << 20)
UPGRADE_LATER = UPGRADE_RNG.randbytes(3 << 20)


@pytest.fixture(scope="module")
def upgrade_image(registry):
    require_root()
    base = [directory("data"), *(file(path, data) for path, data in UPGRADE_WARM.items())]
    top = [directory("data"), file("data/fresh.bin", UPGRADE_FRESH), file("data/later.bin", UPGRADE_LATER)]
    push_to_registry(registry, "t/upgrade", convert_image(build_image([base, top]), chunk_size=65536))
    return f"{registry.host}/t/upgrade:v1"


def test_hot_upgrade_replaces_the_daemon_without_a_failed_read(upgrade_image, tmp_path):
    """`lazyfs daemon upgrade` while a reader loops over files of an image mount and a client
    attaches and detaches another layer in a loop: the new daemon takes over every loop
    device, the image mount and the socket; no read fails, even of data neither daemon had
    fetched, and no control request fails; the old daemon exits; nothing leaks."""
    require_tool("mkfs.erofs")
    churn_image = make_plain_image(tmp_path / "churn-image")
    sock, run_dir, mnt, log = tmp_path / "daemon.sock", tmp_path / "run", tmp_path / "mnt", tmp_path / "daemon.log"
    old = start_shared_daemon(sock, tmp_path / "fuse", tmp_path / "cache", log, "--serve", "kernel",
                              "--layers-dir", str(tmp_path / "layers"))
    try:
        mnt.mkdir()
        lazyfs_cli("mount", "--daemon", str(sock), "--run-dir", str(run_dir), "--no-prefetch", upgrade_image, str(mnt))
        before = {layer["name"]: layer for layer in request(str(sock), "list")["layers"]}
        assert len(before) == 2 and {layer["serve"] for layer in before.values()} == {"kernel"}
        reader = Reader({mnt / path: data for path, data in UPGRADE_WARM.items()}, mnt / "data/fresh.bin",
                        UPGRADE_FRESH)
        churn = Churn(sock, churn_image)
        reader.start()
        churn.start()
        try:
            reader.wait_passes(3)
            old_reads = request(str(sock), "stats")["reads"]["requests"]
            passes_before, cycles_before = reader.passes, churn.cycles
            done = lazyfs_cli("daemon", "upgrade", "--socket", str(sock))
            passes_during = reader.passes - passes_before
            reader.wait_passes(reader.passes + 3)
            cycles_after = churn.cycles
            deadline = time.monotonic() + 60
            while churn.cycles < cycles_after + 2 and churn.is_alive():  # cycles through the new daemon
                assert time.monotonic() < deadline, churn.cycles
                time.sleep(0.05)
        finally:
            reader.finish()
            churn.finish()
        assert reader.failures == [], reader.failures[:10]
        assert churn.failures == [] and cycles_after > cycles_before, (churn.failures, cycles_before, cycles_after)
        assert passes_during > 0 and reader.fresh_reads > passes_before  # reads ran through the upgrade
        assert old.wait(timeout=30) == 0  # the old daemon exited by itself
        stats = request(str(sock), "stats")
        new_pid = stats["pid"]
        assert new_pid != old.pid and f"replaced by daemon {new_pid}" in done.stdout
        assert stats["layers"] == 2 and stats["reads"]["requests"] > 0  # the new daemon serves the loops
        assert old_reads > 0
        after = {layer["name"]: layer for layer in request(str(sock), "list")["layers"]}
        assert after.keys() == before.keys()
        for name, layer in after.items():  # the same loop devices, now reading the new daemon's files
            assert (layer["loop"], layer["meta_loop"]) == (before[name]["loop"], before[name]["meta_loop"])
            assert attached_loops()[layer["loop"]] == str(tmp_path / "fuse.next" / name)
        assert not is_mounted(tmp_path / "fuse")
        # Data nobody read before, through the new daemon; the upgraded daemon still knows the
        # image mount: `lazyfs umount` has it unmount the image and detach its layers.
        assert hashlib.sha256((mnt / "data/later.bin").read_bytes()).digest() == hashlib.sha256(UPGRADE_LATER).digest()
        assert json.loads(lazyfs_cli("stats", "--json", "--run-dir", str(run_dir), str(mnt)).stdout)["pid"] == new_pid
        lazyfs_cli("umount", "--run-dir", str(run_dir), str(mnt))
        assert not os.path.ismount(mnt) and request(str(sock), "stats")["layers"] == 0
        assert released(tmp_path / "layers"), (loops_under(tmp_path), mounts_under(tmp_path))
        request(str(sock), "shutdown")
        assert wait_for_exit(new_pid, 30)
    finally:
        for pid in daemons_serving(sock):  # a successor, however far the test got
            if pid != old.pid and not wait_for_exit(pid, 0.1):
                os.kill(pid, signal.SIGTERM)
                if not wait_for_exit(pid, 20):
                    os.kill(pid, signal.SIGKILL)
        stop_daemon(old, tmp_path / "fuse")
        lazyfs_cli("umount", "--lazy", "--run-dir", str(run_dir), str(mnt), check=False)
        for fuse_dir in (tmp_path / "fuse", tmp_path / "fuse.next"):
            if is_mounted(fuse_dir):
                subprocess.run(["umount", "-l", str(fuse_dir)], check=False)
    assert released(tmp_path), (loops_under(tmp_path), mounts_under(tmp_path))
    assert not is_mounted(tmp_path / "fuse.next")


@pytest.mark.parametrize("served", ["fuse", "kernel-fallback"])
def test_hot_upgrade_refuses_layers_served_by_the_fuse_tree(served, plain_image, tmp_path):
    """A FUSE-tree layer cannot change daemons (its overlays hold the old FUSE mount): the
    upgrade names it and fails, and the running daemon serves on unchanged."""
    sock, log = tmp_path / "daemon.sock", tmp_path / "daemon.log"
    extra = ("--serve", "fuse") if served == "fuse" else ("--serve", "kernel", "--layers-dir", str(tmp_path / "layers"))
    meta, blob = (plain_image.meta, plain_image.blob) if served == "fuse" else _big_block_image(tmp_path / "big")[:2]
    daemon = start_shared_daemon(sock, tmp_path / "fuse", tmp_path / "cache", log, *extra)
    try:
        with ControlClient(str(sock)) as client:
            path = Path(client.request("attach", name="tree-layer", kind="plain", meta=str(meta), blob=str(blob))["path"])
            refused = lazyfs_cli("daemon", "upgrade", "--socket", str(sock), "--log", str(tmp_path / "successor.log"),
                                 check=False)
            assert refused.returncode == 1, refused
            assert "served by the FUSE tree" in refused.stderr and "tree-layer" in refused.stderr, refused.stderr
            assert client.request("stats")["pid"] == daemon.pid and daemon.poll() is None
            assert (path / "f" if served != "fuse" else path / "small.txt").exists()
            client.request("attach", name="later", kind="plain", meta=str(meta), blob=str(blob))  # not frozen
        assert not is_mounted(tmp_path / "fuse.next")
        assert daemons_serving(sock) == [daemon.pid]  # no successor left behind
    finally:
        stop_daemon(daemon, tmp_path / "fuse")
    assert released(tmp_path), (loops_under(tmp_path), mounts_under(tmp_path))


def test_a_failed_takeover_leaves_the_running_daemon_serving_every_read(upgrade_image, tmp_path):
    """The successor cannot take one layer over (its loop record is gone: fault injected)
    after it took another: the running daemon points every loop back at its own
    files and serves on, unfrozen; no read failed; no successor and no FUSE mount are left."""
    sock, run_dir, mnt, log = tmp_path / "daemon.sock", tmp_path / "run", tmp_path / "mnt", tmp_path / "daemon.log"
    old = start_shared_daemon(sock, tmp_path / "fuse", tmp_path / "cache", log, "--serve", "kernel",
                              "--layers-dir", str(tmp_path / "layers"))
    try:
        mnt.mkdir()
        lazyfs_cli("mount", "--daemon", str(sock), "--run-dir", str(run_dir), "--no-prefetch", upgrade_image, str(mnt))
        names = sorted(layer["name"] for layer in request(str(sock), "list")["layers"])
        (tmp_path / "layers" / f".{names[-1]}.loops").unlink()
        reader = Reader({mnt / path: data for path, data in UPGRADE_WARM.items()}, mnt / "data/fresh.bin",
                        UPGRADE_FRESH)
        reader.start()
        try:
            reader.wait_passes(3)
            refused = lazyfs_cli("daemon", "upgrade", "--socket", str(sock), "--log", str(tmp_path / "successor.log"),
                                 check=False)
            reader.wait_passes(reader.passes + 3)
        finally:
            reader.finish()
        assert refused.returncode == 1 and "no record of the loop devices" in refused.stderr, refused
        assert reader.failures == [], reader.failures[:10]
        assert request(str(sock), "stats")["pid"] == old.pid and daemons_serving(sock) == [old.pid]
        loops = attached_loops()
        for layer in request(str(sock), "list")["layers"]:
            assert loops[layer["loop"]] == str(tmp_path / "fuse" / layer["name"])
        assert not is_mounted(tmp_path / "fuse.next")
        # The successor had taken the first layer (name order) before failing on the second.
        assert f"now reads {tmp_path / 'fuse.next' / names[0]}" in (tmp_path / "successor.log").read_text()
        assert "cannot take its loop device back" not in log.read_text()
        lazyfs_cli("umount", "--run-dir", str(run_dir), str(mnt))  # no longer frozen
        assert request(str(sock), "stats")["layers"] == 0
    finally:
        stop_daemon(old, tmp_path / "fuse")
        lazyfs_cli("umount", "--lazy", "--run-dir", str(run_dir), str(mnt), check=False)
    assert released(tmp_path), (loops_under(tmp_path), mounts_under(tmp_path))
