"""The OCI descriptor annotations of a lazyfs layer (all values are strings).

containerd's unpacker forwards every layer annotation whose key starts with
``containerd.io/snapshot/`` to the snapshotter as a Prepare label, so these keys let the
snapshotter find the metadata and the chunk table without reading the footer.

    containerd.io/snapshot/lazyfs.version                 "1"
    containerd.io/snapshot/lazyfs.chunk-size              chunk size in bytes
    containerd.io/snapshot/lazyfs.meta.offset             payload offset of the metadata section
    containerd.io/snapshot/lazyfs.meta.size               its stored length (bytes in the blob)
    containerd.io/snapshot/lazyfs.meta.uncompressed-size  length of the EROFS image
    containerd.io/snapshot/lazyfs.meta.compression        "zstd" or "none"
    containerd.io/snapshot/lazyfs.meta.digest             "sha256:<hex>" of the stored bytes
    containerd.io/snapshot/lazyfs.table.offset / .size / .digest     the chunk table (uncompressed)
    containerd.io/snapshot/lazyfs.trace.offset / .size / .uncompressed-size / .compression / .digest
                                                          only when a trace is embedded
    containerd.io/snapshot/lazyfs.layout                  "trace-ordered" (absent: the input's order)
    containerd.io/snapshot/lazyfs.ordered-chunks          chunks written first (with the layout key)
"""

from __future__ import annotations

from collections.abc import Mapping

from lazyfs.layer.errors import LayerFormatError
from lazyfs.layer.format import COMPRESSION_NAMES, COMPRESSION_NONE, LayerIndex, Section

PREFIX = "containerd.io/snapshot/lazyfs."
VERSION_KEY = PREFIX + "version"
LAYOUT_KEY = PREFIX + "layout"
ORDERED_CHUNKS_KEY = PREFIX + "ordered-chunks"
TRACE_ORDERED = "trace-ordered"
_COMPRESSION_BY_NAME = {v: k for k, v in COMPRESSION_NAMES.items()}


def is_lazyfs(annotations: Mapping[str, str] | None) -> bool:
    return bool(annotations) and VERSION_KEY in annotations


def to_annotations(index: LayerIndex) -> dict[str, str]:
    out = {VERSION_KEY: str(index.version), PREFIX + "chunk-size": str(index.chunk_size)}
    for name, section in (("meta", index.meta), ("table", index.table), ("trace", index.trace)):
        if section is None:
            continue
        key = PREFIX + name + "."
        out[key + "offset"] = str(section.offset)
        out[key + "size"] = str(section.stored_size)
        out[key + "digest"] = section.digest
        if name != "table":
            out[key + "uncompressed-size"] = str(section.size)
            out[key + "compression"] = COMPRESSION_NAMES[section.compression]
    if index.trace_ordered:
        out[LAYOUT_KEY] = TRACE_ORDERED
        out[ORDERED_CHUNKS_KEY] = str(index.ordered_chunks)
    return out


def _int(annotations: Mapping[str, str], key: str) -> int:
    value = annotations.get(key)
    if value is None:
        raise LayerFormatError(f"annotation {key} is missing")
    if not value.isdigit() or len(value) > 20:
        raise LayerFormatError(f"annotation {key}={value!r} is not a non-negative integer")
    return int(value)


def _section(annotations: Mapping[str, str], name: str) -> Section:
    key = PREFIX + name + "."
    digest = annotations.get(key + "digest", "")
    hexpart = digest.removeprefix("sha256:")
    if not digest.startswith("sha256:") or len(hexpart) != 64:
        raise LayerFormatError(f"annotation {key}digest={digest!r} is not a sha256 digest")
    try:
        sha = bytes.fromhex(hexpart)
    except ValueError:
        raise LayerFormatError(f"annotation {key}digest={digest!r} is not hex") from None
    stored = _int(annotations, key + "size")
    if name == "table":
        compression, size = COMPRESSION_NONE, stored
    else:
        cname = annotations.get(key + "compression")
        if cname not in _COMPRESSION_BY_NAME:
            raise LayerFormatError(f"annotation {key}compression={cname!r} is unknown")
        compression, size = _COMPRESSION_BY_NAME[cname], _int(annotations, key + "uncompressed-size")
    return Section(_int(annotations, key + "offset"), stored, size, compression, sha)


def from_annotations(annotations: Mapping[str, str], blob_size: int | None = None) -> LayerIndex:
    """The layer index the annotations describe; LayerFormatError if any is missing or bad."""
    if VERSION_KEY not in annotations:
        raise LayerFormatError("not a lazyfs layer: no " + VERSION_KEY + " annotation")
    trace = _section(annotations, "trace") if PREFIX + "trace.digest" in annotations else None
    layout = annotations.get(LAYOUT_KEY)
    if layout not in (None, TRACE_ORDERED):
        raise LayerFormatError(f"annotation {LAYOUT_KEY}={layout!r} is unknown")
    ordered = layout == TRACE_ORDERED
    index = LayerIndex(
        version=_int(annotations, VERSION_KEY),
        chunk_size=_int(annotations, PREFIX + "chunk-size"),
        meta=_section(annotations, "meta"),
        table=_section(annotations, "table"),
        trace=trace,
        trace_ordered=ordered,
        ordered_chunks=_int(annotations, ORDERED_CHUNKS_KEY) if ordered else 0,
    )
    index.check(blob_size)
    return index
