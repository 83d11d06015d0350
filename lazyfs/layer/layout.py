"""The trace-ordered layout: which tar members to write first so that a start's files are
contiguous in the blob, and proof obligations that keep the reordered tar's extraction equal
to the original's (docs/parts/layer-format.md, "Trace-ordered layout").

The reordered tar is

1. a *copy* of the header of every directory that is an ancestor of a moved file and has an
   entry in the layer (its last entry), in path order, parents first;
2. the moved regular files in first-access order, each with its full original header blocks;
3. every member in its original order, except the moved files. The directory entries copied
   in (1) stay here too: GNU tar sets a directory's times when extraction leaves it, so
   without the second copy later files of that directory would leave it with the time of
   extraction.

A traced path is moved only when that cannot change what any extractor makes of the tar:

* it has exactly one entry in the layer, a regular file larger than the inline threshold
  (smaller ones live in the metadata and are never fetched), or a hard link whose target
  chain ends at such a file (then the target moves: links already follow their target);
* no other member lies below it, and every ancestor path has no entry (created implicitly
  either way) or only plain directory entries of size 0 (a directory over a directory merges
  in every extractor; any other kind would replace it);
* no component of its path is a whiteout name (``.wh.*``: markers never move), and
  neither it nor an ancestor is whited out (``.wh.NAME``) in this layer: containerd applies a
  whiteout when it meets it, so its position relative to the path it removes matters. Opaque
  markers (``.wh..wh..opq``) are not moved and need no rule: containerd's overlay applier sets
  the directory's ``trusted.overlay.opaque`` xattr and its naive applier removes only entries
  the layer has not unpacked yet, so either way the marker affects lower layers only.

Any global PAX header, or an unsafe name, leaves the order unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from lazyfs.layer import tarparse
from lazyfs.layer.errors import UnsafeTarEntry
from lazyfs.layer.tree import WHITEOUT_META_PREFIX, WHITEOUT_PREFIX, split_name

Key = tuple[bytes, ...]


@dataclasses.dataclass(frozen=True)
class Member:
    """Where one tar member's bytes are in the (spooled) input, and what the plan needs of it."""

    info: tarparse.Member
    start: int  # first header block (extended headers included)
    end: int  # where the next member's header blocks begin (after data and padding)


@dataclasses.dataclass(frozen=True)
class Step:
    member: int  # index into the member list
    copy: bool = False  # a copy of a directory header written ahead of its original


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: list[Step]
    moved: list[int]  # members written ahead, in first-access order

    @property
    def reordered(self) -> bool:
        return bool(self.moved)


class _PathNumbers:
    """A number for every path seen (0 is the root), each prefix numbered once."""

    def __init__(self) -> None:
        self._numbers: dict[tuple[int, bytes], int] = {}

    def of(self, key: Key) -> list[int]:
        """The numbers of key's prefixes, root first (numbering new ones)."""
        out = [0]
        for part in key:
            out.append(self._numbers.setdefault((out[-1], part), len(self._numbers) + 1))
        return out

    def find(self, key: Key) -> int | None:
        number = 0
        for part in key:
            number = self._numbers.get((number, part))
            if number is None:
                return None
        return number


def identity(count: int) -> Plan:
    return Plan([Step(i) for i in range(count)], [])


def traced_paths(paths: Iterable[str]) -> list[Key]:
    """Trace paths (``/a/b``, relative to the layer root) as keys, each once, in order."""
    keys: list[Key] = []
    seen: set[Key] = set()
    for path in paths:
        if path == "?":
            continue
        try:
            key = tuple(split_name(path.lstrip("/").encode("utf-8", "surrogateescape"), path))
        except UnsafeTarEntry:
            continue
        if key and key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def _key(m: tarparse.Member) -> Key:
    return tuple(split_name(m.name, m.where))


def _link_key(m: tarparse.Member) -> Key:
    return tuple(split_name(m.linkname, m.where))


def _whited_out(key: Key) -> Key | None:
    """The path a ``.wh.NAME`` entry removes (None for other names and ``.wh..wh.*``)."""
    base = key[-1]
    if base.startswith(WHITEOUT_PREFIX) and not base.startswith(WHITEOUT_META_PREFIX):
        return key[:-1] + (base[len(WHITEOUT_PREFIX):],)
    return None


def _whiteout_name(key: Key) -> bool:
    """A whiteout marker, or anything below a name an applier would take for one."""
    return any(part.startswith(WHITEOUT_PREFIX) for part in key)


def _plain_dir(m: tarparse.Member) -> bool:
    return m.isdir()


def plan(members: Sequence[Member], traced: Sequence[Key], min_size: int) -> Plan:
    """The emission order for members (in input order) given the traced paths in first-access
    order; files of at most min_size bytes are never moved."""
    count = len(members)
    if not traced:
        return identity(count)
    if any(m.info.type == tarparse.XGLTYPE for m in members):
        return identity(count)  # a global header removes its path where it stands
    try:
        keys = [_key(m.info) for m in members]
    except UnsafeTarEntry:
        return identity(count)  # the builder refuses the layer anyway, naming the entry
    # Paths are numbered through a trie (a number per distinct prefix), so that recording every
    # prefix of every member costs its depth, not its depth squared.
    paths = _PathNumbers()
    entries: dict[int, list[int]] = {}
    below: set[int] = set()  # proper prefixes of member paths
    removed: set[int] = set()
    for i, key in enumerate(keys):
        numbers = paths.of(key)
        entries.setdefault(numbers[-1], []).append(i)
        below.update(numbers[:-1])
        target = _whited_out(key) if key else None
        if target is not None:
            removed.add(paths.of(target)[-1])

    def movable_file(key: Key) -> int | None:
        """The member to move for a traced path, or None."""
        for _ in range(count + 1):  # bounded walk along a hard-link chain
            found = entries.get(paths.find(key))
            if found is None or len(found) != 1:
                return None
            m = members[found[0]].info
            if m.islnk():
                try:
                    key = _link_key(m)
                except UnsafeTarEntry:
                    return None
                continue
            if not m.isreg() or m.size <= min_size or paths.find(key) in below or _whiteout_name(key):
                return None
            return found[0]
        return None

    def ancestors_ok(key: Key) -> bool:
        numbers = paths.of(key)
        if any(n in removed for n in numbers):
            return False
        for n in numbers[1:-1]:
            if not all(_plain_dir(members[i].info) for i in entries.get(n, ())):
                return False
        return True

    moved: list[int] = []
    chosen: set[int] = set()
    dirs: dict[Key, int] = {}
    for path in traced:
        index = movable_file(path)
        if index is None or index in chosen or not ancestors_ok(keys[index]):
            continue
        chosen.add(index)
        moved.append(index)
        key = keys[index]
        numbers = paths.of(key)
        for n in range(1, len(key)):
            found = entries.get(numbers[n])
            if found:
                dirs[key[:n]] = found[-1]
    if not moved:
        return identity(count)
    steps = [Step(dirs[k], copy=True) for k in sorted(dirs)]
    steps += [Step(i) for i in moved]
    steps += [Step(i) for i in range(count) if i not in chosen]
    return Plan(steps, moved)
