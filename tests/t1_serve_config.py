"""The serving mode in the configuration files and on the daemon's command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.config import ConfigError, load_config
from lazyfs.daemon.mountstate import daemon_command
from snapshotter import config as snapshotter_config
from snapshotter.daemon_client import DaemonLayerFS, DaemonSupervisor


def test_lazyfs_config_serve(tmp_path):
    path = tmp_path / "lazyfs.toml"
    assert load_config(tmp_path / "missing.toml").serve == "kernel"  # the faster mode (docs/design.md)
    path.write_text('[daemon]\nserve = "fuse"\n')
    assert load_config(path).serve == "fuse"
    path.write_text('[cache]\nsize = "1G"\n')
    assert load_config(path).serve == "kernel"
    path.write_text('[daemon]\nserve = "fast"\n')
    with pytest.raises(ConfigError, match="serve must be one of fuse, kernel"):
        load_config(path)


def test_daemon_command_line_names_the_mode():
    common = dict(fuse_dir=Path("/f"), socket=Path("/s"), cache_dir=Path("/c"))
    assert "--serve" not in daemon_command(**common)
    cmd = daemon_command(**common, serve="kernel", layers_dir=Path("/l"))
    assert cmd[cmd.index("--serve") + 1] == "kernel" and cmd[cmd.index("--layers-dir") + 1] == "/l"


def test_snapshotter_kernel_mode_puts_layers_at_the_mountpoint(tmp_path):
    path = tmp_path / "snapshotter.toml"
    path.write_text('[daemon]\nserve = "kernel"\n')
    cfg = snapshotter_config.load(path, root=tmp_path / "root")
    cmd = DaemonSupervisor(cfg, DaemonLayerFS(cfg.daemon.control_socket, cfg.daemon.mountpoint)).command()
    # The lowerdirs stay <root>/mnt/<layer>; the FUSE mount holds only the chunk-device files.
    assert cmd[cmd.index("--layers-dir") + 1] == str(tmp_path / "root" / "mnt")
    assert cmd[cmd.index("--fuse-dir") + 1] == str(tmp_path / "root" / "chunk-devices")
    assert snapshotter_config.load(None, root=tmp_path).daemon.serve == "kernel"
    path.write_text('[daemon]\nserve = "fuse"\n')
    assert snapshotter_config.load(path, root=tmp_path).daemon.serve == "fuse"
    path.write_text('[daemon]\nserve = 1\n')
    with pytest.raises(snapshotter_config.ConfigError):
        snapshotter_config.load(path)
    path.write_text('[daemon]\nserve = "both"\n')
    with pytest.raises(snapshotter_config.ConfigError, match="daemon.serve"):
        snapshotter_config.load(path)
