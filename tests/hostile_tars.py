"""Hand-made tar layers: header forms that tar readers disagree on, and hostile ones.

Every block is written here byte by byte (Python's tarfile cannot write most of these). Each
Case says what Go's archive/tar plus containerd's applier make of it: either a tree (path ->
what is there) or a refusal; tests/t1_tar_hostile.py checks the converter against that, and
tests/t5_tar_differential.py checks it against a real containerd.
"""

from __future__ import annotations

import dataclasses

BLOCK = 512


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def base256(value: int, width: int) -> bytes:
    """Go's/GNU's binary number form: two's complement, top bit set."""
    raw = (value % (1 << (8 * width))).to_bytes(width, "big")
    return bytes([raw[0] | 0x80]) + raw[1:]


def header(name: bytes, *, type: bytes = b"0", size: int = 0, mode: int = 0o644, uid: int = 0, gid: int = 0,
           mtime: int = 1600000000, linkname: bytes = b"", magic: bytes = b"ustar\x0000", prefix: bytes = b"",
           size_field: bytes | None = None, fields: dict[int, bytes] | None = None,
           checksum_delta: int = 0) -> bytes:
    """One header block; ``magic`` is the 8 bytes at 257 (ustar\\0 + 00, 'ustar  \\0' for old
    GNU, zeros for V7); ``fields`` overwrite raw bytes at offsets before the checksum."""
    blk = bytearray(BLOCK)

    def put(offset: int, data: bytes) -> None:
        blk[offset:offset + len(data)] = data

    put(0, name[:100])
    put(100, octal(mode, 8))
    put(108, octal(uid, 8))
    put(116, octal(gid, 8))
    put(124, size_field if size_field is not None else octal(size, 12))
    put(136, octal(mtime, 12))
    put(156, type)
    put(157, linkname[:100])
    put(257, magic)
    if magic.startswith(b"ustar"):
        put(265, b"root")
        put(297, b"root")
        put(329, octal(0, 8))
        put(337, octal(0, 8))
    put(345, prefix)
    for offset, data in (fields or {}).items():
        put(offset, data)
    blk[148:156] = b" " * 8
    put(148, b"%06o\0 " % ((sum(blk) + checksum_delta) % (1 << 18)))
    return bytes(blk)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def entry(name: bytes, data: bytes = b"", **kw) -> bytes:
    kw.setdefault("size", len(data))
    return header(name, **kw) + padded(data)


def pax_records(records: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        while len(str(n).encode()) + len(body) != n:
            n += 1
        out += str(n).encode() + body
    return out


def pax(records: list[tuple[bytes, bytes]] | bytes, *, type: bytes = b"x", name: bytes = b"PaxHeader") -> bytes:
    body = records if isinstance(records, bytes) else pax_records(records)
    return entry(name, body, type=type)


def gnu_long(value: bytes, *, type: bytes = b"L") -> bytes:
    return entry(b"././@LongLink", value + b"\0", type=type, magic=b"ustar  \0")


END = bytes(2 * BLOCK)


def reg(name: bytes, data: bytes, **kw) -> bytes:
    return entry(name, data, **kw)


def directory(name: bytes, **kw) -> bytes:
    kw.setdefault("mode", 0o755)
    return header(name, type=b"5", **kw)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tar: bytes
    # path -> ("file", content) | ("dir",) | ("symlink", target); None = the layer is refused
    tree: dict[str, tuple] | None
    refusal: str = ""  # a piece of lazyfs's error message, for a refused layer
    why: str = ""
    # a refusal where containerd unpacks something: lazyfs is stricter on purpose
    stricter: bool = False


def cases() -> list[Case]:
    benign, hostile = b"benign\n", b"hostile\n"
    out = [
        Case("negative-size-base256",
             reg(b"a", b"x") + header(b"b", size_field=base256(-512, 12)) + END, None, "negative size",
             "a size field of -512 in base-256: Go refuses a negative size"),
        Case("negative-size-directory",
             header(b"d", type=b"5", mode=0o755, size_field=base256(-512, 12)) + reg(b"d/f", benign) + END,
             {"d": ("dir",), "d/f": ("file", benign)}, why="a directory's size is never used, even negative"),
        Case("pax-size-2^62",
             pax([(b"size", str(1 << 62).encode())]) + reg(b"a", b"x" * 100) + END, None, "truncated",
             "a PAX size of 2**62: the data is missing, Go fails reading it"),
        Case("pax-all-digits",
             pax(b"9" * 4000) + reg(b"a", benign) + END, None, "PAX record",
             "a PAX body without a space: malformed (Python's tarfile took quadratic time)"),
        Case("pax-huge-record",
             entry(b"PaxHeader", b"3 a=" + b"y" * (MAX_SPECIAL + 10), type=b"x") + reg(b"a", benign) + END,
             None, "header field too long", "a PAX record set over 1 MiB: Go's ErrFieldTooLong"),
        Case("gnu-huge-long-name",
             gnu_long(b"n" * (MAX_SPECIAL + 10)) + reg(b"a", benign) + END,
             None, "header field too long", "a GNU long name over 1 MiB"),
        Case("deep-path",
             pax([(b"path", b"a/" * 30000 + b"f")]) + reg(b"short", benign) + END, None, "file name too long",
             "30,000 path components: containerd fails with ENAMETOOLONG"),
        Case("long-component",
             pax([(b"path", b"d/" + b"c" * 300)]) + reg(b"short", benign) + END, None, "file name too long",
             "a 300-byte name component: ENAMETOOLONG"),
        Case("v7-with-prefix",
             reg(b"bin/sh", benign) + reg(b"sh", hostile, magic=bytes(8), prefix=b"bin") + END,
             {"bin": ("dir",), "bin/sh": ("file", benign), "sh": ("file", hostile)},
             why="a V7 header has no prefix field: Go reads 'sh', Python's tarfile read 'bin/sh'"),
        Case("old-gnu-octal-prefix",
             reg(b"bin/sh", benign) + reg(b"sh", hostile, magic=b"ustar  \0", prefix=b"0000") + END,
             {"bin": ("dir",), "bin/sh": ("file", benign), "sh": ("file", hostile)},
             why="old GNU: the prefix bytes are its atime field, which parses: no prefix"),
        Case("old-gnu-text-prefix",
             reg(b"bin/sh", benign) + reg(b"sh", hostile, magic=b"ustar  \0", prefix=b"bin") + END,
             {"bin": ("dir",), "bin/sh": ("file", hostile)},
             why="old GNU whose atime does not parse: Go falls back to the prefix (its pre-1.8 writer bug)"),
        Case("pax-path-then-gnu-long-name",
             pax([(b"path", b"pax-name")]) + gnu_long(b"gnu-name") + reg(b"short", benign) + END,
             {"gnu-name": ("file", benign)}, why="Go applies the GNU long name after the PAX path"),
        Case("gnu-long-name-then-pax-path",
             gnu_long(b"gnu-name") + pax([(b"path", b"pax-name")]) + reg(b"short", benign) + END,
             {"gnu-name": ("file", benign)}, why="the GNU long name wins in either order"),
        Case("two-pax-headers",
             pax([(b"path", b"first")]) + pax([(b"uid", b"7")]) + reg(b"short", benign) + END,
             {"short": ("file", benign)}, why="a second PAX header replaces the first, it does not merge"),
        Case("pax-empty-path",
             pax([(b"path", b"")]) + reg(b"kept", benign) + END,
             {"kept": ("file", benign)}, why="an empty PAX value keeps the header's field"),
        Case("global-pax-path",
             pax([(b"path", b"evil")], type=b"g", name=b"pax_global_header") + reg(b"good", benign) + END,
             {"good": ("file", benign)}, why="global records apply to no other entry"),
        Case("global-pax-removes-its-path",
             reg(b"x", benign) + pax([(b"path", b"x")], type=b"g") + reg(b"y", benign) + END,
             {"y": ("file", benign)}, why="containerd removes whatever is at a global header's path"),
        Case("global-pax-plain",
             pax([(b"comment", b"made by git")], type=b"g", name=b"pax_global_header") + reg(b"a", benign) + END,
             {"a": ("file", benign)}, why="git archive's global header"),
        Case("bad-checksum-mid-archive",
             reg(b"a", benign) + entry(b"b", benign, checksum_delta=1) + reg(b"c", benign) + END,
             None, "bad checksum", "Go refuses; Python's tarfile took it for the end of the archive"),
        Case("signed-checksum",
             reg(b"caf\xe9", benign, checksum_delta=-256 * 1) + END,
             {"caf\udce9": ("file", benign)}, why="Go accepts the signed-byte checksum too"),
        Case("contiguous-file",
             reg(b"a", benign, type=b"7") + END, None, "contiguous file",
             "typeflag 7: Go returns it as is, containerd refuses the type"),
        Case("unknown-type",
             reg(b"a", benign, type=b"Z") + END, None, "unsupported tar entry type", "containerd refuses"),
        Case("gnu-volume-header",
             header(b"vol", type=b"V", magic=b"ustar  \0") + reg(b"a", benign) + END, None,
             "unsupported tar entry type", "containerd refuses"),
        Case("old-gnu-sparse",
             header(b"s", type=b"S", magic=b"ustar  \0", size=0, fields={483: octal(10, 12)}) + END, None,
             "old GNU sparse", "Go returns type 'S', which containerd refuses"),
        Case("zero-block-then-header",
             reg(b"a", benign) + bytes(BLOCK) + reg(b"b", benign) + END, None, "after a zero block",
             "one zero block and then a header: Go refuses"),
        Case("no-end-blocks",
             reg(b"a", benign), {"a": ("file", benign)}, why="the end of input at a header boundary ends it"),
        Case("v7-directory-slash",
             header(b"olddir/", type=b"\0", magic=bytes(8)) + reg(b"olddir/f", benign, magic=bytes(8)) + END,
             {"olddir": ("dir",), "olddir/f": ("file", benign)}, why="a NUL type with a trailing slash is a directory"),
        Case("directory-data-is-a-header",
             header(b"d", type=b"5", mode=0o755, size=BLOCK) + reg(b"smuggled", hostile) + END,
             {"d": ("dir",), "smuggled": ("file", hostile)},
             why="a directory's size is ignored: the next block is a header"),
        Case("bad-octal-mode",
             reg(b"a", benign, fields={100: b"0000x44\0"}) + END, None, "bad octal",
             "a number that is not octal: invalid header"),
        Case("bad-pax-uid",
             pax([(b"uid", b"12ab")]) + reg(b"a", benign) + END, None, "bad PAX uid", "Go's ParseInt fails"),
        Case("nul-in-name",
             reg(b"good\0evil", benign) + END, {"good": ("file", benign)}, why="names end at a NUL"),
        Case("pax-linkpath-symlink",
             pax([(b"linkpath", b"target/" + b"t" * 200)]) + header(b"ln", type=b"2", linkname=b"short") + END,
             {"ln": ("symlink", b"target/" + b"t" * 200)}, why="PAX linkpath over the header's"),
        Case("pax-nul-in-path",
             pax(pax_records([(b"path", b"a\0b")])) + reg(b"a", benign) + END, None, "NUL",
             "Go refuses a NUL in a PAX path"),
        Case("truncated-data",
             header(b"a", size=5000) + b"x" * 600, None, "truncated", "data cut short"),
        Case("truncated-header",
             reg(b"a", benign) + header(b"b")[:300], None, "header block", "a header cut short"),
        Case("base256-uid",
             reg(b"a", benign, fields={108: base256(1000, 8)}) + END, {"a": ("file", benign)},
             why="base-256 numbers are fine"),
    ]
    return out


MAX_SPECIAL = 1 << 20
