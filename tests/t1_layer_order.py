"""The trace-ordered layout: the reordered tar extracts to the same tree as the original (Python's
tarfile and GNU tar), the traced files' chunks come first and in trace order, and the layout
is recorded in the footer and the annotations."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lazyfs.layer import format as fmt
from lazyfs.layer.annotations import from_annotations
from lazyfs.layer.builder import build_layer
from lazyfs.layer.errors import LayerFormatError
from lazyfs.layer.reader import Layer, locate, open_blob_file, read_chunk
from lazyfs.trace.format import Access, Trace
from tests.fixtures.common import require_root, require_tool

CHUNK = 16 << 10
LAYER = "sha256:" + "1" * 64
LONG = "d" * 120 + "/" + "n" * 140


def _data(seed: int, size: int) -> bytes:
    """Bytes no other chunk shares, with no all-zero chunk."""
    return b"".join(seed.to_bytes(4, "big") + i.to_bytes(4, "big") + os.urandom(56) for i in range(size // 64 + 1))[:size]


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data, extra in members:
            info = tarfile.TarInfo(name)
            info.mtime = extra.pop("mtime", 1_600_000_000 + len(name))
            info.mode = extra.pop("mode", 0o755 if kind in (tarfile.DIRTYPE, tarfile.SYMTYPE) else 0o644)
            info.type = kind
            for key, value in extra.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return buf.getvalue()


def reg(name, data, **extra):
    return (name, tarfile.REGTYPE, data, extra)


def dir_(name, **extra):
    return (name, tarfile.DIRTYPE, None, extra)


def link(name, target):
    return (name, tarfile.LNKTYPE, None, {"linkname": target})


def sym(name, target):
    return (name, tarfile.SYMTYPE, None, {"linkname": target})


BIG = {name: _data(i, size) for i, (name, size) in enumerate([
    ("app/main", 3 * CHUNK + 100), ("app/lib/mod.so", 2 * CHUNK), ("data/blob", CHUNK + CHUNK // 2),
    ("data/other", 2 * CHUNK + 7), ("data/tool-real", CHUNK + 1), ("dup/file", 2 * CHUNK),
    ("gone/victim", CHUNK + 5), ("data/cache/hot", CHUNK * 2 + 9), ("implicit/deep/file", CHUNK + 3),
    (LONG, CHUNK + 11), ("app/unused", 3 * CHUNK),
])}


def layer_members():
    """Depth-first (as tar writes trees), so GNU tar restores every directory time of the original."""
    return [
        dir_("app", mode=0o750, mtime=1_500_000_000),
        dir_("app/lib"),
        reg("app/lib/mod.so", BIG["app/lib/mod.so"]),
        reg("app/unused", BIG["app/unused"]),
        reg("app/main", BIG["app/main"], mode=0o755, pax_headers={"mtime": "1600000123.456789012",
                                                                   "SCHILY.xattr.user.role": "main"}),
        link("app/main-link", "app/main"),
        sym("app/current", "main"),
        dir_("app", mode=0o755, mtime=1_500_000_001),  # a second entry: its attributes win
        dir_("data"),
        dir_("data/cache"),
        reg("data/cache/.wh..wh..opq", b""),
        reg("data/cache/hot", BIG["data/cache/hot"]),
        dir_("data/cache", mtime=1_550_000_000),
        reg("data/other", BIG["data/other"], uid=1000, gid=100),
        link("data/other-link", "data/other"),
        reg("data/tool-real", BIG["data/tool-real"], mode=0o700),
        reg("data/blob", BIG["data/blob"], pax_headers={"SCHILY.xattr.user.kind": "blob"}),
        dir_("bin"),
        link("bin/tool", "data/tool-real"),
        dir_("dup"),
        reg("dup/file", b"first version " * 3000),
        reg("dup/file", BIG["dup/file"], mode=0o600),
        dir_("etc", mtime=1_400_000_000),
        reg("etc/small", b"small config\n"),
        reg("etc/.wh.old", b""),
        reg("etc/.wh.big", _data(99, CHUNK + 1)),  # a whiteout marker, whatever its size
        dir_("gone"),
        reg("gone/.wh.victim", b""),
        reg("gone/victim", BIG["gone/victim"]),
        reg("implicit/deep/file", BIG["implicit/deep/file"]),
        reg(LONG, BIG[LONG]),
    ]


TRACED = ["/data/blob", "/app/main", "/bin/tool", "/dup/file", "/gone/victim", "/data/cache/hot",
          "/implicit/deep/file", "/" + LONG, "/app/lib/mod.so", "/etc/small", "/missing", "/app/current",
          "/etc/.wh.big"]
# bin/tool is a hard link: its target moves. dup/file has two entries and gone/victim is whited
# out in this layer: they stay. etc/small lives in the metadata; app/current is a symlink;
# etc/.wh.big is a whiteout marker.
MOVED = ["data/blob", "app/main", "data/tool-real", "data/cache/hot", "implicit/deep/file", LONG, "app/lib/mod.so"]


def trace_bytes(paths=TRACED) -> bytes:
    accesses = [Access(i * 3, LAYER, 100 + i, i, i, p) for i, p in enumerate(paths)]
    return Trace({LAYER: CHUNK}, accesses).encode()


def convert(tar: bytes, **kw):
    out = io.BytesIO()
    result = build_layer(io.BytesIO(tar), out, chunk_size=CHUNK, **kw)
    return out.getvalue(), result


def untar(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()


def names(tar: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return [m.name for m in t]


def snapshot(root: Path, explicit_dirs: set[str]) -> dict[str, tuple]:
    """Everything an extraction left: types, modes, owners, mtimes (but of symlinks and implicit dirs),
    contents, link targets, user xattrs, and which names share an inode."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            inodes.setdefault(st.st_ino, []).append(rel)
            # Implicit directories get the time of extraction; Python's tarfile leaves symlinks so.
            timeless = (stat.S_ISDIR(st.st_mode) and rel not in explicit_dirs) or stat.S_ISLNK(st.st_mode)
            mtime = None if timeless else st.st_mtime_ns
            content = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else None
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            xattrs = {x: os.getxattr(path, x, follow_symlinks=False)
                      for x in sorted(os.listxattr(path, follow_symlinks=False)) if x.startswith("user.")}
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime,
                        content, target, xattrs, st.st_ino)
    groups = {ino: tuple(sorted(paths)) for ino, paths in inodes.items()}
    return {rel: (*attrs[:-1], groups[attrs[-1]]) for rel, attrs in out.items()}


def extract_python(tar: bytes, dest: Path) -> None:
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, numeric_owner=True, filter="fully_trusted")


def extract_gnu(tar: bytes, dest: Path) -> None:
    dest.mkdir()
    subprocess.run([require_tool("tar"), "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-",
                    "-C", str(dest)], input=tar, check=True)


@pytest.fixture(scope="module")
def ordered():
    original = _tar(layer_members())
    blob, result = convert(original, trace=trace_bytes())
    return original, blob, result


def test_order_of_the_reordered_tar(ordered):
    original, blob, result = ordered
    copies = ["app", "app/lib", "data", "data/cache"]  # ancestors with entries, in path order
    rest = [n for n in names(original) if n not in MOVED]
    assert names(untar(blob)) == copies + MOVED + rest
    assert result.stats.ordered_files == len(MOVED)
    assert result.diff_id != result.source_diff_id
    assert result.index.trace_ordered and result.index.trace is not None


@pytest.mark.parametrize("extract", [extract_python, extract_gnu], ids=["python-tarfile", "gnu-tar"])
def test_reordered_tar_extracts_to_the_same_tree(ordered, tmp_path, extract):
    require_root()  # owners and xattrs
    original, blob, _ = ordered
    explicit = {m[0] for m in layer_members() if m[1] == tarfile.DIRTYPE}
    extract(original, tmp_path / "original")
    extract(untar(blob), tmp_path / "reordered")
    before = snapshot(tmp_path / "original", explicit)
    after = snapshot(tmp_path / "reordered", explicit)
    assert before.keys() == after.keys()
    for path in before:
        assert before[path] == after[path], path
    # The comparison sees directory times (the hoisted directories' included), hard links and,
    # from GNU tar (Python's tarfile does not restore them), xattrs.
    assert before["app"][4] == after["app"][4] == 1_500_000_001 * 10**9
    assert before["data/cache"][4] == 1_550_000_000 * 10**9
    if extract is extract_gnu:
        assert before["app/main"][7] == {"user.role": b"main"}
    assert before["app/main"][8] == ("app/main", "app/main-link")


def _erofs_tree(blob: bytes, tmp_path: Path, name: str) -> dict[bytes, tuple]:
    path = tmp_path / name
    path.write_bytes(blob)
    out = {}
    with open(path, "rb") as f:
        layer = open_blob_file(f)
        image = layer.image
        for p, inode in image.walk():
            data = layer.read(inode.nid, 0, inode.size, lambda n: read_chunk(f, layer, n)) if inode.is_reg else None
            out[p] = (inode.mode, inode.uid, inode.gid, inode.mtime, inode.mtime_nsec, inode.nlink, inode.size,
                      image.xattrs(inode.nid), data)
        layer.close()
    return out


def test_metadata_equals_the_unordered_build(ordered, tmp_path):
    original, blob, _ = ordered
    plain, _ = convert(original)
    assert _erofs_tree(blob, tmp_path, "ordered") == _erofs_tree(plain, tmp_path, "plain")


def _chunks_of(layer: Layer, path: str) -> list[int]:
    nid = layer.image.resolve("/" + path)
    return [p.chunk for p in layer.chunks_for(nid, 0, layer.image.inode(nid).size) if p.chunk is not None]


def test_traced_chunks_come_first_in_trace_order(ordered, tmp_path):
    _, blob, result = ordered
    path = tmp_path / "blob"
    path.write_bytes(blob)
    with open(path, "rb") as f:
        layer = open_blob_file(f)
        traced = []
        for name in MOVED:
            chunks = _chunks_of(layer, name)
            assert chunks == list(range(chunks[0], chunks[0] + len(chunks))), name
            traced += chunks
        assert traced == list(range(len(traced))) == list(range(result.index.ordered_chunks))
        offsets = [layer.table[n].offset for n in traced]
        assert offsets == sorted(offsets)
        untraced = [n for n in range(layer.chunk_count) if n not in traced]
        assert untraced and min(layer.table[n].offset for n in untraced) > offsets[-1]
        # The traced chunks lie within a few KiB of each other: one range request covers them.
        span = layer.table[traced[-1]].offset + layer.table[traced[-1]].stored_length - offsets[0]
        assert span - sum(layer.table[n].stored_length for n in traced) < 16 << 10
        layer.close()


def test_layout_in_footer_and_annotations(ordered):
    _, blob, result = ordered
    index = locate(lambda o, n: blob[o:o + n], len(blob))
    assert index == result.index
    assert index.trace_ordered and index.ordered_chunks == result.index.ordered_chunks > 0
    assert result.annotations["containerd.io/snapshot/lazyfs.layout"] == "trace-ordered"
    assert from_annotations(result.annotations, len(blob)) == index
    footer = bytearray(blob[-fmt.FOOTER_FRAME_SIZE:])
    assert int.from_bytes(footer[20:24], "little") == fmt.FOOTER_FLAG_TRACE | fmt.FOOTER_FLAG_TRACE_ORDERED
    assert int.from_bytes(footer[28:32], "little") == index.ordered_chunks


def test_footer_refuses_inconsistent_layout_fields():
    import dataclasses

    from tests.t1_layer_format import sample_index

    with pytest.raises(LayerFormatError):
        dataclasses.replace(sample_index(trace=False), trace_ordered=True).check()
    with pytest.raises(LayerFormatError):
        dataclasses.replace(sample_index(), ordered_chunks=3).check()
    frame = fmt.encode_footer(dataclasses.replace(sample_index(), trace_ordered=True, ordered_chunks=3))
    assert fmt.decode_footer(frame).ordered_chunks == 3
    with pytest.raises(LayerFormatError):
        from_annotations({**_annotations_of(sample_index()), "containerd.io/snapshot/lazyfs.layout": "random"})


def _annotations_of(index):
    from lazyfs.layer.annotations import to_annotations

    return to_annotations(index)


def test_nothing_to_move_keeps_the_tar_byte_for_byte(tmp_path):
    original = _tar(layer_members())
    blob, result = convert(original, trace=trace_bytes(["/etc/small", "/dup/file", "/missing"]), spool_dir=tmp_path)
    assert untar(blob) == original and result.diff_id == result.source_diff_id
    assert not result.index.trace_ordered and result.index.ordered_chunks == 0
    assert "containerd.io/snapshot/lazyfs.layout" not in result.annotations
    assert list(tmp_path.iterdir()) == []  # the spool is gone


def test_trace_embedded_without_reordering():
    original = _tar(layer_members())
    blob, result = convert(original, trace=trace_bytes(), order=False)
    assert untar(blob) == original and result.diff_id == result.source_diff_id
    assert result.index.trace is not None and not result.index.trace_ordered


def test_global_header_after_the_first_member_keeps_the_order():
    head = _tar([reg("a", BIG["app/unused"])])
    while head.endswith(bytes(512)):  # without its end-of-archive blocks and record padding
        head = head[:-512]
    glob = tarfile.TarInfo._create_pax_generic_header({"comment": "x"}, tarfile.XGLTYPE, "utf-8")
    tail = _tar([reg("b", BIG["data/blob"])])
    original = head + glob + tail
    blob, result = convert(original, trace=trace_bytes(["/b"]))
    assert untar(blob) == original and not result.index.trace_ordered


def test_ordered_build_refuses_bad_input():
    with pytest.raises(LayerFormatError):
        convert(b"garbage" * 200, trace=trace_bytes())
    with pytest.raises(LayerFormatError):
        convert(_tar(layer_members())[:40_000], trace=trace_bytes())
    with pytest.raises(LayerFormatError, match="embedded trace"):
        convert(_tar(layer_members()), trace=b"not a trace\n")


# -- property: for any layer and trace, the reordered tar means what the original means ---------

_SIZES = st.sampled_from([0, 100, 4097, CHUNK - 1, CHUNK + 1, 2 * CHUNK + 7, 3 * CHUNK])
_DIRS = ["a", "b", "a/c"]


@st.composite
def layers_and_traces(draw):
    """Dirs listed once or twice, anywhere; files (some twice), whiteouts and an opaque marker in
    random order; hard links after their targets; a symlink; and a trace naming any of them."""
    body: list[tuple] = []
    for d in draw(st.lists(st.sampled_from(_DIRS), max_size=5)):
        body.append(dir_(d, mode=draw(st.sampled_from([0o755, 0o700])), mtime=draw(st.integers(1, 10**9))))
    files = []
    for i in range(draw(st.integers(1, 7))):
        parent = draw(st.sampled_from([""] + _DIRS))
        name = (parent + "/" if parent else "") + f"f{i}"
        files.append(name)
        for _ in range(draw(st.sampled_from([1, 1, 1, 2]))):
            body.append(reg(name, os.urandom(draw(_SIZES)), mode=draw(st.sampled_from([0o644, 0o600])),
                            mtime=draw(st.integers(1, 10**9))))
    for name in draw(st.lists(st.sampled_from(files), max_size=2, unique=True)):
        parent, _, base = name.rpartition("/")
        body.append(reg((parent + "/" if parent else "") + ".wh." + base, b""))
    if draw(st.booleans()):
        body.append(reg(draw(st.sampled_from(_DIRS)) + "/.wh..wh..opq", b""))
    order = draw(st.permutations(range(len(body))))
    members = [body[i] for i in order]
    links = []
    for j, target in enumerate(draw(st.lists(st.sampled_from(files), max_size=3))):
        links.append(f"hl{j}")
        members.append(link(f"hl{j}", target))
    members.append(sym("sym", files[0]))
    named = draw(st.permutations(files + links + ["sym", "missing"] + _DIRS))
    traced = named[: draw(st.integers(0, len(named)))]
    return members, traced


def _try_convert(tar: bytes, **kw):
    try:
        return convert(tar, **kw)
    except LayerFormatError:
        return None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layers_and_traces())
def test_reordering_property(tmp_path_factory, case):
    members, traced = case
    original = _tar(members)
    plain = _try_convert(original)
    ordered = _try_convert(original, trace=trace_bytes(["/" + p for p in traced]))
    assert (plain is None) == (ordered is None)  # the same layers are refused
    if plain is None:
        event("refused")
        return
    blob, result = ordered
    reordered = untar(blob)
    tmp = tmp_path_factory.mktemp("prop")
    assert _erofs_tree(blob, tmp, "ordered") == _erofs_tree(plain[0], tmp, "plain")
    explicit = {m[0] for m in members if m[1] == tarfile.DIRTYPE}
    for extract, dirs_timed in ((extract_python, explicit), (extract_gnu, set())):
        # GNU tar leaves a directory with the time of extraction when the original lists files
        # of it after leaving it, which random orders do: its directory times are not compared.
        extract(original, tmp / f"{extract.__name__}-original")
        extract(reordered, tmp / f"{extract.__name__}-reordered")
        assert snapshot(tmp / f"{extract.__name__}-original", dirs_timed) == \
            snapshot(tmp / f"{extract.__name__}-reordered", dirs_timed)
    # The moved files' frames are in blob order (a chunk equal to an earlier one of the layer
    # shares that chunk's frame: dedup, not disorder).
    frames = list(dict.fromkeys(_table_offsets(blob)[:result.index.ordered_chunks]))
    assert frames == sorted(frames)
    assert result.index.trace_ordered == (result.stats.ordered_files > 0)
    event(f"files moved: {min(result.stats.ordered_files, 2)}{'+' if result.stats.ordered_files > 2 else ''}")


def _table_offsets(blob: bytes) -> list[int]:
    index = locate(lambda o, n: blob[o:o + n], len(blob))
    table = fmt.ChunkTable.decode(blob[index.table.offset:index.table.offset + index.table.stored_size])
    return [e.offset for e in table.entries]
