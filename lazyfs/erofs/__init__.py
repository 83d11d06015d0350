"""EROFS metadata images: on-disk structures, a reader and a writer (pure Python)."""

from lazyfs.erofs.errors import CorruptImage, ErofsError, UnsupportedImage

__all__ = ["CorruptImage", "ErofsError", "UnsupportedImage"]
