"""A strict reader of layer tars that decides every header form as containerd's unpacker does.

containerd applies a layer with Go's archive/tar reader; when Python's tarfile reads the same
bytes differently (a prefix field in a V7 header, a PAX path before a GNU long name, a global
PAX record, a bad checksum it takes for the end of the archive), a converted layer would show
other files than a stock pull. So this reader follows Go's rules (archive/tar reader.go,
format.go, strconv.go, Go 1.19, which containerd 1.6 is built with) block by block, and where
Go errors it raises LayerFormatError:

* a header block must carry a valid checksum (unsigned or signed sum); its magic decides the
  format: ``ustar\\0`` (USTAR/PAX, with a prefix field), ``ustar\\0`` + ``tar\\0`` trailer
  (STAR), ``ustar `` + `` \\0`` (old GNU: no prefix field, unless its atime/ctime fields do
  not parse, the pre-Go-1.8 writer bug), anything else V7 (no prefix, uname or device numbers);
* numbers are octal (NUL/space trimmed) or base-256; anything else is an invalid header;
* ``x`` records apply to the next entry only and replace, not merge with, earlier ``x``
  records; ``L``/``K`` long names win over PAX path/linkpath; an empty PAX value keeps the
  header's field; ``g`` (global) records never apply to other entries: Go returns the ``g``
  header itself as an entry whose name is its own (or its PAX path) and that creates nothing;
* a PAX record set or a GNU long name of more than 1 MiB is refused (Go's "header field too
  long"), and so are a negative size, a malformed PAX record and a zero block followed by a
  non-zero one; end of input at a header boundary (or after one zero block) ends the archive;
* PAX sparse files (GNU formats 0.0, 0.1 and 1.0) are expanded; the stored data must match
  the map exactly.

Everything is read once, in order, in linear time; what is held per entry is bounded by the
1 MiB record limit. Which entry types an applier accepts is the builder's business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import BinaryIO

from lazyfs.layer.errors import LayerFormatError

BLOCK = 512
MAX_SPECIAL_FILE = 1 << 20  # PAX records, a GNU long name or link, a sparse 1.0 map (Go's limit)
SKIP_PIECE = 1 << 20

REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
XHDTYPE, XGLTYPE, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
HEADER_ONLY = frozenset((LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE))  # data size ignored

_V7, _USTAR, _STAR, _GNU = "v7", "ustar", "star", "gnu"
_ZERO_BLOCK = bytes(BLOCK)
_OCTAL_DIGITS = frozenset(b"01234567")
_DECIMAL_DIGITS = frozenset(b"0123456789")
_INT64_MAX = (1 << 63) - 1


class TarHeaderError(LayerFormatError):
    """The tar stream is not one Go's archive/tar (and so containerd) would read."""


@dataclasses.dataclass
class Member:
    """One entry as Go's reader returns it (after extended headers are applied)."""

    name: bytes
    linkname: bytes
    type: bytes  # one byte; a V7 regular file (NUL) is already REGTYPE or DIRTYPE
    mode: int
    uid: int
    gid: int
    size: int  # logical content size (expanded, for a sparse file)
    mtime: int
    mtime_nsec: int
    devmajor: int
    devminor: int
    uname: bytes
    gname: bytes
    pax: dict[bytes, bytes]
    offset: int  # input offset of its first header block (extended headers included)
    offset_data: int  # input offset of its stored content (after a sparse 1.0 map)
    stored: int  # bytes of stored content from offset_data
    end: int  # input offset just after its content's padding (the next header)
    sparse: list[tuple[int, int]] | None = None  # data fragments (offset, length), sorted

    @property
    def where(self) -> str:
        return self.name.decode("utf-8", "replace")

    def isreg(self) -> bool:
        return self.type == REGTYPE

    def isdir(self) -> bool:
        return self.type == DIRTYPE

    def islnk(self) -> bool:
        return self.type == LNKTYPE


# -- numbers and strings, as Go parses them ---------------------------------------------------

def _cstring(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def go_parse_int(s: bytes) -> int | None:
    """strconv.ParseInt(s, 10, 64): an optional sign and decimal digits, in int64 range."""
    digits = s[1:] if s[:1] in (b"+", b"-") else s
    if not digits or not _DECIMAL_DIGITS.issuperset(digits):
        return None
    digits = digits.lstrip(b"0") or b"0"
    if len(digits) > 19:  # bounded work whatever the length; such a value overflows anyway
        return None
    value = int(digits)
    if s[:1] == b"-":
        value = -value
    if not -(1 << 63) <= value <= _INT64_MAX:
        return None
    return value


def _octal(b: bytes) -> int:
    """Go's parseOctal: NUL/space trimmed, cut at a NUL, base 8, empty is 0."""
    b = b.strip(b" \0")
    if not b:
        return 0
    b = _cstring(b)
    if not b or not _OCTAL_DIGITS.issuperset(b):
        raise TarHeaderError("invalid tar header (bad octal number)")
    value = int(b, 8)
    if value >> 64:
        raise TarHeaderError("invalid tar header (number out of range)")
    return value - (1 << 64) if value >> 63 else value


def _numeric(b: bytes) -> int:
    """Go's parseNumeric: base-256 two's complement when the top bit is set, else octal."""
    if b and b[0] & 0x80:
        negative = bool(b[0] & 0x40)
        raw = bytes([b[0] & 0x7F ^ (0x7F if negative else 0)]) + (bytes(c ^ 0xFF for c in b[1:]) if negative else b[1:])
        x = int.from_bytes(raw, "big")
        # Go refuses when the value does not fit 63 bits (checked byte by byte, same outcome).
        if x >> 63:
            raise TarHeaderError("invalid tar header (base-256 number out of range)")
        return ~x if negative else x
    return _octal(b)


def _pax_time(v: bytes) -> tuple[int, int]:
    """Go's parsePAXTime: seconds[.fraction], the fraction truncated to nanoseconds."""
    whole, dot, frac = v.partition(b".")
    seconds = go_parse_int(whole)
    if seconds is None:
        raise TarHeaderError(f"invalid tar header (bad PAX time {v[:40]!r})")
    if not dot or not frac:
        return seconds, 0
    if not _DECIMAL_DIGITS.issuperset(frac):
        raise TarHeaderError(f"invalid tar header (bad PAX time {v[:40]!r})")
    nsec = int((frac + b"000000000")[:9])
    if whole.startswith(b"-"):  # Go: time.Unix(secs, -nsecs)
        return seconds - (1 if nsec else 0), (1_000_000_000 - nsec) % 1_000_000_000
    return seconds, nsec


# -- header blocks ------------------------------------------------------------------------------

def _block_format(blk: bytes) -> str | None:
    """The format a header block claims, or None when its checksum is wrong (Go: getFormat)."""
    try:
        value = _octal(blk[148:156])
    except TarHeaderError:
        return None
    unsigned = sum(blk) - sum(blk[148:156]) + 8 * 0x20
    signed = unsigned - 256 * sum(1 for c in blk[:148] + blk[156:] if c & 0x80)
    if value not in (unsigned, signed):
        return None
    magic, version, trailer = blk[257:263], blk[263:265], blk[508:512]
    if magic == b"ustar\0":
        return _STAR if trailer == b"tar\0" else _USTAR
    if magic == b"ustar " and version == b" \0":
        return _GNU
    return _V7


@dataclasses.dataclass
class _Raw:
    type: bytes
    name: bytes
    linkname: bytes
    size: int
    mode: int
    uid: int
    gid: int
    mtime: int
    uname: bytes = b""
    gname: bytes = b""
    devmajor: int = 0
    devminor: int = 0


def _parse_block(blk: bytes) -> _Raw:
    form = _block_format(blk)
    if form is None:
        raise TarHeaderError("invalid tar header (bad checksum)")
    h = _Raw(
        type=blk[156:157], name=_cstring(blk[0:100]), linkname=_cstring(blk[157:257]),
        size=_numeric(blk[124:136]), mode=_numeric(blk[100:108]), uid=_numeric(blk[108:116]),
        gid=_numeric(blk[116:124]), mtime=_numeric(blk[136:148]),
    )
    if form == _V7:
        return h
    h.uname, h.gname = _cstring(blk[265:297]), _cstring(blk[297:329])
    h.devmajor, h.devminor = _numeric(blk[329:337]), _numeric(blk[337:345])
    prefix = b""
    if form == _USTAR:
        prefix = _cstring(blk[345:500])
    elif form == _STAR:
        prefix = _cstring(blk[345:476])
        _numeric(blk[476:488]), _numeric(blk[488:500])  # atime, ctime: must parse
    else:  # old GNU: atime and ctime where USTAR has its prefix
        try:
            for field in (blk[345:357], blk[357:369]):
                if field[0] != 0:
                    _numeric(field)
        except TarHeaderError:
            # Go reads a pre-Go-1.8 writer's prefix here, if it is ASCII.
            candidate = _cstring(blk[345:500])
            if all(c < 0x80 for c in candidate):
                prefix = candidate
    if prefix:
        h.name = prefix + b"/" + h.name
    return h


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records (Go's parsePAX): "LEN KEY=VALUE\\n" each; GNU sparse 0.0 offset/numbytes
    pairs are joined into GNU.sparse.map."""
    records: dict[bytes, bytes] = {}
    sparse: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        space = data.find(b" ", pos)
        n = go_parse_int(data[pos:space]) if space >= 0 else None
        if n is None or n < 5 or n > end - pos:
            raise TarHeaderError("invalid tar header (malformed PAX record length)")
        rest = space + 1
        stop = pos + n  # one past the record's newline
        if stop <= rest or data[stop - 1:stop] != b"\n":
            raise TarHeaderError("invalid tar header (PAX record not ended by a newline)")
        key, eq, value = data[rest:stop - 1].partition(b"=")
        if not eq or not key:
            raise TarHeaderError("invalid tar header (PAX record without a key)")
        if key in (b"path", b"linkpath", b"uname", b"gname"):
            if b"\0" in value:
                raise TarHeaderError("invalid tar header (NUL in a PAX name)")
        elif b"\0" in key:
            raise TarHeaderError("invalid tar header (NUL in a PAX key)")
        pos = stop
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            want = b"GNU.sparse.offset" if len(sparse) % 2 == 0 else b"GNU.sparse.numbytes"
            if key != want or b"," in value:
                raise TarHeaderError("invalid tar header (GNU sparse 0.0 records out of order)")
            sparse.append(value)
        else:
            records[key] = value
    if sparse:
        records[b"GNU.sparse.map"] = b",".join(sparse)
    return records


def _merge_pax(h: _Raw, records: dict[bytes, bytes]) -> int:
    """Go's mergePAX: non-empty records override the header; the mtime's nanoseconds."""
    nsec = 0
    for key, value in records.items():
        if not value:
            continue  # an empty record keeps the header's value
        if key == b"path":
            h.name = value
        elif key == b"linkpath":
            h.linkname = value
        elif key == b"uname":
            h.uname = value
        elif key == b"gname":
            h.gname = value
        elif key in (b"uid", b"gid", b"size"):
            number = go_parse_int(value)
            if number is None:
                raise TarHeaderError(f"invalid tar header (bad PAX {key.decode()} {value[:40]!r})")
            setattr(h, key.decode(), number)
        elif key in (b"atime", b"ctime"):
            _pax_time(value)
        elif key == b"mtime":
            h.mtime, nsec = _pax_time(value)
    return nsec


def _sparse_0x(records: dict[bytes, bytes]) -> list[tuple[int, int]]:
    count = go_parse_int(records.get(b"GNU.sparse.numblocks", b""))
    if count is None or count < 0:
        raise TarHeaderError("invalid tar header (bad GNU.sparse.numblocks)")
    text = records.get(b"GNU.sparse.map", b"")
    fields = text.split(b",") if text else []
    if len(fields) != 2 * count:
        raise TarHeaderError("invalid tar header (GNU sparse map does not match numblocks)")
    return _pairs(fields)


def _pairs(fields: list[bytes]) -> list[tuple[int, int]]:
    out = []
    for i in range(0, len(fields), 2):
        offset, length = go_parse_int(fields[i]), go_parse_int(fields[i + 1])
        if offset is None or length is None:
            raise TarHeaderError("invalid tar header (bad GNU sparse map entry)")
        out.append((offset, length))
    return out


def _valid_sparse(fragments: list[tuple[int, int]], size: int) -> bool:
    """Go's validateSparseEntries: non-negative, in order, not overlapping, within size."""
    if size < 0:
        return False
    previous_end = 0
    for offset, length in fragments:
        if offset < 0 or length < 0 or offset > _INT64_MAX - length or offset + length > size:
            return False
        if previous_end > offset:
            return False
        previous_end = offset + length
    return True


# -- the reader -----------------------------------------------------------------------------------

class TarReader:
    """Reads members one by one from a sequential stream; read() gives the current member's
    content (sparse files expanded). Skipped bytes are read, not seeked over, unless src can
    seek, so a tap below sees every byte."""

    def __init__(self, src: BinaryIO, *, seekable_size: int | None = None,
                 check: Callable[[], None] | None = None):
        self._src = src
        self._check = check or (lambda: None)  # called between pieces of work; may raise
        self._size = seekable_size  # with it, data is skipped by seeking (src is a file)
        self.position = 0  # input offset of the next unread byte
        self._left = 0  # stored bytes of the current member not read yet
        self._pad = 0
        self._fragments: list[tuple[int, int]] | None = None
        self._expanded: SparseExpander | None = None
        self._left_after_map = 0
        self.done = False
        self.entries_end = 0  # where the end-of-archive blocks (or the end of input) begin

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._src.read(n)
        while len(data) < n:
            more = self._src.read(n - len(data))
            if not more:
                raise TarHeaderError(f"tar stream truncated inside {what} (at offset {self.position + len(data)})")
            data += more
        self.position += n
        return data

    def _skip(self, n: int, *, tolerate_eof: bool = False) -> None:
        if n <= 0:
            return
        if self._size is not None and not tolerate_eof:
            if self.position + n > self._size:
                raise TarHeaderError(f"tar stream truncated inside an entry's data (at offset {self._size})")
            self._src.seek(n, 1)
            self.position += n
            return
        while n > 0:
            self._check()
            data = self._src.read(min(n, SKIP_PIECE))
            if not data:
                if tolerate_eof:
                    return
                raise TarHeaderError(f"tar stream truncated inside an entry's data (at offset {self.position})")
            n -= len(data)
            self.position += len(data)

    def _block(self) -> bytes | None:
        """The next 512-byte block; None at a clean end of input (nothing read)."""
        data = self._src.read(BLOCK)
        while 0 < len(data) < BLOCK:
            more = self._src.read(BLOCK - len(data))
            if not more:
                raise TarHeaderError(f"tar stream truncated inside a header block (at offset {self.position})")
            data += more
        if not data:
            return None
        self.position += BLOCK
        return data

    def _special(self, size: int, what: str) -> bytes:
        if size > MAX_SPECIAL_FILE:
            raise TarHeaderError(f"{what} of {size} bytes: header field too long (limit {MAX_SPECIAL_FILE})")
        data = self._read_exact(size, what)
        self._skip(-size % BLOCK, tolerate_eof=True)
        return data

    def next(self) -> Member | None:
        """The next entry, or None at the end of the archive."""
        if self.done:
            return None
        self._check()
        self._skip(self._left)
        self._skip(self._pad, tolerate_eof=True)
        self._left = self._pad = 0
        self._fragments = None
        pax: dict[bytes, bytes] | None = None
        long_name = long_link = b""
        start = self.position
        while True:
            blk = self._block()
            if blk is None:
                self.done, self.entries_end = True, start
                return None
            if blk == _ZERO_BLOCK:
                second = self._block()
                if second is None or second == _ZERO_BLOCK:
                    self.done, self.entries_end = True, start
                    return None
                raise TarHeaderError(f"invalid tar header at offset {self.position - BLOCK} (after a zero block)")
            try:
                h = _parse_block(blk)
            except TarHeaderError as e:
                raise TarHeaderError(f"{e} at offset {self.position - BLOCK}") from None
            stored = 0 if h.type in HEADER_ONLY else h.size
            if stored < 0:
                raise TarHeaderError(f"invalid tar header at offset {self.position - BLOCK} (negative size)")
            if h.type in (XHDTYPE, XGLTYPE):
                pax = parse_pax(self._special(stored, "a PAX header"))
                if h.type == XGLTYPE:
                    # Go returns the global header as an entry and applies its records to
                    # nothing else. Its path record names it (mergePAX, whose error Go ignores,
                    # in random map order: refuse records whose outcome would depend on it).
                    try:
                        nsec = _merge_pax(h, pax)
                    except TarHeaderError as e:
                        raise TarHeaderError(f"global PAX header at offset {start}: {e}") from None
                    return self._member(h, pax, start, nsec, stored=0)
                continue
            if h.type in (GNU_LONGNAME, GNU_LONGLINK):
                value = _cstring(self._special(stored, "a GNU long name"))
                if h.type == GNU_LONGNAME:
                    long_name = value
                else:
                    long_link = value
                continue
            nsec = _merge_pax(h, pax or {}) if pax else 0
            if long_name:
                h.name = long_name
            if long_link:
                h.linkname = long_link
            if h.type == AREGTYPE:
                h.type = DIRTYPE if h.name.endswith(b"/") else REGTYPE
            stored = 0 if h.type in HEADER_ONLY else h.size
            if stored < 0:
                raise TarHeaderError(f"invalid tar header at offset {start} (negative size)")
            return self._member(h, pax or {}, start, nsec, stored)

    def _member(self, h: _Raw, pax: dict[bytes, bytes], start: int, nsec: int, stored: int) -> Member:
        fragments = None
        if h.type == GNU_SPARSE:
            raise TarHeaderError(f"tar entry {h.name.decode('utf-8', 'replace')!r}: old GNU sparse "
                                 "file (containerd refuses type 'S')")
        if h.type != XGLTYPE:
            fragments = self._pax_sparse(h, pax)
        if fragments is not None:
            if h.type in HEADER_ONLY or not _valid_sparse(fragments, h.size):
                raise TarHeaderError(f"invalid tar header at offset {start} (bad sparse map)")
            # the stored data left after a 1.0 map (read from the data) must be the fragments
            stored = self._left_after_map
            if sum(length for _, length in fragments) != stored:
                raise TarHeaderError(f"tar entry {h.name.decode('utf-8', 'replace')!r}: sparse data "
                                     "does not match its map")
        offset_data = self.position
        self._left = stored
        self._pad = -stored % BLOCK  # a 1.0 map is whole blocks: same padding as the whole data
        self._fragments = fragments
        if fragments is not None:
            self._expanded = SparseExpander(self._read_stored, fragments, h.size)
        return Member(
            name=h.name, linkname=h.linkname, type=h.type, mode=h.mode, uid=h.uid, gid=h.gid,
            size=h.size if h.type not in HEADER_ONLY else 0, mtime=h.mtime, mtime_nsec=nsec,
            devmajor=h.devmajor, devminor=h.devminor, uname=h.uname, gname=h.gname, pax=pax,
            offset=start, offset_data=offset_data, stored=stored,
            end=offset_data + stored + self._pad, sparse=fragments,
        )

    def _pax_sparse(self, h: _Raw, pax: dict[bytes, bytes]) -> list[tuple[int, int]] | None:
        """Go's readGNUSparsePAXHeaders; sets h.size to the logical size."""
        self._left_after_map = 0 if h.type in HEADER_ONLY else h.size
        major, minor = pax.get(b"GNU.sparse.major", b""), pax.get(b"GNU.sparse.minor", b"")
        if major == b"0" and minor in (b"0", b"1"):
            v1 = False
        elif major == b"1" and minor == b"0":
            v1 = True
        elif major or minor:
            return None  # an unknown sparse version: Go reads a plain file
        elif pax.get(b"GNU.sparse.map"):
            v1 = False
        else:
            return None
        name = pax.get(b"GNU.sparse.name")
        if name:
            h.name = name
        size = pax.get(b"GNU.sparse.size") or pax.get(b"GNU.sparse.realsize")
        stored = self._left_after_map
        if size:
            n = go_parse_int(size)
            if n is None:
                raise TarHeaderError("invalid tar header (bad GNU sparse size)")
            h.size = n
        if not v1:
            return _sparse_0x(pax)
        return self._sparse_1x0(stored)

    def _sparse_1x0(self, stored: int) -> list[tuple[int, int]]:
        """The 1.0 map at the start of the data: newline-ended decimal numbers, count first,
        in whole blocks."""
        text = bytearray()
        newlines = 0
        need = 1
        count = None
        while True:
            while newlines < need:
                if len(text) + BLOCK > stored:
                    raise TarHeaderError("tar stream truncated inside a GNU sparse map")
                if len(text) + BLOCK > MAX_SPECIAL_FILE:
                    raise TarHeaderError(f"GNU sparse map longer than {MAX_SPECIAL_FILE} bytes")
                blk = self._read_exact(BLOCK, "a GNU sparse map")
                text += blk
                newlines += blk.count(b"\n")
            if count is None:
                count = go_parse_int(bytes(text[: text.index(b"\n")]))
                if count is None or count < 0:
                    raise TarHeaderError("invalid tar header (bad GNU sparse map count)")
                need = 1 + 2 * count
                continue
            break
        tokens = bytes(text).split(b"\n")[1 : 1 + 2 * count]
        self._left_after_map = stored - len(text)
        return _pairs(tokens)

    def _read_stored(self, n: int) -> bytes:
        data = self._read_exact(n, "sparse file data")
        self._left -= n
        return data

    def read(self, n: int) -> bytes:
        """Up to n bytes of the current member's content (holes of a sparse file as zeros)."""
        if self._fragments is None:
            n = min(n, self._left)
            if n <= 0:
                return b""
            data = self._src.read(n)
            while len(data) < n:
                more = self._src.read(n - len(data))
                if not more:
                    break
                data += more
            self._left -= len(data)
            self.position += len(data)
            return data
        return self._expanded.read(n)


class SparseExpander:
    """The logical content of a sparse file from its stored fragments, read in order."""

    def __init__(self, read_stored, fragments: list[tuple[int, int]], size: int):
        self._read_stored = read_stored
        self._fragments = fragments
        self._size = size
        self._pos = 0
        self._i = 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        n = min(n, self._size - self._pos)
        frags = self._fragments
        while len(out) < n:
            while self._i < len(frags) and sum(frags[self._i]) <= self._pos:
                self._i += 1
            if self._i == len(frags) or self._pos < frags[self._i][0]:
                hole_end = self._size if self._i == len(frags) else frags[self._i][0]
                take = min(n - len(out), hole_end - self._pos)
                out += bytes(take)
            else:
                take = min(n - len(out), sum(frags[self._i]) - self._pos)
                data = self._read_stored(take)
                if len(data) != take:
                    raise TarHeaderError("tar stream truncated inside sparse file data")
                out += data
            self._pos += take
        return bytes(out)
