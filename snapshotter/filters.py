"""The subset of containerd's filter syntax that snapshot List requests use.

A filter is a comma-separated conjunction of selectors ``field``, ``field==value``,
``field!=value`` or ``field~=regexp``; a list of filters matches when any of them does.
Field paths are dot-separated and a component may be double-quoted
(``labels."containerd.io/snapshot.ref"``); values may be bare or double-quoted.
Fields: ``name``, ``parent``, ``kind`` (active/view/committed) and ``labels.KEY``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidArgument
from .store import Kind, Snapshot

_KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str | None  # None: the field must be present
    value: str = ""

    def matches(self, snap: Snapshot) -> bool:
        actual = _field(snap, self.fieldpath)
        if self.operator is None:
            return actual is not None
        if actual is None:
            return self.operator == "!="
        if self.operator == "==":
            return actual == self.value
        if self.operator == "!=":
            return actual != self.value
        return re.search(self.value, actual) is not None


def _field(snap: Snapshot, path: tuple[str, ...]) -> str | None:
    head, rest = path[0], path[1:]
    if head == "name":
        return snap.name
    if head == "parent":
        return snap.parent
    if head == "kind":
        return _KIND_NAMES[snap.kind]
    if head == "labels" and rest:
        return snap.labels.get(".".join(rest))
    return None


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def quoted(self) -> str:
        # Called with the opening quote at pos; supports backslash escapes.
        self.pos += 1
        out = []
        while not self.at_end():
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "\\" and not self.at_end():
                out.append(self.text[self.pos])
                self.pos += 1
            elif ch == '"':
                return "".join(out)
            else:
                out.append(ch)
        raise InvalidArgument(f"unterminated quote in filter {self.text!r}")

    def bare(self, stops: str) -> str:
        start = self.pos
        while not self.at_end() and self.text[self.pos] not in stops:
            self.pos += 1
        return self.text[start:self.pos]


def parse(text: str) -> list[Selector]:
    scan = _Scanner(text.strip())
    selectors = []
    while True:
        path = []
        while True:
            part = scan.quoted() if scan.peek() == '"' else scan.bare('.,=!~"')
            if not part:
                raise InvalidArgument(f"empty field name in filter {text!r}")
            path.append(part)
            if scan.peek() != ".":
                break
            scan.pos += 1
        operator = None
        value = ""
        if scan.peek(2) in ("==", "!=", "~="):
            operator = scan.peek(2)
            scan.pos += 2
            value = scan.quoted() if scan.peek() == '"' else scan.bare(",")
            if operator == "~=":
                try:
                    re.compile(value)
                except re.error as e:
                    raise InvalidArgument(f"bad regular expression in filter {text!r}: {e}")
        selectors.append(Selector(tuple(p.strip() for p in path), operator, value.strip()))
        if scan.at_end():
            return selectors
        if scan.peek() != ",":
            raise InvalidArgument(f"unexpected {scan.peek()!r} at {scan.pos} in filter {text!r}")
        scan.pos += 1


def matcher(filters: list[str]):
    """A predicate on snapshots: true if any filter matches (all when there are none)."""
    parsed = [parse(f) for f in filters if f.strip()]
    if not parsed:
        return lambda snap: True
    return lambda snap: any(all(s.matches(snap) for s in conj) for conj in parsed)
