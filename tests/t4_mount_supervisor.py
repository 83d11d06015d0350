"""The supervisor of `lazyfs mount`'s own daemon in kernel serving mode (lazyfs.daemon.mountsupervisor).

With the real kernel and the real registry: the daemon of a mount is SIGKILLed while a reader
holds a file open; the supervisor starts a new daemon, which takes the layers' mounts over
(LOOP_CHANGE_FD), and the reader reads data it never read, with the right bytes; `lazyfs
umount` then leaves no loop device, mount or process behind. A daemon that cannot come back
is given up after a bounded number of restarts, with one ERROR line.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from lazyfs.daemon.mountstate import MountState, daemon_running
from lazyfs.daemon.supervise import process_running
from lazyfs.serve.kernel import attached_loops
from lazyfs.serve.mounts import mounted_paths
from tests.fixtures.common import require_root
from tests.fixtures.erofs_trees import make_plain_image
from tests.fixtures.images import build_image, directory, file
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import lazy_mount, lazyfs_cli

CHUNK = 65536
rng = random.Random(11)
BIG = rng.randbytes(3 * 1024 * 1024 + 777)


def leftovers(path: Path) -> tuple[dict, list]:
    """Loop devices backed by files below ``path``, and mounts below it."""
    loops = {loop: backing for loop, backing in attached_loops().items() if backing.startswith(str(path) + "/")}
    return loops, sorted(p for p in mounted_paths() if p.startswith(str(path) + "/"))


def wait_until(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return result


def released(path: Path, timeout: float = 10.0) -> bool:
    """Every loop and mount below ``path`` gone (loops clear as their last user closes them)."""
    deadline = time.monotonic() + timeout
    while any(leftovers(path)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def pushed_image(registry):
    require_root()
    image = build_image([[directory("etc"), file("etc/hostname", b"box\n")],
                         [directory("data"), file("data/big", BIG)]])
    push_to_registry(registry, "t/supervised", convert_image(image, chunk_size=CHUNK))
    return f"{registry.host}/t/supervised:v1"


def test_a_killed_daemon_is_restarted_and_an_open_file_reads_on(pushed_image, tmp_path):
    run_dir = tmp_path / "run"
    with lazy_mount(tmp_path / "mnt", "--serve", "kernel", "--no-prefetch", "--learned-trace", "off",
                    "--policy", "none", pushed_image, run_dir=run_dir, cache_dir=tmp_path / "cache") as mount:
        state = MountState.for_mountpoint(mount.path, run_dir)
        supervisor = state.supervisor_pid()
        assert supervisor is not None
        old_pid = mount.daemon_pid()
        assert [layer["serve"] for layer in mount.stats()["attached"]] == ["kernel", "kernel"]
        loops_before = leftovers(tmp_path)[0]
        held = open(mount.path / "data" / "big", "rb")
        assert held.read(CHUNK) == BIG[:CHUNK]
        os.kill(old_pid, signal.SIGKILL)
        new_pid = wait_until(lambda: state.ping(timeout=2) and state.ping(timeout=2).get("ready")
                             and mount.daemon_pid() != old_pid and mount.daemon_pid(), "no new daemon")
        assert mount.stats()["pid"] == new_pid != old_pid
        assert state.supervisor_pid() == supervisor  # the same supervisor, still watching
        attached = mount.stats()["attached"]
        assert all(layer.get("adopted") for layer in attached), attached
        assert leftovers(tmp_path)[0].keys() == loops_before.keys()  # the same loop devices, swapped
        # Data the reader never read, through the file it opened before the kill, and nothing
        # from the page cache: every byte comes from the new daemon.
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(held.fileno(), 1 << 20, 2 << 20) == BIG[2 << 20:3 << 20]
        held.seek(0)
        assert held.read() == BIG
        held.close()
        assert (mount.path / "etc" / "hostname").read_bytes() == b"box\n"
        table = lazyfs_cli("stats", "--run-dir", str(run_dir), str(mount.path)).stdout
        assert f"lazyfs daemon {new_pid}" in table
        log = state.log_file.read_text()
        assert f"lazyfs daemon lost (pid {old_pid}, killed by SIGKILL)" in log
        assert f"lazyfs daemon started (pid {new_pid})" in log
        lazyfs_cli("umount", "--run-dir", str(run_dir), str(mount.path))
        assert not process_running(supervisor, str(state.root))
        assert not daemon_running(new_pid)
    # A mount namespace that another process on the machine made meanwhile holds a copy of the
    # EROFS mount (and so its metadata loop) until that process exits: a longer bound.
    assert released(tmp_path, 60), leftovers(tmp_path)
    assert not os.path.ismount(tmp_path / "mnt")
    assert not state.root.exists()


def test_a_daemon_that_keeps_dying_is_given_up(tmp_path):
    """Each daemon the supervisor starts is SIGKILLed once it is ready: after a bounded number
    of restarts in a row the supervisor gives up with one ERROR line; umount releases all."""
    require_root()
    image = make_plain_image(tmp_path / "image")
    run_dir = tmp_path / "run"
    with lazy_mount(tmp_path / "mnt", "--serve", "kernel", "--meta", str(image.meta), "--blob", str(image.blob),
                    run_dir=run_dir, cache_dir=tmp_path / "cache") as mount:
        state = MountState.for_mountpoint(mount.path, run_dir)
        supervisor = state.supervisor_pid()
        assert supervisor is not None
        killed = []
        for _ in range(20):  # bounded: the supervisor gives up after 5 restarts
            pid = wait_until(lambda: (not process_running(supervisor, str(state.root)) and -1)
                             or (mount.daemon_pid() not in killed and (state.ping(timeout=2) or {}).get("ready")
                                 and mount.daemon_pid()), "no new daemon and no end")
            if pid == -1:
                break
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        log = state.log_file.read_text()
        print(log)  # shown if the test fails
        assert len(killed) == 6, killed  # the first daemon and 5 restarted ones
        gave_up = [line for line in log.splitlines() if "giving up" in line]
        assert len(gave_up) == 1 and "keeps dying (5 restarts in a row did not last)" in gave_up[0], gave_up
        assert f"`lazyfs umount {mount.path}` releases the mount" in gave_up[0]
        assert all(f"lazyfs daemon lost (pid {pid}, killed by SIGKILL)" in log for pid in killed)
        lazyfs_cli("umount", "--run-dir", str(run_dir), str(mount.path))
    # A mount namespace that another process on the machine made meanwhile holds a copy of the
    # EROFS mount (and so its metadata loop) until that process exits: a longer bound.
    assert released(tmp_path, 60), leftovers(tmp_path)
    assert not os.path.ismount(tmp_path / "mnt")
