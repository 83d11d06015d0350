"""EROFS metadata images: on-disk structures, a reader and a writer (pure Python)."""

from lazyfs.erofs.errors import CorruptImage, ErofsError, UnsupportedImage
from lazyfs.erofs.reader import Device, DirEntry, Extent, Image, Inode, NotFound
from lazyfs.erofs.writer import Builder, BuildInfo, ChunkedData, ChunkStore, Entry, FileData

__all__ = [
    "BuildInfo", "Builder", "ChunkStore", "ChunkedData", "CorruptImage", "Entry", "ErofsError",
    "FileData", "UnsupportedImage",
    "Device", "DirEntry", "Extent", "Image", "Inode", "NotFound",
]
