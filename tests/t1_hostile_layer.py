"""Crafted lazyfs layers: a hostile registry controls every byte, digests included.

Each case rebuilds a real layer with one lie in it and recomputes every digest, as an attacker
would; the only outcomes allowed are a LayerFormatError/ErofsError (at load or at the read of
the bad part) or correct service, with memory and work bounded.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tracemalloc

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.erofs import format as F
from lazyfs.erofs.errors import CorruptImage, ErofsError
from lazyfs.erofs.reader import Image
from lazyfs.layer import format as fmt
from lazyfs.layer.annotations import PREFIX, from_annotations, to_annotations
from lazyfs.layer.builder import build_layer
from lazyfs.layer.chunks import ChunkCorrupt, decode_chunk
from lazyfs.layer.errors import LayerFormatError
from lazyfs.layer.reader import Layer, locate
from lazyfs.trace.format import Access, Trace
from tests.fixtures.images import directory, file, layer_tar, symlink

CHUNK = 4096
ENTRIES = [
    directory("a"), directory("a/b"), file("a/b/big", bytes(range(256)) * 64), file("a/small", b"x" * 100),
    file("top", b"top file\n" * 1000, xattrs={"user.k": b"v"}), symlink("link", "top"), directory("c"),
    file("c/zz", b"zz"), file("ext", bytes(range(7, 250)) * 40, uid=100_000),  # an extended inode
]
ALLOWED = (LayerFormatError, ErofsError, ChunkCorrupt)


def build(entries=ENTRIES, trace: bytes | None = None) -> bytes:
    out = io.BytesIO()
    build_layer(io.BytesIO(layer_tar(entries)), out, chunk_size=CHUNK, trace=trace)
    return out.getvalue()


GOOD = build()


def index_of(blob: bytes) -> fmt.LayerIndex:
    return locate(lambda o, n: blob[o:o + n], len(blob))


def raw_sections(blob: bytes) -> dict[str, bytes]:
    """Decoded meta/table (and trace) of a blob."""
    index = index_of(blob)
    out = {"meta": index.meta.open("meta", blob[index.meta.offset:][:index.meta.stored_size]),
           "table": blob[index.table.offset:][:index.table.stored_size]}
    if index.trace is not None:
        out["trace"] = index.trace.open("trace", blob[index.trace.offset:][:index.trace.stored_size])
    return out


def assemble(blob: bytes, *, meta: bytes | None = None, table: bytes | None = None,
             meta_stored: bytes | None = None, meta_size: int | None = None,
             trace_stored: bytes | None = None, trace_size: int | None = None,
             tag_table: bool = True) -> tuple[bytes, dict[str, str]]:
    """The blob with its sections replaced, every digest (and the metadata's table tag)
    recomputed: (blob, annotations)."""
    index = index_of(blob)
    parts = raw_sections(blob)
    table = parts["table"] if table is None else table
    meta = parts["meta"] if meta is None else meta
    if tag_table and meta_stored is None:
        meta = retag(meta, hashlib.sha256(table).digest())
    if meta_stored is None:
        meta = with_superblock_checksum(meta)
        meta_stored, meta_size = zstandard.ZstdCompressor().compress(meta), len(meta)
    out = bytearray(blob[:index.meta.offset - fmt.SKIPPABLE_HEADER.size])
    sections = {}
    for name, stored, size, compression in (
            ("meta", meta_stored, meta_size, fmt.COMPRESSION_ZSTD),
            ("table", table, len(table), fmt.COMPRESSION_NONE),
            ("trace", trace_stored, trace_size, fmt.COMPRESSION_ZSTD)):
        if stored is None:
            continue
        offset = len(out) + fmt.SKIPPABLE_HEADER.size
        out += fmt.skippable_frame(stored)
        sections[name] = fmt.Section(offset, len(stored), size, compression, hashlib.sha256(stored).digest())
    new = fmt.LayerIndex(fmt.FORMAT_VERSION, index.chunk_size, sections["meta"], sections["table"],
                         sections.get("trace"))
    out += fmt.encode_footer(new)
    return bytes(out), to_annotations(new)


def retag(meta: bytes, table_sha256: bytes) -> bytes:
    """The metadata with its chunk device tag set to a table's digest (what binds the two)."""
    pos = next(i for i in range(0, len(meta), 128) if meta[i:i + 7] == b"sha256=")
    out = bytearray(meta)
    out[pos:pos + 64] = fmt.table_device_tag(table_sha256).ljust(64, b"\0")
    return bytes(out)


def with_superblock_checksum(meta: bytes) -> bytes:
    """The metadata with a correct superblock checksum, if it has one (as a forger makes it)."""
    out = bytearray(meta)
    if len(out) >= 4096 and struct.unpack_from("<I", out, F.SUPER_OFFSET + 8)[0] & F.FEATURE_COMPAT_SB_CHKSUM:
        try:
            crc = F.crc32c_superblock(out, 1 << min(out[F.SUPER_OFFSET + 12], 16))
        except ValueError:  # a mutated block size larger than the image: nothing to checksum
            return bytes(out)
        struct.pack_into("<I", out, F.SUPER_OFFSET + 4, crc)
    return bytes(out)


def load(blob: bytes, annotations: dict[str, str] | None = None) -> Layer:
    """What attach does, in memory: index (annotations, else footer), sections, verification."""
    if annotations is not None:
        index = from_annotations(annotations, len(blob))
    else:
        index = index_of(blob)
    meta = blob[index.meta.offset:index.meta.offset + index.meta.stored_size]
    table = blob[index.table.offset:index.table.offset + index.table.stored_size]
    return Layer.load(index, meta, table)


def read_everything(layer: Layer, blob: bytes, budget: int = 100_000) -> int:
    """Walk the tree and read every file, symlink and xattr; return the bytes read.
    ``budget`` bounds the work: a walk of a crafted image must end long before it."""

    def chunk(n: int) -> bytes:
        ref = layer.chunk_ref(n)
        return decode_chunk(ref, blob[ref.offset:ref.end])

    total = steps = 0
    for _path, inode in layer.image.walk():
        steps += 1
        assert steps < budget
        if inode.is_reg:
            total += len(layer.read(inode.nid, 0, min(inode.size, 1 << 20), chunk))
        elif inode.is_symlink:
            total += len(layer.image.readlink(inode.nid))
        layer.image.xattrs(inode.nid)
    return total


def test_the_seed_layer_reads_back():
    layer = load(GOOD)
    assert read_everything(layer, GOOD) > 0
    again, annotations = assemble(GOOD)
    assert read_everything(load(again, annotations), again) == read_everything(layer, GOOD)


# -- footers and annotations that lie ---------------------------------------------------------

NUMERIC_KEYS = [PREFIX + k for k in ("chunk-size", "meta.offset", "meta.size", "meta.uncompressed-size",
                                     "table.offset", "table.size")]


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(NUMERIC_KEYS),
       value=st.one_of(st.integers(0, 1 << 70), st.sampled_from([0, 1, 7, 4095, 4096, 1 << 30, 1 << 32, 2**63,
                                                                   2**64 - 1])),
       delta=st.integers(-64, 64))
def test_annotations_that_lie_about_offsets_and_sizes(key, value, delta):
    blob, annotations = assemble(GOOD)
    if value % 2 and key in annotations:  # near the true value, else anywhere
        value = max(0, int(annotations[key]) + delta)
    lied = dict(annotations, **{key: str(value)})
    try:
        layer = load(blob, lied)
    except LayerFormatError:
        return
    assert lied == annotations or read_everything(layer, blob) >= 0


@settings(max_examples=300, deadline=None)
@given(section=st.integers(0, 1), field=st.integers(0, 2),
       value=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(GOOD) + 64)))
def test_footers_that_lie_with_a_valid_checksum(section, field, value):
    index = index_of(GOOD)
    sections = [index.meta, index.table]
    s = sections[section]
    fields = [s.offset, s.stored_size, s.size]
    fields[field] = value
    sections[section] = fmt.Section(*fields, s.compression, s.sha256)
    try:
        lied = fmt.LayerIndex(index.version, index.chunk_size, *sections)
        frame = fmt.encode_footer(lied)
    except struct.error:
        return  # not representable in the footer
    blob = GOOD[:-fmt.FOOTER_FRAME_SIZE] + frame
    try:
        layer = load(blob)
    except LayerFormatError:
        return
    assert read_everything(layer, blob) > 0


# -- decompression bombs ----------------------------------------------------------------------

def zeros_frame(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes, compressed in pieces (tiny: ~32 KiB per GiB)."""
    compressor = zstandard.ZstdCompressor().compressobj(size=size)
    piece = bytes(1 << 20)
    out = [compressor.compress(piece[:min(len(piece), size - done)]) for done in range(0, size, len(piece))]
    return b"".join(out) + compressor.flush()


def peak_memory(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_metadata_bomb_declared_small_decodes_within_its_declared_size():
    bomb = zeros_frame(256 << 20)
    blob, annotations = assemble(GOOD, meta_stored=bomb, meta_size=len(raw_sections(GOOD)["meta"]))
    with pytest.raises(LayerFormatError, match="decompressed to more than"):
        load(blob, annotations)
    assert peak_memory(lambda: pytest.raises(LayerFormatError, load, blob, annotations)) < 8 << 20


def test_metadata_declared_larger_than_the_limit_is_refused_before_decoding():
    bomb = zeros_frame(fmt.MAX_DECODED_SIZE["meta"] + 4096)
    blob, annotations = assemble(GOOD, meta_stored=bomb, meta_size=fmt.MAX_DECODED_SIZE["meta"] + 4096)
    with pytest.raises(LayerFormatError, match="exceeds the limit"):
        load(blob, annotations)
    with pytest.raises(LayerFormatError, match="exceeds the limit"):
        load(blob)


def test_zstd_frame_header_lying_about_its_content_size():
    meta = raw_sections(GOOD)["meta"]
    frame = bytearray(zstandard.ZstdCompressor().compress(meta))
    fhd = frame[4]
    assert fhd >> 6 == 1 and fhd & 0x20  # 2-byte content size, single segment (a small image)
    struct.pack_into("<H", frame, 5, 0xFFFF)  # claims 65535 + 256 bytes
    blob, annotations = assemble(GOOD, meta_stored=bytes(frame), meta_size=len(meta))
    assert peak_memory(lambda: pytest.raises(LayerFormatError, load, blob, annotations)) < 4 << 20


def test_trace_bomb_is_bounded():
    trace = Trace({"sha256:" + "0" * 64: CHUNK}, [Access(0, "sha256:" + "0" * 64, 1, 0, 0, "/top")]).encode()
    traced = build(trace=trace)
    blob, annotations = assemble(traced, trace_stored=zeros_frame(fmt.MAX_DECODED_SIZE["trace"] + 1),
                                 trace_size=fmt.MAX_DECODED_SIZE["trace"] + 1)
    with pytest.raises(LayerFormatError, match="trace section .* exceeds the limit"):
        from_annotations(annotations, len(blob))
    small, annotations = assemble(traced, trace_stored=zeros_frame(64 << 20), trace_size=len(trace))
    index = from_annotations(annotations, len(small))
    stored = small[index.trace.offset:][:index.trace.stored_size]
    assert peak_memory(lambda: pytest.raises(LayerFormatError, index.trace.open, "trace", stored)) < 8 << 20


def test_chunk_bomb_is_bounded_by_the_chunk_length():
    layer = load(GOOD)
    ref = layer.chunk_ref(0)
    for stored in (zeros_frame(64 << 20), zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))):
        with pytest.raises(ChunkCorrupt):
            decode_chunk(ref, stored)
        assert peak_memory(lambda: pytest.raises(ChunkCorrupt, decode_chunk, ref, stored)) < 2 * CHUNK + (1 << 20)


# -- chunk tables -----------------------------------------------------------------------------

def table_with(entries: list[tuple[int, int, int, bytes]], data_end: int | None = None) -> bytes:
    table = fmt.ChunkTable.decode(raw_sections(GOOD)["table"])
    head = fmt.TABLE_HEAD.pack(fmt.TABLE_MAGIC, fmt.FORMAT_VERSION, fmt.TABLE_ENTRY.size, table.chunk_size,
                               len(entries), table.data_end if data_end is None else data_end)
    return head + b"".join(fmt.TABLE_ENTRY.pack(*e) for e in entries)


def good_entries() -> list[tuple[int, int, int, bytes]]:
    table = fmt.ChunkTable.decode(raw_sections(GOOD)["table"])
    return [(e.offset, e.stored_length, e.length, e.digest) for e in table.entries]


def test_chunk_frames_may_not_reach_into_the_sections():
    index = index_of(GOOD)
    entries = good_entries()
    # data_end moved past the chunk frames so that an entry can cover the metadata section
    entries[0] = (index.meta.offset - 8, 64, 64, entries[0][3])
    blob, annotations = assemble(GOOD, table=table_with(entries, data_end=index.meta.offset + 64))
    with pytest.raises(LayerFormatError, match="lies past the chunk frames"):
        load(blob, annotations)


def test_chunk_entries_outside_the_blob():
    entries = good_entries()
    entries[-1] = (2**63, 100, 100, entries[-1][3])
    blob, annotations = assemble(GOOD, table=table_with(entries))
    with pytest.raises(LayerFormatError, match="entry .* is invalid"):
        load(blob, annotations)


def test_chunk_entries_pointing_at_each_other_fail_only_their_reads():
    """Two entries sharing one frame (or overlapping frames): there is no indirection beyond
    table -> frame, so no cycle exists; a chunk whose frame is another's fails its digest."""
    entries = good_entries()
    first = entries[0]
    x, y = [n for n, e in enumerate(entries) if e[3] != first[3]][:2]
    entries[x] = (first[0], first[1], entries[x][2], entries[x][3])  # chunk x -> frame 0
    entries[y] = (first[0] + 1, first[1] - 1, entries[y][2], entries[y][3])  # overlapping frame 0
    blob, annotations = assemble(GOOD, table=table_with(entries))
    layer = load(blob, annotations)
    ref0 = layer.chunk_ref(0)
    assert decode_chunk(ref0, blob[ref0.offset:ref0.end])
    for n in (x, y):
        ref = layer.chunk_ref(n)
        with pytest.raises(ChunkCorrupt):
            decode_chunk(ref, blob[ref.offset:ref.end])


def short_twin_table() -> tuple[bytes, int]:
    """A table in which the first chunk of "ext" is replaced by the valid 808-byte last chunk
    of "top" (frame, length and digest all consistent): (table, that chunk's number)."""
    layer = load(GOOD)
    ext = layer.image.lookup(layer.image.root_nid, b"ext")
    top = layer.image.lookup(layer.image.root_nid, b"top")
    n = layer.chunks_for(ext, 0, 1)[0].chunk
    short = layer.chunks_for(top, 8192, 1)[0].chunk
    assert n is not None and short is not None and good_entries()[short][2] == 9000 - 8192
    entries = good_entries()
    entries[n] = entries[short]
    return table_with(entries), n


def test_a_valid_but_short_chunk_under_a_longer_range_fails_the_read():
    table, _n = short_twin_table()
    blob, annotations = assemble(GOOD, table=table)
    layer = load(blob, annotations)
    ext = layer.image.lookup(layer.image.root_nid, b"ext")
    with pytest.raises(LayerFormatError, match="beyond chunk"):
        layer.chunks_for(ext, 0, 4096)
    assert layer.read(layer.image.resolve("/top"), 0, 9000, lambda n: decode_chunk(
        layer.chunk_ref(n), blob[layer.chunk_ref(n).offset:layer.chunk_ref(n).end])) == b"top file\n" * 1000


def test_chunk_count_in_the_billions():
    table = table_with(good_entries())
    huge = bytearray(table)
    struct.pack_into("<Q", huge, 16, 3_000_000_000)
    blob, annotations = assemble(GOOD, table=bytes(huge))
    with pytest.raises(LayerFormatError, match="does not match its count"):
        load(blob, annotations)
    annotations[PREFIX + "table.size"] = str(3_000_000_000 * 32 + 32)
    with pytest.raises(LayerFormatError):
        load(blob, annotations)


def test_a_large_table_costs_its_own_size():
    """100k entries (all sharing frame 0): about 3.2 MB, not a Python object each."""
    entry = good_entries()[0]
    raw = table_with([entry] * 100_000)
    table = fmt.ChunkTable.decode(raw)
    assert len(table) == 100_000 and table[99_999].offset == entry[0]
    assert peak_memory(lambda: fmt.ChunkTable.decode(raw)) < len(raw) * 1.2


# -- EROFS metadata: names, loops, nid tricks, sizes ------------------------------------------

def patched_meta(edit) -> tuple[bytes, dict[str, str]]:
    meta = bytearray(raw_sections(GOOD)["meta"])
    img = Image(bytes(meta))
    edit(img, meta)
    img.close()
    return assemble(GOOD, meta=bytes(meta))


def dirent_pos(img: Image, dir_nid: int, name: bytes) -> tuple[int, int, int]:
    """(offset of the dirent, offset of its name, name length) of ``name`` in one directory."""
    inode = img.inode(dir_nid)
    ext = img._map_flat(inode, 0, min(inode.size, img.block_size))[0]
    block = bytes(img._mv[ext.device_offset:ext.device_offset + min(inode.size, img.block_size)])
    entries = img._dir_entries(inode, 0, block)
    i = [e[0] for e in entries].index(name)
    _nid, nameoff, _ft, _r = F.DIRENT.unpack_from(block, i * 12)
    return ext.device_offset + i * 12, ext.device_offset + nameoff, len(name)


@pytest.mark.parametrize("new_name", [b"/", b"\0", b"a/", b".", b".."])
def test_crafted_names(new_name):
    """'c' renamed (same length where possible): '/' and NUL are corruption; '.' and '..'
    are never listed or walked as children."""

    def edit(img, meta):
        _d, name_at, length = dirent_pos(img, img.root_nid, b"c")
        name = new_name[:length] if len(new_name) >= length else new_name
        meta[name_at:name_at + length] = name.ljust(length, b"\0")[:length]

    blob, annotations = patched_meta(edit)
    try:
        layer = load(blob, annotations)
        names = [p for p, _ in layer.image.walk()]
        listed = [e.name for e in layer.image.iterdir(layer.image.root_nid)]
    except ALLOWED:
        return
    assert all(b"\0" not in n and n.count(b"//") == 0 for n in names)
    assert not {b".", b"..", b""} & set(listed)
    assert all(b"/" not in n and b"\0" not in n for n in listed)


def test_empty_name_is_corruption():
    def edit(img, meta):
        d, _name_at, _l = dirent_pos(img, img.root_nid, b"c")
        nameoff = F.DIRENT.unpack_from(meta, d)[1]
        struct.pack_into("<H", meta, d + 12 + 8, nameoff)  # the next name starts where 'c' does

    blob, annotations = patched_meta(edit)
    layer = load(blob, annotations)
    with pytest.raises(CorruptImage):
        list(layer.image.walk())


@pytest.mark.parametrize("target", ["root", "parent"])
def test_directory_loops_are_corruption(target):
    def edit(img, meta):
        a = img.lookup(img.root_nid, b"a")
        d, _n, _l = dirent_pos(img, a, b"b")
        nid = {"root": img.root_nid, "parent": a}[target]
        struct.pack_into("<Q", meta, d, nid)

    blob, annotations = patched_meta(edit)
    layer = load(blob, annotations)
    with pytest.raises(CorruptImage, match="reached twice"):
        list(layer.image.walk())


@pytest.mark.parametrize("nid", [1, 3, 2**40, 2**64 - 1])
def test_dirents_pointing_at_odd_nids(nid):
    """A nid into the middle of another inode, the superblock, or past the image."""

    def edit(img, meta):
        d, _n, _l = dirent_pos(img, img.root_nid, b"top")
        struct.pack_into("<Q", meta, d, nid)

    blob, annotations = patched_meta(edit)
    layer = load(blob, annotations)
    try:
        read_everything(layer, blob)
    except ALLOWED:
        pass


def test_hard_linked_file_nid_to_a_directory_is_corruption():
    def edit(img, meta):
        d, _n, _l = dirent_pos(img, img.root_nid, b"top")  # a file entry
        struct.pack_into("<Q", meta, d, img.lookup(img.root_nid, b"a"))

    blob, annotations = patched_meta(edit)
    with pytest.raises(CorruptImage, match="file type"):
        list(load(blob, annotations).image.walk())


@pytest.mark.parametrize("size", [2**63, 2**64 - 1, 2**62, 2**40])
def test_absurd_file_sizes(size):
    def edit(img, meta):
        inode = img.inode(img.lookup(img.root_nid, b"ext"))
        assert not inode.compact
        struct.pack_into("<Q", meta, inode.offset + 8, size)

    blob, annotations = patched_meta(edit)
    layer = load(blob, annotations)
    nid = layer.image.lookup(layer.image.root_nid, b"ext")
    if size > (1 << 63) - 1:  # st_size would be negative in the kernel: corrupt at first use
        with pytest.raises(CorruptImage, match="exceeds"):
            layer.image.inode(nid)
        return
    # The chunk map of a file that size cannot be in the image: refused when mapped.
    with pytest.raises(LayerFormatError, match="chunk array .* runs past the image end"):
        layer.chunks_for(nid, size - 4096, 4096)


@pytest.mark.parametrize("icount", [0xFFFF, 2, 1000])
def test_absurd_xattr_counts(icount):
    def edit(img, meta):
        inode = img.inode(img.lookup(img.root_nid, b"top"))
        struct.pack_into("<H", meta, inode.offset + 2, icount)

    blob, annotations = patched_meta(edit)
    try:
        layer = load(blob, annotations)
        nid = layer.image.lookup(layer.image.root_nid, b"top")
        layer.image.xattrs(nid)
        layer.image.listxattr(nid)
    except ALLOWED:
        pass


# -- property: any mutation of the metadata, digests recomputed --------------------------------

@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=12)), min_size=1,
                      max_size=6))
def test_mutated_metadata_with_valid_digests(edits):
    meta = bytearray(raw_sections(GOOD)["meta"])
    for pos, data in edits:
        pos %= len(meta)
        meta[pos:pos + len(data)] = data[:len(meta) - pos]
    blob, annotations = assemble(GOOD, meta=bytes(meta), tag_table=False)
    try:
        layer = load(blob, annotations)
        read_everything(layer, blob)
    except ALLOWED:
        pass


@settings(max_examples=250, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 12), st.binary(min_size=1, max_size=8)), min_size=1,
                      max_size=4))
def test_mutated_chunk_table_with_valid_digests(edits):
    table = bytearray(raw_sections(GOOD)["table"])
    for pos, data in edits:
        pos %= len(table)
        table[pos:pos + len(data)] = data[:len(table) - pos]
    blob, annotations = assemble(GOOD, table=bytes(table))
    try:
        layer = load(blob, annotations)
        read_everything(layer, blob)
    except ALLOWED:
        pass


def test_xxh3_is_what_binds_chunks():
    """Sanity for the cases above: the digest in the table is xxh3-128 of the chunk bytes."""
    layer = load(GOOD)
    ref = layer.chunk_ref(0)
    assert xxhash.xxh3_128_digest(decode_chunk(ref, GOOD[ref.offset:ref.end])) == ref.digest
