"""``lazyfs-snapshotter``: serve containerd's Snapshots API on a unix socket.

Starts (or adopts) and supervises the lazyfs daemon when lazy layers are enabled, re-attaches
the lazy layers of committed snapshots, and serves until SIGTERM/SIGINT. Stopping the
snapshotter leaves the daemon running, so running containers keep their lazy layers;
``lazyfs-snapshotter stop`` stops both (snapshotter.stop); ``lazyfs-snapshotter upgrade``
replaces the daemon by a new one under running containers (snapshotter.upgrade).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import config as config_mod
from .daemon_client import DaemonLayerFS, DaemonSupervisor
from .service import serve
from .snapshots import Snapshotter

log = logging.getLogger(__name__)


def parse_stop_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lazyfs-snapshotter stop",
        description="stop the snapshotter and its lazyfs daemon (uninstall, node drain); refuses while "
                    "mounts use lazy layers unless --force")
    p.add_argument("--config", type=Path, help="TOML configuration file (default: built-in defaults)")
    p.add_argument("--root", type=Path, help="state directory (overrides the config)")
    p.add_argument("--force", action="store_true", help="stop even while mounts use lazy layers (they lose them)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each process before SIGKILL")
    return p.parse_args(argv)


def _config_command(name: str, args: argparse.Namespace, operation) -> int:
    """Load the configuration a command names and run ``operation(cfg) -> (status, message)``:
    one line out (stderr on failure), a bad configuration exits 2."""
    try:
        cfg = config_mod.load(args.config, root=args.root)
    except config_mod.ConfigError as e:
        print(f"lazyfs-snapshotter {name}: {e}", file=sys.stderr)
        return 2
    status, message = operation(cfg)
    print(f"lazyfs-snapshotter {name}: {message}", file=sys.stderr if status else sys.stdout)
    return status


def stop_main(argv: list[str]) -> int:
    from .stop import stop

    args = parse_stop_args(argv)
    return _config_command("stop", args, lambda cfg: stop(cfg, force=args.force, timeout=args.timeout))


def parse_upgrade_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lazyfs-snapshotter upgrade",
        description="replace the running lazyfs daemon by a new one (the lazyfs installed now) without "
                    "a failed read of running containers; kernel serving mode only")
    p.add_argument("--config", type=Path, help="TOML configuration file (default: built-in defaults)")
    p.add_argument("--root", type=Path, help="state directory (overrides the config)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds the new daemon may take to take over")
    return p.parse_args(argv)


def upgrade_main(argv: list[str]) -> int:
    from .upgrade import upgrade

    args = parse_upgrade_args(argv)
    return _config_command("upgrade", args, lambda cfg: upgrade(cfg, timeout=args.timeout))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        epilog="`lazyfs-snapshotter stop [--force]` stops the snapshotter and its daemon; "
               "`lazyfs-snapshotter upgrade` replaces the daemon under running containers.",
        prog="lazyfs-snapshotter",
        description="containerd remote snapshotter serving lazyfs layers lazily "
                    "(configure containerd with proxy_plugins.lazyfs pointing at --socket)")
    p.add_argument("--config", type=Path, help="TOML configuration file (default: built-in defaults)")
    p.add_argument("--root", type=Path, help="state directory (overrides the config)")
    p.add_argument("--socket", type=Path, help="gRPC unix socket (overrides the config)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="overrides the config")
    p.add_argument("--no-daemon", action="store_true",
                   help="no lazy layers: behave as containerd's overlayfs snapshotter")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stop"]:
        return stop_main(argv[1:])
    if argv[:1] == ["upgrade"]:
        return upgrade_main(argv[1:])
    args = parse_args(argv)
    try:
        cfg = config_mod.load(args.config, root=args.root)
    except config_mod.ConfigError as e:
        print(f"lazyfs-snapshotter: {e}", file=sys.stderr)
        return 2
    if args.socket:
        cfg.socket = args.socket
    if args.log_level:
        cfg.log_level = args.log_level
    if args.no_daemon:
        cfg.daemon.enabled = False
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    supervisor = None
    layerfs = None
    if cfg.daemon.enabled:
        layerfs = DaemonLayerFS(cfg.daemon.control_socket, cfg.daemon.mountpoint,
                                mirrors=cfg.registry.mirrors, prefetch=cfg.daemon.prefetch,
                                background_fetch=cfg.daemon.background_fetch,
                                background_rate=cfg.daemon.background_rate, traces=cfg.traces)
    snapshotter = Snapshotter(cfg.root, layerfs)
    if layerfs is not None:
        supervisor = DaemonSupervisor(cfg, layerfs, on_restart=snapshotter.reattach_lazy_layers)
        supervisor.start()
        log.info("re-attached %d lazy layers", snapshotter.reattach_lazy_layers())
    server = serve(snapshotter, cfg.socket)
    pid_file = cfg.root / "snapshotter.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    log.info("serving containerd snapshots on %s (root %s)", cfg.socket, cfg.root)
    stop.wait()
    pid_file.unlink(missing_ok=True)
    log.info("stopping")
    server.stop(grace=5).wait()
    if supervisor is not None:
        supervisor.stop()
    snapshotter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
