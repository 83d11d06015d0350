"""`lazyfs daemon`: one long-running daemon that serves many mounts (`lazyfs mount --daemon`).

A mount through a running daemon costs no process start-up: with the page cache dropped,
starting a daemon for a single mount (Python and its imports) is most of a second, which a
daemon started once, at boot, pays only once. The process is the ordinary daemon
(`python -m lazyfs.daemon`), exec'd in place, so that it runs in the foreground under a service
manager and `lazyfs umount` recognises it.

`lazyfs daemon upgrade --socket SOCKET` replaces a running kernel-mode daemon by a new one (the
code installed now) without a failed read: see lazyfs.daemon.upgrade and lazyfs.daemon.handover.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lazyfs.cliopts import add_registry_arguments, load_with_registry
from lazyfs.config import ConfigError
from lazyfs.daemon.mountstate import add_timeout_arguments, daemon_command
from lazyfs.fetch.policy_names import PolicyError, parse_policy_names

NAME = "daemon"
HELP = ("run a daemon that serves `lazyfs mount --daemon SOCKET` mounts (in the foreground); "
        "`lazyfs daemon upgrade --socket SOCKET` replaces a running one without a failed read")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("upgrade",),
                        help="upgrade: start a new daemon (the code installed now) that takes over the layers, "
                             "mounts and control socket of the kernel-mode daemon at --socket, which then exits")
    parser.add_argument("--socket", type=Path, required=True, help="control socket to create (upgrade: of the "
                        "running daemon)")
    parser.add_argument("--fuse-dir", type=Path, default=None,
                        help="where the daemon's FUSE mount goes (one directory per attached layer); required "
                             "to run a daemon")
    parser.add_argument("--log", type=Path, default=None,
                        help="upgrade: the new daemon's log (default: the file the running daemon logs to)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="chunk cache directory (default: config)")
    parser.add_argument("--cache-size", default=None, help="cache size limit, e.g. 20G (default: config)")
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    add_registry_arguments(parser)
    parser.add_argument("--allow-suid-dev", action="store_true",
                        help="trusted images only: setuid bits and device nodes work on the FUSE mount "
                             "(default: nosuid,nodev; image mounts opt in one by one with `lazyfs mount "
                             "--allow-suid-dev`)")
    add_timeout_arguments(parser)
    parser.add_argument("--serve", choices=("fuse", "kernel"), default=None,
                        help="fuse: the daemon serves every file operation; kernel: the kernel's EROFS serves "
                             "each layer, the daemon only its chunk device (default: config, else kernel)")
    parser.add_argument("--layers-dir", type=Path, default=None,
                        help="kernel mode: where the layers' EROFS mounts go (default: FUSE-DIR.layers)")
    parser.add_argument("--policy", default=None, metavar="NAME[,NAME]",
                        help="fetch policies: none, readahead, trace, background, locality, extent, or "
                             "package.module:Class (default: readahead,trace,extent)")


def run(args: argparse.Namespace) -> int:
    if args.action == "upgrade":
        return _upgrade(args)
    if args.fuse_dir is None:
        print("lazyfs daemon: --fuse-dir is required", file=sys.stderr)
        return 2
    try:
        config, registry = load_with_registry(args)
        if args.policy is not None:
            parse_policy_names(args.policy)
    except (ConfigError, PolicyError) as e:
        print(f"lazyfs daemon: {e}", file=sys.stderr)
        return 2
    cache_dir = args.cache_dir or config.cache_dir
    cache_size = args.cache_size if args.cache_size is not None else config.cache_size
    argv = daemon_command(fuse_dir=args.fuse_dir.absolute(), socket=args.socket.absolute(), cache_dir=cache_dir,
                          cache_size=cache_size, metrics=args.metrics, registry=registry,
                          verbose=args.verbose, allow_suid_dev=args.allow_suid_dev,
                          read_timeout=args.read_timeout, request_timeout=args.request_timeout,
                          serve=args.serve or config.serve,
                          layers_dir=args.layers_dir.absolute() if args.layers_dir else None,
                          policies=args.policy.split(",") if args.policy else None)
    os.execv(sys.executable, argv)
    return 0  # not reached


def _upgrade(args: argparse.Namespace) -> int:
    from lazyfs.daemon.upgrade import UpgradeError, running_command, running_daemon, upgrade

    socket = args.socket.absolute()
    try:
        pid = int(running_daemon(socket)["pid"])
        command = running_command(pid)
        if any(arg.split("=", 1)[0] == "--startup" for arg in command):
            raise UpgradeError(f"the daemon at {socket} (pid {pid}) serves one `lazyfs mount`; only daemons "
                               f"run by `lazyfs daemon` or the snapshotter can be upgraded")
        done = upgrade(socket, command, args.log or _log_of(pid))
    except UpgradeError as e:
        print(f"lazyfs daemon upgrade: {e}", file=sys.stderr)
        return 1
    print(f"daemon {done.old_pid} replaced by daemon {done.new_pid} ({done.layers} layers, FUSE at {done.fuse_dir})")
    return 0


def _log_of(pid: int) -> Path | None:
    """Where the daemon ``pid`` logs (its stderr), if that is a file the new one can append to."""
    try:
        path = Path(os.readlink(f"/proc/{pid}/fd/2"))
    except OSError:
        return None
    return path if path.is_file() else None
