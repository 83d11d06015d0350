"""Errors of the snapshotter, one per gRPC status code containerd acts on.

containerd's client turns these codes back into its errdefs (ErrNotFound, ErrAlreadyExists, ...),
and its unpacker and garbage collector branch on them, so the mapping is part of the protocol.
"""


class SnapshotterError(Exception):
    """Base class; ``code_name`` is the name of the grpc.StatusCode member it maps to."""

    code_name = "UNKNOWN"


class NotFound(SnapshotterError):
    code_name = "NOT_FOUND"


class AlreadyExists(SnapshotterError):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotterError):
    code_name = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotterError):
    code_name = "INVALID_ARGUMENT"


class LayerFSError(SnapshotterError):
    """The lazy layer filesystem (the lazyfs daemon) could not do what was asked."""

    code_name = "UNAVAILABLE"
