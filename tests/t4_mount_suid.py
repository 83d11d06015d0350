"""An untrusted image cannot hand a local user root: `lazyfs mount` is nosuid,nodev by default.

The image carries a setuid-root copy of id(1) and a world-writable /dev/null node. A user
(`nobody`) who can reach the mount point runs the one and opens the other: on the default
mount the setuid bit is ignored and the device refuses to open; with --allow-suid-dev (a
trusted image) both work. Both stacking forms are covered: an overlay (several layers) and a
bind mount (--layer), through a per-mount daemon and through a shared one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from lazyfs.serve.mounts import mounted_paths
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.images import build_image, device, directory, file
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import lazy_mount, lazyfs_cli, start_shared_daemon
from tests.t4_mount_image import open_store_digests

ID_BINARY = Path(shutil.which("id") or "/usr/bin/id")
BOTTOM = [directory("bin"), file("bin/id", ID_BINARY.read_bytes(), mode=0o4755)]
TOP = [directory("dev"), device("dev/null", "char", 1, 3, mode=0o666), file("hello", b"hi\n")]


@pytest.fixture(scope="module")
def suid_image(registry):
    require_root()
    require_tool("runuser")
    push_to_registry(registry, "t/suid", convert_image(build_image([BOTTOM, TOP])))
    return f"{registry.host}/t/suid:v1"


@pytest.fixture
def public_dir():
    """A directory `nobody` can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="lazyfs-suid-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, text=True, timeout=30)


def effective_uid_of_image_id(root: Path) -> str:
    result = as_nobody(str(root / "bin" / "id"), "-u")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def device_opens(root: Path) -> bool:
    result = as_nobody("sh", "-c", f"echo x > {root / 'dev' / 'null'}")
    if result.returncode != 0:
        assert "Permission denied" in result.stderr, result.stderr
    return result.returncode == 0


def mount_options(path: Path) -> set[str]:
    """The per-mount options of the mount at path (mountinfo field 6)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return set(fields[5].split(","))
    raise AssertionError(f"{path} is not mounted")


def check(root: Path, trusted: bool) -> None:
    assert (root / "hello").read_bytes() == b"hi\n"
    assert os.stat(root / "bin" / "id").st_mode & 0o4000  # the bit is shown, just not honoured
    if trusted:
        assert effective_uid_of_image_id(root) == "0"
        assert device_opens(root)
        assert {"nosuid", "nodev"}.isdisjoint(mount_options(root))
    else:
        assert effective_uid_of_image_id(root) == str(pwd.getpwnam("nobody").pw_uid)
        assert not device_opens(root)
        assert {"nosuid", "nodev"} <= mount_options(root)


@pytest.mark.parametrize("trusted", [False, True], ids=["default", "allow-suid-dev"])
@pytest.mark.parametrize("stacking", ["overlay", "bind"])
def test_setuid_and_devices_need_an_opt_in(suid_image, registry, public_dir, tmp_path, trusted, stacking):
    args = ["--allow-suid-dev"] if trusted else []
    if stacking == "bind":  # one layer: a bind mount of the FUSE layer directory
        host, _, repo = suid_image.partition("/")
        bottom = open_store_digests(host, repo)[0]
        args += ["--layer", bottom]
    with lazy_mount(public_dir / "mnt", *args, suid_image, run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        if stacking == "bind":
            assert (mount.path / "bin" / "id").exists() and not (mount.path / "hello").exists()
            assert effective_uid_of_image_id(mount.path) == ("0" if trusted else str(pwd.getpwnam("nobody").pw_uid))
            assert {"nosuid", "nodev"}.isdisjoint(mount_options(mount.path)) == trusted
        else:
            check(mount.path, trusted)
        fuse_dirs = [p for p in mounted_paths() if p.startswith(str(mount.state_root()))]
        assert fuse_dirs, "the daemon's FUSE mount is in its state directory"
        for fuse_dir in fuse_dirs:
            assert ({"nosuid", "nodev"} <= mount_options(Path(fuse_dir))) != trusted


def test_shared_daemon_is_nosuid_and_image_mounts_opt_in_one_by_one(suid_image, public_dir, tmp_path):
    """A daemon started without --allow-suid-dev: its own FUSE mount is nosuid,nodev (any user
    who reaches it gets nothing), and one image mount may still opt in while another does not."""
    require_tool("fusermount3")
    socket, fuse_dir = tmp_path / "daemon.sock", public_dir / "fuse"
    # The FUSE-tree mode: its layer directories are what this checks (kernel mode: t4_kernel_mode).
    daemon = start_shared_daemon(socket, fuse_dir, tmp_path / "cache", tmp_path / "daemon.log", "--serve", "fuse")
    try:
        plain, trusted, trusted_bind = public_dir / "plain", public_dir / "trusted", public_dir / "trusted-bind"
        host, _, repo = suid_image.partition("/")
        bottom = open_store_digests(host, repo)[0]
        run_dir = str(tmp_path / "run")
        for mountpoint, extra in ((plain, []), (trusted, ["--allow-suid-dev"]),
                                  (trusted_bind, ["--allow-suid-dev", "--layer", bottom])):
            mountpoint.mkdir()
            lazyfs_cli("mount", "--daemon", str(socket), "--run-dir", run_dir, *extra, suid_image, str(mountpoint))
        try:
            assert {"nosuid", "nodev"} <= mount_options(fuse_dir)
            layer_dir = next(p for p in fuse_dir.iterdir() if (p / "bin").exists())
            assert effective_uid_of_image_id(layer_dir) == str(pwd.getpwnam("nobody").pw_uid)
            check(plain, trusted=False)
            check(trusted, trusted=True)
            # a bind of the nosuid FUSE directory, remounted with suid,dev
            assert effective_uid_of_image_id(trusted_bind) == "0"
            assert {"nosuid", "nodev"}.isdisjoint(mount_options(trusted_bind))
        finally:
            for mountpoint in (plain, trusted, trusted_bind):
                lazyfs_cli("umount", "--run-dir", run_dir, str(mountpoint), check=False)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
