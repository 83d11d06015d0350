"""`lazyfs convert SRC DST`: rewrite every layer of an image as a lazyfs layer and push it."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import trio
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from lazyfs.cliopts import add_registry_arguments, load_with_registry
from lazyfs.config import ConfigError
from lazyfs.image.convert import ConvertError, ConvertOptions, convert_image, first_leaf
from lazyfs.layer.errors import LayerFormatError
from lazyfs.layer.format import DEFAULT_CHUNK_SIZE, DEFAULT_INLINE_THRESHOLD, check_chunk_size
from lazyfs.registry import InvalidReference, Platform, RegistryError, open_store, parse_any_reference
from lazyfs.trace.format import Trace, TraceError

log = logging.getLogger(__name__)

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


def _fail(message: str, code: int = 1) -> int:
    """One line on stderr, never wrapped or styled (rich would wrap at 80 columns off a
    terminal and read [brackets] in a file name as markup)."""
    print(f"lazyfs convert: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # before the signal handlers below are in place
        return _fail("interrupted", 128 + signal.SIGINT)


def _run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if not 0 <= args.inline_threshold <= 4096:
        return _fail("--inline-threshold must be in [0, 4096]", 2)
    try:
        _, registry = load_with_registry(args)
        dst_ref = parse_any_reference(args.dst)
        parse_any_reference(args.src)
    except (InvalidReference, ConfigError) as e:
        return _fail(str(e), 2)
    if getattr(dst_ref, "digest", None) is not None:
        return _fail("DST cannot be a digest (the converted image has a new one)", 2)
    if args.keep_order and args.trace is None:
        return _fail("--keep-order needs --trace", 2)
    trace = None
    if args.trace is not None:
        try:
            trace = args.trace.read_bytes()
            Trace.decode(trace)
        except (OSError, TraceError) as e:
            return _fail(f"--trace {args.trace}: {e}", 2)
    options = ConvertOptions(chunk_size=args.chunk_size, inline_threshold=args.inline_threshold,
                             platform=args.platform, threads=args.threads, trace=trace,
                             trace_order=not args.keep_order)
    interrupted: list[int] = []

    async def convert() -> str:
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
            with trio.move_on_after(2, shield=True):
                await src.aclose()
                await dst.aclose()

    async def watch_signals(scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # SIGINT and SIGTERM cancel the conversion: its build thread stops at the next chunk
        # and the staging directory is removed on the way out.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                interrupted.append(signum)
                scope.cancel()
                return

    async def main() -> str | None:
        digest = None
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_signals, nursery.cancel_scope)
            digest = await convert()
            nursery.cancel_scope.cancel()
        return digest

    try:
        digest = _unwrap(trio.run, main)
    except (ConvertError, RegistryError, LayerFormatError, OSError) as e:
        return _fail(str(e))
    except Exception as e:  # a bug, not bad input: still one line; -v logs the traceback
        log.debug("lazyfs convert failed", exc_info=True)
        return _fail(f"internal error: {type(e).__name__}: {e}")
    if interrupted:
        return _fail(f"interrupted by {signal.Signals(interrupted[0]).name}",
                     128 + interrupted[0])
    print(digest, file=sys.stdout)
    return 0


def _unwrap(fn, *args):
    """fn(*args), re-raising the first real error of an exception group (trio's nurseries
    wrap them) as itself."""
    try:
        return fn(*args)
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None
