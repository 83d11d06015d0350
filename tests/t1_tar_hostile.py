"""The converter's tar reader against hand-made hostile and ambiguous tars (tests/hostile_tars.py):
each gives the tree Go's archive/tar + containerd's applier give, or a clear LayerFormatError;
random and mutated headers never give anything else."""

from __future__ import annotations

import io
import stat
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.erofs.writer import ChunkedData
from lazyfs.layer import tarparse
from lazyfs.layer.builder import MAX_ENTRIES, LayerBuilder
from lazyfs.layer.errors import LayerFormatError
from lazyfs.trace.format import Access, Trace
from tests import hostile_tars as h

CHUNK = 64 << 10
CASES = h.cases()


def trace_bytes(paths: list[str]) -> bytes:
    layer = "sha256:" + "0" * 64
    return Trace({layer: CHUNK}, [Access(i, layer, 1, i, i, p) for i, p in enumerate(paths)]).encode()


def build(tar: bytes, **kw) -> LayerBuilder:
    builder = LayerBuilder(io.BytesIO(), chunk_size=CHUNK, threads=1, **kw)
    builder.build(io.BytesIO(tar))
    return builder


def tree_of(builder: LayerBuilder) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    stack = [(b"", builder.tree.root)]
    while stack:
        path, node = stack.pop()
        for name, child in (node.children or {}).items():
            child_path = path + b"/" + name if path else name
            key = child_path.decode("utf-8", "surrogateescape")
            if child.is_dir:
                out[key] = ("dir",)
                stack.append((child_path, child))
            elif stat.S_ISLNK(child.mode):
                out[key] = ("symlink", child.link_target)
            elif stat.S_ISREG(child.mode):
                assert not isinstance(child.data, ChunkedData)
                out[key] = ("file", child.data or b"")
            else:
                out[key] = ("other", child.mode)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("ordered", [False, True], ids=["stream", "trace-ordered"])
def test_hostile_case(case: h.Case, ordered: bool):
    kw = {"trace": trace_bytes(["/a", "/good"])} if ordered else {}
    if case.tree is None:
        with pytest.raises(LayerFormatError, match=case.refusal):
            build(case.tar, **kw)
    else:
        assert tree_of(build(case.tar, **kw)) == case.tree, case.why


def test_pax_body_of_digits_is_linear():
    """The 385-byte layer that took Python's tarfile 14 s: a 1 MiB body of digits is one scan."""
    tar = h.pax(b"9" * (h.MAX_SPECIAL - 100)) + h.reg(b"a", b"x") + h.END
    with pytest.raises(LayerFormatError, match="PAX record"):
        build(tar)
    assert tarparse.parse_pax(h.pax_records([(b"k", b"v" * 85), (b"path", b"")])) == {b"k": b"v" * 85, b"path": b""}


def test_huge_pax_header_is_refused_before_it_is_read():
    """A PAX header claiming 1 GiB: refused from its header block alone (no data follows)."""
    tar = h.header(b"PaxHeader", type=b"x", size=1 << 30)
    with pytest.raises(LayerFormatError, match="header field too long"):
        build(tar)


def test_entry_count_is_bounded(monkeypatch):
    monkeypatch.setattr("lazyfs.layer.builder.MAX_ENTRIES", 3)
    tar = b"".join(h.reg(b"f%d" % i, b"x") for i in range(4)) + h.END
    with pytest.raises(LayerFormatError, match="more than 3 tar entries"):
        build(tar)
    assert MAX_ENTRIES >= 1 << 20


def test_sparse_pax_map_must_match_data():
    records = [(b"GNU.sparse.major", b"0"), (b"GNU.sparse.minor", b"1"), (b"GNU.sparse.name", b"sp"),
               (b"GNU.sparse.realsize", b"100"), (b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.map", b"10,5")]
    good = h.pax(records) + h.reg(b"GNUSparseFile/sp", b"hello") + h.END
    assert tree_of(build(good)) == {"sp": ("file", bytes(10) + b"hello" + bytes(85))}
    short = h.pax(records) + h.reg(b"GNUSparseFile/sp", b"hell") + h.END
    with pytest.raises(LayerFormatError, match="sparse data does not match"):
        build(short)
    overlapping = [*records[:-2], (b"GNU.sparse.numblocks", b"2"), (b"GNU.sparse.map", b"10,5,12,5")]
    with pytest.raises(LayerFormatError, match="bad sparse map"):
        build(h.pax(overlapping) + h.reg(b"GNUSparseFile/sp", b"x" * 10) + h.END)


# -- properties: random and mutated input never gives anything but a tree or a clear error ------

SEEDS = [c.tar for c in CASES if c.tree is not None and len(c.tar) < 64 << 10]


def _outcome(tar: bytes, **kw) -> str:
    try:
        build(tar, **kw)
    except LayerFormatError as e:
        message = str(e)
        assert message and "\n" not in message
        return "refused"
    return "tree"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                                   min_size=1, max_size=8))
def test_mutated_tars_give_a_tree_or_a_clear_error(seed: bytes, flips):
    tar = bytearray(seed)
    for position, value in flips:
        tar[position % len(tar)] = value
    _outcome(bytes(tar))


_FIELDS = st.sampled_from([(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (156, 1), (257, 8),
                           (329, 8), (337, 8), (345, 155), (483, 12)])


@st.composite
def crafted_headers(draw) -> bytes:
    """Headers with random fields (checksums mostly right, so parsing gets past them)."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        type_ = draw(st.sampled_from([b"0", b"\0", b"1", b"2", b"5", b"x", b"g", b"L", b"K", b"S", b"7", b"Z"]))
        body = draw(st.one_of(
            st.binary(max_size=700),
            st.lists(st.tuples(st.sampled_from([b"path", b"size", b"uid", b"mtime", b"linkpath",
                                                b"GNU.sparse.map", b"GNU.sparse.numblocks", b"GNU.sparse.major",
                                                b"GNU.sparse.minor", b"GNU.sparse.size", b"SCHILY.xattr.user.a"]),
                               st.binary(max_size=20)), max_size=5).map(h.pax_records),
        ))
        fields = {}
        for offset, width in draw(st.lists(_FIELDS, max_size=3)):
            fields[offset] = draw(st.binary(min_size=width, max_size=width))
        magic = draw(st.sampled_from([b"ustar\x0000", b"ustar  \0", bytes(8)]))
        block = h.header(draw(st.binary(min_size=1, max_size=100)), type=type_, size=len(body), magic=magic,
                         fields=fields, checksum_delta=draw(st.sampled_from([0, 0, 0, 1, -256])))
        out += block + h.padded(body)
    return out + draw(st.sampled_from([h.END, b"", bytes(512)]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tar=crafted_headers(), ordered=st.booleans())
def test_crafted_headers_give_a_tree_or_a_clear_error(tar: bytes, ordered: bool):
    _outcome(tar, **({"trace": trace_bytes(["/a"])} if ordered else {}))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096))
def test_pax_records_parse_or_refuse(data: bytes):
    try:
        records = tarparse.parse_pax(data)
    except tarparse.TarHeaderError:
        return
    assert all(isinstance(k, bytes) and k for k in records)


# No trailing "/": a regular file named "x/" is ambiguous (tarfile strips the slash from a PAX
# path, Go keeps it; both unpack it as "x"), so it is not an ordinary tar.
_NAMES = st.text(st.sampled_from("abcé/_-.x"), min_size=1, max_size=180).filter(
    lambda n: n.strip("/") and "//" not in n and not n.startswith("/") and not n.endswith("/"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(_NAMES, min_size=1, max_size=6, unique=True),
       tar_format=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]),
       sizes=st.lists(st.integers(0, 1500), min_size=6, max_size=6))
def test_ordinary_tars_read_as_tarfile_reads_them(names, tar_format, sizes):
    """Where the formats are unambiguous, the strict reader and Python's tarfile agree."""
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=tar_format) as t:
            for name, size in zip(names, sizes):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uid, info.mtime = size, 0o640, 1234, 1600000000
                t.addfile(info, io.BytesIO(bytes([size % 256]) * size))
    except ValueError:
        return  # a name USTAR cannot hold
    ours = []
    reader = tarparse.TarReader(io.BytesIO(buf.getvalue()))
    while (m := reader.next()) is not None:
        ours.append((m.name.decode(), m.type, m.size, m.mode, m.uid, m.mtime, reader.read(m.size)))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
        theirs = [(m.name, m.type, m.size, m.mode, m.uid, int(m.mtime), t.extractfile(m).read()) for m in t]
    assert ours == theirs
