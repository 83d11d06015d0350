"""The lazyfs layer format: a tar+zstd OCI layer blob that also carries an EROFS metadata image
and a chunk table in zstd skippable frames (see docs/parts/layer-format.md)."""

from lazyfs.layer.errors import LayerFormatError, UnsafeTarEntry

__all__ = ["LayerFormatError", "UnsafeTarEntry"]
