"""`lazyfs convert SRC DST`: rewrite every layer of an image as a lazyfs layer and push it."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import trio
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from lazyfs.cliopts import add_registry_arguments, load_with_registry
from lazyfs.config import ConfigError
from lazyfs.image.convert import ConvertError, ConvertOptions, convert_image
from lazyfs.layer.errors import LayerFormatError
from lazyfs.layer.format import DEFAULT_CHUNK_SIZE, DEFAULT_INLINE_THRESHOLD, check_chunk_size
from lazyfs.registry import InvalidReference, Platform, RegistryError, open_store, parse_any_reference
from lazyfs.trace.format import Trace, TraceError

NAME = "convert"
HELP = "convert an image (registry reference or oci:DIR[:TAG]) to lazyfs layers and push it to DST"


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1048576, 512K, 1M)") from None


def _chunk_size(text: str) -> int:
    value = _size(text)
    try:
        return check_chunk_size(value)
    except LayerFormatError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _platform(text: str) -> Platform:
    try:
        return Platform.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source image: registry reference or oci:DIR[:TAG]")
    parser.add_argument("dst", help="destination: registry reference or oci:DIR[:TAG]")
    parser.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE,
                        help="chunk size, a power of two from 4K to 64M (default 1M)")
    parser.add_argument("--inline-threshold", type=_size, default=DEFAULT_INLINE_THRESHOLD,
                        help="files up to this size live in the metadata (0..4096, default 4096)")
    parser.add_argument("--platform", type=_platform, default=None,
                        help="convert only this os/arch[/variant] of an index (default: every platform)")
    parser.add_argument("--threads", type=int, default=None, help="compression threads (default: CPU count)")
    parser.add_argument("--trace", type=Path, default=None,
                        help="embed this access trace (`lazyfs trace` output) in every converted layer "
                             "and write the traced files first (trace-ordered layout)")
    parser.add_argument("--keep-order", action="store_true",
                        help="with --trace: embed the trace only, keeping each layer's tar order (and diff_id)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_registry_arguments(parser)


class RichProgress:
    """Progress bars per layer (compressed input bytes read); safe to call from worker threads."""

    def __init__(self, progress: Progress):
        self._progress = progress
        self._tasks: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        self._lock = threading.Lock()

    def layer_started(self, digest: str, size: int) -> None:
        with self._lock:
            self._tasks[digest] = self._progress.add_task(f"layer {digest[7:19]}", total=size)
            self._totals[digest] = size

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._progress.advance(task, nbytes)

    def layer_finished(self, digest: str) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._progress.update(task, completed=self._totals[digest])


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if not 0 <= args.inline_threshold <= 4096:
        console.print("lazyfs convert: --inline-threshold must be in [0, 4096]")
        return 2
    try:
        _, registry = load_with_registry(args)
        dst_ref = parse_any_reference(args.dst)
        parse_any_reference(args.src)
    except (InvalidReference, ConfigError) as e:
        console.print(f"lazyfs convert: {e}")
        return 2
    if getattr(dst_ref, "digest", None) is not None:
        console.print("lazyfs convert: DST cannot be a digest (the converted image has a new one)")
        return 2
    if args.keep_order and args.trace is None:
        console.print("lazyfs convert: --keep-order needs --trace")
        return 2
    trace = None
    if args.trace is not None:
        try:
            trace = args.trace.read_bytes()
            Trace.decode(trace)
        except (OSError, TraceError) as e:
            console.print(f"lazyfs convert: --trace {args.trace}: {e}")
            return 2
    options = ConvertOptions(chunk_size=args.chunk_size, inline_threshold=args.inline_threshold,
                             platform=args.platform, threads=args.threads, trace=trace,
                             trace_order=not args.keep_order)

    async def main() -> str:
        src = open_store(args.src, **registry.store_options())
        dst = open_store(args.dst, **registry.store_options())
        try:
            if args.quiet:
                result = await convert_image(src, dst, tag=dst_ref.tag, options=options)
            else:
                columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn())
                with Progress(*columns, console=console, transient=False) as bars:
                    result = await convert_image(src, dst, tag=dst_ref.tag, options=options,
                                                 progress=RichProgress(bars))
            return result.digest
        finally:
            await src.aclose()
            await dst.aclose()

    try:
        digest = trio.run(main)
    except (ConvertError, RegistryError, LayerFormatError, OSError) as e:
        console.print(f"lazyfs convert: {e}")
        return 1
    print(digest, file=sys.stdout)
    return 0
