"""The lazyfs layer format: footer, chunk table, annotations, the tar->blob builder, the reader."""

from __future__ import annotations

import dataclasses
import gzip
import random
import hashlib
import io
import os
import stat
import subprocess
import tarfile

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.layer import format as fmt
from lazyfs.layer.annotations import from_annotations, to_annotations
from lazyfs.layer.builder import build_layer
from lazyfs.layer.errors import LayerFormatError, UnsafeTarEntry
from lazyfs.layer.reader import Layer, locate, materialise_chunk_device, open_blob_file, read_chunk
from lazyfs.trace.format import Access, Trace
from tests.fixtures.common import require_tool

CHUNK = 64 << 10  # small chunks keep multi-chunk files small


# -- helpers ------------------------------------------------------------------------------


def make_tar(members, fmt_=tarfile.PAX_FORMAT) -> bytes:
    """members: (TarInfo kwargs, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt_) as t:
        for kw, data in members:
            ti = tarfile.TarInfo(kw.pop("name"))
            pax = kw.pop("pax", None)
            for k, v in kw.items():
                setattr(ti, k, v)
            if pax:
                ti.pax_headers = pax
            if data is not None:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
            else:
                t.addfile(ti)
    return buf.getvalue()


def convert(tar_bytes: bytes, **kw) -> tuple[bytes, object]:
    out = io.BytesIO()
    result = build_layer(io.BytesIO(tar_bytes), out, **kw)
    return out.getvalue(), result


def open_layer(blob: bytes, tmp_path, annotations=None) -> tuple[Layer, object]:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    f = open(path, "rb")
    return open_blob_file(f, annotations), f


def members_of(tar_bytes: bytes) -> list[tuple]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as t:
        for m in t:
            data = t.extractfile(m).read() if m.isreg() else None
            xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            out.append((m.name, m.type, m.mode, m.uid, m.gid, int(m.mtime), m.pax_headers.get("mtime"),
                        m.linkname, m.devmajor, m.devminor, xattrs, data))
    return out


def sample_index(trace=True) -> fmt.LayerIndex:
    def sec(off, size, comp=fmt.COMPRESSION_ZSTD):
        return fmt.Section(off, size, size * 3 if comp else size, comp, hashlib.sha256(str(off).encode()).digest())

    return fmt.LayerIndex(
        version=1, chunk_size=1 << 20, meta=sec(1000, 500), table=sec(1508, 64, fmt.COMPRESSION_NONE),
        trace=sec(1580, 40) if trace else None,
    )


RICH_BIG = os.urandom(3 * CHUNK) + bytes(CHUNK) + b"tail" * 300


def rich_members():
    ns = {"mtime": "1700000000.123456789"}
    return [
        (dict(name="etc", type=tarfile.DIRTYPE, mode=0o755, mtime=1600000000), None),
        (dict(name="etc/passwd", mode=0o644, uid=0, gid=0, mtime=1600000001), b"root:x:0:0::/root:/bin/sh\n"),
        (dict(name="etc/empty", mode=0o600), b""),
        (dict(name="big", mode=0o755, uid=1000, gid=1000, pax=ns), RICH_BIG),
        (dict(name="big.copy", mode=0o644), RICH_BIG),
        (dict(name="exactly", mode=0o644), os.urandom(CHUNK)),
        (dict(name="etc/hard", type=tarfile.LNKTYPE, linkname="etc/passwd"), None),
        (dict(name="sym", type=tarfile.SYMTYPE, linkname="etc/passwd"), None),
        (dict(name="dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), None),
        (dict(name="dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660), None),
        (dict(name="fifo", type=tarfile.FIFOTYPE, mode=0o644), None),
        (dict(name="usr/.wh.gone"), None),
        (dict(name="var/cache/.wh..wh..opq"), None),
        (dict(name="caps", mode=0o755, pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                                            "SCHILY.xattr.user.note": "hello"}), b"#!/bin/sh\n"),
        (dict(name="d" * 120 + "/" + "n" * 200, mode=0o644), b"long name\n"),
        (dict(name="setuid", mode=0o4755), b"x" * 5000),
    ]


# -- footer, table, annotations ------------------------------------------------------------


@pytest.mark.parametrize("trace", [True, False])
def test_footer_round_trip(trace):
    index = sample_index(trace)
    frame = fmt.encode_footer(index)
    assert len(frame) == fmt.FOOTER_FRAME_SIZE == 232
    assert fmt.decode_footer(frame, blob_size=4096) == index
    # A zstd decoder skips it: it is a valid skippable frame.
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == b""


def test_footer_rejects_out_of_blob_sections():
    frame = fmt.encode_footer(sample_index())
    with pytest.raises(LayerFormatError, match="exceeds the blob"):
        fmt.decode_footer(frame, blob_size=1600)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=fmt.FOOTER_FRAME_SIZE, max_size=fmt.FOOTER_FRAME_SIZE))
def test_footer_fuzz_random(data):
    try:
        fmt.decode_footer(data)
    except LayerFormatError:
        pass


@settings(max_examples=400)
@given(st.integers(0, fmt.FOOTER_FRAME_SIZE - 1), st.integers(1, 255), st.booleans())
def test_footer_fuzz_mutations(pos, xor, fix_crc):
    frame = bytearray(fmt.encode_footer(sample_index()))
    frame[pos] ^= xor
    if fix_crc:  # get past the checksum so the field checks are exercised too
        import google_crc32c

        payload = frame[8:]
        frame[8 + fmt.FOOTER_CRC_OFFSET : 8 + fmt.FOOTER_CRC_OFFSET + 4] = google_crc32c.value(
            bytes(payload[: fmt.FOOTER_CRC_OFFSET])
        ).to_bytes(4, "little")
    try:
        index = fmt.decode_footer(bytes(frame), blob_size=1 << 20)
    except LayerFormatError:
        return
    index.check(1 << 20)  # anything accepted is self-consistent


def sample_table(n=5) -> fmt.ChunkTable:
    entries = [fmt.ChunkEntry(i * 100, 90, 1 << 20 if i < n - 1 else 17, xxhash.xxh3_128(bytes([i])).digest())
               for i in range(n)]
    return fmt.ChunkTable(1 << 20, n * 100, entries)


def test_table_round_trip():
    table = sample_table()
    raw = table.encode()
    assert len(raw) == 32 + 32 * 5
    back = fmt.ChunkTable.decode(raw, 1 << 20)
    assert back.entries == table.entries and back.data_end == table.data_end
    with pytest.raises(LayerFormatError, match="chunk size"):
        fmt.ChunkTable.decode(raw, 1 << 16)
    with pytest.raises(LayerFormatError, match="outside the chunk table"):
        back[5]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_table_fuzz_random(data):
    try:
        fmt.ChunkTable.decode(data)
    except LayerFormatError:
        pass


@settings(max_examples=400)
@given(st.integers(0, 32 + 32 * 5 - 1), st.integers(1, 255), st.integers(-40, 40))
def test_table_fuzz_mutations(pos, xor, cut):
    raw = bytearray(sample_table().encode())
    raw[pos] ^= xor
    if cut < 0:
        del raw[cut:]
    try:
        table = fmt.ChunkTable.decode(bytes(raw))
    except LayerFormatError:
        return
    for e in table.entries:
        assert 0 < e.length <= table.chunk_size and e.offset + e.stored_length <= table.data_end


def test_annotations_round_trip():
    index = sample_index()
    ann = to_annotations(index)
    assert ann["containerd.io/snapshot/lazyfs.version"] == "1"
    assert all(k.startswith("containerd.io/snapshot/lazyfs.") and isinstance(v, str) for k, v in ann.items())
    assert from_annotations(ann) == index
    assert from_annotations(to_annotations(sample_index(False))).trace is None


@pytest.mark.parametrize(
    "key,value",
    [("meta.offset", "-1"), ("meta.digest", "sha256:zz"), ("meta.compression", "lz4"),
     ("version", "2"), ("chunk-size", "1000"), ("table.size", None)],
)
def test_annotations_rejected(key, value):
    ann = to_annotations(sample_index())
    full = "containerd.io/snapshot/lazyfs." + key
    if value is None:
        del ann[full]
    else:
        ann[full] = value
    with pytest.raises(LayerFormatError):
        from_annotations(ann)


# -- builder ---------------------------------------------------------------------------------


def test_stream_decompresses_to_equal_tar(tmp_path):
    src = make_tar([(dict(m[0]), m[1]) for m in rich_members()])
    blob, result = convert(src, chunk_size=CHUNK)
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and result.size == len(blob)
    assert result.source_diff_id == "sha256:" + hashlib.sha256(src).hexdigest()
    # The tar is carried byte for byte, so the layer keeps its diff_id.
    assert tar == src and result.diff_id == result.source_diff_id
    assert members_of(tar) == members_of(src)
    # The stock tools agree.
    (tmp_path / "l.tar.zst").write_bytes(blob)
    require_tool("zstd")
    stock = subprocess.run(["zstd", "-dc", str(tmp_path / "l.tar.zst")], capture_output=True, check=True).stdout
    assert stock == tar
    listing = subprocess.run(["tar", "-tvf", "-"], input=stock, capture_output=True, check=True)
    assert b"etc/passwd" in listing.stdout and b"n" * 200 in listing.stdout


def test_metadata_tree(tmp_path):
    blob, result = convert(make_tar([(dict(m[0]), m[1]) for m in rich_members()]), chunk_size=CHUNK)
    layer, f = open_layer(blob, tmp_path)
    with f:
        assert layer.trusted_footer and layer.chunk_size == CHUNK
        img = layer.image
        tree = {p: i for p, i in img.walk()}
        big = tree[b"/big"]
        assert big.uid == 1000 and big.mtime == 1700000000 and big.mtime_nsec == 123456789
        assert stat.S_IMODE(big.mode) == 0o755 and big.size == len(RICH_BIG)
        assert layer.read(big.nid, 0, len(RICH_BIG) + 10, lambda n: read_chunk(f, layer, n)) == RICH_BIG
        # The zero chunk is a hole; the copy shares frames (dedup) but has chunks of its own.
        pieces = layer.chunks_for(big.nid, 0, len(RICH_BIG))
        assert [p.chunk is None for p in pieces] == [False, False, False, True, False]
        copy_pieces = layer.chunks_for(tree[b"/big.copy"].nid, 0, len(RICH_BIG))
        for a, b in zip(pieces, copy_pieces):
            if a.chunk is not None:
                assert a.chunk != b.chunk and layer.chunk_ref(a.chunk) == layer.chunk_ref(b.chunk)
        assert result.stats.dedup_bytes == len(RICH_BIG) - CHUNK and result.stats.hole_bytes == 2 * CHUNK
        # Small files live in the metadata.
        passwd = tree[b"/etc/passwd"]
        assert layer.chunks_for(passwd.nid, 0, 100)[0].in_meta
        assert img.read(passwd.nid, 0, 100) == b"root:x:0:0::/root:/bin/sh\n"
        assert tree[b"/etc/hard"].nid == passwd.nid and passwd.nlink == 2
        assert tree[b"/etc/empty"].size == 0
        assert img.readlink(tree[b"/sym"].nid) == b"etc/passwd"
        assert (tree[b"/dev/null"].major, tree[b"/dev/null"].minor) == (1, 3) and tree[b"/dev/null"].is_chr
        assert tree[b"/dev/sda"].is_blk and tree[b"/fifo"].is_fifo
        gone = tree[b"/usr/gone"]
        assert gone.is_chr and gone.rdev == 0 and b"/usr/.wh.gone" not in tree
        assert img.getxattr(tree[b"/var/cache"].nid, b"trusted.overlay.opaque") == b"y"
        assert b"/var/cache/.wh..wh..opq" not in tree
        caps = img.xattrs(tree[b"/caps"].nid)
        assert caps == {b"security.capability": b"\x01\x00\x00\x02", b"user.note": b"hello"}
        assert stat.S_IMODE(tree[b"/setuid"].mode) == 0o4755
        assert b"/" + b"d" * 120 + b"/" + b"n" * 200 in tree


def test_gnu_long_names_and_input_compressions(tmp_path):
    members = [(dict(name="x/" + "y" * 150, mode=0o644), b"gnu"), (dict(name="l" * 130, type=tarfile.SYMTYPE,
                                                                         linkname="t" * 140), None)]
    src = make_tar(members, tarfile.GNU_FORMAT)
    plain_blob, plain = convert(src)
    for packed, kind in ((gzip.compress(src, 6), "gzip"), (zstandard.ZstdCompressor().compress(src), "zstd")):
        blob, result = convert(packed)
        assert result.input_format == kind and blob == plain_blob
        assert result.source_diff_id == "sha256:" + hashlib.sha256(src).hexdigest()
    layer, f = open_layer(plain_blob, tmp_path)
    with f:
        nid = layer.image.resolve(b"l" * 130)
        assert layer.image.readlink(nid) == b"t" * 140
    assert plain.input_format == "tar"


def test_duplicates_later_wins(tmp_path):
    src = make_tar([
        (dict(name="a", mode=0o644), b"first"),
        (dict(name="a", mode=0o600), b"second"),
        (dict(name="d", type=tarfile.DIRTYPE, mode=0o700), None),
        (dict(name="d/f", mode=0o644), b"in d"),
        (dict(name="d", type=tarfile.DIRTYPE, mode=0o755), None),  # merges, keeps d/f
        (dict(name="e", type=tarfile.DIRTYPE), None),
        (dict(name="e/x", mode=0o644), b"gone"),
        (dict(name="e", mode=0o644), b"now a file"),
    ])
    blob, _ = convert(src)
    layer, f = open_layer(blob, tmp_path)
    with f:
        img = layer.image
        a = img.inode(img.resolve(b"a"))
        assert stat.S_IMODE(a.mode) == 0o600 and img.read(a.nid, 0, 10) == b"second"
        assert stat.S_IMODE(img.inode(img.resolve(b"d")).mode) == 0o755
        assert img.read(img.resolve(b"d/f"), 0, 10) == b"in d"
        assert img.read(img.resolve(b"e"), 0, 20) == b"now a file"


@pytest.mark.parametrize("sparse_version", ["0.0", "0.1", "1.0"])
def test_sparse_file_expanded(tmp_path, sparse_version):
    """GNU tar's PAX sparse formats are read (as Go's archive/tar does) and written expanded."""
    require_tool("tar")
    tar_format = "pax"
    data_dir = tmp_path / "src"
    data_dir.mkdir()
    with open(data_dir / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(5 * CHUNK)
        f.write(b"tail")
    after = os.urandom(2 * CHUNK + 3)
    (data_dir / "after").write_bytes(after)
    (data_dir / "small").write_bytes(b"small\n")
    tar_path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--sparse-version={sparse_version}", f"--format={tar_format}", "-cf",
                    str(tar_path), "-C", str(data_dir), "small", "sparse", "after"], check=True)
    blob, result = convert(tar_path.read_bytes(), chunk_size=CHUNK)
    layer, f = open_layer(blob, tmp_path)
    expect = b"head" + bytes(5 * CHUNK - 4) + b"tail"
    with f:
        img = layer.image
        nid = img.resolve(b"sparse")
        assert layer.read(nid, 0, len(expect), lambda n: read_chunk(f, layer, n)) == expect
        assert layer.read(img.resolve(b"after"), 0, len(after), lambda n: read_chunk(f, layer, n)) == after
        assert img.read(img.resolve(b"small"), 0, 100) == b"small\n"
        assert layer.chunk_count == 2 + 3
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        m = t.getmember("sparse")
        assert m.type == tarfile.REGTYPE and t.extractfile(m).read() == expect
        assert t.extractfile("after").read() == after and t.extractfile("small").read() == b"small\n"
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() != result.source_diff_id
    listing = subprocess.run(["tar", "-tvf", "-"], input=tar, capture_output=True, check=True).stdout
    assert listing.count(b"\n") == 3


def test_old_gnu_sparse_refused(tmp_path):
    """Go's reader returns an old GNU sparse entry as type 'S', which containerd refuses."""
    require_tool("tar")
    (tmp_path / "sparse").write_bytes(b"x")
    with open(tmp_path / "sparse", "r+b") as f:
        f.seek(3 * CHUNK)
        f.write(b"y")
    tar_path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tar_path), "-C", str(tmp_path), "sparse"],
                   check=True)
    with pytest.raises(LayerFormatError, match="old GNU sparse"):
        convert(tar_path.read_bytes(), chunk_size=CHUNK)


@pytest.mark.parametrize(
    "members,entry,reason",
    [
        ([(dict(name="../evil"), b"x")], "../evil", "'..'"),
        ([(dict(name="a/../../evil"), b"x")], "a/../../evil", "'..'"),
        ([(dict(name="/etc/passwd"), b"x")], "/etc/passwd", "absolute"),
        ([(dict(name="link", type=tarfile.SYMTYPE, linkname="/etc"), None), (dict(name="link/passwd"), b"x")],
         "link/passwd", "symlink"),
        ([(dict(name="up", type=tarfile.SYMTYPE, linkname="../.."), None), (dict(name="up/x/y"), b"x")],
         "up/x/y", "symlink"),
        ([(dict(name="hl", type=tarfile.LNKTYPE, linkname="missing"), None)], "hl", "does not exist"),
        ([(dict(name="hl", type=tarfile.LNKTYPE, linkname="../../etc/shadow"), None)], "hl", "'..'"),
        ([(dict(name="d", type=tarfile.DIRTYPE), None), (dict(name="hl", type=tarfile.LNKTYPE, linkname="d"), None)],
         "hl", "directory"),
        ([(dict(name="f"), b"file"), (dict(name="f/x"), b"x")], "f/x", "not a directory"),
        ([(dict(name="empty-link", type=tarfile.SYMTYPE, linkname=""), None)], "empty-link", "symlink target"),
    ],
)
def test_hostile_entries_rejected(members, entry, reason):
    src = make_tar(members, tarfile.GNU_FORMAT)
    with pytest.raises(UnsafeTarEntry, match=reason) as info:
        convert(src)
    assert info.value.entry == entry and entry in str(info.value)


def test_unknown_entry_type_refused():
    src = make_tar([(dict(name="before", mode=0o644), b"x" * 5000),
                    (dict(name="odd", type=b"Z"), os.urandom(6 << 20)),
                    (dict(name="after", mode=0o644), b"y")])
    with pytest.raises(UnsafeTarEntry, match="unsupported tar entry type") as info:
        convert(src)
    assert info.value.entry == "odd"


def test_tap_routes_everything_once_and_stays_bounded():
    from lazyfs.layer.tarstream import Tap

    data = os.urandom(12 << 20)
    emitted = []
    tap = Tap(io.BytesIO(data), emitted.append)
    out = []
    sizes = []
    while piece := tap.read(64 << 10):
        out.append(piece)
        sizes.append(len(tap._buf))
    assert max(sizes) <= Tap.OVERFLOW + (64 << 10)
    assert b"".join(emitted) + tap.take_all() == data and b"".join(out) == data
    # While held (inside a chunked file's content) nothing overflows; skipped bytes are dropped.
    tap = Tap(io.BytesIO(data), emitted.append)
    emitted.clear()
    tap.hold = True
    tap.skip(1 << 20)
    while tap.read(1 << 20):
        pass
    assert emitted == [] and tap.take_all() == data[1 << 20:]


def test_overlay_xattrs_from_the_tar_are_dropped(tmp_path):
    src = make_tar([(dict(name="d", type=tarfile.DIRTYPE, pax={"SCHILY.xattr.trusted.overlay.redirect": "/x",
                                                               "SCHILY.xattr.user.ok": "1"}), None)])
    blob, _ = convert(src)
    layer, f = open_layer(blob, tmp_path)
    with f:
        assert layer.image.xattrs(layer.image.resolve(b"d")) == {b"user.ok": b"1"}


def test_truncated_and_garbage_input():
    src = make_tar([(dict(name="f"), os.urandom(100000))])
    with pytest.raises(LayerFormatError, match="truncated|cannot read"):
        convert(src[:50000])
    with pytest.raises(LayerFormatError):
        convert(gzip.compress(b"not a tar at all" * 100))


def test_damaged_gzip_input_is_a_layer_format_error():
    """Every byte flip in a gzip layer fails the conversion with LayerFormatError: a bad CRC
    or length, a truncated stream, and the inflater's own "invalid deflate block" error."""
    src = make_tar([(dict(name="f"), random.Random(5).randbytes(60_000) * 2)])
    packed = gzip.compress(src, 6)
    for i in range(10, len(packed), max(1, len(packed) // 150)):
        damaged = packed[:i] + bytes([packed[i] ^ 0x5A]) + packed[i + 1:]
        with pytest.raises(LayerFormatError, match="cannot read the layer tar"):
            convert(damaged)


def test_empty_layer(tmp_path):
    blob, result = convert(make_tar([]))
    layer, f = open_layer(blob, tmp_path)
    with f:
        assert layer.chunk_count == 0 and list(layer.image.iterdir(layer.image.root_nid)) == []


# -- reader verification -----------------------------------------------------------------------


def test_reader_verifies_sections(tmp_path):
    blob, result = convert(make_tar([(dict(name="f"), os.urandom(3 * CHUNK))]), chunk_size=CHUNK)
    index = result.index
    assert locate(lambda o, n: blob[o:o + n], len(blob)) == index
    meta = blob[index.meta.offset:index.meta.offset + index.meta.stored_size]
    table = blob[index.table.offset:index.table.offset + index.table.stored_size]
    layer = Layer.load(index, meta, table)
    assert layer.chunk_count == 3 and layer.device_size == 3 * CHUNK
    ref = layer.chunk_ref(1)
    assert ref.compression == "zstd" and len(ref.digest) == 16
    # Annotations are preferred over the footer and are then not "trusted footer".
    annotated, f = open_layer(blob, tmp_path, result.annotations)
    with f:
        assert not annotated.trusted_footer
    bad_meta = bytearray(meta)
    bad_meta[-1] ^= 1
    with pytest.raises(LayerFormatError, match="meta section: sha256"):
        Layer.load(index, bytes(bad_meta), table)
    bad_table = bytearray(table)
    bad_table[40] ^= 1
    with pytest.raises(LayerFormatError, match="table section: sha256"):
        Layer.load(index, meta, bytes(bad_table))
    # A table that matches a forged index but not the metadata's device tag is refused.
    forged = dataclasses.replace(index, table=fmt.make_section(index.table.offset, bytes(bad_table), 0,
                                                               len(bad_table)))
    with pytest.raises(LayerFormatError, match="device tag"):
        Layer.load(forged, meta, bytes(bad_table))
    with pytest.raises(LayerFormatError, match="not a lazyfs layer"):
        locate(lambda o, n: bytes(n), 4096)


def test_embedded_trace_section(tmp_path):
    trace = Trace({"sha256:" + "0" * 64: CHUNK},
                  [Access(i, "sha256:" + "0" * 64, 40 + i, 0, 0, f"/some/file{i}") for i in range(300)]).encode()
    blob, result = convert(make_tar([(dict(name="f"), b"x")]), trace=trace)
    index = locate(lambda o, n: blob[o:o + n], len(blob))
    assert index == result.index and index.trace is not None
    assert index.trace.open("trace", blob[index.trace.offset:index.trace.offset + index.trace.stored_size]) == trace
    assert from_annotations(result.annotations, len(blob)) == index
    assert "containerd.io/snapshot/lazyfs.trace.digest" in result.annotations
    # Still a plain tar+zstd stream.
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    assert members_of(tar)[0][0] == "f"


def test_materialise_chunk_device(tmp_path):
    data = os.urandom(2 * CHUNK + 100)
    blob, _ = convert(make_tar([(dict(name="f"), data)]), chunk_size=CHUNK)
    layer, f = open_layer(blob, tmp_path)
    with f:
        size = materialise_chunk_device(f, layer, tmp_path / "dev")
    raw = (tmp_path / "dev").read_bytes()
    assert size == len(raw) == 3 * CHUNK
    assert raw[: len(data)] == data and raw[len(data):] == bytes(len(raw) - len(data))


# -- property: any well-formed tree converts to an equal tar and an equal EROFS tree -------------

_SIZES = st.sampled_from([0, 1, 100, 4095, 4096, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7])


@st.composite
def layer_trees(draw):
    dirs = draw(st.lists(st.sampled_from(["a", "b", "a/c", "b/d", "a/c/e"]), unique=True, max_size=5))
    members, files = [], []
    for d in sorted(dirs):
        members.append((dict(name=d, type=tarfile.DIRTYPE, mode=draw(st.sampled_from([0o755, 0o700, 0o1777]))),
                        None))
    parents = [""] + sorted(d for d in dirs if all(p in dirs for p in _prefixes(d)))
    for i in range(draw(st.integers(0, 8))):
        parent = draw(st.sampled_from(parents))
        name = (parent + "/" if parent else "") + f"f{i}"
        size = draw(_SIZES)
        seed = draw(st.integers(0, 3))
        data = (bytes([seed]) * 7 + os.urandom(1))[:1] * size if seed == 0 else os.urandom(size)
        ns = draw(st.integers(0, 999_999_999))
        members.append((dict(name=name, mode=draw(st.sampled_from([0o644, 0o600, 0o4755])),
                             uid=draw(st.integers(0, 70000)), pax={"mtime": f"1600000000.{ns:09d}"}), data))
        files.append(name)
    for j, target in enumerate(files[: draw(st.integers(0, len(files)))]):
        # A hard link's header carries its target's metadata, as tar writers make it (an
        # applier sets the shared inode from the link's header too).
        meta = next({k: kw[k] for k in ("mode", "uid", "pax")} for kw, _ in members if kw["name"] == target)
        members.append((dict(name=f"hl{j}", type=tarfile.LNKTYPE, linkname=target, **meta), None))
    if files and draw(st.booleans()):
        members.append((dict(name="sym", type=tarfile.SYMTYPE, linkname=files[0]), None))
    return members


def _prefixes(path):
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layer_trees())
def test_builder_property(members):
    src = make_tar([(dict(kw), data) for kw, data in members])
    blob, result = convert(src, chunk_size=CHUNK)
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    assert tar == src
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    index = locate(lambda o, n: blob[o:o + n], len(blob))
    layer = Layer.load(index, blob[index.meta.offset:index.meta.offset + index.meta.stored_size],
                       blob[index.table.offset:index.table.offset + index.table.stored_size])

    def chunk(n):
        ref = layer.chunk_ref(n)
        from lazyfs.layer.chunks import decode_chunk

        return decode_chunk(ref, blob[ref.offset:ref.offset + ref.stored_length])

    img = layer.image
    nids = {}
    for kw, data in members:
        nid = img.resolve(kw["name"].encode())
        inode = img.inode(nid)
        if data is not None:
            assert layer.read(nid, 0, len(data) + 1, chunk) == data
            assert stat.S_IMODE(inode.mode) == kw["mode"] and inode.uid == kw["uid"]
            assert inode.mtime_nsec == int(kw["pax"]["mtime"].split(".")[1])
            nids[kw["name"]] = nid
        elif kw.get("type") == tarfile.LNKTYPE:
            assert nid == nids[kw["linkname"]]
        elif kw.get("type") == tarfile.DIRTYPE:
            assert stat.S_ISDIR(inode.mode) and stat.S_IMODE(inode.mode) == kw["mode"]
