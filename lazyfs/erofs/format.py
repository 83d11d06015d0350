"""EROFS on-disk structures, as the Linux kernel defines them in fs/erofs/erofs_fs.h.

Everything is little-endian. This module holds only layouts and constants shared by the
reader and the writer; it performs no I/O.
"""

from __future__ import annotations

import struct

import google_crc32c

SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
SUPER_SIZE = 128

FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4

FEATURE_INCOMPAT_ZERO_PADDING = 0x1
FEATURE_INCOMPAT_COMPR_CFGS = 0x2  # == BIG_PCLUSTER
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8  # == COMPR_HEAD2
FEATURE_INCOMPAT_ZTAILPACKING = 0x10
FEATURE_INCOMPAT_FRAGMENTS = 0x20  # == DEDUPE
FEATURE_INCOMPAT_XATTR_PREFIXES = 0x40

# Incompatible features lazyfs understands. Compression-related bits are accepted in the
# superblock (mkfs.erofs may set ZERO_PADDING on uncompressed images); compressed inodes
# themselves are refused when met.
SUPPORTED_INCOMPAT = (
    FEATURE_INCOMPAT_ZERO_PADDING
    | FEATURE_INCOMPAT_COMPR_CFGS
    | FEATURE_INCOMPAT_CHUNKED_FILE
    | FEATURE_INCOMPAT_DEVICE_TABLE
    | FEATURE_INCOMPAT_ZTAILPACKING
    | FEATURE_INCOMPAT_FRAGMENTS
    | FEATURE_INCOMPAT_XATTR_PREFIXES
)

# struct erofs_super_block (128 bytes at SUPER_OFFSET)
#   magic u32, checksum u32, feature_compat u32, blkszbits u8, sb_extslots u8, root_nid u16,
#   inos u64, build_time u64, build_time_nsec u32, blocks u32, meta_blkaddr u32,
#   xattr_blkaddr u32, uuid 16s, volume_name 16s, feature_incompat u32, u1 u16,
#   extra_devices u16, devt_slotoff u16, dirblkbits u8, xattr_prefix_count u8,
#   xattr_prefix_start u32, packed_nid u64, xattr_filter_reserved u8, reserved2 23s
SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
assert SUPER.size == SUPER_SIZE
SUPER_CHECKSUM_OFFSET = 4  # within the superblock

# struct erofs_deviceslot (128 bytes): tag 64s, blocks u32, mapped_blkaddr u32, reserved 56s
DEVICE_SLOT = struct.Struct("<64sII56s")
DEVICE_SLOT_SIZE = 128

# Inode layouts. The 4-byte i_u union is read raw and interpreted per file type / layout.
# compact (32 bytes): i_format u16, i_xattr_icount u16, i_mode u16, i_nlink u16, i_size u32,
#   i_reserved u32, i_u u32, i_ino u32, i_uid u16, i_gid u16, i_reserved2 u32
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
# extended (64 bytes): i_format u16, i_xattr_icount u16, i_mode u16, i_reserved u16,
#   i_size u64, i_u u32, i_ino u32, i_uid u32, i_gid u32, i_mtime u64, i_mtime_nsec u32,
#   i_nlink u32, i_reserved2 16s
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")
assert INODE_COMPACT.size == 32 and INODE_EXTENDED.size == 64
INODE_SLOT_SIZE = 32  # nid = (inode offset - meta_blkaddr * block size) / 32

INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1
I_VERSION_MASK = 0x1
I_DATALAYOUT_BIT = 1
I_DATALAYOUT_MASK = 0x7
I_ALL = 0xF  # bits above this in i_format must be zero

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4
LAYOUT_NAMES = {
    LAYOUT_FLAT_PLAIN: "FLAT_PLAIN",
    LAYOUT_COMPRESSED_FULL: "COMPRESSED_FULL",
    LAYOUT_FLAT_INLINE: "FLAT_INLINE",
    LAYOUT_COMPRESSED_COMPACT: "COMPRESSED_COMPACT",
    LAYOUT_CHUNK_BASED: "CHUNK_BASED",
}

# Chunk info, in the low 16 bits of i_u for CHUNK_BASED inodes.
CHUNK_FORMAT_BLKBITS_MASK = 0x1F  # chunk size = block size << this
CHUNK_FORMAT_INDEXES = 0x20  # 8-byte chunk indexes, else a 4-byte block map
CHUNK_FORMAT_ALL = CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES
NULL_ADDR = 0xFFFFFFFF  # a hole chunk (EROFS_NULL_ADDR == -1 as u32)
BLOCK_MAP_ENTRY = struct.Struct("<I")
# struct erofs_inode_chunk_index (8 bytes): advise u16, device_id u16, blkaddr u32
CHUNK_INDEX = struct.Struct("<HHI")

# Inline xattrs: erofs_xattr_ibody_header (12 bytes): h_name_filter u32,
#   h_shared_count u8, h_reserved2 7s; followed by h_shared_count u32 shared-xattr ids.
XATTR_IBODY_HEADER = struct.Struct("<IB7s")
# erofs_xattr_entry (4 bytes): e_name_len u8, e_name_index u8, e_value_size u16
XATTR_ENTRY = struct.Struct("<BBH")
XATTR_LONG_PREFIX = 0x80
XATTR_LONG_PREFIX_MASK = 0x7F
XATTR_FILTER_SEED = 0x25BBE08F

XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6
# Name prefixes by index. The ACL indexes carry the whole name: the entry's own name is empty.
XATTR_PREFIXES = {
    XATTR_INDEX_USER: b"user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    XATTR_INDEX_TRUSTED: b"trusted.",
    XATTR_INDEX_LUSTRE: b"lustre.",
    XATTR_INDEX_SECURITY: b"security.",
}


def xattr_ibody_size(icount: int) -> int:
    """Bytes of inline xattr area for an inode's i_xattr_icount."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + 4 * (icount - 1)


def xattr_entry_size(name_len: int, value_size: int) -> int:
    """An xattr entry with its name and value, padded to 4 bytes."""
    return (XATTR_ENTRY.size + name_len + value_size + 3) & ~3


# struct erofs_dirent (12 bytes): nid u64, nameoff u16, file_type u8, reserved u8
DIRENT = struct.Struct("<QHBB")
NAME_LEN_MAX = 255

# Directory entry file types (the generic FT_* values).
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

# stat(2) S_IFMT values, repeated here so the format module does not depend on the host's.
S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000

FT_FROM_MODE = {
    S_IFREG: FT_REG_FILE,
    S_IFDIR: FT_DIR,
    S_IFCHR: FT_CHRDEV,
    S_IFBLK: FT_BLKDEV,
    S_IFIFO: FT_FIFO,
    S_IFSOCK: FT_SOCK,
    S_IFLNK: FT_SYMLINK,
}


def crc32c_superblock(image: bytes | memoryview, block_size: int) -> int:
    """The superblock checksum as the kernel computes it.

    crc32c seeded with ~0 and without the final inversion, over the bytes from SUPER_OFFSET
    to the end of the superblock's block, or over one whole block from SUPER_OFFSET when
    blocks are no larger than that offset, with the checksum field zeroed. google_crc32c
    computes the standard (inverted-in, inverted-out) CRC, so undo the final inversion.
    """
    length = block_size - SUPER_OFFSET if block_size > SUPER_OFFSET else block_size
    area = bytearray(image[SUPER_OFFSET : SUPER_OFFSET + length])
    if len(area) != length:
        raise ValueError(f"superblock checksum needs {length} bytes from offset {SUPER_OFFSET}")
    area[SUPER_CHECKSUM_OFFSET : SUPER_CHECKSUM_OFFSET + 4] = b"\0\0\0\0"
    return google_crc32c.value(bytes(area)) ^ 0xFFFFFFFF


def new_encode_dev(major: int, minor: int) -> int:
    """Linux new_encode_dev(): the rdev encoding EROFS stores for device inodes."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def new_decode_dev(dev: int) -> tuple[int, int]:
    """Inverse of new_encode_dev(): (major, minor)."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return major, minor
