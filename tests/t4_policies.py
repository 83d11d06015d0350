"""Fetch policies in a real mount over a real registry (through the fault proxy, which counts
the range requests)."""

from __future__ import annotations

import os
import random

import pytest

from tests.faultproxy import FaultProxy
from tests.fixtures.common import require_root, require_tool, run
from tests.fixtures.images import build_image, directory, file
from tests.fixtures.lazyimage import convert_image, push_to_registry, push_to_store
from tests.fixtures.lazymount import assert_same_tree, lazy_mount, lazyfs_cli

CHUNK = 65536
FILES = 40
rng = random.Random(12)
LAYER = [directory("pkg"), *[file(f"pkg/m{i:03d}.py", rng.randbytes(20_000)) for i in range(FILES)],
         directory("data"), file("data/big", rng.randbytes(1_000_000)), file("data/small", b"tiny\n")]


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    require_root()
    require_tool("umoci")
    original = build_image([LAYER])
    work = tmp_path_factory.mktemp("image")
    push_to_store(f"oci:{work / 'layout'}:v1", original)
    push_to_registry(registry, "t/policies", convert_image(original, chunk_size=CHUNK))
    run(["umoci", "unpack", "--image", f"{work / 'layout'}:v1", str(work / "bundle")])
    return "t/policies:v1", work / "bundle" / "rootfs"


def _range_requests(proxy: FaultProxy) -> int:
    return len([r for r in proxy.requests if "/blobs/" in r.path and r.range is not None])


@pytest.mark.parametrize("policy", ["none", "locality", "extent"])
def test_chain_of_dependent_reads(pushed, registry, tmp_path, policy):
    """A script that opens file N+1 only after reading file N: one request per file without a
    policy; with locality the first miss brings the files stored after it."""
    repo, rootfs = pushed
    with FaultProxy(registry.host) as proxy, \
            lazy_mount(tmp_path / "mnt", "--policy", policy, f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                       cache_dir=tmp_path / "cache") as mount:
        proxy.clear_requests()
        for i in range(FILES):
            name = f"pkg/m{i:03d}.py"
            assert (mount.path / name).read_bytes() == (rootfs / name).read_bytes()
        requests = _range_requests(proxy)
    if policy == "none":
        assert requests >= FILES
    else:
        # 6 when measured: the first miss and its ride-along, then speculative requests of at
        # most 256 KiB (12 of these files) on the idle link, and a second miss after 32 chunks.
        assert requests <= FILES // 4, requests


@pytest.mark.parametrize("policy", ["none", "readahead", "trace", "background", "locality",
                                    "readahead,trace,locality", "extent", "readahead,trace,extent"])
def test_whole_image_reader_gets_every_byte_under_every_policy(pushed, registry, tmp_path, policy):
    repo, rootfs = pushed
    with lazy_mount(tmp_path / "mnt", "--policy", policy, f"{registry.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        assert_same_tree(rootfs, mount.path, with_blocks=False, dir_nlink=False)
        for dirpath, _dirs, names in os.walk(mount.path):
            for name in names:
                path = os.path.join(dirpath, name)
                relative = os.path.relpath(path, mount.path)
                with open(path, "rb") as f:
                    assert f.read() == (rootfs / relative).read_bytes(), relative
        stats = mount.stats()
        assert stats["fetch"]["failed_chunks"] == 0
        names = policy.split(",")
        # The selected policies, and only they, did something (data/big is read sequentially).
        assert (stats["fetch"]["queued"]["readahead"] > 0) == ("readahead" in names)
        assert (stats["fetch"]["queued"]["speculative"] > 0) == bool({"locality", "extent"} & set(names))
        assert bool(stats["background"]["layers"]) == ("background" in names)


def test_unknown_policy_is_a_one_line_error_before_any_daemon_starts(tmp_path):
    for command in (["mount", "--run-dir", str(tmp_path / "run"), "--policy", "trace,fast", "127.0.0.1:1/x:1",
                     str(tmp_path / "mnt")],
                    ["daemon", "--socket", str(tmp_path / "s"), "--fuse-dir", str(tmp_path / "f"), "--policy", "fast"]):
        result = lazyfs_cli(*command, check=False)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"lazyfs {command[0]}: unknown fetch policy 'fast' (built in: none, readahead, trace, background, "
            "locality, extent; or package.module:Class)"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()
