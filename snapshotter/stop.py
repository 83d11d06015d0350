"""``lazyfs-snapshotter stop``: stop the snapshotter and its daemon, for an uninstall or a node drain.

Stopping the snapshotter alone (SIGTERM) leaves the daemon running, so that running
containers keep their lazy layers. This stops both, in the order that loses nothing: it
refuses while overlay mounts (containers, `ctr` mounts) use layers of the daemon's mount,
unless forced; stops the snapshotter first (its supervisor would restart a daemon that
vanished); then asks the daemon to shut down over its control socket (it unmounts its FUSE
mount), escalating to SIGTERM/SIGKILL; and detaches a FUSE mount still held by overlays that
were forced away from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .config import Config
from .daemon_client import PING_TIMEOUT, DaemonLayerFS, _is_daemon_process, stop_daemon
from .errors import LayerFSError

SNAPSHOTTER_PID = "snapshotter.pid"


def lazy_layer_users(mountpoint: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points of the overlays whose lower layers lie in the daemon's mount."""
    prefix = str(mountpoint).rstrip("/") + "/"
    users = []
    for line in mountinfo.read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        kind, _source, options = (rest.split(" ") + ["", "", ""])[:3]
        if kind != "overlay":
            continue
        for option in options.split(","):
            if option.startswith("lowerdir="):
                lowers = option[len("lowerdir="):].replace("\\040", " ").split(":")
                if any(lower == prefix[:-1] or lower.startswith(prefix) for lower in lowers):
                    users.append(fields.split(" ")[4].replace("\\040", " "))
    return users


def stop(cfg: Config, force: bool = False, timeout: float = 30.0) -> tuple[int, str]:
    """(exit status, what happened)."""
    mountpoint = cfg.daemon.mountpoint
    users = lazy_layer_users(mountpoint)
    if users and not force:
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        return 1, (f"refusing to stop: {len(users)} mount(s) use lazy layers of {mountpoint} ({shown}); "
                   f"stop those containers first, or use --force (they lose their lazy layers)")
    done = []
    pid = _read_pid(cfg.root / SNAPSHOTTER_PID)
    if pid is not None and _is_snapshotter(pid):
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout, lambda: _is_snapshotter(pid)):
            os.kill(pid, signal.SIGKILL)
        done.append(f"snapshotter {pid} stopped")
    (cfg.root / SNAPSHOTTER_PID).unlink(missing_ok=True)

    pid_file = cfg.root / "daemon.pid"
    daemon_pid = _read_pid(pid_file)
    if daemon_pid is not None and _is_daemon_process(daemon_pid, cfg.daemon.control_socket):
        layerfs = DaemonLayerFS(cfg.daemon.control_socket, mountpoint)
        try:
            layerfs.request("shutdown", timeout=PING_TIMEOUT)
        except LayerFSError:
            pass  # not answering: the signals below
        if not _wait_gone(daemon_pid, timeout, lambda: _is_daemon_process(daemon_pid, cfg.daemon.control_socket)):
            stop_daemon(pid_file, timeout=timeout)
        done.append(f"daemon {daemon_pid} stopped")
    pid_file.unlink(missing_ok=True)
    if _is_mounted(mountpoint):  # held by overlays that --force left behind
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        done.append(f"{mountpoint} detached")
    if users:
        done.append(f"{len(users)} mount(s) lost their lazy layers")
    return 0, "; ".join(done) or "nothing was running"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _is_snapshotter(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and b"snapshotter" in cmdline


def _wait_gone(pid: int, timeout: float, alive) -> bool:
    deadline = time.monotonic() + timeout
    while alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == str(path) for line in f)
