"""A containerd node behind a pull-through mirror: one hosts.toml directory serves containerd's
pull (`ctr-remote image rpull --hosts-dir`) and the lazyfs daemon's range reads (the
snapshotter's `[registry] hosts_dir`). Real containerd, runc, lazyfs-snapshotter and its
daemon, an origin docker-registry and a second one as its pull-through cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapshotter.daemon_client import stop_daemon
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.containerd import unmount_below
from tests.fixtures.images import build_image, directory, file, symlink
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.registry import start_registry

SNAPSHOTTER = "lazyfs"
LAZYFS_AGENT = "python-httpx"


def _busybox_layer() -> list:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox (busybox-static) is not installed: tools/install.sh installs it")
    entries = [directory("bin"), file("bin/busybox", Path(busybox).read_bytes(), mode=0o755)]
    entries += [symlink(f"bin/{tool}", "busybox") for tool in ("sh", "cat", "sleep")]
    return entries + [directory("proc"), directory("sys"), directory("dev"), directory("tmp")]


def _start_snapshotter(root: Path, socket: Path, hosts_dir: Path) -> subprocess.Popen:
    config = root.parent / "snapshotter.toml"
    config.write_text(f'root = "{root}"\nsocket = "{socket}"\n[registry]\nhosts_dir = "{hosts_dir}"\n')
    if socket.exists():
        socket.unlink()
    log = open(root.parent / "snapshotter.log", "ab")
    process = subprocess.Popen([str(Path(sys.executable).parent / "lazyfs-snapshotter"), "--config", str(config)],
                               stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 30
    while not socket.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the snapshotter did not start"
        time.sleep(0.05)
    return process


def test_containerd_node_starts_lazily_from_the_mirror(containerd, tmp_path):
    require_root()
    require_tool("ctr-remote")
    image = convert_image(build_image([_busybox_layer(), [file("hello.txt", b"hello from the zone mirror\n"),
                                                          file("big.bin", b"\1" * (4 << 20))]]))
    with start_registry(tmp_path / "origin") as origin, \
            start_registry(tmp_path / "mirror", extra={"proxy": {"remoteurl": origin.url}}) as mirror:
        push_to_registry(origin, "t/zone", image)
        ref = f"{origin.host}/t/zone:v1"
        hosts = containerd.hosts_dir / origin.host
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts.toml").write_text(f'server = "http://{origin.host}"\n\n[host."http://{mirror.host}"]\n'
                                          f'  capabilities = ["pull", "resolve"]\n')
        root = tmp_path / "sn-root"
        process = _start_snapshotter(root, containerd.snapshotter_socket, containerd.hosts_dir)
        try:
            containerd.wait_snapshotter(SNAPSHOTTER, timeout=15)
            origin_mark, mirror_mark = origin.mark(), mirror.mark()
            containerd.pull(ref, snapshotter=SNAPSHOTTER, remote=True)
            out = containerd.run(ref, "zone-mirror", "/bin/cat", "/hello.txt", snapshotter=SNAPSHOTTER)
            assert out.stdout == "hello from the zone mirror\n"
            # The daemon's reads (python-httpx) all went to the mirror, none to the origin; the
            # origin's blob requests are the mirror's own (docker-distribution's agent).
            origin_gets = [r for r in origin.requests(origin_mark) if "/blobs/" in r.path]
            assert not [r for r in origin_gets if r.user_agent.startswith(LAZYFS_AGENT)]
            from_mirror = [r for r in mirror.requests(mirror_mark)
                           if "/blobs/" in r.path and r.user_agent.startswith(LAZYFS_AGENT)]
            assert from_mirror and all(r.status in (200, 206) for r in from_mirror)
            assert "attached" in (root / "daemon.log").read_text()

            # `lazyfs-snapshotter stop` refuses while a container runs on lazy layers, and
            # stops the snapshotter and its daemon once it is gone.
            containerd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "zone-sleeper", "/bin/sleep", "600")
            stop = [str(Path(sys.executable).parent / "lazyfs-snapshotter"), "stop", "--config",
                    str(root.parent / "snapshotter.toml")]
            refused = subprocess.run(stop, capture_output=True, text=True, timeout=60)
            assert refused.returncode == 1 and "refusing" in refused.stderr, refused.stderr
            assert process.poll() is None
            containerd.ctr("task", "kill", "-s", "SIGKILL", "zone-sleeper")
            containerd.ctr("task", "delete", "-f", "zone-sleeper")
            containerd.ctr("containers", "rm", "zone-sleeper")
            stopped = subprocess.run(stop, capture_output=True, text=True, timeout=120)
            assert stopped.returncode == 0, stopped.stderr
            assert process.wait(timeout=30) == 0 and not (root / "daemon.sock").exists()
        finally:
            containerd.clean_namespaces()
            process.terminate()
            process.wait(timeout=15)
            stop_daemon(root / "daemon.pid")
            unmount_below(root)
