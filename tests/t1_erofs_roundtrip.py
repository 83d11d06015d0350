"""Writer -> reader round trip on generated trees: everything written is read back."""

import io
import stat

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.erofs import format as fmt
from lazyfs.erofs.reader import Image
from lazyfs.erofs.writer import Builder, ChunkedData, Entry

CHUNK = 4096 * 4
NAMES = st.binary(min_size=1, max_size=20).filter(lambda n: b"/" not in n and b"\0" not in n
                                                   and n not in (b".", b".."))
XATTR_NAMES = st.sampled_from([b"user.a", b"user.bb", b"trusted.overlay.opaque",
                               b"security.selinux", b"user." + b"l" * 200])
XATTRS = st.dictionaries(XATTR_NAMES, st.sampled_from([b"", b"y", b"v" * 30, b"w" * 300]),
                         max_size=3)
TIMES = st.sampled_from([(0, 0), (1_700_000_000, 0), (1_700_000_000, 999_999_999), (1 << 40, 5)])
IDS = st.sampled_from([0, 1, 65535, 65536, 4_000_000_000])


@st.composite
def trees(draw):
    """(entries, chunk contents by chunk number)."""
    chunk_bytes: dict[int, bytes] = {}
    entries = [Entry(b"", fmt.S_IFDIR | 0o755, xattrs=draw(XATTRS))]
    dirs = [b""]
    files = []
    used = {b""}
    for _ in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(dirs))
        path = (parent + b"/" if parent else b"") + draw(NAMES)
        if path in used:
            continue
        used.add(path)
        mtime, nsec = draw(TIMES)
        common = dict(uid=draw(IDS), gid=draw(IDS), mtime=mtime, mtime_nsec=nsec,
                      xattrs=draw(XATTRS))
        kind = draw(st.sampled_from(["dir", "file", "chunked", "link", "dev", "fifo", "sock",
                                     "hardlink"]))
        if kind == "dir":
            entries.append(Entry(path, fmt.S_IFDIR | draw(st.integers(0, 0o7777)), **common))
            dirs.append(path)
        elif kind == "file":
            data = draw(st.binary(max_size=9000))
            entries.append(Entry(path, fmt.S_IFREG | 0o644, data=data, **common))
            files.append(path)
        elif kind == "chunked":
            size = draw(st.integers(1, 3 * CHUNK + 100))
            chunks = []
            for _ in range(-(-size // CHUNK)):
                chunk = draw(st.one_of(st.none(), st.integers(0, 50)))
                if chunk is not None and chunk not in chunk_bytes:
                    chunk_bytes[chunk] = bytes([chunk + 1]) * CHUNK
                chunks.append(chunk)
            entries.append(Entry(path, fmt.S_IFREG | 0o600, data=ChunkedData(size, chunks),
                                 **common))
            files.append(path)
        elif kind == "link":
            target = draw(st.binary(min_size=1, max_size=5000).filter(lambda t: b"\0" not in t))
            entries.append(Entry(path, fmt.S_IFLNK | 0o777, link_target=target[:4095], **common))
        elif kind == "dev":
            rdev = (draw(st.integers(0, 4095)), draw(st.integers(0, (1 << 20) - 1)))
            mode = draw(st.sampled_from([fmt.S_IFCHR, fmt.S_IFBLK])) | 0o600
            entries.append(Entry(path, mode, rdev=rdev, **common))
        elif kind in ("fifo", "sock"):
            mode = fmt.S_IFIFO if kind == "fifo" else fmt.S_IFSOCK
            entries.append(Entry(path, mode | 0o644, **common))
        elif files:
            entries.append(Entry(path, fmt.S_IFREG, hardlink_to=draw(st.sampled_from(files))))
        else:
            used.discard(path)
    return entries, chunk_bytes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), st.sampled_from([0, 100, 4096]), st.sampled_from([512, 1024, 4096]))
def test_writer_reader_round_trip(tree, threshold, block_size):
    entries, chunk_bytes = tree
    builder = Builder(block_size=block_size, chunk_size=CHUNK,
                      inline_threshold=min(threshold, block_size), plain_data=True)
    for entry in entries:
        builder.add(entry)
    out = io.BytesIO()
    info = builder.write(out)
    by_path = {e.path: e for e in entries}
    links: dict[bytes, int] = {}
    for e in entries:
        if e.hardlink_to is not None:
            links[e.hardlink_to] = links.get(e.hardlink_to, 1) + 1

    def device(offset, length):
        """The chunk device: chunk n at n * CHUNK (a read may span adjacent chunks)."""
        out = b""
        while len(out) < length:
            chunk, within = divmod(offset + len(out), CHUNK)
            out += chunk_bytes[chunk][within:within + length - len(out)]
        return out

    with Image(out.getvalue()) as image:
        assert image.root_nid == info.root_nid
        walked = {path: inode for path, inode in image.walk()}
        assert sorted(walked) == sorted(b"/" + e.path for e in entries)
        for e in entries:
            nid = image.resolve(b"/" + e.path)
            assert nid == info.nids[e.path]
            inode = image.inode(nid)
            src = by_path[e.hardlink_to] if e.hardlink_to is not None else e
            assert inode.mode == src.mode
            assert (inode.uid, inode.gid) == (src.uid, src.gid)
            assert (inode.mtime, inode.mtime_nsec) == (src.mtime, src.mtime_nsec)
            assert image.xattrs(nid) == src.xattrs
            kind = stat.S_IFMT(src.mode)
            if kind == fmt.S_IFDIR:
                names = sorted(x.name for x in image.iterdir(nid))
                prefix = e.path + b"/" if e.path else b""
                children = [p for p in by_path if p.startswith(prefix) and p != e.path
                            and b"/" not in p[len(prefix):]]
                assert names == sorted(c[len(prefix):] for c in children)
                subdirs = sum(stat.S_ISDIR(by_path[c].mode) for c in children)
                assert inode.nlink == 2 + subdirs
                for child in children:
                    assert image.lookup(nid, child[len(prefix):]) == info.nids[child]
            else:
                assert inode.nlink == links.get(src.path, 1)
            if kind == fmt.S_IFREG:
                data = src.data
                if isinstance(data, ChunkedData):
                    expected = b"".join(
                        bytes(CHUNK) if c is None else chunk_bytes[c] for c in data.chunks
                    )[:data.size]
                else:
                    expected = data or b""
                assert inode.size == len(expected)
                assert image.read(nid, 0, len(expected) + 10, {1: device}) == expected
            elif kind == fmt.S_IFLNK:
                assert image.readlink(nid) == src.link_target
            elif kind in (fmt.S_IFCHR, fmt.S_IFBLK):
                assert (inode.major, inode.minor) == src.rdev


@settings(max_examples=60, deadline=None)
@given(trees(), st.sampled_from([512, 4096]))
def test_inode_records_never_overlap_and_tails_stay_in_their_block(tree, block_size):
    """Hole filling in the metadata area must not let two records share a byte."""
    entries, _ = tree
    builder = Builder(block_size=block_size, chunk_size=CHUNK, inline_threshold=block_size,
                      plain_data=True)
    for entry in entries:
        builder.add(entry)
    out = io.BytesIO()
    info = builder.write(out)
    records = []
    with Image(out.getvalue()) as image:
        for nid in set(info.nids.values()):
            inode = image.inode(nid)
            end = inode.data_offset
            if inode.layout == fmt.LAYOUT_FLAT_INLINE:
                tail = inode.size - (-(-inode.size // block_size) - 1) * block_size
                assert 0 < tail and (end + tail - 1) // block_size == inode.offset // block_size
                end += tail
            elif inode.layout == fmt.LAYOUT_CHUNK_BASED:
                end = -(-end // 8) * 8 + 8 * -(-inode.size // CHUNK)
            records.append((inode.offset, end))
    records.sort()
    for (_, end), (start, _) in zip(records, records[1:]):
        assert end <= start

