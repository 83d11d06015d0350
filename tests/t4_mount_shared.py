"""`lazyfs daemon` + `lazyfs mount --daemon`: one running daemon serving several image mounts.

Real daemon, real FUSE and overlay mounts, images from the real registry.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess

import pytest

from lazyfs.daemon.control import request
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.images import build_image, directory, file, whiteout
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import lazyfs_cli, start_shared_daemon

rng = random.Random(11)
BIG = rng.randbytes(700_000)
BASE = [directory("etc"), file("etc/os", b"base\n"), file("etc/gone", b"x"), directory("bin"),
        file("bin/tool", BIG, mode=0o755)]
TOP = [directory("etc"), whiteout("etc/gone"), file("etc/os", b"top\n")]
OTHER = [directory("data"), file("data/one", rng.randbytes(100_000))]


@pytest.fixture(scope="module")
def images(registry):
    require_root()
    require_tool("fusermount3")
    push_to_registry(registry, "t/shared-a", convert_image(build_image([BASE, TOP]), chunk_size=65536))
    push_to_registry(registry, "t/shared-b", convert_image(build_image([OTHER]), chunk_size=65536))
    return f"{registry.host}/t/shared-a:v1", f"{registry.host}/t/shared-b:v1"


@pytest.fixture
def shared_daemon(tmp_path):
    socket = tmp_path / "daemon.sock"
    proc = start_shared_daemon(socket, tmp_path / "fuse", tmp_path / "cache", tmp_path / "daemon.log")
    try:
        yield socket, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _mount(socket, image, mnt, run_dir, *extra, check=True):
    mnt.mkdir(exist_ok=True)
    return lazyfs_cli("mount", "--daemon", str(socket), "--run-dir", str(run_dir), *extra, image, str(mnt),
                      check=check)


def test_one_daemon_serves_several_mounts(images, shared_daemon, tmp_path):
    socket, proc = shared_daemon
    image_a, image_b = images
    run_dir = tmp_path / "run"
    a1, a2, b = tmp_path / "a1", tmp_path / "a2", tmp_path / "b"
    _mount(socket, image_a, a1, run_dir)
    _mount(socket, image_a, a2, run_dir)  # the same image twice: its own layer names
    _mount(socket, image_b, b, run_dir, "--no-prefetch")
    try:
        for mnt in (a1, a2):
            assert (mnt / "etc/os").read_bytes() == b"top\n"
            assert not (mnt / "etc/gone").exists()
            assert (mnt / "bin/tool").read_bytes() == BIG
        assert (b / "data/one").stat().st_size == 100_000
        layers = request(str(socket), "list")["layers"]
        assert len(layers) == 5
        stats = json.loads(lazyfs_cli("stats", "--json", "--run-dir", str(run_dir), str(a1)).stdout)
        assert stats["pid"] == proc.pid and stats["layers"] == 5
        # A mount point in use refuses a second mount, and the daemon keeps serving.
        refused = _mount(socket, image_b, a1, run_dir, check=False)
        assert refused.returncode == 1 and "already mounted" in refused.stderr

        lazyfs_cli("umount", "--run-dir", str(run_dir), str(a1))
        assert not os.path.ismount(a1) and proc.poll() is None
        assert (a2 / "bin/tool").read_bytes() == BIG  # the other mount of the same image is untouched
        assert len(request(str(socket), "list")["layers"]) == 3
    finally:
        for mnt in (a1, a2, b):
            lazyfs_cli("umount", "--lazy", "--run-dir", str(run_dir), str(mnt), check=False)
    assert request(str(socket), "list")["layers"] == []
    assert not any(os.path.ismount(m) for m in (a1, a2, b))
    assert list(run_dir.iterdir()) == []
    assert proc.poll() is None


def test_shared_mount_errors(images, shared_daemon, registry, tmp_path):
    socket, proc = shared_daemon
    run_dir, mnt = tmp_path / "run", tmp_path / "mnt"
    missing = _mount(socket, f"{registry.host}/t/shared-a:nope", mnt, run_dir, check=False)
    assert missing.returncode == 2 and "cannot resolve" in missing.stderr, missing.stderr
    mixed = _mount(socket, images[0], mnt, run_dir, "--foreground", check=False)
    assert mixed.returncode == 2 and "--foreground cannot be used with --daemon" in mixed.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(busy)], check=True)
    try:
        taken = _mount(socket, images[0], busy, run_dir, check=False)
        assert taken.returncode == 1 and "something else is mounted" in taken.stderr, taken.stderr
    finally:
        subprocess.run(["umount", str(busy)], check=True)
    gone = _mount(socket.with_name("nobody.sock"), images[0], mnt, run_dir, check=False)
    assert gone.returncode == 1 and "lazyfs mount:" in gone.stderr
    assert not os.path.ismount(mnt) and not (run_dir.exists() and list(run_dir.iterdir()))
    assert request(str(socket), "list")["layers"] == [] and proc.poll() is None


def test_umount_after_the_shared_daemon_died(images, shared_daemon, tmp_path):
    socket, proc = shared_daemon
    run_dir, mnt = tmp_path / "run", tmp_path / "mnt"
    _mount(socket, images[1], mnt, run_dir)
    assert (mnt / "data/one").stat().st_size == 100_000
    proc.send_signal(signal.SIGTERM)  # the daemon unmounts what it stacked as it stops
    proc.wait(timeout=30)
    assert not os.path.ismount(mnt)
    lazyfs_cli("umount", "--run-dir", str(run_dir), str(mnt))  # cleans the state of the dead daemon
    assert list(run_dir.iterdir()) == []
