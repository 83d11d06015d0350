"""`lazyfs trace`: record, view and combine access traces (format: lazyfs.trace.format).

    lazyfs trace start MOUNTPOINT              record on a running mount, from now on
    lazyfs trace stop -o FILE MOUNTPOINT       stop recording and write the trace
    lazyfs trace record IMAGE -o FILE [--ready-line REGEX] [--timeout S] -- CMD ...
                                               mount IMAGE, run CMD in a sandbox over it
                                               (lazyfs.trace.sandbox), write the trace of its start
    lazyfs trace show [--raw] FILE             one row per record
    lazyfs trace stats [--image IMAGE] FILE ...
                                               files, chunks and time span; with the image: the
                                               file bytes read and the stored bytes a prefetch fetches
    lazyfs trace merge -o FILE TRACE ...       union of several runs, earliest first use first
    lazyfs trace push IMAGE TRACE              attach TRACE to IMAGE in its registry (or OCI layout)
    lazyfs trace pull IMAGE [-o FILE]          the newest trace attached to IMAGE, verified
                                               (lazyfs.trace.share)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.table import Table

from lazyfs.cliopts import add_registry_arguments
from lazyfs.output import console
from lazyfs.daemon.control import ControlError, request
from lazyfs.daemon.mountstate import DEFAULT_RUN_DIR, MountState
from lazyfs.trace.format import Trace, TraceError, merge

NAME = "trace"
HELP = "record, show, merge and summarise access traces"


class _ActionParser(argparse.ArgumentParser):
    """The parser of one `lazyfs trace` action. For `record`, the arguments after the first
    ``--`` are the workload, kept verbatim.

    argparse cannot have a positional IMAGE, options, and then ``-- CMD ...``: a REMAINDER
    positional swallows the options that follow IMAGE (``IMAGE -o FILE -- CMD`` then failed
    with "-o/--output is required"). Splitting at ``--`` first lets IMAGE and the options come
    in any order before it.
    """

    workload_after_dashes = False

    def parse_known_args(self, args=None, namespace=None):
        if not self.workload_after_dashes:
            return super().parse_known_args(args, namespace)
        args = list(args if args is not None else [])
        cut = args.index("--") if "--" in args else len(args)
        namespace, extras = super().parse_known_args(args[:cut], namespace)
        namespace.workload = args[cut + 1:]
        return namespace, extras


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, parser_class=_ActionParser)
    for name, help_ in (("start", "start recording on a running mount"),
                        ("stop", "stop recording on a running mount and write the trace")):
        sub = actions.add_parser(name, help=help_)
        sub.add_argument("mountpoint", help="the directory given to `lazyfs mount`")
        sub.add_argument("-o", "--output", type=Path, help="stop: write the trace here")
        sub.add_argument("--socket", type=Path, default=None, help="talk to this control socket instead")
        sub.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="where per-mount state lives")

    record = actions.add_parser("record", help="run a workload on a fresh mount of an image and trace its start",
                                usage="%(prog)s IMAGE -o FILE [options] -- CMD [ARG ...]")
    record.workload_after_dashes = True
    record.add_argument("image", help="registry reference or oci:DIR[:TAG] of a converted image")
    record.add_argument("-o", "--output", type=Path, required=True, help="write the trace here")
    record.add_argument("--ready-line", default=None, metavar="REGEX",
                        help="stop when a line of the workload's output matches this")
    record.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop after this long (with --ready-line: a failure)")
    record.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="workload environment")
    record.add_argument("--cache-dir", type=Path, default=None, help="chunk cache directory of the mount")
    record.add_argument("--platform", default=None, help="os/arch[/variant] to pick from an index")
    record.add_argument("--quiet", "-q", action="store_true", help="do not echo the workload's output")
    add_registry_arguments(record)

    show = actions.add_parser("show", help="print a trace as a table (or its raw text)")
    show.add_argument("trace", type=Path)
    show.add_argument("--raw", action="store_true", help="print the file's records as they are")

    stats = actions.add_parser("stats", help="files, chunks and time span of traces; with --image, their bytes")
    stats.add_argument("traces", type=Path, nargs="+")
    stats.add_argument("--image", default=None, metavar="IMAGE",
                       help="the converted image the traces are for (registry reference or oci:DIR[:TAG]): "
                            "report the file bytes read and the stored bytes a prefetch fetches")
    stats.add_argument("--platform", default=None, help="os/arch[/variant] to pick from an index")
    stats.add_argument("--json", action="store_true", help="print JSON")
    add_registry_arguments(stats)

    push = actions.add_parser("push", help="attach a trace to an image in its registry or OCI layout")
    push.add_argument("image", help="registry reference or oci:DIR[:TAG] of a converted image")
    push.add_argument("trace", type=Path, help="the trace file (recorded on this image)")
    pull = actions.add_parser("pull", help="fetch and verify the newest trace attached to an image")
    pull.add_argument("image", help="registry reference or oci:DIR[:TAG] of a converted image")
    pull.add_argument("-o", "--output", type=Path, default=None, help="write it here (default: stdout)")
    for sub in (push, pull):
        sub.add_argument("--platform", default=None, help="os/arch[/variant] to pick from an index")
        add_registry_arguments(sub)

    merged = actions.add_parser("merge", help="merge the traces of several runs into one")
    merged.add_argument("traces", type=Path, nargs="+")
    merged.add_argument("-o", "--output", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    try:
        if args.action in ("start", "stop"):
            return _control(args)
        if args.action == "record":
            return _record(args)
        if args.action == "show":
            return _show(args)
        if args.action == "stats":
            return _stats(args)
        if args.action in ("push", "pull"):
            return _share(args)
        return _merge(args)
    except TraceError as e:
        print(f"lazyfs trace: {e}", file=sys.stderr)
        return 1


def _read(path: Path) -> Trace:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TraceError(f"cannot read {path}: {e.strerror}") from None
    try:
        return Trace.decode(data)
    except TraceError as e:
        raise TraceError(f"{path}: {e}") from None


def _write(path: Path, trace: Trace) -> None:
    _write_bytes(path, trace.encode())


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _control(args: argparse.Namespace) -> int:
    socket = args.socket or MountState.for_mountpoint(args.mountpoint, args.run_dir).socket
    try:
        if args.action == "start":
            request(str(socket), "trace-start")
            return 0
        if args.output is None:
            print("lazyfs trace stop: give -o FILE", file=sys.stderr)
            return 2
        reply = request(str(socket), "trace-stop", path=os.path.abspath(args.output))
    except ControlError as e:
        print(f"lazyfs trace: {e}", file=sys.stderr)
        return 1
    print(f"{reply['records']} records over {len(reply['layers'])} layer(s) written to {args.output}")
    return 0


def _record(args: argparse.Namespace) -> int:
    from lazyfs.trace.sandbox import run_workload

    command = args.workload
    if not command:
        print("lazyfs trace record: give the workload after --", file=sys.stderr)
        return 2
    try:
        ready = re.compile(args.ready_line) if args.ready_line is not None else None
    except re.error as e:
        print(f"lazyfs trace record: bad --ready-line: {e}", file=sys.stderr)
        return 2
    output = Path(os.path.abspath(args.output))
    work = Path(tempfile.mkdtemp(prefix="lazyfs-trace-record-"))
    mountpoint, run_dir = work / "root", work / "run"
    mountpoint.mkdir()
    # The FUSE tree whatever the configured serving mode: in kernel mode the daemon would see
    # only chunk-device reads, not the lookups and opens a trace also records.
    mount = [sys.executable, "-m", "lazyfs.cli", "mount", "--serve", "fuse", "--no-prefetch", "--learned-trace",
             "off", "--run-dir", str(run_dir)]
    if args.cache_dir is not None:
        mount += ["--cache-dir", str(args.cache_dir)]
    if args.platform is not None:
        mount += ["--platform", args.platform]
    for host in args.insecure_registry:
        mount += ["--insecure-registry", host]
    if args.hosts_dir is not None:
        mount += ["--hosts-dir", args.hosts_dir]
    if args.registry_auth is not None:
        mount += ["--registry-auth", str(args.registry_auth)]
    if args.config is not None:
        mount += ["--config", str(args.config)]
    mounted = False
    try:
        result = subprocess.run([*mount, args.image, str(mountpoint)], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"lazyfs trace record: mounting {args.image} failed:\n{result.stderr}", file=sys.stderr)
            return 1
        mounted = True
        socket = str(MountState.for_mountpoint(mountpoint, run_dir).socket)
        request(socket, "trace-start")
        written: dict = {}

        def stop_trace(_reason: str) -> None:
            written.update(request(socket, "trace-stop", path=str(output), timeout=120.0))

        echo = None if args.quiet else (lambda line: print(line, file=sys.stderr))
        outcome = run_workload(mountpoint, command, ready=ready, timeout=args.timeout, at_end=stop_trace,
                               echo=echo, env=args.env)
    except ControlError as e:
        print(f"lazyfs trace record: {e}", file=sys.stderr)
        return 1
    finally:
        if mounted:
            subprocess.run([sys.executable, "-m", "lazyfs.cli", "umount", "--lazy", "--run-dir", str(run_dir),
                            str(mountpoint)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    how = {"ready": "the ready line appeared", "exited": f"the workload exited with status {outcome.status}",
           "timeout": "the timeout passed"}[outcome.reason]
    print(f"{how} after {outcome.seconds:.2f}s; {written.get('records', 0)} chunk records and "
          f"{written.get('files', 0)} file records over {len(written.get('layers', []))} layer(s) "
          f"written to {args.output}")
    if outcome.reason == "timeout" and ready is not None:
        return 1
    if outcome.reason == "exited":
        return outcome.status or 0
    return 0


def _show(args: argparse.Namespace) -> int:
    trace = _read(args.trace)
    if args.raw:
        sys.stdout.write(trace.encode().decode())
        return 0
    table = Table(title=f"{args.trace}: {len(trace.accesses)} chunk records, {len(trace.files)} file records")
    for column in ("ms", "record", "layer", "nid", "chunks", "path"):
        table.add_column(column, justify="right" if column in ("ms", "nid") else "left")
    rows = [(a.ms, 1, "read", a.layer, a.nid, f"{a.first}" if a.first == a.last else f"{a.first}-{a.last}", a.path)
            for a in trace.accesses]
    rows += [(f.ms, 0, f.kind, f.layer, f.nid, "", f.path) for f in trace.files]
    for ms, _, kind, layer, nid, chunks, path in sorted(rows, key=lambda row: (row[0], row[1])):
        table.add_row(str(ms), kind, _short(layer), str(nid), chunks, path)
    console().print(table)
    return 0


def _short(digest: str) -> str:
    algorithm, _, hex_ = digest.partition(":")
    return f"{algorithm}:{hex_[:12]}" if hex_ else digest


def _stats(args: argparse.Namespace) -> int:
    """Chunks x chunk size says little about bytes (a 10 KB file's chunk counts as a whole
    chunk, compression is ignored); the bytes come from the image's chunk tables."""
    traces = [(path, _read(path)) for path in args.traces]
    costs = _trace_costs(args, [trace for _, trace in traces]) if args.image else None
    if costs is not None and not isinstance(costs, list):
        return costs
    if args.json:
        rows = []
        for index, (path, trace) in enumerate(traces):
            s = trace.stats()
            row = {"trace": str(path), "layers": s.layers, "files": s.files, "files_read": s.files_read,
                   "chunks": s.chunks, "span_ms": s.span_ms}
            if costs is not None:
                row.update(file_bytes=sum(c["file_bytes"] for c in costs[index]),
                           stored_bytes=sum(c["stored_bytes"] for c in costs[index]), image_layers=costs[index])
            rows.append(row)
        print(json.dumps(rows, indent=1))
        return 0
    columns = ["trace", "layers", "files", "files read", "chunks", "span"]
    if costs is not None:
        columns += ["file bytes read", "stored bytes (prefetch)"]
    table = Table()
    for column in columns:
        table.add_column(column, justify="left" if column == "trace" else "right", no_wrap=True)
    for index, (path, trace) in enumerate(traces):
        s = trace.stats()
        row = [str(path), str(s.layers), str(s.files), str(s.files_read), str(s.chunks), f"{s.span_ms / 1000:.3f} s"]
        if costs is not None:
            layers = costs[index]
            row += [_mb(sum(c["file_bytes"] for c in layers)), _mb(sum(c["stored_bytes"] for c in layers))]
        table.add_row(*row)
    console().print(table)
    if costs is None:
        print("(give --image IMAGE for the file bytes read and the stored bytes a prefetch fetches)",
              file=sys.stderr)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _trace_costs(args: argparse.Namespace, traces: list[Trace]) -> list[list[dict]] | int:
    """Per trace, what its prefetch costs on each lazyfs layer of --image; or an exit status."""
    import trio

    from lazyfs.config import ConfigError
    from lazyfs.cliopts import load_with_registry
    from lazyfs.image.info import trace_cost
    from lazyfs.layer.errors import LayerFormatError
    from lazyfs.registry import InvalidReference, Platform, RegistryError, open_store

    try:
        _, registry = load_with_registry(args)
        platform = Platform.parse(args.platform) if args.platform else None
    except (ConfigError, ValueError) as e:
        print(f"lazyfs trace stats: {e}", file=sys.stderr)
        return 2

    async def main() -> list[list[dict]]:
        store = open_store(args.image, **registry.store_options())
        try:
            return [await trace_cost(store, trace, platform) for trace in traces]
        finally:
            await store.aclose()

    try:
        return trio.run(main)
    except (RegistryError, InvalidReference, LayerFormatError, OSError) as e:
        print(f"lazyfs trace stats: {e}", file=sys.stderr)
        return 1


def _merge(args: argparse.Namespace) -> int:
    merged = merge([_read(path) for path in args.traces])
    _write(args.output, merged)
    s = merged.stats()
    print(f"{len(args.traces)} traces merged: {s.files} files, {s.chunks} chunks written to {args.output}")
    return 0


def _share(args: argparse.Namespace) -> int:
    import trio

    from lazyfs.cliopts import load_with_registry
    from lazyfs.config import ConfigError
    from lazyfs.registry import InvalidReference, Platform, RegistryError, open_store
    from lazyfs.trace import share
    from lazyfs.trace.format import decode_untrusted

    try:
        _, registry = load_with_registry(args)
        platform = Platform.parse(args.platform) if args.platform else None
        store = open_store(args.image, **registry.store_options())
    except (ValueError, InvalidReference, ConfigError) as e:
        print(f"lazyfs trace {args.action}: {e}", file=sys.stderr)
        return 2
    local = _read(args.trace) if args.action == "push" else None

    async def main() -> str:
        try:
            subject = await share.image_manifest(store, platform=platform)
            if local is not None:
                # What a reader will accept, checked before anything is stored.
                decode_untrusted(local.encode(), [layer.digest for layer in subject.layers])
                digest = await share.push_trace(store, subject, local)
                return f"trace pushed to {store.name} as {digest}, attached to {subject.digest}"
            pulled = await share.pull_trace(store, subject)
            if args.output is None:
                sys.stdout.write(pulled.data.decode())
            else:
                _write_bytes(args.output, pulled.data)
            return f"trace {pulled.artifact} of {subject.digest} (created {pulled.created or '?'}) verified"
        finally:
            await store.aclose()

    try:
        message = trio.run(main)
    except (RegistryError, share.ShareError) as e:
        print(f"lazyfs trace {args.action}: {e}", file=sys.stderr)
        return 1
    print(message, file=sys.stderr if args.action == "pull" and args.output is None else sys.stdout)
    return 0
