"""`lazyfs inspect REF`: the layers of an image and, for lazyfs layers, what is inside them."""

from __future__ import annotations

import argparse
import json
import sys

import trio
from rich.console import Console

from lazyfs.output import console
from rich.table import Table

from lazyfs.cliopts import add_registry_arguments, load_with_registry
from lazyfs.config import ConfigError
from lazyfs.image.info import inspect_image
from lazyfs.layer.errors import LayerFormatError
from lazyfs.registry import InvalidReference, Platform, RegistryError, open_store

NAME = "inspect"
HELP = "show the layers of an image: sizes, metadata, files, chunks, dedup, embedded trace"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", help="registry reference or oci:DIR[:TAG]")
    parser.add_argument("--platform", type=Platform.parse, default=None, help="only this os/arch of an index")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_registry_arguments(parser)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _trace_column(layer: dict) -> str:
    """no / yes (embedded) / ordered N (embedded, and the layout puts N chunks of traced files first)."""
    if not layer["trace"]:
        return "no"
    if layer.get("layout") == "trace-ordered":
        return f"ordered {layer['ordered_chunks']}"
    return "yes"


def render(report: dict, console: Console, full: bool = False) -> None:
    """One table per image. data: file bytes in chunks (uncompressed); meta: the EROFS image;
    chunks: distinct frames / table entries; dedup: bytes served by another chunk's frame;
    trace: embedded trace, and whether the tar is trace-ordered (chunks written first).
    Digests are shortened to 12 hex digits unless `full`."""
    def short(digest: str, keep: int) -> str:
        return digest if full else digest[:keep]

    for image in report["images"]:
        plat = image["platform"]
        title = f"{report['reference']} {short(image['digest'], 19)}"
        if plat:
            title += f" ({plat.get('os')}/{plat.get('architecture')})"
        table = Table(title=title)
        for col in ("layer", "type", "blob", "data", "meta", "files", "chunks", "chunk", "dedup", "trace"):
            table.add_column(col, justify="left" if col in ("layer", "type") else "right", no_wrap=full)
        for layer in image["layers"]:
            if not layer["lazyfs"]:
                table.add_row(short(layer["digest"], 19)[7:], layer["media_type"].rsplit(".", 1)[-1], _bytes(layer["size"]),
                              *["-"] * 7)
                continue
            table.add_row(
                short(layer["digest"], 19)[7:], "lazyfs v%d" % layer["format_version"], _bytes(layer["size"]),
                _bytes(layer["chunk_bytes"]), _bytes(layer["metadata_size"]),
                str(layer["files"]), f"{layer['unique_chunks']}/{layer['chunks']}",
                _bytes(layer["chunk_size"]), _bytes(layer["dedup_savings"]), _trace_column(layer),
            )
        console.print(table)


def run(args: argparse.Namespace) -> int:
    try:
        _, registry = load_with_registry(args)
    except ConfigError as e:
        print(f"lazyfs inspect: {e}", file=sys.stderr)
        return 2

    async def main() -> dict:
        store = open_store(args.ref, **registry.store_options())
        try:
            return await inspect_image(store, args.platform)
        finally:
            await store.aclose()

    try:
        report = trio.run(main)
    except (RegistryError, InvalidReference, LayerFormatError, OSError) as e:
        print(f"lazyfs inspect: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        # Piped: full digests and no column cut to a terminal's width.
        render(report, console(), full=not sys.stdout.isatty())
    return 0
