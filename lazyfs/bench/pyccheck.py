"""Check that an image's timestamp-based .pyc files are valid for their sources.

CPython's .pyc header (PEP 552) is 16 bytes: magic (4), flags (u32 LE), then either a
source hash (flags bit 0 set) or the source's mtime (u32 LE, whole seconds) and size
(u32 LE). At import, Python stats the source and recompiles when either differs, so a tar
writer that rounds mtimes makes every start recompile (and try to write) the .pyc files.
The check reads the layers as an unpacker would (later layers over earlier ones, with
whiteouts) and compares each header with the source's mtime and size *as the tar records
them*, because that is what the container will see.
"""

from __future__ import annotations

import posixpath
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StalePycError

PYC_HEADER = struct.Struct("<4sIII")
_HASH_BASED_FLAG = 0x1
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"
_MAX_SYMLINK_HOPS = 40


@dataclass
class _Entry:
    kind: bytes  # a tarfile type constant
    mtime: int
    size: int
    linkname: str
    pyc_header: bytes | None = None


@dataclass(frozen=True)
class PycMismatch:
    pyc: str
    source: str
    pyc_mtime: int
    pyc_size: int
    tar_mtime: int
    tar_size: int

    def __str__(self) -> str:
        return (f"{self.pyc}: header says mtime={self.pyc_mtime} size={self.pyc_size}, "
                f"{self.source} in the tar has mtime={self.tar_mtime} size={self.tar_size}")


@dataclass
class PycReport:
    checked: int = 0           # timestamp-based .pyc files compared with their source
    hash_based: int = 0        # hash-based .pyc files (valid whatever the mtime)
    sourceless: int = 0        # .pyc files without a source next to their __pycache__
    uncompiled: int = 0        # .py files with no timestamp .pyc for any interpreter
    mismatches: list[PycMismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> dict[str, int]:
        return {"checked": self.checked, "hash_based": self.hash_based,
                "sourceless": self.sourceless, "uncompiled": self.uncompiled,
                "mismatches": len(self.mismatches)}


def _norm(name: str) -> str:
    """Archive names ``./a/b``, ``a/b/`` and ``/a/b`` all mean ``a/b``; the root is ``""``."""
    return posixpath.normpath("/" + name).lstrip("/")


def merge_layers(layer_paths: list[Path]) -> dict[str, _Entry]:
    """The files an unpacker would produce from these tar layers (any compression tarfile reads).

    A layer's whiteouts apply to the layers below it only, so each layer is read whole
    before it is laid over the others.
    """
    tree: dict[str, _Entry] = {}
    for path in layer_paths:
        layer: dict[str, _Entry] = {}
        removed: list[str] = []
        opaque: list[str] = []
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = _norm(member.name)
                parent, base = posixpath.split(name)
                if base == _OPAQUE_MARKER:
                    opaque.append(parent)
                elif base.startswith(_WHITEOUT_PREFIX):
                    removed.append(posixpath.join(parent, base[len(_WHITEOUT_PREFIX):]))
                else:
                    header = None
                    if member.isreg() and name.endswith(".pyc"):
                        stream = tar.extractfile(member)
                        header = stream.read(PYC_HEADER.size) if stream is not None else b""
                    linkname = _norm(member.linkname) if member.islnk() else member.linkname
                    layer[name] = _Entry(member.type, int(member.mtime), member.size, linkname, header)
        for directory in opaque:
            _remove_subtree(tree, directory, include_root=False)
        for name in removed:
            _remove_subtree(tree, name, include_root=True)
        tree.update(layer)
    return tree


def _remove_subtree(tree: dict[str, _Entry], root: str, *, include_root: bool) -> None:
    prefix = root + "/" if root else ""
    doomed = [n for n in tree if n.startswith(prefix) or (include_root and n == root)]
    for name in doomed:
        del tree[name]


def _resolve(tree: dict[str, _Entry], name: str) -> tuple[str, _Entry] | None:
    """Follow symlinks and hard links the way stat() in the container would."""
    for _ in range(_MAX_SYMLINK_HOPS):
        entry = tree.get(name)
        if entry is None:
            return None
        if entry.kind == tarfile.SYMTYPE:
            target = entry.linkname
            base = "" if target.startswith("/") else posixpath.dirname(name)
            name = _norm(posixpath.join(base, target))
            continue
        if entry.kind == tarfile.LNKTYPE:
            name = entry.linkname
            continue
        return name, entry
    return None


def _source_of(pyc_name: str) -> str | None:
    """``a/__pycache__/m.cpython-311[.opt-1].pyc`` -> ``a/m.py``; None for legacy placement."""
    directory, base = posixpath.split(pyc_name)
    if posixpath.basename(directory) != "__pycache__":
        return None
    module = base.split(".", 1)[0]
    return posixpath.join(posixpath.dirname(directory), module + ".py")


def check_tree(tree: dict[str, _Entry]) -> PycReport:
    report = PycReport()
    compiled_sources: set[str] = set()
    for name, entry in sorted(tree.items()):
        if entry.pyc_header is None:
            continue
        source_name = _source_of(name)
        if source_name is None:
            continue
        resolved = _resolve(tree, source_name)
        if resolved is None:
            report.sourceless += 1
            continue
        if len(entry.pyc_header) < PYC_HEADER.size:
            report.mismatches.append(PycMismatch(name, source_name, -1, -1,
                                                 resolved[1].mtime, resolved[1].size))
            continue
        _magic, flags, word2, word3 = PYC_HEADER.unpack(entry.pyc_header)
        compiled_sources.update((source_name, resolved[0]))
        if flags & _HASH_BASED_FLAG:
            report.hash_based += 1
            continue
        report.checked += 1
        source = resolved[1]
        if (word2, word3) != (source.mtime & 0xFFFFFFFF, source.size & 0xFFFFFFFF):
            report.mismatches.append(PycMismatch(name, source_name, word2, word3,
                                                 source.mtime, source.size))
    report.uncompiled = sum(
        1 for name, entry in tree.items()
        if name.endswith(".py") and entry.kind in (tarfile.REGTYPE, tarfile.AREGTYPE)
        and name not in compiled_sources
    )
    return report


def check_layers(layer_paths: list[Path]) -> PycReport:
    """Check every .pyc of the image made of these layers (lowest first)."""
    return check_tree(merge_layers(layer_paths))


def verify_layers(layer_paths: list[Path]) -> PycReport:
    """Like check_layers, raising StalePycError when any header disagrees with its source."""
    report = check_layers(layer_paths)
    if not report.ok:
        shown = "\n  ".join(str(m) for m in report.mismatches[:10])
        more = len(report.mismatches) - 10
        raise StalePycError(
            f"{len(report.mismatches)} stale .pyc header(s) in the image"
            f"{f' ({more} more not shown)' if more > 0 else ''}:\n  {shown}")
    return report
