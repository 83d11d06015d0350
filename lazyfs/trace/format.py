"""Access traces: which files and chunks of which layers a workload used first, in order.

Format (version 1): UTF-8 text, one record per line, fields separated by a tab.

    lazyfs-trace	1                                   header: magic and format version
    layer	<layer digest>	<chunk size>                  one per layer the trace mentions
    access	<ms>	<layer digest>	<nid>	<first chunk>	<last chunk>	<path>
    lookup	<ms>	<layer digest>	<nid>	<path>              first successful lookup of an inode
    open	<ms>	<layer digest>	<nid>	<path>              first open of a regular file

``<ms>`` is milliseconds since recording started (the mount, or ``trace-start``). Records
come in order of time. An ``access`` record names chunks [first, last] of the layer's chunk
device that were read for the first time, by a read of file ``path`` (percent-encoded,
relative to the layer root; ``?`` when the daemon never saw the name) with EROFS nid
``nid``. Reading on where the previous record of the same file ended extends that record
instead of adding one. ``lookup`` and ``open`` name the files a workload touched, including
files whose data is inline in the metadata (they have no chunks). Unknown record types are
skipped by readers (later versions may add some); a different version number is refused.

The daemon records (``lazyfs mount --record-trace``, or ``trace-start`` / ``trace-stop``
control requests) and prefetches (``prefetch`` in an attach request, with the trace
embedded in the layer or given at mount). ``merge`` combines the traces of several runs.
"""

from __future__ import annotations

import heapq
import re
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAGIC = "lazyfs-trace"
VERSION = 1
FILE_EVENTS = ("lookup", "open")


class TraceError(Exception):
    """A trace that cannot be parsed or combined."""


@dataclass
class Access:
    ms: int
    layer: str
    nid: int
    first: int
    last: int
    path: str


@dataclass
class FileEvent:
    """The first ``kind`` ("lookup" or "open") of inode ``nid`` of ``layer``."""

    ms: int
    kind: str
    layer: str
    nid: int
    path: str


@dataclass
class TraceStats:
    layers: int
    files: int  # distinct (layer, path) opened, looked up or read
    files_read: int  # of those, files with chunk reads
    chunks: int
    bytes: int  # chunks times their layer's chunk size: what a prefetch fetches (uncompressed)
    span_ms: int  # first to last record


@dataclass
class Trace:
    layers: dict[str, int] = field(default_factory=dict)  # digest -> chunk size
    accesses: list[Access] = field(default_factory=list)
    files: list[FileEvent] = field(default_factory=list)

    def encode(self) -> bytes:
        lines = [f"{MAGIC}\t{VERSION}"]
        lines += [f"layer\t{digest}\t{size}" for digest, size in self.layers.items()]
        access_lines = ((a.ms, f"access\t{a.ms}\t{a.layer}\t{a.nid}\t{a.first}\t{a.last}\t{_quote(a.path)}")
                        for a in self.accesses)
        file_lines = ((f.ms, f"{f.kind}\t{f.ms}\t{f.layer}\t{f.nid}\t{_quote(f.path)}") for f in self.files)
        # Both lists are in time order; a stable merge keeps each list's own order on ties.
        lines += [line for _, line in heapq.merge(file_lines, access_lines, key=lambda item: item[0])]
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Trace:
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise TraceError(f"trace is not UTF-8: {e}") from None
        lines = text.splitlines()
        if not lines or lines[0].split("\t") != [MAGIC, str(VERSION)]:
            raise TraceError(f"not a version {VERSION} lazyfs trace (header {lines[0][:40] if lines else ''!r})")
        trace = cls()
        for number, line in enumerate(lines[1:], start=2):
            fields = line.split("\t")
            try:
                if fields[0] == "layer" and len(fields) == 3:
                    size = int(fields[2])
                    if size <= 0:
                        raise ValueError("chunk size must be positive")
                    trace.layers[fields[1]] = size
                elif fields[0] == "access" and len(fields) == 7:
                    access = Access(int(fields[1]), fields[2], int(fields[3]), int(fields[4]), int(fields[5]),
                                    urllib.parse.unquote(fields[6]))
                    if access.first < 0 or access.last < access.first:
                        raise ValueError("bad chunk range")
                    trace.accesses.append(access)
                elif fields[0] in FILE_EVENTS and len(fields) == 5:
                    trace.files.append(FileEvent(int(fields[1]), fields[0], fields[2], int(fields[3]),
                                                 urllib.parse.unquote(fields[4])))
                elif fields[0] in ("layer", "access", *FILE_EVENTS):
                    raise ValueError(f"{len(fields)} fields")
            except ValueError as e:
                raise TraceError(f"trace line {number}: {e}") from None
        return trace

    def chunks_of(self, layer: str) -> list[int]:
        """The layer's chunks in first-access order, each once."""
        seen: set[int] = set()
        order: list[int] = []
        for access in self.accesses:
            if access.layer != layer:
                continue
            for n in range(access.first, access.last + 1):
                if n not in seen:
                    seen.add(n)
                    order.append(n)
        return order

    def paths(self) -> set[str]:
        """Every path the trace names (read, opened or looked up), without ``?``."""
        return {r.path for r in [*self.accesses, *self.files] if r.path != "?"}

    def stats(self) -> TraceStats:
        chunks: set[tuple[str, int]] = set()
        for a in self.accesses:
            chunks.update((a.layer, n) for n in range(a.first, a.last + 1))
        read = {(a.layer, a.path) for a in self.accesses}
        touched = read | {(f.layer, f.path) for f in self.files}
        times = [r.ms for r in [*self.accesses, *self.files]]
        return TraceStats(
            layers=len(self.layers), files=len(touched), files_read=len(read), chunks=len(chunks),
            bytes=sum(self.layers.get(layer, 0) for layer, _ in chunks),
            span_ms=(max(times) - min(times)) if times else 0)


# Bounds for a trace that comes from elsewhere (a registry): a start reads some thousands of
# chunks (debian-scipy: 802 chunks, 758 files, about 100 KB of trace), so these leave room
# for images a hundred times larger and still bound what a hostile trace can cost.
MAX_UNTRUSTED_SIZE = 8 * 1024 * 1024
MAX_UNTRUSTED_RECORDS = 200_000
MAX_UNTRUSTED_CHUNKS = 1_000_000  # chunk numbers named, counting every range in full
MAX_PATH = 4096
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def decode_untrusted(data: bytes, layers: Iterable[str], *, max_size: int = MAX_UNTRUSTED_SIZE) -> Trace:
    """Parse a trace nobody here recorded (fetched from a registry) for an image whose layers
    are ``layers`` (blob digests): TraceError unless it is small, well formed, and names only
    those layers, with sane numbers. What it can then do is order the prefetch of chunks that
    the layers' own verified chunk tables describe: nothing else is taken from it."""
    if len(data) > max_size:
        raise TraceError(f"trace of {len(data)} bytes is over the {max_size}-byte limit")
    if data.count(b"\n") > MAX_UNTRUSTED_RECORDS:
        raise TraceError(f"trace has more than {MAX_UNTRUSTED_RECORDS} records")
    trace = Trace.decode(data)
    allowed = set(layers)
    named = set(trace.layers) | {a.layer for a in trace.accesses} | {f.layer for f in trace.files}
    for layer in sorted(named):
        if not _DIGEST_RE.fullmatch(layer):
            raise TraceError(f"trace names {layer[:80]!r}, which is not a layer digest")
        if layer not in allowed:
            raise TraceError(f"trace names layer {layer}, which is not a layer of the image")
    for layer, size in trace.layers.items():
        if size & (size - 1) or not 4096 <= size <= 64 << 20:
            raise TraceError(f"trace gives layer {layer} the chunk size {size}")
    chunks = 0
    for record in [*trace.accesses, *trace.files]:
        if record.ms < 0 or record.nid < 0 or len(record.path) > MAX_PATH:
            raise TraceError(f"trace record of {record.layer} has a negative time or nid, or a long path")
        if isinstance(record, Access):
            if record.layer not in trace.layers:
                raise TraceError(f"trace reads layer {record.layer} without a layer line")
            chunks += record.last - record.first + 1
            if chunks > MAX_UNTRUSTED_CHUNKS:
                raise TraceError(f"trace names more than {MAX_UNTRUSTED_CHUNKS} chunks")
    return trace


def cap(trace: Trace, max_size: int) -> Trace:
    """The trace cut to its earliest records so that it encodes to at most ``max_size`` bytes
    (what is first needed is what a prefetch must fetch first)."""
    if len(trace.encode()) <= max_size:
        return trace
    kept = Trace(layers=dict(trace.layers))
    budget = max_size - len(Trace(layers=dict(trace.layers)).encode())
    records = sorted([*((a.ms, 1, a) for a in trace.accesses), *((f.ms, 0, f) for f in trace.files)],
                     key=lambda item: (item[0], item[1]))
    for _, _, record in records:
        if isinstance(record, Access):
            line = f"access\t{record.ms}\t{record.layer}\t{record.nid}\t{record.first}\t{record.last}\t{_quote(record.path)}\n"
        else:
            line = f"{record.kind}\t{record.ms}\t{record.layer}\t{record.nid}\t{_quote(record.path)}\n"
        budget -= len(line.encode())
        if budget < 0:
            break
        (kept.accesses if isinstance(record, Access) else kept.files).append(record)
    return kept


def merge(traces: Sequence[Trace]) -> Trace:
    """The union of several runs' traces, each chunk and file event once, ordered by the
    earliest time any run first used it (ties: earlier trace, then earlier record)."""
    merged = Trace()
    for trace in traces:
        for layer, size in trace.layers.items():
            if merged.layers.setdefault(layer, size) != size:
                raise TraceError(f"layer {layer} has chunk size {merged.layers[layer]} in one trace and {size} in another")
    first_chunk: dict[tuple[str, int], tuple[int, int, int, int, str]] = {}
    first_file: dict[tuple[str, str, int], tuple[int, int, int, str]] = {}
    for index, trace in enumerate(traces):
        for position, a in enumerate(trace.accesses):
            for n in range(a.first, a.last + 1):
                key = (a.layer, n)
                candidate = (a.ms, index, position, a.nid, a.path)
                if key not in first_chunk or candidate[:3] < first_chunk[key][:3]:
                    first_chunk[key] = candidate
        for position, f in enumerate(trace.files):
            fkey = (f.kind, f.layer, f.nid)
            fcandidate = (f.ms, index, position, f.path)
            if fkey not in first_file or fcandidate[:3] < first_file[fkey][:3]:
                first_file[fkey] = fcandidate
    for (layer, n), (ms, _, _, nid, path) in sorted(first_chunk.items(), key=lambda item: (item[1][:3], item[0][1])):
        last = merged.accesses[-1] if merged.accesses else None
        if last is not None and last.layer == layer and last.nid == nid and last.last + 1 == n:
            last.last = n
        else:
            merged.accesses.append(Access(ms, layer, nid, n, n, path))
    for (kind, layer, nid), (ms, _, _, path) in sorted(first_file.items(), key=lambda item: item[1][:3]):
        merged.files.append(FileEvent(ms, kind, layer, nid, path))
    return merged


def _quote(path: str) -> str:
    return urllib.parse.quote(path)


class TraceRecorder:
    """Turns read, lookup and open events into a Trace of first uses."""

    def __init__(self) -> None:
        self.trace = Trace()
        self.started = time.monotonic()
        self._seen: set[tuple[str, int]] = set()
        self._seen_files: set[tuple[str, str, int]] = set()

    def _ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    @property
    def chunk_count(self) -> int:
        """Distinct chunks recorded so far."""
        return len(self._seen)

    def record(self, layer: str, chunk_size: int, nid: int, path: str, chunks: Iterable[int]) -> int:
        """Record the chunks not seen before; how many there were."""
        new = [n for n in chunks if (layer, n) not in self._seen]
        if not new:
            return 0
        self.trace.layers.setdefault(layer, chunk_size)
        ms = self._ms()
        accesses = self.trace.accesses
        for n in new:
            self._seen.add((layer, n))
            last = accesses[-1] if accesses else None
            if last is not None and last.layer == layer and last.nid == nid and last.last + 1 == n:
                last.last = n
            else:
                accesses.append(Access(ms, layer, nid, n, n, path))
        return len(new)

    def record_file(self, kind: str, layer: str, chunk_size: int, nid: int, path: str = "?") -> None:
        key = (kind, layer, nid)
        if key in self._seen_files:
            return
        self._seen_files.add(key)
        if chunk_size > 0:  # a plain (non-chunked) layer has none: its files get no layer line
            self.trace.layers.setdefault(layer, chunk_size)
        self.trace.files.append(FileEvent(self._ms(), kind, layer, nid, path))
