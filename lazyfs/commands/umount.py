"""`lazyfs umount`: unmount a `lazyfs mount` and stop its daemon; clean up after a dead one."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from lazyfs.daemon.control import ControlError, request
from lazyfs.serve.mounts import MountError, is_mounted, is_stale, unmount_fuse, unmount_path
from lazyfs.daemon.mountstate import DEFAULT_RUN_DIR, MountState, wait_for_exit

NAME = "umount"
HELP = "unmount a lazyfs mount and stop its daemon"
EXIT_TIMEOUT = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", help="the directory given to `lazyfs mount`")
    parser.add_argument("--lazy", "-l", action="store_true", help="detach even if the mount is busy")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="where per-mount state lives")


def run(args: argparse.Namespace) -> int:
    state = MountState.for_mountpoint(args.mountpoint, args.run_dir)
    if not state.exists():
        if is_mounted(state.mountpoint) and is_stale(state.mountpoint):
            unmount_path(state.mountpoint, lazy_if_busy=True)
            return 0
        print(f"lazyfs umount: {state.mountpoint} is not a lazyfs mount", file=sys.stderr)
        return 1
    shared = state.shared_socket()
    # A shared daemon is asked whether it lives: after a hot upgrade (`lazyfs daemon upgrade`)
    # another process serves its socket than the one whose pid was recorded.
    if shared is not None and _answers(shared):
        return _unmount_shared(state, shared, args.lazy)
    if not state.in_use():
        state.clean_stale()
        return 0
    if shared is not None:
        return _unmount_shared(state, shared, args.lazy)
    try:
        unmount_path(state.mountpoint, lazy_if_busy=args.lazy)
    except MountError as e:
        print(f"lazyfs umount: {e}", file=sys.stderr)
        return 1
    # Kernel mode: the supervisor goes first, or it would restart the daemon stopped below.
    _stop_supervisor(state.supervisor_pid())
    pid = state.pid()
    if not state.daemon_alive():
        state.clean_stale()
        return 0
    try:
        request(str(state.socket), "shutdown", timeout=10.0)
    except ControlError as e:
        print(f"lazyfs umount: daemon did not answer ({e}); stopping it", file=sys.stderr)
        _kill(pid)
    if pid is not None and not wait_for_exit(pid, EXIT_TIMEOUT):
        _kill(pid)
        wait_for_exit(pid, 5.0)
    if is_mounted(state.fuse_dir):
        unmount_fuse(state.fuse_dir)
    state.clean_stale()
    return 0


def _unmount_shared(state: MountState, socket: Path, lazy: bool) -> int:
    """A `lazyfs mount --daemon` mount: the shared daemon unmounts it and detaches its layers."""
    try:
        request(str(socket), "unmount-image", timeout=EXIT_TIMEOUT, mountpoint=str(state.mountpoint), lazy=lazy)
    except ControlError as e:
        if e.kind != "not-found":
            print(f"lazyfs umount: {e}", file=sys.stderr)
            return 1
        unmount_path(state.mountpoint, lazy_if_busy=True)  # the daemon no longer knows it
    state.clean_stale()
    return 0


def _stop_supervisor(pid: int | None) -> None:
    """SIGTERM the mount's supervisor (it leaves the daemon running) and wait for it to go."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + EXIT_TIMEOUT
    while _process_exists(pid):
        if time.monotonic() > deadline:
            _kill(pid)
            break
        time.sleep(0.05)


def _answers(socket: Path) -> bool:
    try:
        request(str(socket), "ping", timeout=5.0)
    except ControlError:
        return False
    return True


def _process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _kill(pid: int | None) -> None:
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
