"""Kernel serving mode: EROFS mounts over loop devices of the daemon's chunk-device files.

What is proven here with the real kernel: the daemon's FUSE mount shows each layer as one
read-only file (the chunk grid), a read-only loop device reads it, the layer's root is an
EROFS mount; detach, umount and shutdown release the mount, both loop devices and the FUSE
file (counted by the loop devices' backing files and the mount table, over repeated cycles);
metadata the kernel refuses falls back to the FUSE tree, logged once.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazyfs.daemon.control import ControlClient, ControlError, request
from lazyfs.erofs import format as fmt
from lazyfs.erofs.reader import Image
from lazyfs.erofs.writer import Builder, Entry
from lazyfs.serve.kernel import attached_loops
from lazyfs.serve.mounts import is_mounted, mounted_paths
from tests.fixtures.common import require_root
from tests.fixtures.erofs_images import ChunkDevice
from tests.fixtures.erofs_trees import make_plain_image
from tests.fixtures.images import build_image, directory, file, hardlink, opaque, whiteout
from tests.fixtures.lazyimage import convert_image, push_to_store
from tests.fixtures.lazymount import assert_same_tree, lazy_mount, lazyfs_cli, stop_daemon


def loops_under(path: Path) -> dict[str, str]:
    """Loop devices whose backing file lies below ``path`` (other tests may use loops too)."""
    return {loop: backing for loop, backing in attached_loops().items() if backing.startswith(str(path) + "/")}


def mounts_under(path: Path) -> list[str]:
    return sorted(p for p in mounted_paths() if p.startswith(str(path) + "/"))


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
        assert layer["serve"] == "kernel" and layer["loop_direct_io"] is False
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


def test_a_read_of_the_chunk_device_brings_the_bytes_that_follow_it_into_the_page_cache(tmp_path):
    """The daemon stores what follows each chunk-device read (within its cell) in the kernel's
    cache of the device file: reading the next file of the layout then sends no request."""
    require_root()
    source = tmp_path / "src"
    source.mkdir()
    for name in ("a", "b"):
        (source / name).write_bytes(os.urandom(40_000))
    image = make_plain_image(tmp_path / "image", source)
    with Image.open(image.meta) as meta:
        first, second = sorted(("a", "b"), key=lambda name: meta.map(meta.resolve(name), 0, 1)[0].device_offset)
        gap = meta.map(meta.resolve(second), 0, 1)[0].device_offset - meta.map(meta.resolve(first), 0, 1)[0].device_offset
    assert 40_000 <= gap < 128 << 10  # neighbours in one cell, as mkfs.erofs lays them out
    with lazy_mount(tmp_path / "mnt", "--serve", "kernel", "--meta", str(image.meta), "--blob", str(image.blob),
                    run_dir=tmp_path / "run", cache_dir=tmp_path / "cache") as mount:
        assert (mount.path / first).read_bytes() == (source / first).read_bytes()
        requests = mount.stats()["reads"]["requests"]
        assert requests >= 1
        assert (mount.path / second).read_bytes() == (source / second).read_bytes()
        assert mount.stats()["reads"]["requests"] == requests


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
