"""Snapshot metadata (SQLite), List filters, and the snapshotter's lazy-layer logic against an
in-process fake LayerFS (no containerd, no daemon)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotter import filters
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, LayerFSError, NotFound
from snapshotter.layerfs import (CRI_IMAGE_REF_LABEL, CRI_LAYER_DIGEST_LABEL, LAZY_LAYER_LABEL,
                                 LAZYFS_LABEL_PREFIX, TARGET_REF_LABEL, layer_source)
from snapshotter.snapshots import Snapshotter, disk_usage
from snapshotter.store import Kind, MetaStore


@pytest.fixture
def store(tmp_path):
    s = MetaStore(tmp_path / "metadata.db")
    yield s
    s.close()


def test_create_commit_chain_keeps_id_and_parents(store):
    with store.transaction() as tx:
        a = tx.create(Kind.ACTIVE, "a", "", {"x": "1"})
        ca = tx.commit("a", "A", 4096, 1, {"y": "2"})
        assert ca.id == a.id and ca.kind == Kind.COMMITTED
        assert ca.labels == {"y": "2"}  # commit labels replace, never inherit
        assert (ca.size, ca.inodes) == (4096, 1)
        b = tx.create(Kind.ACTIVE, "b", "A", {})
        tx.commit("b", "B", 0, 0, {})
        c = tx.create(Kind.VIEW, "c", "B", {})
    assert c.parent == "B" and c.parent_ids == [b.id, a.id]
    with store.transaction() as tx:
        assert not tx.exists("a") and not tx.exists("b")
        assert [s.name for s in tx.walk()] == ["A", "B", "c"]


def test_error_kinds(store):
    with store.transaction() as tx:
        tx.create(Kind.ACTIVE, "a", "", {})
    with pytest.raises(AlreadyExists), store.transaction() as tx:
        tx.create(Kind.ACTIVE, "a", "", {})
    with pytest.raises(NotFound), store.transaction() as tx:
        tx.create(Kind.ACTIVE, "b", "missing", {})
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.create(Kind.ACTIVE, "b", "a", {})  # parent not committed
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.create(Kind.COMMITTED, "b", "", {})
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.create(Kind.ACTIVE, "", "", {})
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.create(Kind.ACTIVE, "b", "", {"k": "v" * 4096})
    with pytest.raises(NotFound), store.transaction() as tx:
        tx.commit("missing", "X", 0, 0, {})
    with store.transaction() as tx:
        tx.commit("a", "A", 0, 0, {})
        tx.create(Kind.ACTIVE, "child", "A", {})
        tx.create(Kind.VIEW, "v", "", {})
    with pytest.raises(FailedPrecondition), store.transaction() as tx:
        tx.commit("v", "V", 0, 0, {})
    with pytest.raises(AlreadyExists), store.transaction() as tx:
        tx.commit("child", "A", 0, 0, {})
    with pytest.raises(FailedPrecondition), store.transaction() as tx:
        tx.remove("A")
    with pytest.raises(FailedPrecondition), store.transaction() as tx:
        tx.get_active_or_view("A")
    with pytest.raises(NotFound), store.transaction() as tx:
        tx.remove("missing")


def test_failed_transaction_rolls_back(store):
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.create(Kind.ACTIVE, "a", "", {})
        raise RuntimeError("directory creation failed")
    with store.transaction() as tx:
        assert tx.walk() == []


def test_update_labels_by_field_path(store):
    with store.transaction() as tx:
        tx.create(Kind.ACTIVE, "a", "", {"keep": "1", "drop": "2"})
        before = tx.get("a")
        s = tx.update_labels("a", {"new": "3", "drop": ""}, ["labels.new", "labels.drop"])
        assert s.labels == {"keep": "1", "new": "3"}
        assert s.updated_ns >= before.updated_ns and s.created_ns == before.created_ns
        assert tx.update_labels("a", {"only": "x"}, ["labels"]).labels == {"only": "x"}
        assert tx.update_labels("a", {"all": "y"}, []).labels == {"all": "y"}
    with pytest.raises(InvalidArgument), store.transaction() as tx:
        tx.update_labels("a", {}, ["name"])
    with pytest.raises(NotFound), store.transaction() as tx:
        tx.update_labels("missing", {}, [])


def test_metadata_survives_reopen(tmp_path):
    s = MetaStore(tmp_path / "m.db")
    with s.transaction() as tx:
        tx.create(Kind.ACTIVE, "a", "", {"l": "v"})
        tx.commit("a", "A", 1, 2, {"l": "v"})
        tx.set_lazy_layer("A", "sha256-abc")
    s.close()
    s = MetaStore(tmp_path / "m.db")
    with s.transaction() as tx:
        (lazy,) = tx.lazy_snapshots()
        assert (lazy.name, lazy.lazy_layer, lazy.size, lazy.inodes) == ("A", "sha256-abc", 1, 2)
        assert tx.find_committed("l", "v", "") == lazy
        assert tx.find_committed("l", "v", "other-parent") is None
    s.close()


def test_filters(store):
    with store.transaction() as tx:
        tx.create(Kind.ACTIVE, "a", "", {"containerd.io/snapshot.ref": "sha256:1"})
        tx.commit("a", "A", 0, 0, {"containerd.io/snapshot.ref": "sha256:1"})
        tx.create(Kind.ACTIVE, "b x", "A", {"team": "blue"})
        snaps = {s.name: s for s in tx.walk()}

    def names(*fs):
        match = filters.matcher(list(fs))
        return sorted(n for n, s in snaps.items() if match(s))

    assert names() == ["A", "b x"]
    assert names("kind==committed") == ["A"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:1,parent==""') == ["A"]
    assert names('parent=="A"') == ["b x"]
    assert names("labels.team") == ["b x"]
    assert names("labels.team!=blue") == ["A"]
    assert names('name~="^b "') == ["b x"]
    assert names("kind==view", "labels.team==blue") == ["b x"]
    with pytest.raises(InvalidArgument):
        filters.parse('name=="unterminated')
    with pytest.raises(InvalidArgument):
        filters.parse("name~=(")


def test_disk_usage_counts_blocks_and_hard_links_once(tmp_path):
    root = tmp_path / "u"
    root.mkdir()
    (root / "f").write_bytes(b"x" * 10000)
    os.link(root / "f", root / "g")
    (root / "d").mkdir()
    usage = disk_usage(root)
    assert usage.inodes == 3  # root, f (twice linked), d
    expected = sum(os.lstat(p).st_blocks * 512 for p in (root, root / "f", root / "d"))
    assert usage.size == expected


# -- the lazy path against a fake layer filesystem ----------------------------------------

class FakeLayerFS:
    """Serves each attached layer from a directory holding one marker file."""

    def __init__(self, base: Path, servable: bool = True, fail_mount: bool = False):
        self.base = base
        self.servable = servable
        self.fail_mount = fail_mount
        self.attached_layers: dict[str, dict] = {}
        self.attach_calls = 0

    def check(self, labels):
        return self.servable and layer_source(labels) is not None

    def mount(self, layer, labels):
        if self.fail_mount:
            raise LayerFSError("daemon unavailable")
        self.attach_calls += 1
        path = self.base / layer
        path.mkdir(parents=True, exist_ok=True)
        (path / "marker").write_text(layer)
        self.attached_layers[layer] = dict(labels)
        return str(path)

    def unmount(self, layer):
        del self.attached_layers[layer]

    def path(self, layer):
        return str(self.base / layer)

    def attached(self):
        return set(self.attached_layers)


def lazy_labels(chain_id: str, digest: str) -> dict[str, str]:
    return {TARGET_REF_LABEL: chain_id, CRI_IMAGE_REF_LABEL: "127.0.0.1:5000/app:1",
            CRI_LAYER_DIGEST_LABEL: digest, LAZYFS_LABEL_PREFIX + "version": "1"}


@pytest.fixture
def fake_fs(tmp_path):
    return FakeLayerFS(tmp_path / "layers")


@pytest.fixture
def lazy_snapshotter(tmp_path, fake_fs):
    sn = Snapshotter(tmp_path / "root", fake_fs)
    yield sn
    sn.close()


def test_lazy_prepare_commits_target_and_answers_already_exists(lazy_snapshotter, fake_fs):
    sn = lazy_snapshotter
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/1/extract-1 sha256:c1", "", lazy_labels("sha256:c1", "sha256:l1"))
    # containerd finds the target by label and parent, committed, with the Prepare labels
    (target,) = sn.walk(['labels."containerd.io/snapshot.ref"==sha256:c1,parent==""'])
    assert target.kind == Kind.COMMITTED and target.name == "sha256:c1"
    assert target.labels[CRI_LAYER_DIGEST_LABEL] == "sha256:l1"
    assert target.labels[LAZY_LAYER_LABEL] == "sha256-l1"
    with pytest.raises(NotFound):
        sn.stat("ns/1/extract-1 sha256:c1")
    # the second layer stacks on the lazy one; a container's snapshot sees both as lowerdirs
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/2/extract-2 sha256:c2", "sha256:c1", lazy_labels("sha256:c2", "sha256:l2"))
    (mount,) = sn.prepare("ctr", "sha256:c2", {})
    assert mount.type == "overlay"
    assert f"lowerdir={fake_fs.path('sha256-l2')}:{fake_fs.path('sha256-l1')}" in mount.options
    # a repeated pull of the same chain is answered without attaching again
    calls = fake_fs.attach_calls
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/3/extract-3 sha256:c1", "", lazy_labels("sha256:c1", "sha256:l1"))
    assert fake_fs.attach_calls == calls


def test_lazy_layer_shared_by_snapshots_is_detached_with_the_last(lazy_snapshotter, fake_fs):
    sn = lazy_snapshotter
    with pytest.raises(AlreadyExists):
        sn.prepare("k1", "", lazy_labels("sha256:c1", "sha256:same"))
    sn.prepare("base", "", {})  # the same layer again, under another parent
    sn.commit("B", "base", {})
    with pytest.raises(AlreadyExists):
        sn.prepare("k2", "B", lazy_labels("sha256:c1", "sha256:same"))
    (second,) = sn.walk(['parent==B'])
    assert second.name.startswith("sha256:c1@")  # the target name was taken
    sn.remove("sha256:c1")
    assert "sha256-same" in fake_fs.attached_layers
    sn.remove(second.name)
    assert fake_fs.attached_layers == {}


@pytest.mark.expected_log
def test_lazy_falls_back_to_unpacking(tmp_path, caplog):
    for fs in (FakeLayerFS(tmp_path / "a", servable=False), FakeLayerFS(tmp_path / "b", fail_mount=True)):
        sn = Snapshotter(tmp_path / f"root-{id(fs)}", fs)
        (mount,) = sn.prepare("k", "", lazy_labels("sha256:c1", "sha256:l1"))
        assert mount.type == "bind" and sn.stat("k").kind == Kind.ACTIVE
        sn.close()
    assert any("falling back" in r.getMessage() for r in caplog.records)


def test_lazy_prepare_with_bad_parent_attaches_nothing(lazy_snapshotter, fake_fs):
    lazy_snapshotter.prepare("active-parent", "", {})
    with pytest.raises(InvalidArgument):
        lazy_snapshotter.prepare("k", "active-parent", lazy_labels("sha256:c1", "sha256:l1"))
    with pytest.raises(NotFound):
        lazy_snapshotter.prepare("k", "missing", lazy_labels("sha256:c1", "sha256:l1"))
    assert fake_fs.attach_calls == 0 and fake_fs.attached_layers == {}


def test_ordinary_layer_with_ref_label_is_unpacked(lazy_snapshotter, fake_fs):
    (mount,) = lazy_snapshotter.prepare("k", "", {TARGET_REF_LABEL: "sha256:c"})
    assert mount.type == "bind" and fake_fs.attached_layers == {}


def test_reattach_after_restart(tmp_path, fake_fs):
    sn = Snapshotter(tmp_path / "root", fake_fs)
    for i in (1, 2):
        with pytest.raises(AlreadyExists):
            sn.prepare(f"k{i}", "" if i == 1 else "sha256:c1",
                       lazy_labels(f"sha256:c{i}", f"sha256:l{i}"))
    sn.close()
    fresh = FakeLayerFS(fake_fs.base)
    fresh.mount("sha256-orphan", lazy_labels("sha256:c9", "sha256:orphan"))  # attach, no commit
    sn = Snapshotter(tmp_path / "root", fresh)
    assert sn.reattach_lazy_layers() == 2
    assert set(fresh.attached_layers) == {"sha256-l1", "sha256-l2"}
    assert fresh.attached_layers["sha256-l2"][CRI_IMAGE_REF_LABEL] == "127.0.0.1:5000/app:1"
    sn.close()


# -- configuration and the daemon client's pure helpers ----------------------------------

def test_config_defaults_and_overrides(tmp_path):
    from snapshotter import config
    from snapshotter.daemon_client import DaemonSupervisor
    cfg = config.load(None, root=tmp_path / "r")
    assert cfg.daemon.mountpoint == tmp_path / "r" / "mnt"
    assert cfg.daemon.control_socket == tmp_path / "r" / "daemon.sock"
    path = tmp_path / "c.toml"
    path.write_text('root = "/x"\nlog_level = "debug"\n[daemon]\ncache_size = "512MiB"\n'
                    'prefetch = false\n[registry]\ninsecure_hosts = ["127.0.0.1:5000"]\n'
                    '[registry.mirrors]\n"docker.io" = ["127.0.0.1:5000"]\n')
    cfg = config.load(path)
    assert cfg.root == Path("/x") and cfg.daemon.cache_size == 512 << 20
    assert cfg.daemon.prefetch is False and cfg.registry.mirrors == {"docker.io": ["127.0.0.1:5000"]}
    assert cfg.daemon.allow_suid_dev is False
    assert "--allow-suid-dev" not in DaemonSupervisor(cfg, None).command()
    path.write_text('[daemon]\nallow_suid_dev = true\n')
    assert "--allow-suid-dev" in DaemonSupervisor(config.load(path), None).command()
    for bad in ('nope = 1\n', '[daemon]\ncache_size = "lots"\n', 'root = 3\n', 'root = "\n',
                '[daemon]\nallow_suid_dev = "yes"\n', '[daemon]\npolicies = "trace"\n',
                '[daemon]\npolicies = ["trace,locality"]\n'):
        path.write_text(bad)
        with pytest.raises(config.ConfigError):
            config.load(path)


def test_config_policies_reach_the_daemon_command(tmp_path):
    from snapshotter import config
    from snapshotter.daemon_client import DaemonSupervisor
    path = tmp_path / "c.toml"
    path.write_text(f'root = "{tmp_path}"\n[daemon]\npolicies = ["trace", "locality"]\n')
    cfg = config.load(path)
    assert cfg.daemon.policies == ["trace", "locality"]
    command = DaemonSupervisor(cfg, None).command()
    assert command[command.index("--policy") + 1] == "trace,locality"
    assert "--policy" not in DaemonSupervisor(config.load(None, root=tmp_path), None).command()


def test_traces_config_and_attach_arguments(tmp_path):
    from snapshotter import config
    from snapshotter.daemon_client import DaemonLayerFS
    cfg = config.load(None)
    assert (cfg.traces.record, cfg.traces.share) == (True, "pull")  # the safe defaults: nothing pushed
    path = tmp_path / "c.toml"
    path.write_text('[traces]\nrecord = true\nshare = "push"\nquiet = 2\nusername = "u"\npassword = "p"\n')
    cfg = config.load(path)
    assert cfg.traces.share == "push" and cfg.traces.quiet == 2.0
    fs = DaemonLayerFS(tmp_path / "s", tmp_path / "m", traces=cfg.traces)
    manifest = "sha256:" + "1" * 64
    assert fs._learning(manifest) == {
        "image_manifest": manifest, "share": "push", "learned_trace": True, "record_trace": True,
        "push_credentials": {"username": "u", "password": "p"}}
    # no manifest digest label (ctr-remote): the daemon resolves the image reference
    assert fs._learning("") == {"share": "push", "learned_trace": True, "record_trace": True,
                                "push_credentials": {"username": "u", "password": "p"}}
    off = DaemonLayerFS(tmp_path / "s", tmp_path / "m", traces=config.TracesConfig(record=False, share="off"))
    assert off._learning(manifest) == {"image_manifest": manifest, "share": "off", "learned_trace": False,
                                       "record_trace": False}
    for bad in ('[traces]\nshare = "always"\n', '[traces]\nusername = "u"\n', '[traces]\nrecrod = true\n'):
        path.write_text(bad)
        with pytest.raises(config.ConfigError):
            config.load(path)


def test_mirrored_reference():
    from snapshotter.daemon_client import mirrored
    mirrors = {"docker.io": ["http://127.0.0.1:5000/"], "q.io": ["m:1"]}
    assert mirrored("busybox:1", mirrors) == "127.0.0.1:5000/library/busybox:1"
    assert mirrored("docker.io/org/app@sha256:ab", mirrors) == "127.0.0.1:5000/org/app@sha256:ab"
    assert mirrored("q.io/a/b:2", mirrors) == "m:1/a/b:2"
    assert mirrored("127.0.0.1:7/a:1", mirrors) == "127.0.0.1:7/a:1"
