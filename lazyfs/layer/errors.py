"""The layer error contract: everything in lazyfs.layer raises LayerFormatError for bad input."""


class LayerFormatError(Exception):
    """A lazyfs layer blob, footer, chunk table or annotation set is malformed or inconsistent."""


class UnsafeTarEntry(LayerFormatError):
    """A tar entry that a safe applier must refuse (escapes the root, dangling hard link, ...)."""

    def __init__(self, entry: str, reason: str):
        super().__init__(f"unsafe tar entry {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason


class BuildCancelled(Exception):
    """A conversion was asked to stop (its cancel event was set); not a format problem."""
