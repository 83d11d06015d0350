"""`lazyfs-snapshotter stop`: the snapshotter and its daemon stop together, not while mounts
use lazy layers (unless forced); the daemon's log at its default level. A real snapshotter
process with its real daemon and FUSE mount; an overlay over the daemon's mount stands for a
container's rootfs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazyfs.bench.system import unmount_below
from lazyfs.daemon.control import ControlError, request
from snapshotter import config as snapshotter_config
from snapshotter.daemon_client import stop_daemon
from snapshotter.stop import lazy_layer_users
from tests.fixtures.common import require_root

EXE = Path(sys.executable).parent / "lazyfs-snapshotter"
START_TIMEOUT = 30.0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == str(path) for line in f)


class Node:
    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "root"
        self.config = tmp_path / "sn.toml"
        self.config.write_text(f'root = "{self.root}"\nsocket = "{tmp_path}/sn.sock"\n'
                               f'[registry]\nhosts_dir = ""\n')
        self.process: subprocess.Popen | None = None
        # The daemon's FUSE mount: the layers' trees, or in kernel mode their chunk devices.
        self.fuse_dir = snapshotter_config.load(self.config).daemon.fuse_dir(self.root)

    def start(self) -> None:
        log = open(self.root.parent / "snapshotter.log", "ab")
        self.process = subprocess.Popen([str(EXE), "--config", str(self.config)], stdout=log, stderr=log,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if request(str(self.root / "daemon.sock"), "ping", timeout=2.0).get("ready") and \
                        (self.root / "snapshotter.pid").exists():
                    return
            except ControlError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, "the snapshotter did not start"
            time.sleep(0.05)

    def daemon_pid(self) -> int:
        return int((self.root / "daemon.pid").read_text())

    def stop(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(EXE), "stop", "--config", str(self.config), "--timeout", "20", *extra],
                              capture_output=True, text=True, timeout=120)

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        stop_daemon(self.root / "daemon.pid")
        unmount_below(self.root.parent)


@pytest.fixture
def node(tmp_path):
    require_root()
    node = Node(tmp_path)
    try:
        yield node
    finally:
        node.cleanup()


def _container_like_mount(node: Node, tmp_path: Path) -> Path:
    """A read-only overlay whose lowest layer is the daemon's mount, as a container rootfs is."""
    target, other = tmp_path / "rootfs", tmp_path / "other"
    target.mkdir()
    other.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={other}:{node.root / 'mnt'}",
                    str(target)], check=True)
    return target


def test_stop_refuses_while_in_use_then_stops_both(node, tmp_path):
    node.start()
    snapshotter_pid, daemon_pid = node.process.pid, node.daemon_pid()
    # The daemon logs at its default level: startup, and failures such as a bad attach.
    with pytest.raises(ControlError):
        request(str(node.root / "daemon.sock"), "attach", kind="plain", name="bad", meta="/nonexistent",
                blob="/nonexistent")
    log = (node.root / "daemon.log").read_text()
    assert "daemon ready" in log and "attaching bad failed" in log

    rootfs = _container_like_mount(node, tmp_path)
    assert lazy_layer_users(node.root / "mnt") == [str(rootfs)]
    refused = node.stop()
    assert refused.returncode == 1 and "refusing" in refused.stderr and str(rootfs) in refused.stderr
    assert _alive(snapshotter_pid) and _alive(daemon_pid) and _mounted(node.fuse_dir)

    subprocess.run(["umount", str(rootfs)], check=True)
    done = node.stop()
    assert done.returncode == 0, done.stderr
    assert node.process.wait(timeout=30) == 0
    deadline = time.monotonic() + 30
    while _alive(daemon_pid):
        assert time.monotonic() < deadline, "the daemon did not exit"
        time.sleep(0.05)
    assert not _mounted(node.fuse_dir) and not (node.root / "snapshotter.pid").exists()
    assert node.stop().stdout.strip().endswith("nothing was running")


def test_stop_force_detaches_the_lazy_layers_of_mounts_in_use(node, tmp_path):
    node.start()
    daemon_pid = node.daemon_pid()
    rootfs = _container_like_mount(node, tmp_path)
    done = node.stop("--force")
    assert done.returncode == 0 and "lost their lazy layers" in done.stdout, done.stderr
    assert node.process.wait(timeout=30) == 0 and not _alive(daemon_pid)
    assert not _mounted(node.fuse_dir) and not _mounted(node.root / "mnt")
    subprocess.run(["umount", "-l", str(rootfs)], check=False)
