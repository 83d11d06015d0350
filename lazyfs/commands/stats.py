"""`lazyfs stats`: what a mount's daemon has fetched, cached and served (via its control socket)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table

from rich.console import Console

from lazyfs.output import console
from lazyfs.daemon.control import ControlError, request
from lazyfs.daemon.mountstate import DEFAULT_RUN_DIR, MountState

NAME = "stats"
HELP = "show fetch, cache and read statistics of a lazyfs mount"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", help="the directory given to `lazyfs mount`")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    parser.add_argument("--socket", type=Path, default=None, help="talk to this control socket instead")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="where per-mount state lives")


def run(args: argparse.Namespace) -> int:
    socket = args.socket or MountState.for_mountpoint(args.mountpoint, args.run_dir).socket
    try:
        stats = request(str(socket), "stats", timeout=10.0)
        layers = request(str(socket), "list", timeout=10.0)["layers"]
    except ControlError as e:
        print(f"lazyfs stats: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**stats, "attached": layers}, indent=2))
        return 0
    render(stats, layers, console())
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(stats: dict, layers: list[dict], console: Console) -> None:
    fetch, cache = stats["fetch"], stats["cache"]
    table = Table(title=f"lazyfs daemon {stats['pid']} (up {stats['uptime']:.0f}s, {stats['layers']} layers)")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("kernel reads", f"{stats['reads']['requests']} ({_bytes(stats['reads']['bytes'])})"),
        ("range requests", str(fetch["requests"])),
        ("bytes fetched", _bytes(fetch["bytes_fetched"])),
        ("chunks fetched", f"{fetch['chunks_fetched']} ({fetch['coalesced_chunks']} coalesced)"),
        ("chunk hits / misses / joined", f"{fetch['hits']} / {fetch['misses']} / {fetch['joined']}"),
        ("requests in flight", str(fetch["inflight"])),
        ("retries / failed chunks", f"{fetch['retries']} / {fetch['failed_chunks']}"),
        ("prefetch done / queued", f"{stats['prefetch']['done']} / {stats['prefetch']['queued']}"),
        ("prefetch skipped (cached)", str(stats["prefetch"].get("skipped_cached", 0))),
    ]
    background = stats.get("background")
    if background and background["layers"]:
        state = "done" if background["done"] else "running"
        rows.append(("background fetch", f"{background['chunks_done']} / {background['chunks']} chunks, "
                                         f"{_bytes(background['bytes_requested'])} requested ({state})"))
    rows += [
        ("cache", f"{_bytes(cache['bytes'])} in {cache['entries']} chunks"),
    ]
    for q, seconds in fetch.get("latency", {}).items():
        rows.append((f"fetch latency {q}", f"{seconds * 1000:.1f} ms"))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    attached = Table(title="attached layers")
    attached.add_column("name")
    attached.add_column("kind")
    attached.add_column("source")
    attached.add_column("serve")
    attached.add_column("loop")
    for layer in layers:
        source = layer.get("digest") or layer.get("blob") or ""
        serve = layer.get("serve", "fuse")
        if layer.get("fallback"):
            serve += f" (fallback: {layer['fallback']})"
        attached.add_row(layer["name"], layer.get("kind", ""), source, serve, layer.get("loop", ""))
    console.print(attached)
