"""The EROFS error contract: the reader raises only ErofsError (and its subclasses) for bad input."""


class ErofsError(Exception):
    """Any problem with an EROFS image. Messages say what was wrong and where (nid, offset)."""


class CorruptImage(ErofsError):
    """The image is truncated, inconsistent or hostile."""


class UnsupportedImage(ErofsError):
    """The image is valid EROFS but uses something lazyfs does not handle (e.g. compression)."""
