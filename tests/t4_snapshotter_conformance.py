"""Snapshots API conformance over real gRPC, after containerd's snapshots/testsuite cases:
the ordinary (non-lazy) path, with the returned mounts applied by the kernel."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from snapshotter.api import snapshots_pb2 as pb
from snapshotter.api import snapshots_pb2_grpc
from snapshotter.service import serve
from snapshotter.snapshots import Snapshotter
from tests.fixtures.common import require_root, run


class Client:
    """The Snapshots stub with the calls spelled like containerd's Snapshotter interface."""

    def __init__(self, channel: grpc.Channel):
        self.stub = snapshots_pb2_grpc.SnapshotsStub(channel)

    def prepare(self, key, parent="", labels=None):
        return list(self.stub.Prepare(pb.PrepareSnapshotRequest(
            snapshotter="lazyfs", key=key, parent=parent, labels=labels or {})).mounts)

    def view(self, key, parent="", labels=None):
        return list(self.stub.View(pb.ViewSnapshotRequest(
            key=key, parent=parent, labels=labels or {})).mounts)

    def mounts(self, key):
        return list(self.stub.Mounts(pb.MountsRequest(key=key)).mounts)

    def commit(self, name, key, labels=None):
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))

    def remove(self, key):
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    def stat(self, key):
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def update(self, name, labels, paths=()):
        req = pb.UpdateSnapshotRequest(info=pb.Info(name=name, labels=labels))
        req.update_mask.paths.extend(paths)
        return self.stub.Update(req).info

    def usage(self, key):
        u = self.stub.Usage(pb.UsageRequest(key=key))
        return u.size, u.inodes

    def list(self, *filters):
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=list(filters)))
                for i in r.info]

    def cleanup(self):
        self.stub.Cleanup(pb.CleanupRequest())


@pytest.fixture
def service(tmp_path):
    """(client, snapshotter root) for a snapshotter served over a unix socket."""
    root = tmp_path / "root"
    socket_path = tmp_path / "sn.sock"
    sn = Snapshotter(root)
    server = serve(sn, socket_path)
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    try:
        yield Client(channel), root, socket_path
    finally:
        channel.close()
        server.stop(grace=None).wait()
        sn.close()


@pytest.fixture
def client(service):
    return service[0]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


@contextmanager
def mounted(mounts, target: Path):
    """Apply containerd mounts at ``target`` the way containerd's mount.All does."""
    require_root()
    target.mkdir(parents=True, exist_ok=True)
    (m,) = mounts
    run(["mount", "-t", m.type, m.source, str(target), "-o", ",".join(m.options)])
    try:
        yield target
    finally:
        run(["umount", str(target)])


def write_layer(client, key, parent, tmp_path, files=(), remove=()):
    with mounted(client.prepare(key, parent), tmp_path / f"mnt-{key}") as mnt:
        for name, data in files:
            (mnt / name).parent.mkdir(parents=True, exist_ok=True)
            (mnt / name).write_bytes(data)
        for name in remove:
            os.unlink(mnt / name)


def test_socket_is_private(service):
    _, _, socket_path = service
    mode = os.stat(socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_basic_chain_mounts_and_view(client, tmp_path):
    write_layer(client, "a", "", tmp_path, files=[("foo", b"foo\n"), ("dir/bar", b"bar\n")])
    (m,) = client.mounts("a")
    assert m.type == "bind" and list(m.options) == ["rw", "rbind"]
    client.commit("A", "a")
    with mounted(client.prepare("b", "A"), tmp_path / "mb") as mnt:
        assert (mnt / "foo").read_bytes() == b"foo\n"
        os.unlink(mnt / "foo")
        (mnt / "dir" / "baz").write_bytes(b"baz\n")
    client.commit("B", "b")
    (view_mount,) = client.view("v", "B")
    assert view_mount.type == "overlay"
    assert not any(o.startswith(("upperdir", "workdir")) for o in view_mount.options)
    with mounted([view_mount], tmp_path / "mv") as mnt:
        assert not (mnt / "foo").exists()  # the whiteout in B hides A's file
        assert sorted(os.listdir(mnt / "dir")) == ["bar", "baz"]
        with pytest.raises(OSError):
            (mnt / "new").write_bytes(b"x")
    # a view of a single committed layer is a read-only bind of it
    (single,) = client.view("v1", "A")
    assert single.type == "bind" and list(single.options) == ["ro", "rbind"]
    with mounted([single], tmp_path / "mv1") as mnt:
        assert (mnt / "foo").read_bytes() == b"foo\n"


def test_transitivity_three_layers(client, tmp_path):
    write_layer(client, "l1", "", tmp_path, files=[("f", b"1")])
    client.commit("L1", "l1")
    write_layer(client, "l2", "L1", tmp_path, files=[("f", b"2")])
    client.commit("L2", "l2")
    (m,) = client.prepare("top", "L2")
    lower = [o for o in m.options if o.startswith("lowerdir=")][0]
    assert len(lower.split(":")) == 2
    with mounted([m], tmp_path / "mt") as mnt:
        assert (mnt / "f").read_bytes() == b"2"
    assert client.stat("top").parent == "L2"
    assert client.stat("L2").parent == "L1"


def test_stat_active_and_committed(client):
    client.prepare("a", labels={"k": "v"})
    info = client.stat("a")
    assert (info.name, info.parent, info.kind) == ("a", "", pb.ACTIVE)
    assert dict(info.labels) == {"k": "v"} and info.created_at.seconds > 0
    client.commit("A", "a", labels={"c": "1"})
    info = client.stat("A")
    assert info.kind == pb.COMMITTED and dict(info.labels) == {"c": "1"}
    assert code_of(lambda: client.stat("a")) == grpc.StatusCode.NOT_FOUND


def test_error_codes(client):
    client.prepare("a")
    assert code_of(lambda: client.prepare("a")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: client.prepare("b", "missing")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.prepare("b", "a")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.commit("X", "missing")) == grpc.StatusCode.NOT_FOUND
    client.commit("A", "a")
    client.prepare("c", "A")
    assert code_of(lambda: client.commit("A", "c")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: client.commit("C", "A")) == grpc.StatusCode.FAILED_PRECONDITION
    client.view("v", "A")
    assert code_of(lambda: client.commit("V", "v")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: client.remove("A")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: client.mounts("A")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: client.mounts("missing")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.remove("missing")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.prepare("big", labels={"k": "x" * 5000})) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.list("name~=(")) == grpc.StatusCode.INVALID_ARGUMENT
    client.remove("c")
    client.remove("v")
    client.remove("A")
    assert client.list() == []


def test_update_labels(client):
    client.prepare("a", labels={"a": "1", "b": "2"})
    info = client.update("a", {"b": "", "c": "3"}, ["labels.b", "labels.c"])
    assert dict(info.labels) == {"a": "1", "c": "3"}
    assert info.updated_at.ToNanoseconds() >= info.created_at.ToNanoseconds()
    assert dict(client.update("a", {"z": "9"}, ["labels"]).labels) == {"z": "9"}
    assert dict(client.update("a", {"y": "8"}).labels) == {"y": "8"}
    assert dict(client.stat("a").labels) == {"y": "8"}
    assert code_of(lambda: client.update("a", {}, ["parent"])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.update("zz", {})) == grpc.StatusCode.NOT_FOUND


def test_usage_measured_while_active_kept_when_committed(client, tmp_path):
    data = os.urandom(3 * 65536)
    write_layer(client, "a", "", tmp_path, files=[("one", data), ("sub/two", data[:1000])])
    size, inodes = client.usage("a")
    assert inodes == 4  # upper dir, one, sub, sub/two
    assert size >= len(data) + 1000
    client.commit("A", "a")
    assert client.usage("A") == (size, inodes)
    client.view("v", "A")
    assert client.usage("v") == (0, 0)


def test_list_and_filters(client):
    client.prepare("a", labels={"team": "red"})
    client.commit("A", "a", labels={"team": "red"})
    client.prepare("b", "A", labels={"team": "blue"})
    client.view("v", "A")
    assert sorted(i.name for i in client.list()) == ["A", "b", "v"]
    assert [i.name for i in client.list("kind==committed")] == ["A"]
    assert sorted(i.name for i in client.list('parent=="A"')) == ["b", "v"]
    assert sorted(i.name for i in client.list("labels.team==blue", "kind==view")) == ["b", "v"]


def test_list_streams_many(client):
    for i in range(250):
        client.prepare(f"k{i:03d}")
    assert len(client.list()) == 250


def test_remove_and_cleanup_directories(service, tmp_path):
    client, root, _ = service
    write_layer(client, "a", "", tmp_path, files=[("f", b"x")])
    client.commit("A", "a")
    client.prepare("b", "A")
    assert sorted(os.listdir(root / "snapshots")) == ["1", "2"]
    client.remove("b")
    assert os.listdir(root / "snapshots") == ["1"]
    (root / "snapshots" / "99").mkdir()  # a directory without metadata (interrupted create)
    client.cleanup()
    assert os.listdir(root / "snapshots") == ["1"]
    client.remove("A")
    assert os.listdir(root / "snapshots") == []


def test_metadata_survives_restart(tmp_path):
    root = tmp_path / "root"
    for round_ in (1, 2):
        sn = Snapshotter(root)
        server = serve(sn, tmp_path / "s.sock")
        with grpc.insecure_channel(f"unix:{tmp_path / 's.sock'}") as channel:
            client = Client(channel)
            if round_ == 1:
                client.prepare("a", labels={"k": "v"})
                client.commit("A", "a", labels={"k": "v"})
            else:
                assert client.stat("A").kind == pb.COMMITTED
                assert client.prepare("b", "A")[0].type == "overlay"
        server.stop(grace=None).wait()
        sn.close()


def test_cli_help():
    out = run([str(Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "lazyfs-snapshotter"),
               "--help"]).stdout
    assert "--config" in out and "proxy_plugins" in out
