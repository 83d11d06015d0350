"""Exception types of the benchmark infrastructure."""


class BenchError(Exception):
    """A benchmark image or network setup step failed."""


class ImageBuildError(BenchError):
    """Building a benchmark image failed (a build step, packing, or a layer check)."""


class StalePycError(ImageBuildError):
    """A timestamp-based .pyc header disagrees with its source as the image's tar records it."""


class NetShapeError(BenchError):
    """Bringing up, measuring or tearing down the shaped registry link failed."""
