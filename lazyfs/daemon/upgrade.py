"""Hot upgrade, the side that asks for it (`lazyfs daemon upgrade`, `lazyfs-snapshotter upgrade`).

Starts the successor daemon -- the same command line with another FUSE directory and
``--take-over`` -- detached, waits for its one-line startup report, then for the old daemon to
exit. The handover itself is between the two daemons (lazyfs.daemon.handover); this side only
starts, waits and reports. Blocking code: no trio, no pyfuse3 (the snapshotter uses it too).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyfs.daemon.control import ControlError, request
from lazyfs.daemon.mountstate import wait_for_exit
from lazyfs.serve.mounts import is_mounted, is_stale

# Successive daemons alternate between the FUSE directory and this sibling of it, so that
# upgrades do not pile up directories and a dead daemon's directory is reused.
SUCCESSOR_SUFFIX = ".next"
UPGRADE_TIMEOUT = 300.0
# Options of the running daemon's command line that the successor gets its own values for.
_REPLACED = {"--fuse-dir": True, "--socket": True, "--ready-fd": True, "--startup": True, "--take-over": False}


class UpgradeError(Exception):
    """The upgrade did not happen; the running daemon serves on, unchanged."""


@dataclass
class Upgraded:
    old_pid: int
    new_pid: int
    fuse_dir: Path
    layers: int


def successor_fuse_dir(current: Path) -> Path:
    if current.name.endswith(SUCCESSOR_SUFFIX):
        return current.with_name(current.name[:-len(SUCCESSOR_SUFFIX)])
    return current.with_name(current.name + SUCCESSOR_SUFFIX)


def running_command(pid: int) -> list[str]:
    """The command line of process ``pid``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as e:
        raise UpgradeError(f"cannot read the command line of the daemon (pid {pid}): {e.strerror}") from e
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def successor_command(command: Sequence[str], fuse_dir: Path, socket: Path, ready_fd: int) -> list[str]:
    """``command`` (a daemon's command line) for a successor taking over the daemon at ``socket``."""
    kept: list[str] = []
    args = iter(command)
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _REPLACED:
            if _REPLACED[flag] and "=" not in arg:
                next(args, None)
            continue
        kept.append(arg)
    return [*kept, "--fuse-dir", str(fuse_dir), "--socket", str(socket), "--take-over", "--ready-fd", str(ready_fd)]


def running_daemon(socket: Path) -> dict:
    """The ``ping`` answer of the daemon at ``socket``; UpgradeError when none answers."""
    try:
        ping = request(str(socket), "ping", timeout=10.0)
    except ControlError as e:
        raise UpgradeError(f"no daemon answers at {socket}: {e}") from e
    if not ping.get("ready"):
        raise UpgradeError(f"the daemon at {socket} is not ready yet")
    return ping


def upgrade(socket: Path, command: Sequence[str], log_file: Path | None = None,
            on_started: Callable[[int], None] = lambda pid: None,
            on_failed: Callable[[], None] = lambda: None, timeout: float = UPGRADE_TIMEOUT) -> Upgraded:
    """Replace the daemon at ``socket`` by a new one running ``command`` (a daemon command
    line; its FUSE directory, socket and startup options are replaced). ``on_started(pid)``
    runs as soon as the successor exists (a supervisor records its pid there, before the old
    daemon exits); ``on_failed()`` when it did not take over."""
    ping = running_daemon(socket)
    old_pid, fuse_dir = int(ping["pid"]), successor_fuse_dir(Path(ping["fuse"]))
    if is_mounted(fuse_dir) and not is_stale(fuse_dir):
        raise UpgradeError(f"{fuse_dir}, where the new daemon's FUSE mount would go, is in use")
    ready_read, ready_write = os.pipe()
    try:
        with open(log_file if log_file is not None else os.devnull, "ab") as out:
            # Its own session: it outlives whoever asked for the upgrade.
            process = subprocess.Popen(successor_command(command, fuse_dir, socket, ready_write),
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                       close_fds=True, pass_fds=(ready_write,))
    except OSError as e:
        os.close(ready_read)
        raise UpgradeError(f"cannot start the new daemon: {e}") from e
    finally:
        os.close(ready_write)
    on_started(process.pid)
    with os.fdopen(ready_read, "rb") as ready:
        outcome = _startup_report(ready, timeout)
    if not outcome.get("ready"):
        if outcome.get("timeout"):
            process.kill()  # mid-takeover: the old daemon takes its loops back as the connection closes
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
        on_failed()
        raise UpgradeError(outcome.get("error") or f"the new daemon exited with status {status}")
    if not wait_for_exit(old_pid, timeout):
        raise UpgradeError(f"the new daemon (pid {process.pid}) serves, but the old one (pid {old_pid}) "
                           f"has not exited")
    try:
        layers = int(request(str(socket), "stats", timeout=10.0)["layers"])
    except (ControlError, KeyError, ValueError):
        layers = -1
    return Upgraded(old_pid, process.pid, fuse_dir, layers)


def _startup_report(ready, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([ready], [], [], left)[0]:
            return {"error": f"the new daemon did not take over within {timeout:g}s", "timeout": True}
        block = os.read(ready.fileno(), 4096)
        if not block:
            break
        line += block
    try:
        return json.loads(line) if line.strip() else {}
    except ValueError:
        return {"error": f"the new daemon sent an invalid startup report: {line[:200]!r}"}
