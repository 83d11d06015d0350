"""The ``containerd.services.snapshots.v1.Snapshots`` gRPC servicer: a thin adapter that
translates messages to :class:`snapshotter.snapshots.Snapshotter` calls and our errors to the
status codes containerd's proxy turns back into its errdefs."""

from __future__ import annotations

import functools
import logging
import os
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from .api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .errors import SnapshotterError
from .snapshots import Mount, Snapshotter
from .store import Snapshot

log = logging.getLogger(__name__)

LIST_BATCH = 100  # infos per ListSnapshotsResponse, as containerd's service sends them


def _info(snap: Snapshot) -> snapshots_pb2.Info:
    info = snapshots_pb2.Info(name=snap.name, parent=snap.parent, kind=int(snap.kind),
                              labels=snap.labels)
    info.created_at.FromNanoseconds(snap.created_ns)
    info.updated_at.FromNanoseconds(snap.updated_ns)
    return info


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _rpc(method):
    """Map SnapshotterError to its status code; anything else is a logged INTERNAL error."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except SnapshotterError as e:
            log.debug("%s: %s %s", method.__name__, e.code_name, e)
            context.abort(getattr(grpc.StatusCode, e.code_name), str(e))
        except Exception as e:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
    return wrapper


def _stream_rpc(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except SnapshotterError as e:
            context.abort(getattr(grpc.StatusCode, e.code_name), str(e))
        except Exception as e:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
    return wrapper


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter):
        self.sn = snapshotter

    @_rpc
    def Prepare(self, request, context):
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def View(self, request, context):
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def Mounts(self, request, context):
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.sn.mounts(request.key)))

    @_rpc
    def Commit(self, request, context):
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request, context):
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request, context):
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.sn.stat(request.key)))

    @_rpc
    def Update(self, request, context):
        snap = self.sn.update(request.info.name, dict(request.info.labels),
                              list(request.update_mask.paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(snap))

    @_stream_rpc
    def List(self, request, context):
        batch = []
        for snap in self.sn.walk(list(request.filters)):
            batch.append(_info(snap))
            if len(batch) == LIST_BATCH:
                yield snapshots_pb2.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield snapshots_pb2.ListSnapshotsResponse(info=batch)

    @_rpc
    def Usage(self, request, context):
        usage = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(self, request, context):
        self.sn.cleanup()
        return empty_pb2.Empty()


def serve(snapshotter: Snapshotter, socket_path: Path, workers: int = 8) -> grpc.Server:
    """Start serving on a unix socket readable by root only; returns the started server."""
    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.is_socket():
        socket_path.unlink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="snapshots-rpc"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(snapshotter), server)
    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    return server
