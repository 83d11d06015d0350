"""``lazyfs-snapshotter upgrade``: replace the running lazyfs daemon by a new one (the lazyfs
installed now, the configuration as it is now) under running containers, without a failed read.

Kernel serving mode only: the containers' lowerdirs are EROFS mounts whose loop devices the new
daemon takes over (lazyfs.daemon.handover); in the FUSE-tree mode they are directories of the
old daemon's FUSE mount, which no other process can take over. The new daemon is started
beside the old one with its own FUSE directory and is recorded in ``daemon.pid`` before the
old one exits, so the snapshotter's supervisor watches the new one from then on instead of
restarting a daemon (see DaemonSupervisor._alive).
"""

from __future__ import annotations

from lazyfs.daemon.upgrade import UpgradeError, upgrade as upgrade_daemon

from .config import Config
from .daemon_client import DaemonLayerFS, DaemonSupervisor


def upgrade(cfg: Config, timeout: float) -> tuple[int, str]:
    """(exit status, what happened)."""
    d = cfg.daemon
    if not d.enabled:
        return 1, "the lazyfs daemon is disabled in the configuration: nothing to upgrade"
    if d.serve != "kernel":
        return 1, (f"serve = \"{d.serve}\": containers read the layers through the daemon's FUSE mount at "
                   f"{d.mountpoint}, which a new daemon cannot take over; a hot upgrade needs [daemon] "
                   f"serve = \"kernel\"")
    supervisor = DaemonSupervisor(cfg, DaemonLayerFS(d.control_socket, d.mountpoint))
    pid_file = cfg.root / "daemon.pid"
    try:
        recorded = pid_file.read_text()
    except OSError:
        recorded = None

    def restore() -> None:
        if recorded is not None:
            pid_file.write_text(recorded)

    try:
        done = upgrade_daemon(d.control_socket, supervisor.command(), log_file=supervisor.log_file,
                              on_started=lambda pid: pid_file.write_text(str(pid)), on_failed=restore,
                              timeout=timeout)
    except UpgradeError as e:
        return 1, str(e)
    return 0, f"daemon {done.old_pid} replaced by daemon {done.new_pid} ({done.layers} layers)"
