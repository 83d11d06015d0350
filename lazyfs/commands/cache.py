"""`lazyfs cache`: inspect and trim the local chunk cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table

from lazyfs.output import console
from lazyfs.fetch.cache import ChunkCache
from lazyfs.config import ConfigError, load_config, parse_size

NAME = "cache"
HELP = "show, trim (gc) or empty the local chunk cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("stats", "gc", "clear"),
                        help="stats: what is cached; gc: evict least recently used chunks down to the "
                             "size limit; clear: remove every chunk")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the cache (default: from the config)")
    parser.add_argument("--size", default=None, help="size limit for gc, e.g. 10G (default: from the config)")
    parser.add_argument("--config", type=Path, default=None, help="configuration file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        limit = parse_size(args.size) if args.size is not None else config.cache_size
    except ConfigError as e:
        print(f"lazyfs cache: {e}", file=sys.stderr)
        return 2
    cache_dir = args.cache_dir or config.cache_dir
    if args.action == "gc" and limit is None:
        print("lazyfs cache gc: no size limit (give --size or set [cache] size in the config)", file=sys.stderr)
        return 2
    cache = ChunkCache(cache_dir)
    result: dict = {"cache_dir": str(cache_dir)}
    if args.action == "gc":
        result["evicted"] = cache.evict_to(limit)
    elif args.action == "clear":
        result["removed"] = cache.clear()
    result.update(cache.stats())
    if limit is not None:
        result["limit_bytes"] = limit
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table(title=f"lazyfs cache {cache_dir}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("evicted", "removed", "entries", "bytes", "limit_bytes"):
        if key in result and result[key] != -1:
            table.add_row(key.replace("_", " "), f"{result[key]:,}")
    console().print(table)
    return 0
