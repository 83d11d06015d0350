"""Hot upgrade, the parts that need no daemon: the successor's command line and FUSE
directory, and the refusals that come before anything starts (the takeover itself is proven
with real daemons in t4_kernel_mode and under containerd in t5_containerd)."""

from __future__ import annotations

from pathlib import Path

from lazyfs.daemon.upgrade import successor_command, successor_fuse_dir
from snapshotter import config as config_mod
from snapshotter.upgrade import upgrade


def test_successive_daemons_alternate_between_two_fuse_directories():
    assert successor_fuse_dir(Path("/run/x/fuse")) == Path("/run/x/fuse.next")
    assert successor_fuse_dir(Path("/run/x/fuse.next")) == Path("/run/x/fuse")


def test_the_successor_gets_its_own_fuse_dir_and_ready_fd_and_no_startup_spec():
    running = ["/usr/bin/python3", "-m", "lazyfs.daemon", "--fuse-dir", "/f", "--socket=/s", "--cache-dir", "/c",
               "--serve", "kernel", "--startup", "/spec.json", "--take-over", "--ready-fd", "5",
               "--insecure-registry", "h:1", "--insecure-registry", "h:2", "-v"]
    assert successor_command(running, Path("/f.next"), Path("/s"), 9) == [
        "/usr/bin/python3", "-m", "lazyfs.daemon", "--cache-dir", "/c", "--serve", "kernel",
        "--insecure-registry", "h:1", "--insecure-registry", "h:2", "-v",
        "--fuse-dir", "/f.next", "--socket", "/s", "--take-over", "--ready-fd", "9"]


def test_the_snapshotter_refuses_an_upgrade_in_the_fuse_tree_mode(tmp_path):
    config = tmp_path / "snapshotter.toml"
    config.write_text('[daemon]\nserve = "fuse"\n')
    status, message = upgrade(config_mod.load(config, root=tmp_path / "root"), timeout=5)
    assert status == 1 and 'serve = "kernel"' in message and "cannot take over" in message
    assert not (tmp_path / "root" / "daemon.pid").exists()  # nothing was started


def test_the_snapshotter_reports_a_daemon_that_does_not_answer(tmp_path):
    config = tmp_path / "snapshotter.toml"
    config.write_text('[daemon]\nserve = "kernel"\n')
    status, message = upgrade(config_mod.load(config, root=tmp_path / "root"), timeout=5)
    assert status == 1 and message.startswith("no daemon answers at "), message
