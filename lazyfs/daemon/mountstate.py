"""Per-mount state of `lazyfs mount`: where a mount's daemon keeps its FUSE mount and socket.

Each mount point gets a private directory ``<run dir>/<16 hex of sha256(mount point)>/``:

    fuse/          the daemon's FUSE mount (one top-level directory per attached layer; in
                   kernel serving mode one chunk-device file per layer)
    layers/        kernel serving mode: one EROFS mount per layer (the overlay's lowerdirs)
    control.sock   the daemon's control socket
    daemon.pid     the daemon's process id
    supervisor.pid kernel serving mode: the process id of the daemon's supervisor
                   (lazyfs.daemon.mountsupervisor), which restarts a daemon that died
    daemon.log     the daemon's stderr
    startup.json   the startup spec handed to the daemon
    mount.json     what was mounted (mount point, image), for humans

A mount made by a *shared* daemon (`lazyfs mount --daemon SOCKET`: one long-running daemon
serving many mounts) has no fuse/ or startup.json of its own: control.sock is a symlink to
that daemon's socket, daemon.pid holds its pid, and shared.json names its socket, so that
`lazyfs umount` asks it to unmount the image instead of stopping it.

A state directory whose daemon is gone is *stale*: the next mount or umount of the same mount
point unmounts what is left (lazily, since the FUSE end is dead) and removes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyfs.config import RegistrySettings
from lazyfs.daemon.control import ControlError, request
from lazyfs.daemon.supervise import process_running
from lazyfs.serve.mounts import is_mounted, is_stale, mounted_paths, unmount_fuse, unmount_path

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/lazyfs")
DAEMON_MODULE = "lazyfs.daemon"


@dataclass(frozen=True)
class MountState:
    mountpoint: Path
    root: Path

    @classmethod
    def for_mountpoint(cls, mountpoint: str | os.PathLike, run_dir: Path = DEFAULT_RUN_DIR) -> MountState:
        target = Path(os.path.abspath(mountpoint))
        key = hashlib.sha256(str(target).encode()).hexdigest()[:16]
        return cls(target, run_dir / key)

    @property
    def fuse_dir(self) -> Path:
        return self.root / "fuse"

    @property
    def layers_dir(self) -> Path:
        return self.root / "layers"

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def pid_file(self) -> Path:
        return self.root / "daemon.pid"

    @property
    def supervisor_pid_file(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "daemon.log"

    @property
    def startup_file(self) -> Path:
        return self.root / "startup.json"

    @property
    def info_file(self) -> Path:
        return self.root / "mount.json"

    @property
    def shared_file(self) -> Path:
        return self.root / "shared.json"

    def shared_socket(self) -> Path | None:
        """The shared daemon's socket, for a mount made with `lazyfs mount --daemon`."""
        try:
            return Path(json.loads(self.shared_file.read_text())["socket"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def exists(self) -> bool:
        return self.root.exists()

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def daemon_alive(self) -> bool:
        pid = self.pid()
        return pid is not None and daemon_running(pid)

    def supervisor_pid(self) -> int | None:
        """The supervisor's pid while it runs, else None."""
        try:
            pid = int(self.supervisor_pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if process_running(pid, str(self.root)) else None

    def in_use(self) -> bool:
        """Whether a daemon, or a supervisor that may start one, is looking after this mount."""
        return self.daemon_alive() or self.supervisor_pid() is not None

    def info(self) -> dict:
        try:
            return json.loads(self.info_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def ping(self, timeout: float = 5.0) -> dict | None:
        try:
            return request(str(self.socket), "ping", timeout=timeout)
        except ControlError:
            return None

    def clean_stale(self) -> bool:
        """Unmount what a dead daemon left behind and drop the state; True if anything was stale."""
        stale = False
        if is_mounted(self.mountpoint) and (is_stale(self.mountpoint) or self.exists()):
            unmount_path(self.mountpoint, lazy_if_busy=True)
            stale = True
        if self.exists():
            # Kernel mode: EROFS mounts of the layers (their loop devices clear themselves).
            for path in sorted(mounted_paths(), reverse=True):
                if path.startswith(str(self.layers_dir) + "/"):
                    unmount_path(Path(path), lazy_if_busy=True)
            if is_mounted(self.fuse_dir):
                unmount_fuse(self.fuse_dir)
            shutil.rmtree(self.root, ignore_errors=True)
            stale = True
        if stale:
            log.info("cleaned up the stale lazyfs mount at %s", self.mountpoint)
        return stale


# A FUSE read of chunks that are not cached fails with EIO after this many seconds rather than
# hang its caller (a container start) while a registry does not answer.
DEFAULT_READ_TIMEOUT = 60.0
# Every HTTP request: the connection must be made, and the answer must not stay silent, for
# this long; one attempt must get its headers, then each MiB of its body, in this time too.
DEFAULT_REQUEST_TIMEOUT = 30.0


def positive_seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_timeout_arguments(parser: argparse.ArgumentParser, with_defaults: bool = False) -> None:
    """--read-timeout and --request-timeout: the daemon's own (with its defaults), or a
    command's that passes them on only when given."""
    parser.add_argument("--read-timeout", type=positive_seconds, metavar="SECONDS",
                        default=DEFAULT_READ_TIMEOUT if with_defaults else None,
                        help="a read of data not fetched yet fails with EIO after this long "
                             f"(default {DEFAULT_READ_TIMEOUT:g})")
    parser.add_argument("--request-timeout", type=positive_seconds, metavar="SECONDS",
                        default=DEFAULT_REQUEST_TIMEOUT if with_defaults else None,
                        help="bound on connecting, on a silent answer and on each MiB of a body; "
                             f"such a request is retried (default {DEFAULT_REQUEST_TIMEOUT:g})")


def daemon_command(*, fuse_dir: Path, socket: Path, cache_dir: Path, cache_size: int | str | None = None,
                   metrics: str | None = None, registry: RegistrySettings | None = None,
                   verbose: int = 0, allow_suid_dev: bool = False, serve: str = "fuse",
                   layers_dir: Path | None = None, policies: Sequence[str] | None = None,
                   read_timeout: float | None = None, request_timeout: float | None = None) -> list[str]:
    """The command line of a daemon (`python -m lazyfs.daemon ...`), as `lazyfs mount` and
    `lazyfs daemon` start it."""
    cmd = [sys.executable, "-m", DAEMON_MODULE, "--fuse-dir", str(fuse_dir), "--socket", str(socket),
           "--cache-dir", str(cache_dir)]
    if cache_size is not None:
        cmd += ["--cache-size", str(cache_size)]
    if metrics:
        cmd += ["--metrics", metrics]
    if registry is not None:
        cmd += registry.daemon_arguments()
    if allow_suid_dev:
        cmd.append("--allow-suid-dev")
    if serve != "fuse":
        cmd += ["--serve", serve]
    if layers_dir is not None:
        cmd += ["--layers-dir", str(layers_dir)]
    if policies:
        cmd += ["--policy", ",".join(policies)]
    if read_timeout is not None:
        cmd += ["--read-timeout", str(read_timeout)]
    if request_timeout is not None:
        cmd += ["--request-timeout", str(request_timeout)]
    # The daemon logs at INFO by default (attach, detach, errors); each -v of the command
    # beyond the first makes it more verbose.
    return cmd + ["-v"] * max(0, verbose - 1)


def daemon_running(pid: int) -> bool:
    """Whether ``pid`` is a live lazyfs daemon (not a zombie, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        if state in (b"Z", b"X"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return DAEMON_MODULE.encode() in f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemon_running(pid):
            return True
        time.sleep(0.05)
    return not daemon_running(pid)
