"""`lazyfs mount` of a converted multi-layer image from the real registry.

The oracle is the original (gzip) image unpacked independently by umoci; the lazyfs mount
goes through the fault proxy so that every request the daemon makes is counted.
"""

from __future__ import annotations

import os
import random
import threading

import pytest
import trio

from lazyfs.registry import open_store
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures.common import require_root, require_tool, run
from tests.fixtures.images import (
    build_image, device, directory, file, hardlink, opaque, symlink, whiteout,
)
from tests.fixtures.lazyimage import convert_image, push_to_registry, push_to_store
from tests.fixtures.lazymount import assert_same_tree, lazy_mount, lazyfs_cli

CHUNK = 65536
rng = random.Random(7)
SHARED = rng.randbytes(CHUNK)  # the same chunk in two layers: one digest, one fetch
BIG = rng.randbytes(4 * 1024 * 1024 + 1234)

BASE = [
    directory("etc"), file("etc/hostname", b"box\n", xattrs={"user.origin": b"base"}),
    hardlink("etc/alias", "etc/hostname"), symlink("etc/link", "hostname"), file("etc/issue", b"v1\n"),
    directory("usr"), directory("usr/bin"), file("usr/bin/tool", rng.randbytes(300_000), mode=0o4755),
    file("usr/bin/shared-a", SHARED), file("usr/bin/empty", b""),
    directory("var"), directory("var/lib"), file("var/lib/old", b"old data"), file("gone", b"to be removed"),
    device("dev-null", "char", 1, 3), device("sda", "block", 8, 0, mode=0o660),
    directory("owned", uid=1000, gid=1000, mode=0o750), file("owned/f", rng.randbytes(5000), uid=1000, gid=100),
    file("trusted", b"t", xattrs={"trusted.lazyfs.note": b"yes", "user.two": b"2"}),
]
# Like docker and buildkit, upper layers declare the parent directories of what they change.
MIDDLE = [
    whiteout("gone"), directory("var"), directory("var/lib"), opaque("var/lib"), file("var/lib/new", b"new data"),
    directory("etc"), file("etc/issue", b"v2\n"), directory("many"),
    *[file(f"many/f{i:03d}", rng.randbytes(i * 37)) for i in range(120)],
]
TOP = [directory("data"), file("data/big", BIG), file("data/shared-b", SHARED)]


@pytest.fixture(scope="module")
def pushed_image(registry, tmp_path_factory):
    """(registry repository, oracle rootfs): the converted image in the registry."""
    require_root()
    require_tool("umoci")
    original = build_image([BASE, MIDDLE, TOP])
    converted = convert_image(original, chunk_size=CHUNK)
    work = tmp_path_factory.mktemp("image")
    push_to_store(f"oci:{work / 'layout'}:v1", original)
    push_to_registry(registry, "t/mount-image", converted)
    run(["umoci", "unpack", "--image", f"{work / 'layout'}:v1", str(work / "bundle")])
    return "t/mount-image:v1", work / "bundle" / "rootfs"


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.host) as running:
        yield running


def _chunk_requests(proxy: FaultProxy) -> list:
    return [r for r in proxy.requests if "/blobs/" in r.path and r.range is not None]


def _read_everything(root) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    total += len(f.read())
    return total


@pytest.fixture(params=["fuse", "kernel"])
def serve(request):
    """The serving mode of the mount under test (lazyfs.serve.kernel for "kernel")."""
    return request.param


def test_image_mount_equals_the_independently_unpacked_image(pushed_image, proxy, serve, tmp_path):
    repo, rootfs = pushed_image
    with lazy_mount(tmp_path / "mnt", "--serve", serve, f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        assert_same_tree(rootfs, mount.path, with_blocks=False, dir_nlink=False)
        assert sorted(os.listdir(mount.path / "var" / "lib")) == ["new"]
        assert not (mount.path / "gone").exists()
        stats = mount.stats()
        assert stats["layers"] == 3 and stats["fetch"]["failed_chunks"] == 0
        assert {layer["kind"] for layer in stats["attached"]} == {"lazyfs"}
        assert {layer["serve"] for layer in stats["attached"]} == {serve}


def test_single_layer_mount(pushed_image, proxy, serve, tmp_path):
    repo, _ = pushed_image
    top = open_store_digests(proxy.host, repo)[-1]
    with lazy_mount(tmp_path / "mnt", "--serve", serve, "--layer", top, f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        assert sorted(os.listdir(mount.path)) == ["data"]
        assert (mount.path / "data" / "big").read_bytes() == BIG


def open_store_digests(host: str, repo: str) -> list[str]:
    async def layers() -> list[str]:
        store = open_store(f"{host}/{repo}")
        try:
            return [d.digest for d in (await store.resolve_manifest()).layers]
        finally:
            await store.aclose()

    return trio.run(layers)


def test_concurrent_random_reads_and_single_flight(pushed_image, proxy, tmp_path):
    repo, _ = pushed_image
    # Without speculation (the default's extent policy guesses around a miss), so the requests
    # counted are the readers' own.
    with lazy_mount(tmp_path / "mnt", "--policy", "readahead,trace", f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        # N readers of one uncached chunk (the same content in two layers, so one digest): the
        # first request is held back so that every reader is waiting on it.
        proxy.clear_requests()
        proxy.add(Fault.delay(0.5), path=r"/blobs/", ranged=True, times=1)
        paths = [mount.path / "usr/bin/shared-a", mount.path / "data/shared-b"] * 4
        results: list[bytes | None] = [None] * len(paths)

        def read_one(i: int) -> None:
            with open(paths[i], "rb") as f:
                results[i] = f.read()

        threads = [threading.Thread(target=read_one, args=(i,)) for i in range(len(paths))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(r == SHARED for r in results)
        assert len(_chunk_requests(proxy)) == 1, [r.range for r in _chunk_requests(proxy)]

        # 32 concurrent readers over random ranges of a big file get the right bytes.
        errors: list[str] = []

        def random_reader(seed: int) -> None:
            local = random.Random(seed)
            fd = os.open(mount.path / "data/big", os.O_RDONLY)
            try:
                for _ in range(20):
                    offset = local.randrange(len(BIG))
                    size = local.randrange(1, 300_000)
                    if os.pread(fd, size, offset) != BIG[offset:offset + size]:
                        errors.append(f"wrong bytes at {offset}+{size}")
            finally:
                os.close(fd)

        readers = [threading.Thread(target=random_reader, args=(seed,)) for seed in range(32)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(timeout=120)
        assert not errors
        stats = mount.stats()
        assert stats["fetch"]["joined"] >= 1 or stats["fetch"]["misses"] >= 1


def test_warm_restart_fetches_nothing(pushed_image, proxy, serve, tmp_path):
    repo, rootfs = pushed_image
    cache = tmp_path / "cache"
    with lazy_mount(tmp_path / "mnt", "--serve", serve, f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=cache) as mount:
        cold = _read_everything(mount.path)
    assert _chunk_requests(proxy), "the cold mount fetched chunks"
    proxy.clear_requests()
    with lazy_mount(tmp_path / "mnt", "--serve", serve, f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=cache) as mount:
        assert _read_everything(mount.path) == cold
        assert_same_tree(rootfs, mount.path, with_blocks=False, dir_nlink=False)
        assert mount.stats()["fetch"]["requests"] == 0
    assert _chunk_requests(proxy) == []


def test_mount_errors_are_reported_by_the_daemon_and_leave_nothing_behind(pushed_image, registry, tmp_path):
    """The daemon resolves the image; what it cannot mount comes back to `lazyfs mount` as a
    one-line error with exit status 2 (the arguments are at fault), and no mount remains."""
    repo, _ = pushed_image
    push_to_registry(registry, "t/mount-plain-gzip", build_image([BASE]))
    mnt, run_dir, cache = tmp_path / "mnt", tmp_path / "run", tmp_path / "cache"
    mnt.mkdir()
    cases = [
        ([f"{registry.host}/t/mount-image:missing"], "cannot resolve"),
        ([f"{registry.host}/t/mount-plain-gzip:v1"], "not lazyfs layers"),
        (["--layer", "sha256:0123", f"{registry.host}/{repo}"], "0 layers of"),
    ]
    for args, message in cases:
        result = lazyfs_cli("mount", "--run-dir", str(run_dir), "--cache-dir", str(cache), *args, str(mnt),
                            check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("lazyfs mount: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not os.path.ismount(mnt)
        assert not run_dir.exists() or list(run_dir.iterdir()) == []
    # The same mount point then mounts the real image.
    with lazy_mount(mnt, f"{registry.host}/{repo}", run_dir=run_dir, cache_dir=cache) as mount:
        assert (mount.path / "etc/issue").read_bytes() == b"v2\n"
