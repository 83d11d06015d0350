"""Access traces: which chunks of which layers a workload read first, in order.

Format (version 1): UTF-8 text, one record per line, fields separated by a tab.

    lazyfs-trace	1                                   header: magic and format version
    layer	<layer digest>	<chunk size>                  one per layer the trace mentions
    access	<ms since start>	<layer digest>	<nid>	<first chunk>	<last chunk>	<path>

``access`` records come in order of first access: a record names chunks [first, last] of
the layer's chunk device that were read for the first time, by a read of file ``path``
(percent-encoded, relative to the layer root; ``?`` when the daemon never saw the name)
with EROFS nid ``nid``. Reading on where the previous record of the same file ended extends
that record instead of adding one. Unknown record types are skipped by readers (later
versions may add some); a different version number is refused.

The daemon records (``trace-start`` / ``trace-stop`` control requests) and prefetches
(``prefetch`` in an attach request, with the trace embedded in the layer or given at mount).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

MAGIC = "lazyfs-trace"
VERSION = 1


class TraceError(Exception):
    """A trace that cannot be parsed."""


@dataclass
class Access:
    ms: int
    layer: str
    nid: int
    first: int
    last: int
    path: str


@dataclass
class Trace:
    layers: dict[str, int] = field(default_factory=dict)  # digest -> chunk size
    accesses: list[Access] = field(default_factory=list)

    def encode(self) -> bytes:
        lines = [f"{MAGIC}\t{VERSION}"]
        lines += [f"layer\t{digest}\t{size}" for digest, size in self.layers.items()]
        lines += [f"access\t{a.ms}\t{a.layer}\t{a.nid}\t{a.first}\t{a.last}\t{urllib.parse.quote(a.path)}"
                  for a in self.accesses]
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
                    trace.layers[fields[1]] = int(fields[2])
                elif fields[0] == "access" and len(fields) == 7:
                    access = Access(int(fields[1]), fields[2], int(fields[3]), int(fields[4]), int(fields[5]),
                                    urllib.parse.unquote(fields[6]))
                    if access.first < 0 or access.last < access.first:
                        raise ValueError("bad chunk range")
                    trace.accesses.append(access)
                elif fields[0] in ("layer", "access"):
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


class TraceRecorder:
    """Turns (layer, nid, path, chunks read) events into a Trace of first accesses."""

    def __init__(self) -> None:
        self.trace = Trace()
        self.started = time.monotonic()
        self._seen: set[tuple[str, int]] = set()

    def record(self, layer: str, chunk_size: int, nid: int, path: str, chunks: Iterable[int]) -> None:
        new = [n for n in chunks if (layer, n) not in self._seen]
        if not new:
            return
        self.trace.layers.setdefault(layer, chunk_size)
        ms = int((time.monotonic() - self.started) * 1000)
        accesses = self.trace.accesses
        for n in new:
            self._seen.add((layer, n))
            last = accesses[-1] if accesses else None
            if last is not None and last.layer == layer and last.nid == nid and last.last + 1 == n:
                last.last = n
            else:
                accesses.append(Access(ms, layer, nid, n, n, path))
